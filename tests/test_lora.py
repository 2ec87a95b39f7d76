"""LoRA adapters (``model.lora``, peft): what trains, what the loss is, the reference, checkpoints,
resume, later stages, the DeepSpeed backend and the vLLM weight push (the latter with a stand-in
for vLLM: the real engine needs a GPU)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

peft = pytest.importorskip("peft")

import posttrain.engine as engine_mod  # noqa: E402
from posttrain import functional as F  # noqa: E402
from posttrain.cli import main  # noqa: E402
from posttrain.config import ConfigError, LoraConfig, RunConfig  # noqa: E402
from posttrain.logging import read_metrics  # noqa: E402
from posttrain.lora import AdaptersOff, build_models, load_pretrained, merged_weights  # noqa: E402
from posttrain.run import train  # noqa: E402
from posttrain.testing import make_tiny_model, tiny_config  # noqa: E402
from posttrain.train.forward import logprobs_in_micro_batches  # noqa: E402

LORA = {"rank": 4, "alpha": 8.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _peft_model(model_dir, adapter_state=None):
    """The policy built by hand: the base from disk, peft's own LoRA wrapping, given adapter weights."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    if adapter_state is not None:
        missing = model.load_state_dict(adapter_state, strict=False)
        assert not missing.unexpected_keys
    return model


def _plain_logits(model, micro, temperature):
    """Full logits of the response positions through an ordinary forward (no chunking, no split head)."""
    out = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask, position_ids=micro.position_ids).logits
    P, L = micro.prompt_len, micro.response_ids.shape[1]
    return out[:, P - 1:P - 1 + L].float() / temperature


def _record_losses(monkeypatch):
    """Every micro-batch the engine trains on: the model's weights then, the batch, the loss terms."""
    calls = []
    real = engine_mod.micro_batch_loss

    def spy(hook, algo, step, model, micro, m, **kw):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        terms, stats = real(hook, algo, step, model, micro, m, **kw)
        calls.append({"step": step, "state": state, "micro": micro.to("cpu"),
                      "terms": {t.name: float(t.value.detach()) for t in terms}})
        return terms, stats

    monkeypatch.setattr(engine_mod, "micro_batch_loss", spy)
    return calls


def _only_adapters_changed(before: dict, after: dict) -> None:
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(".lora_" in k for k in changed), sorted(k for k in changed if ".lora_" not in k)
    # B starts at zero and every adapted linear layer gets a gradient: every B moved
    assert {k for k in before if ".lora_B." in k} <= changed


