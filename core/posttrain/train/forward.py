"""Forward passes that never build the [N, L, V] log-softmax of a whole batch.

The decoder runs once; the LM head, log-softmax, entropy and any full-vocabulary loss run on
chunks of positions (``functional.chunked_token_stats``), checkpointed so backward recomputes a
chunk's logits instead of keeping them all (when they would be large: ``CHECKPOINT_ABOVE_BYTES``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import functional as F
from ..batching import trim_padding
from ..types import ModelOutputs, TrainBatch

# Models whose logits are not a plain linear map of the last hidden state.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")

# Chunks are checkpointed (backward computes their logits again) only when the float32 logits of
# the whole micro-batch would take more than this: a real vocabulary (150k) passes it from ~110
# tokens, and a micro-batch of 16k tokens would keep 10 GB of them; below it the recomputation
# costs time for nothing (at a 100-token vocabulary, 1.2 of a GRPO micro-batch's 23 ms on a CPU).
CHECKPOINT_ABOVE_BYTES = 64 * 2**20


def _split_head(model) -> bool:
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, a, None) not in (None, 1.0) for a in _LOGIT_TRANSFORMS):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def response_hidden(model, batch: TrainBatch) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Hidden states at the positions that predict each response token, and the head.

    Returns ([N, L, H], head) where head maps [n, c, H] → [n, c, V] logits.
    """
    P, L = batch.prompt_len, batch.response_ids.shape[1]
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    if _split_head(model):
        h = model.get_decoder()(**kw, use_cache=False).last_hidden_state
        return h[:, P - 1:P - 1 + L], model.get_output_embeddings()
    # Fallback for models with logit post-processing: full logits, used as "hidden" with an identity head.
    logits = model(**kw, use_cache=False).logits
    return logits[:, P - 1:P - 1 + L], (lambda x: x)


def policy_outputs(
    model,
    batch: TrainBatch,
    *,
    temperature: float,
    chunk: int,
    entropy: bool = False,
    entropy_stat: bool = False,
    distribution_loss: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    reference=None,
) -> ModelOutputs:
    """Log-probs (+ entropy, + a full-vocabulary per-token loss against ``reference``).

    ``entropy``: the token entropy with gradient (``Needs.entropy``). ``entropy_stat`` without
    ``entropy``: the entropy as a metric only, detached, computed once per chunk under no_grad
    after everything else, so backward neither differentiates nor recomputes it (checkpoint
    recomputation stops at the last saved tensor). Either fills ``ModelOutputs.entropy``.
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    hidden, head = response_hidden(model, batch)
    labels = batch.response_ids
    extra = None
    if distribution_loss is not None:
        with torch.no_grad():
            ref_hidden, ref_head = response_hidden(reference, batch.to(next(reference.parameters()).device))
        ref_hidden = ref_hidden.to(device)

        def extra(logits: Tensor, sl: slice) -> Tensor:  # [n, c, V] → [n, c]
            with torch.no_grad():
                ref_logp = torch.log_softmax(ref_head(ref_hidden[:, sl]).float() / temperature, dim=-1)
            return distribution_loss(logits, ref_logp, labels[:, sl])

    stat = entropy_stat and not entropy
    if stat:
        extra = _with_entropy_stat(extra)
    logprobs, ent, dist = _stats_in_one_head_call(
        head, hidden, labels, temperature=temperature, chunk_size=chunk, entropy=entropy, extra=extra
    )
    if stat:
        dist, ent = (None, dist) if distribution_loss is None else dist.unbind(-1)
        ent = ent.detach()  # a slice of the stack with the loss would carry its grad_fn
    return ModelOutputs(logprobs=logprobs, entropy=ent, distribution_loss=dist)


def _with_entropy_stat(extra: Callable[[Tensor, slice], Tensor] | None) -> Callable[[Tensor, slice], Tensor]:
    """``extra`` that also returns the detached entropy: [n, c] alone, or [n, c, 2] after ``extra``'s."""

    def both(logits: Tensor, sl: slice) -> Tensor:
        loss = extra(logits, sl) if extra is not None else None  # first: recomputation stops before the metric
        with torch.no_grad():
            ent = F.entropy_from_logits(logits)
        return ent if loss is None else torch.stack([loss, ent], dim=-1)

    return both


def _stats_in_one_head_call(head, hidden: Tensor, labels: Tensor, **kw):
    """``F.chunked_token_stats`` with the LM head module called once, not once per chunk.

    Under ZeRO-3 every call of a module all-gathers its partitioned weight: a collective all
    ranks must join, while the number of chunks depends on this rank's response lengths. So the
    module is called once (its hooks gather the weight for the call and again for its backward,
    where the checkpointed chunks are recomputed) and the chunks use the gathered weight directly.
    """
    if not isinstance(head, torch.nn.Linear):
        return F.chunked_token_stats(hidden, head, labels, **kw)
    kw["checkpoint"] = labels.numel() * head.out_features * 4 > CHECKPOINT_ABOVE_BYTES

    def stats(h: Tensor, y: Tensor):
        return F.chunked_token_stats(h, lambda x: torch.nn.functional.linear(x, head.weight, head.bias), y, **kw)

    own = head.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hooks) to restore
    head.forward = stats
    try:
        return head(hidden, labels)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


@torch.no_grad()
def logprobs_in_micro_batches(model, batch: TrainBatch, rows: list[Tensor], *, temperature: float, chunk: int) -> Tensor:
    """[N, L] log-probs of a whole batch without gradient (π_old, π_ref), micro-batch by micro-batch."""
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
    for r in rows:
        lp = policy_outputs(model, trim_padding(batch.select(r)), temperature=temperature, chunk=chunk).logprobs
        out[r, :lp.shape[1]] = lp.float().cpu()
    return out

