"""What every verifier returns and offers (the package re-exports these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


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
