"""``posttrain experiment SPEC.yaml``: a grid of training runs from one spec, then a results
table and training-curve plots.

A spec is a YAML mapping (paths in it are relative to the spec's directory):

```yaml
name: paper_claims                     # label in the report
out: runs/experiments/paper_claims     # output directory (--out wins; --smoke appends "-smoke")
base_model: base_model.yaml            # optional: a run config trained first (OUT/base); its final
                                       # checkpoint is every run's model.path unless the entry sets one
config: {...}                          # partial run config shared by every run (over configs/base.yaml)
algorithms:                            # entry name → a run-config YAML path, or an inline partial config
  grpo: {algorithm: {name: grpo}}
  sft_then_grpo:                       # stages run in order; their trainer.steps must add up to `steps`
    stages: [{algorithm: {name: sft}, trainer: {steps: 20}}, {algorithm: {name: grpo}, trainer: {steps: 40}}]
steps: 60                              # optimizer steps of every run (the equal budget)
budget: {rollout.n: 8, trainer.lr: 1.0e-3}   # dotted keys set on every run and every stage, last
seeds: [0, 1, 2]                       # trainer.seed of each run (and of each stage)
grid: {trainer.lr: [1.0e-3, 3.0e-4]}   # optional: every combination is a variant of every algorithm
target_accuracy: 0.3                   # "steps to target": first step with eval/accuracy >= this
final_eval: {n: 16, k: [1, 4, 16], temperature: 1.0, max_problems: 100}  # optional pass@k on data.eval
summaries:                             # optional extra columns: a metric reduced over (a range of) steps
  grad_norm_var: {metric: train/grad_norm, reduce: var}           # last|first|mean|std|var|min|max
  offline_early: {metric: train/offline_data_ratio, reduce: mean, from: 1, to: 10}
smooth: 5                              # rolling-mean window of the plotted curves
smoke: {eval.max_prompts: 4, final_eval.n: 2}  # what --smoke also sets (final_eval.* keys: final_eval)
```

Layers of a run's config, later wins: ``configs/base.yaml`` ← ``config`` ← the entry ←
``model.path`` of the base model (unless the entry sets it) ← ``budget`` ← the grid point ←
``trainer.seed`` ← ``trainer.steps`` ← (``--smoke``: ``smoke``, 1 step per stage, the first
seed). Dotted keys are applied to the top level and to every stage, so the budget holds in
each. ``run_dir`` is ``OUT/runs/<variant>/seed<seed>``; ``<variant>`` is the entry name plus
``__<key>=<value>`` per grid key (the key's last component while that is unambiguous).

A finished run writes ``done.json`` (its config, final checkpoints, seconds); a later
invocation skips it, and refuses (naming the run) when the spec now gives it a different
config. An interrupted run resumes from its newest checkpoint (``resume: auto``).

Outputs in OUT: ``results.md`` and ``results.json`` (mean ± sample std over seeds of the final
held-out accuracy, pass@k from ``final_eval`` and any ``eval/pass@n`` the eval section logs,
steps to the target, the summaries), ``plots/*.png`` (one line per variant, mean over seeds,
steps cumulative over stages). pass@k is the unbiased estimator of ``posttrain eval``
(``posttrain.eval.pass_at_k``), computed by ``posttrain.eval.run_eval`` on the run's final
checkpoint in ``run_dir/final_eval``.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from . import run as run_lib
from .config import ConfigError, load_yaml
from .logging import METRICS_FILE, read_metrics
from .plugins import installed_algorithms

DONE_FILE = "done.json"
BASE_PLACEHOLDER = "<base model>"  # model.path until the base model's final checkpoint exists
SPEC_KEYS = {"name", "out", "base_model", "config", "algorithms", "steps", "budget", "seeds", "grid",
             "target_accuracy", "final_eval", "summaries", "smooth", "smoke"}
FINAL_EVAL_KEYS = {"n", "k", "temperature", "top_p", "max_new_tokens", "max_problems"}
REDUCERS = ("last", "first", "mean", "std", "var", "min", "max")
FORBIDDEN_BUDGET_KEYS = ("trainer.steps", "trainer.seed", "run_dir")  # the spec's steps / seeds / OUT set these


# --- the spec ----------------------------------------------------------------------------------


@dataclass
class Spec:
    path: Path
    name: str
    out: Path
    algorithms: dict[str, dict]  # entry name → partial run config (plain containers)
    steps: int
    seeds: list[int]
    config: dict = field(default_factory=dict)
    base_model: Optional[dict] = None  # the base recipe's run config
    budget: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    target_accuracy: Optional[float] = None
    final_eval: Optional[dict] = None
    summaries: dict[str, dict] = field(default_factory=dict)
    smooth: int = 1
    smoke: dict[str, Any] = field(default_factory=dict)


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _spec_file(value: str, spec_dir: Path) -> Path:
    """A path in a spec: relative to the spec's directory, else to the working directory."""
    p = Path(value)
    return p if p.is_absolute() or not (spec_dir / p).exists() else spec_dir / p


