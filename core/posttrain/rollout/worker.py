"""The HF rollout engine in a worker process: its own copy of the weights, its own threads.

Asynchronous RL (``rollout.max_staleness`` ≥ 1) samples the next steps' rollouts here while the
trainer trains. The trainer talks to the worker through two queues and one set of shared-memory
tensors (``share_memory_``: torch's own inter-process transfer, no file format):

* a push copies the trainer's weights (a LoRA policy: the merged W + ΔW, what inference needs)
  into the shared buffer. In ``pipelined`` mode the push is also a command in the worker's FIFO,
  so a request queued after push v is sampled by exactly version v (reproducible whatever the
  timing); in ``free`` mode the worker loads the newest buffer before each request, under a lock;
* after every load the worker answers with the version it now serves and the log-probs of a fixed
  probe sequence; the trainer compares them with its own (``ProbeCheck``) and stops the run with
  one line when they differ beyond the dtype's tolerance: a sync that silently changed nothing
  would otherwise sample the initial policy for the whole run;
* a request runs ``generate_requests`` with the HF engine (``hf.py``, through its protocol) and
  answers with the trajectories and the version that sampled them.

The worker's model lives on ``rollout.worker_device`` (auto: the trainer's device; the shared
buffer stays in CPU memory and each load copies it over). Its sampling RNG is its own (seeded from
``trainer.seed``; on a GPU, that GPU's generator too); ``rng`` / ``set_rng`` move it in and out of
checkpoints. With ``rollout.engine: vllm`` the worker hosts a vLLM engine instead of the HF model
(``vllm_engine.VLLMWorkerEngine``, GPU only), loaded through vLLM's ``load_weights`` from the same
buffer; the worker process then sees only its GPU.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from typing import Any

import torch

PROBE_LEN = 24
# max |Δ log-prob| on the probe between trainer and worker that still counts as "the same weights";
# vLLM's kernels (fused attention, other reduction orders) are further from the trainer's HF model
TOLERANCE = {"hf": {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1},
             "vllm": {torch.float32: 1e-2, torch.float16: 5e-2, torch.bfloat16: 2e-1}}


class WeightSyncError(RuntimeError):
    """The rollout worker does not serve the weights the trainer pushed (one line)."""


def policy_weights(model: Any) -> dict[str, torch.Tensor]:
    """What inference needs, under the plain model's names: a LoRA policy's merged weights."""
    from ..lora import is_peft, merged_weights

    return dict(merged_weights(model)) if is_peft(model) else {k: p.detach() for k, p in model.named_parameters()}


def plain_config(model: Any) -> Any:
    from ..lora import is_peft

    return model.get_base_model().config if is_peft(model) else model.config


def probe_ids(vocab_size: int) -> torch.Tensor:
    """A fixed token sequence (every side computes the same), [1, PROBE_LEN]."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (1, PROBE_LEN), generator=g)


@torch.no_grad()
def probe_logprobs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t] | ids[<t]) under ``model`` in eval mode, [PROBE_LEN − 1] float32 on CPU."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device)).logits[0, :-1].float()
    finally:
        model.train(was)
    return torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None].to(device)).squeeze(-1).cpu()


class ProbeCheck:
    """Compares what the worker reports after a load with what the trainer pushed."""

    def __init__(self, dtype: torch.dtype, engine: str = "hf"):
        self.tol = TOLERANCE[engine].get(dtype, TOLERANCE[engine][torch.float32])
        self.expected: dict[int, torch.Tensor] = {}
        self.last_served: torch.Tensor | None = None

    def pushed(self, version: int, lp: torch.Tensor) -> None:
        self.expected[version] = lp

    def served(self, version: int, got_version: int, lp: torch.Tensor) -> None:
        want = self.expected.pop(version)
        if got_version != version:
            raise WeightSyncError(f"rollout weight sync: pushed version {version}, the rollout worker reports version "
                                  f"{got_version}; stopping (the worker would sample from the wrong policy)")
        gap = float((lp - want).abs().max())
        if gap > self.tol:
            unchanged = self.last_served is not None and torch.equal(lp, self.last_served)
            why = "the sync changed nothing: the worker still serves the previous weights" if unchanged else \
                "the worker serves other weights than the trainer's"
            raise WeightSyncError(f"rollout weight sync failed after pushing version {version}: {why} (probe log-probs "
                                  f"differ by {gap:.3g} > {self.tol:g}); stopping instead of training on rollouts of a "
                                  "policy nobody trained")
        self.last_served = lp


