"""Baselines users compare against (RLOO, REINFORCE++, CISPO, GRPO with KL in the reward) and
the logged PPO loss value, checked against numbers computed by hand."""

import math

import pytest
import torch

from posttrain import functional as F
from posttrain.batching import build_train_batch
from posttrain.plugins import make_plugin_manager
from posttrain.testing import fill_tokens, sized_group, split_loss, tiny_tokenizer
from posttrain.types import Route

PAD = tiny_tokenizer().pad_token_id


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from posttrain.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _algo(name, **kw):
    pm = make_plugin_manager(name)
    return pm.hook, pm.hook.algorithm_config()(**kw)


# --- the logged PPO value ------------------------------------------------------------------------

# Rewards 1, 0, 0, 1 with Dr.GRPO centring → A = +½, −½, −½, +½; two tokens a row; π_old = e^−1.
# Ratios per token, and PPO's token loss max(−Aρ, −A·clip(ρ, 0.8, 1.2)) (dual clip c = 3: min with −A·c for A < 0):
RATIOS = [[1.5, 1.1], [0.5, 0.9], [4.0, 1.0], [0.7, 1.3]]
PPO_DUAL = [[-0.6, -0.55], [0.4, 0.45], [1.5, 0.5], [-0.35, -0.6]]  # clipped: (0,0) (1,0) (2,0) dual, (3,1)
PPO_PLAIN = [[-0.6, -0.55], [0.4, 0.45], [2.0, 0.5], [-0.35, -0.6]]  # TRL: no dual clip, (2,0) kept
# Gradient wrt log π_θ: −A·ρ/8 on tokens PPO keeps, 0 on clipped ones.
GRAD_DUAL = [[0.0, -0.55 / 8], [0.0, 0.45 / 8], [0.0, 0.5 / 8], [-0.35 / 8, 0.0]]


def _clipped_batch():
    batch = build_train_batch([sized_group([1, 0, 0, 1], [2, 2, 2, 2])], [Route(rl=1.0)], PAD)
    batch.advantages = F.group_advantages(batch.rewards, batch.group_index, use_std=False)
    old = fill_tokens(batch, [-1.0] * 4)
    return batch.with_(old_logprobs=old), old + fill_tokens(batch, [[math.log(r) for r in row] for row in RATIOS])


@pytest.mark.parametrize("clip_dual, expected, grad", [(3.0, PPO_DUAL, GRAD_DUAL), (None, PPO_PLAIN, None)])
def test_logged_pg_is_the_ppo_value_and_the_gradient_is_the_masked_forms(clip_dual, expected, grad):
    hook, algo = _algo("grpo", norm_adv_by_std=False, clip_dual=clip_dual)
    batch, logp = _clipped_batch()
    assert batch.advantages.tolist() == [0.5, -0.5, -0.5, 0.5]
    out = split_loss(hook, algo, batch, [[0, 1, 2, 3]], logp)
    # TRL/verl: token-mean of max(−Aρ, −A·clip(ρ)) (verl's dual clip): 0.75/8 and 1.25/8, where
    # the masked form −Aρ·1_kept alone logged 0.05/8 = 0.00625 and 2.05/8 = 0.25625.
    assert out.parts["pg"] == pytest.approx(sum(map(sum, expected)) / 8, abs=1e-6)
    assert out.parts["pg"] == pytest.approx(0.09375 if clip_dual else 0.15625, abs=1e-6)
    # Same gradient as the masked form (and as PPO's), split or not.
    kept = F.ppo_clip_mask(torch.tensor(RATIOS), batch.advantages[:, None], 0.2, None, clip_dual)
    masked = (-batch.advantages[:, None] * torch.tensor(RATIOS) * kept) / 8
    torch.testing.assert_close(out.logprob_grad, masked, atol=1e-6, rtol=1e-5)
    if grad is not None:
        torch.testing.assert_close(out.logprob_grad, torch.tensor(grad), atol=1e-6, rtol=1e-5)
    per_row = split_loss(hook, algo, batch, [[0], [1, 2], [3]], logp)
    assert per_row.parts["pg"] == pytest.approx(out.parts["pg"], abs=1e-6)
    torch.testing.assert_close(per_row.logprob_grad, out.logprob_grad)


def test_ppo_token_loss_leaves_tokens_dropped_by_other_masks_at_zero():
    ratio = torch.tensor([[1.5, 1.0, 0.5]])
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    other = torch.tensor([[True, False, True]])  # a plugin's mask drops the middle token
    mask = other & F.ppo_clip_mask(ratio, adv, 0.2)
    # (0,0) clipped by PPO → −1.2; (0,1) dropped by the other mask → 0; (0,2) kept → −0.5.
    assert F.ppo_token_loss(ratio, adv, mask, 0.2)[0].tolist() == pytest.approx([-1.2, 0.0, -0.5])
    assert F.ppo_token_loss(ratio, adv, other, None)[0].tolist() == pytest.approx([-1.5, 0.0, -0.5])


