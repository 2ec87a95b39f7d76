"""Run logging: ``metrics.jsonl`` (the record), a console line, wandb / TensorBoard when enabled,
progress bars.

``metrics.jsonl`` is the source of truth: one JSON object per logged step, ``{"step": N, ...}``.
It is strict JSON (any reader parses it), so non-finite values — which JSON cannot express —
are written as ``null`` and read back as ``None``; wandb still receives the original NaN/inf.

Progress: when the run's total steps are known, each console line reads
``[stage] step 12/60 | reward … | loss … | eval … | 1.9 s | 0:23 elapsed, ETA 1:32`` (plain text
on stdout, so a log file holds no escape codes). On a terminal (stderr is a TTY) a stage bar with
the same numbers stays at the top and the rollout / train / eval bars run beneath it; elsewhere
no bar is drawn at all.
"""

from __future__ import annotations

import json
import math
import secrets
import string
import sys
from contextlib import contextmanager
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    from .config import LoggingConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
TENSORBOARD_DIR = "tensorboard"

# Keys shown on the console line, in this order, when present: (metric key, short label).
_CONSOLE_KEYS = [
    ("reward/mean", "reward"), ("reward/accuracy", "acc"), ("eval/accuracy", "eval"), ("loss/total", "loss"),
    ("train/entropy", "ent"), ("route/sft", "sft"), ("train/grad_norm", "gn"), ("train/lr", "lr"),
]
_CONSOLE_TIME_KEY = "time/step_s"  # shown last, as "1.9 s"


