"""SRFT plugin: weights, entropy, stop-gradient, every loss term by hand in both profiles,
the core's conformance check, and a 2-step run on the tiny model.

The hand-made step used by most tests (``_step``): one prompt, two rollouts and the
demonstration, so three rows after composition (the demonstration row carries both the RL
and the SFT weight):

    row 0  rollout, correct (r=1), 2 tokens, log π = −0.2 each, token entropy 0.5, 0.5
    row 1  rollout, wrong   (r=0), 3 tokens, log π = −0.4 each, token entropy 1, 2, 3
    row 2  demonstration    (r=1), 4 tokens, π = 0.5 each,     token entropy 2, 2, 2, 2

Sampled log-probs of the rollouts: row 0 −0.5, −0.5; row 1 −0.25, −0.5, −0.75, so the step's
batch entropy estimate is (1 + 1.5)/5 = 0.5. Mini-batch totals: 9 tokens, 3 RL rows (9 RL
tokens), 1 SFT row (4 SFT tokens), L_max = 8.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest
import torch

from posttrain import functional as F
from posttrain.batching import build_train_batch, totals_of
from posttrain.config import validate_algorithm
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.types import Example, ModelOutputs, PromptGroup, Route, Trajectory

from posttrain_srft import plugin as srft
from posttrain_srft.plugin import SRFTConfig, entropy_weights, sequence_entropy

EOS, PAD = 1, 0
LN2 = math.log(2.0)


def _group(rewards=(1.0, 0.0), lengths=(2, 3), demo_len=4, demo_reward=1.0, demos=1) -> PromptGroup:
    sampled = [[-0.5, -0.5], [-0.25, -0.5, -0.75]]
    members = [Trajectory(response_ids=[10 + i] * (n - 1) + [EOS], sampling_logprobs=sampled[i][:n], reward=r)
               for i, (r, n) in enumerate(zip(rewards, lengths))]
    demo_trajs = [Trajectory(response_ids=[20 + k] * (demo_len - 1) + [EOS], off_policy=True, teacher=k, reward=demo_reward)
                  for k in range(demos)]
    ex = Example(prompt="1+1=", answer="2", demonstrations=["d"] * demos, uid="t:1")
    return PromptGroup(example=ex, prompt_ids=[5, 6, 7], members=members, demonstrations=demo_trajs)


def _step(pm, cfg, max_len=8.0):
    """compose → route → rows → advantage, through the plugin manager, as the engine does."""
    m = Metrics()
    g = pm.hook.compose_group(group=_group(), config=cfg, step=0, metrics=m)
    route = pm.hook.route_group(group=g, config=cfg, step=0, metrics=m)
    batch = build_train_batch([g], [route], PAD)
    batch.advantages = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=m)
    batch.totals = totals_of(batch, max_len=max_len)
    return batch


def _outputs():
    lp = torch.tensor([[-0.2, -0.2, 0.0, 0.0], [-0.4, -0.4, -0.4, 0.0], [-LN2] * 4], requires_grad=True)
    ent = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0], [2.0] * 4], requires_grad=True)
    return ModelOutputs(logprobs=lp, entropy=ent)


def _loss(pm, batch, out, cfg, metrics=None):
    """The engine's micro-batch sequence (core/posttrain/loss.py) on given log-probs."""
    hook = pm.hook
    adv = batch.advantages[:, None].expand_as(out.logprobs)
    batch = batch.with_(old_logprobs=out.logprobs.detach())
    denom = hook.reference_denominator(batch=batch, logprobs=out.logprobs, config=cfg, step=0)
    ratio = hook.shape_ratio(batch=batch, ratio=F.importance_ratio(out.logprobs, denom), config=cfg, step=0)
    masks = hook.stabilization_mask(batch=batch, logprobs=out.logprobs, ratio=ratio, advantages=adv, config=cfg, step=0)
    mask = functools.reduce(torch.logical_and, [x for x in masks if x is not None], batch.response_mask)
    terms = hook.build_loss(batch=batch, outputs=out, advantages=adv, ratio=ratio, mask=mask, config=cfg, step=0,
                            metrics=metrics if metrics is not None else Metrics())
    return {t.name: t.value for t in terms}


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager("srft")


# --- weights and entropy -----------------------------------------------------------------------------