# --- RLOO, GRPO with KL in the reward, REINFORCE++, CISPO ----------------------------------------

# Rewards 1, 0, 0, 0 on rollouts of 2, 2, 3, 3 tokens (10 tokens), sampled at log-prob −1.
# Reference log-probs per row: the k1 KL per token is old − ref = 0.5, 0, 1.0, 0.
REF = [-1.5, -1.0, -2.0, -1.0]


def _baseline_batch(ref=False):
    batch = build_train_batch([sized_group([1, 0, 0, 0], [2, 2, 3, 3])], [Route(rl=1.0)], PAD)
    if ref:
        batch = batch.with_(ref_logprobs=fill_tokens(batch, REF))
    return batch


def _advantages(name, batch, **kw):
    hook, algo = _algo(name, **kw)
    return hook, algo, hook.compute_advantage(batch=batch, config=algo, step=0, metrics=None)


def test_rloo_leave_one_out_advantages_loss_and_gradient():
    batch = _baseline_batch()
    hook, algo, adv = _advantages("rloo", batch)
    # r_i − mean of the 3 others: 1 − 0 = 1; 0 − 1/3 (GRPO would give 1.5, −0.5).
    assert adv.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    out = split_loss(hook, algo, batch.with_(advantages=adv), [[0, 1, 2, 3]], fill_tokens(batch, [-1.0] * 4))
    # ρ = 1: token mean of −Â over 10 tokens = −(2·1 − 2/3 − 1 − 1)/10 = 1/15; ∂/∂log π = −Â/10.
    assert out.parts == pytest.approx({"pg": 1 / 15})
    torch.testing.assert_close(out.logprob_grad, fill_tokens(batch, [-0.1, 1 / 30, 1 / 30, 1 / 30]))
    assert hook.requirements(config=algo).reference is False


def test_rloo_with_kl_in_the_reward():
    batch = _baseline_batch(ref=True)
    _, algo, adv = _advantages("rloo", batch, kl_reward_coef=0.1)
    # r − 0.1·Σ_t KL_t = 0.9, 0, −0.3, 0 → leave-one-out: 0.9 − (−0.1), 0 − 0.2, −0.3 − 0.3, 0 − 0.2.
    assert adv.tolist() == pytest.approx([1.0, -0.2, -0.6, -0.2])


@pytest.mark.parametrize("coef, expected", [(0.0, [0.75, -0.25, -0.25, -0.25]), (0.1, [0.75, -0.15, -0.45, -0.15])])
def test_grpo_kl_in_the_reward(coef, expected):
    batch = _baseline_batch(ref=True)
    hook, algo, adv = _advantages("grpo", batch, norm_adv_by_std=False, kl_reward_coef=coef)
    # verl use_kl_in_reward: score − β·Σ_t (log π_old − log π_ref) = 0.9, 0, −0.3, 0; centred on 0.15.
    assert adv.tolist() == pytest.approx(expected)
    assert hook.requirements(config=algo).reference is (coef > 0)
    # k3 instead of k1: KL_t = e^{ref−old} − (ref−old) − 1 = e^−0.5 − 0.5, 0, e^−1, 0 per token.
    _, _, adv3 = _advantages("grpo", batch, norm_adv_by_std=False, kl_reward_coef=0.1, kl_reward_estimator="k3")
    pen = [0.1 * 2 * (math.exp(-0.5) - 0.5), 0.0, 0.1 * 3 * math.exp(-1.0), 0.0]
    r = [1 - pen[0], 0.0, -pen[2], 0.0]
    assert adv3.tolist() == pytest.approx([x - sum(r) / 4 for x in r])


