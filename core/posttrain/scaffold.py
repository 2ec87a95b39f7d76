"""``posttrain new-plugin NAME``: write a complete, installable algorithm plugin package.

The package passes its own tests right after ``pip install -e``: a real (small) algorithm, a
config dataclass, the posttrain conformance suite, a 2-step run on a tiny model, and a tiny
config. Templates are ``string.Template`` text (``$name``), so braces in code need no escaping.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from . import __version__

# Lowercase words joined by single underscores: a valid Python identifier and entry-point name,
# and a tidy distribution name (posttrain-NAME).
NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


class ScaffoldError(ValueError):
    """The plugin name or the target directory cannot be used; the message says why."""


def core_requirement(version: str = __version__) -> str:
    """``posttrain>=X.Y,<X.(Y+1)``: the hook API may change between minor versions."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        raise ScaffoldError(f"cannot read a major.minor version from posttrain's version '{version}'")
    major, minor = int(m[1]), int(m[2])
    return f"posttrain>={major}.{minor},<{major}.{minor + 1}"


def _suggestion(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    s = re.sub(r"^posttrain_", "", s)
    return s if NAME_RE.match(s) else ""


def check_name(name: str) -> str:
    """Return ``name`` if it can name a plugin, else raise ``ScaffoldError`` saying why."""
    if not NAME_RE.match(name):
        hint = _suggestion(name)
        raise ScaffoldError(
            f"plugin name '{name}' is not valid: use lowercase letters and digits, words joined by single "
            f"underscores, starting with a letter (the name becomes the entry point NAME, the package "
            f"posttrain_NAME and the distribution posttrain-NAME).{f' Try: {hint}' if hint and hint != name else ''}"
        )
    if name == "posttrain" or name.startswith("posttrain_"):
        hint = _suggestion(name)
        raise ScaffoldError(f"plugin name '{name}': leave out the 'posttrain' prefix, it is added for you "
                            f"(package posttrain_<name>).{f' Try: {hint}' if hint else ''}")
    taken = _taken_names()
    if name in taken:
        raise ScaffoldError(f"plugin name '{name}' is taken by {taken[name]}; algorithm names are global "
                            f"(one entry point per name), pick another")
    return name


def _taken_names() -> dict[str, str]:
    """Algorithm names already in use: installed entry points and registry.toml entries."""
    from .plugins import ALGORITHMS, installed
    from .registry import load_registry

    taken = {n: f"{e.get('distribution', 'posttrain')} (registry.toml)" for n, e in load_registry().get("algorithms", {}).items()}
    taken.update({n: f"{p.distribution} {p.version} (installed)" for n, p in installed(ALGORITHMS).items()})
    return taken


def camel(name: str) -> str:
    return "".join(w.capitalize() for w in name.split("_"))


def render(name: str) -> dict[str, str]:
    """Relative path → file content of the package for plugin ``name``."""
    values = {"name": name, "Camel": camel(name), "core_req": core_requirement(), "core_version": __version__}
    return {path.replace("NAME", name): Template(text).substitute(values) for path, text in FILES.items()}


def new_plugin(name: str, directory: str | Path | None = None) -> tuple[Path, list[str]]:
    """Write the package for ``name`` into ``directory`` (default ``./posttrain-NAME``).

    Refuses a directory that exists and is not empty. Returns (directory, files written).
    """
    check_name(name)
    target = Path(directory) if directory is not None else Path.cwd() / f"posttrain-{name}"
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"{target} already exists and is not an empty directory; refusing to overwrite it. "
                            f"Choose another --dir or remove it.")
    files = render(name)
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return target, sorted(files)