def test_weights_at_sanity_entropies():
    cfg = SRFTConfig()
    w_sft, w_rl = entropy_weights(torch.tensor([0.5, 2.0]), cfg)
    # 0.5·e^−0.5 = 0.3033, 0.1·e^0.5 = 0.1649; 0.5·e^−2 = 0.0677, 0.1·e^2 = 0.7389
    assert w_sft.tolist() == pytest.approx([0.30327, 0.06767], abs=1e-5)
    assert w_rl.tolist() == pytest.approx([0.16487, 0.73891], abs=1e-5)
    assert round(float(w_sft[0]), 3) == 0.303 and round(float(w_rl[0]), 3) == 0.165
    assert round(float(w_sft[1]), 3) == 0.068 and round(float(w_rl[1]), 3) == 0.739
    # ablations (paper Table 3): the weight is the constant 1.0
    w_sft, w_rl = entropy_weights(torch.tensor([0.5, 2.0]), SRFTConfig(w_sft_fixed=True, w_rl_fixed=True))
    assert w_sft.tolist() == [1.0, 1.0] and w_rl.tolist() == [1.0, 1.0]


def test_entropy_of_a_known_distribution_through_the_chunked_path():
    # position 0: p = (1/4, 1/4, 1/2) → H = 2·(1/4)·ln 4 + (1/2)·ln 2 = 1.5·ln 2 = 1.039721
    # position 1: uniform over 3 → H = ln 3 = 1.098612
    logits = torch.stack([torch.log(torch.tensor([0.25, 0.25, 0.5])), torch.zeros(3)])  # [2, V=3]
    assert F.entropy_from_logits(logits).tolist() == pytest.approx([1.5 * LN2, math.log(3)], abs=1e-6)
    hidden = torch.eye(2)[None]  # [1, L=2, H=2], head(h) = h @ logits → row t of logits
    _, ent, _ = F.chunked_token_stats(hidden, lambda h: h @ logits, torch.zeros(1, 2, dtype=torch.long),
                                      chunk_size=1, entropy=True)
    assert ent[0].tolist() == pytest.approx([1.039721, 1.098612], abs=1e-6)
    # the row's weight entropy is its mean token entropy: (1.039721 + 1.098612)/2 = 1.069167
    h = sequence_entropy(ent, torch.ones(1, 2, dtype=torch.bool))
    assert float(h) == pytest.approx(1.069167, abs=1e-6)
    # padding does not count; an empty row gets 0, not nan
    h = sequence_entropy(torch.tensor([[1.0, 3.0, 9.0], [5.0, 5.0, 5.0]]), torch.tensor([[1, 1, 0], [0, 0, 0]]).bool())
    assert h.tolist() == [2.0, 0.0]


def test_weights_use_the_core_forward_entropy(tmp_path, pm):
    """A tiny model with a zero LM head predicts uniformly over V = 100 tokens: every token has
    entropy ln 100 and log-prob −ln 100, so w_SFT = 0.5/100 = 0.005 and w_RL = 0.1·100 = 10."""
    from transformers import AutoModelForCausalLM

    from posttrain.loss import micro_batch_loss
    from posttrain.testing import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m"))
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    assert model.config.vocab_size == 100
    cfg = SRFTConfig()
    batch = _step(pm, cfg)
    m = Metrics()
    terms, stats = micro_batch_loss(pm.hook, cfg, 0, model, batch, m, needs=pm.hook.requirements(config=cfg), chunk=2)
    got = {t.name: float(t.value.detach()) for t in terms}
    ln100 = math.log(100.0)
    assert stats["train/entropy"] == pytest.approx(ln100, abs=1e-5)
    s = m.summary()
    assert s["srft/entropy"] == pytest.approx(ln100, abs=1e-5)
    assert s["srft/w_sft"] == pytest.approx(0.005, abs=1e-7)
    assert s["srft/w_rl"] == pytest.approx(10.0, abs=1e-4)
    # sft_demo = 0.005·(4·ln 100)/4 = 0.023026
    # rl_demo  = −(1/3)·4·f(0.01)/8, f(p) = p/(p+0.1) = 1/11 → −0.015152   (A_demo = 1 − 2/3)
    # rl_self  = (−10·2·(−ln 100) + 3·(−ln 100))/8 = 17·ln 100/8 = 9.785993
    # entropy  = −0.001·ln 100 = −0.004605
    assert got["sft_demo"] == pytest.approx(0.005 * ln100, abs=1e-6)
    assert got["rl_demo"] == pytest.approx(-(1 / 3) * 4 / 11 / 8, abs=1e-6)
    assert got["rl_self"] == pytest.approx(17 * ln100 / 8, abs=1e-4)
    assert got["entropy"] == pytest.approx(-0.001 * ln100, abs=1e-7)


