"""Core throughput on the tiny model: rollout tokens/s, train tokens/s, verifier answers/s, peak memory.

    python benchmarks/bench_core.py [--hidden 64 --layers 2 --prompts 16 --n 8 --new-tokens 64]

Prints one line per measurement; numbers go in the notes, not in timed tests.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--answers", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", help="benchmark this local HF model dir instead of a tiny one")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.batching import build_train_batch, totals_of
    from posttrain.config import GRPOConfig, VerifierConfig
    from posttrain.data import make_arithmetic
    from posttrain.loss import micro_batch_loss
    from posttrain.metrics import Metrics
    from posttrain.plugins import make_plugin_manager
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.hf import HFRolloutEngine
    from posttrain.testing import make_tiny_model
    from posttrain.types import Needs, PromptGroup, Route
    from posttrain.verify import build_verifier

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    path = args.model or make_tiny_model(Path(tmp) / "m", hidden=args.hidden, layers=args.layers)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M params, torch threads {torch.get_num_threads()}")

    examples = make_arithmetic(args.prompts, seed=0)
    prompts = [tok(e.prompt, add_special_tokens=False).input_ids for e in examples]
    engine = HFRolloutEngine(model, tok, batch_size=args.prompts * args.n)
    sp = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new_tokens)
    engine.generate(prompts[:2], SamplingParams(n=1, max_new_tokens=4))  # warm-up
    t = time.perf_counter()
    out = engine.generate(prompts, sp)
    dt = time.perf_counter() - t
    gen_tokens = sum(len(tr.response_ids) for o in out for tr in o)
    print(f"rollout: {gen_tokens} tokens in {dt:.2f} s = {gen_tokens / dt:,.0f} tokens/s "
          f"({args.prompts} prompts x {args.n}, ≤{args.new_tokens} new tokens)")

    groups = [PromptGroup(example=e, prompt_ids=p, members=o) for e, p, o in zip(examples, prompts, out)]
    for g in groups:
        for i, m in enumerate(g.members):
            m.reward = float(i % 2)
    pm = make_plugin_manager("grpo")
    batch = build_train_batch(groups, [Route()] * len(groups), tok.pad_token_id)
    batch.advantages = pm.hook.compute_advantage(batch=batch, config=GRPOConfig(), step=0, metrics=Metrics())
    batch.totals = totals_of(batch, args.new_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_tokens = int(batch.attention_mask.sum())
    times = []
    for _ in range(4):
        t = time.perf_counter()
        terms, _ = micro_batch_loss(pm.hook, GRPOConfig(), 0, model, batch, Metrics(), needs=Needs())
        sum(x.value for x in terms).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    print(f"train: {train_tokens} tokens (fwd+bwd+AdamW) in {dt:.3f} s = {train_tokens / dt:,.0f} tokens/s (median of 4)")

    verifier = build_verifier("math", VerifierConfig(workers=args.workers, timeout_s=10))
    items = [(f"so the answer is \\boxed{{{e.answer}}}", e.answer) for e in make_arithmetic(args.answers, seed=1)]
    verifier.verify(items[:4])  # start workers
    t = time.perf_counter()
    res = verifier.verify(items)
    dt = time.perf_counter() - t
    verifier.close()
    assert all(r.reward == 1.0 for r in res)
    print(f"verifier (math, {args.workers} workers): {len(items)} answers in {dt:.2f} s = {len(items) / dt:,.0f} answers/s")
    print(f"peak memory: {peak_rss_mib():,.0f} MiB RSS"
          + (f", {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB CUDA" if torch.cuda.is_available() else ""))


if __name__ == "__main__":
    main()
