"""Run configuration: structured dataclasses, layered loading, two-phase validation.

Layers, later wins: dataclass defaults → ``configs/base.yaml`` → the run's YAML →
``key=value`` overrides. Phase 1 validates the core sections against ``RunConfig``; phase 2
validates the ``algorithm:`` section against the dataclass the selected plugin returns from
``algorithm_config()``. All problems of both phases are collected into one ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .threads import parse as parse_threads


def help_field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (shown by ``posttrain show-config --help-fields``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))


# --- core sections -----------------------------------------------------------------------------


@dataclass
class LoraConfig:
    rank: int = help_field(16, "LoRA rank r of each adapter (the update is B·A with A: r×in, B: out×r).")
    alpha: float = help_field(32.0, "LoRA scaling numerator: the update is multiplied by alpha / rank.")
    dropout: float = help_field(0.0, "Dropout on the adapters' input during training.")
    target_modules: list = help_field([], "Module names to adapt (e.g. [q_proj, v_proj]); [] adapts every linear layer but the LM head (peft's 'all-linear').")
    save_merged: bool = help_field(False, "Also write the merged full weights (base + adapter) to each checkpoint's merged/ directory.")


@dataclass
class ModelConfig:
    path: str = help_field("", "Local directory (or hub id) of a causal LM in HF format, tokenizer included.")
    dtype: str = help_field("float32", "Weights dtype: float32 | bfloat16 | float16. bf16 autocast is used on GPU either way.")
    gradient_checkpointing: bool = help_field(False, "Recompute activations in backward to save memory.")
    lora: Optional[LoraConfig] = help_field(None, "Train LoRA adapters (peft) instead of every weight, e.g. {rank: 16, alpha: 32}; null trains the full model. The frozen reference is the base with adapters off. Fields: model.lora.rank | alpha | dropout | target_modules | save_merged.")


@dataclass
class DataConfig:
    train: str = help_field("", "Training prompts: a .jsonl / .parquet file, a `datasets` directory, or 'synthetic:arithmetic?n=2000&seed=0'.")
    eval: Optional[str] = help_field(None, "Held-out prompts (same formats), used by the eval section.")
    prompt_key: str = help_field("prompt", "Field holding the problem text.")
    answer_key: str = help_field("answer", "Field holding the gold answer.")
    demo_keys: list = help_field([], "Field(s) holding demonstrations; a field may hold one string or a list (one per teacher).")
    template: Optional[str] = help_field(None, "Prompt template with {prompt}; None uses the tokenizer's chat template.")
    system_prompt: Optional[str] = help_field(None, "System message for the chat template (e.g. LUFFY/SRFT's).")
    max_prompt_tokens: int = help_field(1024, "Prompts longer than this (after templating) raise an error naming the row.")
    overlong_prompt: str = help_field("error", "A prompt that does not fit the model's context (max_position_embeddings) with rollout.max_new_tokens after it: error (name the row) | truncate_left (keep its last tokens) | skip (leave it out of the step); counted as data/overlong_prompts.")
    max_demo_tokens: int = help_field(8192, "Demonstrations are cut to this many tokens (EOS is then not appended).")
    shuffle: bool = help_field(True, "Shuffle prompts each epoch (seeded by trainer.seed).")
    offline: Optional[str] = help_field(None, "A second source of prompts with demonstrations (same formats as data.train), drawn every step besides data.train as offline groups (group.source='offline': no rollouts by default, SFT on their first demonstration unless the algorithm routes them otherwise).")
    offline_per_step: int = help_field(0, "Prompts drawn from data.offline per step (all processes together).")


@dataclass
class RolloutConfig:
    engine: str = help_field("hf", "Rollout engine: hf (KV-cached decode loop on the policy itself, CPU ok) | vllm (extra).")
    n: int = help_field(8, "On-policy rollouts per prompt (LUFFY/SRFT: 7, their demonstration makes 8).")
    temperature: float = help_field(1.0, "Sampling temperature; also divides logits when computing training log-probs.")
    top_p: float = help_field(1.0, "Nucleus sampling mass.")
    top_k: int = help_field(0, "Sample only among the k most likely tokens; 0 (default) is off, so tokens are drawn from softmax(z/T) (and top-p) exactly as the trainer's log-probs assume.")
    max_new_tokens: int = help_field(1024, "Response length cap (the papers use 8192).")
    batch_size: int = help_field(64, "Sequences decoded together (HF engine).")
    compile: bool = help_field(False, "hf: decode through torch.compile, 4 tokens per call. 1.2-2.8x less decode time on small CPU models (per-token Python overhead); costs a one-off compilation of 15-70 s per process and sampling setting (cached on disk after). Falls back to eager decoding, with one warning, where compilation fails.")
    is_cap: Optional[float] = help_field(None, "Truncated importance sampling (any algorithm): weight each sampled token's policy-gradient term by min(π_old/π_sampling, is_cap), detached, correcting the probability mismatch between the rollout engine (vLLM kernels) and the trainer. None disables; 2.0 is the usual cap (Yao et al. 2025, verl's TIS).")
    tensor_parallel_size: int = help_field(1, "vllm: GPUs one vLLM engine spans (tensor parallel); must divide the number of processes.")
    gpu_memory_utilization: float = help_field(0.5, "vllm: fraction of each GPU vLLM may take (weights + KV cache); the trainer shares the GPU.")
    sleep_level: int = help_field(1, "vllm: while the trainer steps, 0 keeps vLLM resident, 1 offloads its weights to CPU and frees the KV cache, 2 also discards the weights (they are pushed again after every step).")
    max_staleness: int = help_field(0, "Asynchronous RL: rollouts for the next k rollout steps are sampled (in a worker process with its own copy of the weights) while the current step trains, and no step trains on a trajectory more than k policy versions old. 0 (default): the synchronous loop. k >= 1 needs an importance-sampling correction (rollout.is_cap or rollout.is_mask); with engine vllm the worker hosts vLLM on a GPU (rollout.worker_device) and the trainer keeps the hf engine for what it samples itself (README \"Asynchronous RL\").")
    async_mode: str = help_field("pipelined", "With max_staleness k >= 1: pipelined (step t trains on rollouts sampled by exactly version t-k; a seeded CPU run is reproducible bit for bit) | free (the worker samples with the newest weights pushed to it, at most k versions old; timing-dependent, nothing is discarded).")
    sync_every: int = help_field(1, "Async: push the trainer's weights to the rollout worker every this many rollout steps (free mode only; at most max_staleness, so the bound can hold). Every push is verified (version stamp + probe log-probs).")
    is_mask: Optional[list] = help_field(None, "Masked importance sampling (any algorithm): [low, high]; sampled tokens whose weight π_old/π_sampling lies outside the band are left out of the loss (counted as train/is_masked). Combines with is_cap. None disables; e.g. [0.5, 2.0].")
    worker_threads: str = help_field("auto", "Async: intra-op threads of the rollout worker process: auto (half of trainer.threads' count, at least 1; the trainer keeps the rest, so the two together stay within the cores) | N.")
    worker_device: str = help_field("auto", "Async: where the rollout worker process samples: auto (the trainer's device, so a GPU run samples on its GPU, not on the CPU) | cpu | cuda | cuda:N (e.g. cuda:1: a GPU of its own).")


@dataclass
class VerifierConfig:
    name: str = help_field("math", "Verifier: math (math-verify) | exact | choice.")
    timeout_s: float = help_field(10.0, "Hard wall-clock limit per answer; the worker is killed and replaced past it.")
    workers: int = help_field(2, "Verifier worker processes.")
    on_timeout: str = help_field("drop_member", "A timed-out answer: drop_member (left out of its group's statistics and of training) | drop_group (its whole group is left out) | zero (scored 0, like a wrong answer).")
    step_budget_s: Optional[float] = help_field(None, "Wall-clock budget for verifying one training step's answers; answers not checked within it time out (see on_timeout). None: no budget beyond timeout_s per answer.")


@dataclass
class TrainerConfig:
    backend: str = help_field("torch", "Trainer backend: torch | deepspeed (extra).")
    steps: int = help_field(500, "Optimizer steps (with prompts_per_minibatch < prompts_per_step a rollout step makes several).")
    prompts_per_step: int = help_field(128, "Prompts per rollout step.")
    prompts_per_minibatch: Optional[int] = help_field(None, "Prompts per optimizer step; None = the whole rollout batch.")
    ppo_epochs: int = help_field(1, "Passes over each rollout batch.")
    max_sampling_rounds: int = help_field(10, "When select_groups asks for more prompts (DAPO's dynamic sampling), at most this many rounds of draw → rollout → verify per step, the first included (DAPO's max_num_gen_batches); when the cap stops it the step trains on what it has and logs plan/rounds_capped = 1.")
    micro_batch_tokens: int = help_field(16384, "Token budget (rows × padded length) per forward/backward pass; rows of similar length share a pass.")
    logprob_chunk: int = help_field(256, "Positions per chunk when computing log-probs/entropy (memory vs speed).")
    lr: float = help_field(1e-6, "AdamW learning rate.")
    betas: list = help_field([0.9, 0.999], "AdamW betas.")
    weight_decay: float = help_field(0.01, "AdamW weight decay.")
    schedule: str = help_field("constant", "LR schedule: constant | cosine (with warmup_steps linear warm-up).")
    warmup_steps: int = help_field(0, "Linear warm-up steps.")
    min_lr_ratio: float = help_field(0.0, "Cosine floor as a fraction of lr.")
    grad_clip: Optional[float] = help_field(1.0, "Clip the global gradient norm to this; None disables.")
    skip_grad_norm_above: Optional[float] = help_field(None, "Skip (and count) a step whose pre-clip grad norm is non-finite or above this (HPT: 80).")
    max_skipped_steps: int = help_field(3, "Stop with an error after this many consecutive optimizer steps skipped for a non-finite loss or gradient (train/nonfinite_skipped).")
    seed: int = help_field(0, "Seeds python, numpy, torch and the data order.")
    threads: str = help_field("auto", "CPU intra-op threads per process: auto (the CPUs this process may use, shared among the ranks on this host; one core left free from 8 cores up; OMP_NUM_THREADS wins over auto) | N. Set once per run at the top level, by the posttrain command (README \"CPU threads\").")
    device: str = help_field("auto", "auto | cpu | cuda.")
    zero_stage: int = help_field(2, "DeepSpeed ZeRO stage 1 | 2 | 3 (deepspeed backend); 3 also partitions the reference model.")
    deepspeed_config: Optional[str] = help_field(None, "deepspeed: a DeepSpeed JSON whose sections (zero_optimization, bf16, ...) replace the ones built from these fields; no optimizer/scheduler sections (lr and schedule come from this section).")
    bf16: bool = help_field(True, "deepspeed: bf16 weights and gradients with fp32 master weights (GPU); CPU runs train in fp32.")
    offload_optimizer: bool = help_field(False, "deepspeed: keep optimizer states (and the step) on CPU (ZeRO-Offload, DeepSpeed's CPU Adam).")
    offload_params: bool = help_field(False, "deepspeed: keep parameters on CPU between uses (ZeRO-3 only).")


@dataclass
class EvalConfig:
    every: int = help_field(0, "Evaluate on data.eval every this many steps (0: only before and after training).")
    n: int = help_field(1, "Samples per eval prompt (accuracy is avg@n).")
    temperature: float = help_field(0.0, "Eval sampling temperature; 0 is greedy.")
    top_p: float = help_field(1.0, "Eval nucleus mass.")
    max_new_tokens: Optional[int] = help_field(None, "Eval response cap; None uses rollout.max_new_tokens.")
    max_prompts: Optional[int] = help_field(None, "Evaluate on at most this many held-out prompts.")
    enabled: bool = help_field(True, "Run evaluation when data.eval is set.")
    benchmarks: list = help_field([], "Benchmarks (names in configs/benchmarks/ or YAML paths) scored with data.eval, each with its own n/k/temperature; logs eval/<name>/pass@k, avg@k, maj@k. Caps: max_new_tokens, max_prompts.")


@dataclass
class LoggingConfig:
    wandb: str = help_field("disabled", "wandb mode: disabled | offline | online.")
    project: str = help_field("posttrain", "wandb project.")
    progress: bool = help_field(True, "Show progress bars for rollout / verify / train.")
    console_every: int = help_field(1, "Print a metrics line every this many steps.")
    tensorboard: bool = help_field(False, "Also write TensorBoard event files to run_dir/tensorboard (needs the tensorboard package: pip install 'posttrain[tensorboard]').")


@dataclass
class RunConfig:
    algorithm: dict = help_field({"name": "grpo"}, "Algorithm plugin name plus its own fields (validated by the plugin's dataclass).")
    extensions: list = help_field([], "Extension plugins to load from entry-point group posttrain.extensions.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = help_field("runs/${algorithm.name}", "Run directory: resolved config, metrics.jsonl, checkpoints.")
    resume: str = help_field("auto", "auto: continue from the newest checkpoint in run_dir (refused when the training config changed; posttrain train --force-resume) | never: start over, moving a previous run in run_dir aside. posttrain train --resume CHECKPOINT picks one.")
    save_every: int = help_field(0, "Checkpoint every this many steps (0: only at the end).")
    keep_checkpoints: Optional[int] = help_field(2, "Keep this many newest step checkpoints; None keeps all.")
    stages: list = help_field([], "Stages run in order, each a partial config over this one; stage k+1 starts from stage k's final weights.")


# --- the algorithm section's base --------------------------------------------------------------


@dataclass
class GRPOConfig:
    """GRPO (and the fields every default hook reads). Plugins subclass this."""

    name: str = help_field("grpo", "Algorithm entry-point name.")
    norm_adv_by_std: bool = help_field(True, "Divide group-centred rewards by the group std (GRPO); False is Dr.GRPO.")
    adv_eps: float = help_field(1e-6, "Added to the std before dividing.")
    clip_low: Optional[float] = help_field(0.2, "PPO ε below 1 (ratio ≥ 1−ε); None disables clipping entirely.")
    clip_high: Optional[float] = help_field(None, "PPO ε above 1 (DAPO clip-higher, 0.28); None = clip_low.")
    clip_dual: Optional[float] = help_field(None, "Dual-clip constant c (3.0) bounding −A·ρ for A<0; None disables.")
    ratio_level: str = help_field("token", "token | sequence (GSPO: one length-normalised ratio per sequence).")
    loss_agg: str = help_field("token-mean", "token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm | token-sum-norm.")
    loss_max_len: Optional[int] = help_field(None, "L_max for the *-norm modes; None uses rollout.max_new_tokens.")
    sft_coef: float = help_field(1.0, "Weight of the SFT NLL on rows routed to SFT (token-mean over the mini-batch's demo tokens).")
    entropy_coef: float = help_field(0.0, "Entropy bonus coefficient (LUFFY/HPT/SRFT code: 0.001).")
    kl_coef: float = help_field(0.0, "KL(π_θ‖π_ref) loss coefficient; > 0 loads a frozen reference model.")
    kl_estimator: str = help_field("k3", "k1 | k2 | k3 (low-variance) KL estimator.")
    kl_reward_coef: float = help_field(0.0, "β of a KL penalty in the reward (verl's use_kl_in_reward): each sampled token's reward gets −β·KL(π_old‖π_ref)_t, so a sequence's reward is score − β·Σ_t KL_t before the advantage; > 0 loads a frozen reference model. Independent of kl_coef (the KL term in the loss). Read by the core's advantage (grpo, rloo, reinforce_pp, cispo, hpt, gift, dypo), not by luffy/srft.")
    kl_reward_estimator: str = help_field("k1", "k1 | k2 | k3 estimator of kl_reward_coef (verl's default for the reward: kl = k1).")


# --- loading -----------------------------------------------------------------------------------

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_base_yaml() -> Path | None:
    p = _REPO_ROOT / "configs" / "base.yaml"
    return p if p.exists() else None


def _suggest(key: str, choices: list[str]) -> str:
    # A key that extends a real one ("lr_rate" → "lr") beats fuzzy similarity ("min_lr_ratio").
    stems = [c for c in choices if key.startswith(c + "_") or key.startswith(c + "-")]
    m = sorted(stems, key=len, reverse=True)[:1] or difflib.get_close_matches(key, choices, n=1)
    return f" Did you mean '{m[0]}'?" if m else ""


def _unknown_keys(node: Any, schema: Any, prefix: str, problems: list[str]) -> None:
    """Report keys that the schema dataclass does not have (recursively), with did-you-mean."""
    if not isinstance(node, (dict, DictConfig)) or not dataclasses.is_dataclass(schema):
        return
    names = {f.name: f for f in dataclasses.fields(schema)}
    for k in node:
        k = str(k)
        if k not in names:
            problems.append(f"{prefix}{k}: unknown key.{_suggest(k, list(names))}")
            continue
        default = names[k].default_factory() if names[k].default_factory is not dataclasses.MISSING else names[k].default
        if dataclasses.is_dataclass(default):
            _unknown_keys(node[k], type(default), f"{prefix}{k}.", problems)


def merge_layers(user: DictConfig | dict, overrides: list[str] | None = None, base: Path | None | str = "default") -> DictConfig:
    """Dataclass defaults ← base.yaml ← user config ← key=value overrides (untyped merge).

    With ``stages:``, an override beats the stages' own values: ``trainer.steps=5`` sets every
    stage's steps, ``stages.1.trainer.steps=5`` only stage 1's (the more specific wins)."""
    layers = [OmegaConf.create(dataclasses.asdict(RunConfig()))]
    if base == "default":
        base = default_base_yaml()
    if base:
        layers.append(OmegaConf.load(base))
    layers.append(OmegaConf.create(user) if isinstance(user, dict) else user)
    cfg = OmegaConf.merge(*layers)
    if overrides:
        _apply_overrides(cfg, list(overrides))
    return cfg


_STAGE_KEY = re.compile(r"stages\.(\d+)\.(.+)")


def _apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([f"override {o!r} is not key=value" for o in bad], "command line")
    everywhere = [o for o in overrides if not _STAGE_KEY.match(o.split("=", 1)[0])]
    if everywhere:
        top = OmegaConf.from_dotlist(everywhere)
        cfg.merge_with(top)
        # Stages are merged over the top level later; the override must beat them too.
        # model.path stays the top level's: later stages start from the previous stage's weights.
        per_stage = OmegaConf.masked_copy(top, [k for k in top if k != "stages"])
        if "model" in per_stage and "path" in per_stage.model:
            per_stage.model.pop("path")
        for i in range(len(cfg.get("stages") or [])):
            cfg.stages[i] = OmegaConf.merge(cfg.stages[i], per_stage)
    problems = []
    for o in overrides:
        key, value = o.split("=", 1)
        m = _STAGE_KEY.match(key)
        if m is None:
            continue
        i, n = int(m.group(1)), len(cfg.get("stages") or [])
        if i >= n:
            problems.append(f"{key}: there is no stage {i} (the config has {n} stage(s), numbered from 0)")
            continue
        cfg.stages[i] = OmegaConf.merge(cfg.stages[i], OmegaConf.from_dotlist([f"{m.group(2)}={value}"]))
    if problems:
        raise ConfigError(problems, "command line")


def validate_core(cfg: DictConfig, source: str = "config") -> tuple[RunConfig | None, list[str]]:
    """Phase 1: every core section against RunConfig. Returns (object or None, problems)."""
    problems: list[str] = []
    raw = OmegaConf.to_container(cfg, resolve=False)
    _unknown_keys(raw, RunConfig, "", problems)
    if not isinstance(raw.get("algorithm"), dict) or not raw["algorithm"].get("name"):
        problems.append("algorithm.name: missing (e.g. algorithm: {name: grpo}).")
    if problems:
        return None, problems
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
        obj: RunConfig = OmegaConf.to_object(typed)
    except OmegaConfBaseException as e:
        problems.append(_omegaconf_message(e))
        return None, problems
    problems += _check_core_values(obj)
    return obj, problems


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def _check_core_values(c: RunConfig) -> list[str]:
    p = []
    p += _check_ranges(c)
    if c.rollout.n < 1:
        p.append(f"rollout.n: must be >= 1, got {c.rollout.n}.")
    if not 0 < c.rollout.top_p <= 1:
        p.append(f"rollout.top_p: must be in (0, 1], got {c.rollout.top_p}.")
    if c.rollout.top_k < 0:
        p.append(f"rollout.top_k: must be >= 0 (0 is off), got {c.rollout.top_k}.")
    if c.trainer.steps < 0:
        p.append(f"trainer.steps: must be >= 0, got {c.trainer.steps}.")
    if c.trainer.prompts_per_step < 1:
        p.append(f"trainer.prompts_per_step: must be >= 1, got {c.trainer.prompts_per_step}.")
    mb = c.trainer.prompts_per_minibatch
    if mb is not None and (mb < 1 or c.trainer.prompts_per_step % mb):
        p.append(f"trainer.prompts_per_minibatch ({mb}) must divide trainer.prompts_per_step ({c.trainer.prompts_per_step}).")
    if c.trainer.schedule not in ("constant", "cosine"):
        p.append(f"trainer.schedule: '{c.trainer.schedule}' is not constant | cosine.{_suggest(c.trainer.schedule, ['constant', 'cosine'])}")
    try:
        parse_threads(c.trainer.threads, "trainer.threads")
    except ValueError as e:
        p.append(str(e))
    if c.trainer.zero_stage not in (1, 2, 3):
        p.append(f"trainer.zero_stage: must be 1, 2 or 3, got {c.trainer.zero_stage}.")
    if c.trainer.offload_params and c.trainer.zero_stage != 3:
        p.append("trainer.offload_params: needs trainer.zero_stage=3.")
    if c.rollout.is_cap is not None and c.rollout.is_cap <= 0:
        p.append(f"rollout.is_cap: must be > 0 (or null to disable), got {c.rollout.is_cap}.")
    p += _check_async(c.rollout, c.trainer.device)
    if c.rollout.tensor_parallel_size < 1:
        p.append(f"rollout.tensor_parallel_size: must be >= 1, got {c.rollout.tensor_parallel_size}.")
    if not 0 < c.rollout.gpu_memory_utilization <= 1:
        p.append(f"rollout.gpu_memory_utilization: must be in (0, 1], got {c.rollout.gpu_memory_utilization}.")
    if c.rollout.sleep_level not in (0, 1, 2):
        p.append(f"rollout.sleep_level: must be 0, 1 or 2, got {c.rollout.sleep_level}.")
    if c.resume not in ("auto", "never"):
        p.append(f"resume: '{c.resume}' is not auto | never.")
    if c.logging.wandb not in ("disabled", "offline", "online"):
        p.append(f"logging.wandb: '{c.logging.wandb}' is not disabled | offline | online.")
    if not c.stages and not c.model.path:
        p.append("model.path: missing (a local HF model directory).")
    if not c.stages and not c.data.train:
        p.append("data.train: missing (a .jsonl/.parquet file, a datasets dir, or synthetic:arithmetic).")
    return p


def _check_ranges(c: RunConfig) -> list[str]:
    """The numeric fields' ranges and the closed choices not checked elsewhere, one line each."""
    pos, nonneg, ge1 = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
    unit = (lambda v: 0 <= v <= 1, "in [0, 1]")
    r, v, t, e = c.rollout, c.verifier, c.trainer, c.eval
    checks = [  # (key, value, (test, requirement), None allowed)
        ("data.max_prompt_tokens", c.data.max_prompt_tokens, ge1, False),
        ("data.max_demo_tokens", c.data.max_demo_tokens, ge1, False),
        ("rollout.max_new_tokens", r.max_new_tokens, ge1, False),
        ("rollout.batch_size", r.batch_size, ge1, False),
        ("verifier.timeout_s", v.timeout_s, pos, False),
        ("verifier.workers", v.workers, ge1, False),
        ("verifier.step_budget_s", v.step_budget_s, pos, True),
        ("trainer.ppo_epochs", t.ppo_epochs, ge1, False),
        ("trainer.micro_batch_tokens", t.micro_batch_tokens, ge1, False),
        ("trainer.logprob_chunk", t.logprob_chunk, ge1, False),
        ("trainer.lr", t.lr, pos, False),
        ("trainer.max_sampling_rounds", t.max_sampling_rounds, ge1, False),
        ("data.offline_per_step", c.data.offline_per_step, nonneg, False),
        ("trainer.weight_decay", t.weight_decay, nonneg, False),
        ("trainer.warmup_steps", t.warmup_steps, nonneg, False),
        ("trainer.min_lr_ratio", t.min_lr_ratio, unit, False),
        ("trainer.grad_clip", t.grad_clip, pos, True),
        ("trainer.skip_grad_norm_above", t.skip_grad_norm_above, pos, True),
        ("trainer.max_skipped_steps", t.max_skipped_steps, ge1, False),
        ("eval.every", e.every, nonneg, False),
        ("eval.n", e.n, ge1, False),
        ("eval.temperature", e.temperature, nonneg, False),
        ("eval.max_new_tokens", e.max_new_tokens, ge1, True),
        ("eval.max_prompts", e.max_prompts, ge1, True),
        ("logging.console_every", c.logging.console_every, ge1, False),
        ("save_every", c.save_every, nonneg, False),
        ("keep_checkpoints", c.keep_checkpoints, nonneg, True),
    ]
    p = [f"{key}: must be {need}{' (or null)' if nullable else ''}, got {value}."
         for key, value, (ok, need), nullable in checks if not (value is None and nullable) and not (value is not None and ok(value))]
    if not r.temperature > 0:
        # The trainer's log-probs are of softmax(logits / T): T = 0 has none, and n greedy samples
        # of one prompt are one answer n times (zero advantage), so training needs sampling.
        p.append(f"rollout.temperature: must be > 0 for training, got {r.temperature}; greedy decoding is for evaluation (eval.temperature=0).")
    if not 0 < e.top_p <= 1:
        p.append(f"eval.top_p: must be in (0, 1], got {e.top_p}.")
    betas = list(t.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        p.append(f"trainer.betas: must be two numbers in [0, 1), got {betas}.")
    choices = [("model.dtype", c.model.dtype, ("float32", "bfloat16", "float16")),
               ("data.overlong_prompt", c.data.overlong_prompt, OVERLONG_PROMPT_POLICIES),
               ("verifier.on_timeout", v.on_timeout, TIMEOUT_POLICIES),
               ("trainer.device", t.device.split(":")[0], ("auto", "cpu", "cuda", "mps"))]
    for key, value, allowed in choices:
        if value not in allowed:
            p.append(f"{key}: '{value}' is not {' | '.join(allowed)}.{_suggest(value, list(allowed))}")
    return p


def _worker_on_gpu(worker_device: str, trainer_device: str) -> bool:
    if worker_device == "auto":  # the trainer's device
        import torch

        return trainer_device.startswith("cuda") or (trainer_device == "auto" and torch.cuda.is_available())
    return worker_device.startswith("cuda")


def _check_async(r: RolloutConfig, trainer_device: str) -> list[str]:
    """The asynchronous-RL fields (rollout.max_staleness and friends), one line each."""
    p = []
    band = list(r.is_mask) if r.is_mask is not None else None
    if band is not None and not (len(band) == 2 and all(isinstance(b, (int, float)) for b in band) and 0 <= band[0] < 1 < band[1]):
        p.append(f"rollout.is_mask: must be [low, high] with 0 <= low < 1 < high (e.g. [0.5, 2.0]) or null, got {band}.")
    if r.max_staleness < 0:
        p.append(f"rollout.max_staleness: must be >= 0 (0 is the synchronous loop), got {r.max_staleness}.")
    if r.async_mode not in ASYNC_MODES:
        p.append(f"rollout.async_mode: '{r.async_mode}' is not {' | '.join(ASYNC_MODES)}.{_suggest(r.async_mode, list(ASYNC_MODES))}")
    if r.sync_every < 1:
        p.append(f"rollout.sync_every: must be >= 1, got {r.sync_every}.")
    try:
        parse_threads(r.worker_threads, "rollout.worker_threads")
    except ValueError as e:
        p.append(str(e))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(r.worker_device)):
        p.append(f"rollout.worker_device: '{r.worker_device}' is not auto | cpu | cuda | cuda:N.")
    if r.max_staleness < 1:
        return p
    if str(r.worker_device).startswith("cuda"):
        import torch

        index = int(r.worker_device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            p.append(f"rollout.worker_device: {r.worker_device} is not available here ({torch.cuda.device_count()} CUDA "
                     "devices); use auto (the trainer's device) or cpu.")
    if r.is_cap is None and r.is_mask is None:
        p.append(f"rollout.max_staleness: {r.max_staleness} trains on rollouts of older policies, which needs importance "
                 "sampling: set rollout.is_cap (e.g. 2.0) or rollout.is_mask (e.g. [0.5, 2.0]).")
    if r.engine not in ("hf", "vllm"):
        p.append(f"rollout.max_staleness: {r.max_staleness} runs the rollout engine in a worker process, implemented for "
                 f"rollout.engine hf and vllm (got '{r.engine}'); set rollout.max_staleness=0 for it.")
    if r.engine == "vllm" and r.tensor_parallel_size > 1:
        p.append(f"rollout.tensor_parallel_size: {r.tensor_parallel_size} with rollout.max_staleness: {r.max_staleness}; the "
                 "asynchronous rollout worker runs one vLLM engine on one GPU: set rollout.tensor_parallel_size=1.")
    if r.engine == "vllm" and not _worker_on_gpu(r.worker_device, trainer_device):
        p.append(f"rollout.engine: vllm with rollout.max_staleness: {r.max_staleness} runs vLLM in the rollout worker, which "
                 f"needs a GPU, and rollout.worker_device: {r.worker_device} puts the worker on the CPU here: set "
                 "rollout.worker_device=cuda:N, or rollout.engine=hf.")
    if r.sync_every > 1 and (r.async_mode != "free" or r.sync_every > r.max_staleness):
        p.append(f"rollout.sync_every: {r.sync_every} needs rollout.async_mode=free and sync_every <= max_staleness "
                 f"({r.max_staleness}); pipelined mode pushes the weights after every rollout step.")
    return p


ASYNC_MODES = ("pipelined", "free")
OVERLONG_PROMPT_POLICIES = ("error", "truncate_left", "skip")
TIMEOUT_POLICIES = ("drop_member", "drop_group", "zero")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum-norm")


def validate_algorithm(section: dict, schema: type, source: str = "config") -> tuple[Any, list[str]]:
    """Phase 2: the algorithm section against the plugin's dataclass."""
    problems: list[str] = []
    _unknown_keys(section, schema, "algorithm.", problems)
    if problems:
        return None, problems
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(section)))
    except OmegaConfBaseException as e:
        return None, [f"algorithm.{_omegaconf_message(e)}"]
    except (TypeError, ValueError) as e:  # raised by a plugin's __post_init__
        return None, [f"algorithm: {e}"]
    if isinstance(obj, GRPOConfig):
        if obj.loss_agg not in LOSS_AGG_MODES:
            problems.append(f"algorithm.loss_agg: '{obj.loss_agg}' is not one of {', '.join(LOSS_AGG_MODES)}.{_suggest(obj.loss_agg, list(LOSS_AGG_MODES))}")
        if obj.ratio_level not in ("token", "sequence"):
            problems.append(f"algorithm.ratio_level: '{obj.ratio_level}' is not token | sequence.")
        if obj.kl_estimator not in ("k1", "k2", "k3"):
            problems.append(f"algorithm.kl_estimator: '{obj.kl_estimator}' is not k1 | k2 | k3.")
        if obj.kl_reward_estimator not in ("k1", "k2", "k3"):
            problems.append(f"algorithm.kl_reward_estimator: '{obj.kl_reward_estimator}' is not k1 | k2 | k3.")
        if obj.kl_reward_coef < 0:
            problems.append(f"algorithm.kl_reward_coef: must be >= 0 (0 disables), got {obj.kl_reward_coef}.")
    return obj, problems


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: no such file"], str(path))
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: name the file
        raise ConfigError([f"{path}: not valid YAML: {e}"], str(path)) from e
    if isinstance(cfg, ListConfig):
        raise ConfigError([f"{path}: top level must be a mapping"], str(path))
    return cfg


def stage_configs(cfg: DictConfig) -> list[DictConfig]:
    """Expand ``stages:`` into full configs (each stage merged over the top level)."""
    stages = cfg.get("stages") or []
    if not stages:
        return [cfg]
    top = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "stages"])
    out = []
    for i, st in enumerate(stages):
        merged = OmegaConf.merge(top, st)
        merged.stages = []
        if "algorithm" in st and "name" in st.algorithm and top.algorithm.get("name") != st.algorithm.name:
            # a stage naming a different algorithm starts its algorithm section fresh
            merged.algorithm = OmegaConf.merge({"name": st.algorithm.name}, st.algorithm)
        out.append(merged)
    return out
