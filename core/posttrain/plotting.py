"""Training-curve plots, one PNG per panel, steps on the x axis.

* ``plot_runs(run_dirs, out)``: the curves of one or several run directories (``posttrain plot``,
  and the end of ``posttrain train``). A staged run is drawn stage after stage (stage k's steps
  offset by the steps of the stages before it), each stage in its algorithm's colour.
* ``plot_curves(curves, out)``: ``posttrain experiment``'s variants, the mean over seeds with the
  min–max band across seeds.

Every subplot has a y-axis label, integer step ticks and its own legend; an algorithm has the
same colour in every plot (``colour_for``); runs differ in line style and marker, and lines are
drawn slightly transparent, so curves that lie on top of each other stay visible.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Panel:
    file: str  # PNG name in the plots directory
    title: str
    metrics: tuple[str, ...]  # one subplot per metric key of metrics.jsonl; "loss/*": every key under loss/


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

# One run's panels (plot_runs): the above with the mean reward and every loss term.
RUN_PANELS = (
    Panel("reward.png", "Training reward", ("reward/mean", "reward/accuracy")),
    Panel("heldout_accuracy.png", "Held-out accuracy", ("eval/accuracy",)),
    Panel("loss.png", "Loss terms", ("loss/*",)),
    Panel("entropy.png", "Token entropy", ("train/entropy",)),
    Panel("response_length.png", "Response length (tokens)", ("rollout/response_length",)),
    Panel("routes.png", "Route fractions (prompts)", ("route/rl", "route/sft", "route/mix", "route/drop")),
    Panel("grad_norm.png", "Gradient norm (before clipping)", ("train/grad_norm",)),
)

YLABELS = {
    "reward/mean": "mean reward", "reward/accuracy": "fraction of rollouts correct",
    "eval/accuracy": "held-out accuracy", "train/entropy": "entropy (nats / token)",
    "rollout/response_length": "tokens / response", "train/offline_data_ratio": "demonstration rows / rows",
    "train/grad_norm": "gradient L2 norm", "loss/total": "loss (sum of terms)",
}

# Fixed colours for the first-party algorithms (tab10), so a figure's colours never depend on
# which runs it shows; any other name gets one from the remaining colours, by a stable hash.
_ALGO_COLOURS = {"grpo": "#1f77b4", "sft": "#ff7f0e", "hpt": "#2ca02c", "luffy": "#d62728", "srft": "#9467bd",
                 "dypo": "#8c564b", "gift": "#e377c2"}
_OTHER_COLOURS = ("#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def colour_for(name: str) -> str:
    """The colour of an algorithm (or experiment variant) name, the same in every plot."""
    key = name.lower()
    if key in _ALGO_COLOURS:
        return _ALGO_COLOURS[key]
    h = int(hashlib.sha256(key.encode()).hexdigest(), 16)
    return _OTHER_COLOURS[h % len(_OTHER_COLOURS)]


def ylabel_for(metric: str) -> str:
    if metric in YLABELS:
        return YLABELS[metric]
    group, _, leaf = metric.partition("/")
    if group == "loss":
        return f"loss term: {leaf}"
    if group == "route":
        return f"fraction of prompts routed {leaf}"
    return metric


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
        raise ImportError("plots need matplotlib: pip install 'posttrain[plot]'") from e
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


_FRACTIONS = ("eval/accuracy", "reward/accuracy", "train/offline_data_ratio", "route/")


def _style(ax, metric: str, title: str, xlabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel_for(metric))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if metric.startswith(_FRACTIONS):
        ax.set_ylim(-0.03, 1.03)  # a fraction on its whole scale: a flat 0 is not blown up to fill the axis
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def _axes(plt, n: int):
    """A figure with ``n`` subplots, at most two per row."""
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _expand(metrics: tuple[str, ...], present: set[str]) -> list[str]:
    """Panel metrics that have data; ``prefix/*`` becomes every present key under it (total first)."""
    out: list[str] = []
    for m in metrics:
        if m.endswith("/*"):
            under = sorted(k for k in present if k.startswith(m[:-1]))
            out += sorted(under, key=lambda k: not k.endswith("/total"))
        elif m in present:
            out.append(m)
    return out


def _save(fig, plt, path: Path, title: str, n_axes: int) -> Path:
    if n_axes > 1:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- posttrain experiment: variants, mean over seeds ---------------------------------------------


def plot_curves(curves: dict[str, list[dict[str, dict[int, float]]]], out_dir: str | Path, *,
                smooth: int = 1, panels: tuple[Panel, ...] = PANELS) -> list[Path]:
    """``curves``: variant → one {metric: {step: value}} per seed. Writes the panels that have
    data (evaluations are sparse, so eval/* keys are not smoothed) and returns their paths."""
    present_keys = {k for runs in curves.values() for run in runs for k in run}

    def draw(ax, metric: str) -> None:
        window = 1 if metric.startswith("eval/") else smooth
        for i, (variant, runs) in enumerate(curves.items()):
            series = [run[metric] for run in runs if metric in run and run[metric]]
            if not series:
                continue
            steps, mean, lo, hi = mean_curve(series)
            colour = colour_for(variant)
            ax.plot(steps, rolling_mean(mean, window), label=f"{variant} (n={len(series)})", color=colour,
                    linestyle=_LINESTYLES[i % len(_LINESTYLES)], marker=_MARKERS[i % len(_MARKERS)],
                    markevery=max(1, len(steps) // 12), ms=4, alpha=0.85)
            if len(series) > 1:
                ax.fill_between(steps, rolling_mean(lo, window), rolling_mean(hi, window), color=colour, alpha=0.15)

    return _write_panels(panels, present_keys, out_dir, "optimizer step", draw)


def _write_panels(panels: tuple[Panel, ...], present_keys: set[str], out_dir: str | Path, xlabel: str,
                  draw: Callable[[Any, str], None]) -> list[Path]:
    """One PNG per panel with data in ``present_keys``; ``draw(ax, metric)`` puts each axis's lines."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        present = _expand(panel.metrics, present_keys)
        if not present:
            continue
        fig, axes = _axes(plt, len(present))
        for ax, metric in zip(axes, present):
            draw(ax, metric)
            _style(ax, metric, metric if len(present) > 1 else panel.title, xlabel)
        written.append(_save(fig, plt, out / panel.file, panel.title, len(present)))
    return written


# --- posttrain plot / the end of posttrain train: run directories --------------------------------


@dataclass
class Segment:
    """One stage of one run: its curves on the run's step axis."""

    run: str  # the run's label (its directory name)
    algorithm: str
    series: dict[str, dict[int, float]]  # metric → {step (offset by earlier stages): value}
    style: int  # which run of the figure: its line style and marker
    start: int = 0  # the step the stage starts at (the steps of the stages before it)


def read_run(run_dir: str | Path, style: int = 0, label: str | None = None) -> list[Segment]:
    """A run directory's stages (``metrics.jsonl`` directly in it, or in its ``stage{i}-*/``)."""
    from omegaconf import OmegaConf

    from .logging import METRICS_FILE, read_metrics

    run_dir = Path(run_dir)
    stages = [run_dir] if (run_dir / METRICS_FILE).is_file() else sorted(
        (d for d in run_dir.glob("stage*-*") if (d / METRICS_FILE).is_file() and _stage_index(d) is not None),
        key=_stage_index)
    if not stages:
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (here or in stage*/ subdirectories): not a run directory")
    segments, offset = [], 0
    for d in stages:
        config = OmegaConf.load(d / "config.yaml") if (d / "config.yaml").is_file() else OmegaConf.create({})
        algorithm = str(OmegaConf.select(config, "algorithm.name", default=None) or d.name.split("-", 1)[-1])
        rows = read_metrics(d / METRICS_FILE)
        series: dict[str, dict[int, float]] = {}
        for row in rows:
            for k, v in row.items():
                if k != "step" and v is not None:
                    series.setdefault(k, {})[offset + int(row["step"])] = float(v)
        segments.append(Segment(label or run_dir.name, algorithm, series, style, start=offset))
        last = max((int(r["step"]) for r in rows), default=0)
        offset += int(OmegaConf.select(config, "trainer.steps", default=None) or last)
    return segments


def _stage_index(d: Path) -> int | None:
    """k of a ``stage{k}-{algorithm}`` directory (run.stage_dir names them so)."""
    k = d.name[len("stage"):].split("-", 1)[0]
    return int(k) if k.isdigit() else None


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, *, panels: tuple[Panel, ...] = RUN_PANELS) -> list[Path]:
    """One PNG per panel with data, every run (and every stage of it) a line; returns the paths."""
    dirs = [Path(d) for d in run_dirs]
    names = [d.name for d in dirs]
    labels = [str(d) if names.count(d.name) > 1 else d.name for d in dirs]  # runs named alike: their full path
    per_run = [read_run(d, style=i, label=labels[i]) for i, d in enumerate(dirs)]
    segments = [s for segs in per_run for s in segs]
    several_runs, staged = len(dirs) > 1, any(len(segs) > 1 for segs in per_run)
    # Route fractions that are 0 throughout (most algorithms never mix or drop) are left out.
    present_keys = {k for s in segments for k, v in s.series.items() if not k.startswith("route/") or any(v.values())}
    xlabel = "optimizer step (stages back to back)" if staged else "optimizer step"

    def draw(ax, metric: str) -> None:
        for s in segments:
            if s.series.get(metric):
                _draw(ax, s, metric, label=f"{s.run}: {s.algorithm}" if several_runs else s.algorithm)
        for start in sorted({s.start for s in segments if s.start > 0}):
            ax.axvline(start, color="grey", linestyle=":", linewidth=1)  # where a stage begins

    return _write_panels(panels, present_keys, out_dir, xlabel, draw)


def _draw(ax, s: Segment, metric: str, label: str) -> None:
    points = sorted(s.series[metric].items())
    steps, values = [p[0] for p in points], [p[1] for p in points]
    colour, style = colour_for(s.algorithm), dict(linestyle=_LINESTYLES[s.style % len(_LINESTYLES)],
                                                  marker=_MARKERS[s.style % len(_MARKERS)])
    if len(points) > 60:  # a long noisy curve: the raw values faint, a rolling mean on top
        ax.plot(steps, values, color=colour, alpha=0.2, linewidth=0.8)
        values = rolling_mean(values, max(2, len(points) // 30))
        label += " (rolling mean)"
    ax.plot(steps, values, color=colour, label=label, alpha=0.85, ms=4, markevery=max(1, len(points) // 12), **style)