# --- composition and routing ----------------------------------------------------------------------------


def test_compose_and_route_make_one_demo_row_with_both_weights(pm):
    cfg = SRFTConfig()
    g = pm.hook.compose_group(group=_group(demos=2), config=cfg, step=0, metrics=Metrics())
    assert [m.off_policy for m in g.members] == [False, False, True] and g.members[2].teacher == 0
    # composing again (already composed) adds nothing
    assert len(pm.hook.compose_group(group=g, config=cfg, step=0, metrics=Metrics()).members) == 3
    route = pm.hook.route_group(group=g, config=cfg, step=0, metrics=Metrics())
    assert route == Route(rl=1.0, sft=1.0, demos=(0,))
    batch = build_train_batch([g], [route], PAD)
    assert len(batch) == 3  # no duplicate SFT row for the demonstration
    assert batch.rl_weight.tolist() == [1.0, 1.0, 1.0] and batch.sft_weight.tolist() == [0.0, 0.0, 1.0]
    assert batch.off_policy.tolist() == [False, False, True]
    # without a demonstration: the rollouts only, RL only
    bare = dataclasses.replace(_group(), demonstrations=[])
    g2 = pm.hook.compose_group(group=bare, config=cfg, step=0, metrics=Metrics())
    assert len(g2.members) == 2
    assert pm.hook.route_group(group=g2, config=cfg, step=0, metrics=Metrics()) == Route(rl=1.0)


def test_advantage_over_the_augmented_group(pm):
    # rewards (1, 0, 1): mean 2/3; reference (no std) A = (1/3, −2/3, 1/3)
    assert _step(pm, SRFTConfig()).advantages.tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3], abs=1e-6)
    # paper (Eq. 7): unbiased std = sqrt(((1/3)² + (2/3)² + (1/3)²)/2) = sqrt(1/3) = 0.57735 → A = (0.57735, −1.1547, 0.57735)
    adv = _step(pm, SRFTConfig(profile="paper")).advantages
    assert adv.tolist() == pytest.approx([0.577349, -1.154699, 0.577349], abs=1e-5)


def test_batch_entropy_is_recorded_around_any_advantage():
    """compute_advantage is a wrapper: an extension replacing Â does not lose the entropy estimate."""
    from posttrain import hookimpl

    class ZeroAdvantage:
        @hookimpl
        def compute_advantage(self, batch):
            return torch.zeros(len(batch))

    pm = make_plugin_manager("srft", plugins=[ZeroAdvantage()])
    batch = _step(pm, SRFTConfig(profile="paper", entropy_level="batch"))
    assert batch.advantages.tolist() == [0.0] * 3
    assert batch.extras[srft.BATCH_ENTROPY].tolist() == [0.5] * 3


def test_reference_denominator_and_shaping(pm):
    batch = _step(pm, SRFTConfig())
    lp = _outputs().logprobs
    old = torch.full_like(lp, -0.3)
    denom = srft.reference_denominator(batch=batch.with_(old_logprobs=old), logprobs=lp)
    assert denom[2].tolist() == [0.0] * 4  # π_β ≡ 1 on the demonstration
    assert denom[0, :2].tolist() == pytest.approx([-0.3, -0.3])
    ratio = torch.full_like(lp, 0.5)
    ref = srft.shape_ratio(batch=batch, ratio=ratio, config=SRFTConfig())
    assert ref[2].tolist() == pytest.approx([0.5 / 0.6] * 4)  # p/(p+0.1) = 0.8333
    assert ref[0, :2].tolist() == [0.5, 0.5]  # rollouts untouched
    paper = srft.shape_ratio(batch=batch, ratio=ratio, config=SRFTConfig(profile="paper"))
    assert paper[2].tolist() == [0.5] * 4  # f(p) = p


# --- the loss terms, by hand ---------------------------------------------------------------------------


