"""What a checkpoint holds beyond the weights, and how a stage resumes from it.

``trainer_state.pt`` (rank 0): step, backend (optimizer, schedule), data samplers, and every
stateful plugin's ``state_dict()``. Under a distributed backend each rank also writes
``run_dir/zero_shards/step-N/``: its optimizer partition, its RNG stream and its plugins' state
(each rank samples and sees its own share of the prompts). Resume restores all of it, so the
resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import distributed as dist_utils
from .lora import for_checkpoint
from .plugins import load_plugin_state, plugin_state

SHARDS_DIR = "zero_shards"  # run_dir/zero_shards/step-NNNNNN: per-rank optimizer, RNG and plugin state


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _plugin_file(rank: int) -> str:
    return f"plugins-rank{rank}.pt"


def restore(engine: Any, resume_from: Path) -> int:
    """Load a checkpoint's trainer, sampler, RNG and plugin state into ``engine``; returns its step."""
    state, rng = ckpt.load_checkpoint_state(resume_from)
    engine.backend.load_state_dict(state["backend"])
    shards = engine.run_dir / SHARDS_DIR / resume_from.name
    if hasattr(engine.backend, "load_shards") and shards.is_dir():
        engine.backend.load_shards(shards)  # ZeRO: the optimizer moments each rank holds
    engine.sampler.load_state_dict(state["sampler"])
    if engine.offline_sampler is not None and "offline_sampler" in state:
        engine.offline_sampler.load_state_dict(state["offline_sampler"])
    own_rng = shards / _rng_file(dist_utils.rank())
    ckpt.set_rng_state(ckpt.safe_load(own_rng) if own_rng.is_file() else rng)
    own_plugins = shards / _plugin_file(dist_utils.rank())
    load_plugin_state(engine.pm, ckpt.safe_load(own_plugins) if own_plugins.is_file() else state.get("plugins", {}))
    if getattr(engine, "async_rollouts", None) is not None and "async" in state:
        engine.async_rollouts.load_state_dict(state["async"])  # rollouts sampled ahead, the worker's RNG
    return state["step"]


def save(engine: Any) -> Path:
    """Rank 0 writes the checkpoint; under ZeRO-3 every rank first helps gather the weights."""
    backend, step = engine.backend, engine.step
    consolidated = getattr(backend, "consolidated_model", None)
    model = consolidated() if consolidated is not None else backend.model  # collective under ZeRO-3
    path = engine.run_dir / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(step)
    if hasattr(backend, "save_shards"):  # before COMPLETE is written: a complete step has its shards
        shards = engine.run_dir / SHARDS_DIR / path.name
        backend.save_shards(shards)
        torch.save(ckpt.rng_state(), shards / _rng_file(dist_utils.rank()))
        torch.save(plugin_state(engine.pm), shards / _plugin_file(dist_utils.rank()))
        dist_utils.barrier()
    if dist_utils.is_main():
        state = {"step": step, "backend": backend.state_dict(), "sampler": engine.sampler.state_dict(),
                 "plugins": plugin_state(engine.pm)}
        if engine.offline_sampler is not None:
            state["offline_sampler"] = engine.offline_sampler.state_dict()
        if getattr(engine, "async_rollouts", None) is not None:
            state["async"] = engine.async_rollouts.state_dict()
        path = ckpt.save_checkpoint(engine.run_dir, step, model=for_checkpoint(model, engine.tokenizer, engine.cfg.model.lora),
                                    tokenizer=engine.tokenizer,
                                    trainer_state=state, keep_last=engine.cfg.keep_checkpoints)
        for d in (engine.run_dir / SHARDS_DIR).glob("step-*"):  # shards of pruned checkpoints go too
            if not (path.parent / d.name).exists():
                shutil.rmtree(d, ignore_errors=True)
    dist_utils.barrier()  # nobody reads the checkpoint before it is complete
    return path
