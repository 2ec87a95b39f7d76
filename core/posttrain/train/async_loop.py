"""Asynchronous rollouts: step t trains while the rollouts of steps t+1 … t+k are sampled.

With ``rollout.max_staleness`` k ≥ 1 the engine's ``step_groups`` takes its first sampling round
from here instead of sampling it. Rollout step u (optimizer step u·U, U = updates per rollout
step) runs, in this order, on the trainer:

    take(u):  wait for u's rollouts (queued k steps ago) → push the current weights (version u·U)
              → produce(u + a): plan_step, draw, add_groups, rollout_requests, queue the request
              → hand u's groups to the engine (compose, verify, select, train)

with a = k − sync_every + 1 steps queued ahead (a = k in pipelined mode, where sync_every is 1).

The producer side (plan_step … rollout_requests) thus runs k steps ahead of the trainer side, in
the trainer process and in a fixed order, so plugin state, the data order and every RNG but the
worker's evolve the same way on every run. ``pipelined``: request u+k is sampled by exactly
version u·U (the push is ordered before it in the worker's FIFO), so step t trains on rollouts of
version (t−k)·U, bit for bit reproducible on CPU. ``free``: the worker samples with the newest
weights pushed to it, at most k versions older than the step that trains on them (the worker
waits for a new enough push: pacing); nothing is discarded.

Every trajectory carries ``policy_version``; ``take`` refuses one more than k·U versions old.
A checkpoint holds the queued steps' finished groups (the worker is drained first), the worker's
RNG and, through the engine, the data position: plain containers and tensors, no pickle.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from .. import distributed as dist_utils
from .. import threads
from ..metrics import Metrics, log_rollouts
from ..types import Example, PromptGroup, Trajectory


@dataclasses.dataclass
class Produced:
    """One rollout step's first sampling round, sampled ahead."""

    n_prompts: int
    sampling: bool
    groups: list[PromptGroup]
    todo: list[int]  # groups with a request
    ticket: int | None = None  # the worker's request; None once the members are in
    seconds: float = 0.0  # the worker's time on it


