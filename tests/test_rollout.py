"""The HF rollout engine: what it samples from, greedy agreement with ``generate``, log-probs."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omegaconf import OmegaConf

from posttrain.config import validate_core
from posttrain.rollout import SamplingParams
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.testing import make_tiny_model

TEXTS = ["1+2=", "33+44=", "7", "Q: what is 12*3?\nA: ", "ab", "x=5;y=", "hello", "99-1="]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("rollout") / "m")


@pytest.fixture()
def tok(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _model(model_dir, tok, *, scale: float = 3.0, eos_scale: float | None = None, attn: str = "sdpa"):
    """The tiny model with sharper logits (embeddings × scale, tied to the head). With ``eos_scale``,
    a random EOS row: greedy responses then end after 1, 10 or 24+ tokens depending on the prompt,
    so finished rows leave the decode batch at different steps."""
    m = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(scale)
        if eos_scale is not None:
            m.model.embed_tokens.weight[tok.eos_token_id] = eos_scale * torch.randn(m.config.hidden_size)
    return m


def _ids(tok, texts):
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def _expected(probs: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """softmax(z/T) restricted to the top-k and the smallest top-p nucleus, renormalised (by hand)."""
    p, order = probs.sort(descending=True)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k > 0:
        keep[top_k:] = False
    if top_p < 1:
        keep &= (p.cumsum(0) - p) < top_p  # the mass strictly above a token is below top_p
    q = torch.zeros_like(probs)
    q[order[keep]] = p[keep]
    return q / q.sum()


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1 % point of chi-square (Wilson–Hilferty; within 1 % of the exact value for dof ≥ 30)."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("synced", [False, True], ids=["decode-loop", "generate"])
@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.8, 0), (1.0, 1.0, 10)])
def test_first_tokens_are_drawn_from_softmax_z_over_t(model_dir, tok, monkeypatch, synced, temperature, top_p, top_k):
    """4,000 first tokens of one prompt against softmax(z/T) (restricted by top-p / top-k only
    when asked): Pearson chi-square below its 0.1 % critical value (about 148 for 99 degrees of
    freedom), and no token outside the allowed set. Bins with expected count < 5 are pooled.
    Before the fix transformers' hidden top-k of 50 cut half of the 100-token vocabulary:
    chi-square in the thousands. ``generate`` is the path ZeRO-3 runs take."""
    model = _model(model_dir, tok, scale=1.5)  # every token has p ≥ 0.2 %, the largest 6 % (12 % at T=0.7)
    if synced:
        monkeypatch.setattr("posttrain.rollout.hf._zero3", lambda m: True)
    prompt = _ids(tok, ["12+7="])[0]
    N = 4000
    torch.manual_seed(1234)
    out = HFRolloutEngine(model, tok, batch_size=N).generate(
        [prompt], SamplingParams(n=N, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=1))[0]
    counts = torch.bincount(torch.tensor([t.response_ids[0] for t in out]), minlength=len(tok)).double()
    with torch.no_grad():
        z = model(torch.tensor([prompt])).logits[0, -1].double()
    q = _expected(torch.softmax(z / temperature, -1), top_p, top_k)
    assert counts[q == 0].sum() == 0  # nothing outside the top-k / nucleus
    e = N * q
    big = e >= 5
    obs = torch.cat([counts[big], counts[~big & (q > 0)].sum().reshape(1)])
    exp = torch.cat([e[big], e[~big & (q > 0)].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert len(exp) >= 10  # a real test: many tokens in play (10 with top_k=10, 100 with T=1)
    assert chi2 < _chi2_critical(len(exp) - 1), (chi2, len(exp) - 1)


def _teacher_forced(model, prompt, response, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_greedy_equals_generate_and_logprobs_match(model_dir, tok):
    """Greedy responses are token for token those of ``model.generate`` on each prompt alone
    (lengths 1, 10 and 24 here: rows leave the decode batch at different steps; batch_size 3
    splits groups across chunks), and each log-prob is the trainer's log softmax(z) to 1e-5."""
    model = _model(model_dir, tok, eos_scale=2.0)
    prompts = _ids(tok, TEXTS)
    out = HFRolloutEngine(model, tok, batch_size=3).generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=24))
    lengths = []
    for prompt, trajs in zip(prompts, out):
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, top_k=None,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        for t in trajs:
            assert t.response_ids == ref
            assert t.finished == (ref[-1] == tok.eos_token_id)
            lp = _teacher_forced(model, prompt, t.response_ids, 1.0)
            assert torch.allclose(torch.tensor(t.sampling_logprobs, dtype=torch.float64), lp, atol=1e-5, rtol=0)
        lengths.append(len(ref))
    assert sorted(set(lengths)) == [1, 10, 24]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sampled_logprobs_are_the_trainers(model_dir, tok, attn):
    """Sampled responses (T = 0.7, n = 4, ≤ 8 tokens, most ending early) report log softmax(z/T) of each
    token, equal to the trainer's teacher-forced value to 1e-5; finished ⇔ ends with EOS. Under
    every attention implementation: each reads its own mask format (left-padded prompts)."""
    model = _model(model_dir, tok, eos_scale=2.0, attn=attn)
    prompts = _ids(tok, TEXTS)
    torch.manual_seed(0)
    out = HFRolloutEngine(model, tok, batch_size=16).generate(prompts, SamplingParams(n=4, temperature=0.7, max_new_tokens=8))
    ends = set()
    for prompt, trajs in zip(prompts, out):
        assert len(trajs) == 4
        for t in trajs:
            assert 1 <= len(t.response_ids) <= 8 and len(t.sampling_logprobs) == len(t.response_ids)
            assert t.finished == (t.response_ids[-1] == tok.eos_token_id)
            assert tok.eos_token_id not in t.response_ids[:-1]
            lp = _teacher_forced(model, prompt, t.response_ids, 0.7)
            assert torch.allclose(torch.tensor(t.sampling_logprobs, dtype=torch.float64), lp, atol=1e-5, rtol=0)
            ends.add(t.finished)
    assert ends == {True, False}


