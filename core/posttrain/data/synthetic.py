"""A verifiable arithmetic task small enough for a character-level model on a CPU.

Problems are ``a+b=`` / ``a-b=`` with 1–2 digit operands; every example carries two
demonstrations written by different "teachers" (a terse one and a step-by-step one), both
ending in ``\\boxed{answer}`` so the math verifier can check them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..types import Example


def _is_eval(problem: str) -> bool:
    # A fixed hash split: eval problems never appear in train, whatever the seeds.
    return int(hashlib.md5(problem.encode()).hexdigest(), 16) % 10 == 0


def teacher_terse(a: int, b: int, op: str, result: int) -> str:
    return f"{a}{op}{b}={result} \\boxed{{{result}}}"


def teacher_steps(a: int, b: int, op: str, result: int) -> str:
    """Tens and ones separately, then combined: a longer, differently styled trace."""
    ta, oa, tb, ob = a // 10 * 10, a % 10, b // 10 * 10, b % 10
    tens = ta + tb if op == "+" else ta - tb
    ones = oa + ob if op == "+" else oa - ob
    return f"{ta}{op}{tb}={tens}, {oa}{op}{ob}={ones}, {tens}+{ones}={result} \\boxed{{{result}}}".replace("+-", "-")


def make_arithmetic(n: int, seed: int = 0, split: str = "train", min_digits: int = 1, max_digits: int = 2,
                    ops: str = "+-") -> list[Example]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if not ops or set(ops) - {"+", "-"}:
        raise ValueError(f"ops must be made of '+' and '-', got {ops!r}")
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        digits = [int(rng.integers(min_digits, max_digits + 1)) for _ in range(2)]
        a, b = (int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10 ** d)) for d in digits)
        op = ops[int(rng.integers(len(ops)))]
        problem = f"{a}{op}{b}="
        if _is_eval(problem) != (split == "eval"):
            continue
        if problem in seen and attempts < 50 * n:  # prefer distinct problems while the space allows
            continue
        seen.add(problem)
        result = a + b if op == "+" else a - b
        out.append(Example(prompt=problem, answer=str(result),
                           demonstrations=[teacher_terse(a, b, op, result), teacher_steps(a, b, op, result)],
                           uid=f"arithmetic-{split}-{seed}:{len(out)}", meta={"a": a, "b": b, "op": op}))
    return out


def write_jsonl(examples: list[Example], path: str | Path) -> Path:
    """Rows {"prompt", "answer", "demos": [...]}: load back with ``demo_keys="demos"``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "answer": ex.answer, "demos": ex.demonstrations}) + "\n")
    return path
