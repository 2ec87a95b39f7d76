"""A tiny random-weight model and a character-level tokenizer, built locally (no download).

Used by ``model.path: "tiny:..."`` runs (demos, smoke tests) and by ``posttrain.testing``.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer with a chat template; no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character; [\s\S] rather than "." so that "\n\n" is two newlines, not one <unk>.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                 unk_token="<unk>", padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_tiny_model(path: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """Save a random-weight Llama-architecture causal LM and the tiny tokenizer to ``path``.

    Load it back with ``AutoModelForCausalLM.from_pretrained(path)`` — the same code path as a
    real checkpoint. (Llama, not Qwen2: transformers maps model_type qwen2 to Qwen2Tokenizer,
    whose byte-level pre-tokenizer would silently replace our character-level one on reload.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    from .lora import quiet_save

    with quiet_save():  # `tiny:` model paths build one on every fresh run: no bar, no DeepSpeed import
        model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