# --- templates ----------------------------------------------------------------------------------

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "posttrain-$name"
version = "0.1.0"
description = "$Camel: an algorithm plugin for posttrain"
readme = "README.md"
requires-python = ">=3.10"
# The hook API may change between posttrain minor versions: pin the one you tested against.
dependencies = ["$core_req"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The name after which a config selects the algorithm: `algorithm: {name: $name}`.
[project.entry-points."posttrain.algorithms"]
$name = "posttrain_$name.plugin"

[tool.setuptools]
packages = ["posttrain_$name"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

INIT = '''\
"""posttrain-$name: an algorithm plugin for posttrain. The hooks live in ``posttrain_$name.plugin``
(the entry point ``$name`` in group ``posttrain.algorithms``)."""

__version__ = "0.1.0"
'''

PLUGIN = '''\
"""$Camel: GRPO that routes the prompts it cannot learn from.

Generated by ``posttrain new-plugin $name`` as a working starting point: a real, small
algorithm that changes one thing about GRPO, the gate between reward and advantage
(``route_group``). With c of n rollouts correct:

- c = n: the prompt is dropped. Its group-normalised advantages are all 0, so it adds no
  gradient and only dilutes the loss normaliser (DAPO's dynamic-sampling filter, without the
  resampling).
- c = 0: the prompt trains on its first demonstration with SFT instead (HPT's gate with
  gate_max_correct = 0), when it has one.

Everything else (advantages, importance ratio, clipping, loss aggregation) is posttrain's GRPO
default. Replace the gate with your algorithm; override only the hooks you change and compose
the math from ``posttrain.functional``. Hook reference: the posttrain README and
``posttrain/hookspecs.py``; guide: posttrain's docs/plugin-guide.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain import GRPOConfig, Route, help_field, hookimpl


@dataclass
class ${Camel}Config(GRPOConfig):
    """The ``algorithm:`` section of a config that selects ``$name``. GRPOConfig's fields (clip
    range, loss aggregation, SFT/entropy/KL coefficients) stay available and keep their meaning."""

    name: str = help_field("$name", "Algorithm entry-point name.")
    drop_solved: bool = help_field(
        True, "Drop prompts whose rollouts are all correct: zero advantage, no gradient (DAPO's filter).")
    sft_when_unsolved: bool = help_field(
        True, "Train prompts with no correct rollout on their first demonstration with SFT (HPT's gate, γ = 0).")


@hookimpl
def algorithm_config():
    return ${Camel}Config


@hookimpl
def route_group(group, config, metrics):
    """Route the prompts whose rollouts all got the same verdict; None (RL) for the rest.

    With c correct of n on-policy rollouts: c = n → ``Route(drop=True)``; c = 0 with a
    demonstration → ``Route(rl=0, sft=1, demos=(0,), members=())``, the rollouts replaced by
    ``sft_coef`` × token-mean NLL of the demonstration (the default ``build_loss``). Logs the
    fraction of prompts each rule took as ``$name/solved`` and ``$name/unsolved``.
    """
    n = len(group.on_policy)
    if n == 0:  # an offline step has no rollouts to judge: leave it to the default
        return None
    c = group.num_correct()
    solved = config.drop_solved and c == n
    unsolved = config.sft_when_unsolved and c == 0 and len(group.demonstrations) > 0
    metrics.log("$name/solved", float(solved))
    metrics.log("$name/unsolved", float(unsolved))
    if solved:
        return Route(drop=True)
    if unsolved:
        return Route(rl=0.0, sft=1.0, demos=(0,), members=())
    return None  # fall through to the default: RL on every rollout
'''

TESTS = '''\
"""posttrain-$name: the gate on hand-made groups, posttrain's conformance suite, a 2-step run on
a tiny random-weight model, and the shipped config. Seconds on a CPU; no download.

    pip install -e . && pytest
"""

from pathlib import Path

from posttrain import Metrics, Route
from posttrain.run import load_config, resolve_stages
from posttrain.testing import check_algorithm_plugin, check_two_step_run, tiny_group
from posttrain_$name.plugin import ${Camel}Config, route_group

ROOT = Path(__file__).resolve().parents[1]


def test_gate_routes_uniform_groups():
    cfg, m = ${Camel}Config(), Metrics()
    assert route_group(group=tiny_group([1, 1, 1, 1]), config=cfg, metrics=m) == Route(drop=True)
    sft = Route(rl=0.0, sft=1.0, demos=(0,), members=())
    assert route_group(group=tiny_group([0, 0, 0, 0]), config=cfg, metrics=m) == sft
    assert route_group(group=tiny_group([1, 0, 0, 1]), config=cfg, metrics=m) is None  # default: RL
    # no demonstration to learn from: RL (with all-zero advantages)
    assert route_group(group=tiny_group([0, 0, 0, 0], demos=()), config=cfg, metrics=m) is None
    assert m.summary() == {"$name/solved": 0.25, "$name/unsolved": 0.25}


def test_gate_switches_off():
    cfg = ${Camel}Config(drop_solved=False, sft_when_unsolved=False)
    for rewards in ([1, 1, 1, 1], [0, 0, 0, 0]):
        assert route_group(group=tiny_group(rewards), config=cfg, metrics=Metrics()) is None


def test_conformance():
    """Every hook on tiny groups through posttrain's own loss path: types, shapes, finite
    gradients, micro-batch invariance (posttrain.testing.check_algorithm_plugin)."""
    report = check_algorithm_plugin("$name")
    # all wrong → SFT, mixed → RL, all correct → dropped, two teachers (1 of 4 correct) → RL
    assert report["routes"] == ["sft", "rl", "drop", "rl"]
    assert report["rows"] == 1 + 4 + 4  # one demonstration + two groups of 4 rollouts
    assert set(report["terms"]) == {"pg", "sft"}


def test_two_step_run(tmp_path):
    report = check_two_step_run("$name", tmp_path / "run")
    for row in report["metrics"]:  # the plugin's metrics agree with the engine's route counts
        assert row["$name/unsolved"] == row["route/sft"]
        assert row["$name/solved"] == row["route/drop"]
    # A random model solves nothing: its prompts train on their demonstrations, so weights move.
    assert report["metrics"][0]["route/sft"] > 0
    assert report["changed"]


def test_shipped_config_selects_the_plugin():
    (stage,) = resolve_stages(load_config(ROOT / "configs" / "$name.yaml"), source="$name.yaml")
    assert isinstance(stage.algo, ${Camel}Config)
    assert stage.algo.drop_solved and stage.algo.sft_when_unsolved
'''

CONFIG = """\
# $name on synthetic two-digit arithmetic with a tiny random-weight model: seconds on a CPU.
#   pip install -e .
#   posttrain train configs/$name.yaml
# For a real run, override the model and data, e.g.
#   posttrain train configs/$name.yaml model.path=/models/Qwen2.5-Math-1.5B data.train=data/train.jsonl trainer.steps=500
algorithm: {name: $name, drop_solved: true, sft_when_unsolved: true}
model: {path: "tiny:hidden=64,layers=2"}
data: {train: "synthetic:arithmetic?n=64&seed=0", demo_keys: [demos]}
rollout: {n: 4, temperature: 1.0, max_new_tokens: 16}
verifier: {name: math, workers: 1, timeout_s: 10}
trainer: {steps: 2, prompts_per_step: 4, lr: 1.0e-3, seed: 0}
logging: {progress: false}
run_dir: runs/$name-tiny
"""

README = """\
# posttrain-$name

$Camel, an algorithm plugin for posttrain: GRPO that routes the prompts it cannot learn from.
A prompt whose rollouts are **all correct** is dropped (every group-normalised advantage is 0,
DAPO's dynamic-sampling filter); a prompt with **no correct rollout** trains on its
demonstration with SFT instead (HPT's gate with γ = 0).

```bash
pip install -e .                      # registers the entry point `$name`
pytest                                # conformance suite + a 2-step tiny run, seconds on a CPU
posttrain train configs/$name.yaml    # the same tiny run from the shipped config
posttrain plugins                     # lists $name with the hooks it overrides
```

Select it in any config with `algorithm: {name: $name}`; the section is validated against
`${Camel}Config` (`posttrain show-config configs/$name.yaml --fields` lists every field).

## Formula → hook

c = number of correct on-policy rollouts of a prompt, n = rollouts per prompt.

| Formula | Where | Hook |
|---|---|---|
| c = n → drop the prompt (Â_i = 0 for all i: no gradient) | `Route(drop=True)`, `drop_solved` | `route_group` (plugin) |
| c = 0 → L_SFT = −token-mean log π_θ(τ*) on the first demonstration τ* | `Route(rl=0, sft=1, demos=(0,), members=())`, `sft_when_unsolved`, `sft_coef` | `route_group` (plugin) + `build_loss` (default) |
| Â_i = (r_i − mean_group r) / (std_group r + ε) | `norm_adv_by_std`, `adv_eps` | `compute_advantage` (default) |
| ρ = π_θ / π_old | — | `reference_denominator`, `shape_ratio` (defaults) |
| keep tokens inside the PPO clip region 1 ± ε | `clip_low`, `clip_high` | `stabilization_mask` (default) |
| L_RL = −token-mean min(ρÂ, clip(ρ)Â) | `loss_agg` | `build_loss` (default) |

Hooks overridden: `algorithm_config`, `route_group`. Everything else is posttrain's GRPO default.

## Config

| field | default | meaning |
|---|---|---|
| `drop_solved` | `true` | drop prompts whose rollouts are all correct |
| `sft_when_unsolved` | `true` | SFT on the first demonstration of prompts with no correct rollout |
| GRPO's fields | | `clip_low`, `loss_agg`, `sft_coef`, `entropy_coef`, `kl_coef`, … |

## Make it yours

1. Replace the gate in `posttrain_$name/plugin.py` with your algorithm: override only the hooks
   you change, compose the math from `posttrain.functional`, give every config field help text.
2. Keep the formula → hook table above in step with the code.
3. Keep `pytest` green: `check_algorithm_plugin("$name")` runs every hook on tiny groups through
   posttrain's own loss path; `check_two_step_run` trains two steps on a tiny model.
4. Publish as `posttrain-$name` with `$core_req` (generated against posttrain $core_version);
   see posttrain's docs/plugin-guide.md for publishing and getting listed in `registry.toml`.
"""

GITIGNORE = """\
runs/
__pycache__/
*.egg-info/
.pytest_cache/
build/
dist/
"""

# Relative path (NAME is replaced by the plugin name) → template.
FILES = {
    "pyproject.toml": PYPROJECT,
    "README.md": README,
    ".gitignore": GITIGNORE,
    "posttrain_NAME/__init__.py": INIT,
    "posttrain_NAME/plugin.py": PLUGIN,
    "tests/test_NAME.py": TESTS,
    "configs/NAME.yaml": CONFIG,
}
