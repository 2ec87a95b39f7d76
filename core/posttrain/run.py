"""From a YAML to trained weights: load, validate every stage, run the stages in order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, RunConfig, load_yaml, merge_layers, stage_configs, validate_algorithm, validate_core
from .plugins import PluginError, make_plugin_manager, unregistered_names


@dataclass
class Resolved:
    """One stage, validated: the core config, the algorithm config, its plugin manager."""

    run: RunConfig
    algo: Any
    pm: Any
    raw: DictConfig  # merged, unresolved (saved as the run's config.yaml after resolving)


def load_config(source: str | Path | dict | DictConfig, overrides: Iterable[str] = (), *, base: Any = "default") -> DictConfig:
    user = load_yaml(source) if isinstance(source, (str, Path)) else source
    return merge_layers(user, list(overrides), base=base)


def resolve(cfg: DictConfig, *, plugins: Iterable[Any] = (), source: str = "config") -> Resolved:
    """Two-phase validation; every problem of both phases in one ConfigError."""
    run, problems = validate_core(cfg, source)
    algo = pm = None
    section = OmegaConf.to_container(cfg.get("algorithm") or {}, resolve=True)
    name = section.get("name") if isinstance(section, dict) else None
    if name:
        try:
            pm = make_plugin_manager(name, list(cfg.get("extensions") or []), plugins)
        except PluginError as e:
            problems.append(f"{e.key}: {e}")
        else:
            algo, more = validate_algorithm(section, pm.hook.algorithm_config(), source)
            problems += more + (unregistered_names(pm, run) if run is not None else [])
    if problems:
        raise ConfigError(problems, source)
    return Resolved(run, algo, pm, cfg)


def resolve_stages(cfg: DictConfig, *, plugins: Iterable[Any] = (), source: str = "config") -> list[Resolved]:
    stages = stage_configs(cfg)
    out, problems = [], []
    for i, st in enumerate(stages):
        label = source if len(stages) == 1 else f"{source} (stage {i}: {st.algorithm.get('name')})"
        if i > 0 and not st.model.path:
            st.model.path = "<previous stage>"  # filled in when stage i−1 finishes
        try:
            out.append(resolve(st, plugins=plugins, source=label))
        except ConfigError as e:
            problems += [f"{label}: {p}" if len(stages) > 1 else p for p in e.problems]
    if problems:
        raise ConfigError(problems, source)
    return out


def stage_dir(run_dir: str, index: int, name: str, n_stages: int) -> Path:
    return Path(run_dir) if n_stages == 1 else Path(run_dir) / f"stage{index}-{name}"


def materialize_model(path: str, run_dir: str | Path) -> str:
    """``tiny:hidden=128,layers=4,seed=0`` builds a random tiny model (with the char tokenizer)
    in ``run_dir/base-model`` once, so demos and smoke runs need no checkpoint on disk."""
    if not path.startswith("tiny:"):
        return path
    from .checkpoint import build_atomically, is_complete
    from .testing import make_tiny_model

    params = dict(kv.split("=", 1) for kv in path[len("tiny:"):].split(",") if kv)
    allowed = {"hidden", "layers", "heads", "seed"}
    if set(params) - allowed:
        raise ConfigError([f"model.path: '{path}': unknown tiny-model parameter(s) {sorted(set(params) - allowed)}; "
                           f"use {sorted(allowed)}"])
    target = Path(run_dir) / "base-model"
    if not is_complete(target):  # also rebuilds one a killed start left half-written
        build_atomically(target, lambda tmp: make_tiny_model(tmp, **{k: int(v) for k, v in params.items()}))
    return str(target)


def train(source: str | Path | dict | DictConfig, overrides: Iterable[str] = (), *, plugins: Iterable[Any] = (),
          base: Any = "default") -> list[Path]:
    """Run every stage; stage k+1 starts from stage k's final checkpoint. Returns final checkpoints."""
    from .engine import Engine  # heavy imports only when training

    label = str(source) if isinstance(source, (str, Path)) else "config"
    cfg = load_config(source, overrides, base=base)
    stages = resolve_stages(cfg, plugins=plugins, source=label)
    finals: list[Path] = []
    for i, st in enumerate(stages):
        if i > 0:
            st.raw.model.path = str(finals[-1])
            st = resolve(st.raw, plugins=plugins, source=label)
        elif st.run.model.path.startswith("tiny:"):
            st.raw.model.path = materialize_model(st.run.model.path, st.run.run_dir)
            st = resolve(st.raw, plugins=plugins, source=label)
        resolved = OmegaConf.to_container(st.raw, resolve=True)
        run_dir = stage_dir(st.run.run_dir, i, st.run.algorithm["name"], len(stages))
        finals.append(Engine(st.run, st.algo, st.pm, run_dir, resolved).run())
    return finals
