"""LUFFY plugin: mixed groups, π_ref ≡ 1, shaping gradients, on/off loss parts, aggregation modes.

Losses are checked on hand-made batches whose rows have chosen lengths, log-probs and
entropies, so every expected number is written out as arithmetic. ``run_split`` feeds those
tensors through the engine's own per-micro-batch code path (``posttrain.loss.micro_batch_loss``:
reference_denominator → shape_ratio → stabilization_mask → build_loss, defaults included) by
standing in for the model's forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain import Needs, Route
from posttrain import functional as F
from posttrain.batching import build_train_batch
from posttrain.config import validate_algorithm
from posttrain.metrics import Metrics
from posttrain.plugins import bind_plugins, make_plugin_manager
from posttrain.testing import fill_tokens, sized_group, split_loss, tiny_group, tiny_tokenizer
from posttrain_luffy.plugin import LUFFYConfig

ROOT = Path(__file__).resolve().parents[3]
TOK = tiny_tokenizer()
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
L_MAX = 16  # the constant L_max of token-sum-norm in every hand computation


@pytest.fixture(scope="module")
def pm():
    return bound_manager(LUFFYConfig())


def bound_manager(cfg):
    """The plugin manager a stage with this algorithm config runs (the entry point is a class)."""
    pm = make_plugin_manager("luffy")
    bind_plugins(pm, cfg)
    return pm


def group(rewards, lens, demo_len, uid, *, demo_reward=1.0):
    """A verified group whose rollouts have the given token counts (EOS included)."""
    return sized_group(rewards, lens, demo_lens=(demo_len,), uid=uid, demo_reward=demo_reward)


def compose_and_batch(pm, cfg, groups, metrics=None):
    metrics = metrics if metrics is not None else Metrics()
    groups = [pm.hook.compose_group(group=g, config=cfg, step=0, metrics=metrics) for g in groups]
    routes = [pm.hook.route_group(group=g, config=cfg, step=0, metrics=metrics) for g in groups]
    batch = build_train_batch(groups, routes, PAD)
    batch.advantages = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=metrics)
    return groups, routes, batch


fill = fill_tokens  # [N, L] from per-row values


def run_split(pm, cfg, batch, split, logprobs, entropy, metrics=None, step=0):
    """Loss of a mini-batch (optimizer step ``step``) processed as the given micro-batches; returns
    (total, parts, ∂/∂logp, ∂/∂H)."""
    r = split_loss(pm.hook, cfg, batch, split, logprobs, entropy, needs=Needs(entropy=True), max_len=L_MAX,
                   metrics=metrics, step=step)
    return r.total, r.parts, r.logprob_grad, r.entropy_grad


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults_are_the_official_setup(pm):
    cfg = pm.hook.algorithm_config()()
    assert isinstance(cfg, LUFFYConfig)
    assert (cfg.n_off, cfg.off_policy_shaping, cfg.shaping_gamma, cfg.aggregation) == (1, "p_div_p", 0.1, "invariant")
    # r − mean (no std), no clipping, Σ/L_max; entropy 0.001, no KL
    assert (cfg.norm_adv_by_std, cfg.clip_low, cfg.loss_agg) == (False, None, "token-sum-norm")
    assert (cfg.entropy_coef, cfg.kl_coef) == (0.001, 0.0)
    needs = pm.hook.requirements(config=cfg)
    assert needs.rollouts and needs.entropy and not needs.reference


@pytest.mark.parametrize("section, expected", [
    ({"off_policy_shaping": "p_div_p_0.1"}, "off_policy_shaping 'p_div_p_0.1' is not one of none | p_div_p | sqrt | pow"),
    ({"aggregation": "per-micro"}, "aggregation 'per-micro' is not one of invariant | official"),
    ({"n_off": -1}, "n_off must be >= 0"),
    ({"shaping_gamma": 0.0}, "shaping_gamma and shaping_power must be > 0"),
    ({"ratio_level": "sequence"}, "ratio_level must be token"),
    ({"shaping_gama": 0.1}, "algorithm.shaping_gama: unknown key. Did you mean 'shaping_gamma'?"),
])
def test_config_errors_name_the_field(section, expected):
    obj, problems = validate_algorithm({"name": "luffy", **section}, LUFFYConfig)
    assert obj is None and any(expected in p for p in problems), problems


@pytest.mark.parametrize("path", ["configs/luffy.yaml", "configs/demo/luffy.yaml"])
def test_shipped_configs_validate(path):
    from posttrain.run import load_config, resolve_stages

    stages = resolve_stages(load_config(ROOT / path), source=path)
    if path == "configs/demo/luffy.yaml":  # a short SFT warm-up, then LUFFY
        assert [s.run.algorithm["name"] for s in stages] == ["sft", "luffy"]
    stage = stages[-1]
    algo, t, r = stage.algo, stage.run.trainer, stage.run.rollout
    assert isinstance(algo, LUFFYConfig) and algo.n_off == 1 and algo.off_policy_shaping == "p_div_p"
    assert r.n == 7  # 7 rollouts + 1 demonstration = the official group of 8
    if path == "configs/luffy.yaml":  # the official Qwen2.5-Math-7B run
        assert (t.lr, t.grad_clip, t.prompts_per_step, t.prompts_per_minibatch) == (1e-6, 1.0, 128, 64)
        assert (r.temperature, r.max_new_tokens, algo.loss_max_len, algo.shaping_gamma) == (1.0, 8192, 8192, 0.1)
        assert (algo.entropy_coef, algo.kl_coef, algo.clip_low, algo.norm_adv_by_std) == (0.001, 0.0, None, False)


# --- the mixed group and its advantage -------------------------------------------------------------


def test_seven_wrong_rollouts_and_a_correct_demo(pm):
    """A_on = 0 − 1/8 = −0.125, A_off = 1 − 1/8 = 0.875 (algorithms.md §1.1, §6)."""
    cfg = LUFFYConfig()
    m = Metrics()
    groups, routes, batch = compose_and_batch(pm, cfg, [tiny_group([0] * 7, uid="g")], m)
    g = groups[0]
    assert len(g.members) == 8 and g.on_policy == list(range(7)) and g.off_policy == [7]
    assert g.members[7] is g.demonstrations[0]  # the same trajectory: verified as a member
    assert routes == [Route(rl=1.0)] and batch.rl_weight.tolist() == [1.0] * 8
    assert batch.off_policy.tolist() == [False] * 7 + [True]
    assert batch.advantages.tolist() == pytest.approx([-0.125] * 7 + [0.875])
    assert m.summary()["luffy/adv_off"] == pytest.approx(0.875)
    # std option: torch.std of [0]*7 + [1] is 0.353553 (N−1) → −0.353553 and 2.474874
    _, _, batch = compose_and_batch(pm, LUFFYConfig(norm_adv_by_std=True), [tiny_group([0] * 7, uid="g")])
    assert batch.advantages.tolist() == pytest.approx([-0.3535524] * 7 + [2.4748666], rel=1e-5)


def test_compose_group_n_off_and_missing_demonstrations(pm):
    two = ("2+2=4 \\boxed{4}", "2 plus 2 is 4 \\boxed{4}")
    g = pm.hook.compose_group(group=tiny_group([0, 1], demos=two), config=LUFFYConfig(n_off=2), step=0, metrics=None)
    assert [m.teacher for m in g.members] == [None, None, 0, 1]
    g = pm.hook.compose_group(group=tiny_group([0, 1], demos=two), config=LUFFYConfig(), step=0, metrics=None)
    assert [m.teacher for m in g.members] == [None, None, 0]
    g = pm.hook.compose_group(group=tiny_group([0, 1], demos=two), config=LUFFYConfig(n_off=0), step=0, metrics=None)
    assert len(g.members) == 2  # the on-policy baseline: Dr.GRPO on the rollouts
    again = pm.hook.compose_group(group=g, config=LUFFYConfig(), step=0, metrics=None)
    assert len(pm.hook.compose_group(group=again, config=LUFFYConfig(), step=0, metrics=None).members) == 3  # idempotent
    m = Metrics()
    g = pm.hook.compose_group(group=tiny_group([0, 1], demos=()), config=LUFFYConfig(), step=0, metrics=m)
    assert len(g.members) == 2 and m.summary()["luffy/no_demo"] == 1.0


# --- π_ref ≡ 1 and the shaping -----------------------------------------------------------------------


def shaped_token_weight(pm, cfg, p):
    """∂f/∂log p on one demonstration token with π_θ = p, through the plugin's hooks and autograd."""
    g = tiny_group([0], uid="w", demos=("d",))  # demo "d" + EOS: 2 tokens
    _, _, batch = compose_and_batch(pm, cfg, [g])
    logp = torch.full(batch.response_mask.shape, math.log(p), requires_grad=True)
    batch.old_logprobs = torch.full(batch.response_mask.shape, -0.7)
    denom = pm.hook.reference_denominator(batch=batch, logprobs=logp, config=cfg, step=0)
    ratio = pm.hook.shape_ratio(batch=batch, ratio=F.importance_ratio(logp, denom), config=cfg, step=0)
    demo = 1  # row 0 is the rollout
    ratio[demo, 0].backward()
    return float(ratio[demo, 0].detach()), float(logp.grad[demo, 0])


