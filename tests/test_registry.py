"""registry.toml, configs/ and the plugins' entry points must agree."""

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from posttrain.plugins import ALGORITHMS, installed, load_plugin_module, overridden_hooks
from posttrain.registry import load_registry, repo_root

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = repo_root()
REGISTRY = load_registry()
ALGOS = REGISTRY["algorithms"]
PLUGIN_DIRS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists()) if (ROOT / "plugins").exists() else []
FIELDS = {"distribution", "source", "module", "summary", "paper", "configs", "overrides", "status", "requires_core"}


def test_schema_and_fields():
    assert REGISTRY["schema"] == 1
    for name, entry in ALGOS.items():
        assert FIELDS <= set(entry), f"[algorithms.{name}] lacks {FIELDS - set(entry)}"
        assert entry["status"] in ("experimental", "stable", "deprecated"), name


@pytest.mark.parametrize("plugin_dir", PLUGIN_DIRS, ids=lambda p: p.name)
def test_every_plugin_dir_is_registered_with_its_entry_point(plugin_dir):
    meta = tomllib.loads((plugin_dir / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["posttrain.algorithms"]
    assert list(eps) == [plugin_dir.name], "a first-party plugin registers exactly its own name"
    entry = ALGOS[plugin_dir.name]
    assert entry["distribution"] == meta["project"]["name"] == f"posttrain-{plugin_dir.name}"
    assert entry["module"] == eps[plugin_dir.name]
    assert entry["source"] == f"plugins/{plugin_dir.name}"
    assert (plugin_dir / "README.md").exists()


@pytest.mark.parametrize("name", sorted(ALGOS))
def test_registry_matches_installed_code(name):
    entry = ALGOS[name]
    inst = installed(ALGORITHMS)
    assert name in inst, f"{name} is in registry.toml but not installed (pip install -e {entry['source']})"
    assert inst[name].module == entry["module"]
    assert inst[name].distribution == entry["distribution"]
    assert overridden_hooks(load_plugin_module(name)) == sorted(entry["overrides"])
    for cfg in entry["configs"]:
        assert (ROOT / cfg).exists(), f"{name}: {cfg} listed but missing"


def test_every_config_names_a_registered_algorithm():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if path.name == "base.yaml" or "benchmarks" in path.parts:
            continue
        cfg = OmegaConf.load(path)
        names = [cfg.get("algorithm", {}).get("name")] + [s.get("algorithm", {}).get("name") for s in cfg.get("stages") or []]
        for n in filter(None, names):
            assert n in ALGOS, f"{path.relative_to(ROOT)} uses algorithm '{n}' missing from registry.toml"


def test_every_registered_config_validates():
    from posttrain.run import load_config, resolve_stages

    for name, entry in ALGOS.items():
        for cfg in entry["configs"]:
            resolve_stages(load_config(ROOT / cfg), source=cfg)
    for path in sorted((ROOT / "configs" / "demo").glob("*.yaml")):
        resolve_stages(load_config(path), source=str(path))


def test_malformed_registry_is_a_clear_error(tmp_path):
    from posttrain.config import ConfigError

    bad = tmp_path / "registry.toml"
    bad.write_text("schema = 1\n[algorithms.x]\nsummary = \"unterminated\n")
    with pytest.raises(ConfigError) as e:
        load_registry(bad)
    assert str(bad) in str(e.value) and "not valid TOML" in str(e.value) and "line 3" in str(e.value)
