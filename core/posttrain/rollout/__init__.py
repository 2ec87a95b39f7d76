"""Rollout engines: sample n responses per prompt and report the sampling log-probs."""

from __future__ import annotations

from typing import Any

from ..types import Trajectory


from .base import RolloutEngine, SamplingParams  # noqa: F401  (re-exported)


def hf_engine(model: Any, tokenizer: Any, config: Any) -> RolloutEngine:
    from .hf import HFRolloutEngine

    return HFRolloutEngine(model, tokenizer, batch_size=config.batch_size, compile=config.compile)


def generate_requests(engine: RolloutEngine, prompts: list[list[int]], requests: list[Any], params: SamplingParams, *,
                      eos_id: int | None, decode: Any, progress: bool = False) -> list[list[Trajectory]]:
    """Sample what each ``RolloutRequest`` asks for (``n`` samples, after a forced ``prefix``).

    Requests with the same ``n`` and response budget go to the engine in one ``generate`` call,
    in their order (the default requests of a step are one call, as without requests). A prefix
    is appended to the prompt; the continuation gets the budget left after it, and the prefix
    is put back in front of each response with ``prefix_len`` set and sampling log-prob 0, and
    ``text`` (what the verifier reads) is ``decode(prefix + continuation)``.
    """
    from dataclasses import replace

    out: list[list[Trajectory]] = [[] for _ in prompts]
    calls: dict[tuple[int, int], list[int]] = {}
    for i, req in enumerate(requests):
        prefix = list(req.prefix)
        if req.n <= 0:
            continue
        if (eos_id is not None and prefix and prefix[-1] == eos_id) or len(prefix) >= params.max_new_tokens:
            # nothing is left to sample: the response is the prefix itself
            done = prefix[:params.max_new_tokens]
            out[i] = [Trajectory(response_ids=list(done), text=decode(done), sampling_logprobs=[0.0] * len(done),
                                 prefix_len=len(done), finished=bool(done) and done[-1] == eos_id, tag=req.tag)
                      for _ in range(req.n)]
            continue
        calls.setdefault((req.n, params.max_new_tokens - len(prefix)), []).append(i)
    for (n, budget), idx in calls.items():
        sub = replace(params, n=n, max_new_tokens=budget)
        results = engine.generate([list(prompts[i]) + list(requests[i].prefix) for i in idx], sub, progress=progress)
        for i, trajs in zip(idx, results):
            prefix = list(requests[i].prefix)
            for t in trajs:
                if prefix:
                    t.response_ids = prefix + list(t.response_ids)
                    t.sampling_logprobs = [0.0] * len(prefix) + list(t.sampling_logprobs or [0.0] * (len(t.response_ids) - len(prefix)))
                    t.prefix_len = len(prefix)
                    t.text = decode(t.response_ids)
                t.tag = requests[i].tag
            out[i] = trajs
    return out