@pytest.mark.parametrize("p, weight", [(0.1, 0.25), (0.01, 0.0826446), (0.5, 0.1388889), (1.0, 0.0826446)])
def test_shaped_gradient_weight_is_gamma_p_over_p_plus_gamma_squared(pm, p, weight):
    value, grad = shaped_token_weight(pm, LUFFYConfig(), p)
    assert value == pytest.approx(p / (p + 0.1))
    assert grad == pytest.approx(0.1 * p / (p + 0.1) ** 2, rel=1e-5) and grad == pytest.approx(weight, rel=1e-5)


@pytest.mark.parametrize("kind, gamma, weight", [
    ("none", 0.1, lambda p: p),                                # f = p: weight p (unshaped)
    ("sqrt", 0.1, lambda p: 0.5 * math.sqrt(p)),               # f = √p
    ("pow", 0.1, lambda p: 0.5 * p ** 0.5),                    # f = p^k, k = 0.5
    ("p_div_p", 0.3, lambda p: 0.3 * p / (p + 0.3) ** 2),      # the code's other γ
    ("p_div_p", 0.5, lambda p: 0.5 * p / (p + 0.5) ** 2),
])
def test_other_shapings(pm, kind, gamma, weight):
    for p in (0.01, 0.1, 0.5):
        _, grad = shaped_token_weight(pm, LUFFYConfig(off_policy_shaping=kind, shaping_gamma=gamma), p)
        assert grad == pytest.approx(weight(p), rel=1e-5)


def test_reference_denominator_is_one_on_demonstrations_only(pm):
    cfg = LUFFYConfig()
    _, _, batch = compose_and_batch(pm, cfg, [group([0, 1], [2, 3], 4, "r")])
    batch.old_logprobs = torch.full(batch.response_mask.shape, -0.7)
    logp = fill(batch, [-1.0, -1.0, -2.0])
    denom = pm.hook.reference_denominator(batch=batch, logprobs=logp, config=cfg, step=0)
    assert torch.equal(denom[2], torch.zeros(4)) and torch.all(denom[:2] == -0.7)
    ratio = F.importance_ratio(logp, denom)
    shaped = pm.hook.shape_ratio(batch=batch, ratio=ratio, config=cfg, step=0)
    assert torch.equal(shaped[:2], ratio[:2])  # rollouts keep ρ = π_θ/π_old
    assert shaped[2].tolist() == pytest.approx([math.exp(-2) / (math.exp(-2) + 0.1)] * 4)


