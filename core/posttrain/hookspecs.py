"""The hook contract: every way an algorithm plugin can change a training step.

One step runs, top to bottom (``engine.py``)::

    plan_step → draw prompts (+ data.offline) → add_groups
      → rollout_requests → rollout → compose_group → verify → select_groups
        (select_groups may ask for more prompts: draw → … → verify → select_groups again)
      → on_rollout_end → route_group → [build batch] → compute_advantage
      → for each mini-batch: (minibatch_statistics) → each micro-batch:
            forward (chunked) → reference_denominator → shape_ratio → stabilization_mask
            → build_loss → backward
        → optimizer step → on_step_end

The same ``PromptGroup`` objects flow through every per-group hook of a step (a hook may mutate
them or return new ones; the engine carries on with what it returns).

This is the Unified Policy Gradient Estimator of the HPT paper cut into parts:

    grad = 1_stable · (1/π_ref) · Â · ∇π_θ        (LUFFY: · f'(π_θ/π_ref), the shaping)
           └ stabilization_mask  └ reference_denominator  └ compute_advantage
                                   shape_ratio = f      build_loss puts them together

Defaults (GRPO and SFT behaviour) live in ``posttrain.algorithms.defaults`` as an ordinary plugin whose
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

Plugins are modules of hook functions, or **classes** whose instance holds the algorithm's
state. The engine creates ``Class(config)`` once per stage from the validated algorithm config
(``algorithm_config`` must then be a ``@staticmethod``: it runs before the instance exists).
An instance with ``state_dict() -> dict`` and ``load_state_dict(dict)`` has that state saved in
every checkpoint and restored by ``resume: auto``, so a resumed run continues exactly. The state
may hold tensors, numbers, strings, bools, None, and lists / tuples / dicts of those (checkpoints
are loaded with ``torch.load(weights_only=True)``: nothing else is unpickled). Under several
processes each rank saves and restores its own instance's state.

Rollout engines (``register_rollout_engines``) implement ``posttrain.rollout.RolloutEngine``:
``generate(prompts: list[list[int]], params: SamplingParams, *, progress) -> list[list[Trajectory]]``
returns ``params.n`` trajectories per prompt (``response_ids`` with EOS when emitted,
``sampling_logprobs`` [T], ``finished``), sampled from softmax(logits / temperature) with
top-p; ``sync_weights(model)`` makes the next ``generate`` use the trainer's weights. Forced
prefixes (``RolloutRequest.prefix``) need nothing from an engine: ``rollout.generate_requests``
appends the prefix to the prompt, asks for the continuation and puts the prefix back in front.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy
from torch import Tensor

from .metrics import Metrics
from .types import GroupSelection, LossTerm, ModelOutputs, Needs, PromptGroup, RolloutRequest, Route, StepPlan, TrainBatch

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


# --- planning a step -----------------------------------------------------------------------------


@hookspec(firstresult=True)
def plan_step(config: Any, step: int, metrics: Metrics) -> StepPlan | None:
    """Return a ``StepPlan`` for the step that starts now: sample rollouts or not, how many
    prompts to draw (``None``: ``trainer.prompts_per_step``; 0: none).

    ReLIFT-style methods plan an SFT-only step on a buffer with
    ``StepPlan(rollouts=False, prompts=0)`` (no generation at all) and return the buffered
    groups from ``add_groups``. ``Needs`` stays the stage's default; the plan overrides it for
    one step (``rollouts=True`` cannot turn on rollouts for an offline algorithm).

    Stops at the first non-None result; the default (None) draws ``trainer.prompts_per_step``
    prompts and samples rollouts when ``Needs.rollouts``.
    """


@hookspec
def add_groups(config: Any, step: int, metrics: Metrics, make_group: Callable[..., PromptGroup]) -> list[PromptGroup] | None:
    """Return groups to train on this step that were not drawn from ``data.train``.

    ``make_group(example: posttrain.Example, source: str = "buffer") -> PromptGroup``
    tokenizes a prompt and its demonstrations the way drawn prompts are. A replay or
    hard-prompt buffer returns its groups here; set ``group.source`` to say where they come
    from. Groups without members get rollouts only if ``rollout_requests`` asks for them (the
    default samples ``source == "train"`` groups only); groups with members are not sampled
    again, and members with a reward are not verified again. Groups from ``data.offline`` (a
    second data source with its own ``data.offline_per_step``) are added by the engine, with
    ``source = "offline"``.

    A broadcast hook: the groups of every implementation are appended, in plugin order.
    Under several processes it runs on every rank; return this rank's share.
    """


@hookspec(firstresult=True)
def rollout_requests(groups: list[PromptGroup], requests: list[RolloutRequest], config: Any, step: int,
                     metrics: Metrics) -> list[RolloutRequest] | None:
    """Return one ``RolloutRequest`` per group (same order): samples, forced prefix, tag.

    ``requests`` are the engine's defaults: ``rollout.n`` samples without prefix for groups
    drawn this step (``source == "train"``) on a rollout step, 0 for the rest. Prefix-guided
    methods (UFT, Prefix-RFT, QuestA) return ``RolloutRequest(n, prefix=demo_ids[:k])``: the
    trajectory then holds prefix + continuation, ``Trajectory.prefix_len = k``, and the prefix
    tokens are off-policy in ``TrainBatch.off_policy_mask`` (left out of clipping and
    ``rollout.is_cap``; the continuation trains on-policy). A prefix should not include the EOS
    token unless nothing is to be sampled after it.

    Stops at the first non-None result; the default keeps ``requests``.
    """


@hookspec(firstresult=True)
def select_groups(groups: list[PromptGroup], target: int, config: Any, step: int, metrics: Metrics) -> GroupSelection | None:
    """Return a ``GroupSelection``: the verified groups to keep and how many more prompts to draw.

    Called after verification with every group of the step so far (kept groups first, then
    the newly sampled ones). ``target`` is the number of prompts this process trains on per
    step (``trainer.prompts_per_step`` / processes). Returning ``more > 0`` makes the engine
    draw, roll out, compose and verify ``more`` prompts in the same step and call this hook
    again, up to ``trainer.max_sampling_rounds`` rounds in all. DAPO's dynamic sampling keeps
    groups whose rewards differ, asks for more until it has ``target`` of them, and keeps the
    first ``target``. Under several processes all ranks draw ``max`` over ranks of ``more``.

    Stops at the first non-None result; the default keeps every group and asks for nothing.
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


