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


def problem_values(run_dir: Path, ks: list[int]) -> dict[str, dict[str, float]]:
    """pass@k → {problem uid: that problem's pass@k}, from the final evaluation's generations
    (``run_dir/final_eval/generations/*/*.jsonl``; correct = reward > 0.5, as in training)."""
    from ..eval.metrics import pass_at_k

    out: dict[str, dict[str, float]] = {f"pass@{k}": {} for k in ks}
    for f in sorted((Path(run_dir) / "final_eval" / "generations").glob("*/*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            n, c = len(rec["samples"]), sum(s["reward"] > 0.5 for s in rec["samples"])
            for k in ks:
                if k <= n:
                    out[f"pass@{k}"][rec["uid"]] = pass_at_k(n, c, k)
    return {k: v for k, v in out.items() if v}


def standard_error(per_seed: list[dict[str, float]], seed_means: list[float], diff_from: Optional[list[dict[str, float]]] = None) -> dict:
    """The standard error of a variant's mean over seeds (or, with ``diff_from``, of its paired
    difference from another variant evaluated on the same problems): the problems' part,
    stdev over problems of the seed-averaged per-problem value / sqrt(N), and the seeds' part,
    sample variance over seeds / S, added in quadrature (each variant's seed part when paired)."""
    uids = sorted(set.intersection(*(set(v) for v in per_seed + (diff_from or []))))
    avg = [statistics.fmean(v[u] for v in per_seed) for u in uids]
    seed_var = statistics.variance(seed_means) / len(seed_means) if len(seed_means) > 1 else 0.0
    if diff_from is not None:
        other = [statistics.fmean(v[u] for v in diff_from) for u in uids]
        avg = [a - b for a, b in zip(avg, other)]
    problems = statistics.stdev(avg) / math.sqrt(len(avg)) if len(avg) > 1 else 0.0
    return {"se": math.sqrt(problems ** 2 + seed_var), "se_problems": problems, "problems": len(uids), "mean": statistics.fmean(avg) if avg else None}


def binomial_se(p: float, n: int) -> float:
    """sqrt(p(1 − p)/n): the standard error of an accuracy p measured on n problems."""
    return math.sqrt(p * (1 - p) / n)


def compare(a: dict, b: dict, key: str, per_problem: dict[str, list[dict[str, float]]]) -> Optional[dict]:
    """Paired difference a − b of metric ``key`` on the same held-out problems, its standard
    error (``standard_error``: problems' and both variants' seed parts) and the verdict of the
    pre-registered rule: ">" if Δ > 2 SE, "<" if Δ < −2 SE, else "≈"."""
    pa, pb = per_problem.get(a["variant"], {}).get(key), per_problem.get(b["variant"], {}).get(key)
    if not pa or not pb:  # no per-problem values: unpaired, from each side's standard error
        if a.get(key, {}).get("mean") is None or b.get(key, {}).get("mean") is None or f"se/{key}" not in a or f"se/{key}" not in b:
            return None
        delta, total = a[key]["mean"] - b[key]["mean"], math.sqrt(a[f"se/{key}"] ** 2 + b[f"se/{key}"] ** 2)
        verdict = ">" if delta > 2 * total else "<" if delta < -2 * total else "≈"
        return {"a": a["variant"], "b": b["variant"], "metric": key, "delta": delta, "se": total,
                "z": delta / total if total else None, "verdict": verdict, "problems": None, "paired": False}
    se = standard_error(pa, [x for x in a[key]["values"] if x is not None], diff_from=pb)
    vb = [x for x in b[key]["values"] if x is not None]
    seed_b = statistics.variance(vb) / len(vb) if len(vb) > 1 else 0.0
    total = math.sqrt(se["se"] ** 2 + seed_b)
    delta = se["mean"]
    verdict = ">" if delta > 2 * total else "<" if delta < -2 * total else "≈"
    return {"a": a["variant"], "b": b["variant"], "metric": key, "delta": delta, "se": total, "z": delta / total if total else None,
            "verdict": verdict, "problems": se["problems"], "paired": True}


def summarize(spec: Spec, jobs: list[Job]) -> dict:
    """The results payload: one row per variant, statistics over its seeds' finished runs."""
    variants: dict[str, list[Job]] = {}
    for j in jobs:
        variants.setdefault(j.variant, []).append(j)
    rows, missing = [], []
    per_problem: dict[str, dict[str, list[dict[str, float]]]] = {}
    base = _base_row(spec, jobs, per_problem)
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
            rec["_problems"] = problem_values(j.run_dir, list((spec.final_eval or {}).get("k", [])))
            for name, sm in spec.summaries.items():
                rec[name] = reduce_metric(s.get(sm["metric"], {}), sm.get("reduce", "last"), sm.get("from"), sm.get("to"))
            per_seed.append(rec)
        keys = ["initial_accuracy", "final_accuracy"]
        keys += sorted({k for r in per_seed for k in r if k.startswith("eval/pass@")}, key=lambda k: int(k.split("@")[1]))
        keys += sorted({k for r in per_seed for k in r if k.startswith("pass@")}, key=lambda k: int(k.split("@")[1]))
        keys += list(spec.summaries)
        per_problem[variant] = {k: [r["_problems"][k] for r in per_seed if k in r["_problems"]]
                                for k in keys if k.startswith("pass@")}
        for r in per_seed:
            del r["_problems"]
        row = {"variant": variant, "entry": vjobs[0].entry, "algorithms": vjobs[0].stage_names, "stage_steps": vjobs[0].stage_steps,
               "seeds": [r["seed"] for r in per_seed], "runs": len(per_seed), "of": len(vjobs)}
        row.update({k: mean_std([r.get(k) for r in per_seed]) for k in keys})
        if spec.target_accuracy is not None:
            hits = [r["steps_to_target"] for r in per_seed]
            row["steps_to_target"] = {**mean_std(hits), "reached": sum(h is not None for h in hits)}
        row["per_seed"] = per_seed
        _add_se(row, per_problem[variant], _eval_size(vjobs[0]))
        rows.append(row)
    comparisons = []
    by_name = {r["variant"]: r for r in rows + ([base] if base else [])}
    for a, b in spec.comparisons:
        for key in [k for k in (by_name.get(a) or {}) if k.startswith(("pass@", "eval/pass@")) or k == "final_accuracy"]:
            if a in by_name and b in by_name and key in by_name[b]:
                c = compare(by_name[a], by_name[b], key, per_problem)
                if c is not None:
                    comparisons.append(c)
    return {"spec": str(spec.path), "name": spec.name, "out": str(spec.out), "steps": spec.steps,
            "target_accuracy": spec.target_accuracy, "summaries": spec.summaries, "final_eval": spec.final_eval,
            "pass_at_k": "unbiased 1 - C(n-c,k)/C(n,k) (posttrain.eval.pass_at_k) over final_eval.n samples per problem",
            "std": "sample standard deviation over seeds (n - 1)",
            "se": "standard error of the mean over seeds: sqrt(problems' part^2 + seed variance / seeds); pass@k's problems' part is "
                  "the stdev over held-out problems of the seed-averaged per-problem value / sqrt(N), greedy accuracy's is sqrt(p(1-p)/N)",
            "base": base, "rows": rows, "comparisons": comparisons, "missing": missing}


def _add_se(row: dict, per_problem: dict[str, list[dict[str, float]]], eval_size: Optional[int] = None) -> None:
    """row["se/<key>"] for every pass@k with per-problem values; for the final accuracy and the
    evaluation's eval/pass@k, binomial on as many problems as the final evaluation had (else
    ``eval_size``, the held-out split's), with the seeds' part. An accuracy averaged over n
    samples per problem varies less than a Bernoulli, so the binomial part is an upper bound."""
    n_problems = eval_size
    for key, per_seed in per_problem.items():
        if per_seed:
            se = standard_error(per_seed, [x for x in row[key]["values"] if x is not None])
            row[f"se/{key}"], n_problems = se["se"], se["problems"]
    for key in ["final_accuracy"] + [k for k in row if k.startswith("eval/pass@")]:
        acc = row.get(key) or {}
        if n_problems and acc.get("mean") is not None:
            xs = [x for x in acc["values"] if x is not None]
            seed_var = statistics.variance(xs) / len(xs) if len(xs) > 1 else 0.0
            row[f"se/{key}"] = math.sqrt(binomial_se(acc["mean"], n_problems) ** 2 + seed_var)


def _eval_size(job: Job) -> Optional[int]:
    """How many held-out problems the run's evaluation scores: the rows of its data.eval file,
    capped by eval.max_prompts (None for a named source)."""
    cfg = (job.config.get("stages") or [job.config])[-1]
    source = (cfg.get("data") or job.config.get("data") or {}).get("eval")
    if not source or not Path(source).is_file():
        return None
    n = sum(1 for line in Path(source).read_text().splitlines() if line.strip())
    cap = (cfg.get("eval") or job.config.get("eval") or {}).get("max_prompts")
    return min(n, cap) if cap else n


def _base_row_from_starts(b: Job, jobs: list[Job]) -> Optional[dict]:
    """Without a final evaluation, the base row is the runs' step-0 evaluation (the base model on
    the held-out split, sampled with each seed's evaluation RNG): one value per seed."""
    starts: dict[int, dict[str, float]] = {}
    for j in jobs:
        if read_done(j.run_dir) is None or j.seed in starts:
            continue
        s = run_series(j)
        acc = s.get("eval/accuracy", {})
        if acc:
            starts[j.seed] = {k: v[min(v)] for k, v in s.items() if k.startswith("eval/") and min(v) == min(acc)}
    if not starts:
        return None
    seeds = sorted(starts)
    row = {"variant": "base", "entry": "base", "algorithms": b.stage_names, "stage_steps": b.stage_steps, "seeds": seeds,
           "runs": len(seeds), "of": len(seeds), "per_seed": []}
    row["initial_accuracy"] = row["final_accuracy"] = mean_std([starts[s]["eval/accuracy"] for s in seeds])
    for key in sorted({k for v in starts.values() for k in v if k.startswith("eval/pass@") and k != "eval/pass@1"}):
        row[key] = mean_std([starts[s].get(key) for s in seeds])
    _add_se(row, {}, _eval_size(next(j for j in jobs if j.seed in starts)))
    return row


def _base_row(spec: Spec, jobs: list[Job], per_problem: dict) -> Optional[dict]:
    """The base model as a row (one run): its final evaluation (``OUT/base/final_eval``) and, as
    greedy accuracy, the runs' step-0 evaluation on the same held-out split."""
    from .spec import base_job

    b = base_job(spec)
    if b is None:
        return None
    if not (b.run_dir / "final_eval" / "results.json").exists():
        return _base_row_from_starts(b, jobs)
    row = {"variant": "base", "entry": "base", "algorithms": b.stage_names, "stage_steps": b.stage_steps, "seeds": [b.seed],
           "runs": 1, "of": 1}
    starts = [run_series(j).get("eval/accuracy", {}) for j in jobs if read_done(j.run_dir) is not None]
    starts = [acc[min(acc)] for acc in starts if acc]
    row["initial_accuracy"] = row["final_accuracy"] = mean_std([starts[0]] if starts else [])
    row.update({k: mean_std([v]) for k, v in final_pass_at_k(b).items()})
    per_problem["base"] = {k: [v] for k, v in problem_values(b.run_dir, list((spec.final_eval or {}).get("k", []))).items()}
    row["per_seed"] = []
    _add_se(row, per_problem["base"])
    return row


def _pm(stat: dict, scale: float = 1.0, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _general(stat: dict) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    return f"{stat['mean']:.4g} ± {stat['std']:.3g}"


def _cell(r: dict, key: str) -> str:
    """mean ± std over seeds, then [SE] where the row has one; percent."""
    text = _pm(r.get(key, {}), 100.0)
    se = r.get(f"se/{key}")
    return text if se is None or text == "—" else f"{text} [{se * 100:.1f}]"


def markdown(payload: dict) -> str:
    rows = ([payload["base"]] if payload.get("base") else []) + payload["rows"]
    percent: list[str] = []
    for r in rows:
        percent += [k for k in r if (k in ("initial_accuracy", "final_accuracy") or "pass@" in k) and not k.startswith("se/")
                    and k not in percent]
    summaries = list(payload["summaries"])
    head = ["variant", "seeds"] + [{"initial_accuracy": "start acc %", "final_accuracy": "final acc %"}.get(k, k.replace("eval/", "eval ") + " %")
                                   for k in percent]
    if payload["target_accuracy"] is not None:
        head.append(f"steps to {payload['target_accuracy']:.0%} (reached)")
    head += summaries
    lines = [f"# {payload['name']}: results", "",
             f"Mean ± sample std over seeds, [standard error] where known. Accuracy: `eval/accuracy` on the held-out split at the "
             f"first (start) and last (final) evaluation of each run; pass@k: {payload['pass_at_k']}. SE: {payload.get('se', '—')}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['runs']}/{r['of']}"] + [_cell(r, k) for k in percent]
        if payload["target_accuracy"] is not None:
            st = r.get("steps_to_target")
            cells.append("—" if st is None else f"{_pm(st, 1.0, 0)} ({st['reached']}/{r['runs']})" if st["reached"] else f"— (0/{r['runs']})")
        cells += [_general(r.get(k, {})) for k in summaries]
        lines.append("| " + " | ".join(cells) + " |")
    if payload.get("comparisons"):
        lines += ["", "Comparisons on the same held-out problems (Δ = a − b in points; paired per problem where per-problem values "
                  "exist, else unpaired from each side's SE; verdict: > if Δ > 2 SE, < if Δ < −2 SE, else ≈):",
                  "", "| a | b | metric | Δ | SE | Δ/SE | paired | verdict |", "|---|---|---|---|---|---|---|---|"]
        for c in payload["comparisons"]:
            z = "—" if c["z"] is None else f"{c['z']:+.1f}"
            lines.append(f"| {c['a']} | {c['b']} | {c['metric']} | {c['delta'] * 100:+.1f} | {c['se'] * 100:.1f} | {z} | "
                         f"{'yes' if c.get('paired') else 'no'} | {c['verdict']} |")
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
