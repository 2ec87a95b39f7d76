"""The training loop, top to bottom.

    for each rollout step:
        sample prompts → rollout → compose_group → verify → route_group → build rows
        → compute_advantage → (π_old, π_ref log-probs when needed)
        → for each epoch, mini-batch: micro-batches → loss hooks → backward → optimizer step
        → log, checkpoint

Algorithms change the step only through hooks (``hookspecs.py``); nothing here knows HPT from
LUFFY.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from . import checkpoint as ckpt
from .batching import build_train_batch, micro_batch_rows, minibatches, totals_of, trim_padding
from .config import RunConfig
from .data import DataError, PromptSampler, load_examples, render_prompt
from .evaluate import evaluate_accuracy
from .logging import RunLogger, progress
from .metrics import Metrics
from .plugins import build_registry
from .loss import micro_batch_loss
from .rollout import SamplingParams, hf_engine
from .train.forward import logprobs_in_micro_batches
from .types import Example, PromptGroup, Trajectory, TrainBatch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Engine:
    """One stage of a run: a model, an algorithm, a data stream, a run directory."""

    def __init__(self, config: RunConfig, algo: Any, pm: Any, run_dir: Path, resolved: dict):
        self.cfg, self.algo, self.pm, self.run_dir = config, algo, pm, Path(run_dir)
        self.resolved = resolved
        self.hook = pm.hook
        self.needs = self.hook.requirements(config=algo)
        self.device = _device(config.trainer.device)
        seed_everything(config.trainer.seed)

        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(config.model.path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = getattr(torch, config.model.dtype)
        resume_from = ckpt.latest_checkpoint(self.run_dir) if config.resume == "auto" else None
        self.model = AutoModelForCausalLM.from_pretrained(resume_from or config.model.path, dtype=dtype).to(self.device)
        if config.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.train()
        self.reference = None
        if self.needs.reference or self.needs.reference_vocab:
            # The stage's initial weights, also after a resume: π_ref must not drift.
            self.reference = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=dtype).to(self.device).eval()
            self.reference.requires_grad_(False)

        self.updates_per_step = self._updates_per_rollout_step()
        backends = build_registry(pm, "register_trainer_backends")
        self.backend = _pick(backends, config.trainer.backend, "trainer.backend")(self.model, config.trainer, config.trainer.steps)
        self.rollout = None
        if self.needs.rollouts:
            engines = build_registry(pm, "register_rollout_engines")
            self.rollout = _pick(engines, config.rollout.engine, "rollout.engine")(self.model, self.tokenizer, config.rollout)
        verifiers = build_registry(pm, "register_verifiers")
        self.verifier_factory = _pick(verifiers, config.verifier.name, "verifier.name")
        self._verifier_obj = None  # worker processes start on first use

        d = config.data
        self.examples = load_examples(d.train, prompt_key=d.prompt_key, answer_key=d.answer_key, demo_keys=list(d.demo_keys))
        self.eval_examples = None
        if d.eval and config.eval.enabled:
            self.eval_examples = load_examples(d.eval, prompt_key=d.prompt_key, answer_key=d.answer_key, demo_keys=list(d.demo_keys))
        self.sampler = PromptSampler(self.examples, config.trainer.prompts_per_step, config.trainer.seed, d.shuffle)
        self.max_len = float(algo.loss_max_len or config.rollout.max_new_tokens) if hasattr(algo, "loss_max_len") else float(config.rollout.max_new_tokens)
        self._prompt_cache: dict[str, list[int]] = {}

        self.step = 0
        if resume_from is not None:
            state, rng = ckpt.load_checkpoint_state(resume_from)
            self.backend.load_state_dict(state["backend"])
            self.sampler.load_state_dict(state["sampler"])
            self.step = state["step"]
            ckpt.set_rng_state(rng)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(resolved), self.run_dir / "config.yaml")
        self.logger = RunLogger(self.run_dir, config.logging, resolved, resume_step=self.step if resume_from else None)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train to ``trainer.steps``; returns the final checkpoint directory (HF format)."""
        cfg = self.cfg
        self.hook.on_train_start(config=self.resolved, run_dir=str(self.run_dir))
        try:
            if self.step == 0 and self.eval_examples:
                self.logger.log(0, self.evaluate())
            while self.step < cfg.trainer.steps:
                start = self.step
                metrics = self.train_step()
                if self.eval_examples and cfg.eval.every and _crossed(start, self.step, cfg.eval.every) and self.step < cfg.trainer.steps:
                    metrics.update(self.evaluate())
                if self.step >= cfg.trainer.steps and self.eval_examples:
                    metrics.update(self.evaluate())
                self.logger.log(self.step, metrics)
                self.hook.on_step_end(step=self.step, metrics=dict(metrics))
                if cfg.save_every and _crossed(start, self.step, cfg.save_every) and self.step < cfg.trainer.steps:
                    self.save()
            final = ckpt.latest_checkpoint(self.run_dir)
            if final is None or ckpt.checkpoint_step(final) != self.step:
                final = self.save()
            return final
        finally:
            self.hook.on_train_end(run_dir=str(self.run_dir))
            self.logger.close()
            if self._verifier_obj is not None:
                self._verifier_obj.close()

    def train_step(self) -> dict[str, float]:
        """One rollout step and the optimizer steps it feeds."""
        t0 = time.perf_counter()
        m = Metrics()
        step = self.step
        groups = [self.make_group(ex) for ex in self.sampler.next_batch()]

        if self.needs.rollouts:
            r = self.cfg.rollout
            params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
            t_roll = time.perf_counter()
            for g, trajs in zip(groups, self.rollout.generate([g.prompt_ids for g in groups], params, progress=self._bars)):
                g.members = trajs
            _rollout_metrics(groups, time.perf_counter() - t_roll, m)

        groups = [self.hook.compose_group(group=g, config=self.algo, step=step, metrics=m) for g in groups]
        self.verify(groups, m)
        self.hook.on_rollout_end(groups=groups, step=step, metrics=m)
        routes = [self.hook.route_group(group=g, config=self.algo, step=step, metrics=m) for g in groups]
        for kind in ("rl", "sft", "mix", "drop"):
            m.log(f"route/{kind}", sum(r.kind == kind for r in routes) / len(routes))

        batch = build_train_batch(groups, routes, self.tokenizer.pad_token_id)
        if batch is None:  # every prompt dropped (e.g. DYPO on an all-easy batch): no gradient, step counted
            m.log("train/empty_batch", 1.0)
            self.step += self.updates_per_step
            return {**m.summary(), "time/step_s": time.perf_counter() - t0}
        m.log("train/rows", len(batch))
        m.log("train/offline_data_ratio", float(batch.off_policy.float().mean()))
        batch.advantages = self.hook.compute_advantage(batch=batch, config=self.algo, step=step, metrics=m)
        batch = self._fill_logprobs(batch)

        t_train, n_tokens = time.perf_counter(), 0
        for _ in range(self.cfg.trainer.ppo_epochs):
            for mb in minibatches(batch, self.cfg.trainer.prompts_per_minibatch):
                n_tokens += int(mb.attention_mask.sum())
                self.update(mb, m)
                self.step += 1
        m.log("time/train_s", time.perf_counter() - t_train)
        m.log("perf/train_tokens_per_s", n_tokens / max(1e-9, time.perf_counter() - t_train))
        if self.rollout is not None:
            self.rollout.sync_weights(self.backend.model)
        return {**m.summary(), "time/step_s": time.perf_counter() - t0}

    def update(self, mb: TrainBatch, m: Metrics) -> None:
        """One optimizer step on a mini-batch, accumulated over micro-batches."""
        rows = micro_batch_rows(mb, self.cfg.trainer.micro_batch_tokens, self.needs.whole_groups)
        totals = totals_of(mb, self.max_len, len(rows))
        losses: dict[str, float] = {}
        for r in progress(rows, desc="train", enabled=self._bars):
            micro = trim_padding(mb.select(r)).with_(totals=totals).to(self.device)
            terms, stats = self.micro_loss(micro, m)
            loss = sum(t.value for t in terms)
            self.backend.backward(loss)
            for t in terms:  # term values are normalised by mini-batch totals, so they add up
                losses[f"loss/{t.name}"] = losses.get(f"loss/{t.name}", 0.0) + float(t.value.detach())
                for k, v in t.metrics.items():
                    m.log(k, v)
            for k, v in stats.items():
                m.log(k, v)
        for k, v in losses.items():
            m.log(k, v)
        m.log("loss/total", sum(losses.values()))
        grad_norm, skipped = self.backend.step()
        m.log("train/grad_norm", grad_norm)
        m.log("train/skipped_steps", float(skipped), reduce="sum")
        m.log("train/lr", self.backend.lr, reduce="last")

    def micro_loss(self, micro: TrainBatch, m: Metrics):
        # bf16 autocast on GPU only: CPU runs stay in fp32 so resumed runs reproduce exactly.
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return micro_batch_loss(self.hook, self.algo, self.step, self.backend.model, micro, m, needs=self.needs,
                                    reference=self.reference, temperature=self.cfg.rollout.temperature,
                                    chunk=self.cfg.trainer.logprob_chunk)

    # --- pieces --------------------------------------------------------------------------------

    def make_group(self, ex: Example) -> PromptGroup:
        if ex.uid not in self._prompt_cache:
            text = render_prompt(self.tokenizer, ex.prompt, template=self.cfg.data.template, system_prompt=self.cfg.data.system_prompt)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) > self.cfg.data.max_prompt_tokens:
                raise DataError(f"{ex.uid}: field '{self.cfg.data.prompt_key}' is {len(ids)} tokens after templating, "
                                f"over data.max_prompt_tokens={self.cfg.data.max_prompt_tokens}")
            self._prompt_cache[ex.uid] = ids
        demos = []
        for i, text in enumerate(ex.demonstrations):
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            cut = len(ids) >= self.cfg.data.max_demo_tokens
            ids = ids[: self.cfg.data.max_demo_tokens] if cut else ids + [self.tokenizer.eos_token_id]
            demos.append(Trajectory(response_ids=ids, text=text, off_policy=True, teacher=i, finished=not cut))
        return PromptGroup(example=ex, prompt_ids=self._prompt_cache[ex.uid], demonstrations=demos)

    @property
    def _verifier(self):
        if self._verifier_obj is None:
            self._verifier_obj = self.verifier_factory(self.cfg.verifier)
        return self._verifier_obj

    def verify(self, groups: list[PromptGroup], m: Metrics) -> None:
        todo = [(mem, g.example.answer) for g in groups for mem in g.members if mem.reward is None]
        if not todo:
            return
        t = time.perf_counter()
        results = self._verifier.verify([(mem.text, gold) for mem, gold in todo])
        for (mem, _), res in zip(todo, results):
            mem.reward, mem.verify_status = res.reward, res.status
        m.log("verify/timeouts", sum(r.status == "timeout" for r in results), reduce="sum")
        m.log("verify/errors", sum(r.status == "error" for r in results), reduce="sum")
        m.log("time/verify_s", time.perf_counter() - t)
        on = [mem.reward for g in groups for mem in g.members if not mem.off_policy]
        if on:
            m.log("reward/mean", sum(on) / len(on))
            m.log("reward/accuracy", sum(r > 0.5 for r in on) / len(on))
            m.log("reward/solved_prompts", sum(g.num_correct() > 0 for g in groups) / len(groups))
        off = [mem.reward for g in groups for mem in g.members if mem.off_policy]
        if off:
            m.log("reward/off_policy_mean", sum(off) / len(off))

    def _fill_logprobs(self, batch: TrainBatch) -> TrainBatch:
        """π_old is needed when one rollout feeds several updates; π_ref when asked for."""
        rows = micro_batch_rows(batch, self.cfg.trainer.micro_batch_tokens, self.needs.whole_groups)
        T, chunk = self.cfg.rollout.temperature, self.cfg.trainer.logprob_chunk
        if self.updates_per_step > 1:
            batch.old_logprobs = logprobs_in_micro_batches(self.backend.model, batch, rows, temperature=T, chunk=chunk)
        if self.needs.reference:
            batch.ref_logprobs = logprobs_in_micro_batches(self.reference, batch, rows, temperature=T, chunk=chunk)
        return batch

    def _updates_per_rollout_step(self) -> int:
        t = self.cfg.trainer
        per = 1 if t.prompts_per_minibatch is None else t.prompts_per_step // t.prompts_per_minibatch
        return per * t.ppo_epochs

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy, with its own RNG so evaluating never changes training."""
        e = self.cfg.eval
        examples = self.eval_examples[: e.max_prompts] if e.max_prompts else self.eval_examples
        params = SamplingParams(n=e.n, temperature=e.temperature, top_p=e.top_p,
                                max_new_tokens=e.max_new_tokens or self.cfg.rollout.max_new_tokens)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.trainer.seed + 1_000_003)
            generator = self.rollout or hf_engine(self.backend.model, self.tokenizer, self.cfg.rollout)
            return evaluate_accuracy(generator, examples, self._verifier, params,
                                     prompt_fn=lambda ex: self.make_group(ex).prompt_ids, progress=self._bars)

    def save(self) -> Path:
        state = {"step": self.step, "backend": self.backend.state_dict(), "sampler": self.sampler.state_dict()}
        return ckpt.save_checkpoint(self.run_dir, self.step, model=self.backend.model, tokenizer=self.tokenizer,
                                    trainer_state=state, keep_last=self.cfg.keep_checkpoints)

    @property
    def _bars(self) -> bool:
        return self.cfg.logging.progress


def _rollout_metrics(groups: list[PromptGroup], seconds: float, m: Metrics) -> None:
    trajs = [t for g in groups for t in g.members]
    tokens = sum(len(t.response_ids) for t in trajs)
    m.log("rollout/response_length", tokens / max(1, len(trajs)))
    m.log("rollout/truncated", sum(not t.finished for t in trajs) / max(1, len(trajs)))
    m.log("time/rollout_s", seconds)
    m.log("perf/rollout_tokens_per_s", tokens / max(1e-9, seconds))


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def _pick(registry: dict, name: str, key: str):
    if name not in registry:
        raise KeyError(f"{key}: '{name}' is not registered. Available: {', '.join(sorted(registry))}")
    return registry[name]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
