"""The default backend: one process, plain torch AdamW."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """Multiplier of the base LR at optimizer step s (0-based)."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@contextmanager
def config_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR):
    """Around loading a checkpoint's optimizer and schedule: keep the moments, the step count and
    the position in the schedule, but the hyperparameters this run was configured with (lr,
    betas, weight decay), so that ``posttrain train --force-resume`` with a changed
    ``trainer.lr`` trains with the new one. An unchanged config gives the same values bit for bit:
    the lr is recomputed exactly as the schedule computes it."""
    groups = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
    base_lrs = list(scheduler.base_lrs)
    yield
    for g, hyper, base in zip(optimizer.param_groups, groups, base_lrs):
        g.update(hyper, initial_lr=base)
    scheduler.base_lrs = base_lrs
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = lrs


class TorchBackend:
    def __init__(self, model, config, total_steps: int):
        self.model = model
        self.config = config
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, config.warmup_steps, total_steps, config.min_lr_ratio)
        )
        self.skipped_steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, bool]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        limit = self.config.skip_grad_norm_above
        skip = not math.isfinite(norm) or (limit is not None and norm > limit)
        if skip:  # a blown-up step does more harm than a lost one (HPT skips above 80)
            self.skipped_steps += 1
        else:
            self.optimizer.step()
        # The schedule advances either way, so LR stays a function of the step count.
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, skip

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        with config_hyperparameters(self.optimizer, self.scheduler):
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = state.get("skipped_steps", 0)