class RolloutWorker:
    """The trainer's handle on the worker process (started by ``start``, stopped by ``close``)."""

    def __init__(self, model: Any, tokenizer: Any, *, mode: str, threads: int, seed: int, batch_size: int,
                 device: str = "cpu", compile: bool = False, engine: str = "hf", gpu_memory_utilization: float = 0.5):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.mode = mode
        self.buffer = {k: v.detach().to("cpu", copy=True).share_memory_() for k, v in policy_weights(model).items()}
        self.cmd, self.res = ctx.Queue(), ctx.Queue()
        self.lock, self.version = ctx.Lock(), ctx.Value("q", -1)
        self.probe = probe_ids(plain_config(model).vocab_size)
        self.check = ProbeCheck(next(iter(self.buffer.values())).dtype, engine)
        spec = EngineSpec(engine, batch_size, compile, plain_config(model).name_or_path, gpu_memory_utilization)
        self.proc = ctx.Process(target=_main, daemon=True, name="posttrain-rollout-worker",
                                args=(plain_config(model), tokenizer, self.buffer, self.cmd, self.res, self.lock, self.version,
                                      mode, threads, seed, spec, self.probe, device))
        self.proc.start()
        self._tickets = 0
        self._done: dict[int, tuple] = {}
        self._unacked: list[int] = []
        self.worker_busy_s = 0.0
        self.served_device: str | None = None  # where the worker's model is, as it reports after a load
        self.served_compiled: bool | None = None  # whether its last generation ran the compiled decode step

    # --- weights -----------------------------------------------------------------------------

    def push(self, model: Any, version: int) -> None:
        """Copy ``model``'s weights into the shared buffer as ``version`` and have the worker load them."""
        self.check.pushed(version, probe_logprobs(model, self.probe))
        weights = policy_weights(model)
        if self.mode == "pipelined":
            while self._unacked:  # the buffer still holds a version the worker has not loaded
                self._receive(block=True)
            self._copy(weights)
            self._unacked.append(version)
            self.cmd.put(("load", version))
        else:
            with self.lock:
                self._copy(weights)
                self.version.value = version
            self._unacked.append(version)

    def _copy(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, buf in self.buffer.items():
                buf.copy_(weights[k])

    # --- requests ------------------------------------------------------------------------------

    def submit(self, prompts: list[list[int]], requests: list[Any], params: Any, min_version: int) -> int:
        """Queue a ``generate_requests`` call; returns its ticket for ``result``."""
        self._tickets += 1
        self.cmd.put(("gen", self._tickets, prompts, requests, params, min_version))
        return self._tickets

    def result(self, ticket: int) -> tuple[int, list, float]:
        """(version that sampled it, trajectories per prompt, seconds the worker spent) of ``ticket``."""
        while ticket not in self._done:
            self._receive(block=True)
        return self._done.pop(ticket)

    def rng(self) -> dict[str, torch.Tensor]:
        """The worker's sampling RNG: {"cpu": state}, plus "cuda" when it samples on a GPU."""
        self.cmd.put(("rng",))
        while "rng" not in self._done:
            self._receive(block=True)
        return self._done.pop("rng")

    def set_rng(self, state: dict[str, torch.Tensor] | torch.Tensor) -> None:
        self.cmd.put(("set_rng", state))

    def _receive(self, block: bool) -> None:
        try:
            msg = self.res.get(timeout=1.0) if block else self.res.get_nowait()
        except queue.Empty:
            if not self.proc.is_alive():
                raise RuntimeError(f"the rollout worker process died (exit code {self.proc.exitcode})") from None
            return
        kind = msg[0]
        if kind == "error":
            raise RuntimeError(f"the rollout worker failed: {msg[1]}")
        if kind == "loaded":
            _, version, got, lp, self.served_device = msg
            if self.mode == "free":  # the worker loads the newest push; those it skipped are not checked
                self.check.expected = {v: e for v, e in self.check.expected.items() if v >= got}
                self._unacked = [v for v in self._unacked if v > got]
                version = got
            else:
                self._unacked.remove(version)
            self.check.served(version, got, lp)
        elif kind == "gen":
            _, ticket, version, out, busy, self.served_compiled = msg
            self.worker_busy_s += busy
            self._done[ticket] = (version, out, busy)
        elif kind == "rng":
            self._done["rng"] = msg[1]

    def close(self) -> None:
        """Stop the worker; terminate it when it does not stop by itself (no orphan process)."""
        if self.proc is None:
            return
        try:
            self.cmd.put(("stop",))
            self.proc.join(timeout=10)
        finally:
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.proc = None


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What the worker samples with: ``kind`` hf (``batch_size``, ``compile``) or vllm (the
    model's ``path`` for its architecture and tokenizer, ``gpu_memory_utilization``)."""

    kind: str
    batch_size: int
    compile: bool
    path: str
    gpu_memory_utilization: float


class _HFWorkerEngine:
    """The HF model the worker samples with: ``generate`` (the engine protocol), ``load``, ``probe_logprobs``."""

    def __init__(self, config: Any, tokenizer: Any, dtype: torch.dtype, device: str, spec: EngineSpec):
        from transformers import AutoModelForCausalLM

        from .hf import HFRolloutEngine

        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
        self.params = dict(self.model.named_parameters())
        self.engine = HFRolloutEngine(self.model, tokenizer, batch_size=spec.batch_size, compile=spec.compile)
        self.device = str(next(self.model.parameters()).device)

    @property
    def compile(self) -> bool:  # False once a failed compilation fell back to eager
        return self.engine.compile

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        if set(self.params) != set(weights):
            raise RuntimeError(f"weights the trainer pushes ({len(weights)}) do not match the worker's model ({len(self.params)})")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(weights[k])

    def probe_logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        return probe_logprobs(self.model, ids)

    def generate(self, prompts: list[list[int]], params: Any, *, progress: bool = False) -> list:
        return self.engine.generate(prompts, params, progress=progress)


def _only_gpu(device: str) -> str:
    """Make ``device`` (cuda:N of the trainer's numbering) this process's only visible GPU, before
    anything touches CUDA here, so vLLM puts everything on it; its name here becomes cuda:0."""
    import os

    index = torch.device(device).index or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(index + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index]
    return "cuda:0"


def _main(config, tokenizer, buffer, cmd, res, lock, version, mode, threads, seed, spec, probe, device) -> None:
    """The worker process: load, generate, report, until ``stop``."""
    import multiprocessing
    import signal
    import traceback

    from ..threads import limit_worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle: it saves, then stops us
    limit_worker(threads)
    try:
        from . import generate_requests

        dtype = next(iter(buffer.values())).dtype
        torch.manual_seed(seed)  # CUDA's generator is seeded when CUDA starts: after _only_gpu
        if spec.kind == "vllm":
            from .vllm_engine import VLLMWorkerEngine

            served, device = device, _only_gpu(device)
            engine: Any = VLLMWorkerEngine(spec.path, tokenizer, dtype, spec.gpu_memory_utilization, seed)
        else:
            engine = _HFWorkerEngine(config, tokenizer, dtype, device, spec)
            served = engine.device
        loaded = -1

        def load(v: int) -> None:
            nonlocal loaded
            engine.load(buffer)
            loaded = v
            res.put(("loaded", v, loaded, engine.probe_logprobs(probe), served))

        parent = multiprocessing.parent_process()
        while True:
            try:
                msg = cmd.get(timeout=5.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():  # the trainer was killed: do not outlive it
                    break
                continue
            if msg[0] == "stop":
                break
            if msg[0] == "load":
                load(msg[1])
            elif msg[0] == "rng":
                res.put(("rng", _rng_state(device)))
            elif msg[0] == "set_rng":
                _set_rng_state(msg[1], device)
            elif msg[0] == "gen":
                _, ticket, prompts, requests, sp, min_version = msg
                while mode == "free":  # pacing: sample with the newest weights, never older than min_version
                    with lock:
                        if version.value > loaded:
                            load(version.value)
                    if loaded >= min_version:
                        break
                    time.sleep(0.01)
                t = time.perf_counter()
                out = generate_requests(engine, prompts, requests, sp, eos_id=tokenizer.eos_token_id,
                                        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
                res.put(("gen", ticket, loaded, out, time.perf_counter() - t, engine.compile))
    except BaseException:
        res.put(("error", traceback.format_exc(limit=-3).strip().splitlines()[-1]))


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    """What draws the worker's tokens: the CPU generator, and on a GPU that GPU's (the sampling
    noise is drawn on the logits' device), so a resumed GPU run continues the same stream."""
    state = {"cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor] | torch.Tensor, device: str) -> None:
    if isinstance(state, torch.Tensor):  # a checkpoint written before the GPU state was kept
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
