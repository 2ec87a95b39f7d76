"""Every rank makes the same forward and backward calls, in the same order.

Under ZeRO-3 each forward (and backward) of a module all-gathers its partitioned weights: a
collective every rank must join. Ranks hold different shares of a step (an algorithm may drop
all of one rank's prompts; responses differ in length, so micro-batch counts differ), so a rank
with less work makes calls that compute a zero the way real rows are computed. With one process
(or ZeRO-1/2) these paths are never taken or cost one tiny forward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..batching import build_train_batch, trim_padding
from ..types import Example, PromptGroup, Route, Trajectory, TrainBatch
from .forward import policy_outputs


def idle_batch(pad_id: int, device: Any) -> TrainBatch:
    """One row: one pad token predicting one pad token (an SFT row, so every head is used)."""
    demo = Trajectory(response_ids=[pad_id], text="", off_policy=True, teacher=0, finished=True)
    group = PromptGroup(example=Example(prompt="", answer=""), prompt_ids=[pad_id], demonstrations=[demo])
    return build_train_batch([group], [Route(rl=0.0, sft=1.0, demos=(0,), members=())], pad_id).to(device)


def idle_forward(model: Any, pad_id: int, device: Any, *, chunk: int, reference: Any = None) -> torch.Tensor:
    """A zero through decoder, reference decoder (full-vocabulary losses) and LM head."""
    full_vocab = (lambda logits, ref_logp, labels: logits.float().sum(-1) * 0.0) if reference is not None else None
    out = policy_outputs(model, idle_batch(pad_id, device), temperature=1.0, chunk=chunk,
                         distribution_loss=full_vocab, reference=reference)
    extra = out.distribution_loss.sum() if out.distribution_loss is not None else 0.0
    return (out.logprobs.sum() + extra) * 0.0


def padded(rows: list, n: int) -> list:
    """``rows`` repeated from its first entry up to ``n`` (a repeated row writes the same values again)."""
    return rows + [rows[0]] * (n - len(rows)) if rows else rows


def zero_loss(mb: TrainBatch | None, rows: list, totals: Any, device: Any,
              micro_loss: Callable[[TrainBatch], torch.Tensor], idle: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A zero loss through the whole model: real rows' graph times 0 when this rank has rows."""
    if mb is None or not rows:
        return idle()
    micro = trim_padding(mb.select(rows[0])).with_(totals=totals).to(device)
    return micro_loss(micro) * 0.0
