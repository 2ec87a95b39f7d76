"""Verifiers: score (response, gold answer) pairs with 1.0 / 0.0, never hanging or raising.

Built in (registered by ``posttrain.defaults`` through ``register_verifiers``):

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

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable


# Defined before the submodules are imported below: they import VerifyResult from here.
@dataclass(frozen=True)
class VerifyResult:
    reward: float  # 1.0 correct, 0.0 otherwise
    status: str = "ok"  # "ok" | "timeout" | "error"


@runtime_checkable
class Verifier(Protocol):
    """What the engine needs from a verifier.

    ``stats`` holds cumulative counts "answers", "timeouts" and "errors".
    """

    name: str
    stats: dict[str, int]

    def verify(self, items: list[tuple[str, str]]) -> list[VerifyResult]:
        """Score ``(response_text, gold_answer)`` pairs; one result per pair, same order."""
        ...

    def close(self) -> None:
        """Release workers or other resources; the verifier is not used afterwards."""
        ...


from .math_verifier import MathVerifier  # noqa: E402
from .pool import Outcome, WorkerPool  # noqa: E402
from .simple import ChoiceVerifier, ExactVerifier  # noqa: E402


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