def test_ppo_clip_option_never_clips_demonstrations(pm):
    """clip_low: 0.2 clips on-policy tokens (ρ = 1.5, A > 0) but keeps the demo (f = 0.09, A < 0)."""
    cfg = LUFFYConfig(clip_low=0.2)
    _, _, batch = compose_and_batch(pm, cfg, [group([1, 0], [2, 2], 2, "c", demo_reward=0.0)])
    assert batch.advantages.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    ratio = fill(batch, [1.5, 1.5, 0.01 / 0.11])
    adv = batch.advantages[:, None].expand_as(ratio)
    masks = pm.hook.stabilization_mask(batch=batch, logprobs=None, ratio=ratio, advantages=adv, config=cfg, step=0)
    kept = [m for m in masks if m is not None][0] & batch.response_mask
    assert kept.sum(-1).tolist() == [0, 2, 2]  # row 0 clipped (A>0, ρ>1.2); the demo kept though f < 0.8
    assert pm.hook.stabilization_mask(batch=batch, logprobs=None, ratio=ratio, advantages=adv,
                                      config=LUFFYConfig(), step=0) == []  # default: no clipping at all


# --- the loss, hand-computed -----------------------------------------------------------------------

# Two prompts, 3 rollouts + 1 demo each:
#   A: rollouts [0,0,0] lengths [2,3,1], demo correct, 4 tokens with π_θ = [.1, .5, 1, .01]
#      mean 1/4 → A_on = −0.25, A_off = 0.75
#   B: rollouts [1,0,1] lengths [2,2,2], demo correct, 3 tokens with π_θ = .5
#      mean 3/4 → A_on = [.25, −.75, .25], A_off = 0.25
# Rows: [A0, A1, A2, A-demo, B0, B1, B2, B-demo]. Rollout log-probs −1 with π_old = π_θ (ρ = 1,
# ∂ρ/∂logp = 1). Entropy 1.0 on demo tokens, 2.0 on rollout tokens. Tokens: rollouts 12, demos 7.
DEMO_P = [0.1, 0.5, 1.0, 0.01]
F_A = sum(p / (p + 0.1) for p in DEMO_P)  # 2.333333
F_B = 3 * 0.5 / 0.6  # 2.5
DF = lambda p: 0.1 * p / (p + 0.1) ** 2  # noqa: E731  ∂f/∂logp


def loss_batch(pm, cfg, rewards_b=(1, 0, 1)):
    groups = [group([0, 0, 0], [2, 3, 1], 4, "A"), group(list(rewards_b), [2, 2, 2], 3, "B")]
    _, _, batch = compose_and_batch(pm, cfg, groups)
    lp = fill(batch, [-1.0] * 3 + [[math.log(p) for p in DEMO_P]] + [-1.0] * 3 + [math.log(0.5)])
    ent = fill(batch, [2.0] * 3 + [1.0] + [2.0] * 3 + [1.0])
    return batch, lp, ent


def test_on_and_off_loss_parts(pm):
    cfg = LUFFYConfig()
    batch, lp, ent = loss_batch(pm, cfg)
    assert batch.advantages.tolist() == pytest.approx([-0.25] * 3 + [0.75, 0.25, -0.75, 0.25, 0.25])
    m = Metrics()
    total, parts, g_lp, g_ent = run_split(pm, cfg, batch, [list(range(8))], lp, ent, m)
    pg_on = -(-0.25 * (2 + 3 + 1) + 0.25 * 2 - 0.75 * 2 + 0.25 * 2) / L_MAX  # −Σ A_i·|y_i|·ρ / L_max = +0.125
    pg_off = -(0.75 * F_A + 0.25 * F_B) / L_MAX  # −Σ A·f(p) / L_max = −2.375/16
    ent_term = -0.001 * (12 * 2.0 + 7 * 1.0) / 19
    assert parts == pytest.approx({"pg_on": 0.125, "pg_off": -0.1484375, "entropy": ent_term})
    assert (pg_on, pg_off) == pytest.approx((0.125, -0.1484375))
    assert total == pytest.approx(0.125 - 0.1484375 - 0.001 * 31 / 19)  # −0.0250690
    # ∂/∂logp: rollouts −A/L_max; demo tokens −A·γp/(p+γ)²/L_max (0.25 at p = .1, 0.0826 at p = .01)
    demo_a = [-0.75 * DF(p) / L_MAX for p in DEMO_P]
    assert demo_a[0] == pytest.approx(-0.75 * 0.25 / L_MAX) and demo_a[3] == pytest.approx(-0.75 * 0.0826446 / L_MAX)
    expected = fill(batch, [0.25 / L_MAX] * 3 + [demo_a] + [-0.25 / L_MAX, 0.75 / L_MAX, -0.25 / L_MAX]
                    + [-0.25 * DF(0.5) / L_MAX])
    assert torch.allclose(g_lp, expected, atol=1e-7)
    assert torch.allclose(g_ent, -0.001 / 19 * batch.token_mask, atol=1e-9)
    # metrics: mean π_θ on demonstration tokens (7 tokens), mean advantage of the demonstrations
    s = m.summary()
    assert s["luffy/p_off"] == pytest.approx((sum(DEMO_P) + 3 * 0.5) / 7)


def test_all_correct_group_contributes_nothing(pm):
    """8 correct of 8 (demo included): A = 0 everywhere → zero policy-gradient loss and gradient."""
    cfg = LUFFYConfig(entropy_coef=0.0)
    _, _, batch = compose_and_batch(pm, cfg, [group([1] * 7, [2, 3, 1, 2, 2, 4, 1], 3, "ok")])
    assert batch.advantages.tolist() == [0.0] * 8
    lp = fill(batch, [-1.0] * 7 + [[math.log(0.05), math.log(0.5), 0.0]])
    total, parts, g_lp, _ = run_split(pm, cfg, batch, [list(range(8))], lp, torch.zeros_like(lp))
    assert parts == {"pg_on": 0.0, "pg_off": 0.0} and total == 0.0
    assert torch.count_nonzero(g_lp) == 0
    # mixed with another prompt, it adds nothing to that prompt's loss or gradient
    batch2, lp2, ent2 = loss_batch(pm, cfg, rewards_b=(1, 1, 1))  # B all correct, demo correct
    _, parts2, g2, _ = run_split(pm, cfg, batch2, [list(range(8))], lp2, ent2)
    assert parts2 == pytest.approx({"pg_on": 0.25 * 6 / L_MAX, "pg_off": -0.75 * F_A / L_MAX})
    assert torch.count_nonzero(g2[4:]) == 0


