"""The ``exact`` and ``choice`` verifiers: answer extraction by string rules, run inline.

Both are linear-time string operations, so they cannot hang and need no worker processes: braces
are matched in one pass, and no regex below has two adjacent quantifiers over the same characters
(the pattern that makes backtracking quadratic or worse on long runs of spaces).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from .base import VerifyResult

_BOX = re.compile(r"\\(?:boxed|fbox)")
_BARE_BOX_ARG = re.compile(r" +([^\s$]+)")  # "\boxed 5"
_BRACE = re.compile(r"[{}]")


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each "{" that is closed → position of its "}". One pass, so the cost stays
    linear however many (possibly unbalanced) boxes a degenerate response holds."""
    stack: list[int] = []
    match: dict[int, int] = {}
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            match[stack.pop()] = m.start()
    return match


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces balance, else None.

    Braces are matched by counting, so nested LaTeX (``\\boxed{\\frac{1}{2}}``) comes out whole;
    a box cut off by the length limit (unbalanced) is skipped in favour of an earlier one.
    ``\\boxed 5`` (no braces) gives ``5``.
    """
    ends = [m.end() for m in _BOX.finditer(text)]
    if not ends:
        return None
    closing = _matching_braces(text)
    for i in reversed(ends):
        if i < len(text) and text[i] == "{":
            if i in closing:
                return text[i + 1:closing[i]]
        else:
            m = _BARE_BOX_ARG.match(text, i)
            if m:
                return m.group(1)
    return None


# The last "answer is ..." / "Answer: ..." and the rest of its line.
_ANSWER_IS = re.compile(r"answer\s*(?:is\b|:)([^\n]*)", re.IGNORECASE)


def extract_final_answer(text: str) -> str:
    """The final answer of a response: last ``\\boxed{}``, else the text after the last
    "answer is" / "Answer:" (to the end of its line), else the whole text."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    found = _ANSWER_IS.findall(text)
    if found:
        rest = found[-1].strip().lstrip(":").strip()  # "The answer is: 42"
        if rest:
            return rest
    return text


def normalize(answer: str) -> str:
    """Strip whitespace, ``$`` and a trailing period; collapse runs of spaces; case-fold."""
    s = answer.strip().strip("$").strip()
    s = s.rstrip(".").strip()
    return re.sub(r"\s+", " ", s).casefold()


# --- choice ------------------------------------------------------------------------------------

_LETTER = "A-J"
# Wrappers a model may put around the letter inside a box: \text{B}, \textbf{B}, \mathrm{B}.
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
# A letter standing alone at the start: "B", "(B)", "B.", "B) 42", "b".
# Applied to stripped text.
_LEADING_LETTER = re.compile(rf"[\(\[]?\s*([{_LETTER}])\s*[\)\]]?(?:[\s.:,)]|$)", re.IGNORECASE)
# "answer is (B)", "Answer: B", "the answer is option C", "**Answer:** D". Upper case only outside
# parentheses, so that "the answer is a prime" is not read as choice A.
_ANSWER_LETTER = re.compile(
    rf"(?i:answer)[\s*]*(?:(?i:is)\b[\s*]*)?(?::[\s*]*)?(?:(?i:option|choice)\s+)?"
    rf"(?:\(\s*([{_LETTER}{_LETTER.lower()}])\s*\)|([{_LETTER}])\b)"
)
# "(B)" at the very end, punctuation and markup aside.
_TRAILING_PAREN = re.compile(rf"\(\s*([{_LETTER}])\s*\)[\s.*$]*$", re.IGNORECASE)


def extract_choice(text: str) -> Optional[str]:
    """The chosen letter (upper case) or None. Tried in order: last ``\\boxed{}``, last
    "answer is (B)" / "Answer: B", "(B)" at the end, the whole response being one letter."""
    boxed = last_boxed(text)
    if boxed is not None:
        m = _LEADING_LETTER.match(_LATEX_WRAPPER.sub(r"\1", boxed).strip())
        if m:
            return m.group(1).upper()
    found = _ANSWER_LETTER.findall(text)
    if found:
        paren, bare = found[-1]
        return (paren or bare).upper()
    m = _TRAILING_PAREN.search(text)
    if m:
        return m.group(1).upper()
    lone = text.strip().strip("$*").strip()
    m = re.fullmatch(rf"[\(\[]?([{_LETTER}])[\)\]]?\.?", lone, re.IGNORECASE)
    return m.group(1).upper() if m else None


def normalize_choice_gold(gold: str) -> str:
    """Gold letters may come as "B", "(B)", "b." or "B) 42"."""
    m = _LEADING_LETTER.match(gold.strip())
    return m.group(1).upper() if m else gold.strip().upper()


# --- verifiers ---------------------------------------------------------------------------------


class _InlineVerifier:
    """Shared plumbing: per-item scoring in the calling thread, stats, no-op close."""

    name = ""

    def __init__(self) -> None:
        self.stats: dict[str, int] = {"answers": 0, "timeouts": 0, "errors": 0}

    def score(self, response: str, gold: str) -> float:
        raise NotImplementedError

    def verify(self, items: list[tuple[str, str]]) -> list[VerifyResult]:
        results = []
        for response, gold in items:
            try:
                results.append(VerifyResult(self.score("" if response is None else str(response), str(gold))))
            except Exception:  # never let one odd item fail a training step
                results.append(VerifyResult(0.0, "error"))
        self.stats["answers"] += len(results)
        self.stats["errors"] += sum(r.status == "error" for r in results)
        return results

    def close(self) -> None:
        pass

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ExactVerifier(_InlineVerifier):
    """Normalised string equality of the final answer and the gold."""

    name = "exact"

    def score(self, response: str, gold: str) -> float:
        answer = normalize(extract_final_answer(response))
        return float(bool(answer) and answer == normalize(gold))


class ChoiceVerifier(_InlineVerifier):
    """Multiple choice: the chosen letter (A–J) against the gold letter, case-insensitive."""

    name = "choice"

    def score(self, response: str, gold: str) -> float:
        choice = extract_choice(response)
        return float(choice is not None and choice == normalize_choice_gold(gold))