@hookspec
def minibatch_statistics(batch: TrainBatch, outputs: ModelOutputs, config: Any, step: int) -> dict[str, tuple[Tensor, Tensor]] | None:
    """Return partial sums ``{name: (sum, count)}`` of a statistic of the current policy.

    Only called when ``requirements`` sets ``minibatch_stats``. Before the loss of each
    mini-batch, the engine runs the policy without gradient over all of its micro-batches (and
    all ranks), calls this hook on each with ``outputs.logprobs`` [N, L] and
    ``outputs.entropy`` [N, L] (entropy of π_θ's distribution, from the logits), adds the sums
    and counts up, and hands ``sum / count`` to every micro-batch's loss hooks as
    ``batch.stats[name]``. So a statistic of the whole mini-batch (SRFT's H(π_θ)) does not
    depend on how the mini-batch is split. A statistic with count 0 is NaN.

    A broadcast hook: the dicts of every implementation are merged.
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
    reference. Its term names are stable: ``pg`` (policy gradient, present when the
    mini-batch has RL rows), ``sft`` (rows with ``sft_weight``), ``entropy`` (when
    ``entropy_coef > 0``), ``kl`` (when ``kl_coef > 0`` and RL rows); each is logged as
    ``loss/<name>``. A wrapper adding a term picks a new name.
    """


# --- lifecycle ---------------------------------------------------------------------------------


@hookspec
def on_train_start(config: Any, run_dir: str) -> None:
    """Called once before the first step of a stage (also after a resume).

    ``config`` is the whole resolved run config as a plain ``dict`` (``config["trainer"]["lr"]``);
    ``run_dir`` is the stage's run directory as a ``str``. Algorithm settings reach the other
    hooks as the validated dataclass instead.
    """


@hookspec
def on_rollout_end(groups: list[PromptGroup], step: int, metrics: Metrics) -> None:
    """Called after verification and ``select_groups``, before routing, with the step's groups
    (``list[PromptGroup]``, every member verified: ``reward`` set)."""


@hookspec
def on_step_end(step: int, metrics: dict[str, float]) -> None:
    """Called after each rollout step with the optimizer step count reached (``int``) and the
    step's reduced metrics (``dict[str, float]``, a copy: changing it changes nothing)."""


@hookspec
def on_train_end(run_dir: str) -> None:
    """Called once after the last step of a stage (also when training stops on an error)."""
