"""vLLM rollout engine (``rollout.engine: vllm``, extra ``posttrain[vllm]``, GPU only).

Colocated: every training process hosts its own vLLM engine on its own GPU (a group of
``rollout.tensor_parallel_size`` processes shares one tensor-parallel engine), inside the same
process and the same ``torch.distributed`` world (vLLM's ``external_launcher`` backend), so:

* while the trainer steps, vLLM sleeps (``rollout.sleep_level`` 1: weights to CPU, KV cache
  freed; 2: weights discarded too) and gives the GPU memory back;
* after every optimizer step the engine pushes the policy's weights into vLLM's model in memory
  (``model.load_weights``, parameter by parameter, gathered one at a time under ZeRO-3), never
  through a checkpoint on disk;
* log-probs are vLLM's *processed* log-probs of the sampled tokens: log softmax(z / T), the
  distribution it actually sampled from (with top-p < 1, renormalised over the nucleus).

Asynchronous RL (``rollout.max_staleness`` ≥ 1) runs vLLM in the rollout worker process instead
(``VLLMWorkerEngine``, driven by ``worker.py``): one engine on the worker's GPU, awake throughout,
loaded from the shared-memory weights the trainer pushes.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

import torch

from .. import distributed as D
from ..lora import is_peft, merged_weights
from ..types import Trajectory
from .base import SamplingParams


class VLLMRolloutEngine:
    def __init__(self, model: Any, tokenizer: Any, config: Any):
        # The engine core must run in this process, or load_weights could not reach its model.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.sleep_level = int(config.sleep_level)
        self.tp = int(config.tensor_parallel_size)
        world, rank = D.world_size(), D.rank()
        if world % self.tp:
            raise ValueError(f"rollout.tensor_parallel_size ({self.tp}) must divide the number of processes ({world})")
        self.tp_group = None
        if self.tp > 1:
            # Consecutive ranks form one tensor-parallel engine: [0, 1], [2, 3], ...
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(i, i + self.tp)) for i in range(0, world, self.tp)])
        # torch's seed is trainer.seed + rank (distributed.seed_everything); ranks of one TP group
        # must sample identically, so they share the group's seed.
        seed = (torch.initial_seed() - rank + rank // self.tp) % 2**31  # numpy seeds must fit 32 bits
        kwargs: dict[str, Any] = dict(
            model=model.name_or_path,
            tokenizer=model.name_or_path,
            dtype=str(model.dtype).removeprefix("torch."),
            tensor_parallel_size=self.tp,
            gpu_memory_utilization=float(config.gpu_memory_utilization),
            enable_sleep_mode=self.sleep_level > 0,
            seed=int(seed),
            logprobs_mode="processed_logprobs",  # after temperature (and top-p): what was sampled from
        )
        if world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # join the trainer's process group
        self.llm = LLM(**kwargs)
        # Ranks finish building their engines at different times; DeepSpeed's next collective
        # would otherwise wait on a rank still loading (TRL saw hangs there).
        D.barrier()
        self.model = model  # the trainer's module: the weights to push when vLLM's are stale
        self._asleep: set[str] = set()  # what sleep() released and wake_up() has not restored
        # Weights discarded (sleep level 2) and not pushed since. A LoRA policy starts stale: vLLM
        # loaded its base from disk, and a resumed adapter is not zero.
        self._stale = is_peft(model)

    # --- sleep / wake -------------------------------------------------------------------------

    def _sleep(self) -> None:
        if self.sleep_level <= 0:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = {"weights", "kv_cache"}
        self._stale = self.sleep_level >= 2

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            torch.cuda.empty_cache()  # the trainer's cached blocks would otherwise count against vLLM
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    # --- the RolloutEngine protocol ---------------------------------------------------------------

    def sync_weights(self, model: Any) -> None:
        """Push every parameter of ``model`` (the trainer's, possibly ZeRO-3 partitioned) into vLLM."""
        self.model = model
        self._wake("weights")
        partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 marks its parameters
        gather = _zero3_gather if partitioned else (lambda p: nullcontext())
        # LoRA: vLLM holds plain weights, so it gets base + adapter merged (LoRA refuses ZeRO-3).
        weights = merged_weights(model) if is_peft(model) else model.named_parameters()
        with torch.no_grad():
            for name, p in weights:
                with gather(p):
                    # apply_model runs in this process (in-process engine core) on the bare model,
                    # unwrapped from vLLM's CUDA-graph wrappers; load_weights copies in place.
                    self.llm.apply_model(lambda m, w=[(name, p.data)]: m.load_weights(w))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._stale = False

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, progress: bool = False) -> list[list[Trajectory]]:
        if self._stale:
            self.sync_weights(self.model)
        self._wake("weights")
        self._wake("kv_cache")
        mine = len(prompts)
        if self.tp_group is not None:  # every rank of a TP engine must submit the same requests
            parts: list[Any] = [None] * self.tp
            torch.distributed.all_gather_object(parts, prompts, group=self.tp_group)
            offset = sum(len(p) for p in parts[: torch.distributed.get_rank(group=self.tp_group)])
            prompts = [p for part in parts for p in part]
        else:
            offset = 0
        outputs = _generate(self.llm, self.tokenizer, prompts, params, progress)
        self._sleep()
        return outputs[offset:offset + mine]


