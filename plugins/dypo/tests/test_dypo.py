"""DYPO plugin: grading, the teacher draw, the Group Alignment Loss, α mixing, hand-computed numbers.

Losses are checked on hand-made batches whose rows have chosen lengths and log-probs, so every
expected number is written out as arithmetic. ``run_split`` feeds those tensors through the
engine's own per-micro-batch code path (``posttrain.loss.micro_batch_loss``:
reference_denominator → shape_ratio → stabilization_mask → build_loss, defaults included) by
standing in for the model's forward pass.

Shorthands: sp(d) = −log σ(d) = log(1 + e^{−d}), sg(x) = σ(x).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from posttrain import ModelOutputs, Route, hookimpl
from posttrain.batching import build_train_batch, micro_batch_rows, totals_of
from posttrain.config import validate_algorithm
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.testing import fill_tokens, sized_group, split_loss, tiny_group, tiny_tokenizer
from posttrain.verify import VerifyResult
from posttrain_dypo import plugin as dypo
from posttrain_dypo.plugin import DYPOConfig, group_alignment_loss, pick_teacher

ROOT = Path(__file__).resolve().parents[3]
TOK = tiny_tokenizer()
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
LOG2 = math.log(2.0)


def sp(d: float) -> float:
    return math.log1p(math.exp(-d))


def sg(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager("dypo")


def group(rewards, lens, uid, *, demo_lens=(3,)):
    """A verified group whose rollouts have the given token counts (EOS included)."""
    return sized_group(rewards, lens, demo_lens=demo_lens, uid=uid)


def route_all(pm, cfg, groups, metrics=None, step=0):
    metrics = metrics if metrics is not None else Metrics()
    return [pm.hook.route_group(group=g, config=cfg, step=step, metrics=metrics) for g in groups]


def make_batch(pm, cfg, groups, routes):
    batch = build_train_batch(groups, routes, PAD)
    batch.advantages = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=Metrics())
    return batch


fill = fill_tokens  # [N, L] from per-row values


def run_split(pm, cfg, batch, split, logprobs, metrics=None):
    """Loss of a mini-batch processed as the given micro-batches; returns (total, parts, ∂/∂logp)."""
    r = split_loss(pm.hook, cfg, batch, split, logprobs, needs=pm.hook.requirements(config=cfg), max_len=16,
                   metrics=metrics)
    return r.total, r.parts, r.logprob_grad


# --- config -----------------------------------------------------------------------------------------


def test_config_defaults_are_the_paper_setup(pm):
    cfg = pm.hook.algorithm_config()()
    assert isinstance(cfg, DYPOConfig) and cfg.name == "dypo"
    assert (cfg.alpha, cfg.gal_beta, cfg.sft_coef) == (0.5, 1.0, 1.0)  # α, β_GAL (Table 5), γ
    assert (cfg.gal_reference, cfg.gal_length_norm, cfg.gal_pair_reduction) == ("initial", False, "mean")
    assert (cfg.norm_adv_by_std, cfg.adv_eps, cfg.clip_low, cfg.loss_agg) == (True, 1e-6, 0.2, "token-mean")
    assert (cfg.kl_coef, cfg.entropy_coef, cfg.teacher_seed) == (0.0, 0.0, 0)
    needs = pm.hook.requirements(config=cfg)
    assert needs.rollouts and needs.reference and needs.whole_groups and not needs.entropy
    # no GAL (α = 1) or GAL against π_old: no reference model to load, unless the KL needs it
    assert not pm.hook.requirements(config=DYPOConfig(alpha=1.0)).reference
    assert not pm.hook.requirements(config=DYPOConfig(gal_reference="old")).reference
    assert pm.hook.requirements(config=DYPOConfig(alpha=1.0, kl_coef=0.01)).reference


@pytest.mark.parametrize("section, expected", [
    ({"alpha": 1.5}, "alpha must be in [0, 1], got 1.5"),
    ({"gal_beta": 0}, "gal_beta must be > 0, got 0"),
    ({"sft_coef": -1}, "sft_coef (γ) must be >= 0, got -1"),
    ({"gal_reference": "ref"}, "gal_reference 'ref' is not one of initial | old"),
    ({"gal_pair_reduction": "max"}, "gal_pair_reduction 'max' is not one of mean | sum"),
    ({"gal_bta": 1.0}, "gal_beta"),  # a typo gets a did-you-mean
])
def test_config_errors_name_the_field(section, expected):
    obj, problems = validate_algorithm({"name": "dypo", **section}, DYPOConfig)
    assert obj is None and any(expected in p for p in problems), problems


@pytest.mark.parametrize("path", ["configs/dypo.yaml", "configs/demo/dypo.yaml"])
def test_shipped_configs_validate(path):
    from posttrain.run import load_config, resolve_stages

    (stage,) = resolve_stages(load_config(ROOT / path), source=path)
    algo = stage.algo
    assert isinstance(algo, DYPOConfig) and (algo.alpha, algo.gal_beta, algo.sft_coef) == (0.5, 1.0, 1.0)
    assert (algo.gal_reference, algo.clip_low, algo.kl_coef) == ("initial", 0.2, 0.0)
    assert len(stage.run.data.demo_keys) >= 1
    if path == "configs/dypo.yaml":  # §4.1: 8 rollouts, 8192 tokens, lr 1e-6, bf16
        t, r = stage.run.trainer, stage.run.rollout
        assert (r.n, r.max_new_tokens, t.lr, stage.run.model.dtype) == (8, 8192, 1e-6, "bfloat16")
        assert len(stage.run.data.demo_keys) == 2  # DeepSeek-R1 and Qwen3-235B-A22B traces
        assert stage.run.eval.temperature == 0.6


# --- grading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("correct", range(5))
def test_grading_of_every_count(pm, correct):
    """Of 4 rollouts: 0 correct → hard (SFT, γ, one teacher), 4 → easy (dropped), else mid (RL)."""
    cfg = DYPOConfig(sft_coef=0.7)
    g = tiny_group([1] * correct + [0] * (4 - correct), uid="hard", demos=("a", "b"))
    r = pm.hook.route_group(group=g, config=cfg, step=0, metrics=Metrics())
    if correct == 0:  # uid "hard", seed 0, step 0 draws teacher 1 of 2
        assert r == Route(rl=0.0, sft=0.7, demos=(1,), members=()) and r.kind == "sft"
    elif correct == 4:
        assert r == Route(drop=True) and r.kind == "drop"
    else:
        assert r == Route(rl=1.0, members=(0, 1, 2, 3)) and r.kind == "rl"
    assert [dypo.grade(c, 4) for c in range(5)] == ["hard", "mid", "mid", "mid", "easy"]


def test_grading_counts_on_policy_rollouts_only(pm):
    """A demonstration among the members (put there by an extension) does not make a prompt mid."""
    g = tiny_group([0, 0, 0], uid="hard", demos=("a", "b"))
    g.members.append(g.demonstrations[0])  # off-policy, reward 1.0
    r = pm.hook.route_group(group=g, config=DYPOConfig(), step=0, metrics=Metrics())
    assert r == Route(rl=0.0, sft=1.0, demos=(1,), members=())


def test_hard_prompt_without_demonstration_or_gamma_zero_is_dropped(pm):
    m = Metrics()
    no_demo = tiny_group([0, 0, 0], uid="x", demos=())
    assert pm.hook.route_group(group=no_demo, config=DYPOConfig(), step=0, metrics=m) == Route(drop=True)
    assert m.summary()["dypo/no_demo"] == 1.0
    hard = tiny_group([0, 0, 0], uid="x", demos=("a",))
    assert pm.hook.route_group(group=hard, config=DYPOConfig(sft_coef=0.0), step=0, metrics=Metrics()) == Route(drop=True)


# --- the teacher draw (Eq. 5) -------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 5])
def test_teacher_draw_is_uniform(m):
    n = 6000
    counts = Counter(pick_teacher(0, f"prompt:{i}", 0, m) for i in range(n))
    assert set(counts) == set(range(m))
    sd = math.sqrt(n * (1 / m) * (1 - 1 / m))  # binomial std of one teacher's count
    assert all(abs(c - n / m) < 4 * sd for c in counts.values()), counts
    # one prompt met again and again (a new draw every step) is also uniform over its teachers
    steps = Counter(pick_teacher(0, "prompt:0", s, m) for s in range(n))
    assert all(abs(c - n / m) < 4 * sd for c in steps.values()), steps


def test_teacher_draw_is_reproducible_under_a_seed(pm):
    uids = [f"p{i}" for i in range(200)]
    draw = lambda seed: [pick_teacher(seed, u, 3, 2) for u in uids]  # noqa: E731
    torch.manual_seed(123)
    first = draw(7)
    torch.manual_seed(999)  # the global RNG plays no part
    assert draw(7) == first
    other = draw(8)
    assert other != first and 60 < sum(a != b for a, b in zip(first, other)) < 140  # ~half change
    # through the hook, with a fresh plugin manager: the same seed routes to the same teacher
    cfg = DYPOConfig(teacher_seed=7)
    groups = [tiny_group([0, 0], uid=u, demos=("a", "b")) for u in uids[:20]]
    m = Metrics()
    routes = route_all(pm, cfg, groups, m, step=3)
    assert [r.demos[0] for r in routes] == first[:20]
    assert routes == route_all(make_plugin_manager("dypo"), cfg, groups, step=3)
    s = m.summary()
    assert s["dypo/teacher_0"] + s["dypo/teacher_1"] == 20 and s["dypo/teacher_1"] == sum(first[:20])


# --- the Group Alignment Loss, on sequence log-ratios ------------------------------------------------


def gal(z, correct, groups=None, beta=1.0, reduction="mean", rows=None):
    z = torch.tensor(z, requires_grad=True)
    n = len(correct)
    g = torch.tensor(groups if groups is not None else [0] * n)
    r = torch.ones(n, dtype=torch.bool) if rows is None else torch.tensor(rows)
    loss, stats = group_alignment_loss(z, torch.tensor(correct), g, r, beta=beta, num_rows=float(r.sum()),
                                       pair_reduction=reduction)
    loss.backward()
    return float(loss.detach()), z.grad.tolist(), {k: v.tolist() for k, v in stats.items()}


def assert_stats(stats, abs=None, **expected):
    """Per-group GAL statistics against hand numbers (lists, one value per group with a pair)."""
    assert set(stats) == set(expected)
    for k, v in expected.items():
        assert stats[k] == pytest.approx(v, abs=abs), k


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.1])
def test_gal_at_d_zero_is_log2_with_half_beta_gradient(beta):
    """d = 0: −log σ(0) = log 2, ∂/∂z_s = −β(1 − σ(0)) = −β/2, ∂/∂z_f = +β/2 (Eq. 16)."""
    loss, grad, stats = gal([0.3, 0.3], [True, False], beta=beta)
    assert loss == pytest.approx(LOG2)
    assert grad == pytest.approx([-beta / 2, beta / 2])
    assert_stats(stats, loss=[LOG2], weight=[0.5], d=[0.0], pairs=[1.0])


@pytest.mark.parametrize("beta, value, g", [
    (1.0, 0.2014133, 0.1824255),  # d = 1.5: sp(1.5); β·(1 − σ(1.5)) = sg(−1.5)
    (2.0, 0.0485874, 0.0948517),  # β·d = 3:  sp(3);   2·sg(−3)
])
def test_gal_at_d_nonzero(beta, value, g):
    loss, grad, stats = gal([1.0, -0.5], [True, False], beta=beta)
    assert loss == pytest.approx(value, abs=1e-7) and loss == pytest.approx(sp(beta * 1.5))
    assert grad == pytest.approx([-g, g], abs=1e-7)
    assert stats["weight"] == pytest.approx([sg(-beta * 1.5)]) and stats["d"] == pytest.approx([1.5])
    # the order of rows does not matter, only who succeeded
    assert gal([-0.5, 1.0], [False, True], beta=beta)[0] == pytest.approx(loss)


def test_gal_averages_all_success_failure_pairs():
    """S = {z=1}, F = {−0.5, 0}: pairs d = 1.5 and 1.0, L = (sp(1.5) + sp(1))/2 = 0.2573375."""
    loss, grad, stats = gal([1.0, -0.5, 0.0], [True, False, False])
    assert loss == pytest.approx((sp(1.5) + sp(1.0)) / 2) and loss == pytest.approx(0.2573375, abs=1e-7)
    # ∂/∂z_s = −(sg(−1.5) + sg(−1))/2; each failure gets +sg(−d)/2 from its one pair
    assert grad == pytest.approx([-(sg(-1.5) + sg(-1.0)) / 2, sg(-1.5) / 2, sg(-1.0) / 2])
    assert grad == pytest.approx([-0.2256835, 0.0912128, 0.1344707], abs=1e-7)
    assert_stats(stats, abs=1e-7, loss=[loss], weight=[0.2256835], d=[1.25], pairs=[2.0])
    # sum over the pairs instead of the mean: twice the value and the gradient
    loss_s, grad_s, _ = gal([1.0, -0.5, 0.0], [True, False, False], reduction="sum")
    assert loss_s == pytest.approx(2 * loss) and grad_s == pytest.approx([2 * x for x in grad])
    # 2 × 2: four pairs, every success against every failure
    loss4, grad4, stats4 = gal([1.0, 0.0, 0.5, -1.0], [True, True, False, False])
    pairs = [1.0 - 0.5, 1.0 + 1.0, 0.0 - 0.5, 0.0 + 1.0]
    assert stats4["pairs"] == [4.0] and loss4 == pytest.approx(sum(sp(d) for d in pairs) / 4)
    assert grad4[0] == pytest.approx(-(sg(-0.5) + sg(-2.0)) / 4)
    assert grad4[3] == pytest.approx((sg(-2.0) + sg(-1.0)) / 4)


def test_gal_averages_groups_and_never_pairs_across_them():
    """Two groups of 3: their losses are averaged; a success of one never pairs with a failure of the other."""
    z = [1.0, -0.5, 0.0, 0.2, 0.4, 0.6]
    correct = [True, False, False, False, True, True]
    loss, grad, stats = gal(z, correct, groups=[7, 7, 7, 3, 3, 3])
    l1, l2 = (sp(1.5) + sp(1.0)) / 2, (sp(0.2) + sp(0.4)) / 2
    assert loss == pytest.approx((l1 + l2) / 2)
    assert sorted(stats["pairs"]) == [2.0, 2.0] and sorted(stats["loss"]) == pytest.approx(sorted([l1, l2]))
    assert grad[3] == pytest.approx((sg(-0.2) + sg(-0.4)) / 2 / 2)  # the failure of group 3, halved by the group mean
    # rows left out (not mid rollouts) neither pair nor count
    loss_r, grad_r, _ = gal(z + [9.0], correct + [False], groups=[7, 7, 7, 3, 3, 3, 7], rows=[True] * 6 + [False])
    assert loss_r == pytest.approx(loss) and grad_r[6] == 0.0
    # nothing taking part: 0, with a graph
    z0 = torch.zeros(2, requires_grad=True)
    empty, st = group_alignment_loss(z0, torch.tensor([True, False]), torch.zeros(2, dtype=torch.long),
                                     torch.zeros(2, dtype=torch.bool), beta=1.0, num_rows=0.0)
    assert float(empty.detach()) == 0.0 and empty.requires_grad and st["pairs"].numel() == 0


def test_gal_is_finite_for_large_log_ratios():
    """Sequence sums of long responses give |d| in the hundreds: softplus, not log(sigmoid)."""
    loss, grad, _ = gal([400.0, -400.0], [True, False])
    assert loss == pytest.approx(0.0, abs=1e-12) and grad == pytest.approx([0.0, 0.0], abs=1e-12)
    loss, grad, _ = gal([-400.0, 400.0], [True, False])
    assert loss == pytest.approx(800.0) and grad == pytest.approx([-1.0, 1.0])


# --- all three grades in one batch, through the engine's loss path ------------------------------------

# Prompts:  easy [1,1,1]      → dropped
#           hard [0,0,0]      → SFT (γ = 0.5) on teacher 1 of 2 (uid "hard", seed 0): 4 tokens, logp [-1,-2,-3,-2]
#           mid  [1,0,0]      → α·GRPO + (1−α)·GAL; lengths [2,1,2], logp −1, −2, −1 per token,
#                                π_ref −1.5, −1.5, −1 per token → z = [1, −0.5, 0]
# Rows: [demo, mid0, mid1, mid2]. Â = (r − 1/3)/(std + 1e-6), std = √(1/3): [1.1546985, −0.5773493, −0.5773493].
A_MID = [2 / 3 / (math.sqrt(1 / 3) + 1e-6), -1 / 3 / (math.sqrt(1 / 3) + 1e-6), -1 / 3 / (math.sqrt(1 / 3) + 1e-6)]
GRPO_MID = -(A_MID[0] * 2 + A_MID[1] * 1 + A_MID[2] * 2) / 5  # −Σ Â_i|y_i| / 5 mid tokens (ρ = 1)
GAL_MID = (sp(1.5) + sp(1.0)) / 2
DGAL_MID = [-(sg(-1.5) + sg(-1.0)) / 2, sg(-1.5) / 2, sg(-1.0) / 2]  # ∂GAL/∂z_i


def three_grade_batch(pm, cfg, metrics=None, extra=()):
    groups = [group([1, 1, 1], [2, 2, 2], "easy", demo_lens=(3, 4)),
              group([0, 0, 0], [2, 2, 2], "hard", demo_lens=(3, 4)),
              group([1, 0, 0], [2, 1, 2], "mid", demo_lens=(3, 4)), *extra]
    routes = route_all(pm, cfg, groups, metrics)
    batch = make_batch(pm, cfg, groups, routes)
    lp = fill(batch, [[-1.0, -2.0, -3.0, -2.0], -1.0, -2.0, -1.0] + [-0.5] * (len(batch) - 4))
    batch.ref_logprobs = fill(batch, [0.0, -1.5, -1.5, -1.0] + [-0.7] * (len(batch) - 4))
    return routes, batch, lp


def test_all_three_grades_in_one_batch(pm):
    cfg = DYPOConfig(sft_coef=0.5)
    m = Metrics()
    routes, batch, _ = three_grade_batch(pm, cfg, m)
    assert routes == [Route(drop=True), Route(rl=0.0, sft=0.5, demos=(1,), members=()), Route(rl=1.0, members=(0, 1, 2))]
    # rows: the hard prompt's drawn demonstration, then the mid prompt's rollouts; nothing of the easy one
    assert batch.prompt_index.tolist() == [1, 2, 2, 2]
    assert batch.teacher.tolist() == [1, -1, -1, -1] and batch.off_policy.tolist() == [True, False, False, False]
    assert batch.response_mask.sum(-1).tolist() == [4, 2, 1, 2]  # teacher 1's demonstration has 4 tokens
    assert batch.sft_weight.tolist() == [0.5, 0, 0, 0] and batch.rl_weight.tolist() == [0, 1, 1, 1]
    assert batch.advantages.tolist() == pytest.approx([0.0] + A_MID)
    s = m.summary()
    assert (s["dypo/easy"], s["dypo/hard"], s["dypo/mid"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert s["dypo/offline_ratio"] == 0.5  # of the two prompts that train, one learns from a demonstration
    assert s["dypo/teacher_1"] == 1.0 and "dypo/teacher_0" not in s


def test_all_three_grades_loss_and_gradient(pm):
    cfg = DYPOConfig(sft_coef=0.5)
    _, batch, lp = three_grade_batch(pm, cfg)
    m = Metrics()
    total, parts, grad = run_split(pm, cfg, batch, [[0, 1, 2, 3]], lp, m)
    assert parts == pytest.approx({"pg": 0.5 * GRPO_MID, "gal": 0.5 * GAL_MID, "sft": 0.5 * 8 / 4})
    assert GRPO_MID == pytest.approx(-0.1154699, abs=1e-7) and GAL_MID == pytest.approx(0.2573375, abs=1e-7)
    assert total == pytest.approx(-0.0577349 + 0.1286687 + 1.0, abs=1e-6)
    # demo tokens: −γ/4; mid token of row i: α·(−Â_i/5) + (1−α)·∂GAL/∂z_i (token sums: ∂z_i/∂logp_t = 1)
    mid = [0.5 * (-a / 5) + 0.5 * g for a, g in zip(A_MID, DGAL_MID)]
    assert mid == pytest.approx([-0.2283116, 0.1033413, 0.1249703], abs=1e-7)
    assert torch.allclose(grad, fill(batch, [-0.5 / 4] + mid), atol=1e-7)
    s = m.summary()  # one mid group: the logged GAL value, bounded weight and d are its own
    assert s["dypo/gal"] == pytest.approx(GAL_MID) and s["dypo/gal_pairs"] == 2.0
    assert s["dypo/gal_weight"] == pytest.approx((sg(-1.5) + sg(-1.0)) / 2) and s["dypo/gal_d"] == pytest.approx(1.25)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_alpha_mixes_grpo_and_gal(pm, alpha):
    """Mid rows: α·L_GRPO + (1−α)·L_GAL, value and gradient; the SFT term does not depend on α."""
    cfg = DYPOConfig(alpha=alpha, sft_coef=0.5)
    _, batch, lp = three_grade_batch(pm, cfg)
    total, parts, grad = run_split(pm, cfg, batch, [[0, 1, 2, 3]], lp)
    expected = {"sft": 1.0}
    if alpha > 0:
        expected["pg"] = alpha * GRPO_MID
    if alpha < 1:
        expected["gal"] = (1 - alpha) * GAL_MID
    assert parts == pytest.approx(expected)
    mid = [alpha * (-a / 5) + (1 - alpha) * g for a, g in zip(A_MID, DGAL_MID)]
    assert torch.allclose(grad, fill(batch, [-0.5 / 4] + mid), atol=1e-7)


def test_grpo_part_is_clipped_at_eps(pm):
    """ρ = π_θ/π_old outside [0.8, 1.2] on the side the advantage pushes: no gradient (ε = 0.2)."""
    cfg = DYPOConfig(alpha=1.0, sft_coef=0.5)
    _, batch, lp = three_grade_batch(pm, cfg)
    # π_old chosen so ρ = e^{0.3} = 1.35 on mid0 (Â > 0: clipped), e^{−0.3} = 0.74 on mid1 (Â < 0: clipped),
    # ρ = e^{0.1} = 1.105 on mid2 (inside: kept, gradient −Â·ρ/5)
    batch.old_logprobs = lp - fill(batch, [0.0, 0.3, -0.3, 0.1])
    _, _, grad = run_split(pm, cfg, batch, [[0, 1, 2, 3]], lp)
    assert torch.allclose(grad, fill(batch, [-0.5 / 4, 0.0, 0.0, -A_MID[2] * math.exp(0.1) / 5]), atol=1e-6)


def test_kl_sits_inside_the_grpo_part(pm):
    """β_KL > 0: α·β_KL·token-mean k3 KL over mid tokens (Eq. 21 puts the KL inside L_GRPO)."""
    cfg = DYPOConfig(sft_coef=0.5, kl_coef=0.1)
    _, batch, lp = three_grade_batch(pm, cfg)
    _, parts, _ = run_split(pm, cfg, batch, [[0, 1, 2, 3]], lp)
    k3 = lambda x: math.exp(x) - x - 1  # noqa: E731  x = log π_ref − log π_θ per token: −0.5 (×2), +0.5, 0 (×2)
    assert parts["kl"] == pytest.approx(0.5 * 0.1 * (2 * k3(-0.5) + k3(0.5)) / 5)
    assert parts["kl"] == pytest.approx(0.0036178, abs=1e-7)


def test_missing_reference_log_probs_is_a_clear_error(pm):
    cfg = DYPOConfig()
    _, batch, lp = three_grade_batch(pm, cfg)
    batch = batch.with_(ref_logprobs=None, totals=totals_of(batch, max_len=16))
    adv = batch.advantages[:, None].expand_as(lp)
    with pytest.raises(RuntimeError, match="gal_reference=initial but the batch has no ref_logprobs"):
        dypo.build_loss(batch=batch, outputs=ModelOutputs(logprobs=lp), advantages=adv, ratio=torch.ones_like(lp),
                        mask=batch.response_mask, config=cfg, metrics=None)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_gal_against_pi_old_is_log2_with_half_beta_token_gradient(pm, beta):
    """gal_reference: old on the first update: d = 0, L_GAL = log 2, ∂/∂logp_t = ∓β/2 on τ_s / τ_f tokens."""
    cfg = DYPOConfig(alpha=0.0, gal_beta=beta, gal_reference="old")
    groups = [group([1, 0], [3, 2], "one-pair")]
    batch = make_batch(pm, cfg, groups, route_all(pm, cfg, groups))
    assert batch.ref_logprobs is None  # no reference model asked for
    lp = fill(batch, [[-0.1, -2.0, -0.7], [-1.3, -0.2]])
    total, parts, grad = run_split(pm, cfg, batch, [[0, 1]], lp)
    assert parts == pytest.approx({"gal": LOG2})
    assert torch.allclose(grad, fill(batch, [-beta / 2, beta / 2]), atol=1e-7)


def test_gal_length_normalised(pm):
    """gal_length_norm: z = token mean of log π_θ − log π_ref, so ∂z/∂logp_t = 1/|τ|."""
    cfg = DYPOConfig(alpha=0.0, gal_length_norm=True)
    groups = [group([1, 0], [3, 2], "one-pair")]
    batch = make_batch(pm, cfg, groups, route_all(pm, cfg, groups))
    lp = fill(batch, [-1.0, -1.0])
    batch.ref_logprobs = fill(batch, [[-1.0, -2.0, -3.0], [-1.0, -1.0]])  # z_s = (0+1+2)/3 = 1, z_f = 0
    total, parts, grad = run_split(pm, cfg, batch, [[0, 1]], lp)
    assert parts == pytest.approx({"gal": sp(1.0)})  # token sums would give sp(3)
    assert torch.allclose(grad, fill(batch, [-sg(-1.0) / 3, sg(-1.0) / 2]), atol=1e-7)


# --- micro-batching ---------------------------------------------------------------------------------------


def test_micro_batch_invariance_with_whole_groups(pm):
    """Hard + two mid prompts: one micro-batch, one per prompt, and the core's whole_groups split agree.

    The second mid prompt [0,1,1] has logp −0.5, π_ref −0.7 per token, lengths [1,2,3]: z = [.2,.4,.6].
    """
    cfg = DYPOConfig(sft_coef=0.5)
    _, batch, lp = three_grade_batch(pm, cfg, extra=[group([0, 1, 1], [1, 2, 3], "mid2")])
    assert batch.prompt_index.tolist() == [1, 2, 2, 2, 3, 3, 3]
    whole = run_split(pm, cfg, batch, [list(range(7))], lp)
    gal2 = (sp(0.2) + sp(0.4)) / 2
    assert whole[1]["gal"] == pytest.approx(0.5 * (GAL_MID + gal2) / 2)  # mean over the two mid groups
    by_prompt = micro_batch_rows(batch, token_budget=1, whole_groups=True)
    assert [r.tolist() for r in by_prompt] == [[0], [1, 2, 3], [4, 5, 6]]
    for split in (by_prompt, [[0, 4, 5, 6], [1, 2, 3]]):
        total, parts, grad = run_split(pm, cfg, batch, split, lp)
        assert total == pytest.approx(whole[0], rel=1e-6) and parts == pytest.approx(whole[1], rel=1e-6)
        assert torch.allclose(grad, whole[2], atol=1e-7)
    # what whole_groups prevents: one row per micro-batch leaves no pair, and GAL vanishes
    per_row = run_split(pm, cfg, batch, [[i] for i in range(7)], lp)
    assert per_row[1]["gal"] == 0.0 and per_row[1]["pg"] == pytest.approx(whole[1]["pg"])


# --- conformance and a real run ------------------------------------------------------------------------


def test_check_algorithm_plugin():
    from posttrain.testing import check_algorithm_plugin

    report = check_algorithm_plugin("dypo")
    assert report["routes"] == ["sft", "rl", "drop", "rl"]  # all-wrong, mixed, all-correct (easy), two teachers (1 of 4)
    assert set(report["terms"]) == {"pg", "gal", "sft"}
    # policy = reference at the start: d = 0 in every pair, so each mid group's GAL is log 2; α = 0.5
    assert report["terms"]["gal"] == pytest.approx(0.5 * LOG2, rel=1e-5)
    assert report["needs"].reference and report["needs"].whole_groups


class PatternVerifier:
    """Rewards by position: prompt i of a step gets PATTERNS[i % 4] (4 rollouts each), whatever it wrote."""

    PATTERNS = ([1.0] * 4, [0.0] * 4, [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0])  # easy, hard, mid, mid
    name = "pattern"

    def __init__(self):
        self.stats = {"answers": 0, "timeouts": 0, "errors": 0}

    def verify(self, items):
        self.stats["answers"] += len(items)
        return [VerifyResult(self.PATTERNS[i // 4 % 4][i % 4]) for i in range(len(items))]

    def close(self):
        pass


class PatternVerifierPlugin:
    @hookimpl
    def register_verifiers(self, register):
        register("pattern", lambda config: PatternVerifier())


def test_two_step_run_on_the_tiny_model(tmp_path):
    """Every step has one easy, one hard and two mid prompts, so all of DYPO's loss runs on a real model."""
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import make_tiny_model, tiny_config

    model = make_tiny_model(tmp_path / "m")
    cfg = tiny_config(model, tmp_path / "run", algorithm="dypo", steps=2,
                      overrides={"verifier.name": "pattern", "rollout.n": 4, "trainer.prompts_per_step": 4})
    finals = train(cfg, base=None, plugins=[PatternVerifierPlugin()])
    assert finals and all(Path(f).exists() for f in finals)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "dypo/mid" in r]
    assert len(rows) == 2
    for r in rows:
        assert (r["dypo/easy"], r["dypo/hard"], r["dypo/mid"], r["dypo/offline_ratio"]) == pytest.approx((0.25, 0.25, 0.5, 1 / 3))
        assert (r["route/drop"], r["route/sft"], r["route/rl"]) == pytest.approx((0.25, 0.25, 0.5))
        # one hard prompt a step, its demonstration drawn from the synthetic task's 2 teachers
        assert r.get("dypo/teacher_0", 0.0) + r.get("dypo/teacher_1", 0.0) == 1.0
        assert r["train/rows"] == 1 + 2 * 4 and r["dypo/gal_pairs"] == pytest.approx((4 + 3) / 2)
        assert all(math.isfinite(r[k]) for k in ("loss/pg", "loss/gal", "loss/sft", "loss/total", "train/grad_norm"))
        assert r["train/grad_norm"] > 0 and 0.0 < r["dypo/gal_weight"] < 1.0
    # the first update starts from the reference itself: d = 0, GAL = log 2, bounded weight 1/2
    assert rows[0]["dypo/gal"] == pytest.approx(LOG2, rel=1e-4) and rows[0]["dypo/gal_weight"] == pytest.approx(0.5, rel=1e-4)
    assert rows[0]["loss/gal"] == pytest.approx(0.5 * LOG2, rel=1e-4)
    # after one update the policy has left the reference
    assert rows[1]["dypo/gal"] != pytest.approx(LOG2, rel=1e-6)


