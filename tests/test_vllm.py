"""The vLLM rollout engine on a GPU (skipped without CUDA and vLLM; run them in the GPU environment
README 'Scaling up' describes: ``pytest -q -m gpu tests/test_vllm.py``).

Stale weights after wake-up are a silent failure elsewhere, so the sync test checks both sides:
before the push vLLM's log-probs are far from the changed trainer's, after it they match.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

vllm = pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM  # noqa: E402

from posttrain.batching import build_train_batch  # noqa: E402
from posttrain.config import RolloutConfig  # noqa: E402
from posttrain.logging import read_metrics  # noqa: E402
from posttrain.rollout import SamplingParams  # noqa: E402
from posttrain.run import train  # noqa: E402
from posttrain.testing import make_tiny_model, tiny_config, tiny_tokenizer  # noqa: E402
from posttrain.train.forward import policy_outputs  # noqa: E402
from posttrain.types import Example, PromptGroup, Route  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head_dim 64: what vLLM's attention kernels support.
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=256, layers=2, heads=4)


def _trainer_logprobs(model, prompt, trajs, temperature):
    """Log-probs the trainer computes for the sampled responses: [n, L] and the response mask."""
    g = PromptGroup(example=Example(prompt="", answer=""), prompt_ids=prompt, members=trajs)
    for t in trajs:
        t.reward = 0.0
    batch = build_train_batch([g], [Route(rl=1.0)], tiny_tokenizer().pad_token_id)
    with torch.no_grad():
        lp = policy_outputs(model, batch, temperature=temperature, chunk=64).logprobs.float().cpu()
    return lp, batch.response_mask, batch.sampling_logprobs


def test_logprobs_match_the_trainer_after_a_weight_sync(model_dir):
    from posttrain.rollout.vllm_engine import VLLMRolloutEngine

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    engine = VLLMRolloutEngine(model, tok, RolloutConfig(gpu_memory_utilization=0.3, sleep_level=1))
    prompt = tok("Q: 12+7=\nA: ", add_special_tokens=False).input_ids
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=24)

    def gap(trajs):
        lp, mask, sampled = _trainer_logprobs(model, prompt, trajs, params.temperature)
        return float((lp - sampled)[mask].abs().max()), int(mask.sum())

    before, n_tokens = gap(engine.generate([prompt], params)[0])
    assert n_tokens > 8 and before < 2e-3, before  # same weights, both fp32: numerical noise only

    with torch.no_grad():  # what an optimizer step does, only larger
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trajs = engine.generate([prompt], params)[0]  # woke up with the OLD weights
    stale, _ = gap(trajs)
    engine.sync_weights(model)
    synced, _ = gap(engine.generate([prompt], params)[0])
    print(f"max |logp_vllm - logp_trainer|: same weights {before:.2e}, stale {stale:.2e}, after sync {synced:.2e}")
    assert stale > 0.05, stale  # the test can tell stale weights apart
    assert synced < 2e-3, synced


def test_sampling_shapes_and_greedy(model_dir):
    from posttrain.rollout.vllm_engine import VLLMRolloutEngine

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir).cuda()
    engine = VLLMRolloutEngine(model, tok, RolloutConfig(gpu_memory_utilization=0.3, sleep_level=2))
    prompts = [tok("1+1=", add_special_tokens=False).input_ids, tok("2+2=", add_special_tokens=False).input_ids]
    out = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=5))
    assert [len(o) for o in out] == [3, 3]
    for t in (t for o in out for t in o):
        assert 1 <= len(t.response_ids) <= 5 and len(t.sampling_logprobs) == len(t.response_ids)
        assert all(lp <= 0 for lp in t.sampling_logprobs)
        assert t.finished == (t.response_ids[-1] == tok.eos_token_id)
    greedy = engine.generate(prompts[:1], SamplingParams(n=2, temperature=0.0, max_new_tokens=6))[0]
    assert greedy[0].response_ids == greedy[1].response_ids
    # Sleep level 2 discarded the weights; the engine pushed the trainer's again before sampling.
    trajs = engine.generate(prompts[:1], SamplingParams(n=4, temperature=1.0, max_new_tokens=12))[0]
    lp, mask, sampled = _trainer_logprobs(model, prompts[0], trajs, 1.0)
    assert float((lp - sampled)[mask].abs().max()) < 2e-3


def test_two_step_hpt_run_with_vllm(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path / "run", algorithm="hpt", steps=2,
                      overrides={"rollout.engine": "vllm", "rollout.gpu_memory_utilization": 0.3,
                                 "rollout.is_cap": 2.0, "trainer.device": "cuda"})
    final, = train(cfg, base=None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/response_length"] >= 1 and r["time/sync_s"] > 0 and r["time/rollout_s"] > 0
        assert r["loss/total"] == r["loss/total"]  # finite
    AutoModelForCausalLM.from_pretrained(final)


# --- vLLM as the asynchronous rollout worker (rollout.max_staleness >= 1) ---------------------------


def test_the_vllm_worker_serves_the_pushed_weights(model_dir):
    # The worker process hosts vLLM on the GPU; each push is loaded through vLLM's load_weights and
    # verified by the probe (ProbeCheck raises otherwise); what it samples then has the log-probs
    # the trainer computes for the weights it pushed, before and after an update.
    from posttrain.rollout.worker import RolloutWorker
    from posttrain.types import RolloutRequest

    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    prompt = tok("Q: 12+7=\nA: ", add_special_tokens=False).input_ids
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=24)
    w = RolloutWorker(model, tok, mode="pipelined", threads=1, seed=0, batch_size=8, device="cuda:0",
                      engine="vllm", gpu_memory_utilization=0.3)
    try:
        gaps = []
        for version in (0, 1):
            if version:
                with torch.no_grad():  # what an optimizer step does, only larger
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 0.05)
            w.push(model, version)
            got, out, _ = w.result(w.submit([prompt], [RolloutRequest(n=8)], params, min_version=version))
            assert got == version and not w._unacked  # loaded and verified before sampling
            lp, mask, sampled = _trainer_logprobs(model, prompt, out[0], params.temperature)
            gaps.append(float((lp - sampled)[mask].abs().max()))
        assert w.served_device == "cuda:0" and w.served_compiled is False
        print(f"max |logp_vllm worker - logp_trainer|: {gaps}")
        assert max(gaps) < 2e-3, gaps
    finally:
        w.close()


def test_async_grpo_run_with_the_vllm_worker(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path / "run", steps=3,
                      overrides={"rollout.engine": "vllm", "rollout.gpu_memory_utilization": 0.3, "trainer.device": "cuda",
                                 "rollout.max_staleness": 1, "rollout.is_cap": 2.0})
    final, = train(cfg, base=None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rollout/response_length"] >= 1 and r["async/staleness_max"] <= 1
        assert r["train/logprob_gap"] < 1e-2  # π_old (trainer, recomputed) vs π_sampling (the worker's vLLM)
        assert r["loss/total"] == r["loss/total"]  # finite
    AutoModelForCausalLM.from_pretrained(final)
