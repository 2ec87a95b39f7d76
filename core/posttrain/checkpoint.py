"""Checkpoints: HF-format weights + trainer state, written atomically (temp dir, then rename)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

_HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(ckpt_dir: str | Path) -> int:
    return int(Path(ckpt_dir).name.split("-")[1])


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _clean_stale(root: Path) -> None:
    for d in root.glob(".tmp-*"):  # left by a save that crashed half-way
        shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, *, model: Any, tokenizer: Any, trainer_state: dict,
                    keep_last: int | None = None) -> Path:
    """Write ``checkpoints/step-NNNNNN``; a crash at any point leaves the previous one intact."""
    root = _ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    tmp.mkdir()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    _fsync_dir(tmp)
    (tmp / "COMPLETE").write_text(str(step))
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f".tmp-old-{step:06d}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    if keep_last is not None:
        done = sorted((d for d in root.glob("step-*") if (d / "COMPLETE").exists()), key=checkpoint_step)
        for d in done[:-keep_last]:
            shutil.rmtree(d, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = _ckpt_root(run_dir)
    if not root.exists():
        return None
    done = [d for d in root.glob("step-*") if (d / "COMPLETE").exists()]
    return max(done, key=checkpoint_step) if done else None


def load_checkpoint_state(ckpt_dir: str | Path) -> tuple[dict, dict]:
    ckpt_dir = Path(ckpt_dir)
    # weights_only=False: the state holds optimizer dicts and numpy RNG tuples we wrote ourselves.
    return (torch.load(ckpt_dir / "trainer_state.pt", weights_only=False),
            torch.load(ckpt_dir / "rng.pt", weights_only=False))


def export_hf(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy just the HF files (weights, config, tokenizer): loadable by ``from_pretrained``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(ckpt_dir).iterdir():
        if f.name in _HF_FILES or f.name.startswith("model-") and f.suffix == ".safetensors":
            shutil.copy2(f, out / f.name)
    return out
