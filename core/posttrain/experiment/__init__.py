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
splits:                                # optional: one source cut into disjoint consecutive parts, each
  source: "synthetic:arithmetic?n=600&seed=1&split=eval"   # written to OUT/splits/<part>.jsonl; a config
  parts: {validation: 200, test: 400}  # value "split:<part>" (e.g. data.eval: "split:test") is its path
comparisons: [[grpo, base], [hpt, grpo]]   # optional: paired Δ of every pass@k, its SE and a verdict
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
checkpoint in ``run_dir/final_eval`` (and on the base model's, in ``OUT/base/final_eval``: the
table's ``base`` row). Standard errors and the paired comparisons: ``results.standard_error``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from .results import final_pass_at_k, markdown, mean_std, reduce_metric, run_series, steps_to_target, summarize, write_results
from .runner import DONE_FILE, HeldOut, _report, check_finished_configs, prepare_final_eval, read_done, run_job, run_jobs
from .spec import (BASE_PLACEHOLDER, FINAL_EVAL_KEYS, FORBIDDEN_BUDGET_KEYS, REDUCERS, SPEC_KEYS, Job, Spec, base_job,
                   build_run_config, check_algorithms, expand, grid_points, load_spec, validate, write_splits)

__all__ = [
    "BASE_PLACEHOLDER", "FINAL_EVAL_KEYS", "FORBIDDEN_BUDGET_KEYS", "REDUCERS", "SPEC_KEYS", "Job", "Spec", "base_job",
    "build_run_config", "check_algorithms", "expand", "grid_points", "load_spec", "validate",
    "DONE_FILE", "HeldOut", "check_finished_configs", "prepare_final_eval", "read_done", "run_job", "run_jobs", "write_splits",
    "final_pass_at_k", "markdown", "mean_std", "reduce_metric", "run_series", "steps_to_target", "summarize", "write_results",
    "run_experiment",
]


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
        held_out = prepare_final_eval(spec, jobs)
        if base is not None and held_out and not (base.run_dir / "final_eval" / "results.json").exists():
            _evaluate_base(base_path, base, next(iter(held_out.values())))
        results = run_jobs(jobs, base_path, held_out, workers=workers)
        ran += len(results)
        failed = [r["name"] for r in results if not r["ok"]]
    files = write_results(spec, jobs)
    print(files["markdown"].read_text(), end="")
    for kind, f in files.items():
        print(f"{kind}: {f}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)} (their log.txt has the traceback)", file=sys.stderr)
    return {"files": files, "failed": failed, "ran": ran, "seconds": time.perf_counter() - t0}


def _evaluate_base(base_path: str, base, held_out: HeldOut) -> None:
    """The base model's final evaluation, on the runs' held-out split with their sampling (the
    first run's seed): the ``base`` row every run is compared with."""
    import contextlib

    from ..eval import run_eval

    print(f"[base] final evaluation → {base.run_dir / 'final_eval'}", flush=True)
    with open(base.run_dir / "log.txt", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        run_eval([base_path], [str(held_out.yaml)], base.run_dir / "final_eval", held_out.overrides)