class VLLMWorkerEngine:
    """vLLM in the asynchronous rollout worker: the engine protocol's ``generate``, plus ``load``
    (the trainer's pushed weights, by the plain model's names) and ``probe_logprobs`` (what the
    trainer compares after every load). The worker process sees only its own GPU."""

    compile = False  # rollout.compile is the HF engine's; the worker reports it

    def __init__(self, path: str, tokenizer: Any, dtype: torch.dtype, gpu_memory_utilization: float, seed: int):
        # In-process engine core: load_weights must reach the model, and a daemonic worker may not start processes.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=path, tokenizer=path, dtype=str(dtype).removeprefix("torch."),
                       gpu_memory_utilization=gpu_memory_utilization, seed=seed, logprobs_mode="processed_logprobs")

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.llm.apply_model(lambda m: m.load_weights(list(weights.items())))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def probe_logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """log p(ids[t] | ids[<t]) for t ≥ 1, [len − 1] float32: vLLM's prompt log-probs at T = 1."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        toks = ids[0].tolist()
        sp = VSamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)  # 0: the prompt token's own
        out, = self.llm.generate([TokensPrompt(prompt_token_ids=toks)], sp, use_tqdm=False)
        return torch.tensor([out.prompt_logprobs[t][toks[t]].logprob for t in range(1, len(toks))], dtype=torch.float32)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, progress: bool = False) -> list[list[Trajectory]]:
        return _generate(self.llm, self.tokenizer, prompts, params, progress)


def _generate(llm: Any, tokenizer: Any, prompts: list[list[int]], params: SamplingParams, progress: bool) -> list[list[Trajectory]]:
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    greedy = params.temperature <= 0
    # Explicit top-k: -1 is "off" in every vLLM version (0 only in recent ones); explicit
    # params also keep the model's generation_config.json defaults (often a top-k) out.
    sp = VSamplingParams(n=params.n, temperature=0.0 if greedy else params.temperature,
                         top_p=1.0 if greedy else params.top_p,
                         top_k=params.top_k if params.top_k > 0 and not greedy else -1,
                         max_tokens=params.max_new_tokens, logprobs=0)  # 0: the sampled token's only
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=progress)
    return [[_trajectory(o, tokenizer) for o in req.outputs] for req in outputs]


def _trajectory(out: Any, tokenizer: Any) -> Trajectory:
    toks = list(out.token_ids)  # EOS included when the response ended with it
    lps = [float(step[t].logprob) for step, t in zip(out.logprobs, toks)]
    return Trajectory(response_ids=toks, text=tokenizer.decode(toks, skip_special_tokens=True),
                      sampling_logprobs=lps, finished=out.finish_reason == "stop")


def _zero3_gather(p):
    import deepspeed

    return deepspeed.zero.GatheredParameters([p], modifier_rank=None)


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise ImportError(f"rollout.engine=vllm needs vLLM and a GPU ({e}): install it in its own environment, "
                          "see README 'Scaling up'") from e


def vllm_engine(model: Any, tokenizer: Any, config: Any) -> VLLMRolloutEngine:
    require_vllm()
    return VLLMRolloutEngine(model, tokenizer, config)
