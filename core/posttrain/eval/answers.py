"""The answer each sample gives, as a key for majority voting (maj@k).

Verifiers say right or wrong; voting also needs *which* answer, so that "19", "\\boxed{19}" and
"19.0" count as one vote. Math answers are read by math-verify's ``parse`` with the math
verifier's own extraction settings, in a ``WorkerPool`` (parsing can hang on inputs such as
``9^{9^{9^{9}}}``, just as verifying can); the key is the parsed expression's sympy string, with
floats turned into exact rationals (0.5 → 1/2). Choice answers are the chosen letter.
"""

from __future__ import annotations

from typing import Any, Optional

from ..verify.math_verifier import _extraction_configs, warm_up
from ..verify.pool import WorkerPool
from ..verify.simple import extract_choice


def math_answer_key(text: str) -> Optional[str]:
    """Worker task: the canonical string of the answer math-verify extracts, or None."""
    import sympy
    from math_verify import parse

    parsed = parse(text, _extraction_configs()["answer"], parsing_timeout=None)
    if not parsed:
        return None
    expr = parsed[0]
    if isinstance(expr, sympy.Float):
        expr = sympy.nsimplify(expr, rational=True)
    return str(expr)


class AnswerExtractor:
    """Answer keys per benchmark kind; the math worker pool starts on first use."""

    def __init__(self, timeout_s: float = 10.0, workers: int = 1):
        self.timeout_s, self.workers = float(timeout_s), int(workers)
        self._pool: Optional[WorkerPool] = None

    def keys(self, kind: str, texts: list[str]) -> list[Optional[str]]:
        if kind == "choice":
            return [extract_choice(t) for t in texts]
        if not texts:
            return []
        if self._pool is None:
            self._pool = WorkerPool(math_answer_key, workers=self.workers, timeout_s=self.timeout_s,
                                    soft_timeout_s=0.75 * self.timeout_s, initializer=warm_up)
        # A timed-out or failed parse casts no vote (the verifier scores that sample on its own).
        return [o.value if o.status == "ok" else None for o in self._pool.map(list(texts))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "AnswerExtractor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