def test_reference_profile_terms_and_gradients(pm):
    cfg = SRFTConfig()  # per-sequence entropy, p/(p+0.1), no std, Σ/L_max (= 8), bonus 0.001
    batch = _step(pm, cfg)
    out = _outputs()
    m = Metrics()
    got = _loss(pm, batch, out, cfg, m)
    w_sft = 0.5 * math.exp(-2.0)  # demo row's mean entropy 2 → 0.067668
    w_rl = 0.1 * math.exp(0.5)  # correct rollout's mean entropy 0.5 → 0.164872
    # sft_demo = w_SFT·Σ(−log π)/4 = 0.067668·ln 2 = 0.046904
    assert float(got["sft_demo"].detach()) == pytest.approx(0.046904, abs=1e-6)
    # rl_demo = −A·Σ f(p)/8 = −(1/3)·4·(0.5/0.6)/8 = −0.138889
    assert float(got["rl_demo"].detach()) == pytest.approx(-0.138889, abs=1e-6)
    # rl_self = (−w_RL·2·(−0.2) + 3·(−0.4))/8 = (0.065949 − 1.2)/8 = −0.141756
    assert float(got["rl_self"].detach()) == pytest.approx(-0.141756, abs=1e-6)
    # entropy = −0.001·(0.5+0.5 + 1+2+3 + 4·2)/9 = −0.001·15/9 = −0.0016667
    assert float(got["entropy"].detach()) == pytest.approx(-0.0016667, abs=1e-7)
    s = m.summary()
    assert s["srft/w_sft"] == pytest.approx(w_sft) and s["srft/w_rl"] == pytest.approx(0.1 * (math.exp(0.5) + math.exp(2.0)) / 2)
    assert s["srft/entropy"] == pytest.approx((0.5 + 2.0 + 2.0) / 3)

    sum(got.values()).backward()
    g = out.logprobs.grad
    # demo token: −w_SFT/4 − A·γp/(p+γ)²/8 = −0.016917 − (1/3)·0.138889/8 = −0.022704
    assert g[2].tolist() == pytest.approx([-0.022704] * 4, abs=1e-6)
    assert g[0].tolist() == pytest.approx([-w_rl / 8] * 2 + [0, 0], abs=1e-7)  # −0.020609
    assert g[1].tolist() == pytest.approx([0.125] * 3 + [0], abs=1e-7)  # +1/8
    # the entropy receives the bonus's gradient only: −0.001/9 per response token, 0 on padding
    bonus = -0.001 / 9
    assert torch.allclose(out.entropy.grad, torch.tensor(
        [[bonus] * 2 + [0, 0], [bonus] * 3 + [0], [bonus] * 4]), atol=1e-10)


def test_paper_profile_terms_and_gradients(pm):
    # the paper profile with the sampled-token entropy estimate (the H(π_θ) itself: test_paper_profile_uses_the_policy_entropy)
    cfg = SRFTConfig(profile="paper", entropy_level="batch")  # f(p) = p, std, token-mean over the 9 RL tokens, no bonus
    assert cfg.entropy_level == "batch" and cfg.loss_agg == "token-mean" and cfg.entropy_coef == 0.0
    batch = _step(pm, cfg)
    # H = mean(−sampled log π) over the 5 rollout tokens = (0.5+0.5 + 0.25+0.5+0.75)/5 = 0.5, for every row
    assert batch.extras[srft.BATCH_ENTROPY].tolist() == [0.5] * 3
    out = _outputs()
    got = _loss(pm, batch, out, cfg)
    assert set(got) == {"sft_demo", "rl_demo", "rl_self"}
    w_sft, w_rl = 0.5 * math.exp(-0.5), 0.1 * math.exp(0.5)  # 0.303265, 0.164872
    A = (1 / 3) / (math.sqrt(1 / 3) + 1e-6)  # 0.577349
    # sft_demo = 0.303265·ln 2 = 0.210208
    assert float(got["sft_demo"].detach()) == pytest.approx(0.210208, abs=1e-6)
    # rl_demo = −A·Σp/9 = −0.577349·2/9 = −0.128300
    assert float(got["rl_demo"].detach()) == pytest.approx(-0.128300, abs=1e-6)
    # rl_self = (0.065949 − 1.2)/9 = −0.126006
    assert float(got["rl_self"].detach()) == pytest.approx(-0.126006, abs=1e-6)
    sum(got.values()).backward()
    g = out.logprobs.grad
    # demo token: −w_SFT/4 − A·p/9 = −0.075816 − 0.032075 = −0.107891
    assert g[2].tolist() == pytest.approx([-0.107891] * 4, abs=1e-6)
    assert g[0, :2].tolist() == pytest.approx([-w_rl / 9] * 2, abs=1e-7)  # −0.018319
    assert g[1, :3].tolist() == pytest.approx([1 / 9] * 3, abs=1e-7)
    assert out.entropy.grad is None  # nothing reads the token entropy in this profile
    assert float(got["sft_demo"].detach()) == pytest.approx(w_sft * LN2, abs=1e-6) and A == pytest.approx(0.577349, abs=1e-6)


