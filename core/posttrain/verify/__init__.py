"""Verifiers: score (response, gold answer) pairs with 1.0 / 0.0, never hanging or raising.

Built in (registered by ``posttrain.algorithms.defaults`` through ``register_verifiers``):

* ``math``   — math-verify in a pool of worker processes with hard per-answer timeouts;
* ``exact``  — normalised string match of the final answer, inline;
* ``choice`` — multiple-choice letter A–J, inline.

A verifier returns one ``VerifyResult`` per item, in order. ``status`` says why a reward is 0
when it is not simply a wrong answer: "timeout" (the answer took longer than
``verifier.timeout_s``) or "error" (the checker failed on it, e.g. a crashed worker or an
unparsable gold answer). The engine logs their counts as ``verify/timeouts`` and
``verify/errors``.
"""

from __future__ import annotations

from typing import Any, Callable


from .base import Verifier, VerifyResult  # noqa: F401  (re-exported)
from .math_verifier import MathVerifier
from .pool import Outcome, WorkerPool
from .simple import ChoiceVerifier, ExactVerifier


def _math(config: Any) -> MathVerifier:
    return MathVerifier(timeout_s=config.timeout_s, workers=config.workers)


def _exact(config: Any) -> ExactVerifier:
    return ExactVerifier()


def _choice(config: Any) -> ChoiceVerifier:
    return ChoiceVerifier()


# name -> factory(config), where config is a VerifierConfig (or anything with .timeout_s, .workers).
BUILTIN_VERIFIERS: dict[str, Callable[[Any], Verifier]] = {"math": _math, "exact": _exact, "choice": _choice}


def build_verifier(name: str, config: Any) -> Verifier:
    """A built-in verifier by name. (Plugin-registered ones are looked up by the engine.)"""
    try:
        factory = BUILTIN_VERIFIERS[name]
    except KeyError:
        raise ValueError(f"Unknown verifier {name!r}; built in: {', '.join(sorted(BUILTIN_VERIFIERS))}") from None
    return factory(config)


__all__ = [
    "VerifyResult", "Verifier", "BUILTIN_VERIFIERS", "build_verifier",
    "MathVerifier", "ExactVerifier", "ChoiceVerifier", "WorkerPool", "Outcome",
]
