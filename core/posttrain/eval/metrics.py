"""pass@k, avg@k and maj@k from n samples per problem.

Per problem, with ``n`` samples of which ``c`` are correct:

* ``pass@k`` — the unbiased estimator of Chen et al. (2021): ``1 − C(n−c, k) / C(n, k)``, the
  chance that at least one of ``k`` samples drawn without replacement from the ``n`` is correct.
* ``avg@k`` — mean correctness of ``k`` samples (the papers' avg@32 with n = k = 32).
* ``maj@k`` — correctness of the most common extracted answer among ``k`` samples.

When ``n > k``, avg@k and maj@k are averaged over the ``⌊n/k⌋`` disjoint blocks of ``k``
consecutive samples, so every sample counts and avg@1 equals pass@1 exactly. A benchmark's
number is the mean over its problems.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem, as a running product (the binomials overflow floats
    long before n = 1024): ``C(n−c, k)/C(n, k) = Π_{i=n−c+1}^{n} (1 − k/i)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _blocks(items: Sequence, k: int) -> list[Sequence]:
    if not 1 <= k <= len(items):
        raise ValueError(f"k={k} needs at least k samples per problem, got {len(items)}")
    return [items[b * k:(b + 1) * k] for b in range(len(items) // k)]


def avg_at_k(correct: Sequence[bool], k: int) -> float:
    """Mean correctness over the first ``⌊n/k⌋·k`` samples (blocks of k, averaged)."""
    blocks = _blocks(list(correct), k)
    return sum(sum(b) / k for b in blocks) / len(blocks)


def majority_correct(correct: Sequence[bool], answers: Sequence[Optional[str]]) -> bool:
    """Whether the most common answer is correct. Samples without an extracted answer do not
    vote; a tie goes to the answer seen first. All samples sharing an answer key share its
    correctness, so the first one's verdict stands for the class."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]  # most_common is stable: ties keep first-seen order
    return bool(correct[list(answers).index(winner)])


def maj_at_k(correct: Sequence[bool], answers: Sequence[Optional[str]], k: int) -> float:
    """Majority-vote accuracy over blocks of k samples, averaged."""
    if len(correct) != len(answers):
        raise ValueError(f"{len(correct)} correctness flags but {len(answers)} answers")
    blocks = list(zip(_blocks(list(correct), k), _blocks(list(answers), k)))
    return sum(majority_correct(c, a) for c, a in blocks) / len(blocks)


def problem_metrics(correct: Sequence[bool], answers: Sequence[Optional[str]], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k", "avg@k", "maj@k"}`` for every k, for one problem."""
    n, c = len(correct), int(sum(bool(x) for x in correct))
    out: dict[str, float] = {}
    for k in ks:
        out[f"pass@{k}"] = pass_at_k(n, c, k)
        out[f"avg@{k}"] = avg_at_k(correct, k)
        out[f"maj@{k}"] = maj_at_k(correct, answers, k)
    return out


def benchmark_metrics(per_problem: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over problems."""
    if not per_problem:
        return {}
    return {key: sum(p[key] for p in per_problem) / len(per_problem) for key in per_problem[0]}
