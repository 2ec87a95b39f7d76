"""Synchronous loop vs asynchronous rollouts (rollout.max_staleness k = 1, 2), side by side.

    python benchmarks/bench_async.py [--steps 10 --prompts 8 --n 4 --max-new-tokens 32]
    python benchmarks/bench_async.py --engine vllm      # on a GPU: vLLM colocated (sync) vs in the worker (async)

Same workload for every variant: GRPO on the synthetic arithmetic task, ``--prompts`` prompts ×
``--n`` samples per step, random-weight tiny models (hidden 64 and hidden 256, built locally), so
every response runs to ``--max-new-tokens``. The synchronous loop uses all of torch's intra-op
threads for rollouts and training in turn; the async variants split them (``rollout.worker_threads``
auto: half to the rollout worker process, the rest to the trainer), which the table states.

Per variant, over the steps after the first k + 1 (worker start-up, and the k steps sampled
during it, which would flatter the async variants):
steps/s, trained tokens/s (prompt + response, ``train/tokens``), generated tokens/s, and the
share of the step each side waited: the trainer waiting for rollouts (sync: the rollout time,
async: ``async/wait_s``) and the rollout side idle (sync: the training time; async: the step time
the worker did not spend generating).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

VARIANTS = {"sync": {}, "async k=1": {"rollout.max_staleness": 1}, "async k=2": {"rollout.max_staleness": 2}}
MODELS = {"tiny (hidden 64)": {"hidden": 64, "layers": 2}, "hidden 256": {"hidden": 256, "layers": 4}}
# vllm: trainer and rollouts on the GPU; the sync variant colocates vLLM (asleep while training),
# the async ones run it in the worker process on the same GPU.
ENGINES = {"hf": {}, "vllm": {"rollout.engine": "vllm", "trainer.device": "cuda", "rollout.gpu_memory_utilization": 0.3}}


def summarize(rows: list[dict], skip: int = 1) -> dict[str, float]:
    """Throughput and waiting shares of a run's metrics rows, the first ``skip`` left out: start-up,
    and with k steps queued ahead the steps whose rollouts were sampled during the start-up."""
    rows = rows[skip:] if len(rows) > skip else rows
    wall = sum(r["time/step_s"] for r in rows)
    generated = sum(r.get("rollout/response_length", 0.0) * r.get("train/rows", 0.0) for r in rows)
    rollout = sum(r.get("time/rollout_s", 0.0) for r in rows)
    is_async = any("async/wait_s" in r for r in rows)
    trainer_wait = sum(r.get("async/wait_s", 0.0) for r in rows) if is_async else rollout
    return {"steps_per_s": len(rows) / wall, "train_tokens_per_s": sum(r["train/tokens"] for r in rows) / wall,
            "generated_tokens_per_s": generated / wall, "trainer_waited": trainer_wait / wall,
            "rollout_side_waited": max(0.0, 1.0 - rollout / wall), "step_s": wall / len(rows)}


def run_variant(model: Path, run_dir: Path, over: dict, args: argparse.Namespace) -> dict[str, float]:
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import tiny_config

    over = {"rollout.n": args.n, "rollout.max_new_tokens": args.max_new_tokens, "trainer.prompts_per_step": args.prompts,
            "rollout.is_cap": 2.0, "algorithm.entropy_coef": 0.01, "data.train": "synthetic:arithmetic?n=512&seed=0",
            **ENGINES[args.engine], **over}
    train(tiny_config(model, run_dir, steps=args.steps, overrides=over), base=None)
    return summarize(read_metrics(run_dir / "metrics.jsonl"), skip=1 + over.get("rollout.max_staleness", 0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--models", nargs="*", default=None, choices=list(MODELS),
                    help="default: both with hf, hidden 256 with vllm (its attention kernels need head_dim 64)")
    ap.add_argument("--engine", choices=list(ENGINES), default="hf")
    ap.add_argument("--json", action="store_true", help="print one JSON line per variant instead of the table")
    args = ap.parse_args(argv)
    if args.models is None:
        args.models = ["hidden 256"] if args.engine == "vllm" else list(MODELS)

    from posttrain import threads

    threads.prepare_environment()
    policy = threads.apply("auto")
    from posttrain.testing import make_tiny_model
    from posttrain.train.async_loop import thread_split

    trainer, worker = thread_split("auto")
    print(f"# {policy.line()}; load average {os.getloadavg()[0]:.2f} (other users' work shares these cores)")
    print(f"# sync: {policy.threads} threads for rollouts and training in turn; async: trainer {trainer} + worker {worker}")
    print(f"# workload: GRPO ({args.engine} rollouts), {args.prompts} prompts x {args.n} samples, {args.max_new_tokens} new tokens, "
          f"{args.steps} steps (the first k + 1 left out)")
    with tempfile.TemporaryDirectory() as tmp:
        header = f"{'model':18} {'variant':10} {'steps/s':>8} {'train tok/s':>11} {'gen tok/s':>9} {'trainer waited':>14} {'rollout waited':>14}"
        if not args.json:
            print(header)
        for name in args.models:
            model = make_tiny_model(Path(tmp) / name.replace(" ", "_"), **MODELS[name])
            for variant, over in VARIANTS.items():
                s = run_variant(model, Path(tmp) / f"{name}-{variant}".replace(" ", "_"), over, args)
                if args.json:
                    print(json.dumps({"model": name, "variant": variant, **s}))
                else:
                    print(f"{name:18} {variant:10} {s['steps_per_s']:8.3f} {s['train_tokens_per_s']:11.0f} "
                          f"{s['generated_tokens_per_s']:9.0f} {s['trainer_waited']:14.0%} {s['rollout_side_waited']:14.0%}")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
