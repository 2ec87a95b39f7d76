"""Step time of the demo's SFT and GRPO stages under CPU contention, for several thread settings.

    python benchmarks/bench_threads.py [--sft-steps 40 --grpo-steps 3 --grpo-start sft --timeout 300 --rounds 1]

Workloads: stage 0 (SFT) and stage 1 (GRPO) of configs/demo/demo.yaml, each run alone for a few
steps with evaluation off. The GRPO stage starts where the demo starts it, from the SFT stage's
final weights (``--grpo-start sft``: the whole SFT stage is trained once first, on the machine as
it is, about 2 minutes; short numeric answers), or from the random-weight model
(``--grpo-start random``: every response runs to max_new_tokens, the slow end of that stage).
Scenarios: ``idle`` (nothing started by
this script; the load average printed next to it says how idle the machine really was),
``busy`` (one CPU-bound neighbour at equal priority), ``busy-nice`` (the same neighbour, with
the training process at nice +10, i.e. the neighbour has the higher priority; no root needed).
Variants:

* ``posttrain`` — ``posttrain train`` as shipped (``trainer.threads: auto``: adapts to contention,
  short OpenMP spin);
* ``threads=1`` — ``posttrain train ... trainer.threads=1``;
* ``torch`` — the same run through the Python API (``posttrain.run.train``), which leaves
  torch's defaults alone: one intra-op thread per CPU, spinning OpenMP waits.
* ``trl`` — TRL 1.16 on the same workload (needs ``pip install -e ".[bench]"``; skipped without
  it), with torch's thread defaults as a TRL user gets them: ``SFTTrainer`` on the stage's
  prompts and first demonstrations (prompt-completion data, loss on the completion), batch
  ``prompts_per_step``, the stage's lr; ``GRPOTrainer`` with the stage's n, max new tokens,
  temperature 1, no top-k, no KL, batch prompts × n, and a boxed-answer exact-match reward.
  Its step times come from a ``TrainerCallback``.

Every child starts without OMP_* / MKL_* variables, so the variants differ only as described.
The step time is the median ``time/step_s`` of a run's steps after the first (warm-up). A run
past ``--timeout`` is stopped and its finished steps are used ('>' marks it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "demo.yaml"
SCENARIOS = ("idle", "busy", "busy-nice")
VARIANTS = ("posttrain", "threads=1", "torch", "trl")
WORKLOADS = ("sft", "grpo")
NEIGHBOUR = "while True: pass"
TORCH_DEFAULT = "import sys; from posttrain.run import train; train(sys.argv[1])"


def stage_yaml(workload: str, steps: int | None, run_dir: Path, out: Path, model: str | None = None) -> Path:
    """One stage of the demo as a stand-alone config: ``steps`` steps (None: the demo's), no
    evaluation, starting from ``model`` (None: the demo's random-weight model)."""
    from posttrain.config import stage_configs

    cfg = stage_configs(OmegaConf.load(DEMO))[WORKLOADS.index(workload)]
    if steps is not None:
        cfg.trainer.steps = steps
    if model is not None:
        cfg.model.path = model
    cfg.eval.enabled = False
    cfg.save_every, cfg.run_dir, cfg.resume = 0, str(run_dir), "never"
    cfg.logging.console_every = 10**6
    cfg.logging.progress = False
    OmegaConf.save(cfg, out)
    return out


def sft_weights(tmp: Path) -> str:
    """The demo's SFT stage, trained once with posttrain's defaults: the GRPO stage's start."""
    from posttrain.checkpoint import latest_checkpoint

    run_dir = tmp / "sft-stage"
    config = stage_yaml("sft", None, run_dir, tmp / "sft-stage.yaml")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "posttrain", "train", str(config)], env=clean_env(), cwd=tmp,
                   check=True, stdout=subprocess.DEVNULL)
    final = latest_checkpoint(run_dir)
    print(f"GRPO starts from the demo's SFT stage: {final} ({time.perf_counter() - t0:.0f} s to train)", flush=True)
    return str(final)


