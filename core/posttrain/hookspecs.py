"""The hook contract: every way an algorithm plugin can change a training step.

One step runs, top to bottom (``engine.py``)::

    rollout → compose_group → verify → route_group → [build batch] → compute_advantage
      → for each mini-batch, each micro-batch:
            forward (chunked) → reference_denominator → shape_ratio → stabilization_mask
            → build_loss → backward
        → optimizer step → on_step_end

This is the Unified Policy Gradient Estimator of the HPT paper cut into parts:

    grad = 1_stable · (1/π_ref) · Â · ∇π_θ        (LUFFY: · f'(π_θ/π_ref), the shaping)
           └ stabilization_mask  └ reference_denominator  └ compute_advantage
                                   shape_ratio = f      build_loss puts them together

Defaults (GRPO and SFT behaviour) live in ``posttrain.defaults`` as an ordinary plugin whose
implementations are all ``trylast``: a plugin overrides a ``firstresult`` hook by returning a
value, and falls through to the default by returning ``None``.

Hooks are called with keyword arguments only. An implementation may accept any subset of a
hook's arguments; arguments may be added in later versions, never renamed.

Shapes: N rows (one prompt + one response each), L padded response width, G members of a
group, V vocabulary size. ``config`` is the algorithm's config dataclass (``algorithm:``
section of the YAML, validated against ``algorithm_config()``). ``step`` counts optimizer
steps of the run from 0. ``metrics`` is a ``posttrain.metrics.Metrics``: call
``metrics.log(name, value)`` to add a number to the step's metrics (``reduce=`` sum / max /
min / last instead of the mean; ``weight=`` for a weighted mean, e.g. a token count).
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy
from torch import Tensor

from .metrics import Metrics
from .types import LossTerm, ModelOutputs, Needs, PromptGroup, Route, TrainBatch

hookspec = pluggy.HookspecMarker("posttrain")


# --- setup -------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def algorithm_config() -> type:
    """Return the dataclass type that validates the ``algorithm:`` section of the config.

    Subclass ``posttrain.GRPOConfig`` to keep the fields the default hooks read (clip range,
    loss aggregation, entropy and KL coefficients); every field should carry help text in
    ``field(metadata={"help": ...})`` naming its meaning and the paper's default.

    Stops at the first non-None result; the default returns ``GRPOConfig``.
    """


@hookspec(firstresult=True)
def requirements(config: Any) -> Needs | None:
    """Return what the engine must compute for this algorithm, as a ``Needs``.

    ``Needs(rollouts=False)`` makes every step offline (groups hold only demonstrations);
    ``reference=True`` loads a frozen copy of the initial model and fills
    ``TrainBatch.ref_logprobs`` [N, L]; ``entropy=True`` fills ``ModelOutputs.entropy`` [N, L];
    ``reference_vocab=True`` makes the engine call ``token_distribution_loss`` on chunks of
    positions with the reference model's full-vocabulary log-probs; ``whole_groups=True``
    keeps a prompt's rows in one micro-batch (for losses over pairs of group members).

    Stops at the first non-None result; the default asks for rollouts, plus the reference when
    ``config.kl_coef > 0`` and entropy when ``config.entropy_coef > 0``.
    """


@hookspec
def register_verifiers(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register verifier factories: ``register("math", factory)``.

    ``factory(config: VerifierConfig) -> Verifier``; a Verifier has
    ``verify(items: list[tuple[str, str]]) -> list[VerifyResult]`` for (response text, gold
    answer) pairs and ``close()``. Selected by ``verifier.name`` in the config. Defaults: math,
    exact, choice.
    """


