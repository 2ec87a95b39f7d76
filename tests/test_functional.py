"""posttrain.functional against hand-computed numbers (the arithmetic is in the comments).

Sanity numbers come from shared/research/algorithms.md §6 (LUFFY shaping weights, GRPO std,
GIFT off-gold mass).
"""

import math

import pytest
import torch

from posttrain import functional as F


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=tol)


# --- masks ---------------------------------------------------------------------------------------


def test_masked_sum_and_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    m = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    assert F.masked_sum(x, m).item() == 8.0  # 1 + 3 + 4
    assert close(F.masked_sum(x, m, dim=1), [1.0, 7.0])
    assert close(F.masked_mean(x, m), 8 / 3)  # (1+3+4)/3
    assert close(F.masked_mean(x, m, dim=1), [1.0, 3.5])  # [1/1, (3+4)/2]
    assert close(F.masked_mean(x, m, dim=0), [2.0, 4.0])  # [(1+3)/2, 4/1]
    assert close(F.masked_mean(x, m.float()), 8 / 3)  # float mask: same numbers


def test_masked_mean_empty_mask_is_nan_unless_eps():
    x = torch.tensor([1.0, 2.0])
    empty = torch.zeros(2, dtype=torch.bool)
    assert torch.isnan(F.masked_mean(x, empty))  # 0/0, as verl's masked_mean
    assert F.masked_mean(x, empty, eps=1.0).item() == 0.0  # 0/(0+1)


def test_masked_sum_bool_mask_blocks_nan_at_padding():
    x = torch.tensor([1.0, float("nan"), float("-inf")], requires_grad=True)
    m = torch.tensor([True, False, False])
    s = F.masked_sum(x, m)
    assert s.item() == 1.0
    s.backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0]


def test_masked_mean_broadcasts_row_values_over_the_mask():
    # [N, 1] values under an [N, L] mask count once per masked token: (2·2 + 5·1) / 3 = 3
    x = torch.tensor([[2.0], [5.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert close(F.masked_mean(x, m), 3.0)


# --- advantages ----------------------------------------------------------------------------------


def test_group_advantages_grpo_one_correct_of_eight():
    # mean = 1/8 = 0.125; unbiased var = (7·0.125² + 0.875²)/7 = (0.109375 + 0.765625)/7 = 0.125
    # std = √0.125 = 0.353553; A_correct = 0.875/0.353554 = 2.4749; A_wrong = −0.125/0.353554 = −0.35355
    r = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.0])
    a = F.group_advantages(r, torch.zeros(8, dtype=torch.long))
    std = math.sqrt(0.125)
    assert close(a[-1], 0.875 / (std + 1e-6)) and close(a[-1], 2.474870, 1e-5)
    assert close(a[:-1], torch.full((7,), -0.125 / (std + 1e-6))) and close(a[0], -0.353552, 1e-5)
    # torch.std is the reference definition (unbiased)
    assert close(a, (r - r.mean()) / (r.std() + 1e-6))


def test_group_advantages_luffy_demo_group_without_std():
    # LUFFY: 7 failed rollouts + the correct demo in one group, use_std=False → r − 1/8
    r = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.0])
    a = F.group_advantages(r, torch.zeros(8, dtype=torch.long), use_std=False)
    assert close(a[:-1], torch.full((7,), -0.125)) and close(a[-1], 0.875)


def test_group_advantages_several_groups_singletons_and_constant_groups():
    # ids are arbitrary and interleaved: group 7 = rows 0,2 (r=1,0); group 3 = rows 1,3 (r=1,1);
    # group 42 = row 4 alone (r=0.5).
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5])
    g = torch.tensor([7, 3, 7, 3, 42])
    a = F.group_advantages(r, g)
    # group 7: mean 0.5, std = √((0.25+0.25)/1) = 0.707107 → ±0.5/0.707108 = ±0.707106
    assert close(a[0], 0.5 / (math.sqrt(0.5) + 1e-6)) and close(a[2], -0.5 / (math.sqrt(0.5) + 1e-6))
    # group 3: all equal → 0/(0 + eps) = 0
    assert a[1].item() == 0.0 and a[3].item() == 0.0
    # singleton: mean 0, std 1 → 0.5/(1 + 1e-6)
    assert close(a[4], 0.5 / (1 + 1e-6), 1e-7)
    b = F.group_advantages(r, g, use_std=False)
    assert close(b, [0.5, 0.0, -0.5, 0.0, 0.5])  # singleton keeps its raw reward (mean 0)


