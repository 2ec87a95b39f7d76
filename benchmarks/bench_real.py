"""SmolLM2-135M-Instruct on GSM-Symbolic: load time, greedy rollout tokens/s, and which answer
format the untouched model meets under three prompts (the evidence for configs/real/'s reward).

    posttrain fetch-model smollm2-135m
    python benchmarks/bench_real.py [--problems 36 --new-tokens 256 --threads 1]

Prints one line per measurement; numbers go in the README, not in timed tests.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

PROMPTS = {
    "plain": "{q}",
    "hash": "{q}\nSolve it step by step, then write the final answer as a number on its own line: #### <number>",
    "boxed": ("Solve the following math problem step by step. Put your final numeric answer (without units, currency "
              "symbols, or percentage signs) in \\boxed{{}}, for example: \\boxed{{42}}.\n\n{q}"),  # the package's instruction
}
_HASH = re.compile(r"####\s*\$?(-?[\d,]*\.?\d+)")


def hash_correct(response: str, gold: str) -> bool:
    m = _HASH.findall(response)
    return bool(m) and float(m[-1].replace(",", "")) == float(gold)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=36)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", default=",".join(PROMPTS), help="comma-separated: " + ", ".join(PROMPTS))
    ap.add_argument("--dump", help="write every response with its gold to this JSONL")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # on shared cores, 1 thread generates faster than 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.gsm_symbolic import make_gsm_symbolic
    from posttrain.modelzoo import fetch_model
    from posttrain.verify import MathVerifier

    path = fetch_model("smollm2-135m")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print(f"load: {time.perf_counter() - t0:.1f} s ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    problems = make_gsm_symbolic(templates=f"0-{args.problems - 1}", original=True)
    verifier = MathVerifier(timeout_s=10, workers=1)
    try:
        for name in args.prompts.split(","):
            fmt = PROMPTS[name]
            texts = [tok.apply_chat_template([{"role": "user", "content": fmt.format(q=p.prompt)}], tokenize=False,
                                             add_generation_prompt=True) for p in problems]
            enc = tok(texts, return_tensors="pt", padding=True)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            dt = time.perf_counter() - t0
            new = out[:, enc.input_ids.shape[1]:]
            n_tokens = int((new != tok.pad_token_id).sum()) + len(problems)  # each row's EOS counts once
            responses = tok.batch_decode(new, skip_special_tokens=True)
            golds = [p.answer for p in problems]
            math_ok = [r.reward == 1.0 for r in verifier.verify(list(zip(responses, golds)))]
            boxed = ["\\boxed" in r for r in responses]
            hashed = [bool(_HASH.search(r)) for r in responses]
            n = len(problems)
            print(f"prompt={name:<6} batch {n}: {n_tokens / dt:.0f} tokens/s ({dt:.0f} s); "
                  f"math verifier (boxed, else last number) {sum(math_ok)}/{n}; "
                  f"boxed-only {sum(b and m for b, m in zip(boxed, math_ok))}/{n}; "
                  f"'#### N'-only {sum(hash_correct(r, g) for r, g in zip(responses, golds))}/{n}; "
                  f"answers with \\boxed {sum(boxed)}/{n}, with #### {sum(hashed)}/{n}", flush=True)
            if args.dump:
                with open(args.dump, "a") as f:
                    for p, r, ok in zip(problems, responses, math_ok):
                        f.write(json.dumps({"prompt": name, "uid": p.uid, "gold": p.answer, "response": r, "math": ok}) + "\n")
    finally:
        verifier.close()


if __name__ == "__main__":
    main()
