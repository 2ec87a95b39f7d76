"""From a YAML to trained weights: load, validate every stage, check every path, decide each
stage's resume, then run the stages in order.

Everything a user can get wrong is checked before anything is written or loaded: the config
(every stage's merged config), the model and data paths, and whether the run directory may be
resumed (its saved config must agree with this one on every training-relevant key).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from . import interrupt
from .config import ConfigError, RunConfig, load_yaml, merge_layers, stage_configs, validate_algorithm, validate_core
from .data.loading import is_named_source
from .plugins import PluginError, bind_plugins, make_plugin_manager, unregistered_names


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
            if not more:
                try:
                    bind_plugins(pm, algo)  # class plugins: one instance per stage, from the validated config
                except PluginError as e:
                    problems.append(f"{e.key}: {e}")
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


def full_config(st: Resolved) -> dict:
    """Every field of a stage's config, the algorithm section with the plugin's defaults filled in
    (what ``config.yaml`` holds, and what a resume is checked against)."""
    out = OmegaConf.to_container(st.raw, resolve=True)
    out["algorithm"] = dataclasses.asdict(st.algo)
    return out


def materialize_model(path: str, run_dir: str | Path) -> str:
    """``tiny:hidden=128,layers=4,seed=0`` builds a random tiny model (with the char tokenizer)
    in ``run_dir/base-model`` once, so demos and smoke runs need no checkpoint on disk."""
    if not path.startswith("tiny:"):
        return path
    from .checkpoint import build_atomically, is_complete
    from .tiny import make_tiny_model

    params = _tiny_params(path)
    target = Path(run_dir) / "base-model"
    if not is_complete(target):  # also rebuilds one a killed start left half-written
        build_atomically(target, lambda tmp: make_tiny_model(tmp, **{k: int(v) for k, v in params.items()}))
    return str(target)


def _tiny_params(path: str) -> dict[str, str]:
    params = dict(kv.split("=", 1) for kv in path[len("tiny:"):].split(",") if kv)
    allowed = {"hidden", "layers", "heads", "seed"}
    if set(params) - allowed:
        raise ConfigError([f"model.path: '{path}': unknown tiny-model parameter(s) {sorted(set(params) - allowed)}; "
                           f"use {sorted(allowed)}"])
    return params


# --- checks before any heavy work ------------------------------------------------------------

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def model_path_problem(path: str) -> str | None:
    """Why ``model.path`` cannot be loaded, in one line (None: it looks loadable)."""
    if path.startswith("tiny:"):
        try:
            _tiny_params(path)
        except ConfigError as e:
            return e.problems[0]
        return None
    p = Path(path).expanduser()
    if not p.exists():
        if _HUB_ID.fullmatch(path) and not path.startswith((".", "~")) and _hub_id_available(path):
            return None
        return (f"model.path: {path} does not exist (give a local HF model directory, a hub id such as "
                f"Qwen/Qwen2.5-Math-1.5B, or tiny:hidden=64,layers=2)")
    if not p.is_dir():
        return f"model.path: {path} is a file; give the HF model directory (config.json, weights, tokenizer)"
    missing = []
    if not (p / "config.json").is_file():
        missing.append("config.json")
    if not any(any(p.glob(g)) for g in _WEIGHTS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((p / f).is_file() for f in _TOKENIZER):
        missing.append(f"a tokenizer ({' or '.join(_TOKENIZER)})")
    if missing:
        what = "is empty" if not any(p.iterdir()) else f"has no {', no '.join(missing)}"
        return f"model.path: {path} {what}: not an HF model directory (config.json, weights and tokenizer files)"
    return None


def _hub_id_available(repo_id: str) -> bool:
    """A hub id is fine online; offline it must be in the local cache."""
    import os

    if not any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return True
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def path_problems(stages: list[Resolved]) -> list[str]:
    """Every file a run will read, checked up front: the first stage's model, each stage's data,
    the DeepSpeed JSON. (Later stages start from the previous stage's weights.)"""
    problems: list[str] = []
    for i, st in enumerate(stages):
        where = f"stage {i}: " if len(stages) > 1 else ""
        c = st.run
        if i == 0 and (p := model_path_problem(c.model.path)):
            problems.append(where + p)
        for key, value in (("data.train", c.data.train), ("data.eval", c.data.eval if c.eval.enabled else None),
                           ("data.offline", c.data.offline), ("trainer.deepspeed_config", c.trainer.deepspeed_config)):
            if value and not is_named_source(value) and not Path(value).expanduser().exists():
                problems.append(f"{where}{key}: {value} does not exist")
    return list(dict.fromkeys(problems))  # a top-level path shared by every stage: said once


# --- resuming ----------------------------------------------------------------------------------

# Keys that may change between an interrupted run and its resume: where and how long to train,
# what to log and evaluate, memory/speed knobs that do not change what is computed.
_NOT_TRAINING = ("run_dir", "resume", "save_every", "keep_checkpoints", "stages", "logging", "eval", "data.eval",
                 "trainer.steps", "trainer.device", "trainer.micro_batch_tokens", "trainer.logprob_chunk",
                 "rollout.batch_size", "verifier.workers")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_changes(saved: dict, new: dict, *, later_stage: bool = False) -> list[str]:
    """Training-relevant keys whose value differs, as ``key: old -> new``. Keys only one side has
    (a field added or removed by an upgrade) are not counted."""
    ignore = _NOT_TRAINING + (("model.path",) if later_stage else ())  # derived: the previous stage's final weights
    a, b = _flatten(saved), _flatten(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a.keys() & b.keys())
            if a[k] != b[k] and not any(k == p or k.startswith(p + ".") for p in ignore)]


