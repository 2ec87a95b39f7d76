"""One test per hook: the default behaviour through a real plugin manager, with numbers."""

import math

import pytest
import torch

from posttrain import GRPOConfig, LossTerm, ModelOutputs, Needs, Route, hookimpl
from posttrain.batching import build_train_batch, totals_of
from posttrain.config import TrainerConfig
from posttrain.metrics import Metrics
from posttrain.plugins import build_registry, make_plugin_manager
from posttrain.testing import tiny_group, tiny_tokenizer

PAD = tiny_tokenizer().pad_token_id


@pytest.fixture
def pm():
    return make_plugin_manager("grpo")


def _batch(groups, routes=None):
    routes = routes or [Route(rl=1.0)] * len(groups)
    return build_train_batch(groups, routes, PAD)


def test_hook_algorithm_config(pm):
    assert pm.hook.algorithm_config() is GRPOConfig
    assert make_plugin_manager("sft").hook.algorithm_config().__name__ == "SFTConfig"


def test_hook_requirements(pm):
    assert pm.hook.requirements(config=GRPOConfig()) == Needs(rollouts=True, reference=False, entropy=False)
    needs = pm.hook.requirements(config=GRPOConfig(kl_coef=0.01, entropy_coef=0.001))
    assert needs.reference and needs.entropy and needs.rollouts


def test_hook_register_verifiers():
    class Mine:
        @hookimpl
        def register_verifiers(self, register):
            register("mine", lambda cfg: "mine-verifier")
            register("exact", lambda cfg: "my-exact")  # a plugin's registration beats the default's

    reg = build_registry(make_plugin_manager("grpo", plugins=[Mine()]), "register_verifiers")
    assert {"math", "exact", "choice", "mine"} <= set(reg)
    assert reg["exact"](None) == "my-exact"


def test_hook_register_rollout_engines(pm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import RolloutConfig
    from posttrain.rollout import SamplingParams
    from posttrain.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    engine = build_registry(pm, "register_rollout_engines")["hf"](model, tok, RolloutConfig(batch_size=3))
    prompts = [tok("1+2=").input_ids, tok("33+4=").input_ids]
    torch.manual_seed(0)
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6))
    assert [len(o) for o in out] == [2, 2]
    for trajs, prompt in zip(out, prompts):
        for t in trajs:
            assert 1 <= len(t.response_ids) <= 6 and len(t.sampling_logprobs) == len(t.response_ids)
            assert t.finished == (t.response_ids[-1] == tok.eos_token_id)
            # sampling log-probs are what the trainer computes for the same tokens
            ids = torch.tensor([prompt + t.response_ids])
            logits = model(ids).logits[0, len(prompt) - 1:-1]
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(t.response_ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(t.sampling_logprobs), ref, atol=1e-4)
    greedy = engine.generate(prompts[:1], SamplingParams(n=2, temperature=0.0, max_new_tokens=6))[0]
    assert greedy[0].response_ids == greedy[1].response_ids


def test_hook_register_trainer_backends(pm):
    backend_factory = build_registry(pm, "register_trainer_backends")["torch"]
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    cfg = TrainerConfig(lr=0.1, grad_clip=1.0, skip_grad_norm_above=10.0, weight_decay=0.0, schedule="cosine",
                        warmup_steps=1, steps=3)
    b = backend_factory(model, cfg, 3)
    assert b.lr == pytest.approx(0.1)  # warm-up step 0: (0+1)/1
    (model(torch.tensor([[3.0, 4.0]])).sum()).backward()  # grad (3, 4), norm 5 → clipped to 1
    norm, skipped = b.step()
    assert norm == pytest.approx(5.0) and not skipped
    # Adam's first step moves each weight by lr·sign(grad) = 0.1
    assert torch.allclose(model.weight, torch.tensor([[0.9, 0.9]]), atol=1e-6)
    assert b.lr == pytest.approx(0.1)  # step 1 starts the cosine decay over steps 1..3
    (model(torch.tensor([[30.0, 40.0]])).sum()).backward()  # norm 50 > 10 → skipped, weights kept
    norm, skipped = b.step()
    assert skipped and b.skipped_steps == 1
    assert b.lr == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 1 / 2)))  # the schedule advances on a skip too
    assert torch.allclose(model.weight, torch.tensor([[0.9, 0.9]]), atol=1e-6)


def test_hook_compose_group(pm):
    g = tiny_group([1, 0])
    assert pm.hook.compose_group(group=g, config=GRPOConfig(), step=0, metrics=Metrics()) is g