def test_direct_hook_call_matches_plugin_manager(pm):
    cfg = SRFTConfig()
    batch = _step(pm, cfg)
    out = _outputs()
    via_pm = _loss(pm, batch, out, cfg)
    adv = batch.advantages[:, None].expand(3, 4)
    ratio = srft.shape_ratio(batch=batch, ratio=torch.exp(out.logprobs - srft.reference_denominator(
        batch=batch.with_(old_logprobs=out.logprobs.detach()), logprobs=out.logprobs)), config=cfg)
    direct = srft.build_loss(batch=batch, outputs=out, advantages=adv, ratio=ratio, mask=batch.response_mask,
                             config=cfg, metrics=Metrics())
    assert [t.name for t in direct] == ["sft_demo", "rl_demo", "rl_self", "entropy"]
    for t in direct:
        assert float(t.value.detach()) == pytest.approx(float(via_pm[t.name].detach()), abs=1e-7)


def test_ablations_fix_the_weights_to_one(pm):
    cfg = SRFTConfig(w_sft_fixed=True, w_rl_fixed=True)
    got = _loss(pm, _step(pm, cfg), _outputs(), cfg)
    assert float(got["sft_demo"].detach()) == pytest.approx(LN2, abs=1e-6)  # 1·ln 2
    assert float(got["rl_self"].detach()) == pytest.approx((0.4 - 1.2) / 8, abs=1e-7)  # (−1·2·(−0.2) − 1.2)/8 = −0.1
    assert float(got["rl_demo"].detach()) == pytest.approx(-0.138889, abs=1e-6)  # unchanged


def test_stop_gradient_through_the_weights(pm):
    """The weights depend on the token entropy (per sequence), but no gradient flows into it."""
    cfg = SRFTConfig(entropy_coef=0.0)  # reference profile without the bonus: entropy only feeds the weights
    out = _outputs()
    got = _loss(pm, _step(pm, cfg), out, cfg)
    assert "entropy" not in got
    sum(got.values()).backward()
    assert out.entropy.grad is None
    # the same loss with weights taken as constants has the same log-prob gradient
    w_sft, w_rl = 0.5 * math.exp(-2.0), 0.1 * math.exp(0.5)
    lp = out.logprobs.detach().clone().requires_grad_(True)
    p = torch.exp(lp[2])
    const = (w_sft * -lp[2].sum() / 4 - (1 / 3) * (p / (p + 0.1)).sum() / 8
             + (-w_rl * lp[0, :2].sum() + lp[1, :3].sum()) / 8)
    const.backward()
    assert torch.allclose(out.logprobs.grad, lp.grad, atol=1e-7)
    # and a differentiable entropy does reach the bonus if asked for (sanity of the check above)
    ent = torch.tensor(2.0, requires_grad=True)
    w, _ = entropy_weights(ent, cfg)
    assert not w.requires_grad


def test_micro_batch_invariance_paper_profile(pm):
    cfg = SRFTConfig(profile="paper", entropy_level="batch")
    batch = _step(pm, cfg)
    whole = sum(_loss(pm, batch, _outputs(), cfg).values())
    out = _outputs()
    split = 0.0
    for rows in ([0, 1], [2]):
        sub = batch.select(rows)  # totals of the whole mini-batch are kept
        o = ModelOutputs(logprobs=out.logprobs[rows], entropy=out.entropy[rows])
        split = split + sum(_loss(pm, sub, o, cfg).values())
    assert float(split.detach()) == pytest.approx(float(whole.detach()), abs=1e-7)


def test_incorrect_demo_gets_negative_advantage_but_keeps_sft(pm):
    cfg = SRFTConfig()
    m = Metrics()
    g = pm.hook.compose_group(group=_group(demo_reward=0.0), config=cfg, step=0, metrics=m)
    batch = build_train_batch([g], [pm.hook.route_group(group=g, config=cfg, step=0, metrics=m)], PAD)
    adv = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=m)
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])  # rewards (1, 0, 0), mean 1/3
    batch.advantages, batch.totals = adv, totals_of(batch, max_len=8.0)
    got = _loss(pm, batch, _outputs(), cfg)
    assert float(got["rl_demo"].detach()) == pytest.approx((1 / 3) * 4 * (0.5 / 0.6) / 8, abs=1e-6)  # +0.138889
    assert float(got["sft_demo"].detach()) == pytest.approx(0.046904, abs=1e-6)


# --- config ----------------------------------------------------------------------------------------------


