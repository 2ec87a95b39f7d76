"""Reports: ``results.json``, ``results.md`` (models × benchmarks, like the papers' tables) and
``pass_at_k.png`` (one panel per benchmark, one curve per model) when several k were asked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def markdown_table(results: dict[str, dict[str, dict[str, float]]], headlines: dict[str, str]) -> str:
    """Rows: models; columns: benchmarks (their headline metric, in %), then the average."""
    benches = list(headlines)
    head = ["Model"] + [f"{b} ({headlines[b]})" for b in benches] + (["Avg."] if len(benches) > 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for model, per_bench in results.items():
        vals = [per_bench.get(b, {}).get(headlines[b]) for b in benches]
        cells = [_pct(v) for v in vals]
        if len(benches) > 1:
            have = [v for v in vals if v is not None]
            cells.append(_pct(sum(have) / len(have)) if len(have) == len(vals) else "–")
        lines.append("| " + " | ".join([model] + cells) + " |")
    return "\n".join(lines) + "\n"


def detail_table(bench: str, ks: list[int], results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One benchmark: pass@k / avg@k / maj@k for every k, per model, in %."""
    cols = [f"{m}@{k}" for m in ("pass", "avg", "maj") for k in ks]
    lines = [f"### {bench}", "", "| Model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for model, per_bench in results.items():
        r = per_bench.get(bench, {})
        lines.append("| " + " | ".join([model] + [_pct(r.get(c)) for c in cols]) + " |")
    return "\n".join(lines) + "\n"


def plot_pass_at_k(results: dict[str, dict[str, dict[str, float]]], ks: dict[str, list[int]], path: Path) -> Path:
    """pass@k against k (log2 axis), one panel per benchmark with more than one k."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    benches = [b for b, k in ks.items() if len(k) > 1]
    fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 3.6), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for model, per_bench in results.items():
            if bench in per_bench:
                ax.plot(ks[bench], [100 * per_bench[bench][f"pass@{k}"] for k in ks[bench]], marker="o", label=model)
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))  # an all-zero curve sits on the axis, not mid-plot
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks[bench], [str(k) for k in ks[bench]])
        ax.set_title(bench)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reports(out_dir: Path, payload: dict[str, Any]) -> dict[str, Path]:
    """``payload``: {"models": [...], "benchmarks": {name: spec dict}, "results": {model: {bench: metrics}}}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results, specs = payload["results"], payload["benchmarks"]
    headlines = {b: s["headline"] or f"avg@{s['n']}" for b, s in specs.items()}  # BenchmarkSpec.headline_metric
    ks = {b: list(s["k"]) for b, s in specs.items()}
    written = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    written["json"].write_text(json.dumps(payload, indent=2) + "\n")
    md = ["# Evaluation results", "", "Accuracy in %; the headline metric of each benchmark is in its column.", "",
          markdown_table(results, headlines)]
    md += [detail_table(b, ks[b], results) for b in specs]
    written["markdown"].write_text("\n".join(md))
    if any(len(k) > 1 for k in ks.values()):
        written["plot"] = plot_pass_at_k(results, ks, out_dir / "pass_at_k.png")
    return written