def test_default_aggregation_does_not_depend_on_micro_batching(pm):
    cfg = LUFFYConfig()
    batch, lp, ent = loss_batch(pm, cfg)
    whole = run_split(pm, cfg, batch, [list(range(8))], lp, ent)  # 1 micro-batch of N rows
    rows = run_split(pm, cfg, batch, [[i] for i in range(8)], lp, ent)  # N micro-batches of 1 row
    uneven = run_split(pm, cfg, batch, [[0, 1, 2, 3, 4], [5, 6], [7]], lp, ent)
    for other in (rows, uneven):
        assert other[0] == pytest.approx(whole[0], rel=1e-6) and other[1] == pytest.approx(whole[1], rel=1e-6)
        assert torch.allclose(other[2], whole[2], atol=1e-8) and torch.allclose(other[3], whole[3], atol=1e-10)


def test_official_aggregation_reproduces_per_micro_batch_numbers(pm):
    cfg = LUFFYConfig(aggregation="official")
    batch, lp, ent = loss_batch(pm, cfg)
    split = [[0, 1, 2, 3], [4, 5, 6, 7]]  # one prompt per micro-batch
    total, parts, g_lp, g_ent = run_split(pm, cfg, batch, split, lp, ent)
    # PG: Σ/L_max per micro-batch, summed: the same as the invariant numbers
    # entropy: micro-batch A (6·2 + 4·1)/10 = 1.6, B (6·2 + 3·1)/9 = 5/3, each a mean, summed
    assert parts == pytest.approx({"pg_on": 0.125, "pg_off": -0.1484375, "entropy": -0.001 * (1.6 + 5 / 3)})
    assert total == pytest.approx(0.125 - 0.1484375 - 0.001 * (1.6 + 5 / 3))
    expected_ent = fill(batch, [-0.001 / 10] * 4 + [-0.001 / 9] * 4)  # each token weighs 1/(tokens of ITS micro-batch)
    assert torch.allclose(g_ent, expected_ent, atol=1e-10)
    invariant = run_split(pm, LUFFYConfig(), batch, [list(range(8))], lp, ent)
    assert torch.allclose(g_lp, invariant[2], atol=1e-8)  # the PG gradient is the same in both modes
    # one micro-batch per mini-batch: the official loss is the invariant loss
    one = run_split(pm, cfg, batch, [list(range(8))], lp, ent)
    assert one[0] == pytest.approx(invariant[0]) and one[1] == pytest.approx(invariant[1])


def test_official_token_mean_uses_micro_batch_token_counts(pm):
    """loss_remove_token_mean=False in the code: the PG term is a token-mean per micro-batch."""
    cfg = LUFFYConfig(aggregation="official", loss_agg="token-mean", entropy_coef=0.0)
    batch, lp, ent = loss_batch(pm, cfg)
    m = Metrics()
    _, parts, _, _ = run_split(pm, cfg, batch, [[0, 1, 2, 3], [4, 5, 6, 7]], lp, ent, metrics=m)
    # luffy/p_off is the token mean over both micro-batches' 7 demonstration tokens, not the mean
    # of their means ((mean(DEMO_P) + 0.5) / 2)
    assert m.summary()["luffy/p_off"] == pytest.approx((sum(DEMO_P) + 3 * 0.5) / 7)
    assert (sum(DEMO_P) + 3 * 0.5) / 7 != pytest.approx((sum(DEMO_P) / 4 + 0.5) / 2)
    # A: (−(−0.25·6) − 0.75·F_A)/10 tokens;  B: (−(0.25·2 − 0.75·2 + 0.25·2) − 0.25·F_B)/9 tokens
    assert parts["pg_on"] == pytest.approx(1.5 / 10 + 0.5 / 9)
    assert parts["pg_off"] == pytest.approx(-0.75 * F_A / 10 - 0.25 * F_B / 9)
    _, inv, _, _ = run_split(pm, LUFFYConfig(loss_agg="token-mean", entropy_coef=0.0), batch,
                             [[0, 1, 2, 3], [4, 5, 6, 7]], lp, ent)
    assert inv["pg_on"] == pytest.approx(2.0 / 19) and inv["pg_off"] == pytest.approx(-(0.75 * F_A + 0.25 * F_B) / 19)


def test_plain_build_loss_only_in_official_mode():
    from posttrain_luffy import plugin

    assert plugin.build_loss(batch=None, outputs=None, advantages=None, ratio=None, mask=None,
                             config=LUFFYConfig()) is None


# --- conformance and a real run ----------------------------------------------------------------------


def test_check_algorithm_plugin():
    from posttrain.testing import check_algorithm_plugin

    report = check_algorithm_plugin("luffy")
    assert report["routes"] == ["rl", "rl", "rl", "rl"]
    assert report["rows"] == 4 * 4 + 4  # 4 prompts × (4 rollouts + 1 demonstration)
    assert set(report["terms"]) == {"pg_on", "pg_off", "entropy"}


def test_two_step_run_on_the_tiny_model(tmp_path):
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import make_tiny_model, tiny_config

    model = make_tiny_model(tmp_path / "m")
    cfg = tiny_config(model, tmp_path / "run", algorithm="luffy", steps=2, overrides={"rollout.n": 3})
    finals = train(cfg, base=None)
    assert finals and all(Path(f).exists() for f in finals)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/pg_off" in r]
    assert len(rows) == 2
    for r in rows:
        assert r["train/rows"] == 4 * (3 + 1) and r["train/offline_data_ratio"] == 0.25
        # the demonstrations are correct; a random model's rollouts are not: Â_off = 1 − mean > 0
        assert r["reward/off_policy_mean"] == 1.0 and 0.0 < r["luffy/adv_off"] <= 0.75
        assert r["loss/pg_off"] < 0 and 0.0 < r["luffy/p_off"] < 1.0
        assert r["loss/total"] == pytest.approx(r["loss/pg_on"] + r["loss/pg_off"] + r["loss/entropy"], abs=1e-6)
        assert all(math.isfinite(r[k]) for k in ("loss/pg_on", "train/grad_norm"))


