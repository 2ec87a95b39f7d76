"""Truncated importance sampling (rollout.is_cap) through the loss path every algorithm uses."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain import functional as F
from posttrain.logging import read_metrics
from posttrain.loss import micro_batch_loss
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.run import train
from posttrain.testing import make_tiny_model, tiny_config, tiny_rl_sft_batch

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")

def _loss(model, batch, algo, hook, is_cap):
    terms, stats = micro_batch_loss(hook, algo, 0, model, batch, Metrics(), needs=hook.requirements(config=algo),
                                    chunk=4, is_cap=is_cap)
    return {t.name: t.value for t in terms}, stats

def test_is_weight_scales_the_pg_term_of_sampled_tokens_only(model_dir):
    pm = make_plugin_manager("grpo")
    algo = pm.hook.algorithm_config()(clip_low=None, entropy_coef=0.0)  # no clip: pg = −A·ρ, ρ = 1
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tiny_rl_sft_batch()
    plain, _ = _loss(model, batch, algo, pm.hook, None)
    corrected, stats = _loss(model, batch, algo, pm.hook, 2.0)

    # By hand: w = min(exp(logp_θ − sampling), 2) on sampled tokens; token-mean over RL tokens.
    with torch.no_grad():
        from posttrain.train.forward import policy_outputs
        logp = policy_outputs(model, batch, temperature=1.0, chunk=4).logprobs
    rl = batch.response_mask & (batch.rl_weight > 0)[:, None]
    sampled = batch.response_mask & ~batch.off_policy[:, None]
    w = torch.where(sampled, torch.exp(logp - batch.sampling_logprobs).clamp(max=2.0), torch.ones_like(logp))
    expected = float((-(batch.advantages[:, None] * w)[rl]).sum() / rl.sum())
    assert float(corrected["pg"].detach()) == pytest.approx(expected, rel=1e-5)
    assert float(plain["pg"].detach()) == pytest.approx(float((-batch.advantages[:, None].expand_as(logp))[rl].sum() / rl.sum()), abs=1e-6)
    assert float(corrected["pg"].detach()) != pytest.approx(float(plain["pg"].detach()), abs=1e-3)  # tiny_group's log-probs are random
    # The SFT term (a demonstration: never sampled) is untouched.
    assert float(corrected["sft"].detach()) == pytest.approx(float(plain["sft"].detach()), rel=1e-6)
    assert stats["train/is_weight"] == pytest.approx(float(F.masked_mean(w, sampled)), rel=1e-5)
    assert 0.0 <= stats["train/is_truncated"] <= 1.0

    # The weight is a constant: the gradient is w·A·∇logp, not the gradient of w.
    model.zero_grad()
    corrected["pg"].backward()
    g_corr = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    manual = policy_outputs(model, batch, temperature=1.0, chunk=4).logprobs
    (-(batch.advantages[:, None] * w * torch.exp(manual - manual.detach()))[rl].sum() / rl.sum()).backward()
    for a, p in zip(g_corr, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)

def test_is_correction_in_a_run_with_the_hf_engine_is_a_no_op(model_dir, tmp_path):
    # The HF engine samples from the trained module itself: π_sampling = π_old up to float noise,
    # so every weight is 1 and nothing is truncated.
    train(tiny_config(model_dir, tmp_path / "run", steps=1, overrides={"rollout.is_cap": 2.0}), base=None)
    row, = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["train/is_weight"] == pytest.approx(1.0, abs=1e-4)
    assert row["train/is_truncated"] == 0.0

def test_is_cap_must_be_positive(model_dir, tmp_path):
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"rollout.is_cap: must be > 0"):
        train(tiny_config(model_dir, tmp_path / "run", steps=1, overrides={"rollout.is_cap": 0.0}), base=None)
