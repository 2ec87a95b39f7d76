"""GPU throughput of a real training run: tokens/s/GPU, peak memory, time split per step.

    # 1 GPU, HF generate + torch backend
    python benchmarks/bench_gpu.py --model /models/Qwen2.5-Math-1.5B
    # 8 GPUs, vLLM rollouts + DeepSpeed ZeRO-3, any config and overrides
    torchrun --nproc_per_node 8 benchmarks/bench_gpu.py --model /models/Qwen2.5-Math-7B \\
        --config configs/hpt.yaml rollout.engine=vllm trainer.backend=deepspeed trainer.zero_stage=3

Runs ``--steps`` rollout steps of the config on the local model (prompts from ``--data``; the
synthetic arithmetic task by default, so nothing needs downloading), then prints, from rank 0,
the mean over the steps after the first (warm-up: compilation, CUDA graphs, allocator):

* tokens/s/GPU = total tokens trained on (prompt + response, all ranks) ÷ (step time × GPUs)
* peak GPU memory (the largest rank's ``torch.cuda.max_memory_allocated``)
* the step split into rollout / verify / train / sync (weights pushed into the rollout engine)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def summarize(rows: list[dict], gpus: int) -> dict[str, float]:
    """Means over the rows (steps) of the numbers the table prints."""
    def mean(key: str) -> float:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    step = mean("time/step_s")
    out = {
        "steps": len(rows),
        "gpus": gpus,
        "step_s": step,
        "tokens_per_step": mean("train/tokens"),
        "tokens_per_s_per_gpu": mean("train/tokens") / (step * gpus),
        "peak_mem_gib": max((r.get("mem/peak_gib") or 0.0) for r in rows),
    }
    for part in ("rollout", "verify", "train", "sync"):
        out[f"{part}_s"] = mean(f"time/{part}_s")
        out[f"{part}_frac"] = out[f"{part}_s"] / step
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local HF model directory (tokenizer included)")
    ap.add_argument("--config", help="a run YAML (default: GRPO with the dataclass defaults)")
    ap.add_argument("--data", default="synthetic:arithmetic?n=4096&seed=0", help="data.train")
    ap.add_argument("--steps", type=int, default=4, help="rollout steps; the first is warm-up")
    ap.add_argument("--run-dir", help="where the run writes (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    from posttrain import distributed as D

    args = ap.parse_args(D.strip_launcher_args(sys.argv[1:] if argv is None else argv))

    from posttrain.logging import read_metrics
    from posttrain.run import train

    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="bench_gpu-"))
    source = args.config or {"algorithm": {"name": "grpo"}}
    overrides = [f"model.path={args.model}", f"data.train={args.data}", f"trainer.steps={args.steps}",
                 "save_every=0", "logging.progress=false",
                 "eval.enabled=false", f"run_dir={run_dir}", "resume=never", *args.overrides]
    train(source, overrides)
    if not D.is_main():
        return 0
    rows = read_metrics(run_dir / "metrics.jsonl")
    s = summarize(rows[1:] or rows, D.world_size())
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{args.model}: {s['gpus']} GPU(s), {s['steps']} measured step(s)")
    print(f"  step {s['step_s']:.2f} s, {s['tokens_per_step']:.0f} tokens/step, "
          f"{s['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, peak memory {s['peak_mem_gib']:.1f} GiB")
    print("  split: " + ", ".join(f"{p} {s[p + '_s']:.2f} s ({100 * s[p + '_frac']:.0f}%)"
                                  for p in ("rollout", "verify", "train", "sync")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
