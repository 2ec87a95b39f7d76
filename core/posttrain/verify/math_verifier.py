"""The ``math`` verifier: math-verify in worker processes, with hard per-answer timeouts.

(Named ``math_verifier`` rather than ``math`` so it can never be mistaken for the stdlib module.)

math-verify can hang: ``verify(parse("$1$"), parse(r"\\boxed{9^{9^{9^{9^{9}}}}}"))`` evaluates a
power tower and never returns when its own signal timeout is off, and that signal timeout only
works in a process's main thread. So every answer is checked in a ``WorkerPool`` process:

* inside the worker (main thread) a soft limit of 75 % of ``timeout_s`` interrupts Python-level
  work with SIGALRM — the worker survives and the answer gets status "timeout";
* the parent kills a worker still busy at ``timeout_s`` (a hang inside one C call cannot be
  interrupted by a signal handler) and starts a replacement; status "timeout" too.

math-verify's own timeouts are switched off in the workers (``parsing_timeout=None``,
``timeout_seconds=None``) because the soft limit above covers the whole answer (gold parse,
answer parse and comparison together) with float precision, and tells a timeout apart from a
wrong answer, which math-verify's silent ``False``/``[]`` on timeout does not.

Plain numbers skip all of that: when the response has exactly one ``\boxed{N}`` and the gold
is a plain number (both ``-12``, ``3.5``-style), the parent decides on the spot (equal values: 1;
different integers: 0) without a worker round trip or sympy; anything else (other decimals,
fractions, LaTeX, several boxes) goes to math-verify. Consecutive answers (a prompt's n rollouts,
sharing one gold) go to a worker together, so each worker parses a gold once (and caches it).

This module does not import math-verify at import time: the parent process never needs it.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from fractions import Fraction
from typing import Any, Optional

from .base import VerifyResult
from .pool import Outcome, WorkerPool

# Distinct gold strings whose parse is kept per worker; a training set rarely has more.
_GOLD_CACHE_SIZE = 8192
_gold_cache: "OrderedDict[str, list[Any]]" = OrderedDict()
_configs: dict[str, list[Any]] = {}


def _extraction_configs() -> dict[str, list[Any]]:
    """Built once per worker, on first use."""
    if not _configs:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig

        # Answers: \boxed{...} first (priority 0), then other LaTeX ($...$, "answer is ..."),
        # then plain expressions such as "The answer is 42".
        _configs["answer"] = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
        _configs["gold"] = [LatexExtractionConfig(), ExprExtractionConfig()]
    return _configs


def _parse_gold(gold: str) -> list[Any]:
    """Parse a gold answer once per worker (LRU cache keyed by the string).

    Golds come as LaTeX with delimiters (``$\\frac12$``, ``\\boxed{5}``) or as a bare
    expression (``0.75``, ``1/2``, ``\\frac{1}{2}``, ``(1,2)``). A bare one is read as math mode
    first (``$...$``), which gets LaTeX commands, tuples and sets right where plain-expression
    extraction fails or keeps only the last number; plain extraction is the fallback.
    """
    hit = _gold_cache.get(gold)
    if hit is not None:
        _gold_cache.move_to_end(gold)
        return hit
    from math_verify import parse

    cfg = _extraction_configs()["gold"]
    text = gold.strip()
    if "$" in text or "\\boxed" in text:
        parsed = parse(text, cfg, parsing_timeout=None)
    else:
        parsed = parse(f"${text}$", cfg, parsing_timeout=None) or parse(text, cfg, parsing_timeout=None)
    _gold_cache[gold] = parsed
    if len(_gold_cache) > _GOLD_CACHE_SIZE:
        _gold_cache.popitem(last=False)
    return parsed


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED_NUMBER = re.compile(r"\\boxed\{\s*(-?\d+(?:\.\d+)?)\s*\}")
_MAX_EXACT_DIGITS = 15  # math-verify compares numbers to 15 significant digits; beyond that, ask it


def fast_numeric(response: str, gold: str) -> Optional[float]:
    """The reward when both sides are plain numbers and the answer is obvious, else None.

    Only cases where math-verify's answer is certain: one ``\boxed{}`` in the response (it
    takes the last of several, and ``\boxed`` wins over other extractions), a gold that is just
    a number, equal values (1.0) or two different integers of at most 15 digits (0.0).
    Different decimals (math-verify rounds) and everything else return None.
    """
    gold = gold.strip()
    if not _NUMBER.fullmatch(gold) or response.count("boxed") != 1 or "fbox" in response:
        return None
    m = _BOXED_NUMBER.search(response)
    if m is None:
        return None
    answer = m.group(1)
    if Fraction(answer) == Fraction(gold):
        return 1.0
    if "." not in answer + gold and max(len(answer.lstrip("-")), len(gold.lstrip("-"))) <= _MAX_EXACT_DIGITS:
        return 0.0
    return None


def check_math(item: tuple[str, str]) -> tuple[float, str]:
    """Worker task: ``(response, gold)`` → ``(reward, status)``.

    An unparsable or empty response is simply wrong (0.0, "ok"); an unparsable gold can never
    be matched, which is a data problem, so it is reported as "error".
    """
    from math_verify import parse, verify

    response, gold = item
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return 0.0, "error"
    answer = parse(response, _extraction_configs()["answer"], parsing_timeout=None)
    if not answer:
        return 0.0, "ok"
    return (1.0 if verify(gold_parsed, answer, timeout_seconds=None) else 0.0), "ok"


def warm_up() -> None:
    """Worker initializer: import math-verify and sympy and exercise them once, so the first
    real answer is not charged the import time; keep math-verify's log quiet (it warns that its
    timeouts are off, and about every answer that times out — counted in stats instead)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    check_math((r"\boxed{\frac{1}{2}}", "0.5"))
    _gold_cache.clear()


