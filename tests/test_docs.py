"""The README documents every hook, and every hook has its own test."""

import inspect
import re
from pathlib import Path

from posttrain import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def _specs():
    return {n: f for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "posttrain_spec")}


def test_every_hook_is_documented_in_readme_with_its_arguments():
    readme = (ROOT / "README.md").read_text()
    for name, fn in _specs().items():
        sig = f"{name}({', '.join(inspect.signature(fn).parameters)})"
        assert sig in readme, f"README.md lacks the hook signature `{sig}`"


def test_every_hook_has_a_docstring():
    for name, fn in _specs().items():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"hookspec {name} needs a real docstring"


def test_every_hook_has_a_test():
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for name in _specs():
        assert re.search(rf"def test_hook_{name}\b", tests), f"hook {name} has no test_hook_{name}"