def command(variant: str, config: Path) -> list[str]:
    if variant == "torch":
        return [sys.executable, "-c", TORCH_DEFAULT, str(config)]
    if variant == "trl":
        return [sys.executable, __file__, "--trl-run", str(config)]
    extra = ["trainer.threads=1"] if variant == "threads=1" else []
    return [sys.executable, "-m", "posttrain", "train", str(config), *extra]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def step_times(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["time/step_s"] for r in rows if "time/step_s" in r]


def summarize(times: list[float]) -> float | None:
    """Median step time after the warm-up step; None with fewer than two steps."""
    return statistics.median(times[1:]) if len(times) >= 2 else None


def run_one(workload: str, variant: str, scenario: str, steps: int, timeout: float, tmp: Path, model: str | None = None) -> dict:
    run_dir = tmp / f"{workload}-{variant}-{scenario}".replace("=", "")
    shutil.rmtree(run_dir, ignore_errors=True)  # a round's times only (TRL's timer appends)
    config = stage_yaml(workload, steps, run_dir, tmp / f"{run_dir.name}.yaml", model)
    neighbour = None
    if scenario != "idle":
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    nice = (lambda: os.nice(10)) if scenario == "busy-nice" else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(variant, config), env=clean_env(), cwd=tmp, preexec_fn=nice,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        timed_out = True
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    times = step_times(run_dir)
    if proc.returncode not in (0, None) and not timed_out:
        sys.stderr.write(f"{run_dir.name} failed (exit {proc.returncode}):\n{out[-2000:]}\n")
    line = next((l for l in out.splitlines() if l.startswith("threads:")), "")
    return {"workload": workload, "variant": variant, "scenario": scenario, "step_s": summarize(times),
            "steps": len(times), "timed_out": timed_out, "wall_s": time.perf_counter() - t0, "threads_line": line}


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:6.2f}x" if a and b else "     -"


def combine(results: list[dict]) -> dict[tuple, dict]:
    """One cell per (workload, variant, scenario): the median over rounds of the runs' step times."""
    runs: dict[tuple, list[dict]] = {}
    for r in results:
        runs.setdefault((r["workload"], r["variant"], r["scenario"]), []).append(r)
    cells = {}
    for key, rs in runs.items():
        times = [r["step_s"] for r in rs if r["step_s"] is not None]
        cells[key] = {"step_s": statistics.median(times) if times else None, "timed_out": any(r["timed_out"] for r in rs)}
    return cells


def report(results: list[dict]) -> None:
    by = combine(results)
    for workload in dict.fromkeys(r["workload"] for r in results):
        print(f"\n{workload}: median step time in s (ratio to the same variant idle)")
        print(f"  {'variant':<11}" + "".join(f"{s:>22}" for s in SCENARIOS))
        for v in VARIANTS:
            cells = []
            idle = (by.get((workload, v, "idle")) or {}).get("step_s")
            for s in SCENARIOS:
                r = by.get((workload, v, s))
                if r is None or r["step_s"] is None:
                    cells.append(f"{'timed out' if r and r['timed_out'] else '-':>22}")
                    continue
                mark = ">" if r["timed_out"] else " "
                cells.append(f"{mark}{r['step_s']:8.3f} ({ratio(r['step_s'], idle)})".rjust(22))
            print(f"  {v:<11}" + "".join(cells))
        for s in SCENARIOS:
            get = lambda v: (by.get((workload, v, s)) or {}).get("step_s")
            print(f"  {s:<10} posttrain / torch {ratio(get('posttrain'), get('torch'))}   "
                  f"posttrain / TRL {ratio(get('posttrain'), get('trl'))}   "
                  f"threads=1 / posttrain {ratio(get('threads=1'), get('posttrain'))}")


