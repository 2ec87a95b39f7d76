"""``generations.jsonl``: every finished problem of one model × benchmark, one line each,
appended (and flushed) as soon as it is verified, so a crashed eval loses at most the chunk
in flight.

A line: ``{"uid", "fingerprint", "prompt", "gold", "samples": [{"text", "reward", "status",
"answer", "length", "finished"}, ...]}``. The fingerprint hashes everything that shapes the
samples (model weights' identity, sampling settings, verifier, the problem's uid, prompt and
gold), so a re-run reuses a line only if it would have generated it the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..data import DataError


def fingerprint(settings: dict[str, Any], uid: str, prompt: str, gold: str) -> str:
    blob = json.dumps({"settings": settings, "uid": uid, "prompt": prompt, "gold": gold}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_identity(path: str | Path) -> str:
    """The directory plus the size and mtime of its files: a checkpoint overwritten in place
    gets a new identity, so its stale generations are not reused."""
    p = Path(path).resolve()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file()) if p.is_dir() else []
    return hashlib.sha256(json.dumps([str(p), files]).encode()).hexdigest()[:16]


class GenerationStore:
    """Reads the finished records of a file (``resume=True``) and appends new ones."""

    def __init__(self, path: str | Path, *, resume: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}  # fingerprint → record
        if resume and self.path.exists():
            self.records = {r["fingerprint"]: r for r in self._read()}
        # Rewrite with only what is kept (drops a torn last line); atomic, like metrics.jsonl.
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records.values()))
        tmp.replace(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def _read(self) -> list[dict]:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines):  # torn by a crash mid-write: that problem is simply redone
                    break
                raise DataError(f"{self.path}:{i}: not valid JSON; delete the file or run with --resume never") from None
            if not isinstance(rec, dict) or "fingerprint" not in rec or "samples" not in rec:
                raise DataError(f"{self.path}:{i}: not a generations record (no 'fingerprint'/'samples')")
            out.append(rec)
        return out

    def get(self, fp: str) -> dict | None:
        return self.records.get(fp)

    def add(self, record: dict) -> None:
        self.records[record["fingerprint"]] = record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "GenerationStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
