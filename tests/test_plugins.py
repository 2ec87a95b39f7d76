"""Plugin discovery, selection by name, error messages, and a real third-party package."""

import subprocess
import sys
import textwrap

import pytest

from posttrain import hookimpl
from posttrain.plugins import PluginError, installed_algorithms, make_plugin_manager, overridden_hooks


def test_builtins_are_entry_points():
    names = installed_algorithms()
    assert "grpo" in names and "sft" in names


def test_unknown_algorithm_lists_installed_and_suggests():
    with pytest.raises(PluginError) as e:
        make_plugin_manager("grp")
    msg = str(e.value)
    assert "Unknown algorithm 'grp'" in msg
    assert "grpo" in msg and "sft" in msg
    assert "Did you mean 'grpo'?" in msg


def test_exactly_one_algorithm_is_registered():
    pm = make_plugin_manager("sft")
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert names == {"posttrain.defaults", "algorithm:sft"}
    # sft's firstresult hooks win over the trylast defaults
    cfg = pm.hook.algorithm_config()
    assert cfg.__name__ == "SFTConfig"
    assert pm.hook.requirements(config=cfg()).rollouts is False


def test_misspelt_hook_fails_at_load():
    class Typo:
        @hookimpl
        def rout_group(self, group):  # noqa: D401 - deliberately misspelt
            return None

    with pytest.raises(Exception, match="unknown hook 'rout_group'"):
        make_plugin_manager("grpo", plugins=[Typo()])


def test_inline_plugin_overrides_default():
    from posttrain import Route
    from posttrain.testing import tiny_group

    class DropAll:
        @hookimpl
        def route_group(self, group):
            return Route(drop=True)

    pm = make_plugin_manager("grpo", plugins=[DropAll()])
    assert pm.hook.route_group(group=tiny_group([1, 0]), config=None, step=0, metrics=None).drop


def test_overridden_hooks_of_sft():
    from posttrain.algorithms import sft

    assert overridden_hooks(sft) == ["algorithm_config", "requirements", "route_group"]


def _pip(*args):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, check=True)


@pytest.fixture
def third_party(tmp_path, write_plugin_package):
    """A plugin package written outside this repository and pip-installed like any other."""
    good = tmp_path / "good"
    write_plugin_package(good, "thirdgate", """
        from dataclasses import dataclass
        from posttrain import GRPOConfig, Route, help_field, hookimpl

        @dataclass
        class ThirdConfig(GRPOConfig):
            name: str = help_field("thirdgate", "entry point")
            min_correct: int = help_field(1, "RL only when at least this many rollouts are correct")

        @hookimpl
        def algorithm_config():
            return ThirdConfig

        @hookimpl
        def route_group(group, config):
            if group.num_correct() < config.min_correct:
                return Route(drop=True)
    """, version="0.3.1")
    broken = tmp_path / "broken"
    write_plugin_package(broken, "brokenalgo", "import a_module_that_does_not_exist\n", version="0.3.1")
    _pip("install", "--no-deps", "--no-build-isolation", str(good), str(broken))
    yield
    _pip("uninstall", "-y", "thirdgate-plugin", "brokenalgo-plugin")


def test_third_party_plugin_selected_and_validated(third_party, tmp_path):
    # A fresh process, as a user would run it: nothing about the plugin lives in this repo.
    code = textwrap.dedent(f"""
        from posttrain.config import ConfigError
        from posttrain.run import load_config, resolve
        base = {{"algorithm": {{"name": "thirdgate", "min_correct": 3}}, "model": {{"path": "m"}}, "data": {{"train": "t.jsonl"}}}}
        r = resolve(load_config(base, base=None))
        print("selected", type(r.algo).__name__, r.algo.min_correct)
        try:
            resolve(load_config(base, ["algorithm.min_corect=2"], base=None))
        except ConfigError as e:
            print("error", e)
        try:
            resolve(load_config(base, ["algorithm.min_correct=lots"], base=None))
        except ConfigError as e:
            print("error", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "selected ThirdConfig 3" in out
    assert "algorithm.min_corect: unknown key. Did you mean 'min_correct'?" in out
    assert "algorithm.min_correct" in out and "lots" in out


def test_broken_plugin_is_named_with_distribution(third_party):
    code = "from posttrain.plugins import make_plugin_manager\nmake_plugin_manager('brokenalgo')"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert 'Error importing algorithm plugin "brokenalgo" (brokenalgo-plugin 0.3.1, brokenalgo_pkg)' in err
    assert "No module named 'a_module_that_does_not_exist'" in err


def test_cli_plugins_lists_broken_without_stopping(third_party):
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "plugins"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "grpo" in out.stdout and "thirdgate" in out.stdout
    assert "brokenalgo" in out.stdout and "BROKEN" in out.stdout
