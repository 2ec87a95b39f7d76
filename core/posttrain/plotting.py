"""Training-curve plots for ``posttrain experiment``: one PNG per panel, one line per variant
(the mean over its seeds, with the min–max band across seeds), steps on the x axis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Panel:
    file: str  # PNG name in the plots directory
    title: str
    metrics: tuple[str, ...]  # one subplot per metric key of metrics.jsonl


# What the papers' claims are read from: reward and held-out accuracy (all), entropy (SRFT),
# response length, the offline-data ratio and the route fractions (HPT Fig. 8), gradient norm (DYPO §4.5).
PANELS = (
    Panel("reward.png", "Training reward (on-policy accuracy)", ("reward/accuracy",)),
    Panel("heldout_accuracy.png", "Held-out accuracy", ("eval/accuracy",)),
    Panel("entropy.png", "Token entropy", ("train/entropy",)),
    Panel("response_length.png", "Response length (tokens)", ("rollout/response_length",)),
    Panel("offline_ratio.png", "Offline-data ratio (demonstration rows / rows)", ("train/offline_data_ratio",)),
    Panel("routes.png", "Route fractions (prompts)", ("route/sft", "route/rl", "route/drop")),
    Panel("grad_norm.png", "Gradient norm (before clipping)", ("train/grad_norm",)),
)


def mean_curve(runs: list[dict[int, float]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over the runs that have a value at each step."""
    steps = sorted({s for r in runs for s in r})
    vals = [[r[s] for r in runs if s in r] for s in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def rolling_mean(xs: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points (the first points average what exists)."""
    out, total = [], 0.0
    for i, x in enumerate(xs):
        total += x
        if i >= window:
            total -= xs[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("posttrain experiment plots need matplotlib: pip install 'posttrain[plot]'") from e
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[dict[str, dict[int, float]]]], out_dir: str | Path, *,
                smooth: int = 1, panels: tuple[Panel, ...] = PANELS) -> list[Path]:
    """``curves``: variant → one {metric: {step: value}} per seed. Writes the panels that have
    data (evaluations are sparse, so eval/* keys are not smoothed) and returns their paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        present = [m for m in panel.metrics if any(m in run for runs in curves.values() for run in runs)]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 4), squeeze=False)
        for ax, metric in zip(axes[0], present):
            window = 1 if metric.startswith("eval/") else smooth
            for variant, runs in curves.items():
                series = [run[metric] for run in runs if metric in run and run[metric]]
                if not series:
                    continue
                steps, mean, lo, hi = mean_curve(series)
                label = f"{variant} (n={len(series)})"
                (line,) = ax.plot(steps, rolling_mean(mean, window), label=label, marker="o" if len(steps) <= 12 else None, ms=3)
                if len(series) > 1:
                    ax.fill_between(steps, rolling_mean(lo, window), rolling_mean(hi, window), color=line.get_color(), alpha=0.15)
            ax.set_title(metric if len(present) > 1 else panel.title)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best")
        if len(present) > 1:
            fig.suptitle(panel.title)
        fig.tight_layout()
        path = out / panel.file
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

