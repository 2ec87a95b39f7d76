"""One GRPO step, side by side: posttrain vs TRL's GRPOTrainer vs raw torch (the floor).

    pip install -e ".[bench]"          # trl (optional: without it the TRL column is skipped)
    python benchmarks/bench_vs_trl.py [--sizes tiny-8x32 tiny-16x64 tiny-64x128 h256-16x64] [--rounds 3]

The same everywhere: the tiny random Llama and character tokenizer (``make_tiny_model``), the
arithmetic prompts, prompts × completions (n = 4), max new tokens, temperature 1 (no top-k,
no top-p), an exact-match reward on the text after the last "=", one optimizer step (AdamW,
lr 1e-5, fp32) per rollout, no KL, no gradient checkpointing, the same torch thread count.

* posttrain: ``posttrain.run.train`` with ``algorithm=grpo`` and ``verifier=exact`` and its
  default micro-batching (rows of similar length share a pass); step times and the phase split
  come from its metrics (``time/step_s``, ``time/rollout_s``, ...).
* TRL: ``GRPOTrainer`` with the matching ``GRPOConfig``; step time from a callback.
* raw torch: ``model.generate`` (KV cache) + reward + one forward/backward/AdamW on the batch,
  no framework at all.

Rounds are interleaved (posttrain, TRL, raw, posttrain, ...) so load changes on the machine hit
all three alike; each round runs ``--steps`` steps and the first is dropped (warm-up). Prints the
median step time of each, the ratios, and posttrain's rollout share of the step; also the
median CPU seconds of the process per step (``time.process_time``: on a machine shared with
other jobs the wall clock measures the neighbours as much as the code, CPU time much less).
``--compile`` adds a posttrain column with ``rollout.compile=true`` (its compilation falls in
each round's dropped first step and is printed separately).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from posttrain import hookimpl

SIZES = {  # name: (hidden, sequences per step, max new tokens)
    "tiny-8x32": (64, 8, 32),
    "tiny-16x64": (64, 16, 64),
    "tiny-64x128": (64, 64, 128),
    "h256-16x64": (256, 16, 64),
}
N = 4  # completions per prompt
LR = 1e-5


def exact_reward(text: str, answer: str) -> float:
    """1 when the completion's text after the last "=" (or the whole text) is the answer."""
    return float(text.rsplit("=", 1)[-1].strip() == answer.strip())


def _data(prompts: int):
    from posttrain.data import make_arithmetic

    return make_arithmetic(prompts, seed=0)


class _CpuClock:
    """posttrain plugin: the process CPU seconds of each step, from one on_step_end to the next."""

    def __init__(self):
        self.cpu: list[float] = []
        self.last = time.process_time()

    @hookimpl
    def on_step_end(self, step, metrics):
        now = time.process_time()
        self.cpu.append(now - self.last)
        self.last = now


def run_posttrain(model_dir: Path, seqs: int, new_tokens: int, steps: int, tmp: Path, threads: int,
                  compile: bool = False) -> list[dict]:
    """Per step (the first included): posttrain's metrics plus ``cpu_s``."""
    from posttrain.logging import read_metrics
    from posttrain.run import train
    from posttrain.testing import tiny_config

    run = Path(tempfile.mkdtemp(dir=tmp))
    over = {"rollout.n": N, "rollout.max_new_tokens": new_tokens, "rollout.temperature": 1.0,
            "rollout.batch_size": seqs, "rollout.compile": compile, "trainer.prompts_per_step": seqs // N,
            "trainer.lr": LR, "trainer.device": "cpu",
            "trainer.grad_clip": None, "trainer.threads": threads,
            "verifier.name": "exact", "data.template": "{prompt}", "eval.enabled": False}
    clock = _CpuClock()
    train(tiny_config(model_dir, run, algorithm="grpo", steps=steps, overrides=over), base=None, plugins=[clock])
    rows = read_metrics(run / "metrics.jsonl")
    return [{**r, "cpu_s": c} for r, c in zip(rows, clock.cpu)]