def _to_result(outcome: Outcome) -> VerifyResult:
    if outcome.status == "ok":
        reward, status = outcome.value
        return VerifyResult(float(reward), status)
    return VerifyResult(0.0, outcome.status)


class MathVerifier:
    """Symbolic equivalence of the response's final answer and the gold, via math-verify."""

    name = "math"

    def __init__(self, timeout_s: float = 10.0, workers: int = 2):
        self.timeout_s = float(timeout_s)
        self._pool = WorkerPool(check_math, workers=workers, timeout_s=self.timeout_s,
                                soft_timeout_s=0.75 * self.timeout_s, initializer=warm_up)
        self.stats: dict[str, int] = {"answers": 0, "timeouts": 0, "errors": 0}

    def verify(self, items: list[tuple[str, str]], budget_s: float | None = None) -> list[VerifyResult]:
        """``budget_s``: wall-clock for all the items; those not checked within it time out."""
        if not items:
            return []
        tasks = [("" if r is None else str(r), "" if g is None else str(g)) for r, g in items]
        fast = [fast_numeric(r, g) for r, g in tasks]
        # The workers start with the first answer that needs them, while the caller waits for it.
        # Started ahead, beside a trainer using every core, their start-up (sympy, ~0.4 s CPU each)
        # slowed its step by as much and made trainer.threads=auto read it as another program's
        # load: 1 thread for the next 5 s of the demo's GRPO stage, whose answers are all numbers.
        slow = [i for i, f in enumerate(fast) if f is None]
        outcomes = iter(self._pool.map([tasks[i] for i in slow], budget_s=budget_s))
        results = [VerifyResult(f) if f is not None else _to_result(next(outcomes)) for f in fast]
        self.stats["answers"] += len(results)
        self.stats["timeouts"] += sum(r.status == "timeout" for r in results)
        self.stats["errors"] += sum(r.status == "error" for r in results)
        return results

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