def test_group_advantages_rows_excluded_from_stats_and_zeroed():
    # group 0 = rows 0,1,2 with row 2 (an SFT-only demo, r=1) not taking part:
    # stats from r=[1, 0] only: mean 0.5, std 0.707107 → [0.707106, −0.707106, 0]
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 1])
    rows = torch.tensor([True, True, False, True])
    a = F.group_advantages(r, g, rows=rows)
    s = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert close(a, [s, -s, 0.0, 1.0 / (1 + 1e-6)])
    b = F.group_advantages(r, g, rows=rows, use_std=False)
    assert close(b, [0.5, -0.5, 0.0, 1.0])
    # a group whose only participant is one row behaves like a singleton
    c = F.group_advantages(r, g, rows=torch.tensor([True, False, False, False]), use_std=False)
    assert close(c, [1.0, 0.0, 0.0, 0.0])


def test_group_advantages_integer_rewards_and_empty():
    a = F.group_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]), use_std=False)
    assert a.dtype == torch.float32 and close(a, [0.5, -0.5])
    assert F.group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_rloo_advantages():
    # group 0: r = [1, 0, 0, 1]; row 0: 1 − (0+0+1)/3 = 2/3; row 1: 0 − (1+0+1)/3 = −2/3
    # verl's form r·n/(n−1) − mean·n/(n−1): 1·4/3 − 0.5·4/3 = 2/3 ✓. Row 4 is a singleton → 0.
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 5])
    assert close(F.rloo_advantages(r, g), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0])
    # row 3 not taking part: group = [1, 0, 0] → row 0: 1 − 0 = 1; rows 1,2: 0 − (1+0)/2 = −0.5
    rows = torch.tensor([True, True, True, False, True])
    assert close(F.rloo_advantages(r, g, rows=rows), [1.0, -0.5, -0.5, 0.0, 0.0])


# --- logits → token statistics -------------------------------------------------------------------


def test_entropy_from_logits():
    # [0, 0]: uniform over 2 → ln 2 = 0.693147
    # [0, ln 3]: p = [1/4, 3/4]; H = 0.25·ln4 + 0.75·ln(4/3) = 0.346574 + 0.215762 = 0.562335
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3)], [1000.0, 1000.0]])
    assert close(F.entropy_from_logits(logits), [math.log(2), 0.562335, math.log(2)])


def test_logprobs_from_logits():
    # softmax([0, ln 3]) = [1/4, 3/4] → ln 0.75 = −0.287682, ln 0.25 = −1.386294
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])  # [1, 2, V=2]
    labels = torch.tensor([[1, 0]])
    assert close(F.logprobs_from_logits(logits, labels), [[-0.287682, -1.386294]])
    # equals log_softmax gathered, also for large logits
    z = torch.randn(3, 4, 9) * 50
    y = torch.randint(0, 9, (3, 4))
    ref = torch.log_softmax(z, -1).gather(-1, y[..., None]).squeeze(-1)
    assert torch.allclose(F.logprobs_from_logits(z, y), ref, atol=1e-4)


