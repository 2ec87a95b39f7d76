"""Generate → verify → extract answers → score, for one model on one benchmark.

Shared by ``posttrain eval`` (with a ``GenerationStore``, so re-runs reuse finished problems)
and by evaluation during training (no store).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from .. import distributed as D
from ..data import render_prompt
from ..config import ConfigError
from ..logging import progress as progress_bar
from ..rollout import SamplingParams
from .answers import AnswerExtractor
from .benchmarks import BenchmarkSpec, Problem
from .generations import GenerationStore, fingerprint
from .metrics import benchmark_metrics, problem_metrics


@dataclass
class Prompting:
    """How a problem's text becomes token ids (as ``data.template`` / ``data.system_prompt``)."""

    tokenizer: Any
    template: Optional[str] = None
    system_prompt: Optional[str] = None

    def ids(self, text: str) -> list[int]:
        try:
            rendered = render_prompt(self.tokenizer, text, template=self.template, system_prompt=self.system_prompt)
        except ValueError as e:  # no chat template, or a template without {prompt}
            raise ConfigError([f"{e} (posttrain eval: the template=... option)"], "eval") from e
        return self.tokenizer(rendered, add_special_tokens=False).input_ids


def sampling_params(spec: BenchmarkSpec) -> SamplingParams:
    return SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens)


def generate_records(generator: Any, prompting: Prompting, spec: BenchmarkSpec, problems: list[Problem], verifier: Any,
                     answers: AnswerExtractor, *, settings: dict, seed: int = 0, chunk_problems: int = 32,
                     store: Optional[GenerationStore] = None, progress: bool = False, desc: str = "eval") -> tuple[list[dict], int]:
    """One record per problem (in order) and how many problems were generated now (the rest
    came from ``store``). ``settings`` are what the fingerprints hash besides prompt and gold."""
    fps = [fingerprint(settings, p.uid, p.text, p.gold) for p in problems]
    done = {fp: rec for fp in fps if store is not None and (rec := store.get(fp)) is not None}
    todo = [i for i, fp in enumerate(fps) if fp not in done]
    params = sampling_params(spec)
    bar = progress_bar(total=len(problems), desc=desc, enabled=progress, leave=True)
    bar.update(len(problems) - len(todo))
    n_correct = n_samples = 0  # of this call's generations, for the bar
    for start in range(0, len(todo), chunk_problems):
        chunk = todo[start:start + chunk_problems]
        with torch.random.fork_rng(devices=[]):  # seeded per chunk; the caller's RNG is untouched
            torch.manual_seed(seed + chunk[0])
            trajs = generator.generate([prompting.ids(problems[i].text) for i in chunk], params, progress=progress)
        texts = [t.text for ts in trajs for t in ts]
        golds = [problems[i].gold for i, ts in zip(chunk, trajs) for _ in ts]
        # Answer keys (math: a worker pool) are read while the verifier scores: both mostly wait on workers.
        with ThreadPoolExecutor(1) as pool:
            pending_keys = pool.submit(answers.keys, spec.kind, texts)
            results = verifier.verify(list(zip(texts, golds)))
            keys = pending_keys.result()
        flat = iter(zip([t for ts in trajs for t in ts], results, keys))
        for i, ts in zip(chunk, trajs):
            samples = [{"text": t.text, "reward": r.reward, "status": r.status, "answer": a,
                        "length": len(t.response_ids), "finished": bool(t.finished)} for t, r, a in (next(flat) for _ in ts)]
            rec = {"uid": problems[i].uid, "fingerprint": fps[i], "prompt": problems[i].text, "gold": problems[i].gold,
                   "samples": samples}
            done[fps[i]] = rec
            if store is not None:
                store.add(rec)
        n_correct += sum(r.reward > 0.5 for r in results)
        n_samples += len(results)
        bar.update(len(chunk))
        bar.set_postfix(acc=f"{n_correct / max(1, n_samples):.3f}")
    bar.close()
    return [done[fp] for fp in fps], len(todo)


def score(records: list[dict], ks: list[int]) -> dict[str, float]:
    """Benchmark metrics (pass@k, avg@k, maj@k per k) plus counts and lengths."""
    per_problem = []
    for rec in records:
        correct = [s["reward"] > 0.5 for s in rec["samples"]]
        per_problem.append(problem_metrics(correct, [s["answer"] for s in rec["samples"]], ks))
    samples = [s for rec in records for s in rec["samples"]]
    out = benchmark_metrics(per_problem)
    out.update({
        "problems": float(len(records)),
        "samples": float(len(samples)),
        "response_length": sum(s["length"] for s in samples) / max(1, len(samples)),
        "truncated": sum(not s["finished"] for s in samples) / max(1, len(samples)),
        "timeouts": float(sum(s["status"] == "timeout" for s in samples)),
        "errors": float(sum(s["status"] == "error" for s in samples)),
    })
    return out


def evaluate_benchmarks_in_training(generator: Any, prompting: Prompting, benchmarks: list[tuple[BenchmarkSpec, list[Problem]]],
                                    verifiers: dict[str, Any], verifier_config: Any, *, seed: int, progress: bool,
                                    prefix: str = "eval/") -> dict[str, float]:
    """``{"eval/<benchmark>/<metric>": value}`` for the engine's periodic evaluation.

    ``verifiers`` maps names to factories (the run's ``register_verifiers`` registry); the
    verifiers and the answer pool live for this call only."""
    out: dict[str, float] = {}
    made: dict[str, Any] = {}
    with AnswerExtractor(verifier_config.timeout_s, 1) as answers:
        try:
            for spec, problems in benchmarks:
                if spec.verifier_name not in verifiers:
                    raise ConfigError([f"benchmark {spec.name}: verifier '{spec.verifier_name}' is not registered "
                                       f"(available: {', '.join(sorted(verifiers))})"], "eval.benchmarks")
                if spec.verifier_name not in made:
                    made[spec.verifier_name] = verifiers[spec.verifier_name](replace(verifier_config, name=spec.verifier_name))
                verifier = made[spec.verifier_name]
                records = D.map_sharded(  # each rank its share of the problems; all get every record
                    lambda part: generate_records(generator, prompting, spec, part, verifier, answers, settings={},
                                                  seed=seed, progress=progress, desc=f"eval {spec.name}")[0],
                    problems)
                metrics = score(records, spec.metric_ks)
                for key in ("problems", "samples", "errors"):
                    metrics.pop(key)
                out.update({f"{prefix}{spec.name}/{k}": v for k, v in metrics.items()})
        finally:
            for v in made.values():
                v.close()
    return out