def _saved_config(run_dir: Path, st: Resolved) -> dict | None:
    """The run directory's config.yaml, its algorithm section filled with today's defaults."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    algo, problems = validate_algorithm(saved.get("algorithm") or {}, type(st.algo))
    if not problems:
        saved["algorithm"] = dataclasses.asdict(algo)
    return saved


def _is_run_dir(path: Path) -> bool:
    """Holds what a posttrain run writes (also one that died before writing its config.yaml)."""
    ours = ("config.yaml", "metrics.jsonl", ckpt.CHECKPOINTS_DIR, "base-model")
    return any((path / name).exists() for name in ours) or any(path.glob("stage*-*/config.yaml"))


@dataclass
class StagePlan:
    index: int
    run_dir: Path
    resume_from: Path | None  # the checkpoint this stage continues from (None: from the start)
    resume_step: int
    changes: list[str] = dataclasses.field(default_factory=list)  # config changes a --force-resume accepted


def plan_resume(stages: list[Resolved], *, resume_path: str | Path | None = None, force: bool = False,
                source: str = "config") -> list[StagePlan]:
    """Decide, before anything is written, where each stage starts. Raises ConfigError (one line
    per problem) when a resume would continue a run trained with a different config."""
    top = Path(stages[0].run.run_dir)
    mode = stages[0].run.resume
    target = Path(resume_path).resolve() if resume_path else None
    if target is not None:
        mode = "auto"  # the command line's explicit choice beats the config's resume: never
        if not ckpt.is_complete(target):
            raise ConfigError([f"--resume: {resume_path} is not a complete checkpoint (a step-NNNNNN directory with a "
                               f"{ckpt.COMPLETE} file)"], source)
    plans, problems, matched = [], [], False
    for i, st in enumerate(stages):
        d = stage_dir(st.run.run_dir, i, st.run.algorithm["name"], len(stages))
        latest = ckpt.latest_checkpoint(d) if mode == "auto" and d.is_dir() else None
        if target is not None and target.parent.parent == d.resolve():
            latest, matched = target, True
        elif target is not None and matched:
            latest = None  # stages after the chosen checkpoint start again
        changes = []
        if latest is not None:
            saved = _saved_config(d, st)
            changes = config_changes(saved, full_config(st), later_stage=i > 0) if saved is not None else []
            if changes and not force:
                problems.append(f"{d} holds a run at step {ckpt.checkpoint_step(latest)} trained with a different config "
                                f"({'; '.join(changes)}). Resume it anyway with --force-resume, start over with "
                                f"resume=never (the old run is moved aside), or pick another run_dir=")
        plans.append(StagePlan(i, d, latest, ckpt.checkpoint_step(latest) if latest else 0, changes))
    if target is not None and not matched:
        problems.append(f"--resume: {resume_path} is not a checkpoint of this run (expected "
                        f"{plans[0].run_dir}/checkpoints/step-NNNNNN" + (" or a stage's" if len(stages) > 1 else "") + ")")
    if mode == "never" and top.is_dir() and any(top.iterdir()) and not _is_run_dir(top):
        problems.append(f"resume=never: run_dir {top} is not empty and holds no posttrain run; "
                        f"pick another run_dir= or empty it")
    if problems:
        raise ConfigError(problems, source)
    return plans


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    path.rename(aside)
    return aside


def _prepare_dirs(stages: list[Resolved], plans: list[StagePlan], say, *, fresh: bool) -> None:
    """Carry out what ``plan_resume`` decided: a fresh run owns its directory, a resume from a
    chosen checkpoint drops what came after it (so a later ``resume: auto`` cannot pick it up)."""
    top = Path(stages[0].run.run_dir)
    if fresh and top.is_dir() and any(top.iterdir()):
        say(f"resume=never: moved the previous run in {top} to {_move_aside(top)}")
        return
    chosen = next((p for p in plans if p.resume_from is not None and p.resume_from != ckpt.latest_checkpoint(p.run_dir)), None)
    if chosen is None:
        return
    for d in (chosen.run_dir / ckpt.CHECKPOINTS_DIR).glob("step-*"):
        if ckpt.checkpoint_step(d) > chosen.resume_step:
            say(f"--resume: moved the later checkpoint {d} to {_move_aside(d)}")
    for p in plans[chosen.index + 1:]:
        if p.run_dir.exists():
            say(f"--resume: moved stage {p.index}'s run {p.run_dir} to {_move_aside(p.run_dir)}")


def _step_plan(st: Resolved, plan: StagePlan, n_stages: int) -> str:
    t = st.run.trainer
    per = (1 if t.prompts_per_minibatch is None else t.prompts_per_step // t.prompts_per_minibatch) * t.ppo_epochs
    todo = max(0, t.steps - plan.resume_step)
    rollout_steps = -(-todo // per)
    name = st.run.algorithm["name"]
    head = f"stage {plan.index} ({name})" if n_stages > 1 else name
    start = f"resumes from step {plan.resume_step} ({plan.resume_from})" if plan.resume_from else "starts at step 0"
    return (f"{head}: {t.steps} optimizer steps, {start}; {rollout_steps} rollout step(s) to go × "
            f"{t.prompts_per_step} prompts ({per} optimizer step(s) each); run dir {plan.run_dir}")


# --- training ----------------------------------------------------------------------------------


def train(source: str | Path | dict | DictConfig, overrides: Iterable[str] = (), *, plugins: Iterable[Any] = (),
          base: Any = "default", resume_path: str | Path | None = None, force_resume: bool = False,
          dry_run: bool = False) -> list[Path]:
    """Run every stage; stage k+1 starts from stage k's final checkpoint. Returns final checkpoints.

    SIGINT/SIGTERM during training save a checkpoint and raise ``interrupt.Interrupted``.
    ``dry_run``: check everything, print the resolved config and the step plan, train nothing."""
    from .distributed import is_main

    def say(line: str) -> None:
        if is_main():
            print(line, flush=True)

    label = str(source) if isinstance(source, (str, Path)) else "config"
    cfg = load_config(source, overrides, base=base)
    stages = resolve_stages(cfg, plugins=plugins, source=label)
    problems = path_problems(stages)
    if problems:
        raise ConfigError(problems, label)
    plans = plan_resume(stages, resume_path=resume_path, force=force_resume, source=label)
    if resume_path is not None:  # the explicit checkpoint beats a config's resume: never
        for st in stages:
            st.run.resume = st.raw.resume = "auto"
    if dry_run:
        for st, plan in zip(stages, plans):
            if len(stages) > 1:
                say(f"# --- stage {plan.index}: {st.run.algorithm['name']} ---")
            say(OmegaConf.to_yaml(full_config(st)).rstrip())
        say("# plan")
        for st, plan in zip(stages, plans):
            say(_step_plan(st, plan, len(stages)))
        return []

    from .engine import Engine  # heavy imports only when training

    _prepare_dirs(stages, plans, say, fresh=stages[0].run.resume == "never" and resume_path is None)
    finals: list[Path] = []
    with interrupt.handlers():
        for st, plan in zip(stages, plans):
            resolved = full_config(st)  # config.yaml keeps model.path as given (tiny:...), so it re-runs as is
            if plan.index > 0:
                st.raw.model.path = resolved["model"]["path"] = str(finals[-1])
                st = resolve(st.raw, plugins=plugins, source=label)
            elif st.run.model.path.startswith("tiny:"):
                st.raw.model.path = materialize_model(st.run.model.path, st.run.run_dir)
                st = resolve(st.raw, plugins=plugins, source=label)
            if plan.resume_from is not None:
                say(f"resuming from step {plan.resume_step} of {plan.run_dir}")
            if plan.changes:
                # the backends keep the moments and the schedule's position, with the new hyperparameters
                say(f"--force-resume: continuing with changed {'; '.join(plan.changes)}")
            engine = Engine(st.run, st.algo, st.pm, plan.run_dir, resolved)
            with interrupt.catching():
                final = engine.run()
            if interrupt.pending():
                raise interrupt.Interrupted(interrupt.pending(), final, ckpt.checkpoint_step(final))
            finals.append(final)
    return finals