def test_profiles_fill_unset_fields_and_explicit_values_win():
    ref, _ = validate_algorithm({"name": "srft"}, SRFTConfig)
    assert (ref.entropy_level, ref.demo_shaping, ref.norm_adv_by_std, ref.loss_agg, ref.entropy_coef) == \
        ("sequence", "p_div_p", False, "token-sum-norm", 0.001)
    paper, problems = validate_algorithm({"name": "srft", "profile": "paper", "norm_adv_by_std": False}, SRFTConfig)
    assert not problems
    assert (paper.entropy_level, paper.demo_shaping, paper.norm_adv_by_std, paper.loss_agg, paper.entropy_coef) == \
        ("policy", "none", False, "token-mean", 0.0)
    assert ref.clip_low is None and ref.kl_coef == 0.0 and ref.sft_weight_scale == 0.5 and ref.rl_weight_scale == 0.1
    for bad in ({"profile": "official"}, {"entropy_level": "token"}, {"demo_shaping": "luffy"}, {"ratio_level": "sequence"}):
        obj, problems = validate_algorithm({"name": "srft", **bad}, SRFTConfig)
        assert obj is None and problems and "algorithm" in problems[0]


def test_requirements():
    assert srft.requirements(config=SRFTConfig()).entropy is True
    needs = srft.requirements(config=SRFTConfig(profile="paper"))
    # H(π_θ) comes from the mini-batch statistic pass, not from the loss pass's entropy
    assert needs.rollouts and needs.minibatch_stats and not needs.entropy and not needs.reference
    needs = srft.requirements(config=SRFTConfig(profile="paper", entropy_level="batch"))
    assert not needs.minibatch_stats and not needs.entropy  # the estimate comes from the rollouts


def test_check_algorithm_plugin():
    from posttrain.testing import check_algorithm_plugin

    report = check_algorithm_plugin("srft")
    assert set(report["terms"]) == {"sft_demo", "rl_demo", "rl_self", "entropy"}
    assert report["routes"] == ["mix"] * 4
    assert report["rows"] == 4 * (4 + 1)  # 4 tiny groups, each 4 rollouts + its first demonstration


def test_check_algorithm_plugin_paper_profile():
    """The same conformance check (micro-batch invariance included) with the paper profile."""
    from posttrain import hookimpl, help_field
    from posttrain.testing import check_algorithm_plugin

    @dataclasses.dataclass
    class PaperConfig(SRFTConfig):
        profile: str = help_field("paper", "The paper profile, for this test.")

    class PaperProfile:
        @hookimpl(tryfirst=True)
        def algorithm_config(self):
            return PaperConfig

    report = check_algorithm_plugin("srft", plugins=[PaperProfile()])
    assert set(report["terms"]) == {"sft_demo", "rl_demo", "rl_self"}
    assert not report["needs"].entropy


# --- end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["reference", "paper"])
def test_two_step_tiny_run(tmp_path, profile):
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import make_tiny_model, tiny_config

    model = make_tiny_model(tmp_path / "m")
    cfg = tiny_config(model, tmp_path / "run", algorithm="srft", steps=2,
                      overrides={"rollout.n": 3, "algorithm.profile": profile})
    finals = train(cfg, base=None)
    assert finals and (finals[-1] / "config.json").exists()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    for r in rows:
        for key in ("srft/entropy", "srft/w_sft", "srft/w_rl", "loss/sft_demo", "loss/rl_demo", "loss/rl_self"):
            assert key in r and math.isfinite(r[key]), (key, r)
        # a random 100-token model is close to uniform: H ≤ ln 100, so w_SFT ≥ 0.005 and w_RL ≤ 10
        assert 0.0 < r["srft/entropy"] <= math.log(100) + 1e-3
        assert 0.005 - 1e-6 <= r["srft/w_sft"] <= 0.5 and 0.1 <= r["srft/w_rl"] <= 10.0 + 1e-3
        if profile == "paper":  # one entropy for the whole step: the weights follow it exactly
            assert r["srft/w_sft"] == pytest.approx(0.5 * math.exp(-r["srft/entropy"]), rel=1e-5)
            assert r["srft/w_rl"] == pytest.approx(0.1 * math.exp(r["srft/entropy"]), rel=1e-5)
        assert r["train/offline_data_ratio"] == pytest.approx(1 / 4)  # 3 rollouts + 1 demonstration per prompt
    assert ("loss/entropy" in rows[0]) == (profile == "reference")
    json.dumps(rows)  # plain numbers


