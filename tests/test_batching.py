"""Micro-batches: rows of similar length together, within the token budget, cut where it pays."""

import pytest
import torch

from posttrain.batching import build_train_batch, charge_per_pass, micro_batch_rows
from posttrain.testing import sized_group, tiny_tokenizer
from posttrain.types import Route

PAD = tiny_tokenizer().pad_token_id


def _batch(lens_per_group):
    groups = [sized_group([1.0] * len(lens), lens, uid=f"tiny:{g}") for g, lens in enumerate(lens_per_group)]
    return build_train_batch(groups, [Route(rl=1.0)] * len(groups), PAD)


def _padded(batch, micro):
    """Tokens of the micro-batches as trim_padding shapes them: rows × (widest prompt + longest response)."""
    prompt = batch.attention_mask[:, :batch.prompt_len].sum(-1)
    response = batch.response_mask.sum(-1)
    return sum(len(r) * int(prompt[r].max() + response[r].max()) for r in micro)


def test_rows_of_similar_length_go_together():
    # Prompt "1+1=" is 4 tokens: rows of 4 + [10, 100, 12, 98] tokens. Budget 1000, so a pass
    # costs 1000 / 16 = 62.5 tokens. One micro-batch: 4 × 104 = 416 (+ 62.5); by length:
    # 2 × 16 + 2 × 104 = 240 (+ 125) — cheaper, so rows 0 and 2, then 1 and 3.
    batch = _batch([[10, 100, 12, 98]])
    micro = micro_batch_rows(batch, token_budget=1000)
    assert [r.tolist() for r in micro] == [[0, 2], [1, 3]]
    assert _padded(batch, micro) == 240
    # three passes would pad less (2 × 16 + 102 + 104 = 238) but cost one pass more
    assert _padded(batch, [torch.tensor([0, 2]), torch.tensor([3]), torch.tensor([1])]) == 238


def test_equal_lengths_stay_one_micro_batch_in_batch_order():
    batch = _batch([[50, 49, 50, 48]])  # nothing to gain from a cut: 4 × 54 = 216 tokens
    assert [r.tolist() for r in micro_batch_rows(batch, token_budget=1000)] == [[0, 1, 2, 3]]


def test_the_budget_is_never_exceeded():
    batch = _batch([[10, 100, 12, 98, 30, 31, 60, 5]])
    for budget in (120, 250, 400, 1000):
        micro = micro_batch_rows(batch, token_budget=budget)
        assert sorted(torch.cat(micro).tolist()) == list(range(8))  # every row exactly once
        sizes = [_padded(batch, [r]) for r in micro]
        assert max(sizes) <= budget, (budget, sizes)
    # a row larger than the budget gets a pass of its own
    assert [r.tolist() for r in micro_batch_rows(batch, token_budget=1)] == [[i] for i in range(8)]


def test_whole_groups_are_cut_between_prompts_only():
    # Prompt 0: rows of 10 and 100 tokens; prompt 1: 12 and 14. Whole: 4 × 104 = 416 (+ 62.5);
    # per prompt: 2 × 104 + 2 × 18 = 244 (+ 125).
    batch = _batch([[10, 100], [12, 14]])
    assert batch.prompt_index.tolist() == [0, 0, 1, 1]
    assert [r.tolist() for r in micro_batch_rows(batch, token_budget=1000, whole_groups=True)] == [[0, 1], [2, 3]]
    # without whole_groups the two short rows of different prompts may share a pass with row 0
    assert [r.tolist() for r in micro_batch_rows(batch, token_budget=1000)] == [[0, 2, 3], [1]]


@pytest.mark.parametrize("budget", [1 << 20, 16384])
def test_a_batch_of_responses_of_every_length_is_cut_in_a_few_passes(budget):
    # 64 GRPO rollouts of 2..128 tokens (uniform), as in benchmarks/bench_vs_trl.py at 64 × 128
    lens = torch.randint(2, 129, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    batch = _batch([lens[i:i + 4] for i in range(0, 64, 4)])
    micro = micro_batch_rows(batch, token_budget=budget)
    one = _padded(batch, [torch.arange(64)])
    assert one == 64 * (4 + max(lens))
    if budget == 1 << 20:  # a pass costs 65536 tokens here: never worth a cut
        assert len(micro) == 1
    else:  # 1024 tokens a pass: two passes, a quarter less padding
        assert len(micro) == 2 and _padded(batch, micro) < 0.8 * one


def test_a_pass_is_charged_by_the_device_and_the_model():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    tiny = torch.nn.Linear(400, 200, bias=False)  # 80k parameters, as the tiny Llama
    big = torch.nn.Linear(13_500, 10_000, bias=False, device="meta")  # 135M, as SmolLM2-135M
    assert charge_per_pass(16384, gpu, tiny) == charge_per_pass(16384, gpu, big) == 1024  # accelerators: budget / 16
    assert charge_per_pass(16384, cpu, tiny) == pytest.approx(28 + 2.5e8 / 480_000)  # 549 tokens: its Python dominates
    assert charge_per_pass(16384, cpu, big) == pytest.approx(28.3, abs=0.01)  # its arithmetic dominates


def test_a_cpu_charge_cuts_where_the_accelerator_charge_does_not():
    # 16 GRPO rows (4 prompts × 4) of 20..64 response tokens, prompts of 4: one pass is
    # 16 × 68 = 1088 padded tokens. Charged 1024 a pass nothing is worth a cut; charged 62
    # (hidden 256 on a CPU) passes by length save more padding than the passes cost.
    lens = [64, 20, 40, 61, 22, 58, 35, 64, 30, 47, 25, 62, 59, 21, 44, 38]
    batch = _batch([lens[i:i + 4] for i in range(0, 16, 4)])
    assert len(micro_batch_rows(batch, token_budget=16384, pass_cost=1024)) == 1
    micro = micro_batch_rows(batch, token_budget=16384, pass_cost=62)
    assert len(micro) > 1 and sorted(torch.cat(micro).tolist()) == list(range(16))
    assert _padded(batch, micro) + 62 * len(micro) < 1088 + 62
    assert all(int(batch.response_mask[r].sum(-1).max() - batch.response_mask[r].sum(-1).min()) < 44 for r in micro)


def test_the_cut_is_the_cheapest_of_all_cuts():
    # Against every way of cutting 1..9 sorted units into consecutive runs, on random batches.
    from itertools import combinations

    from posttrain.batching import _cheapest_cuts

    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        n = int(torch.randint(1, 10, (1,), generator=g))
        P = torch.randint(1, 8, (n,), generator=g).double()
        R = torch.randint(0, 40, (n,), generator=g).double()
        rows = torch.randint(1, 5, (n,), generator=g).double()
        order = torch.argsort(P + R, stable=True)
        P, R, rows = P[order], R[order], rows[order]
        budget = float(torch.randint(20, 800, (1,), generator=g))

        def cost(runs):
            sizes = [float(rows[a:b].sum() * (P[a:b].max() + R[a:b].max())) for a, b in runs]
            if any(s > budget and b - a > 1 for s, (a, b) in zip(sizes, runs)):
                return float("inf")
            return sum(sizes) + len(runs) * budget / 16

        every = [list(zip((0, *mid), (*mid, n))) for k in range(n) for mid in combinations(range(1, n), k)]
        got = _cheapest_cuts(P, R, rows, budget, pass_cost=budget / 16)
        assert got in every and cost(got) == pytest.approx(min(cost(runs) for runs in every), abs=1e-9)