def test_lora_grpo_steps_train_only_the_adapter_and_the_loss_is_peft_s(model_dir, tmp_path, monkeypatch):
    """GRPO with an entropy bonus and a KL penalty (so the reference model is used): 2 steps.
    Step 2 runs on the adapter step 1 trained; its loss terms equal a hand computation with
    peft's model (plain forward) and the base model from disk as the reference."""
    calls = _record_losses(monkeypatch)
    over = {"model.lora": LORA, "algorithm.entropy_coef": 0.01, "algorithm.kl_coef": 0.1,
            "trainer.micro_batch_tokens": 100_000}
    final, = train(tiny_config(model_dir, tmp_path / "run", steps=2, overrides=over), base=None)
    assert [c["step"] for c in calls] == [0, 1]  # one micro-batch per step
    _only_adapters_changed(calls[0]["state"], calls[1]["state"])

    c = calls[1]
    micro, terms = c["micro"], c["terms"]
    model = _peft_model(model_dir, {k: v for k, v in c["state"].items() if ".lora_" in k}).train()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp_all = torch.log_softmax(_plain_logits(model, micro, 1.0), -1)
        ref_all = torch.log_softmax(_plain_logits(base, micro, 1.0), -1)
    logp = logp_all.gather(-1, micro.response_ids[..., None]).squeeze(-1)
    ref = ref_all.gather(-1, micro.response_ids[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    m, t = micro.response_mask.float(), micro.totals
    rl = m * (micro.rl_weight > 0).float()[:, None]
    assert t.tokens == m.sum() and t.rl_tokens == rl.sum()  # one micro-batch: its totals are its own counts
    adv = micro.advantages[:, None].expand_as(logp)
    assert micro.ref_logprobs is not None and torch.allclose(micro.ref_logprobs * m, ref * m, atol=1e-5)
    kl = torch.exp(ref - logp) - (ref - logp) - 1  # k3 (no clamp reached: |ref − logp| is small)
    expected = {"pg": float(-(adv * rl).sum() / t.rl_tokens),  # one update per rollout: ratio 1
                "entropy": float(-0.01 * (ent * m).sum() / t.tokens),
                "kl": float(0.1 * (kl * rl).sum() / t.rl_tokens)}
    assert set(terms) == set(expected)
    for k, v in expected.items():
        assert terms[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k
    assert terms["kl"] > 1e-7  # the adapter moved the policy away from the reference

    # the checkpoint holds the adapter only, loadable by peft onto the base
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)


def test_lora_hpt_steps_sft_loss_is_peft_s(model_dir, tmp_path, monkeypatch):
    """HPT on a random model routes every prompt to SFT on its demonstration: step 2's NLL (and
    entropy bonus) equal the hand computation with the step-1 adapter."""
    calls = _record_losses(monkeypatch)
    over = {"model.lora": LORA, "trainer.micro_batch_tokens": 100_000, "rollout.n": 2, "trainer.lr": 1e-2}
    train(tiny_config(model_dir, tmp_path / "run", algorithm="hpt", steps=2, overrides=over), base=None)
    assert [c["step"] for c in calls] == [0, 1]
    _only_adapters_changed(calls[0]["state"], calls[1]["state"])

    c = calls[1]
    micro, terms = c["micro"], c["terms"]
    model = _peft_model(model_dir, {k: v for k, v in c["state"].items() if ".lora_" in k}).train()
    with torch.no_grad():
        logp_all = torch.log_softmax(_plain_logits(model, micro, 1.0), -1)
    logp = logp_all.gather(-1, micro.response_ids[..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    m, t = micro.response_mask.float(), micro.totals
    sft = m * micro.sft_weight[:, None]
    assert t.sft_tokens == (m * (micro.sft_weight > 0).float()[:, None]).sum() > 0
    assert terms["sft"] == pytest.approx(float(-(logp * sft).sum() / t.sft_tokens), rel=1e-5)
    assert terms["entropy"] == pytest.approx(float(-0.001 * (ent * m).sum() / t.tokens), rel=1e-4)


def _policy_and_reference(model_dir, **lora):
    cfg = RunConfig()
    cfg.model.path, cfg.model.lora = str(model_dir), LoraConfig(**{**LORA, **lora})
    return build_models(cfg, device=torch.device("cpu"), needs_reference=True, resume_from=None)


def _batch():
    from posttrain.batching import build_train_batch
    from posttrain.testing import tiny_groups
    from posttrain.types import Route

    groups = list(tiny_groups().values())[:2]
    return build_train_batch(groups, [Route(rl=1.0)] * len(groups), 0)


def test_reference_is_the_base_with_adapters_off(model_dir):
    policy, reference = _policy_and_reference(model_dir)
    assert isinstance(reference, AdaptersOff) and reference.model is policy
    assert {id(p) for p in reference.parameters()} == {id(p) for p in policy.parameters()}  # no second copy
    with torch.no_grad():  # an adapter that has trained: B no longer zero
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    batch = _batch()
    rows = [torch.arange(len(batch))]
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ref_lp = logprobs_in_micro_batches(reference, batch, rows, temperature=1.0, chunk=4)
    base_lp = logprobs_in_micro_batches(initial, batch, rows, temperature=1.0, chunk=4)
    policy_lp = logprobs_in_micro_batches(policy, batch, rows, temperature=1.0, chunk=4)
    mask = batch.response_mask
    assert torch.allclose(ref_lp[mask], base_lp[mask], atol=1e-6)
    assert (policy_lp[mask] - base_lp[mask]).abs().max() > 1e-3  # the policy itself does use its adapter
    assert policy.training  # the reference's eval-mode forward left the policy in train mode
    from peft.tuners.lora import LoraLayer

    layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14 and not any(m.disable_adapters for m in layers)  # 7 linear layers × 2 blocks, back on


def test_resume_of_a_lora_run_reproduces_the_uninterrupted_run(model_dir, tmp_path):
    over = {"model.lora": LORA, "save_every": 2, "algorithm.entropy_coef": 0.01}
    full, = train(tiny_config(model_dir, tmp_path / "full", steps=4, overrides=over), base=None)
    train(tiny_config(model_dir, tmp_path / "resumed", steps=2, overrides=over), base=None)
    resumed, = train(tiny_config(model_dir, tmp_path / "resumed", steps=4, overrides=over), base=None)
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for k in x:
            if not k.startswith(("time/", "perf/")):
                assert x[k] == y[k], (x["step"], k)
    wa, wb = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    start = load_file(tmp_path / "full" / "checkpoints" / "step-000002" / "adapter_model.safetensors")
    assert any(not torch.equal(start[k], wa[k]) for k in wa)  # steps 3-4 trained the resumed adapter further


def test_merged_weights_checkpoint_and_a_later_stage(model_dir, tmp_path):
    """save_merged writes merged/ (a plain HF model equal to base + adapter); a second stage starts
    from the first stage's adapter checkpoint, merged into its base."""
    cfg = tiny_config(model_dir, tmp_path / "run", steps=1,
                      overrides={"model.lora": {**LORA, "save_merged": True}, "trainer.lr": 1e-2})
    cfg["stages"] = [{"algorithm": {"name": "sft"}}, {"algorithm": {"name": "grpo", "entropy_coef": 0.01}}]
    first, second = train(cfg, base=None)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        via_peft = peft.PeftModel.from_pretrained(base, str(first)).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(first / "merged").eval()(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
    assert (via_peft - plain).abs().max() > 1e-4  # stage 0 did change the model
    assert torch.allclose(merged, via_peft, atol=1e-5)
    # stage 1's base is stage 0's result (its merged/ copy); its checkpoint loads as that plus its own adapter
    assert json.loads((second / "adapter_config.json").read_text())["base_model_name_or_path"] == str(first / "merged")
    with torch.no_grad():
        chained = load_pretrained(second, torch.float32).eval()(input_ids=ids).logits
        by_hand = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(first / "merged"), str(second))
        by_hand = by_hand.eval()(input_ids=ids).logits
    assert torch.allclose(chained, by_hand, atol=1e-5) and (chained - merged).abs().max() > 1e-4
    # without merged/, the adapter is merged into its base in memory
    (first / "merged").rename(tmp_path / "moved")
    with torch.no_grad():
        in_memory = load_pretrained(first, torch.float32)
        assert in_memory.name_or_path == str(first)  # what an adapter trained on it will name as its base
        assert torch.allclose(in_memory.eval()(input_ids=ids).logits, via_peft, atol=1e-5)


def test_deepspeed_backend_trains_the_same_adapter(model_dir, tmp_path):
    pytest.importorskip("deepspeed")
    over = {"model.lora": LORA, "rollout.n": 2, "trainer.lr": 1e-2}
    torch_final, = train(tiny_config(model_dir, tmp_path / "torch", algorithm="hpt", steps=2, overrides=over), base=None)
    ds_over = {**over, "trainer.backend": "deepspeed", "trainer.zero_stage": 2}
    ds_final, = train(tiny_config(model_dir, tmp_path / "ds", algorithm="hpt", steps=2, overrides=ds_over), base=None)
    a, b = read_metrics(tmp_path / "torch" / "metrics.jsonl"), read_metrics(tmp_path / "ds" / "metrics.jsonl")
    for x, y in zip(a, b):
        for k in ("loss/total", "loss/sft", "train/grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4), (x["step"], k)
    wa, wb = load_file(torch_final / "adapter_model.safetensors"), load_file(ds_final / "adapter_model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_lora_config_mistakes_are_one_line_errors(model_dir, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config(model_dir, tmp_path / "run", overrides={"model.lora": LORA})))
    assert main(["train", str(cfg), "trainer.backend=deepspeed", "trainer.zero_stage=3"]) == 2
    err = capsys.readouterr().err
    assert "model.lora: not supported with trainer.zero_stage=3; use 1 or 2" in err and "Traceback" not in err
    assert main(["train", str(cfg), "model.lora.rank=0"]) == 2
    assert "model.lora.rank: must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # not installed
    assert main(["train", str(cfg)]) == 2
    assert "model.lora: needs the peft package" in capsys.readouterr().err


def test_vllm_sync_pushes_merged_weights(model_dir):
    """``VLLMRolloutEngine.sync_weights`` on a LoRA policy, with a stand-in for vLLM's model: it
    receives the plain model's parameter names, holding base + adapter."""
    from posttrain.rollout.vllm_engine import VLLMRolloutEngine

    policy, _ = _policy_and_reference(model_dir)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    received = {}

    class FakeLLM:  # what sync_weights calls on vllm.LLM
        def apply_model(self, fn):
            fn(type("M", (), {"load_weights": lambda self, ws: received.update({n: w.clone() for n, w in ws})})())

        def reset_prefix_cache(self):
            pass

    engine = object.__new__(VLLMRolloutEngine)  # its __init__ starts a real vLLM
    engine.llm, engine._asleep, engine._stale = FakeLLM(), set(), True
    engine.sync_weights(policy)
    expected = dict(copy.deepcopy(policy).merge_and_unload().named_parameters())  # peft's own merge
    assert received.keys() == expected.keys()
    assert all(torch.allclose(received[k], expected[k], atol=1e-6) for k in expected)
    assert dict(merged_weights(policy)).keys() == expected.keys() and not engine._stale


def test_show_config_fields_lists_the_lora_fields(model_dir, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config(model_dir, tmp_path / "run")))
    assert main(["show-config", str(cfg), "--fields"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "model.lora.rank = 16: LoRA rank r of each adapter (the update is B·A with A: r×in, B: out×r)." in out
    assert any(line.startswith("model.lora.save_merged = False: ") for line in out)
    assert any(line.startswith("logging.tensorboard = False: ") for line in out)


def test_gradient_checkpointing_still_reaches_the_adapters(model_dir):
    """The frozen embeddings give no grad-requiring input to checkpointed blocks unless peft
    marks it so; without it the adapters of every block would get no gradient at all."""
    from posttrain.train.forward import policy_outputs

    cfg = RunConfig()
    cfg.model.path, cfg.model.lora, cfg.model.gradient_checkpointing = str(model_dir), LoraConfig(**LORA), True
    policy, _ = build_models(cfg, device=torch.device("cpu"), needs_reference=False, resume_from=None)
    assert policy.get_base_model().is_gradient_checkpointing
    batch = _batch()
    out = policy_outputs(policy, batch, temperature=1.0, chunk=4, entropy=True)
    (-(out.logprobs * batch.response_mask).sum() - out.entropy.sum()).backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    b = {n: g for n, g in grads.items() if ".lora_B." in n}  # B starts at 0, so only B has a gradient at first
    assert len(b) == 14 and all(g is not None and g.abs().sum() > 0 for g in b.values()), \
        [n for n, g in b.items() if g is None or g.abs().sum() == 0]


def test_full_vocabulary_reference_loss_with_lora_equals_full_training_at_step_1(model_dir, tmp_path):
    """GIFT reads the reference's whole distribution inside the policy's loss (the LM head module
    is shared by both under LoRA). At step 1 the adapter is zero, so the policy and the reference
    are both the base: the loss equals full fine-tuning's, which has a separate reference copy."""
    pytest.importorskip("posttrain_gift")
    losses = {}
    for name, lora in (("full", None), ("lora", LORA)):
        train(tiny_config(model_dir, tmp_path / name, algorithm="gift", steps=1,
                          overrides={"model.lora": lora, "rollout.n": 2}), base=None)
        losses[name] = read_metrics(tmp_path / name / "metrics.jsonl")[-1]["loss/gift"]
    assert losses["lora"] == pytest.approx(losses["full"], rel=1e-5) and losses["full"] > 0