@hookspec
def register_rollout_engines(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register rollout engine factories: ``register("hf", factory)``.

    ``factory(model, tokenizer, config: RolloutConfig) -> RolloutEngine``; see
    ``posttrain.rollout.RolloutEngine``. Selected by ``rollout.engine``. Default: hf.
    """


@hookspec
def register_trainer_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register trainer backend factories: ``register("torch", factory)``.

    ``factory(model, config: TrainerConfig, total_steps: int) -> TrainerBackend``; see
    ``posttrain.train.TrainerBackend``. Selected by ``trainer.backend``. Default: torch.
    """


# --- per prompt group --------------------------------------------------------------------------


@hookspec(firstresult=True)
def compose_group(group: PromptGroup, config: Any, step: int, metrics: Metrics) -> PromptGroup | None:
    """Return the group RL trains on, built from the rollouts of one prompt.

    Called after rollout, before verification, once per prompt. ``group.members`` [G] are the
    on-policy rollouts (empty on offline steps); ``group.demonstrations`` are the prompt's
    demonstrations, tokenized, with ``off_policy=True``. LUFFY and SRFT append a demonstration
    to ``members`` here, so it is verified and normalised together with the rollouts.

    Stops at the first non-None result; the default returns the group unchanged.
    """


@hookspec(firstresult=True)
def route_group(group: PromptGroup, config: Any, step: int, metrics: Metrics) -> Route | None:
    """Return a ``Route``: how this verified group enters the loss.

    Called after verification (every member has a ``reward``), before advantages. This is the
    gate between reward and advantage: HPT sends a prompt with ``group.num_correct() <= γ`` to
    SFT (``Route(rl=0, sft=1, members=())``), DYPO drops all-correct groups
    (``Route(drop=True)``) and picks one teacher with ``Route(demos=(k,))``.

    Stops at the first non-None result; the default is ``Route(rl=1)`` with rollouts and
    ``Route(rl=0, sft=1, demos=(0,))`` on offline steps.
    """


# --- per batch ---------------------------------------------------------------------------------


@hookspec(firstresult=True)
def compute_advantage(batch: TrainBatch, config: Any, step: int, metrics: Metrics) -> Tensor | None:
    """Return advantages, [N] (one per row) or [N, L] (per token), for the whole step batch.

    Called once per step after routing. Rows sharing ``batch.group_index`` are one group;
    ``batch.rewards`` [N], ``batch.off_policy`` [N] and ``batch.rl_weight`` [N] are set, and
    ``batch.ref_logprobs`` / ``batch.old_logprobs`` when the step computes them (KL in the reward).
    Rows with ``rl_weight == 0`` (SFT-only demonstrations) are ignored by the default.

    Stops at the first non-None result; the default is the group-normalised reward
    (``functional.group_advantages`` with ``config.norm_adv_by_std``).
    """


@hookspec(firstresult=True)
def reference_denominator(batch: TrainBatch, logprobs: Tensor, config: Any, step: int) -> Tensor | None:
    """Return log π_ref [N, L], the denominator of the importance ratio ρ = π_θ / π_ref.

    Called per micro-batch with the current log-probs ``logprobs`` [N, L] (with gradient; use
    ``logprobs.detach()`` for a REINFORCE-style ratio of 1). LUFFY returns 0 on off-policy
    tokens (π_ref ≡ 1, so ρ = π_θ there).

    Stops at the first non-None result; the default is ``batch.old_logprobs`` (the policy
    before this step's updates, recomputed by the trainer).
    """


@hookspec(firstresult=True)
def shape_ratio(batch: TrainBatch, ratio: Tensor, config: Any, step: int) -> Tensor | None:
    """Return f(ρ) [N, L], the shaped ratio the policy gradient multiplies by Â.

    ``ratio`` [N, L] is exp(logprobs − reference_denominator), with gradient. LUFFY returns
    ρ/(ρ + γ) on off-policy tokens (policy shaping, the f'_shape of HPT's Table 1).

    Stops at the first non-None result; the default is the identity.
    """


@hookspec
def stabilization_mask(
    batch: TrainBatch, logprobs: Tensor, ratio: Tensor, advantages: Tensor, config: Any, step: int
) -> Tensor | None:
    """Return a bool mask [N, L] of tokens whose policy gradient is kept (1_stable).

    Called per micro-batch with ``ratio`` [N, L] (shaped) and ``advantages`` broadcast to
    [N, L]. All non-None results are AND-ed together (a broadcast hook: extensions can add
    their own, e.g. drop tokens with π_θ > 0.99). Masked-out tokens still count in the loss
    normaliser, as in PPO.

    The default returns PPO's clip region (``functional.ppo_clip_mask`` with
    ``config.clip_low``/``clip_high``/``clip_dual``) on on-policy tokens, or None when
    ``config.clip_low`` is None (no clipping, as HPT and LUFFY run).
    """


@hookspec(firstresult=True)
def token_distribution_loss(
    logits: Tensor, reference_logprobs: Tensor, labels: Tensor, config: Any, step: int, metrics: Metrics
) -> Tensor | None:
    """Return a per-token loss [n, c] from full-vocabulary distributions of a chunk.

    Only called when ``requirements`` sets ``reference_vocab``. The engine calls it on chunks
    of c positions so the [N, L, V] tensors of a batch never exist at once: ``logits``
    [n, c, V] are the policy's (temperature applied, with gradient), ``reference_logprobs``
    [n, c, V] the frozen reference's log-softmax (no gradient), ``labels`` [n, c] the response
    tokens. The result lands in ``ModelOutputs.distribution_loss`` [N, L] for ``build_loss``
    (GIFT's soft-target cross-entropy lives here). Chunks are recomputed in backward, so a
    number logged to ``metrics`` here should be a mean (logged twice, averaged once).

    Stops at the first non-None result; there is no default.
    """


@hookspec(firstresult=True)
def build_loss(
    batch: TrainBatch,
    outputs: ModelOutputs,
    advantages: Tensor,
    ratio: Tensor,
    mask: Tensor,
    config: Any,
    step: int,
    metrics: Metrics,
) -> list[LossTerm] | None:
    """Return the loss of a micro-batch as named ``LossTerm``\\ s; the engine sums them.

    ``outputs.logprobs`` [N, L] (and ``entropy``, ``distribution_loss`` when asked for),
    ``advantages`` [N, L], ``ratio`` [N, L] (shaped), ``mask`` [N, L] bool (stabilisation AND
    response mask). Normalise with ``batch.totals`` (mini-batch totals), never with counts of
    this micro-batch, so micro-batching does not change the update.

    Stops at the first non-None result; a ``wrapper=True`` implementation may add terms to the
    result. The default is −Σ mask·Â·f(ρ)·rl_weight aggregated by ``config.loss_agg``, plus
    ``config.sft_coef`` × token-mean NLL on rows with ``sft_weight``, minus
    ``config.entropy_coef`` × token-mean entropy, plus ``config.kl_coef`` × KL to the
    reference.
    """


# --- lifecycle ---------------------------------------------------------------------------------


@hookspec
def on_train_start(config: Any, run_dir: str) -> None:
    """Called once before the first step of a stage; ``config`` is the resolved run config."""


@hookspec
def on_rollout_end(groups: list[PromptGroup], step: int, metrics: Metrics) -> None:
    """Called after verification and before routing, with every group of the step."""


@hookspec
def on_step_end(step: int, metrics: dict[str, float]) -> None:
    """Called after each optimizer step with the step's reduced metrics (read-only)."""


@hookspec
def on_train_end(run_dir: str) -> None:
    """Called once after the last step of a stage (also when training stops on an error)."""
