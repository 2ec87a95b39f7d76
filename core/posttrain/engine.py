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

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import guards
from .batching import build_train_batch, micro_batch_rows, minibatches, totals_of, trim_padding
from .config import RunConfig
from .data import PromptSampler, load_examples, render_prompt
from .evaluate import evaluate_accuracy
from .logging import RunLogger, progress
from .metrics import Metrics
from .plugins import build_registry
from .loss import micro_batch_loss
from .rollout import SamplingParams, hf_engine
from .train.forward import logprobs_in_micro_batches, policy_outputs
from .types import Example, PromptGroup, Route, Totals, Trajectory, TrainBatch


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
        _check_world(config, self.world)
        dist_utils.init(self.device)
        dist_utils.seed_everything(config.trainer.seed)

        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(config.model.path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = getattr(torch, config.model.dtype)
        resume_from = ckpt.latest_checkpoint(self.run_dir) if config.resume == "auto" else None
        self.model = AutoModelForCausalLM.from_pretrained(resume_from or config.model.path, dtype=dtype).to(self.device)
        self.guard = guards.NonFiniteGuard(config.trainer.max_skipped_steps, self.model, str(resume_from or config.model.path))
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
        if self.reference is not None and hasattr(self.backend, "prepare_reference"):
            # ZeRO-3: partitioned too (its head whole when a full-vocabulary loss reads it per chunk)
            self.reference = self.backend.prepare_reference(self.reference, full_head=self.needs.reference_vocab)
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
        # Evaluate when there is something to score: the held-out split and/or eval.benchmarks.
        self._evaluates = config.eval.enabled and bool(self.eval_examples or config.eval.benchmarks)
        self.sampler = PromptSampler(self.examples, config.trainer.prompts_per_step, config.trainer.seed, d.shuffle)
        self.max_len = float(algo.loss_max_len or config.rollout.max_new_tokens) if hasattr(algo, "loss_max_len") else float(config.rollout.max_new_tokens)
        self._prompt_cache: dict[str, list[int]] = {}
        self.prompt_fit = guards.PromptFit(config, self.model.config, self.needs.rollouts)

        self.step = 0
        if resume_from is not None:
            state, rng = ckpt.load_checkpoint_state(resume_from)
            self.backend.load_state_dict(state["backend"])
            shards = self.run_dir / _SHARDS_DIR / resume_from.name
            if hasattr(self.backend, "load_shards") and shards.is_dir():
                self.backend.load_shards(shards)  # ZeRO: the optimizer moments each rank holds
            self.sampler.load_state_dict(state["sampler"])
            self.step = state["step"]
            own_rng = shards / _rank_rng_file(dist_utils.rank())
            ckpt.set_rng_state(ckpt.safe_load(own_rng) if own_rng.is_file() else rng)
        self._saved_step = self.step if resume_from is not None else None
        self.logger: Any = _NullLogger()
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

    def train_step(self) -> dict[str, float]:
        """One rollout step and the optimizer steps it feeds."""
        t0 = time.perf_counter()
        m = Metrics()
        step = self.step
        # Every rank draws the same prompts and keeps every world-th one (distributed.py explains why).
        groups = [self.make_group(ex) for ex in self.sampler.next_batch()[dist_utils.rank()::self.world]]
        groups = self.prompt_fit.drop_skipped(groups, m)

        if self.needs.rollouts:
            r = self.cfg.rollout
            params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
            t_roll = time.perf_counter()
            for g, trajs in zip(groups, self.rollout.generate([g.prompt_ids for g in groups], params, progress=self._bars)):
                g.members = trajs
            _rollout_metrics(groups, time.perf_counter() - t_roll, m)

        groups = [self.hook.compose_group(group=g, config=self.algo, step=step, metrics=m) for g in groups]
        self.verify(groups, m)
        groups = guards.apply_timeout_policy(groups, self.cfg.verifier.on_timeout, m)
        self.hook.on_rollout_end(groups=groups, step=step, metrics=m)
        routes = [self.hook.route_group(group=g, config=self.algo, step=step, metrics=m) for g in groups]
        for kind in ("rl", "sft", "mix", "drop"):
            m.log(f"route/{kind}", sum(r.kind == kind for r in routes) / max(1, len(routes)))

        batch = build_train_batch(groups, routes, self.tokenizer.pad_token_id)
        if dist_utils.max_int(int(batch is not None)) == 0:  # every prompt dropped (e.g. DYPO on an all-easy batch), on every rank
            m.log("train/empty_batch", 1.0)
            self.step += self.updates_per_step
            return dist_utils.reduce_metrics({**m.summary(), "time/step_s": time.perf_counter() - t0})
        if batch is not None:
            m.log("train/rows", len(batch))
            m.log("train/offline_data_ratio", float(batch.off_policy.float().mean()))
            batch.advantages = self.hook.compute_advantage(batch=batch, config=self.algo, step=step, metrics=m)
        batch = self._fill_logprobs(batch)

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

    def update(self, mb: TrainBatch | None, m: Metrics) -> None:
        """One optimizer step on a mini-batch, accumulated over micro-batches.

        With several ranks, ``mb`` is this rank's part of the mini-batch (None: it has no rows
        this time). Totals are summed over ranks, so each rank's terms are its share of the
        mini-batch loss; a rank with fewer micro-batches runs zero-loss passes, because ZeRO
        communicates in every forward/backward and the ranks must stay in step.
        """
        rows = micro_batch_rows(mb, self.cfg.trainer.micro_batch_tokens, self.needs.whole_groups) if mb is not None else []
        n_micro = dist_utils.max_int(len(rows))
        totals = dist_utils.sum_dataclass(totals_of(mb, self.max_len, len(rows)) if mb is not None
                                            else Totals(max_len=self.max_len, micro_batches=0))
        losses: dict[str, float] = {}
        for i in progress(range(n_micro), desc="train", enabled=self._bars):
            if i >= len(rows):
                self.backend.backward(self._idle_loss(mb, rows, totals, m))
                continue
            micro = trim_padding(mb.select(rows[i])).with_(totals=totals).to(self.device)
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
        self.guard.after_update(grad_norm, skipped, sum(losses.values()), m)
        m.log("train/grad_norm", grad_norm)
        m.log("train/skipped_steps", float(skipped), reduce="sum")
        m.log("train/lr", self.backend.lr, reduce="last")

    def micro_loss(self, micro: TrainBatch, m: Metrics):
        # bf16 autocast on GPU only: CPU runs stay in fp32 so resumed runs reproduce exactly.
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return micro_batch_loss(self.hook, self.algo, self.step, self.backend.model, micro, m, needs=self.needs,
                                    reference=self.reference, temperature=self.cfg.rollout.temperature,
                                    chunk=self.cfg.trainer.logprob_chunk, is_cap=self.cfg.rollout.is_cap)

    # --- pieces --------------------------------------------------------------------------------

    def make_group(self, ex: Example) -> PromptGroup:
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
        results = guards.verify_within_budget(self._verifier, [(mem.text, gold) for mem, gold in todo], self.cfg.verifier.step_budget_s)
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

    def _fill_logprobs(self, batch: TrainBatch | None) -> TrainBatch | None:
        """π_old is needed when one rollout feeds several updates; π_ref when asked for."""
        rows = micro_batch_rows(batch, self.cfg.trainer.micro_batch_tokens, self.needs.whole_groups) if batch is not None else []
        # Under ZeRO-3 every forward is collective: a rank with fewer micro-batches repeats its first.
        n = dist_utils.max_int(len(rows))
        T, chunk = self.cfg.rollout.temperature, self.cfg.trainer.logprob_chunk
        for wanted, model, field in ((self.updates_per_step > 1, self.backend.model, "old_logprobs"),
                                     (self.needs.reference, self.reference, "ref_logprobs")):
            if not wanted:
                continue
            if batch is None:
                with torch.no_grad():
                    for _ in range(n):
                        self._idle_forward(model)
                continue
            padded = rows + [rows[0]] * (n - len(rows))  # a repeated row writes the same values again
            setattr(batch, field, logprobs_in_micro_batches(model, batch, padded, temperature=T, chunk=chunk))
        return batch

    def _idle_forward(self, model, reference: Any = None) -> torch.Tensor:
        """A zero computed the way real rows are (decoder, reference decoder, LM head), for a rank
        with no rows while the others compute: under ZeRO-3 every forward gathers parameters from
        all ranks, so each rank must make the same calls in the same order. The row is one pad
        token predicting one pad token."""
        pad = self.tokenizer.pad_token_id
        demo = Trajectory(response_ids=[pad], text="", off_policy=True, teacher=0, finished=True)
        group = PromptGroup(example=Example(prompt="", answer=""), prompt_ids=[pad], demonstrations=[demo])
        batch = build_train_batch([group], [Route(rl=0.0, sft=1.0, demos=(0,), members=())], pad).to(self.device)
        full_vocab = (lambda logits, ref_logp, labels: logits.float().sum(-1) * 0.0) if reference is not None else None
        out = policy_outputs(model, batch, temperature=1.0, chunk=self.cfg.trainer.logprob_chunk,
                             distribution_loss=full_vocab, reference=reference)
        extra = out.distribution_loss.sum() if out.distribution_loss is not None else 0.0
        return (out.logprobs.sum() + extra) * 0.0

    def _idle_loss(self, mb: TrainBatch | None, rows: list, totals: Any, m: Metrics) -> torch.Tensor:
        """A zero loss through the whole model: a forward and backward that add no gradient."""
        if mb is None or not rows:
            return self._idle_forward(self.backend.model, self.reference if self.needs.reference_vocab else None)
        micro = trim_padding(mb.select(rows[0])).with_(totals=totals).to(self.device)
        terms, _ = self.micro_loss(micro, Metrics())  # its metrics are not this step's
        return sum(t.value for t in terms) * 0.0

    def _updates_per_rollout_step(self) -> int:
        t = self.cfg.trainer
        per = 1 if t.prompts_per_minibatch is None else t.prompts_per_step // t.prompts_per_minibatch
        return per * t.ppo_epochs

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy and ``eval.benchmarks``, with its own RNG so evaluating never changes training."""
        e = self.cfg.eval
        max_new = e.max_new_tokens or self.cfg.rollout.max_new_tokens
        params = SamplingParams(n=e.n, temperature=e.temperature, top_p=e.top_p, max_new_tokens=max_new)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.trainer.seed + 1_000_003)
            generator = self.rollout or hf_engine(self.backend.model, self.tokenizer, self.cfg.rollout)
            out: dict[str, float] = {}
            if self.eval_examples:  # data.eval: held-out accuracy (eval/accuracy)
                examples = self.eval_examples[: e.max_prompts] if e.max_prompts else self.eval_examples
                out = evaluate_accuracy(generator, examples, self._verifier, params,
                                        prompt_fn=lambda ex: self.make_group(ex).prompt_ids, progress=self._bars)
            if e.benchmarks:
                from .eval import Prompting, evaluate_benchmarks_in_training, load_benchmarks

                if getattr(self, "_benchmarks", None) is None:  # loaded once, at the first evaluation
                    self._benchmarks = load_benchmarks(list(e.benchmarks), {"max_new_tokens": max_new, "max_problems": e.max_prompts})
                prompting = Prompting(self.tokenizer, self.cfg.data.template, self.cfg.data.system_prompt)
                out.update(evaluate_benchmarks_in_training(
                    generator, prompting, self._benchmarks, build_registry(self.pm, "register_verifiers"), self.cfg.verifier,
                    seed=self.cfg.trainer.seed, progress=self._bars))
            return out

    def save(self) -> Path:
        """Rank 0 writes the checkpoint; under ZeRO-3 every rank first helps gather the weights."""
        consolidated = getattr(self.backend, "consolidated_model", None)
        model = consolidated() if consolidated is not None else self.backend.model  # collective under ZeRO-3
        path = self._checkpoint_path(self.step)
        if hasattr(self.backend, "save_shards"):  # before COMPLETE is written: a complete step has its shards
            shards = self.run_dir / _SHARDS_DIR / path.name
            self.backend.save_shards(shards)
            # Each rank samples with its own stream; the checkpoint's rng.pt holds rank 0's only.
            torch.save(ckpt.rng_state(), shards / _rank_rng_file(dist_utils.rank()))
            dist_utils.barrier()
        if dist_utils.is_main():
            state = {"step": self.step, "backend": self.backend.state_dict(), "sampler": self.sampler.state_dict()}
            path = ckpt.save_checkpoint(self.run_dir, self.step, model=model, tokenizer=self.tokenizer,
                                        trainer_state=state, keep_last=self.cfg.keep_checkpoints)
            for d in (self.run_dir / _SHARDS_DIR).glob("step-*"):  # shards of pruned checkpoints go too
                if not (path.parent / d.name).exists():
                    shutil.rmtree(d, ignore_errors=True)
        self._saved_step = self.step
        dist_utils.barrier()  # nobody reads the checkpoint before it is complete
        return path

    def _checkpoint_path(self, step: int) -> Path:
        return self.run_dir / ckpt.CHECKPOINTS_DIR / ckpt.step_dir_name(step)

    @property
    def _bars(self) -> bool:
        return self.cfg.logging.progress and dist_utils.is_main()


def _rollout_metrics(groups: list[PromptGroup], seconds: float, m: Metrics) -> None:
    trajs = [t for g in groups for t in g.members]
    tokens = sum(len(t.response_ids) for t in trajs)
    m.log("rollout/response_length", tokens / max(1, len(trajs)))
    m.log("rollout/truncated", sum(not t.finished for t in trajs) / max(1, len(trajs)))
    m.log("time/rollout_s", seconds)
    m.log("perf/rollout_tokens_per_s", tokens / max(1e-9, seconds))


_SHARDS_DIR = "zero_shards"  # run_dir/zero_shards/step-NNNNNN: per-rank optimizer and RNG state (deepspeed backend)


def _rank_rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


class _NullLogger:
    """What ranks other than 0 log to."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self, exit_code: int | None = None) -> None:
        pass


def _check_world(config: RunConfig, world: int) -> None:
    """Several processes split each step's prompts evenly; only a distributed backend can run them."""
    if world <= 1:
        return
    from .config import ConfigError

    t = config.trainer
    problems = []
    if t.backend == "torch":
        problems.append(f"trainer.backend: torch runs one process, but WORLD_SIZE={world}; use trainer.backend=deepspeed")
    if t.prompts_per_step % world:
        problems.append(f"trainer.prompts_per_step ({t.prompts_per_step}) must be a multiple of the {world} processes")
    if t.prompts_per_minibatch is not None and t.prompts_per_minibatch % world:
        problems.append(f"trainer.prompts_per_minibatch ({t.prompts_per_minibatch}) must be a multiple of the {world} processes")
    if problems:
        raise ConfigError(problems)


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def _pick(registry: dict, name: str, key: str):
    if name not in registry:
        raise KeyError(f"{key}: '{name}' is not registered. Available: {', '.join(sorted(registry))}")
    return registry[name]