# --- the code's other settings (mix_core_alg.compute_token_on_off_policy_loss) ------------------------
# One group: rollouts r = [1, 0] (2 tokens each, π_θ = 0.5, π_old = 0.25, so ρ = 2) and the demo
# (r = 1, 2 tokens, π_θ = [0.1, 0.5]). A = r − mean(1, 0, 1): rollouts [1/3, −2/3], demo 1/3.
# pg = −Σ_rows A·Σ_t shaped / 16;  ∂pg/∂log p = −A·(∂shaped/∂log p)/16 per token.

A_ROWS = [1 / 3, -2 / 3, 1 / 3]
P_DEMO = [0.1, 0.5]


def shaping_batch(pm, cfg, teacher=None):
    g = group([1, 0], [2, 2], 2, "s")
    if teacher is not None:
        g.demonstrations[0].sampling_logprobs = [math.log(p) for p in teacher]
    _, _, batch = compose_and_batch(pm, cfg, [g])
    assert batch.advantages.tolist() == pytest.approx(A_ROWS)
    batch.old_logprobs = fill(batch, [math.log(0.25)] * 2 + [0.0])
    lp = fill(batch, [math.log(0.5)] * 2 + [[math.log(p) for p in P_DEMO]])
    return batch, lp


def pdp(p, gamma=0.1):  # p/(p+γ) and its derivative wrt log p
    return p / (p + gamma), gamma * p / (p + gamma) ** 2


# (config, rollout (g, ∂g/∂log p) per token, demo [(f, ∂f/∂log p)] per token, kept tokens [r0, r1, demo])
SHAPING_CASES = {
    "default": ({}, (2.0, 2.0), [pdp(0.1), pdp(0.5)]),
    "off logp": ({"off_policy_shaping": "logp"}, (2.0, 2.0), [(0.1 * math.log(p), 0.1) for p in P_DEMO]),
    "off p_logp": ({"off_policy_shaping": "p_logp"}, (2.0, 2.0), [(p + 0.1 * math.log(p), p + 0.1) for p in P_DEMO]),
    # p/(p+0.1) = [0.5, 0.8333]: the max clip 0.6 freezes the second token, the min clip 0.6 the first
    "off_max_clip": ({"off_max_clip": 0.6}, (2.0, 2.0), [pdp(0.1), (0.6, 0.0)]),
    "off_min_clip": ({"off_min_clip": 0.6}, (2.0, 2.0), [(0.6, 0.0), pdp(0.5)]),
    # teacher π = [0.2, 0.5]: f = p/(π_teacher + 1e-6), ∂f/∂log p = f
    "target_probs": ({"target_probs": True}, (2.0, 2.0), [(p / (t + 1e-6),) * 2 for p, t in zip(P_DEMO, [0.2, 0.5])]),
    "on logp": ({"on_policy_shaping": "logp"}, (math.log(2.0), 1.0), [pdp(0.1), pdp(0.5)]),
    "on p_logp": ({"on_policy_shaping": "p_logp"}, (2.0 + 0.1 * math.log(2.0), 2.1), [pdp(0.1), pdp(0.5)]),
    "on sqrt": ({"on_policy_shaping": "sqrt"}, (math.sqrt(2.0), 0.5 * math.sqrt(2.0)), [pdp(0.1), pdp(0.5)]),
    "on pow 2": ({"on_policy_shaping": "pow", "on_shaping_power": 2.0}, (4.0, 8.0), [pdp(0.1), pdp(0.5)]),
    # f(π_θ)/f(π_old) = (0.5/0.6)/(0.25/0.35) = 1.1666667; ∂/∂log p = (0.05/0.36)/(0.25/0.35) = 0.1944444
    "on p_div_p": ({"on_policy_shaping": "p_div_p"}, (pdp(0.5)[0] / pdp(0.25)[0], pdp(0.5)[1] / pdp(0.25)[0]),
                   [pdp(0.1), pdp(0.5)]),
}


@pytest.mark.parametrize("case", list(SHAPING_CASES))
def test_official_shaping_and_clip_options_loss_and_gradient(pm, case):
    section, (g_on, dg_on), demo = SHAPING_CASES[case]
    cfg = LUFFYConfig(**section)
    batch, lp = shaping_batch(pm, cfg, teacher=[0.2, 0.5] if cfg.target_probs else None)
    total, parts, g_lp, _ = run_split(pm, cfg, batch, [[0, 1, 2]], lp, torch.zeros_like(lp))
    a_on, a_off = A_ROWS[0] + A_ROWS[1], A_ROWS[2]  # both rollouts have 2 tokens with the same g
    pg_on = -a_on * 2 * g_on / L_MAX
    pg_off = -a_off * sum(f for f, _ in demo) / L_MAX
    assert parts["pg_on"] == pytest.approx(pg_on, abs=1e-6) and parts["pg_off"] == pytest.approx(pg_off, abs=1e-6)
    expected = fill(batch, [-A_ROWS[0] * dg_on / L_MAX, -A_ROWS[1] * dg_on / L_MAX, [-a_off * d / L_MAX for _, d in demo]])
    assert torch.allclose(g_lp, expected, atol=1e-7), (g_lp, expected)
    if case == "on p_div_p":
        assert g_on == pytest.approx(1.1666667) and dg_on == pytest.approx(0.1944444)


