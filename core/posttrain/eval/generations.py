"""``generations.jsonl``: every finished problem of one model × benchmark, one line each,
appended (and flushed) as soon as it is verified, so a crashed eval loses at most the chunk
in flight.

A line: ``{"uid", "fingerprint", "prompt", "gold", "samples": [{"text", "reward", "status",
"answer", "length", "finished"}, ...]}``. The fingerprint hashes everything that shapes the
samples (model weights' identity, sampling settings, verifier, the problem's uid, prompt and
gold), so a re-run reuses a line only if it would have generated it the same way.

Each line also carries a ``checksum`` of the rest of it. A line whose checksum does not match
(edited by hand or by a tool, e.g. every ``reward`` set to 1.0), or whose samples do not have
the fields and types above, is not trusted: it is dropped and that problem is generated and
verified again. Lines written before checksums existed are regenerated the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ..data import DataError

log = logging.getLogger(__name__)
_SAMPLE_TYPES = {"text": str, "reward": (int, float), "status": str, "length": int, "finished": bool}


def fingerprint(settings: dict[str, Any], uid: str, prompt: str, gold: str) -> str:
    blob = json.dumps({"settings": settings, "uid": uid, "prompt": prompt, "gold": gold}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_identity(path: str | Path) -> str:
    """The directory plus the size and mtime of its files: a checkpoint overwritten in place
    gets a new identity, so its stale generations are not reused."""
    p = Path(path).resolve()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file()) if p.is_dir() else []
    return hashlib.sha256(json.dumps([str(p), files]).encode()).hexdigest()[:16]


def checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _trusted(rec: dict) -> bool:
    """Written by ``add`` and unchanged since: checksum matches, samples well-formed."""
    if rec.get("checksum") != checksum(rec) or not isinstance(rec.get("samples"), list):
        return False
    return all(isinstance(s, dict) and "answer" in s
               and all(isinstance(s.get(k), t) and not (k == "reward" and isinstance(s[k], bool)) for k, t in _SAMPLE_TYPES.items())
               for s in rec["samples"])


class GenerationStore:
    """Reads the finished records of a file (``resume=True``) and appends new ones."""

    def __init__(self, path: str | Path, *, resume: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}  # fingerprint → record
        self.rejected = 0  # records not trusted on resume (generated again)
        if resume and self.path.exists():
            read = self._read()
            trusted = [r for r in read if _trusted(r)]
            self.records = {r["fingerprint"]: r for r in trusted}
            self.rejected = len(read) - len(trusted)
            if self.rejected:
                log.warning("%s: %d record(s) fail their checksum or are malformed; those problems are generated again",
                            self.path, self.rejected)
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
        record = {**record, "checksum": checksum(record)}
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