def _chunk_setup(seed=0, N=2, L=7, H=5, V=11):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(H, V)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        head.bias.copy_(torch.randn(V, generator=g))
    hidden = torch.randn(N, L, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (N, L), generator=g)
    ref_logp = torch.log_softmax(torch.randn(N, L, V, generator=g), -1)
    w = torch.randn(3, N, L, generator=g)  # random cotangents for the three outputs
    return head, hidden, labels, ref_logp, w


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("ckpt", [True, False])
def test_chunked_token_stats_equals_unchunked_values_and_grads(chunk, ckpt):
    T = 0.7
    head, hidden, labels, ref_logp, w = _chunk_setup()
    target = F.gibbs_target(ref_logp, labels, beta=2.0)  # [N, L, V], GIFT-like full-vocab loss

    def full():
        logits = head(hidden).float() / T
        return (F.logprobs_from_logits(logits, labels), F.entropy_from_logits(logits),
                F.soft_cross_entropy(logits, target))

    def extra(logits, sl):
        assert logits.shape[:2] == labels[:, sl].shape
        return F.soft_cross_entropy(logits, target[:, sl])

    outs = {}
    for name, fn in [("full", full), ("chunked", lambda: F.chunked_token_stats(
            hidden, head, labels, temperature=T, chunk_size=chunk, entropy=True, extra=extra, checkpoint=ckpt))]:
        for p in (hidden, head.weight, head.bias):
            p.grad = None
        lp, ent, ex = fn()
        (w[0] * lp + w[1] * ent + w[2] * ex).sum().backward()
        outs[name] = [t.detach().clone() for t in (lp, ent, ex, hidden.grad, head.weight.grad, head.bias.grad)]
    for a, b in zip(outs["full"], outs["chunked"]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_chunked_token_stats_optional_outputs_and_no_grad():
    head, hidden, labels, _, _ = _chunk_setup()
    lp, ent, ex = F.chunked_token_stats(hidden, head, labels, chunk_size=3)
    assert lp.shape == (2, 7) and ent is None and ex is None and lp.requires_grad
    with torch.no_grad():
        lp2, ent2, _ = F.chunked_token_stats(hidden, head, labels, chunk_size=3, entropy=True)
    assert not lp2.requires_grad and torch.allclose(lp.detach(), lp2) and ent2.shape == (2, 7)
    # bf16 head output is upcast before the log-softmax
    lp3, _, _ = F.chunked_token_stats(hidden.detach().bfloat16(), head.bfloat16(), labels, chunk_size=4)
    assert lp3.dtype == torch.float32
    with pytest.raises(ValueError):
        F.chunked_token_stats(hidden, head, labels, chunk_size=0)


def test_chunked_token_stats_checkpoint_keeps_no_vocab_sized_tensor_for_backward():
    # Structural memory check (not timed): tensors autograd saves outside the checkpointed
    # chunks never have the vocabulary dimension; without checkpointing the logits are saved.
    head, hidden, labels, _, _ = _chunk_setup(V=13)

    def saved_vocab_tensors(ckpt):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.chunked_token_stats(hidden, head, labels, chunk_size=3, entropy=True, checkpoint=ckpt)
        return [s for s in shapes if s and s[-1] == 13 and len(s) == 3]

    assert saved_vocab_tensors(False)  # the [N, c, V] logits would be kept
    assert saved_vocab_tensors(True) == []


# --- ratios and clipping -------------------------------------------------------------------------


def test_importance_ratio_values_and_clamp():
    # exp(−1 − (−1.5)) = e^0.5 = 1.648721; log-ratio 100 clamps to 20 → e^20 = 4.85165e8
    logp = torch.tensor([-1.0, 0.0, -100.0], requires_grad=True)
    denom = torch.tensor([-1.5, -100.0, 0.0])
    r = F.importance_ratio(logp, denom)
    assert close(r[0], 1.648721) and close(r[1], math.exp(20), 1e-4) and close(r[2], math.exp(-20), 1e-4)
    r.sum().backward()
    assert close(logp.grad, [1.648721, 0.0, 0.0])  # dρ/dlogp = ρ inside, 0 where clamped
    assert close(F.importance_ratio(torch.tensor(0.0), torch.tensor(-3.0), clamp=1.0), math.e)


def test_sequence_ratio_gspo_straight_through():
    # row 0: logp − denom on its 2 tokens = [0.2, 0.4] → mean 0.3 → s = e^0.3 = 1.349859
    # (the masked third token's 5.0 is ignored); row 1 has no tokens → s = 1
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    denom = torch.tensor([[-1.2, -2.4, -5.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    s = F.sequence_ratio(logp, denom, mask)
    assert close(s, [[1.349859] * 3, [1.0] * 3])
    (s * mask).sum().backward()
    # gradient of each kept token's logp is s_i (straight-through), 0 on masked tokens
    assert close(logp.grad, [[1.349859, 1.349859, 0.0], [0.0, 0.0, 0.0]])
    # with seq-mean-token-mean the gradient is s·(1/|y|)·Σ∇logp, GSPO's ∇s: 1.349859/2 per token
    logp.grad = None
    loss = F.aggregate(F.sequence_ratio(logp, denom, mask), mask, "seq-mean-token-mean", num_tokens=2, num_seqs=1)
    loss.backward()
    assert close(logp.grad[0, :2], [1.349859 / 2] * 2)


def test_ppo_clip_mask():
    ratio = torch.tensor([[0.7, 0.9, 1.1, 1.25, 1.3, 3.5]])
    pos, neg = torch.tensor([[1.0]]), torch.tensor([[-1.0]])
    # ε = 0.2: A>0 drops ρ > 1.2; A<0 drops ρ < 0.8
    assert F.ppo_clip_mask(ratio, pos, 0.2).tolist() == [[True, True, True, False, False, False]]
    assert F.ppo_clip_mask(ratio, neg, 0.2).tolist() == [[False, True, True, True, True, True]]
    # clip-higher ε_high = 0.28: A>0 keeps up to 1.28
    assert F.ppo_clip_mask(ratio, pos, 0.2, 0.28).tolist() == [[True, True, True, True, False, False]]
    # dual clip c = 3: A<0 also drops ρ > 3
    assert F.ppo_clip_mask(ratio, neg, 0.2, clip_dual=3.0).tolist() == [[False, True, True, True, True, False]]
    # A = 0 is never dropped (its gradient is 0 anyway); advantages [N, 1] broadcast over L
    assert F.ppo_clip_mask(ratio, torch.zeros(1, 1), 0.2).all()
    with pytest.raises(ValueError):
        F.ppo_clip_mask(ratio, neg, 0.2, clip_dual=0.5)


def test_clipped_surrogate_values():
    ratio = torch.tensor([0.7, 1.3, 0.7, 1.3, 3.5, 3.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0, -2.0])
    loss, kept = F.clipped_surrogate(ratio, adv, 0.2, clip_dual=3.0)
    expected = [
        -0.7,  # A=+1, ρ=0.7: max(−0.7, −0.8)
        -1.2,  # A=+1, ρ=1.3: max(−1.3, −1.2)
        0.8,   # A=−1, ρ=0.7: max(0.7, 0.8)
        1.3,   # A=−1, ρ=1.3: max(1.3, 1.2)
        3.0,   # A=−1, ρ=3.5: min(max(3.5, 1.2), 1·3)
        6.0,   # A=−2, ρ=3.5: min(max(7, 2.4), 2·3)
    ]
    assert close(loss, expected)
    assert kept.tolist() == [True, False, False, True, False, False]
    loss2, _ = F.clipped_surrogate(ratio, adv, 0.2)  # no dual clip: 3.5 and 7 stay
    assert close(loss2[4:], [3.5, 7.0])


@pytest.mark.parametrize("clip_high,clip_dual", [(None, None), (0.28, None), (None, 3.0), (0.28, 3.0)])
def test_clipped_surrogate_gradient_equals_masked_form(clip_high, clip_dual):
    g = torch.Generator().manual_seed(1)
    logp = (torch.randn(4, 50, generator=g) * 0.5).requires_grad_()
    adv = torch.randn(4, 1, generator=g)
    old = torch.randn(4, 50, generator=g) * 0.5 - 0.3
    loss, kept = F.clipped_surrogate(F.importance_ratio(logp, old), adv, 0.2, clip_high, clip_dual)
    assert kept.equal(F.ppo_clip_mask(F.importance_ratio(logp, old), adv, 0.2, clip_high, clip_dual))
    assert 0 < (~kept).sum() < kept.numel()  # both regions exercised
    (g1,) = torch.autograd.grad(loss.sum(), logp)
    (g2,) = torch.autograd.grad((-adv * F.importance_ratio(logp, old) * kept).sum(), logp)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_clip_fraction():
    # response tokens: 5; not kept among them: (0,1) and (1,0) → 2/5 (the not-kept (1,2) is padding)
    kept = torch.tensor([[True, False, True], [False, True, False]])
    resp = torch.tensor([[True, True, True], [True, True, False]])
    assert F.clip_fraction(kept, resp) == pytest.approx(0.4)
    assert F.clip_fraction(kept, torch.zeros_like(resp)) == 0.0


def test_policy_shaping_values():
    r = torch.tensor([0.5])
    assert close(F.policy_shaping(r), 0.5)
    assert close(F.policy_shaping(r, "p_div_p"), 0.5 / 0.6)  # 0.833333
    assert close(F.policy_shaping(r, "sqrt"), math.sqrt(0.5))
    assert close(F.policy_shaping(r, "pow"), math.sqrt(0.5))  # power 0.5
    assert close(F.policy_shaping(r, "pow", power=2.0), 0.25)
    assert close(F.policy_shaping(r, "p_div_p", gamma=0.5), 0.5)  # 0.5/(0.5+0.5)
    with pytest.raises(ValueError, match="none, p_div_p, sqrt, pow"):
        F.policy_shaping(r, "p_logp")


def test_policy_shaping_luffy_gradient_weights():
    # ρ = p = exp(logp): d f/d logp = γp/(p+γ)², γ = 0.1:
    #   p=0.01 → 0.001/0.0121 = 0.0826; p=0.1 → 0.01/0.04 = 0.25 (max); p=0.5 → 0.05/0.36 = 0.1389;
    #   p=1 → 0.1/1.21 = 0.0826. Unshaped (f = p) the weight is p itself.
    p = torch.tensor([0.01, 0.1, 0.5, 1.0])
    logp = p.log().requires_grad_()
    (gw,) = torch.autograd.grad(F.policy_shaping(logp.exp(), "p_div_p", gamma=0.1).sum(), logp)
    assert close(gw, [0.0826446, 0.25, 0.1388889, 0.0826446])
    (g0,) = torch.autograd.grad(F.policy_shaping(logp.exp(), "none").sum(), logp)
    assert close(g0, p)


# --- aggregation and losses ----------------------------------------------------------------------


def test_aggregate_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # Σℓm = 1 + 2 + 4 = 7 over 3 tokens; 3 rows (row 2 empty); max_len 3
    kw = dict(num_tokens=3, num_seqs=3, max_len=3)
    assert close(F.aggregate(loss, mask, "token-mean", **kw), 7 / 3)
    # per-row token means: (1+2)/2 = 1.5, 4/1 = 4, empty row → 0; Σ = 5.5 / 3 rows
    assert close(F.aggregate(loss, mask, "seq-mean-token-mean", **kw), 5.5 / 3)
    assert close(F.aggregate(loss, mask, "seq-mean-token-sum", **kw), 7 / 3)
    assert close(F.aggregate(loss, mask, "seq-mean-token-sum-norm", **kw), 7 / 9)  # 7/(3·3)
    assert close(F.aggregate(loss, mask, "token-sum-norm", **kw), 7 / 3)  # 7/max_len
    assert close(F.aggregate(loss, mask, "token-sum-norm", num_tokens=3, num_seqs=3, max_len=8192), 7 / 8192)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        F.aggregate(loss, mask, "mean", **kw)


@pytest.mark.parametrize("mode", F.LOSS_AGG_MODES)
def test_aggregate_micro_batches_sum_to_the_mini_batch(mode):
    g = torch.Generator().manual_seed(2)
    loss = torch.randn(6, 5, generator=g, requires_grad=True)
    mask = torch.rand(6, 5, generator=g) > 0.4
    mask[3] = False  # an empty row
    kw = dict(num_tokens=float(mask.sum()), num_seqs=6.0, max_len=5.0)
    full = F.aggregate(loss, mask, mode, **kw)
    (g_full,) = torch.autograd.grad(full, loss)
    halves = F.aggregate(loss[:3], mask[:3], mode, **kw) + F.aggregate(loss[3:], mask[3:], mode, **kw)
    (g_halves,) = torch.autograd.grad(halves, loss)
    assert close(full, halves, 1e-6) and torch.allclose(g_full, g_halves)


@pytest.mark.parametrize("mode", F.LOSS_AGG_MODES)
def test_aggregate_zero_normaliser_is_zero_with_graph(mode):
    loss = torch.ones(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = F.aggregate(loss, mask, mode, num_tokens=0, num_seqs=0, max_len=0)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert loss.grad.abs().sum() == 0


def test_sft_nll():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    assert close(F.sft_nll(logp, mask, num_tokens=3), 2.0)  # (1+2+3)/3
    # row weights [1, 0.5]: (1 + 2 + 0.5·3)/3 = 4.5/3 = 1.5
    assert close(F.sft_nll(logp, mask, num_tokens=3, weights=torch.tensor([1.0, 0.5])), 1.5)
    # token weights: (0·1 + 1·2 + 2·3)/3 = 8/3
    w = torch.tensor([[0.0, 1.0], [2.0, 9.0]])
    assert close(F.sft_nll(logp, mask, num_tokens=3, weights=w), 8 / 3)
    x = logp.clone().requires_grad_()
    z = F.sft_nll(x, mask, num_tokens=0)
    assert z.item() == 0.0 and z.requires_grad


def test_kl_estimate():
    logp = torch.tensor([-1.0, -2.0, -1.0])
    ref = torch.tensor([-2.0, -1.0, -1.0])
    assert close(F.kl_estimate(logp, ref, "k1"), [1.0, -1.0, 0.0])
    assert close(F.kl_estimate(logp, ref, "k2"), [0.5, 0.5, 0.0])  # ½·(±1)²
    # k3: d = ref − logp; e^d − d − 1: d=−1 → 0.367879 + 1 − 1 = 0.367879; d=1 → 2.718282 − 2 = 0.718282
    assert close(F.kl_estimate(logp, ref, "k3"), [0.367879, 0.718282, 0.0])
    assert close(F.kl_estimate(logp, ref), [0.367879, 0.718282, 0.0])  # k3 is the default
    # clamp to [−10, 10]: d = 30 → e^20 − 21 → 10; d = −30 → e^−20 + 20 − 1 ≈ 19 → 10
    far = F.kl_estimate(torch.tensor([-40.0, 0.0]), torch.tensor([-10.0, -30.0]), "k3")
    assert close(far, [10.0, 10.0])
    with pytest.raises(ValueError, match="k1, k2, k3"):
        F.kl_estimate(logp, ref, "full")


def test_sequence_logprob():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert close(F.sequence_logprob(logp, mask), [-3.0, 0.0])  # −1 − 2; empty row 0
    assert close(F.sequence_logprob(logp, mask, normalize=True), [-1.5, 0.0])  # −3/2


def test_gibbs_target_closed_form_and_gift_sanity_number():
    beta, p = 20.0, 1e-6
    V = 4
    rest = (1 - p) / (V - 1)
    ref = torch.tensor([[p, rest, rest, rest]]).log()
    q = F.gibbs_target(ref, torch.tensor([0]), beta)
    # q(y*) = p·e^β / (p·e^β + 1 − p); e^20 = 4.85165e8 → p·e^β = 485.165
    # non-gold mass = (1 − p)/(485.165 + 0.999999) = 0.0020569 → 0.0021 (algorithms.md §6)
    gold = p * math.exp(beta) / (p * math.exp(beta) + 1 - p)
    assert close(q[0, 0], gold, 1e-4)  # 1e-4: the code's +1e-10 inside the log moves p by 1e-4 relative
    assert round(1 - q[0, 0].item(), 4) == 0.0021
    # the non-gold tokens keep the reference's relative shape, and q sums to 1
    assert close(q[0, 1:], torch.full((3,), (1 - gold) / 3), 1e-4) and close(q.sum(), 1.0)
    # no gradient, even from a reference that has one
    r = ref.clone().requires_grad_()
    assert not F.gibbs_target(r, torch.tensor([0]), beta).requires_grad


def test_gibbs_target_smoothing_and_zero_beta():
    # β = 0, λ = 0.5, V = 4: q = p̃ = 0.5·p + 0.5/4 (the 1e-10 is negligible)
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    q = F.gibbs_target(p.log(), torch.tensor([1]), beta=0.0, smooth=0.5)
    assert close(q, [[0.475, 0.175, 0.175, 0.175]])


def test_soft_cross_entropy_value_and_gradient():
    # log_softmax([0, ln 3]) = [ln 0.25, ln 0.75]; target [0.5, 0.5]:
    # −(0.5·(−1.386294) + 0.5·(−0.287682)) = 0.836988; grad = softmax − target = [−0.25, 0.25]
    logits = torch.tensor([0.0, math.log(3)], requires_grad=True)
    target = torch.tensor([0.5, 0.5])
    ce = F.soft_cross_entropy(logits, target)
    assert close(ce, 0.836988)
    ce.backward()
    assert close(logits.grad, [-0.25, 0.25])


def test_soft_cross_entropy_with_large_beta_is_the_label_nll():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    ref = torch.log_softmax(torch.randn(2, 5, 7, generator=g), -1)
    q = F.gibbs_target(ref, labels, beta=1e3)  # e^1000 swamps the reference: one-hot
    nll = -F.logprobs_from_logits(logits, labels)
    assert torch.allclose(F.soft_cross_entropy(logits, q), nll, atol=1e-5)


def test_truncated_is_weight_caps_ratio_and_ignores_unsampled_tokens():
    # π_old / π_sampling = 0.5/0.25 = 2 (capped to 1.5), 0.2/0.4 = 0.5 (kept); padding → 1.
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    samp = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    mask = torch.tensor([[True, True, False]])
    w = F.truncated_is_weight(old, samp, mask, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 1.0]]))
    assert not w.requires_grad
    # A token the engine found nearly impossible: capped in log space, no overflow.
    huge = F.truncated_is_weight(torch.zeros(1, 1), torch.full((1, 1), -1e4), torch.ones(1, 1, dtype=torch.bool), cap=2.0)
    assert float(huge) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="cap must be > 0"):
        F.truncated_is_weight(old, samp, mask, cap=0.0)


# --- PPO's logged value, REINFORCE++, CISPO (appended with the baselines) ------------------------


@pytest.mark.parametrize("clip_high, clip_dual", [(None, None), (0.28, None), (None, 3.0)])
def test_ppo_token_loss_value_is_clipped_surrogate_and_gradient_the_masked_form(clip_high, clip_dual):
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(6, 5, generator=g) * 0.5).requires_grad_(True)
    old = torch.randn(6, 5, generator=g) * 0.5
    adv = torch.randn(6, 1, generator=g).expand(6, 5)
    ratio = F.importance_ratio(logp, old)
    ref, kept = F.clipped_surrogate(ratio, adv, 0.2, clip_high, clip_dual)
    assert 0 < int(kept.sum()) < kept.numel()  # some tokens clipped, some kept
    value = F.ppo_token_loss(ratio, adv, kept, 0.2, clip_high, clip_dual)
    torch.testing.assert_close(value, ref)
    (g1,) = torch.autograd.grad(value.sum(), logp)
    (g2,) = torch.autograd.grad((-adv * F.importance_ratio(logp, old) * kept).sum(), logp)
    torch.testing.assert_close(g1, g2)