# --- Eq. 4's weighting: E_q over every prompt, easy ones included -----------------------------------


def test_prompt_counts_per_route_in_the_totals(pm):
    _, batch, _ = three_grade_batch(pm, DYPOConfig(sft_coef=0.5))
    # 3 prompts drawn, 2 with rows (the easy one was dropped): each kept prompt stands for 1.5.
    assert batch.prompt_weight == 1.5
    t = totals_of(batch, max_len=16)
    assert (t.prompts, t.rl_prompts, t.sft_prompts) == (3.0, 1.0, 1.0)
    mid_only = totals_of(batch.select([1, 2, 3]), max_len=16)  # a mini-batch holding the mid prompt only
    assert (mid_only.prompts, mid_only.rl_prompts, mid_only.sft_prompts) == (1.5, 1.0, 0.0)


@pytest.mark.parametrize("weighting, mid_w, hard_w", [("per_term", 1.0, 1.0), ("prompt_fraction", 1 / 3, 1 / 3)])
def test_eq4_prompt_fraction_weighting_on_easy_hard_and_mid_prompts(pm, weighting, mid_w, hard_w):
    """Eq. 4: L = E_q[1_H·γ·L_SFT + 1_M·(α·L_GRPO + (1−α)·L_GAL)] over the 3 prompts (1 easy, 1 hard,
    1 mid): the hard part weighs 1/3, the mid part 1/3, the easy prompt 0 but it counts."""
    cfg = DYPOConfig(sft_coef=0.5, weighting=weighting)
    _, batch, lp = three_grade_batch(pm, cfg)
    total, parts, grad = run_split(pm, cfg, batch, [[0], [1, 2, 3]], lp)
    assert parts == pytest.approx({"pg": mid_w * 0.5 * GRPO_MID, "gal": mid_w * 0.5 * GAL_MID, "sft": hard_w * 1.0})
    if weighting == "prompt_fraction":
        assert total == pytest.approx((-0.0577349 + 0.1286687 + 1.0) / 3, abs=1e-6)
    mid = [mid_w * (0.5 * (-a / 5) + 0.5 * g) for a, g in zip(A_MID, DGAL_MID)]
    assert torch.allclose(grad, fill(batch, [hard_w * -0.5 / 4] + mid), atol=1e-7)


def test_weighting_must_be_known(pm):
    _, problems = validate_algorithm({"name": "dypo", "weighting": "paper"}, DYPOConfig)
    assert problems == ["algorithm: weighting 'paper' is not one of per_term | prompt_fraction"]


def test_logged_grpo_part_is_ppos_clipped_value(pm):
    """loss/pg is max(−Âρ, −Â·clip(ρ)) (what verl/TRL log), not −Âρ·1_kept: the clipped mid0 and mid1
    contribute −Â·1.2 and −Â·0.8 per token instead of 0."""
    cfg = DYPOConfig(alpha=1.0, sft_coef=0.5)
    _, batch, lp = three_grade_batch(pm, cfg)
    batch.old_logprobs = lp - fill(batch, [0.0, 0.3, -0.3, 0.1])  # ρ = 1.35, 0.74, 1.105 on mid rows
    _, parts, _ = run_split(pm, cfg, batch, [[0, 1, 2, 3]], lp)
    expected = -(A_MID[0] * 1.2 * 2 + A_MID[1] * 0.8 * 1 + A_MID[2] * math.exp(0.1) * 2) / 5
    assert parts["pg"] == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(-0.2066516, abs=1e-6)  # −Âρ·1_kept alone: 0.2552278
