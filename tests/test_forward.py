"""The policy forward pass computes the entropy with gradient only when the algorithm asks."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain import functional as F
from posttrain.loss import micro_batch_loss
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.testing import make_tiny_model, tiny_rl_sft_batch
from posttrain.train.forward import policy_outputs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("fwd") / "m")


@pytest.fixture()
def entropy_calls(monkeypatch):
    calls = []
    real = F.entropy_from_logits

    def counted(logits):
        calls.append(torch.is_grad_enabled())
        return real(logits)

    monkeypatch.setattr(F, "entropy_from_logits", counted)
    return calls


def _grpo(entropy_coef):
    pm = make_plugin_manager("grpo")
    algo = pm.hook.algorithm_config()(entropy_coef=entropy_coef)
    return pm.hook, algo, pm.hook.requirements(config=algo)


def test_entropy_metric_without_entropy_term_is_computed_once_without_gradient(model_dir, entropy_calls):
    """GRPO without an entropy term (Needs.entropy False): train/entropy is still logged, from
    one no-grad entropy per chunk, and backward neither differentiates nor recomputes it. The
    old path computed it with gradient and recomputed every chunk in backward: 2 chunks → 4
    calls, all with grad. The loss and its gradient are those of the entropy-with-gradient path."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tiny_rl_sft_batch()
    chunks = -(-batch.response_ids.shape[1] // 4)
    assert chunks >= 2
    hook, algo, needs = _grpo(0.0)
    assert not needs.entropy
    terms, stats = micro_batch_loss(hook, algo, 0, model, batch, Metrics(), needs=needs, chunk=4)
    sum(t.value for t in terms).backward()
    assert entropy_calls == [False] * chunks
    grads = [p.grad.clone() for p in model.parameters()]

    with torch.no_grad():
        ref = policy_outputs(model, batch, temperature=1.0, chunk=64, entropy=True).entropy
    assert stats["train/entropy"] == pytest.approx(float(F.masked_mean(ref, batch.response_mask)), rel=1e-6)

    model.zero_grad()
    with_grad = dataclasses.replace(needs, entropy=True)  # the same loss, through the path that keeps the entropy's graph
    terms2, _ = micro_batch_loss(hook, algo, 0, model, batch, Metrics(), needs=with_grad, chunk=4)
    sum(t.value for t in terms2).backward()
    assert float(sum(t.value for t in terms2).detach()) == pytest.approx(float(sum(t.value for t in terms).detach()), rel=1e-6)
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def test_entropy_term_keeps_its_gradient(model_dir, entropy_calls):
    """With entropy_coef > 0 the entropy comes with gradient (forward + checkpoint recompute)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tiny_rl_sft_batch()
    hook, algo, needs = _grpo(0.01)
    assert needs.entropy
    terms, _ = micro_batch_loss(hook, algo, 0, model, batch, Metrics(), needs=needs, chunk=4)
    ent = {t.name: t for t in terms}["entropy"].value
    assert ent.requires_grad
    ent.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.grad is not None)
    assert True in entropy_calls


def test_entropy_stat_beside_a_distribution_loss(model_dir):
    """The metric rides along a full-vocabulary loss: both come back, values unchanged, only the loss with gradient."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in ref_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = tiny_rl_sft_batch()

    def kl(logits, ref_logp, labels):  # a full-vocabulary loss: KL(ref ‖ π)
        return (ref_logp.exp() * (ref_logp - torch.log_softmax(logits, -1))).sum(-1)

    both = policy_outputs(model, batch, temperature=1.0, chunk=4, entropy_stat=True, distribution_loss=kl, reference=ref_model)
    plain = policy_outputs(model, batch, temperature=1.0, chunk=4, entropy=True, distribution_loss=kl, reference=ref_model)
    assert both.distribution_loss.requires_grad and not both.entropy.requires_grad
    torch.testing.assert_close(both.distribution_loss, plain.distribution_loss)
    torch.testing.assert_close(both.entropy, plain.entropy.detach())
    assert both.distribution_loss.shape == both.entropy.shape == batch.response_ids.shape
    assert float(both.distribution_loss.abs().max()) > 1e-3  # a real loss: the reference differs


def test_chunks_are_checkpointed_only_when_their_logits_would_be_large(model_dir, monkeypatch):
    """Backward recomputes a chunk's logits only where keeping them would cost memory: the tiny
    model's [N, L, 100] float32 logits (a few kB) are kept; with the threshold below them every
    chunk is checkpointed. The loss and every gradient are the same either way."""
    from posttrain.train import forward

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch = tiny_rl_sft_batch()
    chunks = -(-batch.response_ids.shape[1] // 4)
    hook, algo, needs = _grpo(0.0)
    checkpointed = []
    real = F._checkpoint
    monkeypatch.setattr(F, "_checkpoint", lambda *a, **kw: checkpointed.append(1) or real(*a, **kw))

    def loss_and_grads():
        model.zero_grad()
        terms, _ = micro_batch_loss(hook, algo, 0, model, batch, Metrics(), needs=needs, chunk=4)
        loss = sum(t.value for t in terms)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    kept = loss_and_grads()
    assert checkpointed == []
    monkeypatch.setattr(forward, "CHECKPOINT_ABOVE_BYTES", 0)
    recomputed = loss_and_grads()
    assert len(checkpointed) == chunks >= 2
    assert kept[0] == pytest.approx(recomputed[0], rel=1e-6)
    for a, b in zip(kept[1], recomputed[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