def test_negative_top_k_is_a_config_error():
    _, problems = validate_core(OmegaConf.create({"algorithm": {"name": "grpo"}, "rollout": {"top_k": -1}}))
    assert "rollout.top_k: must be >= 0 (0 is off), got -1." in problems


@pytest.mark.slow
def test_compiled_decode_equals_eager(model_dir, tok):
    """rollout.compile: the torch.compile'd decode step gives the greedy tokens of
    ``generate`` (rows leave the batch at different steps) and the trainer's log-probs to 1e-5,
    for sampling too; it did compile (no fallback to eager)."""
    model = _model(model_dir, tok, eos_scale=2.0)
    prompts = _ids(tok, TEXTS)
    engine = HFRolloutEngine(model, tok, batch_size=16, compile=True)
    out = engine.generate(prompts, SamplingParams(n=2, temperature=0.0, max_new_tokens=24))
    assert engine.compile  # still on: the compiled step ran
    for prompt, trajs in zip(prompts, out):
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, top_k=None,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        for t in trajs:
            assert t.response_ids == ref
            lp = _teacher_forced(model, prompt, t.response_ids, 1.0)
            assert torch.allclose(torch.tensor(t.sampling_logprobs, dtype=torch.float64), lp, atol=1e-5, rtol=0)
    torch.manual_seed(0)
    out = engine.generate(prompts, SamplingParams(n=4, temperature=0.7, max_new_tokens=8))
    ends = set()
    for prompt, trajs in zip(prompts, out):
        for t in trajs:
            assert t.finished == (t.response_ids[-1] == tok.eos_token_id) and tok.eos_token_id not in t.response_ids[:-1]
            lp = _teacher_forced(model, prompt, t.response_ids, 0.7)
            assert torch.allclose(torch.tensor(t.sampling_logprobs, dtype=torch.float64), lp, atol=1e-5, rtol=0)
            ends.add(t.finished)
    assert ends == {True, False} and engine.compile


@pytest.mark.slow
def test_compiled_blocks_sample_what_the_eager_loop_samples(model_dir, tok, monkeypatch):
    """rollout.compile decodes 4 tokens per call, sampling inside the graph from noise drawn
    outside it: with the same seed and no row leaving the batch early, its sampled tokens are
    the eager loop's (whose sampler the chi-square test checks), and its log-probs too.
    8 new tokens: the first from the prefill, then one block and a last block running one
    token past the end, which is cut. Where that run-over would pass the model's position table,
    the last tokens are decoded one at a time instead: the same tokens again."""
    model = _model(model_dir, tok)
    prompts = _ids(tok, TEXTS)
    params = SamplingParams(n=4, temperature=0.9, top_p=0.95, top_k=40, max_new_tokens=8)  # both warpers in the graph

    def run(engine):
        engine.eos_id = -1  # no row ends early: eager drops rows every token, compiled every block
        torch.manual_seed(7)
        return [(t.response_ids, t.sampling_logprobs) for g in engine.generate(prompts, params) for t in g]

    eager = run(HFRolloutEngine(model, tok, batch_size=32))
    compiled_engine = HFRolloutEngine(model, tok, batch_size=32, compile=True)
    compiled = run(compiled_engine)
    assert compiled_engine.compile  # no fallback to eager
    assert all(len(ids) == 8 for ids, _ in eager)
    assert [ids for ids, _ in compiled] == [ids for ids, _ in eager]
    assert len({tuple(ids) for ids, _ in eager}) > 16  # really sampled
    for (_, a), (_, b) in zip(compiled, eager):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)

    width = max(len(p) for p in prompts)
    monkeypatch.setattr(model.config, "max_position_embeddings", width + 8)  # no room for the run-over
    calls = []
    eager_block = compiled_engine._block
    monkeypatch.setattr(compiled_engine, "_block", lambda *a: calls.append(a[5]) or eager_block(*a))
    again = run(compiled_engine)
    assert [ids for ids, _ in again] == [ids for ids, _ in compiled]
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0) for (_, a), (_, b) in zip(again, compiled))
    assert calls == [1, 1, 1]  # the compiled block for tokens 1-4, then 5, 6 and 7 one by one


def test_compile_failure_falls_back_to_eager(model_dir, tok, monkeypatch, caplog):
    """A compile that fails (no C++ compiler, an untraceable model) costs one warning; the chunk
    is decoded eagerly, with the same greedy tokens, and compile stays off afterwards."""
    model = _model(model_dir, tok, eos_scale=2.0)
    prompts = _ids(tok, TEXTS[:3])
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)
    expected = HFRolloutEngine(model, tok).generate(prompts, params)

    def broken(*a, **kw):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    engine = HFRolloutEngine(model, tok, compile=True)
    with caplog.at_level("WARNING"):
        out = engine.generate(prompts, params)
    assert [[t.response_ids for t in g] for g in out] == [[t.response_ids for t in g] for g in expected]
    assert not engine.compile
    assert [r.getMessage() for r in caplog.records if "rollout.compile" in r.getMessage()] == [
        "rollout.compile: the compiled decode step failed (RuntimeError: no C++ compiler found); decoding eagerly from now on"]