def test_reinforce_pp_token_kl_return_and_global_whitening():
    import statistics

    batch = _baseline_batch(ref=True)
    hook, algo, adv = _advantages("reinforce_pp", batch, kl_reward_coef=0.1)
    assert hook.requirements(config=algo).reference is True
    # Token rewards −0.1·KL_t, the score on the last token; returns G_t summed from t to the end:
    # row 0: r = −0.05, 0.95 → G = 0.9, 0.95; row 2: r = −0.1 ×3 → G = −0.3, −0.2, −0.1; rows 1, 3: 0.
    G = [[0.9, 0.95], [0.0, 0.0], [-0.3, -0.2, -0.1], [0.0, 0.0, 0.0]]
    flat = [g for row in G for g in row]
    mu, sd = statistics.mean(flat), statistics.stdev(flat)  # over all 10 tokens of the batch, unbiased
    assert (mu, sd) == pytest.approx((0.125, math.sqrt(1.69625 / 9)))
    expected = fill_tokens(batch, [[(g - mu) / sd for g in row] for row in G])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=1e-6)
    # Loss: PPO-clipped with ρ = 1, token mean: value −ΣÂ/10 = 0, gradient −Â_t/10.
    out = split_loss(hook, algo, batch.with_(advantages=adv), [[0, 1], [2, 3]], fill_tokens(batch, [-1.0] * 4))
    assert out.parts["pg"] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(out.logprob_grad, -expected / 10, atol=1e-6, rtol=1e-5)
    # β = 0: REINFORCE with a batch-whitened outcome: G = 1, 1 on row 0, else 0 (mean 0.2).
    _, _, adv0 = _advantages("reinforce_pp", batch, kl_reward_coef=0.0)
    sd0 = statistics.stdev([1.0, 1.0] + [0.0] * 8)
    torch.testing.assert_close(adv0, fill_tokens(batch, [0.8 / sd0, -0.2 / sd0, -0.2 / sd0, -0.2 / sd0]))


def test_cispo_clips_the_detached_weight_and_keeps_every_token():
    hook, algo = _algo("cispo", norm_adv_by_std=False)
    batch, logp = _clipped_batch()
    out = split_loss(hook, algo, batch, [[0, 1], [2, 3]], logp)
    # ŵ = clip(ρ, 0, 1.28); loss −ŵ·Â·log π_θ token-mean over 8 tokens; Â = +½, −½, −½, +½.
    w = [[1.28, 1.1], [0.5, 0.9], [1.28, 1.0], [0.7, 1.28]]
    A = [0.5, -0.5, -0.5, 0.5]
    value = sum(-w[i][t] * A[i] * (-1 + math.log(RATIOS[i][t])) for i in range(4) for t in range(2)) / 8
    assert out.parts == pytest.approx({"pg": value})
    # Every token has a gradient, −ŵ·Â/8 (PPO would zero 4 of these 8).
    grad = [[-0.08, -0.06875], [0.03125, 0.05625], [0.08, 0.0625], [-0.04375, -0.08]]
    torch.testing.assert_close(out.logprob_grad, torch.tensor(grad), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name, section, message", [
    ("grpo", {"kl_reward_estimator": "k4"}, "algorithm.kl_reward_estimator: 'k4' is not k1 | k2 | k3."),
    ("grpo", {"kl_reward_coef": -0.1}, "algorithm.kl_reward_coef: must be >= 0 (0 disables), got -0.1."),
    ("reinforce_pp", {"gamma": 0.0}, "gamma must be in (0, 1]"),
    ("cispo", {"weight_clip_low": 1.5}, "weight_clip_low must be in [0, 1]"),
])
def test_config_mistakes_are_one_line(name, section, message):
    from posttrain.config import validate_algorithm

    hook, _ = _algo(name)
    _, problems = validate_algorithm({"name": name, **section}, hook.algorithm_config())
    assert len(problems) == 1 and message in problems[0]


@pytest.mark.parametrize("name", ["rloo", "reinforce_pp", "cispo"])
def test_conformance(name, tiny_model_dir):
    from posttrain.testing import check_algorithm_plugin

    report = check_algorithm_plugin(name, model_dir=tiny_model_dir)
    assert set(report["terms"]) >= {"pg"} and math.isfinite(report["loss"])
    assert report["needs"].reference is (name == "reinforce_pp")


def test_reinforce_pp_trains_two_steps_with_the_reference_read_before_the_advantage(tiny_model_dir, tmp_path):
    """The engine fills π_ref before compute_advantage: REINFORCE++'s token KL reward needs it."""
    from posttrain.testing import check_two_step_run

    out = check_two_step_run("reinforce_pp", tmp_path / "run", model_dir=tiny_model_dir)
    assert out["changed"] and all(math.isfinite(r["loss/pg"]) for r in out["metrics"])


def test_readme_algorithm_table_lists_every_registered_algorithm_with_its_paper():
    from posttrain.registry import load_registry, repo_root

    text = (repo_root() / "README.md").read_text()
    table = text[text.index("## Algorithms"):text.index("## Config reference")]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.splitlines() if line.startswith("| `")}
    algos = load_registry()["algorithms"]
    assert sorted(rows) == sorted(algos)
    for name, entry in algos.items():
        assert (entry["paper"] or "—") in rows[name], f"README row of {name} lacks its paper {entry['paper']}"
