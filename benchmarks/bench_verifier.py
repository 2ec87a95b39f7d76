"""Math verifier throughput: answers/s with 1 and 2 workers, clean and with hanging answers.

    python benchmarks/bench_verifier.py [--answers 400 --timeout 1.0 --hang-frac 0.05]

Three batches, each of ``--answers`` items, 8 rollouts per gold (as in training):

* ``numeric``: "... \\boxed{N}" against an integer gold (the fast exact path, no sympy);
* ``symbolic``: "\\boxed{\\frac{a}{b}}" against a decimal gold (math-verify + sympy in the workers);
* ``hanging``: the symbolic batch with ``--hang-frac`` of its answers replaced by a power tower
  that never finishes; the script prints the bound the issue sets for it,
  hanging × timeout ÷ workers + 10 % of the clean time, next to the measured time.

Rounds are interleaved (1 worker, 2 workers, 1 worker, ...; both pools stay up) and each time
printed is the median over ``--rounds``, so load changes on a shared machine hit both alike.
Prints numbers only (no pass/fail): the machine they run on decides them.
"""

from __future__ import annotations

import argparse
import statistics
import time

HANG = r"\boxed{9^{9^{9^{9^{9^{9^{9}}}}}}}"


def batches(n: int, hang_frac: float, first_gold: int = 0) -> dict[str, list[tuple[str, str]]]:
    numeric, symbolic = [], []
    for i in range(n):
        g = first_gold + i // 8  # 8 rollouts per prompt share a gold
        right = i % 2 == 0
        numeric.append((f"so the answer is \\boxed{{{g * 7 + (0 if right else 1)}}}", str(g * 7)))
        a, b = g % 9 + 1, 4 if g % 2 else 8
        symbolic.append((f"so \\boxed{{\\frac{{{a if right else a + 1}}}{{{b}}}}}", str(a / b)))
    every = max(1, round(1 / hang_frac)) if hang_frac > 0 else n + 1
    hanging = [(HANG, gold) if i % every == every // 2 else (r, gold) for i, (r, gold) in enumerate(symbolic)]
    return {"numeric": numeric, "symbolic": symbolic, "hanging": hanging}


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--answers", type=int, default=400)
    ap.add_argument("--timeout", type=float, default=1.0, help="verifier.timeout_s")
    ap.add_argument("--hang-frac", type=float, default=0.05)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    from posttrain.config import VerifierConfig
    from posttrain.verify import build_verifier

    data = batches(args.answers, args.hang_frac)
    times: dict[str, dict[int, list[float]]] = {k: {w: [] for w in args.workers} for k in data}
    counts: dict[tuple[str, int], tuple[float, int]] = {}
    pools = {w: build_verifier("math", VerifierConfig(timeout_s=args.timeout, workers=w)) for w in args.workers}
    try:
        for v in pools.values():
            v.verify(data["symbolic"][:8])  # start the workers (import math-verify, sympy)
        for r in range(args.rounds):
            # New golds every round, as every training step brings new prompts: no worker has them parsed yet.
            data = batches(args.answers, args.hang_frac, first_gold=1 + r * args.answers)
            for workers, v in pools.items():
                for name, items in data.items():
                    t = time.perf_counter()
                    res = v.verify(items)
                    times[name][workers].append(time.perf_counter() - t)
                    counts[name, workers] = (sum(r.reward for r in res), sum(r.status == "timeout" for r in res))
    finally:
        for v in pools.values():
            v.close()
    out: dict[str, dict[int, float]] = {k: {} for k in data}
    for workers in args.workers:
        for name, items in data.items():
            dt = out[name][workers] = statistics.median(times[name][workers])
            right, hung = counts[name, workers]
            line = (f"{name:9s} workers={workers}: {len(items)} answers in {dt:6.2f} s = "
                    f"{len(items) / dt:8,.0f} answers/s  (correct {right:.0f}, timeouts {hung})")
            if name == "hanging":
                bound = hung * args.timeout / workers + 1.1 * out["symbolic"][workers]
                line += f"  bound {bound:.2f} s"
            print(line, flush=True)
    return out


if __name__ == "__main__":
    main()
