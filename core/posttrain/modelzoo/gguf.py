"""GGUF → a plain Hugging Face directory (config.json, model.safetensors, tokenizer, chat template).

transformers reads GGUF (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` package)
and dequantises it to fp32, but the object it returns carries a gguf quantizer and
``save_pretrained`` refuses it ("quantized with gguf and is not serializable"). A fresh model
built from the same config without the quantization entry, given the same state dict, saves
like any checkpoint, and its reload computes identical logits.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .base import ModelZooError


def _need_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise ModelZooError("reading GGUF needs the gguf package: pip install 'posttrain[real]'") from e


def load_gguf(gguf_file: str | Path):
    """(model, tokenizer) as transformers reads the file: fp32, dequantised."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _need_gguf()
    path = Path(gguf_file)
    if not path.is_file():
        raise ModelZooError(f"{path}: no such GGUF file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as e:  # not GGUF, or an architecture transformers cannot read
        raise ModelZooError(f"{path}: transformers cannot read this GGUF file ({str(e).splitlines()[0]})") from e
    return model, tokenizer


def import_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` with the model (safetensors, fp32), its config, tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelZooError(f"{out}: exists and is not empty; choose a new directory")
    model, tokenizer = load_gguf(gguf_file)
    config = model.config
    del config.quantization_config  # what makes save_pretrained refuse; the weights are plain fp32 now
    config._name_or_path = str(out)
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is absent only when tied to the embeddings
        raise ModelZooError(f"{gguf_file}: weights do not match the architecture (missing {missing}, unexpected {unexpected})")
    plain.tie_weights()
    plain.generation_config = GenerationConfig.from_model_config(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # a failed import leaves no half directory
        staging = Path(tmp) / "model"
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), out)
    return out