def _load_partial(value: Any, where: str, spec_dir: Path, problems: list[str]) -> Optional[dict]:
    if isinstance(value, str):
        path = _spec_file(value, spec_dir)
        try:
            return _container(load_yaml(path))
        except ConfigError as e:
            problems += [f"{where}: {p}" for p in e.problems]
            return None
    if isinstance(value, dict):
        return value
    problems.append(f"{where}: must be a run-config YAML path or a mapping, got {type(value).__name__}")
    return None


def load_spec(path: str | Path, *, out: str | Path | None = None, smoke: bool = False) -> Spec:
    """Read and check a spec; every problem in one ConfigError naming the file and the field."""
    path = Path(path)
    raw = _container(load_yaml(path))
    problems: list[str] = []
    for k in raw:
        if k not in SPEC_KEYS:
            m = difflib.get_close_matches(str(k), sorted(SPEC_KEYS), n=1)
            problems.append(f"{k}: unknown key.{f' Did you mean {m[0]!r}?' if m else ''} (keys: {', '.join(sorted(SPEC_KEYS))})")
    spec_dir = path.parent
    algos: dict[str, dict] = {}
    if not isinstance(raw.get("algorithms"), dict) or not raw["algorithms"]:
        problems.append("algorithms: missing (a mapping of entry name → run-config path or inline config)")
    else:
        for name, value in raw["algorithms"].items():
            if "/" in str(name) or str(name).startswith("."):
                problems.append(f"algorithms.{name}: an entry name becomes a directory name; no '/' or leading '.'")
            cfg = _load_partial(value, f"algorithms.{name}", spec_dir, problems)
            if cfg is not None:
                algos[str(name)] = cfg
    steps = raw.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(f"steps: the optimizer steps of every run, an integer >= 1, got {steps!r}")
    else:
        for name, cfg in algos.items():
            problems += _check_steps(name, cfg, steps)
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        problems.append(f"seeds: a list of distinct integers, got {seeds!r}")
    for key in ("config", "budget", "grid", "summaries", "smoke"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            problems.append(f"{key}: must be a mapping, got {type(raw[key]).__name__}")
    budget = raw.get("budget") or {}
    grid = raw.get("grid") or {}
    for section, mapping in (("budget", budget), ("grid", grid), ("smoke", raw.get("smoke") or {})):
        for key in mapping if isinstance(mapping, dict) else []:
            if key in FORBIDDEN_BUDGET_KEYS:
                problems.append(f"{section}.{key}: set by the spec itself (steps, seeds, out); remove it")
    for key, values in grid.items() if isinstance(grid, dict) else []:
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: a non-empty list of values, got {values!r}")
    target = raw.get("target_accuracy")
    if target is not None and (not isinstance(target, (int, float)) or not 0 <= target <= 1):
        problems.append(f"target_accuracy: a number in [0, 1], got {target!r}")
    smooth = raw.get("smooth", 1)
    if not isinstance(smooth, int) or smooth < 1:
        problems.append(f"smooth: an integer >= 1, got {smooth!r}")
    summaries = raw.get("summaries") or {}
    for name, s in summaries.items() if isinstance(summaries, dict) else []:
        if not isinstance(s, dict) or not isinstance(s.get("metric"), str):
            problems.append(f"summaries.{name}: needs metric: <key in metrics.jsonl>")
            continue
        if s.get("reduce", "last") not in REDUCERS:
            problems.append(f"summaries.{name}.reduce: '{s.get('reduce')}' is not one of {', '.join(REDUCERS)}")
        if set(s) - {"metric", "reduce", "from", "to"}:
            problems.append(f"summaries.{name}: unknown key(s) {sorted(set(s) - {'metric', 'reduce', 'from', 'to'})}")
    smoke_cfg = dict(raw.get("smoke") or {})
    final_eval = raw.get("final_eval")
    if final_eval is not None:
        if smoke:
            shrink = {k.split(".", 1)[1]: v for k, v in smoke_cfg.items() if k.startswith("final_eval.")}
            if isinstance(shrink.get("n"), int) and "k" not in shrink:  # keep the k values that still fit
                shrink["k"] = [k for k in final_eval.get("k", [1]) if isinstance(k, int) and k <= shrink["n"]] or [shrink["n"]]
            final_eval = {**final_eval, **shrink}
        problems += _check_final_eval(final_eval)
    base = None
    if raw.get("base_model") is not None:
        base = _load_partial(raw["base_model"], "base_model", spec_dir, problems)
        if base is not None and base.get("stages"):
            problems.append("base_model: a single-stage run config (no stages:)")
    if problems:
        raise ConfigError(problems, str(path))
    name = str(raw.get("name") or path.stem)
    out_dir = Path(out) if out is not None else Path(raw.get("out") or f"runs/experiments/{name}")
    if smoke and out is None:
        out_dir = out_dir.with_name(out_dir.name + "-smoke")
    return Spec(path=path, name=name, out=out_dir, algorithms=algos, steps=steps, seeds=list(seeds),
                config=raw.get("config") or {}, base_model=base, budget=budget, grid=grid, target_accuracy=target,
                final_eval=final_eval, summaries=summaries, smooth=smooth,
                smoke={k: v for k, v in smoke_cfg.items() if not k.startswith("final_eval.")})


def _check_steps(name: str, cfg: dict, steps: int) -> list[str]:
    """The equal budget: a single-stage entry gets ``steps``; a staged one splits it explicitly."""
    stages = cfg.get("stages") or []
    if not stages:
        own = (cfg.get("trainer") or {}).get("steps")
        if own is not None and own != steps:
            return [f"algorithms.{name}.trainer.steps: {own}, but every run trains `steps: {steps}` (equal budget); remove it"]
        return []
    own = [(st.get("trainer") or {}).get("steps") if isinstance(st, dict) else None for st in stages]
    if not all(isinstance(n, int) and n >= 1 for n in own):
        return [f"algorithms.{name}.stages: every stage must set trainer.steps (an integer >= 1), got {own}"]
    if sum(own) != steps:
        return [f"algorithms.{name}.stages: trainer.steps {' + '.join(map(str, own))} = {sum(own)}, but the budget is "
                f"steps: {steps} (equal budget)"]
    return []


def _check_final_eval(fe: Any) -> list[str]:
    if not isinstance(fe, dict):
        return [f"final_eval: must be a mapping, got {type(fe).__name__}"]
    p = [f"final_eval.{k}: unknown key (keys: {', '.join(sorted(FINAL_EVAL_KEYS))})" for k in fe if k not in FINAL_EVAL_KEYS]
    n = fe.get("n", 1)
    if not isinstance(n, int) or n < 1:
        p.append(f"final_eval.n: an integer >= 1, got {n!r}")
    elif not all(isinstance(k, int) and 1 <= k <= n for k in fe.get("k", [1])):
        p.append(f"final_eval.k: every k must be an integer in [1, n={n}], got {fe.get('k')!r}")
    return p


# --- grid expansion ----------------------------------------------------------------------------


@dataclass
class Job:
    """One run of the grid."""

    name: str  # "<variant>/seed<seed>"
    variant: str
    entry: str  # the spec's algorithm entry
    seed: int
    run_dir: Path
    config: dict  # complete partial run config; model.path may be BASE_PLACEHOLDER
    stage_steps: list[int]  # trainer.steps of each stage (one entry for a single-stage run)
    stage_names: list[str]  # algorithm of each stage

    def stage_dirs(self) -> list[Path]:
        n = len(self.stage_names)
        return [run_lib.stage_dir(str(self.run_dir), i, a, n) for i, a in enumerate(self.stage_names)]


def _short_keys(keys: list[str]) -> dict[str, str]:
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {k: s if counts[s] == 1 else k for k, s in short.items()}


def _fmt_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text.replace("/", "_").replace(os.sep, "_")  # a value becomes part of one directory name


def grid_points(grid: dict[str, list]) -> list[tuple[str, dict[str, Any]]]:
    """(suffix, {dotted key: value}) per combination, in the spec's order; suffix "" for no grid."""
    if not grid:
        return [("", {})]
    keys = list(grid)
    short = _short_keys(keys)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        suffix = "".join(f"__{short[k]}={_fmt_value(v)}" for k, v in zip(keys, values))
        out.append((suffix, dict(zip(keys, values))))
    if len({s for s, _ in out}) != len(out):
        raise ConfigError([f"grid: two combinations get the same run directory name ({[s for s, _ in out]}); make the values distinct"])
    return out


def _set(cfg: DictConfig, dotted: dict[str, Any]) -> None:
    for key, value in dotted.items():
        OmegaConf.update(cfg, key, value, merge=True)


def _stage_algorithms(cfg: dict) -> list[str]:
    stages = cfg.get("stages") or []
    top = (cfg.get("algorithm") or {}).get("name")
    if not stages:
        return [top]
    return [((st.get("algorithm") or {}).get("name") or top) for st in stages]


def build_run_config(spec: Spec, entry: str, point: dict[str, Any], seed: int, run_dir: Path, *,
                     smoke: bool = False) -> tuple[dict, list[int]]:
    """One run's partial config (the layers in the module docstring) and its stage steps."""
    algo = spec.algorithms[entry]
    cfg = OmegaConf.merge(OmegaConf.create(spec.config), OmegaConf.create(algo))
    if spec.base_model is not None and not (algo.get("model") or {}).get("path"):
        OmegaConf.update(cfg, "model.path", BASE_PLACEHOLDER, merge=True)
    dotted = {**spec.budget, **point, "trainer.seed": seed, **(spec.smoke if smoke else {})}
    stages = cfg.get("stages") or []
    if stages:
        steps = [1 if smoke else int(OmegaConf.select(st, "trainer.steps", default=0) or 0) for st in stages]
        for st, n in zip(stages, steps):
            _set(st, {**dotted, "trainer.steps": n})
    else:
        steps = [1 if smoke else spec.steps]
    _set(cfg, {**dotted, "trainer.steps": sum(steps)})
    cfg.run_dir = str(run_dir)
    return _container(cfg), steps


def expand(spec: Spec, *, smoke: bool = False, only: Optional[list[str]] = None) -> list[Job]:
    """algorithms × grid points × seeds → jobs, in that nesting order (names are stable)."""
    entries = list(spec.algorithms)
    if only:
        unknown = [o for o in only if o not in spec.algorithms]
        if unknown:
            raise ConfigError([f"--only {', '.join(unknown)}: not an entry of algorithms ({', '.join(entries)})"], str(spec.path))
        entries = [e for e in entries if e in only]
    seeds = spec.seeds[:1] if smoke else spec.seeds
    jobs = []
    for entry in entries:
        for suffix, point in grid_points(spec.grid):
            variant = entry + suffix
            for seed in seeds:
                run_dir = spec.out / "runs" / variant / f"seed{seed}"
                cfg, steps = build_run_config(spec, entry, point, seed, run_dir, smoke=smoke)
                jobs.append(Job(f"{variant}/seed{seed}", variant, entry, seed, run_dir, cfg, steps, _stage_algorithms(cfg)))
    return jobs


def base_job(spec: Spec, *, smoke: bool = False) -> Optional[Job]:
    """The base-model recipe as a job in OUT/base (its own seed, steps and settings)."""
    if spec.base_model is None:
        return None
    cfg = OmegaConf.create(spec.base_model)
    if smoke:
        _set(cfg, {**spec.smoke, "trainer.steps": 1})
    cfg.run_dir = str(spec.out / "base")
    cfg = _container(cfg)
    steps = int((cfg.get("trainer") or {}).get("steps", 0))
    return Job("base", "base", "base", int((cfg.get("trainer") or {}).get("seed", 0)), spec.out / "base", cfg,
               [steps], _stage_algorithms(cfg))


# --- validation --------------------------------------------------------------------------------


def check_algorithms(spec: Spec, jobs: list[Job], *, skip_missing: bool = False) -> list[Job]:
    """Every algorithm the jobs use must be installed: a clear error listing the installed ones,
    or (``skip_missing``) the entries using a missing one are dropped with a message."""
    have = installed_algorithms()
    missing: dict[str, list[str]] = {}
    for job in jobs:
        for name in job.stage_names:
            if name not in have:
                missing.setdefault(job.entry, []).append(str(name))
    if not missing:
        return jobs
    if skip_missing:
        for entry, names in missing.items():
            print(f"skipping algorithms.{entry}: algorithm {', '.join(sorted(set(names)))} not installed "
                  f"(installed: {', '.join(have)})", file=sys.stderr)
        return [j for j in jobs if j.entry not in missing]
    problems = []
    for entry, names in missing.items():
        for name in sorted(set(names)):
            close = difflib.get_close_matches(name, have, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Install it (pip install -e plugins/{name})"
            problems.append(f"algorithms.{entry}: algorithm '{name}' is not installed (installed: {', '.join(have)}).{hint}"
                            " or pass --skip-missing to run the other entries.")
    raise ConfigError(problems, str(spec.path))


def validate(spec: Spec, jobs: list[Job]) -> None:
    """Resolve each variant's run config (both validation phases of ``posttrain train``) before
    anything trains; every problem at once, prefixed with the spec field it came from."""
    problems: list[str] = []
    seen: set[str] = set()
    for job in jobs:
        if job.variant in seen:  # seeds differ only in trainer.seed
            continue
        seen.add(job.variant)
        try:
            run_lib.resolve_stages(run_lib.load_config(job.config), source=job.name)
        except ConfigError as e:
            where = "base_model" if job.entry == "base" else f"algorithms.{job.entry}"
            problems += [f"{where}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems, str(spec.path))


# --- running -----------------------------------------------------------------------------------


def read_done(run_dir: Path) -> Optional[dict]:
    f = Path(run_dir) / DONE_FILE
    return json.loads(f.read_text()) if f.exists() else None


def _normalized(cfg: dict) -> Any:
    return json.loads(json.dumps(cfg, sort_keys=True, default=str))


def check_finished_configs(jobs: list[Job]) -> None:
    """A finished run whose config the spec has since changed must not be silently reused."""
    problems = []
    for job in jobs:
        done = read_done(job.run_dir)
        if done is not None and _normalized(done.get("config")) != _normalized(job.config):
            old, new = _flatten(done.get("config") or {}), _flatten(job.config)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            problems.append(f"{job.name}: finished in {job.run_dir} with a different config (changed: {', '.join(changed[:6])}); "
                            "delete that directory to run it again, or use another --out")
    if problems:
        raise ConfigError(problems, "experiment")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        return {k2: v2 for k, v in d.items() for k2, v2 in _flatten(v, f"{prefix}{k}.").items()}
    if isinstance(d, list) and any(isinstance(x, dict) for x in d):
        return {k2: v2 for i, v in enumerate(d) for k2, v2 in _flatten(v, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): d}


@dataclass
class HeldOut:
    """The benchmark YAML of ``posttrain eval`` for one ``data.eval`` source."""

    yaml: Path
    overrides: list[str]


def prepare_final_eval(spec: Spec, jobs: list[Job]) -> dict[str, HeldOut]:
    """Write each distinct held-out split as a JSONL benchmark (once, before any worker starts)."""
    if not spec.final_eval:
        return {}
    from .data import load_examples

    out: dict[str, HeldOut] = {}
    for job in jobs:
        cfg = run_lib.load_config(job.config)
        last = run_lib.stage_configs(cfg)[-1]  # the final weights are evaluated on the last stage's split
        source = last.data.eval
        if not source:
            raise ConfigError([f"final_eval: {job.name} has no data.eval to evaluate on"], str(spec.path))
        key = hashlib.sha1(json.dumps([source, last.data.prompt_key, last.data.answer_key, last.verifier.name]).encode()).hexdigest()[:10]
        d = spec.out / "heldout"
        bench = d / f"heldout-{key}.yaml"
        if not bench.exists():
            d.mkdir(parents=True, exist_ok=True)
            rows = load_examples(source, prompt_key=last.data.prompt_key, answer_key=last.data.answer_key)
            jsonl = d / f"heldout-{key}.jsonl"
            jsonl.write_text("".join(json.dumps({"problem": ex.prompt, "answer": ex.answer}) + "\n" for ex in rows))
            OmegaConf.save(OmegaConf.create({"name": "heldout", "file": str(jsonl.resolve()), "kind": "math",
                                             "problem_key": "problem", "answer_key": "answer",
                                             "verifier": last.verifier.name}), bench)
        fe = spec.final_eval
        sampling = {"n": fe.get("n", 1), "k": list(fe.get("k", [1])), "temperature": fe.get("temperature", 1.0),
                    "top_p": fe.get("top_p", 1.0), "max_new_tokens": fe.get("max_new_tokens") or last.rollout.max_new_tokens,
                    "max_problems": fe.get("max_problems"), "seed": job.seed, "progress": False,
                    "rollout.batch_size": last.rollout.batch_size, "verifier.workers": last.verifier.workers,
                    "verifier.timeout_s": last.verifier.timeout_s, "template": last.data.template,
                    "system_prompt": last.data.system_prompt}
        overrides = [f"{k}={json.dumps(v)}" for k, v in sampling.items()]  # JSON values are YAML values
        out[job.name] = HeldOut(bench, overrides)
    return out


def run_job(job: Job, base_path: Optional[str], held_out: Optional[HeldOut]) -> dict:
    """Train one run (and its final pass@k evaluation), output to ``run_dir/log.txt``; write
    ``done.json`` last. Returns {"name", "ok", "seconds", "error"?}."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(job.config).replace(json.dumps(BASE_PLACEHOLDER), json.dumps(base_path or BASE_PLACEHOLDER)))
    t0 = time.perf_counter()
    with open(job.run_dir / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            finals = [str(p) for p in run_lib.train(cfg)]
            if held_out is not None:
                from .eval import run_eval

                run_eval([finals[-1]], [str(held_out.yaml)], job.run_dir / "final_eval", held_out.overrides)
        except Exception as e:  # one failed run must not stop the grid: reported at the end
            traceback.print_exc()
            return {"name": job.name, "ok": False, "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}
    seconds = time.perf_counter() - t0
    done = {"config": job.config, "finals": finals, "seconds": seconds}
    tmp = job.run_dir / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(done, indent=2, default=str) + "\n")
    tmp.replace(job.run_dir / DONE_FILE)
    return {"name": job.name, "ok": True, "seconds": seconds}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # workers share the cores instead of oversubscribing them


def run_jobs(jobs: list[Job], base_path: Optional[str], held_out: dict[str, HeldOut], *, workers: int = 1) -> list[dict]:
    """Run the unfinished jobs, in this process (workers=1) or in ``workers`` spawned processes."""
    todo = [j for j in jobs if read_done(j.run_dir) is None]
    for j in jobs:
        if j not in todo:
            print(f"[skip] {j.name}: finished ({j.run_dir / DONE_FILE})")
    results = []
    if workers <= 1 or len(todo) <= 1:
        for i, job in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {job.name} → {job.run_dir}", flush=True)
            results.append(_report(run_job(job, base_path, held_out.get(job.name))))
        return results
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(run_job, job, base_path, held_out.get(job.name)): job for job in todo}
        print(f"{len(todo)} run(s) on {workers} workers × {threads} thread(s)", flush=True)
        for fut in as_completed(futures):
            try:
                results.append(_report(fut.result()))
            except Exception as e:  # the worker process itself died
                results.append(_report({"name": futures[fut].name, "ok": False, "seconds": 0.0, "error": f"{type(e).__name__}: {e}"}))
    return results


def _report(r: dict) -> dict:
    status = f"done in {r['seconds']:.0f} s" if r["ok"] else f"FAILED: {r['error']}"
    print(f"  {r['name']}: {status}", flush=True)
    return r


# --- results -----------------------------------------------------------------------------------


def run_series(job: Job) -> dict[str, dict[int, float]]:
    """metric → {cumulative step: value} over the stages (stage k's steps are offset by the
    steps of the stages before it; a stage's step-0 evaluation lands on the previous stage's last step)."""
    series: dict[str, dict[int, float]] = {}
    offset = 0
    for stage_dir, steps in zip(job.stage_dirs(), job.stage_steps):
        f = stage_dir / METRICS_FILE
        rows = read_metrics(f) if f.exists() else []
        for row in rows:
            for k, v in row.items():
                if k != "step" and v is not None:
                    series.setdefault(k, {})[offset + int(row["step"])] = float(v)
        offset += steps
    return series


def steps_to_target(eval_acc: dict[int, float], target: float) -> Optional[int]:
    """The first step whose held-out accuracy reaches ``target``; None if none does."""
    return next((s for s in sorted(eval_acc) if eval_acc[s] >= target), None)


def reduce_metric(values: dict[int, float], how: str, lo: Optional[int] = None, hi: Optional[int] = None) -> Optional[float]:
    xs = [values[s] for s in sorted(values) if (lo is None or s >= lo) and (hi is None or s <= hi)]
    if not xs:
        return None
    if how in ("std", "var"):
        if len(xs) < 2:
            return None
        return statistics.stdev(xs) if how == "std" else statistics.variance(xs)
    return {"last": xs[-1], "first": xs[0], "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)}[how]


def mean_std(values: list[Optional[float]]) -> dict:
    """Mean and sample standard deviation (n − 1) over the seeds that have a value."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(xs) if xs else None, "std": statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None),
            "n": len(xs), "values": values}


def final_pass_at_k(job: Job) -> dict[str, float]:
    """pass@k from ``run_dir/final_eval/results.json`` (``posttrain eval``'s payload)."""
    f = job.run_dir / "final_eval" / "results.json"
    if not f.exists():
        return {}
    results = json.loads(f.read_text())["results"]
    metrics = next(iter(next(iter(results.values())).values()))  # one model, one benchmark
    return {k: v for k, v in metrics.items() if k.startswith("pass@")}


def summarize(spec: Spec, jobs: list[Job]) -> dict:
    """The results payload: one row per variant, statistics over its seeds' finished runs."""
    variants: dict[str, list[Job]] = {}
    for j in jobs:
        variants.setdefault(j.variant, []).append(j)
    rows, missing = [], []
    for variant, vjobs in variants.items():
        done = [j for j in vjobs if read_done(j.run_dir) is not None]
        missing += [j.name for j in vjobs if j not in done]
        per_seed = []
        for j in done:
            s = run_series(j)
            acc = s.get("eval/accuracy", {})
            rec = {"seed": j.seed, "seconds": read_done(j.run_dir).get("seconds"),
                   "initial_accuracy": acc[min(acc)] if acc else None, "final_accuracy": acc[max(acc)] if acc else None,
                   "steps_to_target": steps_to_target(acc, spec.target_accuracy) if spec.target_accuracy is not None and acc else None}
            for key in sorted(k for k in s if k.startswith("eval/pass@") and k != "eval/pass@1"):  # pass@1 = accuracy
                rec[key] = s[key][max(s[key])]
            rec.update(final_pass_at_k(j))
            for name, sm in spec.summaries.items():
                rec[name] = reduce_metric(s.get(sm["metric"], {}), sm.get("reduce", "last"), sm.get("from"), sm.get("to"))
            per_seed.append(rec)
        keys = ["initial_accuracy", "final_accuracy"]
        keys += sorted({k for r in per_seed for k in r if k.startswith("eval/pass@")}, key=lambda k: int(k.split("@")[1]))
        keys += sorted({k for r in per_seed for k in r if k.startswith("pass@")}, key=lambda k: int(k.split("@")[1]))
        keys += list(spec.summaries)
        row = {"variant": variant, "entry": vjobs[0].entry, "algorithms": vjobs[0].stage_names, "stage_steps": vjobs[0].stage_steps,
               "seeds": [r["seed"] for r in per_seed], "runs": len(per_seed), "of": len(vjobs)}
        row.update({k: mean_std([r.get(k) for r in per_seed]) for k in keys})
        if spec.target_accuracy is not None:
            hits = [r["steps_to_target"] for r in per_seed]
            row["steps_to_target"] = {**mean_std(hits), "reached": sum(h is not None for h in hits)}
        row["per_seed"] = per_seed
        rows.append(row)
    return {"spec": str(spec.path), "name": spec.name, "out": str(spec.out), "steps": spec.steps,
            "target_accuracy": spec.target_accuracy, "summaries": spec.summaries, "final_eval": spec.final_eval,
            "pass_at_k": "unbiased 1 - C(n-c,k)/C(n,k) (posttrain.eval.pass_at_k) over final_eval.n samples per problem",
            "std": "sample standard deviation over seeds (n - 1)", "rows": rows, "missing": missing}


def _pm(stat: dict, scale: float = 1.0, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _general(stat: dict) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean']:.4g} ± {stat['std']:.3g}"


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    percent = [k for k in (rows[0] if rows else {}) if k in ("initial_accuracy", "final_accuracy") or "pass@" in k]
    summaries = list(payload["summaries"])
    head = ["variant", "seeds"] + [{"initial_accuracy": "start acc %", "final_accuracy": "final acc %"}.get(k, k.replace("eval/", "eval ") + " %")
                                   for k in percent]
    if payload["target_accuracy"] is not None:
        head.append(f"steps to {payload['target_accuracy']:.0%} (reached)")
    head += summaries
    lines = [f"# {payload['name']}: results", "",
             f"Mean ± sample std over seeds. Accuracy: `eval/accuracy` on the held-out split at the first (start) and last "
             f"(final) evaluation of each run; pass@k: {payload['pass_at_k']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['runs']}/{r['of']}"] + [_pm(r.get(k, {}), 100.0) for k in percent]
        if payload["target_accuracy"] is not None:
            st = r["steps_to_target"]
            cells.append(f"{_pm(st, 1.0, 0)} ({st['reached']}/{r['runs']})" if st["reached"] else f"— (0/{r['runs']})")
        cells += [_general(r.get(k, {})) for k in summaries]
        lines.append("| " + " | ".join(cells) + " |")
    if payload["missing"]:
        lines += ["", f"Not finished: {', '.join(payload['missing'])}."]
    return "\n".join(lines) + "\n"


def write_results(spec: Spec, jobs: list[Job]) -> dict[str, Path]:
    """results.json, results.md and plots/*.png in OUT."""
    from .plotting import plot_curves

    payload = summarize(spec, jobs)
    spec.out.mkdir(parents=True, exist_ok=True)
    files = {"json": spec.out / "results.json", "markdown": spec.out / "results.md"}
    files["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    files["markdown"].write_text(markdown(payload))
    curves: dict[str, list[dict[str, dict[int, float]]]] = {}
    for j in jobs:
        if read_done(j.run_dir) is not None:
            curves.setdefault(j.variant, []).append(run_series(j))
    for i, p in enumerate(plot_curves(curves, spec.out / "plots", smooth=spec.smooth)):
        files[f"plot{i}"] = p
    return files


# --- the command -------------------------------------------------------------------------------


def run_experiment(spec_path: str | Path, *, workers: int = 1, smoke: bool = False, out: str | Path | None = None,
                   only: Optional[list[str]] = None, skip_missing: bool = False, report_only: bool = False) -> dict:
    """Load, expand, validate, build the base model, run the grid, write the results. Returns
    {"files": {...}, "failed": [names], "ran": n, "seconds": total}."""
    if workers < 1:
        raise ConfigError([f"--workers: must be >= 1, got {workers}"], "command line")
    spec = load_spec(spec_path, out=out, smoke=smoke)
    jobs = check_algorithms(spec, expand(spec, smoke=smoke, only=only), skip_missing=skip_missing)
    base = base_job(spec, smoke=smoke)
    validate(spec, ([base] if base else []) + jobs)
    check_finished_configs(([base] if base else []) + jobs)
    t0 = time.perf_counter()
    failed: list[str] = []
    ran = 0
    if not report_only:
        base_path = None
        if base is not None:
            if read_done(base.run_dir) is None:
                print(f"[base] the base model → {base.run_dir}", flush=True)
                r = run_job(base, None, None)
                _report(r)
                if not r["ok"]:
                    raise RuntimeError(f"the base model failed ({r['error']}); see {base.run_dir / 'log.txt'}")
                ran += 1
            base_path = read_done(base.run_dir)["finals"][-1]
        results = run_jobs(jobs, base_path, prepare_final_eval(spec, jobs), workers=workers)
        ran += len(results)
        failed = [r["name"] for r in results if not r["ok"]]
    files = write_results(spec, jobs)
    print(files["markdown"].read_text(), end="")
    for kind, f in files.items():
        print(f"{kind}: {f}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (their log.txt has the traceback)", file=sys.stderr)
    return {"files": files, "failed": failed, "ran": ran, "seconds": time.perf_counter() - t0}