def test_paper_profile_uses_the_policy_entropy(pm, tmp_path):
    """Eqs. 8/12's H(π_θ): the entropy of the policy's distribution (from its logits) over the
    mini-batch's rollout tokens, not −mean log π_sampling of the sampled tokens (0.5 here)."""
    from transformers import AutoModelForCausalLM

    from posttrain.testing import make_tiny_model
    from posttrain.train.forward import policy_outputs

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m"))
    cfg = SRFTConfig(profile="paper")
    batch = _step(pm, cfg)
    with torch.no_grad():
        out = policy_outputs(model, batch, temperature=1.0, chunk=2, entropy=True)
        # independently: softmax of the full logits at the positions that predict each response token
        P, L = batch.prompt_len, batch.response_ids.shape[1]
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits[:, P - 1:P - 1 + L]
        ent = torch.distributions.Categorical(logits=logits).entropy()
    rollout_tokens = batch.response_mask & ~batch.off_policy[:, None]  # rows 0, 1: 2 + 3 tokens
    expected = float(ent[rollout_tokens].mean())
    (part,) = [p for p in pm.hook.minibatch_statistics(batch=batch, outputs=out, config=cfg, step=0) if p]
    total, count = part[srft.POLICY_ENTROPY]
    assert float(count) == 5 and float(total) / float(count) == pytest.approx(expected, rel=1e-5)
    assert abs(expected - 0.5) > 0.5  # a random tiny model is near-uniform: H ≈ ln V, far from the estimate
    # split over two micro-batches, the sums add up to the same statistic
    parts = [next(p for p in pm.hook.minibatch_statistics(batch=batch.select(r), outputs=ModelOutputs(
        logprobs=out.logprobs[r], entropy=out.entropy[r]), config=cfg, step=0) if p)[srft.POLICY_ENTROPY]
        for r in ([0], [1, 2])]
    assert float(sum(t for t, _ in parts) / sum(c for _, c in parts)) == pytest.approx(expected, rel=1e-5)
    # the weights read it from batch.stats
    got = _loss(pm, batch.with_(stats={srft.POLICY_ENTROPY: expected}), _outputs(), cfg)
    w_sft = 0.5 * math.exp(-expected)
    assert float(got["sft_demo"].detach()) == pytest.approx(w_sft * LN2, abs=1e-6)


# --- the reference code's other settings: srft_type and the per-micro-batch aggregation --------------


def _loss_with_old(pm, cfg, old):
    """Reference-profile terms and log-prob gradient with π_old ≠ π_θ (old log-prob ``old`` on every token)."""
    batch = _step(pm, cfg)
    out = _outputs()
    batch = batch.with_(old_logprobs=torch.full((3, 4), old))
    adv = batch.advantages[:, None].expand_as(out.logprobs)
    denom = pm.hook.reference_denominator(batch=batch, logprobs=out.logprobs, config=cfg, step=0)
    ratio = pm.hook.shape_ratio(batch=batch, ratio=F.importance_ratio(out.logprobs, denom), config=cfg, step=0)
    terms = pm.hook.build_loss(batch=batch, outputs=out, advantages=adv, ratio=ratio, mask=batch.response_mask,
                               config=cfg, step=0, metrics=Metrics())
    got = {t.name: t.value for t in terms}
    got["rl_self"].backward()
    return float(got["rl_self"].detach()), out.logprobs.grad


@pytest.mark.parametrize("srft_type, value, g_correct, g_wrong", [
    # rows: y+ (2 tokens, log π −0.2, w_RL = 0.1·e^0.5 = 0.164872), y− (3 tokens, log π −0.4); π_old = e^−0.5; /8
    ("paper", (0.4 * 0.164872 - 1.2) / 8, -0.164872 / 8, 1 / 8),                      # g = log π
    ("exp", (-2 * 0.164872 * math.exp(-0.2) + 3 * math.exp(-0.4)) / 8,                 # g = π: 0.217624
     -0.164872 * math.exp(-0.2) / 8, math.exp(-0.4) / 8),
    ("classic_rl", (-2 * 0.164872 * math.exp(0.3) + 3 * math.exp(0.1)) / 8,            # g = π/π_old: 0.358801
     -0.164872 * math.exp(0.3) / 8, math.exp(0.1) / 8),
    ("minus_old", (-2 * 0.164872 * 0.3 + 3 * 0.1) / 8, -0.164872 / 8, 1 / 8),          # g = log π − log π_old
])
def test_srft_type_self_rollout_term(pm, srft_type, value, g_correct, g_wrong):
    got, g = _loss_with_old(pm, SRFTConfig(srft_type=srft_type), old=-0.5)
    assert got == pytest.approx(value, abs=2e-6)
    assert g[0, :2].tolist() == pytest.approx([g_correct] * 2, abs=1e-6)
    assert g[1, :3].tolist() == pytest.approx([g_wrong] * 3, abs=1e-6)
    assert g[2].tolist() == [0.0] * 4  # the demonstration is not a self-rollout
    if srft_type == "exp":
        assert got == pytest.approx(0.217624, abs=1e-6)
    if srft_type == "classic_rl":
        assert got == pytest.approx(0.358801, abs=1e-6)


