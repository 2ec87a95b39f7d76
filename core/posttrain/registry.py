"""``registry.toml``: the curated index of known plugins (installed entry points stay the runtime truth)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def load_registry(path: str | Path | None = None) -> dict:
    path = Path(path) if path else repo_root() / "registry.toml"
    if not path.exists():
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:  # a hand-edited index: say where, not a traceback
        from .config import ConfigError

        raise ConfigError([f"not valid TOML: {e}"], str(path)) from e
