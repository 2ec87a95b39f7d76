"""``posttrain experiment``: the spec (its format is in the package docstring), its expansion
into a grid of jobs, and their validation before anything trains."""

from __future__ import annotations

import difflib
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from .. import run as run_lib
from ..config import ConfigError, load_yaml
from ..plugins import installed_algorithms

BASE_PLACEHOLDER = "<base model>"  # model.path until the base model's final checkpoint exists
SPEC_KEYS = {"name", "out", "base_model", "config", "algorithms", "steps", "budget", "seeds", "grid",
             "target_accuracy", "final_eval", "summaries", "smooth", "smoke", "splits", "comparisons"}
SPLIT_PREFIX = "split:"  # a config value "split:NAME" is the path of the spec's split NAME (OUT/splits/NAME.jsonl)
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
    comparisons: list[tuple[str, str]] = field(default_factory=list)  # (variant, variant or "base") pairs tested on pass@k
    splits: Optional[dict] = None  # {"source": data source, "parts": {name: count}}: disjoint consecutive slices

    def split_path(self, name: str) -> Path:
        return (self.out / "splits" / f"{name}.jsonl").resolve()


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
    comparisons = raw.get("comparisons") or []
    if not isinstance(comparisons, list) or not all(isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c)
                                                      for c in comparisons):
        problems.append(f"comparisons: a list of [variant, variant] pairs (\"base\" is the base model), got {comparisons!r}")
        comparisons = []
    splits = raw.get("splits")
    if splits is not None:
        problems += _check_splits(splits, [algos, raw.get("config") or {}])
    elif _split_refs([algos, raw.get("config") or {}]):
        problems.append(f"'{SPLIT_PREFIX}{_split_refs([algos, raw.get('config') or {}])[0]}': the spec has no splits: section")
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
                smoke={k: v for k, v in smoke_cfg.items() if not k.startswith("final_eval.")}, splits=splits,
                comparisons=[tuple(c) for c in comparisons])


def _split_refs(node: Any) -> list[str]:
    """Every "split:NAME" string in a (nested) config."""
    if isinstance(node, dict):
        return [r for v in node.values() for r in _split_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _split_refs(v)]
    return [node[len(SPLIT_PREFIX):]] if isinstance(node, str) and node.startswith(SPLIT_PREFIX) else []


def _check_splits(splits: Any, configs: list[Any]) -> list[str]:
    """splits: {source, parts: {name: count}}; every "split:NAME" in the configs names a part."""
    if not isinstance(splits, dict) or not isinstance(splits.get("source"), str) or not isinstance(splits.get("parts"), dict) \
            or not splits["parts"] or set(splits) - {"source", "parts"}:
        return [f"splits: a mapping {{source: <data source>, parts: {{name: count, ...}}}}, got {splits!r}"]
    p = [f"splits.parts.{k}: a count >= 1, got {v!r}" for k, v in splits["parts"].items()
         if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    for ref in sorted(set(_split_refs(configs))):
        if ref not in splits["parts"]:
            p.append(f"'{SPLIT_PREFIX}{ref}': no such part in splits.parts ({', '.join(splits['parts'])})")
    return p


def _resolve_splits(node: Any, spec: "Spec") -> Any:
    if isinstance(node, dict):
        return {k: _resolve_splits(v, spec) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_splits(v, spec) for v in node]
    if isinstance(node, str) and node.startswith(SPLIT_PREFIX):
        if spec.splits is None:
            raise ConfigError([f"'{node}': the spec has no splits: section"], str(spec.path))
        return str(spec.split_path(node[len(SPLIT_PREFIX):]))
    return node


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


def write_splits(spec: Spec) -> dict[str, Path]:
    """Cut ``splits.source`` into its parts, in order (part 1 = the first rows, ...), one JSONL
    each (prompt, answer, demos) at ``spec.split_path(name)``. The parts share no prompt: a
    validation split used to choose settings never overlaps the test split they are judged on."""
    if not spec.splits:
        return {}
    from ..data import load_examples

    parts = spec.splits["parts"]
    rows = load_examples(spec.splits["source"])
    need = sum(parts.values())
    if len(rows) < need:
        raise ConfigError([f"splits: {spec.splits['source']} has {len(rows)} rows, the parts need {need}"], str(spec.path))
    out, start, seen = {}, 0, {}
    for name, count in parts.items():
        part = rows[start:start + count]
        start += count
        for ex in part:
            if ex.prompt in seen:
                raise ConfigError([f"splits: the prompt {ex.prompt!r} is in both {seen[ex.prompt]} and {name}; "
                                   "the source repeats problems (ask it for fewer rows)"], str(spec.path))
            seen[ex.prompt] = name
        path = spec.split_path(name)
        text = "".join(json.dumps({"prompt": ex.prompt, "answer": ex.answer, "demos": ex.demonstrations}) + "\n" for ex in part)
        if not path.exists() or path.read_text() != text:  # same source → same bytes: finished runs stay valid
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        out[name] = path
    return out


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
    return _resolve_splits(_container(cfg), spec), steps


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
    write_splits(spec)  # the runs' data paths must exist to be checked
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
