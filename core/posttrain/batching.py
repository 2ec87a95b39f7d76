"""Groups + routes → padded TrainBatch rows; mini- and micro-batch splitting; Totals."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .types import _TOKEN_FIELDS, PromptGroup, Route, Totals, Trajectory, TrainBatch


@dataclass
class _Row:
    prompt_ids: list[int]
    traj: Trajectory
    rl: float
    sft: float
    group: int
    prompt: int


def _rows(groups: list[PromptGroup], routes: list[Route]) -> list[_Row]:
    rows: list[_Row] = []
    next_singleton = len(groups)  # SFT-only rows get group ids past the prompt groups
    for g_idx, (group, route) in enumerate(zip(groups, routes)):
        if route.kind == "drop":
            continue
        kept = range(len(group.members)) if route.members is None else route.members
        rl_rows = [] if route.rl <= 0 else [_Row(group.prompt_ids, group.members[i], route.rl, 0.0, g_idx, g_idx) for i in kept]
        rows += rl_rows
        if route.sft <= 0:
            continue
        for d in route.demos:
            if d >= len(group.demonstrations):
                raise IndexError(f"{group.example.uid}: route asks for demonstration {d}, the prompt has {len(group.demonstrations)}")
            # A demonstration already trained with RL gets its SFT weight on the same row, not a copy.
            same = [r for r in rl_rows if r.traj.off_policy and r.traj.teacher == d]
            if same:
                same[0].sft = route.sft
            else:
                rows.append(_Row(group.prompt_ids, group.demonstrations[d], 0.0, route.sft, next_singleton, g_idx))
                next_singleton += 1
    return rows


def build_train_batch(groups: list[PromptGroup], routes: list[Route], pad_id: int) -> TrainBatch | None:
    """Pad every routed row of a step into one TrainBatch; None when everything was dropped."""
    rows = _rows(groups, routes)
    if not rows:
        return None
    n = len(rows)
    P = max(len(r.prompt_ids) for r in rows)
    L = max(1, max(len(r.traj.response_ids) for r in rows))
    input_ids = torch.full((n, P + L), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + L), dtype=torch.long)
    sampling = torch.zeros((n, L))
    forced = torch.zeros((n, L), dtype=torch.bool)  # off-policy tokens: whole demonstrations, forced prefixes
    for i, r in enumerate(rows):
        p, t = r.prompt_ids, r.traj.response_ids
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[i, P - len(p):P] = 1
        if t:
            input_ids[i, P:P + len(t)] = torch.tensor(t, dtype=torch.long)
            attn[i, P:P + len(t)] = 1
        if r.traj.sampling_logprobs is not None:
            sampling[i, :len(t)] = torch.tensor(r.traj.sampling_logprobs[:len(t)])
        forced[i, :len(t) if r.traj.off_policy else min(r.traj.prefix_len, len(t))] = True
    response_mask = attn[:, P:].bool()
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
        prompt_len=P,
        response_ids=input_ids[:, P:].clone(),
        response_mask=response_mask,
        rewards=torch.tensor([r.traj.reward if r.traj.reward is not None else 0.0 for r in rows]),
        group_index=torch.tensor([r.group for r in rows]),
        prompt_index=torch.tensor([r.prompt for r in rows]),
        off_policy=torch.tensor([r.traj.off_policy for r in rows]),
        rl_weight=torch.tensor([r.rl for r in rows]),
        sft_weight=torch.tensor([r.sft for r in rows]),
        teacher=torch.tensor([-1 if r.traj.teacher is None else r.traj.teacher for r in rows]),
        off_policy_mask=forced & response_mask,
        finished=torch.tensor([bool(r.traj.finished) for r in rows]),
        response_lengths=response_mask.sum(-1),
        sampling_logprobs=sampling,
        prompt_weight=len(groups) / len({r.prompt for r in rows}),
    )


def trim_padding(batch: TrainBatch) -> TrainBatch:
    """Drop columns that are padding in every row (left of prompts, right of responses)."""
    attn = batch.attention_mask
    P = batch.prompt_len
    prompt_used = attn[:, :P].any(0).nonzero()
    first = int(prompt_used[0]) if len(prompt_used) else P - 1
    first = min(first, P - 1)  # keep ≥ 1 prompt column: position P-1 predicts the first response token
    used = batch.response_mask.any(0).nonzero()
    L = int(used[-1]) + 1 if len(used) else 1
    if first == 0 and L == batch.response_mask.shape[1]:
        return batch
    cols = slice(first, P + L)
    changes = dict(input_ids=batch.input_ids[:, cols], attention_mask=attn[:, cols],
                   position_ids=batch.position_ids[:, cols], prompt_len=P - first)
    width = batch.response_mask.shape
    for name in _TOKEN_FIELDS:
        v = getattr(batch, name)
        changes[name] = None if v is None else v[:, :L]
    if batch.advantages is not None and batch.advantages.dim() == 2:
        changes["advantages"] = batch.advantages[:, :L]
    changes["extras"] = {k: v[:, :L] if v.dim() >= 2 and tuple(v.shape[:2]) == tuple(width) else v
                         for k, v in batch.extras.items()}
    return batch.with_(**changes)


def totals_of(batch: TrainBatch, max_len: float, micro_batches: int = 1) -> Totals:
    m = batch.response_mask
    rl = batch.rl_weight > 0
    sft = batch.sft_weight > 0
    return Totals(
        seqs=float(len(batch)), tokens=float(m.sum()),
        rl_seqs=float(rl.sum()), rl_tokens=float(m[rl].sum()),
        sft_seqs=float(sft.sum()), sft_tokens=float(m[sft].sum()),
        max_len=float(max_len), micro_batches=micro_batches,
        prompts=float(batch.prompt_index.unique().numel()) * batch.prompt_weight,
        rl_prompts=float(batch.prompt_index[rl].unique().numel()),
        sft_prompts=float(batch.prompt_index[sft].unique().numel()),
    )


def minibatches(batch: TrainBatch, prompts_per_minibatch: int | None) -> list[TrainBatch]:
    """Split by prompt, so a group (and its advantage baseline) never straddles two updates."""
    if prompts_per_minibatch is None:
        return [batch]
    prompts = batch.prompt_index.unique(sorted=True)
    out = []
    for start in range(0, len(prompts), prompts_per_minibatch):
        chosen = prompts[start:start + prompts_per_minibatch]
        rows = torch.isin(batch.prompt_index, chosen).nonzero().squeeze(-1)
        out.append(batch.select(rows))
    return out


# What one more forward/backward pass costs on a CPU beyond its tokens' arithmetic. Timed on one
# core: ~28 tokens' worth of that arithmetic (passes of 8 to 1184 tokens, Llamas of hidden
# 64-768: small matrix products run below the core's peak), plus ~3.5 ms of Python a training
# pass (module calls, hooks, loss terms, metrics: a GRPO batch split into 1-8 passes of equal
# width), which at ~70 GFLOP/s is 2.5e8 FLOPs. In tokens: ~550 for a Llama of hidden 64, ~60 at
# hidden 256, 28 for a 135M model.
CPU_PASS_TOKENS = 28
CPU_PASS_FLOPS = 2.5e8


def charge_per_pass(token_budget: int, device: torch.device, model: torch.nn.Module) -> float:
    """The charge per micro-batch ``micro_batch_rows`` weighs padding against, in tokens.

    An accelerator needs thousands of tokens in a pass to be busy (``token_budget / 16``: 1024
    at the default budget). On a CPU a pass costs a few dozen tokens' worth of arithmetic plus
    its Python, counted in tokens of ``model`` (6 FLOPs a parameter a token, forward and
    backward): the smaller the model, the more tokens its Python is worth.
    It depends on the device type and the model only, never on timings, so a resumed run cuts
    its batches as before.
    """
    if device.type != "cpu":
        return token_budget / 16
    params = sum(p.numel() for p in model.parameters())
    return CPU_PASS_TOKENS + CPU_PASS_FLOPS / (6 * params)


def micro_batch_rows(batch: TrainBatch, token_budget: int, whole_groups: bool = False,
                     pass_cost: float | None = None) -> list[torch.Tensor]:
    """Row indices of each micro-batch: rows of similar length together, each within the budget.

    Rows are ordered by length and cut into micro-batches whose padded size (rows × (longest
    prompt + longest response), the shape ``trim_padding`` leaves) stays within
    ``token_budget``. Of all such cuts, the one with the fewest padded tokens plus ``pass_cost``
    for each micro-batch is taken (default ``token_budget / 16``, see ``charge_per_pass``): a pass
    has a fixed cost (module calls, kernel launches, small matrix products running below peak),
    so a batch is only cut where that saves more padding than the pass costs.
    On a 64 × 128 GRPO step of the tiny model, where responses end anywhere, this took the train
    phase from 0.23 s to 0.15 s (benchmarks/bench_vs_trl.py): the padding was 40 % of the batch.
    Rows keep their batch order inside a micro-batch and micro-batches are in the order of their
    first row, so a batch that stays one micro-batch gives exactly the result it gave before.

    With ``whole_groups`` a prompt's rows are never split (a prompt larger than the budget
    gets a micro-batch of its own), for losses that compare members of a group.
    """
    n = len(batch)
    prompt = batch.attention_mask[:, :batch.prompt_len].sum(-1)
    response = batch.response_mask.sum(-1)
    # Units that must stay together: single rows, or runs of rows of the same prompt.
    bounds = [0] + [i for i in range(1, n) if not whole_groups or batch.prompt_index[i] != batch.prompt_index[i - 1]] + [n]
    units = list(zip(bounds, bounds[1:]))
    P = torch.tensor([float(prompt[a:b].max()) for a, b in units], dtype=torch.float64)
    R = torch.tensor([float(response[a:b].max()) for a, b in units], dtype=torch.float64)
    rows = torch.tensor([float(b - a) for a, b in units], dtype=torch.float64)
    order = torch.argsort(P + R, stable=True)
    micro = []
    charge = token_budget / 16 if pass_cost is None else pass_cost
    for first, end in _cheapest_cuts(P[order], R[order], rows[order], token_budget, pass_cost=charge):
        picked = sorted(order[first:end].tolist())  # batch order inside a micro-batch
        micro.append(torch.cat([torch.arange(*units[u]) for u in picked]))
    return sorted(micro, key=lambda r: int(r[0]))  # in batch order, as far as the cut allows


def _cheapest_cuts(P: torch.Tensor, R: torch.Tensor, rows: torch.Tensor, budget: float, pass_cost: float) -> list[tuple[int, int]]:
    """Cut units sorted by length into consecutive runs [first, end): the fewest padded tokens
    (rows × (widest prompt P + longest response R) of each run) plus ``pass_cost`` per run, no run
    above ``budget`` unless it is one unit. Dynamic programming over the end of the last run."""
    whole = rows.sum() * (P.max() + R.max())
    if whole <= budget and whole - (rows * (P + R)).sum() <= pass_cost:
        return [(0, len(P))]  # any cut costs at least the unpadded tokens and two passes: more
    rows_before = torch.cat([rows.new_zeros(1), rows.cumsum(0)])
    best = torch.zeros(len(P) + 1, dtype=torch.float64)  # best[j]: cheapest cut of the first j units
    start = [0] * (len(P) + 1)  # start[j]: where that cut's last run starts
    for j in range(1, len(P) + 1):
        # the run i..j-1 for every i < j: its rows × (its widest prompt + its longest response)
        width = P[:j].flip(0).cummax(0).values.flip(0) + R[:j].flip(0).cummax(0).values.flip(0)
        size = (rows_before[j] - rows_before[:j]) * width
        over = size > budget
        over[j - 1] = False  # a unit larger than the budget gets a run of its own
        cost = (best[:j] + size + pass_cost).masked_fill(over, float("inf"))
        i = int(cost.argmin())
        best[j], start[j] = cost[i], i
    runs, j = [], len(P)
    while j > 0:
        runs.append((start[j], j))
        j = start[j]
    return runs[::-1]