def trl_run(config_path: str) -> None:
    """The stage of ``config_path`` with TRL; writes ``run_dir/metrics.jsonl`` rows with
    ``time/step_s`` as posttrain does, so the same code reads both."""
    import re

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from posttrain.data import load_examples, render_prompt
    from posttrain.run import materialize_model

    cfg = OmegaConf.load(config_path)
    run_dir = Path(cfg.run_dir)
    model_dir = materialize_model(cfg.model.path, run_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    t = cfg.trainer
    per_step = t.prompts_per_step
    examples = load_examples(cfg.data.train, demo_keys=list(cfg.data.demo_keys))[: per_step * (t.steps + 1)]
    prompts = [render_prompt(tok, ex.prompt) for ex in examples]
    metrics = run_dir / "metrics.jsonl"

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            with metrics.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "time/step_s": time.perf_counter() - self.t0}) + "\n")

    common = dict(output_dir=str(run_dir / "trl"), learning_rate=t.lr, max_steps=t.steps, use_cpu=True, bf16=False,
                  report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, max_grad_norm=t.grad_clip or 1e9)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if cfg.algorithm.name == "sft":
        from trl import SFTConfig, SFTTrainer

        ds = Dataset.from_dict({"prompt": prompts, "completion": [ex.demonstrations[0] for ex in examples]})
        args = SFTConfig(per_device_train_batch_size=per_step, shuffle_dataset=False, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    else:
        from trl import GRPOConfig, GRPOTrainer

        def reward(completions, answer, **kw):
            found = [re.findall(r"\\boxed\{([^}]*)\}", c) for c in completions]
            return [float(bool(f) and f[-1].strip() == a.strip()) for f, a in zip(found, answer)]

        r = cfg.rollout
        ds = Dataset.from_dict({"prompt": prompts, "answer": [ex.answer for ex in examples]})
        args = GRPOConfig(per_device_train_batch_size=per_step * r.n, num_generations=r.n, max_completion_length=r.max_new_tokens,
                          temperature=r.temperature, top_k=0, top_p=1.0, beta=0.0, shuffle_dataset=False, **common)
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok,
                              callbacks=[Timer()])
    trainer.train()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--grpo-steps", type=int, default=3)
    ap.add_argument("--grpo-start", choices=("sft", "random"), default="sft",
                    help="GRPO from the demo's SFT stage (trained first, ~2 min) or from the random-weight model")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run before it is stopped")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every run this often, interleaved; a cell is the median over rounds")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--trl-run", help=argparse.SUPPRESS)  # internal: one TRL run (a child of this script)
    args = ap.parse_args(argv)
    if args.trl_run:
        trl_run(args.trl_run)
        return 0
    variants = args.variants.split(",")
    if "trl" in variants and importlib.util.find_spec("trl") is None:
        print("trl is not installed (pip install -e \".[bench]\"): its column is skipped", flush=True)
        variants.remove("trl")
    print(f"CPUs in affinity: {len(os.sched_getaffinity(0))}; load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads.split(","):
            steps = args.sft_steps if workload == "sft" else args.grpo_steps
            model = sft_weights(Path(tmp)) if workload == "grpo" and args.grpo_start == "sft" else None
            for round_ in range(args.rounds):  # machine noise drifts: every variant in every round
                for scenario in args.scenarios.split(","):
                    for variant in variants:
                        load = os.getloadavg()[0]
                        r = run_one(workload, variant, scenario, steps, args.timeout, Path(tmp), model)
                        results.append({**r, "load_before": load, "round": round_})
                        step = f"{r['step_s']:.3f} s" if r["step_s"] is not None else "no steps"
                        print(f"  {workload:<5} {scenario:<10} {variant:<10} {step:>10} over {r['steps']} steps"
                              f"{' (timed out)' if r['timed_out'] else ''}; load before {load:.2f}; {r['threads_line']}", flush=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