# --- metrics.jsonl -----------------------------------------------------------------------------


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl``; non-finite values come back as ``None``.

    A torn final line (the writer was killed mid-write, or is writing right now) is skipped;
    a bad line anywhere else is real corruption and raises.
    """
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


def truncate_metrics(path: str | Path, max_step: int) -> None:
    """Keep only rows with ``step <= max_step``, so a resumed run's file equals an uninterrupted one's."""
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r["step"] <= max_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(_dumps(r) + "\n" for r in keep))
    tmp.replace(path)  # atomic: a crash here leaves either the old or the new file, never half of one


def _dumps(row: dict) -> str:
    # allow_nan=False: fail loudly rather than emit the non-standard NaN token if a caller bypasses _json_value.
    return json.dumps(row, allow_nan=False)


def _as_float(key: str, value: Any) -> float:
    if value is None:  # "no value this step" (e.g. an empty group): same as NaN
        return math.nan
    try:
        return float(value)  # also accepts ints, bools, numpy scalars and 0-dim tensors
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}") from e


def _json_value(v: float) -> float | None:
    return v if math.isfinite(v) else None


# --- console line ------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    """Compact number: 0.41, 0.0123, 1.0e-06, 1234."""
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a < 1e-3 or a >= 1e6:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def console_line(step: int, metrics: dict[str, float], *, total: int | None = None, stage: str = "",
                 elapsed: float | None = None, eta: float | None = None) -> str:
    """``step 12 | reward 0.41 | acc 0.38 | loss 0.0123 | gn 0.71 | lr 1.0e-06 | 1.9 s``; with
    ``total``, ``stage``, ``elapsed`` and ``eta`` (seconds) it becomes the progress line
    ``[stage] step 12/60 | … | 1.9 s | 0:23 elapsed, ETA 1:32``."""
    head = f"step {step}/{total}" if total is not None else f"step {step}"
    parts = [f"[{stage}] {head}" if stage else head]
    parts += [f"{label} {_fmt(float(metrics[k]))}" for k, label in _CONSOLE_KEYS if k in metrics]
    if _CONSOLE_TIME_KEY in metrics:
        s = float(metrics[_CONSOLE_TIME_KEY])
        parts.append(f"{s:.1f} s" if s >= 1 else f"{s:.2f} s")
    if elapsed is not None:
        parts.append(f"{_clock(elapsed)} elapsed" + (f", ETA {_clock(eta)}" if eta is not None else ""))
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    """``0:07``, ``3:25``, ``1:02:09``."""
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def on_terminal() -> bool:
    """Bars only where a person watches them: on a file they leave carriage returns and escape codes."""
    return sys.stderr.isatty()


class _StageProgress:
    """Step/total, elapsed and ETA of one stage, and the latest reward, loss and held-out accuracy."""

    def __init__(self, total: int, start: int, stage: str, bar: bool):
        self.total, self.start, self.stage = total, start, stage
        self.t0 = monotonic()
        self.rate_from: tuple[float, int] | None = None  # (time, step) of the first row: the ETA's rate starts there
        self.last_eval: float | None = None
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, position=0, leave=True, file=sys.stderr,
                            dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} [{elapsed}<{remaining}{postfix}]")

    def line(self, step: int, values: dict[str, float]) -> str:
        if values.get("eval/accuracy") is not None and math.isfinite(values["eval/accuracy"]):
            self.last_eval = values["eval/accuracy"]
        shown = dict(values)
        if self.last_eval is not None:  # the latest held-out accuracy on every line, not only on eval rows
            shown.setdefault("eval/accuracy", self.last_eval)
        now = monotonic()
        if self.rate_from is None:  # model loading and the evaluation before training are not per-step costs
            self.rate_from = (now, step)
        t_from, s_from = self.rate_from
        eta = (now - t_from) / (step - s_from) * max(0, self.total - step) if step > s_from else None
        elapsed = now - self.t0
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            short = console_line(step, {k: v for k, v in shown.items() if k in _BAR_KEYS})
            self.bar.set_postfix_str(short.partition(" | ")[2])
        return console_line(step, shown, total=self.total, stage=self.stage, elapsed=elapsed, eta=eta)

    def write(self, text: str) -> None:
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stdout)  # above the bars, which are redrawn beneath
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_BAR_KEYS = ("reward/mean", "loss/total", "eval/accuracy")


# --- the logger --------------------------------------------------------------------------------


class RunLogger:
    """Writes every logged step to ``run_dir/metrics.jsonl``, optionally to wandb, and a console line.

    ``resume_step=None`` starts a fresh record (an existing ``metrics.jsonl`` from an earlier
    attempt is discarded, so steps never appear twice) and a fresh wandb run. ``resume_step=k``
    keeps rows up to step ``k`` — the steps the resumed checkpoint already contains — and
    continues the wandb run whose id is stored in ``run_dir/wandb_id.txt``.
    """

    def __init__(self, run_dir: str | Path, config: LoggingConfig, resolved_config: dict, *,
                 resume_step: int | None = None, run_name: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.path = self.run_dir / METRICS_FILE
        self._console_every = max(1, int(config.console_every))
        self._tensorboard: Any = None
        if getattr(config, "tensorboard", False):
            self._tensorboard = _start_tensorboard(self.run_dir / TENSORBOARD_DIR, resume_step)
        self._wandb: Any = None
        if config.wandb != "disabled":
            self._wandb = self._start_wandb(resolved_config, resumed=resume_step is not None, run_name=run_name)
        total = (resolved_config.get("trainer") or {}).get("steps") if isinstance(resolved_config, dict) else None
        self._progress = None
        if isinstance(total, int):  # a training run (not a bare record): progress lines, and a bar on a terminal
            self._progress = _StageProgress(total, resume_step or 0, run_name or self.run_dir.name,
                                            bar=bool(config.progress) and on_terminal())
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")

    def _start_wandb(self, resolved_config: dict, *, resumed: bool, run_name: str | None) -> Any:
        import wandb  # imported only when asked for: the import alone takes ~0.5 s

        id_file = self.run_dir / WANDB_ID_FILE
        if resumed and id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = _new_wandb_id()
            id_file.write_text(run_id + "\n")
        # Caveat: wandb drops steps at or below the last one it already has, so rows logged after the
        # checkpoint but before the crash keep their first values in wandb; metrics.jsonl is exact.
        return wandb.init(project=self.config.project, mode=self.config.wandb, dir=str(self.run_dir), id=run_id,
                          resume="allow", config=resolved_config, name=run_name or self.run_dir.name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"step": step, **metrics}``; eval rows are always echoed to the console."""
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number; rename the metric")
        values = {k: _as_float(k, v) for k, v in metrics.items()}
        row = {"step": int(step), **{k: _json_value(v) for k, v in values.items()}}
        self._file.write(_dumps(row) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        if self._wandb is not None:
            self._wandb.log(values, step=int(step))
        if self._tensorboard is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tensorboard.add_scalar(k, v, int(step))
        show = step % self._console_every == 0 or any(k.startswith("eval/") for k in metrics)
        if self._progress is None:
            if show:
                print(console_line(step, values), flush=True)
            return
        line = self._progress.line(int(step), values)  # also moves the bar
        if show:
            self._progress.write(line)

    def close(self, exit_code: int | None = None) -> None:
        """Close the file and finish the wandb run (``exit_code != 0`` marks it failed). Idempotent."""
        if self._progress is not None:
            self._progress.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if not self._file.closed:
            self._file.close()
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            run.finish(exit_code=exit_code)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        self.close(exit_code=1 if exc_type is not None else None)


def _start_tensorboard(log_dir: Path, resume_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        from .config import ConfigError

        raise ConfigError([f"logging.tensorboard: needs the tensorboard package ({e}): pip install 'posttrain[tensorboard]'"]) from None
    # purge_step: a resumed run drops the events logged after its checkpoint, as metrics.jsonl does.
    return SummaryWriter(log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1)


def _new_wandb_id() -> str:
    # wandb's own generator is private API that moves between versions; its ids are 8 chars of [a-z0-9].
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


# --- progress bars -----------------------------------------------------------------------------


@contextmanager
def hf_bars(enabled: bool) -> Iterator[None]:
    """transformers' own bars ("Loading weights", "Writing model shards") on or off inside the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", enabled: bool = True,
             leave: bool = False) -> Any:
    """A tqdm bar on stderr (metrics lines go to stdout, so ``> log.txt`` keeps just those).

    ``enabled=False`` returns tqdm's disabled bar: it iterates the iterable untouched and its
    ``update()`` / ``close()`` / ``set_postfix()`` do nothing — the same API by construction.
    """
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, file=sys.stderr, dynamic_ncols=True,
                disable=not enabled)


class NullLogger:
    """What ranks other than 0 log to."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self, exit_code: int | None = None) -> None:
        pass
