"""Rank / world helpers for runs launched by ``torchrun`` or the ``deepspeed`` launcher.

Both launchers start one process per GPU and describe it in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). A plain ``posttrain train``
has none of these and is rank 0 of a world of 1: every helper here is then a no-op, so the
single-process path never touches ``torch.distributed``.

How a step is split (see ``Engine.train_step``): every rank draws the same prompts (the data
sampler is seeded with ``trainer.seed``, not the rank), keeps ``prompts[rank::world]``, samples,
verifies and builds rows for its share, and normalises its loss terms by the mini-batch totals
summed over all ranks. The ranks' losses then add up to the single-process loss of the whole
mini-batch, and their gradients, summed, to its gradient.
"""

from __future__ import annotations

import atexit
import os
import random
from dataclasses import fields, replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes of this run on this host (torchrun: LOCAL_WORLD_SIZE, deepspeed launcher: LOCAL_SIZE);
    ``trainer.threads: auto`` shares the cores among them."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)


def is_main() -> bool:
    """Rank 0: the one process that writes logs, wandb, progress bars and checkpoints."""
    return rank() == 0


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` (appended by the ``deepspeed`` launcher) and
    export it as ``LOCAL_RANK``, so the command line parser only sees our own arguments."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ["LOCAL_RANK"] = a.split("=", 1)[1]
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ["LOCAL_RANK"] = argv[i + 1]
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def init(device: torch.device, timeout_s: float = 1800) -> None:
    """Join the process group the launcher describes (nccl on GPU, gloo on CPU); idempotent.

    Does nothing for a world of 1, so a single-process run needs no MASTER_ADDR/PORT.
    """
    if world_size() <= 1 or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                           "start the run with torchrun or the deepspeed launcher")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    atexit.register(teardown)  # after the last stage of the run, not between stages


_failed = False


def mark_failed() -> None:
    """This rank is leaving with an error: skip the exit barrier (the other ranks would never
    reach it, and the launcher must see this rank die to stop them)."""
    global _failed
    _failed = True


def teardown() -> None:
    """Leave the process group. The barrier first: without it one rank may tear down gloo while
    the other is still in its last collective, which aborts that rank at exit (about 1 run in 8)."""
    if dist.is_available() and dist.is_initialized() and not _failed:
        dist.barrier()
        dist.destroy_process_group()


def device_for_rank(name: str) -> torch.device:
    """``trainer.device`` resolved for this process: GPU ``LOCAL_RANK`` when CUDA is used."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", local_rank())
    return dev


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch with ``seed + rank``: ranks sample different rollouts for
    their prompts, and a rerun of the same world reproduces every rank's stream."""
    s = seed + rank()
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def barrier() -> None:
    if world_size() > 1 and dist.is_initialized():
        dist.barrier()


def max_int(value: int) -> int:
    """The largest ``value`` over all ranks (e.g. micro-batch counts, so collectives line up)."""
    if world_size() <= 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def sum_dataclass(obj: Any) -> Any:
    """A dataclass of numbers with its fields summed over ranks (``Totals``), except fields whose
    metadata says ``ranks="same"``: constants every rank holds (``max_len``), checked equal."""
    if world_size() <= 1 or not dist.is_initialized():
        return obj
    names = [f.name for f in fields(obj)]
    sums = torch.tensor([float(getattr(obj, n)) for n in names], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(sums)
    out = dict(zip(names, sums.tolist()))
    same = [f.name for f in fields(obj) if f.metadata.get("ranks") == "same"]
    if same:
        lo = torch.tensor([float(getattr(obj, n)) for n in same], dtype=torch.float64, device=_comm_device())
        hi = lo.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        for n, a, b in zip(same, lo.tolist(), hi.tolist()):
            if a != b:
                raise RuntimeError(f"{type(obj).__name__}.{n} must be the same on every rank, got {a} … {b}")
            out[n] = a
    return replace(obj, **{n: type(getattr(obj, n))(v) for n, v in out.items()})


def sum_dict(values: dict[str, list[float]]) -> dict[str, list[float]]:
    """Element-wise sums of named lists of numbers over ranks (names may differ between ranks)."""
    if world_size() == 1:
        return values
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, values)
    out: dict[str, list[float]] = {}
    for d in gathered:
        for k, v in d.items():
            out[k] = [a + b for a, b in zip(out[k], v)] if k in out else list(v)
    return out


def check_world(config: Any, world: int) -> None:
    """Several processes split each step's prompts evenly; only a distributed backend can run them."""
    if world <= 1:
        return
    from .config import ConfigError

    t = config.trainer
    problems = []
    if t.backend == "torch":
        problems.append(f"trainer.backend: torch runs one process, but WORLD_SIZE={world}; use trainer.backend=deepspeed")
    if t.prompts_per_step % world:
        problems.append(f"trainer.prompts_per_step ({t.prompts_per_step}) must be a multiple of the {world} processes")
    if t.prompts_per_minibatch is not None and t.prompts_per_minibatch % world:
        problems.append(f"trainer.prompts_per_minibatch ({t.prompts_per_minibatch}) must be a multiple of the {world} processes")
    if problems:
        raise ConfigError(problems)


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share of an evaluation set: ``items[rank::world]``, padded with copies of the
    last item to ``ceil(len / world)``. Every rank then makes the same number of generate calls,
    which ZeRO-3 needs (each forward gathers parameters from all ranks). ``unshard`` drops the pads."""
    mine = list(items[rank::world])
    need = -(-len(items) // world)
    return mine + list(items[-1:]) * (need - len(mine))


def unshard(parts: list[list], total: int) -> list:
    """The inverse of ``shard`` over all ranks' results: item ``i`` is ``parts[i % world][i // world]``."""
    return [parts[i % len(parts)][i // len(parts)] for i in range(total)]


def map_sharded(fn: Any, items: list) -> list:
    """``fn(items)`` with the work split over the ranks: each rank runs ``fn`` on its shard and
    every rank gets all results, in ``items``' order (``fn`` returns one picklable result per item)."""
    if world_size() <= 1 or not dist.is_initialized() or not items:
        return fn(items)
    mine = fn(shard(items, rank(), world_size()))
    parts: list[list] = [None] * world_size()  # type: ignore[list-item]
    dist.all_gather_object(parts, mine)
    return unshard(parts, len(items))


# Metric names whose per-rank values add up to the global one; every other metric is averaged.
_SUM_PREFIXES = ("loss/", "perf/")
_SUM_KEYS = {"train/rows", "train/tokens", "verify/timeouts", "verify/errors"}
_MAX_PREFIXES = ("time/", "mem/")


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One step's metrics over all ranks.

    Loss terms are normalised by global totals, so the ranks' parts add up (sum); throughput and
    counts add up; times and peak memory are the worst rank's; rates and means are averaged (every rank holds
    the same number of prompts, so that is the global mean up to group-size differences).
    A metric only some ranks logged is reduced over those ranks.
    """
    if world_size() <= 1 or not dist.is_initialized():
        return metrics
    gathered: list[dict[str, float]] = [None] * world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, metrics)
    out = {}
    for key in sorted({k for d in gathered for k in d}):
        vals = [d[key] for d in gathered if key in d]
        if key.startswith(_SUM_PREFIXES) or key in _SUM_KEYS:
            out[key] = float(sum(vals))
        elif key.startswith(_MAX_PREFIXES):
            out[key] = float(max(vals))
        else:
            out[key] = float(sum(vals) / len(vals))
    return out


def _comm_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