def test_reinforce_pp_advantages_match_verls_loop():
    # verl compute_reinforce_plus_plus_outcome_advantage: running return reset after each row's end,
    # then masked_whiten (unbiased variance, + 1e-8).
    r = torch.tensor([[0.1, -0.2, 1.0, 0.0], [0.0, 0.5, 0.0, 0.0], [-0.1, -0.1, -0.1, 0.7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    gamma = 0.9
    returns, running = torch.zeros_like(r), torch.zeros(3)
    for t in reversed(range(4)):
        running = r[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    vals = returns[mask]
    expected = (returns - vals.mean()) * torch.rsqrt(vals.var(unbiased=True) + 1e-8) * mask
    torch.testing.assert_close(F.reinforce_pp_advantages(r * mask, mask, gamma=gamma), expected)
    assert float(F.reinforce_pp_advantages(r * mask, mask, gamma=gamma)[mask].sum()) == pytest.approx(0.0, abs=1e-5)


def test_cispo_token_loss_value_and_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ratio = torch.tensor([[2.0, 0.5]])
    adv = torch.tensor([[1.0, -1.0]])
    loss = F.cispo_token_loss(logp, ratio, adv, eps_low=0.2, eps_high=0.28)
    # weights clip(2.0) = 1.28, clip(0.5) = 0.8: −1.28·1·(−1) = 1.28, −0.8·(−1)·(−2) = −1.6
    assert loss[0].tolist() == pytest.approx([1.28, -1.6])
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.28, 0.8])  # −ŵ·A, both tokens kept


def test_gibbs_target_exact_at_p_1e_9_is_eq_18():
    """β = 10, p_ref(y*) = 1e-9 (float64): Eq. 18 gives q(y*) = p·e^β/(p·e^β + 1 − p) = 2.2026e-5; the
    official log(p + 1e-10) gives 2.4229e-5 (10 % off); the float32 gibbs_target is off by the same 10 %."""
    p = 1e-9
    ref = torch.tensor([p, 0.5, 0.3, 0.2 - p], dtype=torch.float64).log()
    exact_gold = p * math.exp(10) / (p * math.exp(10) + 1 - p)
    q = F.gibbs_target_exact(ref, torch.tensor(0), beta=10.0)
    assert q.dtype == torch.float64
    assert float(q[0]) == pytest.approx(exact_gold, rel=1e-12) and exact_gold == pytest.approx(2.20260e-5, rel=1e-5)
    # the non-gold tokens keep the base's shape, scaled by 1/(p·e^β + 1 − p)
    assert q[1:].tolist() == pytest.approx([x / (p * math.exp(10) + 1 - p) for x in (0.5, 0.3, 0.2 - p)], rel=1e-12)
    guarded_gold = 1.1e-9 * math.exp(10) / (1.1e-9 * math.exp(10) + 1 - p + 3e-10)
    official = F.gibbs_target_exact(ref, torch.tensor(0), beta=10.0, guard=1e-10)
    assert float(official[0]) == pytest.approx(guarded_gold, rel=1e-9) and float(official[0]) / exact_gold == pytest.approx(1.1, rel=1e-4)
    assert float(F.gibbs_target(ref[None], torch.tensor([0]), 10.0)[0, 0]) == pytest.approx(guarded_gold, rel=1e-4)


def test_gibbs_target_exact_smoothing_zero_mass_and_dtype():
    # base [0.5, 0.5, 0, 0], λ = 0.2, V = 4: p̃ = [0.45, 0.45, 0.05, 0.05]; β = ln 3 on token 0 → [1.35, .45, .05, .05]/1.9
    ref = torch.tensor([0.5, 0.5, 0.0, 0.0]).log()
    q = F.gibbs_target_exact(ref, torch.tensor(0), beta=math.log(3.0), smooth=0.2)
    torch.testing.assert_close(q, torch.tensor([0.710526, 0.236842, 0.026316, 0.026316]), atol=1e-6, rtol=0)
    # λ = 0: tokens without base mass get exactly 0 (no guard), the rest [1.5, 0.5]/2
    q0 = F.gibbs_target_exact(ref, torch.tensor(0), beta=math.log(3.0))
    assert q0.tolist() == pytest.approx([0.75, 0.25, 0.0, 0.0], abs=1e-7) and float(q0[2]) == 0.0
    # λ = 1: the uniform distribution, tilted
    q1 = F.gibbs_target_exact(ref, torch.tensor(1), beta=math.log(3.0), smooth=1.0)
    assert q1.tolist() == pytest.approx([1 / 6, 1 / 2, 1 / 6, 1 / 6], abs=1e-7)
    assert F.gibbs_target_exact(ref.bfloat16(), torch.tensor(0), beta=1.0).dtype == torch.float32