def test_all_max_clip_drops_confident_tokens_from_the_gradient(pm):
    """all_max_clip 0.4: every token with π_θ > 0.4 (the rollouts' 0.5s, the demo's 0.5) leaves the PG term;
    the demo's 0.1 token stays: pg = −(1/3)·0.5/16. The entropy bonus still sees every token."""
    cfg = LUFFYConfig(all_max_clip=0.4)
    batch, lp = shaping_batch(pm, cfg)
    ent = fill(batch, [1.0, 1.0, 1.0])
    total, parts, g_lp, g_ent = run_split(pm, cfg, batch, [[0, 1, 2]], lp, ent)
    assert parts["pg_on"] == 0.0 and parts["pg_off"] == pytest.approx(-(1 / 3) * 0.5 / 16)
    assert torch.allclose(g_lp, fill(batch, [0.0, 0.0, [-(1 / 3) * 0.25 / 16, 0.0]]), atol=1e-8)
    assert torch.allclose(g_ent, fill(batch, [-0.001 / 6] * 3), atol=1e-10)


def test_target_probs_needs_teacher_logprobs(pm):
    cfg = LUFFYConfig(target_probs=True)
    with pytest.raises(ValueError, match="target_probs: true needs the teacher's log-probs"):
        pm.hook.compose_group(group=group([1, 0], [2, 2], 2, "s"), config=cfg, step=0, metrics=Metrics())


def test_rl_with_sft_loss_baseline(pm):
    """train_rl_sft_loss.sh: grpo_split advantages from the 3 rollouts only (mean 1/3: A = [2/3, −1/3, −1/3],
    where LUFFY's mixed group would give r − 1/2), PG on the rollouts, SFT NLL on the demonstration."""
    cfg = LUFFYConfig(demo_loss="sft")
    groups, routes, batch = compose_and_batch(pm, cfg, [group([1, 0, 0], [3, 1, 2], 4, "b")])
    assert len(groups[0].members) == 3  # the demonstration is not a member of the advantage group
    assert routes == [Route(rl=1.0, sft=1.0, demos=(0,), members=(0, 1, 2))]
    assert batch.rl_weight.tolist() == [1, 1, 1, 0] and batch.sft_weight.tolist() == [0, 0, 0, 1]
    assert batch.advantages[:3].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    lp = fill(batch, [-1.0] * 3 + [[-1.0, -2.0, -3.0, -2.0]])
    ent = fill(batch, [2.0] * 3 + [1.0])
    for agg in ("invariant", "official"):  # one micro-batch: both modes give the same numbers
        total, parts, g_lp, _ = run_split(pm, LUFFYConfig(demo_loss="sft", aggregation=agg), batch, [[0, 1, 2, 3]], lp, ent)
        assert parts["pg_on"] == pytest.approx(-(2 / 3 * 3 - 1 / 3 * 1 - 1 / 3 * 2) / 16)  # −1/16
        assert parts["sft"] == pytest.approx(8 / 4) and parts["pg_off"] == 0.0
        assert total == pytest.approx(-1 / 16 + 2 - 0.001 * (6 * 2.0 + 4 * 1.0) / 10)
        assert torch.allclose(g_lp, fill(batch, [-2 / 3 / 16, 1 / 3 / 16, 1 / 3 / 16, -1 / 4]), atol=1e-7)
    # official, split [[rollouts], [demo]]: the demo's NLL is its micro-batch's mean (2.0), the entropy
    # means per micro-batch: −0.001·(2 + 1)
    _, parts, _, _ = run_split(pm, LUFFYConfig(demo_loss="sft", aggregation="official"), batch, [[0, 1, 2], [3]], lp, ent)
    assert parts["sft"] == pytest.approx(2.0) and parts["entropy"] == pytest.approx(-0.003)


def test_adaptive_entropy_coefficient_fixed_strategy(pm):
    """entropy_target 0.5, coef 0.001: each micro-batch's bonus is −0.001·0.5·H̄/sg(H̄) = −0.0005 in value,
    and its gradient on a token is −0.0005/(H̄·n) (n tokens of the micro-batch)."""
    cfg = LUFFYConfig(aggregation="official", entropy_target=0.5)
    batch, lp = shaping_batch(pm, cfg)
    ent = fill(batch, [2.0, 2.0, 0.5])
    _, parts, _, g_ent = run_split(pm, cfg, batch, [[0, 1], [2]], lp, ent)
    assert parts["entropy"] == pytest.approx(-0.0005 * 2)
    # micro 1: H̄ = 2, 4 tokens → −0.0005/8; micro 2: H̄ = 0.5, 2 tokens → −0.0005
    assert torch.allclose(g_ent, fill(batch, [-0.0005 / 8, -0.0005 / 8, -0.0005]), atol=1e-10)
    # the fixed coefficient (no target): −0.001·H̄ per micro-batch
    _, plain, _, _ = run_split(pm, LUFFYConfig(aggregation="official"), batch, [[0, 1], [2]], lp, ent)
    assert plain["entropy"] == pytest.approx(-0.001 * (2.0 + 0.5))


@pytest.mark.parametrize("section, expected", [
    ({"on_policy_shaping": "p_div_p_0.1"}, "on_policy_shaping 'p_div_p_0.1' is not one of none | logp | p_logp"),
    ({"off_policy_shaping": "square_root"}, "off_policy_shaping 'square_root' is not one of none | p_div_p | sqrt | pow | logp | p_logp"),
    ({"demo_loss": "sft_multitask"}, "demo_loss 'sft_multitask' is not one of off_policy_rl | sft"),
    ({"entropy_target": 0.5}, "entropy_target (adaptive entropy coefficient) needs aggregation: official"),
    ({"off_min_clip": 0.9, "off_max_clip": 0.5}, "off_min_clip (0.9) must be <= off_max_clip (0.5)"),
    ({"all_max_clip": 0.0}, "all_max_clip must be > 0"),
    ({"demo_loss": "sft", "target_probs": True}, "demo_loss: sft trains the demonstration with SFT"),
    ({"entropy_target_mode": "sac"}, "entropy_target_mode 'sac' is not one of fixed | learned"),
    ({"entropy_target_mode": "learned", "aggregation": "official"}, "entropy_target_mode: learned needs entropy_target"),
    ({"alpha_lr": 0.0}, "alpha_lr and alpha_max must be > 0"),
])
def test_official_option_errors_name_the_field(section, expected):
    _, problems = validate_algorithm({"name": "luffy", **section}, LUFFYConfig)
    assert any(expected in p for p in problems), problems


