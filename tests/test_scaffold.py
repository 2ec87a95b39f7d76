"""The plugin kit: ``posttrain new-plugin`` and ``posttrain plugins --available``.

The end-to-end test does what a plugin author does: scaffold → ``pip install -e`` → the
generated tests pass → the shipped YAML selects the plugin by name → a 2-step tiny run. The
packages are installed into a temporary ``--target`` directory that only this test's
subprocesses load as a site directory (``site.addsitedir`` runs the editable install's
``.pth`` hook). The shared virtual environment never sees them.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import posttrain
from posttrain import cli
from posttrain.logging import read_metrics
from posttrain.plugins import ALGORITHMS, InstalledPlugin, PluginError
from posttrain.registry import load_registry, repo_root
from posttrain.scaffold import ScaffoldError, check_name, core_requirement, new_plugin, render

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = repo_root()
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
# Runs pytest or the posttrain CLI with argv[1] added as a site directory.
BOOT = textwrap.dedent("""
    import site, sys
    site.addsitedir(sys.argv[1])
    tool, args = sys.argv[2], sys.argv[3:]
    if tool == "pytest":
        import pytest
        sys.exit(pytest.main(args))
    from posttrain.cli import main
    sys.exit(main(args))
""")


def _run(site, tool, *args, cwd):
    return subprocess.run([sys.executable, "-c", BOOT, str(site), tool, *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


# --- names, directories, rendering ----------------------------------------------------------------


@pytest.mark.parametrize("name, message", [
    ("My-Gate", "plugin name 'My-Gate' is not valid: use lowercase letters and digits, words joined by single underscores, "
                "starting with a letter (the name becomes the entry point NAME, the package posttrain_NAME and the "
                "distribution posttrain-NAME). Try: my_gate"),
    ("2gate", "plugin name '2gate' is not valid"),
    ("gate_", "Try: gate"),
    ("my__gate", "Try: my_gate"),
    ("", "plugin name '' is not valid"),
    ("posttrain_gate", "plugin name 'posttrain_gate': leave out the 'posttrain' prefix, it is added for you "
                       "(package posttrain_<name>). Try: gate"),
    ("grpo", "plugin name 'grpo' is taken by posttrain "),
    ("hpt", "plugin name 'hpt' is taken by posttrain-hpt"),
])
def test_bad_names_are_refused_with_the_fix(name, message):
    with pytest.raises(ScaffoldError) as e:
        check_name(name)
    assert message in str(e.value)


def test_good_names():
    for name in ("gate", "my_gate", "dapo2", "posttrainer"):
        assert check_name(name) == name


def test_core_requirement_pins_the_minor_version():
    assert core_requirement("0.1.0") == "posttrain>=0.1,<0.2"
    assert core_requirement("1.12.3rc1") == "posttrain>=1.12,<1.13"
    assert core_requirement(posttrain.__version__) == "posttrain>=0.1,<0.2"
    with pytest.raises(ScaffoldError, match="cannot read a major.minor version"):
        core_requirement("dev")


def test_rendered_package(tmp_path):
    files = render("my_gate")
    assert sorted(files) == [".gitignore", "README.md", "configs/my_gate.yaml", "posttrain_my_gate/__init__.py",
                             "posttrain_my_gate/plugin.py", "pyproject.toml", "tests/test_my_gate.py"]
    meta = tomllib.loads(files["pyproject.toml"])
    assert meta["project"]["name"] == "posttrain-my_gate"
    assert meta["project"]["dependencies"] == [core_requirement(posttrain.__version__)]
    assert meta["project"]["entry-points"]["posttrain.algorithms"] == {"my_gate": "posttrain_my_gate.plugin"}
    assert meta["tool"]["setuptools"]["packages"] == ["posttrain_my_gate"]
    for path in ("posttrain_my_gate/plugin.py", "tests/test_my_gate.py", "posttrain_my_gate/__init__.py"):
        compile(files[path], path, "exec")  # valid Python after substitution
    assert "class MyGateConfig(GRPOConfig):" in files["posttrain_my_gate/plugin.py"]
    assert "| Formula | Where | Hook |" in files["README.md"] and "`route_group` (plugin)" in files["README.md"]
    assert "algorithm: {name: my_gate," in files["configs/my_gate.yaml"]

    # The plugin module works as written: its gate on a hand-made group.
    ns = {}
    exec(compile(files["posttrain_my_gate/plugin.py"], "plugin.py", "exec"), ns)
    from posttrain import Metrics, Route
    from posttrain.testing import tiny_group

    cfg, m = ns["MyGateConfig"](), Metrics()
    assert cfg.name == "my_gate" and cfg.drop_solved and cfg.sft_when_unsolved
    assert ns["route_group"](group=tiny_group([1, 1]), config=cfg, metrics=m) == Route(drop=True)
    assert ns["route_group"](group=tiny_group([0, 0]), config=cfg, metrics=m) == Route(rl=0.0, sft=1.0, demos=(0,), members=())
    assert m.summary() == {"my_gate/solved": 0.5, "my_gate/unsolved": 0.5}


def test_new_plugin_refuses_to_overwrite(tmp_path):
    target = tmp_path / "pkg"
    target.mkdir()  # an empty directory is fine
    made, files = new_plugin("my_gate", target)
    assert made == target and (target / "posttrain_my_gate" / "plugin.py").is_file() and len(files) == 7
    before = (target / "README.md").read_text()
    (target / "README.md").write_text("my notes")
    with pytest.raises(ScaffoldError, match="already exists and is not an empty directory; refusing to overwrite it"):
        new_plugin("other", target)
    assert (target / "README.md").read_text() == "my notes" and before != "my notes"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ScaffoldError, match="refusing to overwrite"):
        new_plugin("other", tmp_path / "file")


def test_cli_new_plugin(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["new-plugin", "my_gate"]) == 0  # default directory: ./posttrain-NAME
    out = capsys.readouterr().out
    assert (tmp_path / "posttrain-my_gate" / "pyproject.toml").is_file()
    assert f"pip install -e {tmp_path / 'posttrain-my_gate'}" in out and "posttrain_my_gate/plugin.py" in out
    assert cli.main(["new-plugin", "my_gate"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert cli.main(["new-plugin", "Bad-Name", "--dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: plugin name 'Bad-Name' is not valid") and "Try: bad_name" in err
    assert not (tmp_path / "x").exists()


# --- scaffold → pip install -e → tests → YAML → 2-step run ---------------------------------------------


@pytest.fixture(scope="module")
def kit(tmp_path_factory, write_plugin_package):
    """The scaffolded plugin `kitdemo` installed editable, next to two broken plugins."""
    root = tmp_path_factory.mktemp("kit")
    pkg, _ = new_plugin("kitdemo", root / "posttrain-kitdemo")
    write_plugin_package(root / "b1", "kitbroken_import", "import a_module_that_does_not_exist\n", version="0.0.1")
    write_plugin_package(root / "b2", "kitbroken_hook", """
        from posttrain import hookimpl

        @hookimpl
        def route_group(group, not_an_argument):  # not an argument of route_group
            return None
    """, version="0.0.1")
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--target", str(site), "-e", str(pkg), str(root / "b1"), str(root / "b2")],
                   check=True, capture_output=True, text=True)
    return root, pkg, site


def test_scaffold_install_test_select_train(kit):
    root, pkg, site = kit
    # The generated tests pass against the installed package (run from outside its directory, so
    # posttrain_kitdemo can only come from the editable install).
    tests = _run(site, "pytest", "-q", "-p", "no:cacheprovider", pkg / "tests", cwd=root)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert "5 passed" in tests.stdout

    # Selected by name from its YAML, trained for 2 steps by the CLI.
    run = _run(site, "posttrain", "train", pkg / "configs" / "kitdemo.yaml", f"run_dir={root / 'run'}", cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_metrics(root / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # the plugin's gate ran and its metrics agree with the engine's route counts
        assert r["kitdemo/unsolved"] == r["route/sft"] and r["kitdemo/solved"] == r["route/drop"]
    assert (root / "run" / "checkpoints" / "step-000002" / "config.json").is_file()
    assert "name: kitdemo" in (root / "run" / "config.yaml").read_text()


def test_plugins_available_lists_broken_and_keeps_going(kit):
    root, pkg, site = kit
    out = _run(site, "posttrain", "plugins", "--available", "--json", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    listing = json.loads(out.stdout)
    rows = {r["name"]: r for r in listing["installed"]}
    assert rows["kitbroken_import"]["status"] == "broken"
    assert 'Error importing algorithm plugin "kitbroken_import" (kitbroken_import-plugin 0.0.1' in rows["kitbroken_import"]["error"]
    assert "No module named 'a_module_that_does_not_exist'" in rows["kitbroken_import"]["error"]
    # imports fine, but its hook cannot register: broken too, with pluggy's reason
    assert rows["kitbroken_hook"]["status"] == "broken"
    assert rows["kitbroken_hook"]["error"].startswith("kitbroken_hook (kitbroken_hook-plugin 0.0.1): PluginValidationError")
    assert "not_an_argument" in rows["kitbroken_hook"]["error"]
    # ... and the plugins listed after them are still there
    demo = rows["kitdemo"]
    assert (demo["status"], demo["distribution"], demo["version"]) == ("ok", "posttrain-kitdemo", "0.1.0")
    assert demo["hooks"] == ["algorithm_config", "route_group"]
    assert demo["config_fields"][-2:] == ["drop_solved", "sft_when_unsolved"]
    assert rows["grpo"]["status"] == "ok"

    registry = load_registry()["algorithms"]
    available = {a["name"]: a for a in listing["available"]}
    assert list(available) == list(registry)
    for name, entry in registry.items():
        a = available[name]
        assert a["state"] == "installed" and a["installed"] and a["version"] == rows[name]["version"]
        expected = "(built in)" if entry.get("builtin") else f"pip install -e {ROOT / entry['source']}"  # cwd is outside the checkout
        assert a["install"] == expected


def test_plugins_available_text(monkeypatch, capsys):
    """Install state per registry entry (installed / broken / not installed) and the exact command."""
    real_installed, real_load = cli.installed, cli.load_plugin_module
    ghost = InstalledPlugin("ghost", ALGORITHMS, "posttrain_ghost.plugin", "posttrain-ghost", "0.2.0")
    monkeypatch.setattr(cli, "installed", lambda g: {**real_installed(g), **({"ghost": ghost} if g == ALGORITHMS else {})})

    def load(name, group):
        if name == "ghost":
            raise PluginError('Error importing algorithm plugin "ghost" (posttrain-ghost 0.2.0, posttrain_ghost.plugin): '
                              "ModuleNotFoundError: No module named 'flash_attn'")
        return real_load(name, group)

    monkeypatch.setattr(cli, "load_plugin_module", load)
    monkeypatch.setattr(cli, "load_registry", lambda: {"algorithms": {
        "grpo": {"builtin": True, "distribution": "posttrain", "summary": "GRPO"},
        "hpt": {"distribution": "posttrain-hpt", "source": "plugins/hpt", "summary": "HPT"},
        "ghost": {"distribution": "posttrain-ghost", "source": "https://example.org/ghost", "summary": "Ghost"},
        "far": {"distribution": "posttrain-far", "source": "plugins/far", "summary": "Far"},
    }})
    monkeypatch.chdir(ROOT)
    assert cli.main(["plugins", "--available"]) == 0
    out = capsys.readouterr().out
    assert "  ghost      algorithm  posttrain-ghost 0.2.0  BROKEN: Error importing" in out
    known = out.split("Known plugins (registry.toml):\n")[1].splitlines()
    assert known == [
        "  grpo       installed      GRPO",
        "      install: (built in)",
        "  hpt        installed      HPT",
        "      install: pip install -e plugins/hpt",  # relative: run from the checkout
        "  ghost      broken         Ghost",
        "      error:   Error importing algorithm plugin \"ghost\" (posttrain-ghost 0.2.0, posttrain_ghost.plugin): "
        "ModuleNotFoundError: No module named 'flash_attn'",
        "      install: pip install posttrain-ghost",  # not a directory here: from the package index
        "  far        not installed  Far",
        "      install: pip install posttrain-far",
    ]
