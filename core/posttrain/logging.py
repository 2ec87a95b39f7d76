"""Run logging: metrics.jsonl (the record), a console line, wandb when enabled, progress bars."""

from __future__ import annotations

import json
import math
import uuid
import sys
from pathlib import Path
from typing import Any, Iterable

# Keys shown on the console line, in this order, when present.
_CONSOLE = [("reward/accuracy", "acc"), ("eval/accuracy", "eval"), ("loss/total", "loss"), ("train/entropy", "ent"),
            ("route/sft", "sft"), ("train/grad_norm", "gn"), ("train/lr", "lr"), ("time/step_s", "s")]


def _finite(v: Any) -> Any:
    # JSON has no NaN/inf: write null so every line parses with any JSON reader.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: Path, max_step: int) -> None:
    """Keep rows with step <= max_step, so a resumed run's file equals an uninterrupted one."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= max_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)


class RunLogger:
    def __init__(self, run_dir: str | Path, config: Any, resolved_config: dict, *, resume_step: int | None = None,
                 run_name: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run starts a fresh record
        self._file = open(self.path, "a")
        self._wandb = None
        if config.wandb != "disabled":
            import wandb  # only when asked for: it is slow to import

            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self._wandb = wandb.init(project=config.project, mode=config.wandb, dir=str(self.run_dir), id=run_id,
                                     resume="allow", config=resolved_config, name=run_name or self.run_dir.name)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _finite(float(v)) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        every = max(1, getattr(self.config, "console_every", 1))
        if step % every == 0 or any(k.startswith("eval/") for k in metrics):
            parts = [f"step {step}"] + [f"{short} {_fmt(metrics[k])}" for k, short in _CONSOLE if k in metrics]
            print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(v: float) -> str:
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
        return f"{v:.2e}"
    return f"{v:.4g}"


class _NoBar:
    def __init__(self, iterable: Iterable | None):
        self._it = iterable

    def __iter__(self):
        return iter(self._it if self._it is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", enabled: bool = True,
             leave: bool = False):
    """A tqdm bar on stderr, or a silent stand-in with the same iterate/update/close API."""
    if not enabled:
        return _NoBar(iterable)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, file=sys.stderr, dynamic_ncols=True)