def test_hook_route_group(pm):
    m = Metrics()
    assert pm.hook.route_group(group=tiny_group([1, 0]), config=GRPOConfig(), step=0, metrics=m) == Route(rl=1.0)
    offline = tiny_group([])
    assert pm.hook.route_group(group=offline, config=GRPOConfig(), step=0, metrics=m) == Route(rl=0.0, sft=1.0, demos=(0,))
    assert pm.hook.route_group(group=tiny_group([], demos=()), config=GRPOConfig(), step=0, metrics=m).drop


def test_hook_compute_advantage(pm):
    batch = _batch([tiny_group([1, 0, 0, 0], seed=1), tiny_group([1, 1, 1, 1], seed=2), tiny_group([1], seed=3)])
    adv = pm.hook.compute_advantage(batch=batch, config=GRPOConfig(), step=0, metrics=Metrics())
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5 → 1.5, −0.5; all-correct → 0;
    # a group of one takes mean 0, std 1 (verl) → A = 1/(1+1e-6)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0, 1.0])
    assert torch.allclose(adv, expected, atol=1e-5)
    dr = pm.hook.compute_advantage(batch=batch, config=GRPOConfig(norm_adv_by_std=False), step=0, metrics=Metrics())
    assert torch.allclose(dr[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_hook_reference_denominator(pm):
    batch = _batch([tiny_group([1, 0])])
    batch.old_logprobs = torch.randn(batch.response_ids.shape)
    out = pm.hook.reference_denominator(batch=batch, logprobs=torch.zeros_like(batch.old_logprobs), config=GRPOConfig(), step=0)
    assert out is batch.old_logprobs


def test_hook_shape_ratio(pm):
    batch = _batch([tiny_group([1, 0])])
    ratio = torch.full(batch.response_ids.shape, 1.5)
    assert pm.hook.shape_ratio(batch=batch, ratio=ratio, config=GRPOConfig(), step=0) is ratio
    # GSPO: the sequence ratio is exp(mean over the row's tokens of log ρ)
    ratio = torch.ones(batch.response_ids.shape)
    ratio[0, 0] = math.e ** 2
    seq = pm.hook.shape_ratio(batch=batch, ratio=ratio, config=GRPOConfig(ratio_level="sequence"), step=0)
    n0 = int(batch.response_mask[0].sum())
    assert torch.allclose(seq[0, :n0], torch.full((n0,), math.exp(2 / n0)), atol=1e-5)
    assert torch.allclose(seq[1][batch.response_mask[1]], torch.tensor(1.0))


def test_hook_stabilization_mask(pm):
    g = tiny_group([1, 0])
    g.members.append(g.demonstrations[0])
    batch = _batch([g])
    L = batch.response_ids.shape[1]
    ratio = torch.tensor([1.3, 0.7, 1.3])[:, None].expand(3, L)
    adv = torch.tensor([1.0, -1.0, 1.0])[:, None].expand(3, L)
    masks = pm.hook.stabilization_mask(batch=batch, logprobs=None, ratio=ratio, advantages=adv, config=GRPOConfig(), step=0)
    mask = [m for m in masks if m is not None][0]
    # A>0 with ρ>1.2 is clipped; A<0 with ρ<0.8 is clipped; the demonstration row is never clipped here
    assert mask[:, 0].tolist() == [False, False, True]
    ratio2 = torch.tensor([0.7, 1.3, 1.0])[:, None].expand(3, L)
    mask2 = [m for m in pm.hook.stabilization_mask(batch=batch, logprobs=None, ratio=ratio2, advantages=adv,
                                                   config=GRPOConfig(), step=0) if m is not None][0]
    assert mask2[:, 0].tolist() == [True, True, True]
    none = pm.hook.stabilization_mask(batch=batch, logprobs=None, ratio=ratio, advantages=adv, config=GRPOConfig(clip_low=None), step=0)
    assert all(m is None for m in none)


def test_hook_token_distribution_loss(tmp_path):
    from posttrain.loss import micro_batch_loss

    pm = make_plugin_manager("grpo")
    assert pm.hook.token_distribution_loss(logits=torch.zeros(1, 2, 5), reference_logprobs=torch.zeros(1, 2, 5),
                                           labels=torch.zeros(1, 2, dtype=torch.long), config=None, step=0, metrics=None) is None

    class KLToRef:
        calls = []

        @hookimpl
        def token_distribution_loss(self, logits, reference_logprobs, labels):
            self.calls.append(tuple(logits.shape))
            logp = torch.log_softmax(logits, -1)
            return (logp.exp() * (logp - reference_logprobs)).sum(-1)  # KL(π‖ref) per position

        @hookimpl
        def build_loss(self, batch, outputs):
            return [LossTerm("kl_full", (outputs.distribution_loss * batch.token_mask).sum())]

    from transformers import AutoModelForCausalLM

    from posttrain.testing import make_tiny_model

    path = make_tiny_model(tmp_path / "m")
    model, ref = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    plugin = KLToRef()
    pm = make_plugin_manager("grpo", plugins=[plugin])
    batch = _batch([tiny_group([1, 0])])
    batch.advantages = torch.zeros(2)
    batch.totals = totals_of(batch, 16)
    terms, _ = micro_batch_loss(pm.hook, GRPOConfig(), 0, model, batch, Metrics(), needs=Needs(reference_vocab=True),
                                reference=ref, chunk=3)
    # identical weights → KL is 0 at every position; chunks of 3 positions were passed
    assert abs(float(terms[0].value.detach())) < 1e-5
    assert plugin.calls and all(c[1] <= 3 and c[2] == model.config.vocab_size for c in plugin.calls)


def test_hook_build_loss(pm):
    batch = _batch([tiny_group([1, 0], seed=5)])
    m = batch.response_mask.float()
    n_tok = m.sum()
    batch.totals = totals_of(batch, max_len=16)
    logp = torch.full(batch.response_ids.shape, -1.0, requires_grad=True)
    adv = torch.tensor([0.5, -0.5])[:, None].expand_as(logp)
    ratio = torch.exp(logp - logp.detach())  # ρ = 1 with ∇ρ = ∇log p
    out = ModelOutputs(logprobs=logp, entropy=torch.full_like(logp, 2.0))
    cfg = GRPOConfig(entropy_coef=0.01)
    terms = pm.hook.build_loss(batch=batch, outputs=out, advantages=adv, ratio=ratio, mask=batch.response_mask,
                               config=cfg, step=0, metrics=Metrics())
    by = {t.name: t.value for t in terms}
    # token-mean: −Σ A·ρ / tokens = −(0.5·n0 − 0.5·n1)/(n0 + n1)
    n0, n1 = m[0].sum(), m[1].sum()
    assert torch.allclose(by["pg"], -(0.5 * n0 - 0.5 * n1) / n_tok)
    assert torch.allclose(by["entropy"], torch.tensor(-0.01 * 2.0))
    sum(by.values()).backward()
    assert torch.allclose(logp.grad[0][batch.response_mask[0]], -0.5 / n_tok)
    assert torch.allclose(logp.grad[1][batch.response_mask[1]], 0.5 / n_tok)


def _recorder():
    class Recorder:
        calls = []

        @hookimpl
        def on_train_start(self, config, run_dir):
            self.calls.append(("start", config["algorithm"]["name"], run_dir))

        @hookimpl
        def on_rollout_end(self, groups, step):
            self.calls.append(("rollout", step, len(groups), all(m.reward is not None for g in groups for m in g.members)))

        @hookimpl
        def on_step_end(self, step, metrics):
            self.calls.append(("step", step, "loss/total" in metrics))

        @hookimpl
        def on_train_end(self, run_dir):
            self.calls.append(("end", run_dir))

    return Recorder()


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    from posttrain.run import train
    from posttrain.testing import make_tiny_model, tiny_config

    tmp = tmp_path_factory.mktemp("hooks")
    rec = _recorder()
    rec.calls.clear()
    train(tiny_config(make_tiny_model(tmp / "m"), tmp / "run", steps=2), plugins=[rec], base=None)
    return rec.calls, str(tmp / "run")


def test_hook_on_train_start(recorded_run):
    calls, run_dir = recorded_run
    assert calls[0] == ("start", "grpo", run_dir)


def test_hook_on_rollout_end(recorded_run):
    calls, _ = recorded_run
    assert [c for c in calls if c[0] == "rollout"] == [("rollout", 0, 4, True), ("rollout", 1, 4, True)]


def test_hook_on_step_end(recorded_run):
    calls, _ = recorded_run
    assert [c for c in calls if c[0] == "step"] == [("step", 1, True), ("step", 2, True)]


def test_hook_on_train_end(recorded_run):
    calls, run_dir = recorded_run
    assert calls[-1] == ("end", run_dir)