def run_trl(model_dir: Path, seqs: int, new_tokens: int, steps: int, tmp: Path) -> list[tuple[float, float]]:
    """(wall s, CPU s) per step, the first dropped."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ex = _data(seqs // N * steps)
    ds = Dataset.from_dict({"prompt": [e.prompt for e in ex], "answer": [e.answer for e in ex]})

    def reward(completions, answer, **kw):
        return [exact_reward(c, a) for c, a in zip(completions, answer)]

    times: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t, time.process_time() - self.c))

    cfg = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=seqs, num_generations=N,
                     max_completion_length=new_tokens, temperature=1.0, top_k=0, top_p=1.0, beta=0.0,
                     learning_rate=LR, max_steps=steps, use_cpu=True, bf16=False, gradient_checkpointing=False,
                     max_grad_norm=1e9, logging_steps=1, report_to="none", save_strategy="no", shuffle_dataset=False,
                     disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=[reward], args=cfg,
                          train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return times[1:]


def run_raw(model_dir: Path, seqs: int, new_tokens: int, steps: int) -> list[dict]:
    """HF generate + reward + group-normalised advantages + one fwd/bwd/AdamW: the floor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    ex = _data(seqs // N * steps)
    out = []
    for s in range(steps):
        batch = [e for e in ex[s * seqs // N:(s + 1) * seqs // N] for _ in range(N)]
        t0, c0 = time.perf_counter(), time.process_time()
        enc = tok([e.prompt for e in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        model.eval()
        with torch.no_grad():
            seq = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        t1 = time.perf_counter()
        P = enc.input_ids.shape[1]
        comp = seq[:, P:]
        mask = torch.cumsum((comp == tok.eos_token_id).long(), 1)
        comp_mask = (mask - (comp == tok.eos_token_id).long()) == 0  # up to and including EOS
        r = torch.tensor([exact_reward(tok.decode(c[m], skip_special_tokens=True), e.answer)
                          for c, m, e in zip(comp, comp_mask, batch)])
        g = r.view(-1, N)
        adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)
        model.train()
        attn = torch.cat([enc.attention_mask, comp_mask.long()], 1)
        logits = model(input_ids=seq, attention_mask=attn).logits[:, P - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, comp[..., None]).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        loss = -((adv[:, None] * ratio) * comp_mask).sum() / comp_mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        t2 = time.perf_counter()
        out.append({"step": t2 - t0, "rollout": t1 - t0, "train": t2 - t1, "cpu": time.process_time() - c0})
    return out[1:]


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per round; the first is warm-up")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also posttrain with rollout.compile=true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import trl  # noqa: F401
        have_trl = not args.no_trl
    except ImportError:
        have_trl = False
        print("trl not installed (pip install -e '.[bench]'): TRL column skipped")

    from posttrain.testing import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    summary: dict[str, dict[str, float]] = {}
    print(f"torch threads {args.threads}; rounds {args.rounds} x {args.steps} steps (first of each dropped); n={N}")
    for name in args.sizes:
        hidden, seqs, new_tokens = SIZES[name]
        model_dir = make_tiny_model(tmp / name, hidden=hidden)
        pt, ptc, tr, raw, compile_s = [], [], [], [], []
        for _ in range(args.rounds):
            pt += run_posttrain(model_dir, seqs, new_tokens, args.steps, tmp, args.threads)[1:]
            if args.compile:
                rows = run_posttrain(model_dir, seqs, new_tokens, args.steps, tmp, args.threads, compile=True)
                compile_s.append(rows[0]["time/rollout_s"])
                ptc += rows[1:]
            if have_trl:
                tr += run_trl(model_dir, seqs, new_tokens, args.steps, tmp)
            raw += run_raw(model_dir, seqs, new_tokens, args.steps)
        med = statistics.median
        s = {"posttrain_s": med(r["time/step_s"] for r in pt), "raw_s": med(r["step"] for r in raw),
             "posttrain_cpu": med(r["cpu_s"] for r in pt), "raw_cpu": med(r["cpu"] for r in raw),
             "rollout_frac": med(r["time/rollout_s"] / r["time/step_s"] for r in pt),
             "train_frac": med(r["time/train_s"] / r["time/step_s"] for r in pt),
             "raw_rollout_frac": med(r["rollout"] / r["step"] for r in raw),
             # raw torch's train phase is its step minus generate: reward, advantages, fwd/bwd/AdamW
             "train_vs_raw": med(r["time/train_s"] for r in pt) / med(r["train"] for r in raw),
             "posttrain_len": med(r["rollout/response_length"] for r in pt)}
        if tr:
            s["trl_s"], s["trl_cpu"] = med(w for w, _ in tr), med(c for _, c in tr)
        if ptc:
            s["compiled_s"], s["compiled_cpu"] = med(r["time/step_s"] for r in ptc), med(r["cpu_s"] for r in ptc)
            s["compile_first_rollout_s"] = med(compile_s)
        summary[name] = s
        ref, ref_cpu, ref_name = (s["trl_s"], s["trl_cpu"], "TRL") if tr else (s["raw_s"], s["raw_cpu"], "raw")
        line = (f"{name:12s} wall s/step: posttrain {s['posttrain_s']:.3f}"
                + (f"  TRL {s['trl_s']:.3f}" if tr else "") + f"  raw {s['raw_s']:.3f}"
                + f"  | posttrain/{ref_name} {s['posttrain_s'] / ref:.2f}  posttrain/raw {s['posttrain_s'] / s['raw_s']:.2f}"
                + f"  | CPU s/step: posttrain {s['posttrain_cpu']:.3f}" + (f"  TRL {s['trl_cpu']:.3f}" if tr else "")
                + f"  raw {s['raw_cpu']:.3f}  posttrain/{ref_name} {s['posttrain_cpu'] / ref_cpu:.2f}")
        if ptc:
            line += (f"\n{'':12s} rollout.compile: wall {s['compiled_s']:.3f}  CPU {s['compiled_cpu']:.3f}"
                     f"  compiled/{ref_name} wall {s['compiled_s'] / ref:.2f} CPU {s['compiled_cpu'] / ref_cpu:.2f}"
                     f"  (first rollout, compiling: {s['compile_first_rollout_s']:.1f} s)")
        line += (f"\n{'':12s} posttrain rollout {s['rollout_frac']:.0%} train {s['train_frac']:.0%} "
                 f"(raw: rollout {s['raw_rollout_frac']:.0%})  train phase / raw torch's {s['train_vs_raw']:.2f}"
                 f"  mean response {s['posttrain_len']:.1f} tokens")
        print(line, flush=True)
    return summary


if __name__ == "__main__":
    main()