class AsyncRollouts:
    """The producer/consumer schedule and what is in flight (``engine.async_rollouts``)."""

    def __init__(self, engine: Any):
        from ..config import ConfigError

        if engine.world > 1:
            raise ConfigError([f"rollout.max_staleness: {engine.cfg.rollout.max_staleness} runs one rollout worker for one "
                               f"trainer process; this run has {engine.world}: set rollout.max_staleness=0"])
        self.e = engine
        r = engine.cfg.rollout
        self.k, self.mode, self.sync_every = r.max_staleness, r.async_mode, r.sync_every
        # Steps queued ahead: with a push every s steps the newest weights may be s−1 steps old
        # already, so k − s + 1 ahead keeps every trajectory within k versions.
        self.ahead = self.k - self.sync_every + 1
        self.pending: dict[int, Produced] = {}  # rollout step → its groups
        self.worker = None  # started by the first take
        self._rng: dict | torch.Tensor | None = None  # the worker's RNG from a checkpoint
        self._pushed = -1

    @property
    def per_step(self) -> int:
        return self.e.updates_per_step

    def take(self, m: Metrics) -> tuple[int, bool, list[PromptGroup]]:
        """(prompts asked for, sampling, groups) of the current rollout step, its members sampled."""
        u = self.e.step // self.per_step
        started = self._start(m)
        if started:  # a new worker serves no weights yet
            self._push(m)
        if not self.pending:  # a fresh start: the first steps are sampled by the initial weights
            for ahead in range(u, u + self.ahead):
                self._produce(ahead, m)
        item = self.pending.pop(u)
        t_wait = time.perf_counter()
        self._collect(item)
        m.log("async/wait_s", time.perf_counter() - t_wait)  # the trainer idling for rollouts
        if u % self.sync_every == 0:
            self._push(m)
        self._produce(u + self.ahead, m)
        self._check_staleness(item, m)
        log_rollouts([item.groups[i] for i in item.todo], item.seconds, m)
        lens = [len(t.response_ids) for i in item.todo for t in item.groups[i].members]
        if lens:
            m.log("async/generated_len_mean", sum(lens) / len(lens))
        return item.n_prompts, item.sampling, item.groups

    def log_trained(self, groups: list[PromptGroup], m: Metrics) -> None:
        """What is kept for training. Members sampled by the trainer itself, in a further
        ``select_groups`` round (DAPO's dynamic sampling), get the current version, so every sampled
        trajectory says which weights sampled it (``async/trainer_sampled``: their share). Response
        lengths next to async/generated_len_mean: a bias towards short responses (stale long ones
        discarded, which this loop never does) would show here."""
        sampled = [t for g in groups for t in g.members if not t.off_policy]
        here = [t for t in sampled if t.policy_version is None]
        for t in here:
            t.policy_version = self.e.step
        if sampled:
            m.log("async/trainer_sampled", len(here) / len(sampled))
        lens = [len(t.response_ids) for t in sampled]
        if lens:
            m.log("async/trained_len_mean", sum(lens) / len(lens))
            m.log("async/trained_len_max", max(lens), reduce="max")

    # --- producer side -------------------------------------------------------------------------

    def _produce(self, u: int, m: Metrics) -> None:
        e = self.e
        step = u * self.per_step  # the optimizer step that will train on it: what its hooks see
        n_prompts, sampling, groups = e.plan_and_draw(step, m)
        requests = e.requests(groups, sampling, e.sampling_params, step, m)
        todo = [i for i, q in enumerate(requests) if q.n > 0]
        item = Produced(n_prompts, sampling, groups, todo)
        if todo:
            min_version = max(0, step - self.k * self.per_step)  # free mode: the worker waits for it (pacing)
            item.ticket = self.worker.submit([groups[i].prompt_ids for i in todo], [requests[i] for i in todo],
                                             e.sampling_params, min_version)
        self.pending[u] = item

    def _collect(self, item: Produced) -> None:
        if item.ticket is None:
            return
        version, out, item.seconds = self.worker.result(item.ticket)
        for i, trajs in zip(item.todo, out):
            for t in trajs:
                t.policy_version = version
            item.groups[i].members = trajs
        item.ticket = None

    def _push(self, m: Metrics) -> None:
        if self._pushed == self.e.step:
            return
        t = time.perf_counter()
        self.worker.push(self.e.backend.model, self.e.step)
        self._pushed = self.e.step
        m.log("time/sync_s", time.perf_counter() - t)

    def _check_staleness(self, item: Produced, m: Metrics) -> None:
        ages = [self.e.step - t.policy_version for i in item.todo for t in item.groups[i].members
                if t.policy_version is not None]
        if not ages:
            return
        if max(ages) > self.k * self.per_step:
            raise RuntimeError(f"async rollouts: a trajectory of version {self.e.step - max(ages)} reached step "
                               f"{self.e.step}, more than rollout.max_staleness={self.k} rollout steps old")
        m.log("async/staleness_mean", sum(ages) / len(ages) / self.per_step)
        m.log("async/staleness_max", max(ages) / self.per_step, reduce="max")

    # --- the worker ------------------------------------------------------------------------------

    def _start(self, m: Metrics) -> bool:
        if self.worker is not None:
            return False
        from ..rollout.worker import RolloutWorker

        r = self.e.cfg.rollout
        if r.engine == "vllm":
            from ..rollout.vllm_engine import require_vllm

            require_vllm()  # here, in one line, rather than as the worker's first failure
        trainer, worker = thread_split(r.worker_threads)
        self._threads_before = threads.ceiling()
        threads.set_count(trainer)  # under auto, adaptation continues below the trainer's share
        e = self.e
        self.worker = RolloutWorker(e.backend.model, e.tokenizer, mode=self.mode, threads=worker,
                                    seed=e.cfg.trainer.seed + 7919, batch_size=r.batch_size,
                                    device=worker_device(r.worker_device, e.device), compile=r.compile,
                                    engine=r.engine, gpu_memory_utilization=r.gpu_memory_utilization)
        if self._rng is not None:
            self.worker.set_rng(self._rng)
        m.log("async/trainer_threads", trainer, reduce="last")
        m.log("async/worker_threads", worker, reduce="last")
        return True

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
            threads.set_count(self._threads_before)

    # --- checkpoint ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The queued steps' finished groups and the worker's RNG (waits for the worker to finish them)."""
        for item in self.pending.values():
            self._collect(item)
        rng = self.worker.rng() if self.worker is not None else self._rng
        return {"pending": {str(u): _plain(item) for u, item in self.pending.items()}, "worker_rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.pending = {int(u): _item(d) for u, d in state["pending"].items()}
        self._rng = state["worker_rng"]


def trainer_engine(rollout: Any) -> str:
    """The engine the trainer process keeps for what it samples itself (further ``select_groups``
    rounds, evaluation). With async vLLM that is the HF engine on the policy: vLLM runs in the
    worker, and a second vLLM engine in the trainer would take the same GPU memory again."""
    return "hf" if rollout.max_staleness and rollout.engine == "vllm" else rollout.engine


def worker_device(setting: str, trainer_device: torch.device) -> str:
    """``rollout.worker_device`` resolved: auto is the trainer's device (a GPU run samples on its GPU)."""
    if setting == "auto":
        return str(trainer_device)
    return str(dist_utils.device_for_rank(setting))


def thread_split(worker_threads: object) -> tuple[int, int]:
    """(trainer, worker) intra-op threads: the worker's share of the trainer's count, together within it."""
    total = threads.ceiling()
    worker = threads.parse(worker_threads, "rollout.worker_threads") or max(1, total // 2)
    return max(1, total - worker), worker


def _plain(item: Produced) -> dict:
    return {"n_prompts": item.n_prompts, "sampling": item.sampling, "todo": list(item.todo), "seconds": item.seconds,
            "groups": [dataclasses.asdict(g) for g in item.groups]}


def _item(d: dict) -> Produced:
    def group(g: dict) -> PromptGroup:
        return PromptGroup(example=Example(**g["example"]), prompt_ids=list(g["prompt_ids"]), source=g["source"],
                           members=[Trajectory(**t) for t in g["members"]],
                           demonstrations=[Trajectory(**t) for t in g["demonstrations"]])

    return Produced(int(d["n_prompts"]), bool(d["sampling"]), [group(g) for g in d["groups"]], list(d["todo"]),
                    seconds=float(d["seconds"]))