def test_official_names_are_in_the_help():
    help_of = {k: f.metadata["help"] for k, f in LUFFYConfig.__dataclass_fields__.items()}
    for key, official in [("demo_loss", "use_sft_multitask_loss"), ("off_policy_shaping", "off_policy_reshape"),
                          ("on_policy_shaping", "on_policy_reshape"), ("off_max_clip", "off_policy_max_clip"),
                          ("off_min_clip", "off_policy_min_clip"), ("all_max_clip", "all_max_clip"),
                          ("target_probs", "use_off_policy_probs"), ("entropy_target", "use_adaptive_temperature"),
                          ("shaping_weight", "off_policy_reshape_weight"), ("on_shaping_weight", "on_policy_reshape_weight"),
                          ("entropy_target_mode", "use_adaptive_temperature_fixed"), ("alpha_lr", "alpha_lr"),
                          ("alpha_max", "adaptive_temperature_clip"), ("entropy_target", "adaptive_temperature_target_entropy"),
                          ("target_logprobs_key", "target_probs")]:
        assert official in help_of[key], key


# --- the learned entropy coefficient (use_adaptive_temperature_fixed=False) ----------------------------
# shaping_batch's rows, entropy 2.0 on the rollouts and 0.5 on the demo, H* = 1, entropy_coef 0.001,
# alpha_lr 0.01. Optimizer step 0, micro-batches [[r0, r1], [demo]]: H̄ = 2 and 0.5, α₀ = 0.001.
#   entropy term −α₀·(2 + 0.5) = −0.0025;  ∂/∂log α = α₀·((2 − 1) + (0.5 − 1)) = 0.0005
# AdamW's first step (m̂ = g, v̂ = g²): log α₁ = log α₀·(1 − lr·0.01) − lr·g/(|g| + 1e-8)

LEARNED = dict(aggregation="official", entropy_target=1.0, entropy_target_mode="learned")
G0 = 0.001 * ((2 - 1) + (0.5 - 1))
LOG_ALPHA_1 = math.log(0.001) * (1 - 0.01 * 0.01) - 0.01 * G0 / (G0 + 1e-8)  # −6.9170643


def alpha_state(pm):
    return pm.get_plugin("algorithm:luffy").state_dict()["alpha"]


def test_learned_entropy_coefficient_one_update_by_hand():
    cfg = LUFFYConfig(**LEARNED)
    pm = bound_manager(cfg)
    batch, lp = shaping_batch(pm, cfg)
    ent = fill(batch, [2.0, 2.0, 0.5])
    _, parts, _, g_ent = run_split(pm, cfg, batch, [[0, 1], [2]], lp, ent)
    assert parts["entropy"] == pytest.approx(-0.001 * 2.5, rel=1e-6)
    assert torch.allclose(g_ent, fill(batch, [-0.001 / 4, -0.001 / 4, -0.001 / 2]), atol=1e-9)  # sg(α)/tokens
    state = alpha_state(pm)
    assert state["step"] == 0 and float(state["grad"]) == pytest.approx(G0, rel=1e-6)
    assert float(state["log_alpha"]) == pytest.approx(math.log(0.001), rel=1e-7)  # stepped after the mini-batch
    # optimizer step 1, one micro-batch: α₁ = e^−6.9170643 = 0.00099073, H̄ = (4·2 + 2·0.5)/6 = 1.5
    _, parts, _, g_ent = run_split(pm, cfg, batch, [[0, 1, 2]], lp, ent, step=1)
    alpha1 = math.exp(LOG_ALPHA_1)
    assert alpha1 == pytest.approx(0.00099073417, rel=1e-7)
    state = alpha_state(pm)
    assert float(state["log_alpha"]) == pytest.approx(LOG_ALPHA_1, rel=1e-6)
    assert parts["entropy"] == pytest.approx(-alpha1 * 1.5, rel=1e-5)
    assert torch.allclose(g_ent, -alpha1 / 6 * batch.token_mask, rtol=1e-5, atol=0)
    assert float(state["grad"]) == pytest.approx(alpha1 * (1.5 - 1.0), rel=1e-5)
    # the other strategies give other numbers: plain −0.001·H̄ per micro-batch, fixed −0.001·H* per micro-batch
    plain = run_split(pm, LUFFYConfig(aggregation="official"), batch, [[0, 1, 2]], lp, ent)[1]["entropy"]
    fixed = run_split(pm, LUFFYConfig(aggregation="official", entropy_target=1.0), batch, [[0, 1], [2]], lp, ent)[1]
    assert plain == pytest.approx(-0.0015) and fixed["entropy"] == pytest.approx(-0.002)


def test_learned_entropy_coefficient_clamp_stops_its_gradient():
    """alpha_max 0.0005 < α₀: the bonus uses 0.0005 and log α gets a zero gradient, so AdamW's first step
    only decays it: log α₁ = log α₀·(1 − 0.01·0.01)."""
    cfg = LUFFYConfig(**LEARNED, alpha_max=0.0005)
    pm = bound_manager(cfg)
    batch, lp = shaping_batch(pm, cfg)
    ent = fill(batch, [2.0, 2.0, 0.5])
    _, parts, _, _ = run_split(pm, cfg, batch, [[0, 1], [2]], lp, ent)
    assert parts["entropy"] == pytest.approx(-0.0005 * 2.5, rel=1e-6)
    run_split(pm, cfg, batch, [[0, 1, 2]], lp, ent, step=1)
    assert float(alpha_state(pm)["log_alpha"]) == pytest.approx(math.log(0.001) * (1 - 1e-4), rel=1e-7)


