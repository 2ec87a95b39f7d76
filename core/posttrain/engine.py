"""The training loop, top to bottom.

    for each rollout step:
        plan_step → draw prompts (+ data.offline, add_groups) → rollout_requests → rollout
        → compose_group → verify → select_groups (→ more prompts, same step) → on_rollout_end
        → route_group → build rows → (π_old, π_ref log-probs when needed) → compute_advantage
        → for each epoch, mini-batch: (statistics) → micro-batches → loss hooks → backward
        → optimizer step → log, checkpoint

ZeRO's rule that every rank makes the same forward/backward calls lives in ``train/lockstep.py``.

Algorithms change the step only through hooks (``hookspecs.py``); nothing here knows HPT from
LUFFY.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import guards, interrupt, stage_state, threads
from .batching import build_train_batch, charge_per_pass, micro_batch_rows, minibatches, totals_of, trim_padding
from .config import RunConfig
from .data import PromptSampler, load_examples, render_prompt
from .eval.heldout import evaluate_in_training
from .logging import NullLogger, RunLogger, on_terminal, progress
from .lora import build_models
from .metrics import Metrics, log_rewards, log_rollouts
from .plugins import build_registry, pick
from .loss import add_statistics, finish_statistics, micro_batch_loss
from .rollout import SamplingParams, generate_requests
from .train import async_loop, lockstep
from .train.forward import logprobs_in_micro_batches
from .types import Example, GroupSelection, PromptGroup, RolloutRequest, StepPlan, Totals, Trajectory, TrainBatch


class Engine:
    """One stage of a run: a model, an algorithm, a data stream, a run directory."""

    def __init__(self, config: RunConfig, algo: Any, pm: Any, run_dir: Path, resolved: dict):
        self.cfg, self.algo, self.pm, self.run_dir = config, algo, pm, Path(run_dir)
        self.resolved = resolved
        self.hook = pm.hook
        self.needs = self.hook.requirements(config=algo)
        # One process per GPU under torchrun / the deepspeed launcher: this rank's device and seed.
        self.device = dist_utils.device_for_rank(config.trainer.device)
        self.world = dist_utils.world_size()
        dist_utils.check_world(config, self.world)
        dist_utils.init(self.device)
        dist_utils.seed_everything(config.trainer.seed)

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(config.model.path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        resume_from = ckpt.latest_checkpoint(self.run_dir) if config.resume == "auto" else None
        self.model, self.reference = build_models(config, device=self.device, resume_from=resume_from,
                                                  needs_reference=self.needs.reference or self.needs.reference_vocab)
        self._pass_cost = charge_per_pass(config.trainer.micro_batch_tokens, self.device, self.model)  # for micro_batch_rows
        self.guard = guards.NonFiniteGuard(config.trainer.max_skipped_steps, self.model, str(resume_from or config.model.path))

        self.updates_per_step = self._updates_per_rollout_step()
        backends = build_registry(pm, "register_trainer_backends")
        self.backend = pick(backends, config.trainer.backend, "trainer.backend")(self.model, config.trainer, config.trainer.steps)
        if self.reference is not None and hasattr(self.backend, "prepare_reference"):
            # ZeRO-3: partitioned too (its head whole when a full-vocabulary loss reads it per chunk)
            self.reference = self.backend.prepare_reference(self.reference, full_head=self.needs.reference_vocab)
        self.sampling_params = SamplingParams(**{k: getattr(config.rollout, k) for k in ("n", "temperature", "top_p", "top_k", "max_new_tokens")})
        self.rollout = self.async_rollouts = None
        if self.needs.rollouts:
            engines = build_registry(pm, "register_rollout_engines")
            self.rollout = pick(engines, async_loop.trainer_engine(config.rollout), "rollout.engine")(self.model, self.tokenizer, config.rollout)
        self.async_rollouts = async_loop.AsyncRollouts(self) if self.rollout is not None and config.rollout.max_staleness else None  # sampled ahead, in a worker
        verifiers = build_registry(pm, "register_verifiers")
        self.verifier_factory = pick(verifiers, config.verifier.name, "verifier.name")
        self._verifier_obj = None  # worker processes start on first use

        d = config.data
        self.examples = load_examples(d.train, prompt_key=d.prompt_key, answer_key=d.answer_key, demo_keys=list(d.demo_keys))
        self.eval_examples = None
        if d.eval and config.eval.enabled:
            self.eval_examples = load_examples(d.eval, prompt_key=d.prompt_key, answer_key=d.answer_key, demo_keys=list(d.demo_keys))
        # Evaluate when there is something to score: the held-out split and/or eval.benchmarks.
        self._evaluates = config.eval.enabled and bool(self.eval_examples or config.eval.benchmarks)
        self.sampler = PromptSampler(self.examples, config.trainer.prompts_per_step, config.trainer.seed, d.shuffle)
        self.offline_sampler = None
        if d.offline and d.offline_per_step:  # a second stream (expert data), its own order
            offline = load_examples(d.offline, prompt_key=d.prompt_key, answer_key=d.answer_key, demo_keys=list(d.demo_keys))
            self.offline_sampler = PromptSampler(offline, d.offline_per_step, config.trainer.seed + 1, d.shuffle)
        self.max_len = float(algo.loss_max_len or config.rollout.max_new_tokens) if hasattr(algo, "loss_max_len") else float(config.rollout.max_new_tokens)
        self._prompt_cache: dict[str, list[int]] = {}
        self.prompt_fit = guards.PromptFit(config, self.model.config, self.needs.rollouts)

        self.step = stage_state.restore(self, resume_from) if resume_from is not None else 0
        self._saved_step = self.step if resume_from is not None else None
        self.logger: Any = NullLogger()
        if dist_utils.is_main():  # one writer: rank 0 logs, saves the config, talks to wandb
            self.run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create(resolved), self.run_dir / "config.yaml")
            self.logger = RunLogger(self.run_dir, config.logging, resolved, resume_step=self.step if resume_from else None)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train to ``trainer.steps``; returns the final checkpoint directory (HF format)."""
        cfg = self.cfg
        self.hook.on_train_start(config=self.resolved, run_dir=str(self.run_dir))
        try:
            if self.step == 0 and self._evaluates:
                self.logger.log(0, self.evaluate())
            while self.step < cfg.trainer.steps:
                start = self.step
                metrics = self.train_step()
                if self._evaluates and cfg.eval.every and _crossed(start, self.step, cfg.eval.every) and self.step < cfg.trainer.steps:
                    metrics.update(self.evaluate())
                if self.step >= cfg.trainer.steps and self._evaluates:
                    metrics.update(self.evaluate())
                self.logger.log(self.step, metrics)
                self.hook.on_step_end(step=self.step, metrics=dict(metrics))
                if cfg.save_every and _crossed(start, self.step, cfg.save_every) and self.step < cfg.trainer.steps:
                    self.save()
                if interrupt.requested():  # SIGINT/SIGTERM: the save below makes the checkpoint to resume from
                    break
            # Decided from our own record, not by listing the directory: every rank must agree
            # (the ZeRO-3 save is collective) and only rank 0 touches the checkpoints.
            self.guard.finish()
            final = self.save() if self._saved_step != self.step else self._checkpoint_path(self.step)
            dist_utils.barrier()
            return final
        except BaseException:
            dist_utils.mark_failed()
            raise
        finally:
            self.hook.on_train_end(run_dir=str(self.run_dir))
            self.logger.close()
            if self._verifier_obj is not None:
                self._verifier_obj.close()
            if self.async_rollouts is not None:
                self.async_rollouts.close()

    def train_step(self) -> dict[str, float]:
        """One rollout step and the optimizer steps it feeds."""
        t0 = time.perf_counter()
        m = Metrics()
        m.log("perf/threads", threads.adapt(), reduce="max")  # fewer while other programs use the cores (trainer.threads: auto)
        step = self.step
        groups = self.step_groups(m)
        routes = [self.hook.route_group(group=g, config=self.algo, step=step, metrics=m) for g in groups]
        for kind in ("rl", "sft", "mix", "drop"):
            m.log(f"route/{kind}", sum(r.kind == kind for r in routes) / max(1, len(routes)))

        batch = build_train_batch(groups, routes, self.tokenizer.pad_token_id)
        # L_max and the step's totals (all ranks) are known before advantages: DAPO's overlong shaping reads them.
        step_totals = dist_utils.sum_dataclass(totals_of(batch, self.max_len) if batch is not None else Totals(max_len=self.max_len))
        if dist_utils.max_int(int(batch is not None)) == 0:  # every prompt dropped (e.g. DYPO on an all-easy batch), on every rank
            m.log("train/empty_batch", 1.0)
            self.step += self.updates_per_step
            return dist_utils.reduce_metrics({**m.summary(), "time/step_s": time.perf_counter() - t0})
        batch = self._fill_logprobs(batch)  # before advantages: KL in the reward reads π_ref (and π_old)
        if batch is not None:
            batch = batch.with_(totals=step_totals)
            m.log("train/rows", len(batch))
            m.log("train/offline_data_ratio", float(batch.off_policy.float().mean()))
            batch.advantages = self.hook.compute_advantage(batch=batch, config=self.algo, step=step, metrics=m)

        t_train, n_tokens = time.perf_counter(), 0
        per_rank = None if self.cfg.trainer.prompts_per_minibatch is None else self.cfg.trainer.prompts_per_minibatch // self.world
        mbs = minibatches(batch, per_rank) if batch is not None else []
        n_updates = dist_utils.max_int(len(mbs))  # every rank takes part in every optimizer step
        for _ in range(self.cfg.trainer.ppo_epochs):
            for k in range(n_updates):
                mb = mbs[k] if k < len(mbs) else None
                n_tokens += int(mb.attention_mask.sum()) if mb is not None else 0
                self.update(mb, m)
                self.step += 1
        m.log("time/train_s", time.perf_counter() - t_train)
        m.log("train/tokens", n_tokens, reduce="sum")  # prompt + response tokens trained on (all epochs)
        m.log("perf/train_tokens_per_s", n_tokens / max(1e-9, time.perf_counter() - t_train))
        if self.rollout is not None:
            t_sync = time.perf_counter()
            self.rollout.sync_weights(self.backend.model)
            m.log("time/sync_s", time.perf_counter() - t_sync)
        if self.device.type == "cuda":
            m.log("mem/peak_gib", torch.cuda.max_memory_allocated(self.device) / 2**30, reduce="max")
        return dist_utils.reduce_metrics({**m.summary(), "time/step_s": time.perf_counter() - t0})

    def step_groups(self, m: Metrics) -> list[PromptGroup]:
        """The step's verified groups: planned, drawn, added, sampled, composed, verified, selected."""
        step, params = self.step, self.sampling_params
        if self.async_rollouts is None:
            n_prompts, sampling, fresh = self.plan_and_draw(step, m)
            fresh = self.sample(fresh, sampling, params, m)
        else:  # planned, drawn and sampled up to max_staleness steps ago (train/async_loop.py)
            n_prompts, sampling, fresh = self.async_rollouts.take(m)
            fresh = self.finish_groups(fresh, m)
        kept, target = [], n_prompts // self.world
        for rounds in range(1, self.cfg.trainer.max_sampling_rounds + 1):
            selection = self.hook.select_groups(groups=kept + fresh, target=target, config=self.algo, step=step,
                                                metrics=m) or GroupSelection(kept + fresh)
            kept, more = list(selection.groups), dist_utils.max_int(selection.more)  # every rank draws alike
            if more <= 0:
                break
            if rounds == self.cfg.trainer.max_sampling_rounds:
                m.log("plan/rounds_capped", 1.0)
                break
            fresh = self.sample(self.draw(self.sampler, more * self.world, "train", m), sampling, params, m)
        m.log("plan/rounds", float(rounds))
        m.log("plan/groups", float(len(kept)))
        if self.async_rollouts is not None:  # trained vs generated response lengths
            self.async_rollouts.log_trained(kept, m)
        self.hook.on_rollout_end(groups=kept, step=step, metrics=m)
        return kept

    def plan_and_draw(self, step: int, m: Metrics) -> tuple[int, bool, list[PromptGroup]]:
        """(prompts asked for, whether to sample, the groups): plan_step, drawn prompts, data.offline, add_groups."""
        plan = self.hook.plan_step(config=self.algo, step=step, metrics=m) or StepPlan()
        n_prompts = self.cfg.trainer.prompts_per_step if plan.prompts is None else plan.prompts
        fresh = self.draw(self.sampler, n_prompts, "train", m)
        if self.offline_sampler is not None:
            fresh += self.draw(self.offline_sampler, self.cfg.data.offline_per_step, "offline", m)
        for added in self.hook.add_groups(config=self.algo, step=step, metrics=m, make_group=self.make_group):
            fresh += list(added or [])
        return n_prompts, self.needs.rollouts and plan.rollouts, fresh

    def draw(self, sampler: PromptSampler, n: int, source: str, m: Metrics) -> list[PromptGroup]:
        # Every rank draws the same prompts and keeps every world-th one (distributed.py explains why).
        drawn = [self.make_group(ex, source) for ex in sampler.next_batch(n)[dist_utils.rank()::self.world]] if n else []
        return self.prompt_fit.drop_skipped(drawn, m)  # data.overlong_prompt: skip

    def sample(self, groups: list[PromptGroup], sampling: bool, params: SamplingParams, m: Metrics) -> list[PromptGroup]:
        """Roll out what ``rollout_requests`` asks for, then compose and verify every group."""
        if self.rollout is not None:
            requests = self.requests(groups, sampling, params, self.step, m)
            todo = [i for i, q in enumerate(requests) if q.n > 0]
            if dist_utils.max_int(len(todo)) > 0:  # HF generate under ZeRO-3 is collective: all ranks or none
                t_roll = time.perf_counter()
                out = generate_requests(self.rollout, [groups[i].prompt_ids for i in todo], [requests[i] for i in todo],
                                        params, eos_id=self.tokenizer.eos_token_id, progress=self._bars,
                                        decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
                for i, trajs in zip(todo, out):
                    groups[i].members = trajs
                log_rollouts([groups[i] for i in todo], time.perf_counter() - t_roll, m)
        return self.finish_groups(groups, m)

    def requests(self, groups: list[PromptGroup], sampling: bool, params: SamplingParams, step: int, m: Metrics) -> list[RolloutRequest]:
        defaults = [RolloutRequest(n=params.n if sampling and g.source == "train" and not g.members else 0) for g in groups]
        requests = self.hook.rollout_requests(groups=groups, requests=defaults, config=self.algo, step=step, metrics=m) or defaults
        if len(requests) != len(groups):
            raise ValueError(f"rollout_requests returned {len(requests)} requests for {len(groups)} groups")
        return requests

    def finish_groups(self, groups: list[PromptGroup], m: Metrics) -> list[PromptGroup]:
        """Sampled groups composed and verified; reward metrics; the verifier timeout policy."""
        groups = [self.hook.compose_group(group=g, config=self.algo, step=self.step, metrics=m) for g in groups]
        self.verify(groups, m)
        log_rewards(groups, m)  # everything sampled, also what select_groups or the timeout policy drop
        return guards.apply_timeout_policy(groups, self.cfg.verifier.on_timeout, m)

    def update(self, mb: TrainBatch | None, m: Metrics) -> None:
        """One optimizer step on a mini-batch, accumulated over micro-batches.

        With several ranks, ``mb`` is this rank's part of the mini-batch (None: it has no rows
        this time). Totals are summed over ranks, so each rank's terms are its share of the
        mini-batch loss; a rank with fewer micro-batches runs zero-loss passes (``lockstep``).
        """
        rows = micro_batch_rows(mb, self.cfg.trainer.micro_batch_tokens, self.needs.whole_groups, pass_cost=self._pass_cost) if mb is not None else []
        n_micro = dist_utils.max_int(len(rows))
        totals = dist_utils.sum_dataclass(totals_of(mb, self.max_len, len(rows)) if mb is not None
                                            else Totals(max_len=self.max_len, micro_batches=0))
        stats = self._minibatch_stats(mb, rows, n_micro) if self.needs.minibatch_stats else {}
        losses: dict[str, float] = {}
        for i in progress(range(n_micro), desc="train", enabled=self._bars):
            if i >= len(rows):
                loss_of = lambda micro: sum(t.value for t in self.micro_loss(micro.with_(stats=stats), Metrics())[0])  # noqa: E731
                self.backend.backward(lockstep.zero_loss(mb, rows, totals, self.device, loss_of, self._idle))
                continue
            micro = trim_padding(mb.select(rows[i])).with_(totals=totals, stats=stats).to(self.device)
            terms, diag = self.micro_loss(micro, m)
            loss = sum(t.value for t in terms)
            self.backend.backward(loss)
            for t in terms:  # term values are normalised by mini-batch totals, so they add up
                losses[f"loss/{t.name}"] = losses.get(f"loss/{t.name}", 0.0) + float(t.value.detach())
                for k, v in t.metrics.items():
                    m.log(k, v)
            for k, v in diag.items():
                m.log(k, v)
        for k, v in losses.items():
            m.log(k, v)
        m.log("loss/total", sum(losses.values()))
        grad_norm, skipped = self.backend.step()
        self.guard.after_update(grad_norm, skipped, sum(losses.values()), m)
        m.log("train/grad_norm", grad_norm)
        m.log("train/skipped_steps", float(skipped), reduce="sum")
        m.log("train/lr", self.backend.lr, reduce="last")

    @torch.no_grad()
    def _minibatch_stats(self, mb: TrainBatch | None, rows: list, n_micro: int) -> dict[str, float]:
        """``minibatch_statistics`` of the current policy over the whole mini-batch, all ranks."""
        sums: dict[str, list[float]] = {}
        for i in range(n_micro):
            if i >= len(rows):
                self._idle()
                continue
            add_statistics(sums, self.hook, self.algo, self.step, self.backend.model, trim_padding(mb.select(rows[i])),
                           temperature=self.cfg.rollout.temperature, chunk=self.cfg.trainer.logprob_chunk)
        return finish_statistics(dist_utils.sum_dict(sums))

    def micro_loss(self, micro: TrainBatch, m: Metrics):
        # bf16 autocast on GPU only: CPU runs stay in fp32 so resumed runs reproduce exactly.
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return micro_batch_loss(self.hook, self.algo, self.step, self.backend.model, micro, m, needs=self.needs,
                                    reference=self.reference, temperature=self.cfg.rollout.temperature,
                                    chunk=self.cfg.trainer.logprob_chunk, is_cap=self.cfg.rollout.is_cap, is_mask=self.cfg.rollout.is_mask)

    # --- pieces --------------------------------------------------------------------------------

    def make_group(self, ex: Example, source: str = "buffer") -> PromptGroup:
        """A prompt and its demonstrations, tokenized (handed to ``add_groups`` as ``make_group``)."""
        if ex.uid not in self._prompt_cache:
            text = render_prompt(self.tokenizer, ex.prompt, template=self.cfg.data.template, system_prompt=self.cfg.data.system_prompt)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            self._prompt_cache[ex.uid] = self.prompt_fit(ids, ex.uid, self.cfg.data.prompt_key)
        demos = []
        for i, text in enumerate(ex.demonstrations):
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            cut = len(ids) >= self.cfg.data.max_demo_tokens
            ids = ids[: self.cfg.data.max_demo_tokens] if cut else ids + [self.tokenizer.eos_token_id]
            demos.append(Trajectory(response_ids=ids, text=text, off_policy=True, teacher=i, finished=not cut))
        return PromptGroup(example=ex, prompt_ids=self._prompt_cache[ex.uid], demonstrations=demos, source=source)

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
        results = guards.verify_within_budget(self._verifier, [(mem.text, gold) for mem, gold in todo], self.cfg.verifier.step_budget_s)
        for (mem, _), res in zip(todo, results):
            mem.reward, mem.verify_status = res.reward, res.status
        m.log("verify/timeouts", sum(r.status == "timeout" for r in results), reduce="sum")
        m.log("verify/errors", sum(r.status == "error" for r in results), reduce="sum")
        m.log("time/verify_s", time.perf_counter() - t)

    def _fill_logprobs(self, batch: TrainBatch | None) -> TrainBatch | None:
        """π_old is needed when one rollout feeds several updates; π_ref when asked for."""
        rows = micro_batch_rows(batch, self.cfg.trainer.micro_batch_tokens, self.needs.whole_groups, pass_cost=self._pass_cost) if batch is not None else []
        n = dist_utils.max_int(len(rows))
        T, chunk = self.cfg.rollout.temperature, self.cfg.trainer.logprob_chunk
        for wanted, model, field in ((self.updates_per_step > 1 or self.async_rollouts is not None, self.backend.model, "old_logprobs"),  # async: π_old ≠ π_sampling
                                     (self.needs.reference, self.reference, "ref_logprobs")):
            if not wanted:
                continue
            if batch is None:
                with torch.no_grad():
                    for _ in range(n):
                        self._idle(model, with_reference=False)
                continue
            setattr(batch, field, logprobs_in_micro_batches(model, batch, lockstep.padded(rows, n), temperature=T, chunk=chunk))
        return batch

    def _idle(self, model: Any = None, with_reference: bool = True) -> torch.Tensor:
        reference = self.reference if with_reference and self.needs.reference_vocab else None
        return lockstep.idle_forward(model or self.backend.model, self.tokenizer.pad_token_id, self.device,
                                     chunk=self.cfg.trainer.logprob_chunk, reference=reference)

    def _updates_per_rollout_step(self) -> int:
        t = self.cfg.trainer
        per = 1 if t.prompts_per_minibatch is None else t.prompts_per_step // t.prompts_per_minibatch
        return per * t.ppo_epochs

    def evaluate(self) -> dict[str, float]:
        return evaluate_in_training(self)

    def save(self) -> Path:
        path = stage_state.save(self)
        self._saved_step = self.step
        return path

    def _checkpoint_path(self, step: int) -> Path:
        return self.run_dir / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(step)

    @property
    def _bars(self) -> bool:
        return self.cfg.logging.progress and dist_utils.is_main() and on_terminal()  # no bars in a log file


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every