def test_srft_type_and_aggregation_validation():
    for bad, words in [({"srft_type": "ppo"}, "srft_type 'ppo' is not one of paper | exp | classic_rl | minus_old"),
                       ({"aggregation": "micro"}, "aggregation 'micro' is not one of invariant | official")]:
        _, problems = validate_algorithm({"name": "srft", **bad}, SRFTConfig)
        assert any(words in p for p in problems), problems
    fields = SRFTConfig.__dataclass_fields__
    assert "srft_type" in fields["srft_type"].metadata["help"] and "mix_actor" in fields["aggregation"].metadata["help"]
    assert (SRFTConfig().srft_type, SRFTConfig().aggregation) == ("paper", "invariant")


def test_official_aggregation_sums_per_micro_batch_means(pm):
    """Rows [y+, y−, demo] split [[y+], [y−, demo]], token-mean RL aggregation to expose the RL normaliser.

    micro 1 (2 RL tokens): rl_self −w_RL·2·(−0.2)/2 = 0.032974; entropy mean 0.5
    micro 2 (7 RL tokens): rl_self 3·(−0.4)/7, rl_demo −(1/3)·4·(0.5/0.6)/7; SFT w_SFT·ln 2 (its 4 demo tokens);
                           entropy mean (1 + 2 + 3 + 4·2)/7 = 2
    """
    from posttrain.testing import split_loss
    from posttrain.types import Needs

    cfg = SRFTConfig(aggregation="official", loss_agg="token-mean")
    batch = _step(pm, cfg)
    out = _outputs()
    lp, ent = out.logprobs.detach(), out.entropy.detach()
    r = split_loss(pm.hook, cfg, batch, [[0], [1, 2]], lp, ent, needs=Needs(entropy=True), max_len=8)
    w_rl, w_sft = 0.1 * math.exp(0.5), 0.5 * math.exp(-2.0)
    assert r.parts["rl_self"] == pytest.approx(0.2 * w_rl - 1.2 / 7, abs=1e-6)  # 0.032974 − 0.171429
    assert r.parts["rl_demo"] == pytest.approx(-(4 / 3) * (0.5 / 0.6) / 7, abs=1e-6)  # −0.158730
    assert r.parts["sft_demo"] == pytest.approx(w_sft * LN2, abs=1e-6)
    assert r.parts["entropy"] == pytest.approx(-0.001 * (0.5 + 2.0), abs=1e-9)
    # gradient: the y+ token's weight is −w_RL/2 (its micro-batch has 2 RL tokens), not −w_RL/9
    assert r.logprob_grad[0, :2].tolist() == pytest.approx([-w_rl / 2] * 2, abs=1e-6)
    assert r.logprob_grad[1, :3].tolist() == pytest.approx([1 / 7] * 3, abs=1e-6)
    assert r.entropy_grad[0, :2].tolist() == pytest.approx([-0.001 / 2] * 2, abs=1e-10)
    # the invariant default on the same split: every normaliser from the mini-batch (9 RL tokens, 9 tokens)
    inv = split_loss(pm.hook, SRFTConfig(loss_agg="token-mean"), batch, [[0], [1, 2]], lp, ent,
                     needs=Needs(entropy=True), max_len=8)
    assert inv.parts["rl_self"] == pytest.approx((0.4 * w_rl - 1.2) / 9, abs=1e-6)
    assert inv.parts["entropy"] == pytest.approx(-0.001 * 15 / 9, abs=1e-9)
    # one micro-batch: official == invariant
    one = split_loss(pm.hook, cfg, batch, [[0, 1, 2]], lp, ent, needs=Needs(entropy=True), max_len=8)
    whole = split_loss(pm.hook, SRFTConfig(loss_agg="token-mean"), batch, [[0, 1, 2]], lp, ent,
                       needs=Needs(entropy=True), max_len=8)
    assert one.total == pytest.approx(whole.total, abs=1e-7)
