"""``posttrain experiment``: the results of the finished runs (statistics over seeds, the
markdown table, results.json and the training-curve plots)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from ..logging import METRICS_FILE, read_metrics
from .runner import read_done
from .spec import Job, Spec

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
    from ..plotting import plot_curves

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
