"""HPT plugin: the gate, the §5.4 variants, both aggregation modes, hand-computed numbers.

Losses are checked on hand-made batches whose rows have chosen lengths, log-probs and
entropies, so every expected number below is written out as arithmetic. ``run_split`` feeds
those tensors through the engine's own per-micro-batch code path (``posttrain.loss.
micro_batch_loss``: reference_denominator → shape_ratio → stabilization_mask → build_loss,
defaults included) by standing in for the model's forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain import ModelOutputs, Needs, Route
from posttrain import functional as F
from posttrain.batching import build_train_batch, totals_of, trim_padding
from posttrain.config import validate_algorithm
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.testing import fill_tokens, sized_group, split_loss, tiny_group, tiny_tokenizer
from posttrain_hpt import plugin as hpt
from posttrain_hpt.plugin import HPTConfig

ROOT = Path(__file__).resolve().parents[3]
TOK = tiny_tokenizer()
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
L_MAX = 16  # the constant L_max of token-sum-norm used in every hand computation


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager("hpt")


def group(rewards, lens, demo_len, uid, *, demo_reward=1.0):
    """A verified group whose rollouts have the given token counts (EOS included)."""
    return sized_group(rewards, lens, demo_lens=(demo_len,), uid=uid, demo_reward=demo_reward)


def route_all(pm, cfg, groups, metrics=None):
    metrics = metrics if metrics is not None else Metrics()
    groups = [pm.hook.compose_group(group=g, config=cfg, step=0, metrics=metrics) for g in groups]
    routes = [pm.hook.route_group(group=g, config=cfg, step=0, metrics=metrics) for g in groups]
    return groups, routes


def make_batch(pm, cfg, groups, routes):
    batch = build_train_batch(groups, routes, PAD)
    batch.advantages = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=Metrics())
    return batch


fill = fill_tokens  # [N, L] from per-row values


def run_split(pm, cfg, batch, split, logprobs, entropy):
    """Loss of a mini-batch processed as the given micro-batches; returns (total, parts, grads)."""
    r = split_loss(pm.hook, cfg, batch, split, logprobs, entropy, needs=Needs(entropy=True), max_len=L_MAX)
    return r.total, r.parts, r.logprob_grad, r.entropy_grad


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults_are_the_official_setup(pm):
    cfg = pm.hook.algorithm_config()()
    assert isinstance(cfg, HPTConfig)
    assert (cfg.gate, cfg.gate_max_correct, cfg.variant, cfg.aggregation) == ("switch", 0, "sft_on", "invariant")
    # Dr.GRPO: no std, no clip, Σ/L_max; SFT coef 1, entropy 0.001, no KL
    assert (cfg.norm_adv_by_std, cfg.clip_low, cfg.loss_agg) == (False, None, "token-sum-norm")
    assert (cfg.sft_coef, cfg.entropy_coef, cfg.kl_coef) == (1.0, 0.001, 0.0)
    assert (cfg.mix_sft_weight, cfg.off_rl_weight, cfg.off_policy_shaping, cfg.shaping_gamma) == (0.1, 1.0, "p_div_p", 0.1)
    needs = pm.hook.requirements(config=cfg)
    assert needs.rollouts and needs.entropy and not needs.reference
    assert "COUNT" in HPTConfig.__dataclass_fields__["gate_max_correct"].metadata["help"]


@pytest.mark.parametrize("section, expected", [
    ({"variant": "luffy"}, "variant 'luffy' is not one of sft_on | off_on | mix_on"),
    ({"gate_max_correct": -1}, "gate_max_correct must be >= 0"),
    ({"gate": "linear", "variant": "mix_on"}, "linear works with variant: sft_on only"),
    ({"gate": "linear", "ramp_start": 0.6, "ramp_end": 0.5}, "0 <= ramp_start < ramp_end <= 1"),
    ({"aggregation": "per-micro"}, "aggregation 'per-micro' is not one of invariant | official"),
    ({"gate_max_correct": 0.25}, "gate_max_correct"),  # a fraction where a count belongs
])
def test_config_errors_name_the_field(section, expected):
    obj, problems = validate_algorithm({"name": "hpt", **section}, HPTConfig)
    assert obj is None or problems
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("path", ["configs/hpt.yaml", "configs/demo/hpt.yaml"])
def test_shipped_configs_validate(path):
    from posttrain.run import load_config, resolve_stages

    (stage,) = resolve_stages(load_config(ROOT / path), source=path)
    assert isinstance(stage.algo, HPTConfig) and stage.algo.variant == "sft_on"
    if path == "configs/hpt.yaml":  # the paper's Qwen2.5-Math-7B run
        t, r = stage.run.trainer, stage.run.rollout
        assert (t.lr, t.grad_clip, t.skip_grad_norm_above, t.prompts_per_step, t.prompts_per_minibatch) == (5e-6, 1.0, 80, 128, 64)
        assert (r.n, r.temperature, r.max_new_tokens, stage.algo.loss_max_len) == (8, 1.0, 8192, 8192)


# --- the gate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0, 1, 2])
@pytest.mark.parametrize("correct", range(9))
def test_gate_is_a_count_out_of_n(pm, gamma, correct):
    """SFT iff c <= γ: γ=0 → RL with >= 1 correct, γ=1 → >= 2, γ=2 → >= 3 (of 8)."""
    cfg = HPTConfig(gate_max_correct=gamma)
    g = tiny_group([1] * correct + [0] * (8 - correct), uid=f"g{correct}")
    r = pm.hook.route_group(group=g, config=cfg, step=0, metrics=Metrics())
    if correct <= gamma:
        assert r == Route(rl=0.0, sft=1.0, demos=(0,), members=())
    else:  # every rollout stays, all-correct included (A = 0 there)
        assert r == Route(rl=1.0, sft=0.0, members=tuple(range(8)))


def test_gate_metrics_and_missing_demonstration(pm):
    cfg = HPTConfig()
    m = Metrics()
    groups = [tiny_group([0, 0, 0, 0], uid="a"), tiny_group([1, 0, 0, 0], uid="b"),
              tiny_group([1, 1, 1, 1], uid="c"), tiny_group([0, 0, 0, 0], uid="d", demos=())]
    _, routes = route_all(pm, cfg, groups, m)
    assert [r.kind for r in routes] == ["sft", "rl", "rl", "rl"]  # "d" has nothing to imitate: keeps RL
    s = m.summary()
    assert s["hpt/offline_ratio"] == pytest.approx(1 / 4)
    assert s["hpt/mean_correct_frac"] == pytest.approx((0 + 0.25 + 1 + 0) / 4)
    assert s["hpt/no_demo"] == 1.0


def test_linear_gate_values(pm):
    cfg = HPTConfig(gate="linear", ramp_start=0.0, ramp_end=0.5)
    # P = c/8: α = clip(P / 0.5, 0, 1), β = 1 − α
    assert [hpt.feedback(c, 8, cfg) for c in (0, 1, 2, 4, 8)] == [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (1.0, 0.0), (1.0, 0.0)]
    r = pm.hook.route_group(group=tiny_group([1] + [0] * 7), config=cfg, step=0, metrics=Metrics())
    assert r == Route(rl=0.25, sft=0.75, demos=(0,), members=tuple(range(8))) and r.kind == "mix"


# --- SFT/ON loss, hand-computed -------------------------------------------------------------------

# Four prompts, n = 4 rollouts each, γ = 0:
#   all-wrong  [0,0,0,0] → SFT on its demo, 4 tokens, log-probs [-1,-2,-3,-2]  (NLL sum 8)
#   mixed      [1,0,0,1] → RL, lengths [3,1,2,2], A = r − 0.5 = [+.5,-.5,-.5,+.5]
#   all-right  [1,1,1,1] → RL, lengths [2,2,2,2], A = 0 (kept: entropy and normalisers)
#   all-wrong2 [0,0,0,0] → SFT on its demo, 2 tokens, log-probs [-.5,-.5]       (NLL sum 1)
# Rows: [demo1, mixed×4, right×4, demo2]; entropy 1.0 on demo tokens, 2.0 on rollout tokens;
# log-probs of rollouts −1 and π_old = π_θ, so ρ = 1 and ∂ρ/∂logp = 1.
# Tokens: demos 4 + 2 = 6, rollouts 8 + 8 = 16, all 22.


def sft_on_batch(pm, cfg):
    groups = [group([0, 0, 0, 0], [2, 2, 2, 2], 4, "w1"), group([1, 0, 0, 1], [3, 1, 2, 2], 3, "m"),
              group([1, 1, 1, 1], [2, 2, 2, 2], 3, "c"), group([0, 0, 0, 0], [2, 2, 2, 2], 2, "w2")]
    groups, routes = route_all(pm, cfg, groups)
    assert [r.kind for r in routes] == ["sft", "rl", "rl", "sft"]
    batch = make_batch(pm, cfg, groups, routes)
    lp = fill(batch, [[-1.0, -2.0, -3.0, -2.0]] + [-1.0] * 8 + [[-0.5, -0.5]])
    ent = fill(batch, [1.0] + [2.0] * 8 + [1.0])
    return batch, lp, ent


def test_advantage_is_dr_grpo(pm):
    cfg = HPTConfig()
    batch, _, _ = sft_on_batch(pm, cfg)
    assert batch.rl_weight.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert batch.sft_weight.tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert batch.advantages[1:9].tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]  # r − mean, no std


def test_invariant_loss_and_gradient(pm):
    cfg = HPTConfig()
    batch, lp, ent = sft_on_batch(pm, cfg)
    total, parts, g_lp, g_ent = run_split(pm, cfg, batch, [list(range(10))], lp, ent)
    pg = -(0.5 * 3 - 0.5 * 1 - 0.5 * 2 + 0.5 * 2) / L_MAX  # −Σ_i A_i·|y_i| / L_max = −1/16
    sft = (8 + 1) / 6  # token-mean NLL over the mini-batch's 6 demo tokens
    ent_term = -0.001 * (6 * 1.0 + 16 * 2.0) / 22  # −0.001 × token-mean entropy over all 22 tokens
    assert parts["pg"] == pytest.approx(pg) and parts["sft"] == pytest.approx(sft)
    assert parts["entropy"] == pytest.approx(ent_term)
    assert total == pytest.approx(pg + sft + ent_term)  # 1.4357727
    # ∂/∂logp: demo tokens −1/6; rollout tokens −A·ρ/L_max = ∓0.5/16; all-correct 0
    expected = fill(batch, [-1 / 6] + [-0.5 / 16, 0.5 / 16, 0.5 / 16, -0.5 / 16] + [0.0] * 4 + [-1 / 6])
    assert torch.allclose(g_lp, expected, atol=1e-7)
    assert torch.allclose(g_ent, -0.001 / 22 * batch.token_mask, atol=1e-9)


def test_invariant_mode_does_not_depend_on_micro_batching(pm):
    cfg = HPTConfig()
    batch, lp, ent = sft_on_batch(pm, cfg)
    whole = run_split(pm, cfg, batch, [list(range(10))], lp, ent)  # 1 micro-batch of N rows
    rows = run_split(pm, cfg, batch, [[i] for i in range(10)], lp, ent)  # N micro-batches of 1 row
    assert rows[0] == pytest.approx(whole[0], rel=1e-6)
    assert rows[1] == pytest.approx(whole[1], rel=1e-6)
    assert torch.allclose(rows[2], whole[2], atol=1e-7) and torch.allclose(rows[3], whole[3], atol=1e-9)


def test_official_mode_reproduces_per_micro_batch_numbers(pm):
    cfg = HPTConfig(aggregation="official")
    batch, lp, ent = sft_on_batch(pm, cfg)
    split = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]  # [demo1 + mixed], [all-right + demo2]
    total, parts, g_lp, g_ent = run_split(pm, cfg, batch, split, lp, ent)
    # micro-batch 1: SFT 8/4 = 2;   PG −1/16;  entropy mean (4·1 + 8·2)/12 = 20/12
    # micro-batch 2: SFT 1/2 = 0.5; PG 0;      entropy mean (8·2 + 2·1)/10 = 1.8
    assert parts["sft"] == pytest.approx(2.0 + 0.5)
    assert parts["pg"] == pytest.approx(-1 / 16)
    assert parts["entropy"] == pytest.approx(-0.001 * (20 / 12 + 1.8))
    assert total == pytest.approx(2.5 - 0.0625 - 0.001 * (20 / 12 + 1.8))  # 2.4340333
    # the SFT weight of a token is 1/(demo tokens of ITS micro-batch): −1/4 and −1/2, not −1/6
    expected = fill(batch, [-1 / 4] + [-0.5 / 16, 0.5 / 16, 0.5 / 16, -0.5 / 16] + [0.0] * 4 + [-1 / 2])
    assert torch.allclose(g_lp, expected, atol=1e-7)
    expected_ent = fill(batch, [-0.001 / 12] * 5 + [-0.001 / 10] * 5)
    assert torch.allclose(g_ent, expected_ent, atol=1e-9)
    # one micro-batch per mini-batch: the official loss is the invariant loss
    one = run_split(pm, cfg, batch, [list(range(10))], lp, ent)
    assert one[0] == pytest.approx(-1 / 16 + 9 / 6 - 0.001 * 38 / 22)


def test_official_build_loss_called_directly(pm):
    """The hook function itself, on the first micro-batch above (ρ = 1, mask = tokens)."""
    cfg = HPTConfig(aggregation="official")
    batch, lp, ent = sft_on_batch(pm, cfg)
    micro = trim_padding(batch.select(torch.arange(5))).with_(totals=totals_of(batch, max_len=L_MAX))
    lp_m = lp[:5, :4].clone().requires_grad_(True)
    adv = micro.advantages[:, None].expand_as(lp_m)
    terms = hpt.build_loss(batch=micro, outputs=ModelOutputs(logprobs=lp_m, entropy=ent[:5, :4]), advantages=adv,
                           ratio=torch.exp(lp_m - lp_m.detach()), mask=micro.response_mask, config=cfg)
    values = {t.name: float(t.value.detach()) for t in terms}
    assert values == pytest.approx({"pg": -1 / 16, "sft": 2.0, "entropy": -0.001 * 20 / 12})
    sum(t.value for t in terms).backward()
    expected = fill(micro, [-1 / 4] + [-0.5 / 16, 0.5 / 16, 0.5 / 16, -0.5 / 16])  # SFT −1/4, PG −A/16
    assert torch.allclose(lp_m.grad, expected, atol=1e-7)
    assert hpt.build_loss(batch=micro, outputs=None, advantages=adv, ratio=None, mask=None, config=HPTConfig()) is None


def test_linear_gate_loss(pm):
    """c = 1 of 4 with ramp [0, 0.5]: P = .25 → α = β = 0.5 on one prompt."""
    cfg = HPTConfig(gate="linear", entropy_coef=0.0)
    groups, routes = route_all(pm, cfg, [group([1, 0, 0, 0], [3, 1, 2, 2], 4, "lin")])
    assert routes == [Route(rl=0.5, sft=0.5, demos=(0,), members=(0, 1, 2, 3))]
    batch = make_batch(pm, cfg, groups, routes)  # rows: 4 rollouts (rl .5), then the demo (sft .5)
    assert batch.advantages[:4].tolist() == [0.75, -0.25, -0.25, -0.25]
    lp = fill(batch, [-1.0] * 4 + [[-1.0, -2.0, -3.0, -2.0]])
    total, parts, g_lp, _ = run_split(pm, cfg, batch, [[0, 1, 2, 3, 4]], lp, torch.zeros_like(lp))
    # PG: −α·Σ A_i|y_i| / 16 = −0.5·(0.75·3 − 0.25·(1+2+2))/16 = −0.5/16;  SFT: β·8/4 = 1
    assert parts == pytest.approx({"pg": -0.5 / 16, "sft": 1.0})
    expected = fill(batch, [-0.5 * 0.75 / 16] + [0.5 * 0.25 / 16] * 3 + [-0.5 / 4])
    assert torch.allclose(g_lp, expected, atol=1e-7)


# --- §5.4 variants: OFF/ON and Mix/ON -------------------------------------------------------------

# all-wrong prompt → its demo (4 tokens, π_θ = [.1, .5, 1, .01]) alone, off-policy RL, A = r_demo = 1;
# mixed prompt [1,0,0,1], lengths [3,1,2,2] → RL as above. Entropy 1 on demo, 2 on rollouts (12 tokens).
# f(p) = p/(p+.1) = [.5, .833333, .909091, .090909], Σf = 2.333333;
# ∂f/∂logp = .1p/(p+.1)² = [.25, .138889, .0826446, .0826446]  (algorithms.md sanity numbers)
DEMO_P = [0.1, 0.5, 1.0, 0.01]
F_SUM = sum(p / (p + 0.1) for p in DEMO_P)
DF = [0.1 * p / (p + 0.1) ** 2 for p in DEMO_P]


def variant_batch(pm, cfg):
    groups = [group([0, 0, 0, 0], [2, 2, 2, 2], 4, "w"), group([1, 0, 0, 1], [3, 1, 2, 2], 3, "m")]
    groups, routes = route_all(pm, cfg, groups)
    return groups, routes, make_batch(pm, cfg, groups, routes)


@pytest.mark.parametrize("variant", ["off_on", "mix_on"])
def test_variant_routing_and_advantage(pm, variant):
    cfg = HPTConfig(variant=variant)
    groups, routes, batch = variant_batch(pm, cfg)
    demo = groups[0].members[4]  # compose_group appended the demonstration: verified with the rollouts
    assert demo.off_policy and demo.teacher == 0 and demo.response_ids == groups[0].demonstrations[0].response_ids
    sft = 0.1 if variant == "mix_on" else 0.0
    assert routes == [Route(rl=1.0, sft=sft, demos=(0,), members=(4,)), Route(rl=1.0, members=(0, 1, 2, 3))]
    assert batch.off_policy.tolist() == [True, False, False, False, False]
    assert batch.sft_weight.tolist() == pytest.approx([sft, 0, 0, 0, 0])  # SFT on the same row, not a copy
    # the demo is alone in its advantage group: A = r (verl: a singleton group has mean 0)
    assert batch.advantages.tolist() == [1.0, 0.5, -0.5, -0.5, 0.5]


def test_variant_denominator_and_shaping(pm):
    cfg = HPTConfig(variant="off_on")
    _, _, batch = variant_batch(pm, cfg)
    batch.old_logprobs = torch.full(batch.response_mask.shape, -0.7)
    logp = fill(batch, [[math.log(p) for p in DEMO_P]] + [-1.0] * 4)
    denom = pm.hook.reference_denominator(batch=batch, logprobs=logp, config=cfg, step=0)
    assert torch.equal(denom[0], torch.zeros(4)) and torch.all(denom[1:] == -0.7)  # π_ref ≡ 1 on the demo
    ratio = F.importance_ratio(logp, denom)
    shaped = pm.hook.shape_ratio(batch=batch, ratio=ratio, config=cfg, step=0)
    assert shaped[0].tolist() == pytest.approx([p / (p + 0.1) for p in DEMO_P])
    assert torch.equal(shaped[1:], ratio[1:])
    # SFT/ON leaves both to the defaults
    assert hpt.reference_denominator(batch=batch, config=HPTConfig()) is None
    assert hpt.shape_ratio(batch=batch, ratio=ratio, config=HPTConfig()) is None
    assert hpt.shape_ratio(batch=batch, ratio=ratio, config=HPTConfig(variant="off_on", off_policy_shaping="none")) is None


@pytest.mark.parametrize("variant", ["off_on", "mix_on"])
def test_variant_loss_and_gradient(pm, variant):
    cfg = HPTConfig(variant=variant)
    _, _, batch = variant_batch(pm, cfg)
    lp = fill(batch, [[math.log(p) for p in DEMO_P]] + [-1.0] * 4)
    ent = fill(batch, [1.0] + [2.0] * 4)
    total, parts, g_lp, _ = run_split(pm, cfg, batch, [[0, 1, 2, 3, 4]], lp, ent)
    pg = -(1.0 * F_SUM + 1.0) / L_MAX  # demo −A·Σf = −2.333333, mixed −Σ A|y| = −1; /16 → −0.2083333
    ent_term = -0.001 * (4 * 1.0 + 8 * 2.0) / 12
    assert parts["pg"] == pytest.approx(pg) and parts["entropy"] == pytest.approx(ent_term)
    demo_grad = [-d / L_MAX for d in DF]  # −A·f'(p)·p / L_max
    if variant == "off_on":
        assert "sft" not in parts
        assert total == pytest.approx(-0.21)  # −0.2083333 − 0.0016667
    else:  # + 0.1 × token-mean NLL of the demo: 0.1 × (2.302585 + 0.693147 + 0 + 4.605170)/4
        sft = 0.1 * -sum(math.log(p) for p in DEMO_P) / 4
        assert parts["sft"] == pytest.approx(sft) and sft == pytest.approx(0.19002256)
        assert total == pytest.approx(-0.21 + sft)
        demo_grad = [g - 0.1 / 4 for g in demo_grad]
    expected = fill(batch, [demo_grad] + [-0.5 / 16, 0.5 / 16, 0.5 / 16, -0.5 / 16])
    assert torch.allclose(g_lp, expected, atol=1e-6)
    assert demo_grad[0] == pytest.approx(-0.25 / 16 - (0.025 if variant == "mix_on" else 0.0))


def test_variant_demo_failing_the_verifier_gets_no_rl_signal(pm):
    cfg = HPTConfig(variant="off_on")
    g = group([0, 0, 0, 0], [2, 2, 2, 2], 4, "w", demo_reward=0.0)
    groups, routes = route_all(pm, cfg, [g])
    assert make_batch(pm, cfg, groups, routes).advantages.tolist() == [0.0]


# --- conformance and a real run ----------------------------------------------------------------------


def test_check_algorithm_plugin():
    from posttrain.testing import check_algorithm_plugin

    report = check_algorithm_plugin("hpt")
    assert report["routes"] == ["sft", "rl", "rl", "rl"]  # all-wrong, mixed, all-correct, two teachers (1 of 4)
    assert {"pg", "sft", "entropy"} <= set(report["terms"])


@pytest.mark.parametrize("variant", ["sft_on", "mix_on"])
def test_two_step_run_on_the_tiny_model(tmp_path, variant):
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import make_tiny_model, tiny_config

    model = make_tiny_model(tmp_path / "m")
    cfg = tiny_config(model, tmp_path / "run", algorithm="hpt", steps=2,
                      overrides={"algorithm.variant": variant, "trainer.skip_grad_norm_above": 80.0})
    finals = train(cfg, base=None)
    assert finals and all(Path(f).exists() for f in finals)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [r for r in rows if "hpt/offline_ratio" in r]
    assert len(steps) == 2
    for r in steps:
        assert 0.0 <= r["hpt/offline_ratio"] <= 1.0 and 0.0 <= r["hpt/mean_correct_frac"] <= 1.0
        # a random model solves (almost) nothing: the gate sends most prompts to the demonstration
        if r["hpt/offline_ratio"] > 0:
            assert math.isfinite(r["loss/sft" if variant == "sft_on" else "loss/pg"])
        assert "train/skipped_steps" in r and math.isfinite(r["loss/total"])
        if variant == "mix_on" and r["hpt/offline_ratio"] > 0:
            # the demonstrations were verified with the rollouts (they are correct): Â = 1 > 0 on them
            assert r["reward/off_policy_mean"] == 1.0 and r["loss/pg"] < 0 and r["route/mix"] > 0


# --- the official code's other gates: switch_gate_off and unify_strategy: soft ----------------------


@pytest.mark.parametrize("correct", range(9))
def test_two_threshold_gate_routes_by_count(pm, correct):
    """switch_gate=1, switch_gate_off=3: c <= 1 → SFT, 1 < c <= 3 → off-policy RL on the demo, c > 3 → RL."""
    cfg = HPTConfig(gate_max_correct=1, gate_off_max_correct=3)
    g = pm.hook.compose_group(group=tiny_group([1] * correct + [0] * (8 - correct), uid=f"g{correct}"), config=cfg,
                              step=0, metrics=Metrics())
    assert g.members[8].off_policy  # the band needs the demonstration verified: compose_group appends it
    r = pm.hook.route_group(group=g, config=cfg, step=0, metrics=Metrics())
    if correct <= 1:
        assert r == Route(rl=0.0, sft=1.0, demos=(0,), members=())
    elif correct <= 3:
        assert r == Route(rl=1.0, sft=0.0, demos=(0,), members=(8,))
    else:
        assert r == Route(rl=1.0, sft=0.0, members=tuple(range(8)))


def test_two_threshold_gate_loss_and_gradient(pm):
    """Band prompt (c = 1 with switch_gate=0, switch_gate_off=1): its demo row gets LUFFY's off-policy
    term −A·p/(p + 0.1) with A = r_demo = 1; a c = 2 prompt keeps Dr.GRPO; an all-wrong prompt does SFT."""
    cfg = HPTConfig(gate_max_correct=0, gate_off_max_correct=1)
    groups = [group([0, 0, 0, 0], [2, 2, 2, 2], 2, "w"), group([1, 0, 0, 0], [2, 2, 2, 2], 4, "b"),
              group([1, 0, 0, 1], [3, 1, 2, 2], 3, "m")]
    groups, routes = route_all(pm, cfg, groups)
    assert [r.kind for r in routes] == ["sft", "rl", "rl"]
    batch = make_batch(pm, cfg, groups, routes)
    # rows: [SFT demo of "w", off-policy demo of "b", 4 rollouts of "m"]
    assert batch.off_policy.tolist() == [True, True, False, False, False, False]
    assert batch.rl_weight.tolist() == [0, 1, 1, 1, 1, 1] and batch.sft_weight.tolist() == [1, 0, 0, 0, 0, 0]
    assert batch.advantages.tolist() == [0.0, 1.0, 0.5, -0.5, -0.5, 0.5]  # the band demo: A = r (singleton group)
    lp = fill(batch, [[-0.5, -0.5], [math.log(p) for p in DEMO_P]] + [-1.0] * 4)
    ent = fill(batch, [1.0, 1.0] + [2.0] * 4)
    total, parts, g_lp, _ = run_split(pm, cfg, batch, [list(range(6))], lp, ent)
    pg = -(F_SUM + 1.0) / L_MAX  # demo −1·Σ p/(p+0.1) = −2.333333; rollouts −Σ A|y| = −1
    assert parts["pg"] == pytest.approx(pg) and pg == pytest.approx(-0.2083333, abs=1e-7)
    assert parts["sft"] == pytest.approx(0.5)  # (0.5 + 0.5) / 2 demo tokens
    assert parts["entropy"] == pytest.approx(-0.001 * (6 * 1.0 + 8 * 2.0) / 14)
    expected = fill(batch, [[-0.5, -0.5], [-d / L_MAX for d in DF], -0.5 / 16, 0.5 / 16, 0.5 / 16, -0.5 / 16])
    assert torch.allclose(g_lp, expected, atol=1e-6)
    # without the band (switch_gate_off = switch_gate, the official scripts) the c = 1 prompt is RL on rollouts
    plain = HPTConfig(gate_max_correct=0, gate_off_max_correct=0)
    _, routes = route_all(pm, plain, [group([1, 0, 0, 0], [2, 2, 2, 2], 4, "b")])
    assert routes == [Route(rl=1.0, sft=0.0, members=(0, 1, 2, 3))]


def test_soft_strategy_keeps_rollouts_and_adds_the_demonstration(pm):
    """unify_strategy=soft (offline_loss_type=sft): every prompt keeps its rollouts and adds its demo, which has the
    prompt's uid: its reward enters the GRPO baseline, but the sft branch trains PG on on-policy rows only."""
    cfg = HPTConfig(gate="soft")
    groups = [group([0, 0, 0, 0], [2, 2, 2, 2], 4, "w"), group([1, 0, 0, 1], [3, 1, 2, 2], 2, "m")]
    groups, routes = route_all(pm, cfg, groups)
    assert routes == [Route(rl=1.0, sft=1.0, demos=(0,))] * 2 and all(g.members[4].off_policy for g in groups)
    batch = make_batch(pm, cfg, groups, routes)
    assert batch.rl_weight.tolist() == [1] * 10 and batch.sft_weight.tolist() == [0, 0, 0, 0, 1] * 2
    # Â = r − mean over 4 rollouts + demo (r = 1): "w" mean 0.2, "m" mean 0.6
    assert batch.advantages.tolist() == pytest.approx([-0.2] * 4 + [0.8] + [0.4, -0.6, -0.6, 0.4] + [0.4])
    lp = fill(batch, [-1.0] * 4 + [[-1.0, -2.0, -3.0, -2.0]] + [-1.0] * 4 + [[-0.5, -0.5]])
    ent = fill(batch, [2.0] * 4 + [1.0] + [2.0] * 4 + [1.0])
    total, parts, g_lp, _ = run_split(pm, cfg, batch, [list(range(10))], lp, ent)
    # PG over rollouts only: "w" −(−0.2·8)/16, "m" −(0.4·3 − 0.6·1 − 0.6·2 + 0.4·2)/16 → 1.4/16
    assert parts["pg"] == pytest.approx(1.4 / 16)
    assert parts["sft"] == pytest.approx(9 / 6)  # NLL (8 + 1) over the 6 demo tokens
    assert total == pytest.approx(1.4 / 16 + 1.5 - 0.001 * (6 * 1.0 + 16 * 2.0) / 22)
    expected = fill(batch, [0.2 / 16] * 4 + [-1 / 6] + [-0.4 / 16, 0.6 / 16, 0.6 / 16, -0.4 / 16] + [-1 / 6])
    assert torch.allclose(g_lp, expected, atol=1e-7)  # demo tokens: SFT only, no PG


@pytest.mark.parametrize("section, expected", [
    ({"gate_max_correct": 2, "gate_off_max_correct": 1}, "gate_off_max_correct (1) must be >= gate_max_correct (2)"),
    ({"gate": "linear", "gate_off_max_correct": 2}, "gate_off_max_correct works with gate: switch"),
    ({"variant": "off_on", "gate_off_max_correct": 2}, "gate_off_max_correct works with gate: switch and variant: sft_on"),
    ({"gate": "soft", "variant": "mix_on"}, "gate: soft works with variant: sft_on only"),
    ({"gate": "hard"}, "gate 'hard' is not one of switch | linear | soft"),
])
def test_official_gate_errors_name_the_field(section, expected):
    _, problems = validate_algorithm({"name": "hpt", **section}, HPTConfig)
    assert any(expected in p for p in problems), problems
    help_text = HPTConfig.__dataclass_fields__["gate_off_max_correct"].metadata["help"]
    assert "switch_gate_off" in help_text and "unify_strategy=soft" in HPTConfig.__dataclass_fields__["gate"].metadata["help"]
