"""Data that flows through one training step.

Shapes use N = rows in a (mini/micro-)batch, L = padded response width, P = padded prompt
width, G = members of one prompt group, V = vocabulary size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Example:
    """One prompt from a data file."""

    prompt: str  # the problem text, before any template
    answer: str  # gold answer handed to the verifier
    demonstrations: list[str] = field(default_factory=list)  # one per teacher; may be empty
    uid: str = ""  # stable id, e.g. "train.jsonl:17"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trajectory:
    """One response to a prompt: sampled from the policy, or a demonstration."""

    response_ids: list[int]  # [T] response tokens, EOS included when the response ended
    text: str = ""
    off_policy: bool = False  # True for demonstrations: not sampled from π_θ
    sampling_logprobs: list[float] | None = None  # [T] log-probs the rollout engine (a demonstration: its teacher, if known) sampled with
    reward: float | None = None  # set by the verifier
    finished: bool = True  # ended with EOS (False: cut at max_new_tokens)
    teacher: int | None = None  # index into Example.demonstrations, for demonstrations
    verify_status: str = "ok"  # ok | timeout | error | skipped
    prefix_len: int = 0  # leading response tokens forced from a RolloutRequest's prefix (off-policy)
    tag: str = ""  # the RolloutRequest's tag
    policy_version: int | None = None  # async rollouts: the optimizer step whose weights sampled it (None: synchronous, the current policy)

    @property
    def correct(self) -> bool:
        return bool(self.reward is not None and self.reward > 0.5)


@dataclass
class PromptGroup:
    """A prompt and its responses. Advantages are normalised within a group."""

    example: Example
    prompt_ids: list[int]  # [P_i] the templated prompt, unpadded
    members: list[Trajectory] = field(default_factory=list)  # [G] what RL trains on
    demonstrations: list[Trajectory] = field(default_factory=list)  # tokenized Example.demonstrations
    source: str = "train"  # "train" (drawn this step), "offline" (data.offline) or a plugin's tag (add_groups)

    @property
    def rewards(self) -> Tensor:  # [G] float
        return torch.tensor([m.reward if m.reward is not None else 0.0 for m in self.members])

    @property
    def on_policy(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if not m.off_policy]

    @property
    def off_policy(self) -> list[int]:
        return [i for i, m in enumerate(self.members) if m.off_policy]

    def num_correct(self, on_policy_only: bool = True) -> int:
        """Count of correct members (on-policy rollouts only by default: HPT's and DYPO's c)."""
        idx = self.on_policy if on_policy_only else range(len(self.members))
        return sum(1 for i in idx if self.members[i].correct)


@dataclass(frozen=True)
class Route:
    """What one prompt group contributes to the loss (returned by ``route_group``).

    ``rl`` weights the policy-gradient loss of the kept members; ``sft`` weights an SFT
    (negative log-likelihood) term on the demonstrations listed in ``demos``. Both may be
    non-zero (soft mixing, HPT's α = f(P), β = g(P)).
    """

    rl: float = 1.0
    sft: float = 0.0
    demos: tuple[int, ...] = (0,)  # which demonstrations (teachers) the SFT term trains on
    members: tuple[int, ...] | None = None  # members kept for RL; None = all of them
    drop: bool = False  # contribute nothing (DYPO's easy prompts)

    @property
    def kind(self) -> str:
        """For route-fraction metrics: drop | sft | mix | rl."""
        if self.drop or (self.rl <= 0 and self.sft <= 0):
            return "drop"
        if self.sft > 0 and self.rl > 0:
            return "mix"
        return "sft" if self.sft > 0 else "rl"


@dataclass(frozen=True)
class RolloutRequest:
    """What to sample for one prompt group (``rollout_requests``).

    ``prefix`` tokens are forced: the engine continues the prompt after them, and the
    trajectory's response is prefix + continuation with ``prefix_len = len(prefix)``. Prefix
    tokens are off-policy (``TrainBatch.off_policy_mask``); the continuation is on-policy.
    ``n = 0`` samples nothing for the group (it trains on its demonstrations only).
    """

    n: int
    prefix: tuple[int, ...] = ()
    tag: str = ""


@dataclass(frozen=True)
class StepPlan:
    """How a step starts (``plan_step``): sample rollouts or not, and how many prompts to draw.

    ``prompts=None`` draws ``trainer.prompts_per_step``; 0 draws none (a step on ``add_groups``
    or ``data.offline`` groups only). ``rollouts=False`` makes this step offline even when the
    stage's ``Needs.rollouts`` is True (e.g. an SFT-only step on a buffer, with no generation).
    """

    rollouts: bool = True
    prompts: int | None = None


@dataclass
class GroupSelection:
    """What ``select_groups`` keeps of a step's verified groups, and how many more prompts it wants.

    ``more > 0`` makes the engine draw, roll out, compose and verify that many more prompts in
    the same step and call ``select_groups`` again with the kept groups plus the new ones, up to
    ``trainer.max_sampling_rounds`` rounds (``plan/rounds_capped`` is logged when the cap stops it).
    """

    groups: list[PromptGroup]
    more: int = 0


@dataclass(frozen=True)
class Needs:
    """What an algorithm asks the engine to compute (returned by ``requirements``)."""

    rollouts: bool = True  # False: offline step, groups carry only demonstrations (SFT, GIFT)
    reference: bool = False  # frozen initial model's token log-probs → TrainBatch.ref_logprobs
    entropy: bool = False  # token entropy of π_θ → ModelOutputs.entropy (computed in chunks)
    reference_vocab: bool = False  # frozen model's full-vocab log-probs → token_distribution_loss
    whole_groups: bool = False  # micro-batches never split a prompt's rows (group-level losses, DYPO's GAL)
    minibatch_stats: bool = False  # a no-grad pass over each mini-batch feeds minibatch_statistics → TrainBatch.stats


@dataclass(frozen=True)
class Totals:
    """Normalisers of the enclosing mini-batch, so a loss split into micro-batches sums to the
    same value as the loss of the whole mini-batch (gradient accumulation changes nothing).
    Under several processes the counts are summed over ranks; ``max_len`` is a constant, the
    same on every rank (field metadata ``ranks="same"``)."""

    seqs: float = 0.0  # rows
    tokens: float = 0.0  # response tokens of all rows
    rl_seqs: float = 0.0  # rows with rl_weight > 0
    rl_tokens: float = 0.0
    sft_seqs: float = 0.0  # rows with sft_weight > 0
    sft_tokens: float = 0.0
    max_len: float = field(default=1.0, metadata={"ranks": "same"})  # constant L_max (Dr.GRPO's norm)
    micro_batches: int = 1  # how many micro-batches the mini-batch was split into (all ranks')
    # Prompts, for losses that are an expectation over prompts (DYPO's Eq. 4 weights its SFT and RL
    # parts by the fractions of hard and mid prompts). Prompts a route dropped have no rows; each
    # prompt with rows stands for TrainBatch.prompt_weight drawn prompts, so ``prompts`` counts
    # the mini-batch's share of the dropped ones too.
    prompts: float = 0.0  # prompts drawn, dropped ones included (Σ over the mini-batch's prompts of prompt_weight)
    rl_prompts: float = 0.0  # prompts with a row with rl_weight > 0
    sft_prompts: float = 0.0  # prompts with a row with sft_weight > 0


# Row fields a TrainBatch slices along dim 0 (everything that is a per-row tensor).
_ROW_FIELDS = (
    "input_ids", "attention_mask", "position_ids", "response_ids", "response_mask",
    "old_logprobs", "sampling_logprobs", "ref_logprobs", "rewards", "group_index", "prompt_index",
    "off_policy", "off_policy_mask", "rl_weight", "sft_weight", "teacher", "advantages", "finished", "response_lengths",
)
# Of those, the ones with a response-position dimension, cut with the padding columns.
_TOKEN_FIELDS = ("response_ids", "response_mask", "off_policy_mask", "sampling_logprobs", "old_logprobs", "ref_logprobs")


@dataclass
class TrainBatch:
    """Padded rows of a step, a mini-batch, or a micro-batch.

    A row is a prompt followed by one response (rollout or demonstration). Prompts are
    left-padded to P, responses right-padded to L, so the response always starts at column P.
    """

    input_ids: Tensor  # [N, P+L] long
    attention_mask: Tensor  # [N, P+L] long
    position_ids: Tensor  # [N, P+L] long, counted from the first real prompt token
    prompt_len: int  # P
    response_ids: Tensor  # [N, L] long
    response_mask: Tensor  # [N, L] bool, response tokens up to and including the first EOS
    rewards: Tensor  # [N] float
    group_index: Tensor  # [N] long, rows sharing an index form one advantage group
    prompt_index: Tensor  # [N] long, which prompt of the step the row belongs to
    off_policy: Tensor  # [N] bool, demonstration rows
    rl_weight: Tensor  # [N] float, Route.rl for rows trained with RL, else 0
    sft_weight: Tensor  # [N] float, Route.sft for demonstration rows trained with SFT, else 0
    teacher: Tensor  # [N] long, demonstration index, -1 for rollouts
    off_policy_mask: Tensor | None = None  # [N, L] bool, tokens not sampled from π_θ: demonstrations, forced prefixes
    finished: Tensor | None = None  # [N] bool, the response ended with EOS (False: cut at the length cap)
    response_lengths: Tensor | None = None  # [N] long, response tokens (EOS included)
    sampling_logprobs: Tensor | None = None  # [N, L] from the rollout engine; on demonstrations the teacher's if given, else 0
    old_logprobs: Tensor | None = None  # [N, L] π_old, the policy before this step's updates
    ref_logprobs: Tensor | None = None  # [N, L] frozen reference model (Needs.reference)
    advantages: Tensor | None = None  # [N] or [N, L], set from compute_advantage
    totals: Totals = field(default_factory=Totals)
    stats: dict[str, float] = field(default_factory=dict)  # mini-batch statistics (minibatch_statistics)
    prompt_weight: float = 1.0  # prompts drawn for the step / prompts with rows (≥ 1: routes dropped the rest)
    # Plugin per-row tensors [N, ...]; one whose first two dims are [N, L] (the response_mask's
    # shape) is per-token and is cut with the padding columns like the fields above.
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.off_policy_mask is None:  # batches built by hand: whole demonstration rows are off-policy
            self.off_policy_mask = self.response_mask & self.off_policy[:, None]
        if self.response_lengths is None:
            self.response_lengths = self.response_mask.sum(-1)
        if self.finished is None:
            self.finished = torch.ones(len(self), dtype=torch.bool)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def token_mask(self) -> Tensor:  # [N, L] float
        return self.response_mask.float()

    @property
    def off_policy_tokens(self) -> Tensor:  # [N, L] bool: demonstration rows and forced prefix tokens
        return self.response_mask & self.off_policy_mask

    @property
    def on_policy_tokens(self) -> Tensor:  # [N, L] bool: tokens sampled from the policy
        return self.response_mask & ~self.off_policy_mask

    def select(self, rows: Tensor | list[int] | slice) -> "TrainBatch":
        """Rows of this batch (totals and prompt_len kept, extras sliced)."""
        if isinstance(rows, list):
            rows = torch.tensor(rows, dtype=torch.long)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _ROW_FIELDS and isinstance(v, Tensor):
                v = v[rows]
            out[f.name] = v
        out["extras"] = {k: v[rows] for k, v in self.extras.items()}
        return TrainBatch(**out)

    def to(self, device: Any) -> "TrainBatch":
        """All tensors moved to ``device`` (micro-batches travel to the model's device)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in out.items():
            if isinstance(v, Tensor):
                out[k] = v.to(device)
        out["extras"] = {k: v.to(device) for k, v in self.extras.items()}
        return TrainBatch(**out)

    def with_(self, **changes: Any) -> "TrainBatch":
        return replace(self, **changes)


@dataclass
class ModelOutputs:
    """The policy's forward pass on a micro-batch, computed in chunks over positions."""

    logprobs: Tensor  # [N, L] log π_θ(y_t | x, y_<t), with gradient
    entropy: Tensor | None = None  # [N, L] token entropy of π_θ, with gradient (Needs.entropy)
    distribution_loss: Tensor | None = None  # [N, L] from token_distribution_loss (Needs.reference_vocab)


@dataclass
class LossTerm:
    """One named part of the loss. ``value`` is already weighted and normalised with the
    mini-batch Totals; the engine backpropagates the sum of all terms."""

    name: str  # e.g. "pg", "sft", "entropy", "kl", "gal"
    value: Tensor  # scalar, with gradient
    metrics: dict[str, float] = field(default_factory=dict)  # extra numbers to log with this term