def test_learned_entropy_coefficient_resumes_exactly(tmp_path):
    """3 steps straight vs 2 steps, then resumed from the step-2 checkpoint: the same α every step (its AdamW
    moments and the gradient of the pending step are in the checkpoint), the same weights."""
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import make_tiny_model, tiny_config

    model = make_tiny_model(tmp_path / "m")
    over = {"rollout.n": 3, "save_every": 2, "algorithm.alpha_lr": 0.5, **{f"algorithm.{k}": v for k, v in LEARNED.items()}}
    train(tiny_config(model, tmp_path / "full", algorithm="luffy", steps=3, overrides=over), base=None)
    train(tiny_config(model, tmp_path / "resumed", algorithm="luffy", steps=2, overrides=over), base=None)
    train(tiny_config(model, tmp_path / "resumed", algorithm="luffy", steps=3, overrides=over), base=None)
    full, resumed = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("full", "resumed"))
    coefs = [r["luffy/entropy_coef"] for r in full]
    assert coefs[0] == pytest.approx(0.001) and coefs[1] != pytest.approx(0.001) and coefs[2] != pytest.approx(coefs[1])
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if not k.startswith(("time/", "perf/"))} == \
               {k: v for k, v in b.items() if not k.startswith(("time/", "perf/"))}
    from transformers import AutoModelForCausalLM

    wa, wb = (AutoModelForCausalLM.from_pretrained(tmp_path / d / "checkpoints" / "step-000003").state_dict()
              for d in ("full", "resumed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --- target_probs from the data (use_off_policy_probs=True, the batch key target_probs) ------------------


def test_target_probs_read_from_the_data_field(pm):
    """The row's target_logprobs [log .2, log .5] become the demo's π_teacher: f = π_θ/(π_teacher + 1e-6) =
    [0.1/0.200001, 0.5/0.500001]; pg_off = −(1/3)·Σf/16 and ∂/∂log p = −(1/3)·f/16 per token."""
    cfg = LUFFYConfig(target_probs=True)
    g = group([1, 0], [2, 2], 2, "train.jsonl:3")
    g.example.meta["target_logprobs"] = [math.log(0.2), math.log(0.5)]
    _, _, batch = compose_and_batch(pm, cfg, [g])
    assert batch.sampling_logprobs[2].tolist() == pytest.approx([math.log(0.2), math.log(0.5)])
    batch.old_logprobs = fill(batch, [math.log(0.25)] * 2 + [0.0])
    lp = fill(batch, [math.log(0.5)] * 2 + [[math.log(p) for p in P_DEMO]])
    _, parts, g_lp, _ = run_split(pm, cfg, batch, [[0, 1, 2]], lp, torch.zeros_like(lp))
    f = [0.1 / 0.200001, 0.5 / 0.500001]
    assert parts["pg_off"] == pytest.approx(-(1 / 3) * sum(f) / L_MAX, rel=1e-6)  # −0.0312497; p_div_p: −0.0277778
    assert torch.allclose(g_lp[2, :2], torch.tensor([-(1 / 3) * x / L_MAX for x in f]), atol=1e-8)


def test_target_probs_one_list_per_demonstration(pm):
    cfg = LUFFYConfig(target_probs=True, n_off=2)
    g = sized_group([0, 1], [2, 2], demo_lens=(2, 3), uid="train.jsonl:5")
    g.example.meta["target_logprobs"] = [[-0.1, -0.2], [-0.3, -0.4, -0.5], [-9.0]]
    g = pm.hook.compose_group(group=g, config=cfg, step=0, metrics=Metrics())
    assert [m.sampling_logprobs for m in g.members[2:]] == [[-0.1, -0.2], [-0.3, -0.4, -0.5]]


@pytest.mark.parametrize("meta, message", [
    ({}, "train.jsonl:3: field 'target_logprobs' is missing"),
    ({"target_logprobs": [-0.1, -0.2, -0.3]}, "train.jsonl:3: field 'target_logprobs' has 3 values, the demonstration "
                                              "is 2 tokens (EOS included)"),
    ({"target_logprobs": [-0.1, "x"]}, "train.jsonl:3: field 'target_logprobs' must be a list of numbers"),
])
def test_target_probs_data_errors_name_the_row_and_field_before_sampling(pm, meta, message):
    from posttrain.data import DataError

    g = group([], [], 2, "train.jsonl:3")  # drawn, not yet sampled
    g.example.meta.update(meta)
    with pytest.raises(DataError) as e:  # rollout_requests runs before the rollout engine
        pm.hook.rollout_requests(groups=[g], requests=[], config=LUFFYConfig(target_probs=True), step=0, metrics=Metrics())
    assert message in str(e.value) and "algorithm.target_probs: false" in str(e.value) and "\n" not in str(e.value)
    assert pm.hook.rollout_requests(groups=[g], requests=[], config=LUFFYConfig(), step=0, metrics=Metrics()) is None


def test_target_probs_end_to_end_and_the_cli_line(tmp_path, capsys):
    """A JSONL whose rows carry the teacher's log-probs trains; a row without them stops `posttrain train` with one
    line naming file:line and the field, exit code 2."""
    import json

    from omegaconf import OmegaConf

    from posttrain.cli import main
    from posttrain.data import make_arithmetic
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import make_tiny_model, tiny_config

    rows = [{"prompt": ex.prompt, "answer": ex.answer, "demos": ex.demonstrations,
             "target_logprobs": [[math.log(0.5)] * (len(d) + 1) for d in ex.demonstrations]}  # char tokens + EOS
            for ex in make_arithmetic(n=8, seed=0)]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    del rows[1]["target_logprobs"]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = make_tiny_model(tmp_path / "m")
    over = {"rollout.n": 3, "algorithm.target_probs": True, "trainer.prompts_per_step": 8, "data.shuffle": False}
    train(tiny_config(model, tmp_path / "run", algorithm="luffy", steps=1, overrides={**over, "data.train": str(good)}),
          base=None)
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["train/rows"] == 8 * 4 and row["loss/pg_off"] != 0.0 and math.isfinite(row["loss/total"])
    cfg = tmp_path / "bad.yaml"
    OmegaConf.save(OmegaConf.create(tiny_config(model, tmp_path / "bad", algorithm="luffy", steps=1,
                                                overrides={**over, "data.train": str(bad)})), cfg)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:2: field 'target_logprobs' is missing" in err[0], err


