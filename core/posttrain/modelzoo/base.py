"""The model zoo's error and cache directory (the package re-exports these)."""

from __future__ import annotations

import os
from pathlib import Path


class ModelZooError(RuntimeError):
    """A model or data package cannot be had; the message is one line saying why and what to do."""


def cache_dir() -> Path:
    """``$POSTTRAIN_CACHE`` or ``~/.cache/posttrain``: converted models and unpacked wheels."""
    return Path(os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain").expanduser()
