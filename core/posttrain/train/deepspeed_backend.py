"""DeepSpeed ZeRO backend (``trainer.backend: deepspeed``, extra ``posttrain[deepspeed]``).

One process per GPU under ``torchrun`` or the ``deepspeed`` launcher (CPU works too, over gloo).
ZeRO stage 1/2/3 from ``trainer.zero_stage`` or a user JSON (``trainer.deepspeed_config``), bf16
on GPU, optimizer/parameter offload. The schedule, clipping and the skip rule behave exactly as
in the torch backend, so the two backends give the same update on the same data.

How the pieces fit the engine:

* Gradient accumulation belongs to the engine (a token budget makes the number of micro-batches
  vary per step), so DeepSpeed runs with ``managed_gradient_accumulation: false``: ``backward``
  only accumulates, ``step`` is the boundary.
* The engine normalises each rank's loss by the mini-batch totals summed over ranks, so the
  ranks' losses add up to the mini-batch loss; DeepSpeed averages gradients over ranks, hence
  ``backward`` multiplies by the world size.
* ``model`` is the wrapped module itself: ``train.forward`` calls its decoder and head
  directly (chunked log-probs), and ZeRO-3's gather hooks live on those submodules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .. import distributed as D
from ..config import ConfigError
from .plain_torch import config_hyperparameters, lr_lambda

# Keys we own: the engine feeds micro-batches itself, so DeepSpeed's batch bookkeeping is a formality.
_OWNED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
          "managed_gradient_accumulation"}


class DeepSpeedConfigError(ConfigError):
    """A bad ``trainer.deepspeed_config`` file or DeepSpeed setting; the message names it (and
    the command line prints it without a traceback, as any ConfigError)."""

    def __init__(self, problem: str):
        super().__init__([problem], "the DeepSpeed config")


def build_ds_config(config: Any, *, on_gpu: bool) -> dict:
    """The DeepSpeed config dict: ``trainer.deepspeed_config`` (if set) over our settings."""
    user: dict = {}
    if getattr(config, "deepspeed_config", None):
        path = Path(config.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except FileNotFoundError:
            raise DeepSpeedConfigError(f"trainer.deepspeed_config: {path}: no such file") from None
        except json.JSONDecodeError as e:
            raise DeepSpeedConfigError(f"trainer.deepspeed_config: {path}: not valid JSON: {e}") from None
        if not isinstance(user, dict):
            raise DeepSpeedConfigError(f"trainer.deepspeed_config: {path}: top level must be an object")
        clash = sorted({"optimizer", "scheduler"} & set(user))
        if clash:
            raise DeepSpeedConfigError(
                f"trainer.deepspeed_config: {path}: remove {', '.join(clash)}; posttrain builds AdamW and the "
                "schedule from trainer.lr / betas / weight_decay / schedule / warmup_steps")
    zero = {"stage": config.zero_stage}
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if config.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    out = {
        "zero_optimization": zero,
        "bf16": {"enabled": bool(config.bf16 and on_gpu)},  # CPU trains in fp32
        "gradient_clipping": float(config.grad_clip) if config.grad_clip is not None else 0.0,
        "steps_per_print": 2**62,  # we log; DeepSpeed's own progress lines would interleave with ours
        "wall_clock_breakdown": False,
        # Our optimizer is AdamW (or DeepSpeed's CPU Adam) behind a subclass that can skip a step;
        # DeepSpeed vets optimizers by exact type, so it would call it untested.
        "zero_allow_untested_optimizer": True,
    }
    out.update({k: v for k, v in user.items() if k not in _OWNED})
    out.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, managed_gradient_accumulation=False)
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise DeepSpeedConfigError(f"zero_optimization.stage must be 1, 2 or 3, got {stage!r}")
    if out["zero_optimization"].get("offload_param") and stage != 3:
        raise DeepSpeedConfigError("offload_param (trainer.offload_params) needs ZeRO stage 3")
    return out


def _skip_cpu_shm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles a shared-memory allreduce op on first use (about 30 s, needs a
    compiler). gloo does the same job for training, so skip the build."""
    import importlib

    importlib.import_module("deepspeed.comm.torch")
    # `import deepspeed.comm.torch as m` would bind deepspeed.comm's `torch` attribute (the torch package).
    import sys

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _init_comm(on_gpu: bool) -> None:
    """DeepSpeed's communication layer over the launcher's process group (a world of 1 when the
    run was started without a launcher: DeepSpeed still needs a group, of one)."""
    import os
    import socket

    import deepspeed

    if D.world_size() <= 1 and not torch.distributed.is_initialized():
        with socket.socket() as s:  # a free port for the one-process group
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
            os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")


def _skippable(base: type) -> type:
    """``base`` (an optimizer class) whose ``step`` does nothing while ``skip()`` says so.

    ZeRO computes the global gradient norm, then calls the inner optimizer; this is where the
    "skip a step whose pre-clip norm is above the limit" rule can act without a second norm pass.
    """

    class Skippable(base):  # type: ignore[misc, valid-type]
        skip = staticmethod(lambda: False)
        skipped = False

        def step(self, closure=None):
            if self.skip():
                self.skipped = True
                return None
            return super().step(closure) if closure is not None else super().step()

    Skippable.__name__ = f"Skippable{base.__name__}"
    return Skippable


class DeepSpeedBackend:
    def __init__(self, model, config, total_steps: int):
        import deepspeed

        self.config = config
        self.world = D.world_size()
        device = next(model.parameters()).device
        on_gpu = device.type == "cuda"
        if not on_gpu:
            _skip_cpu_shm_build()
        _init_comm(on_gpu)
        self.ds_config = build_ds_config(config, on_gpu=on_gpu)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self._hf_ds_config = None
        if self.stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            # Kept alive on purpose: while it exists, transformers' generate() runs with
            # synced_gpus (under ZeRO-3 every rank must join every forward until all have finished).
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)

        params = [p for p in model.parameters() if p.requires_grad]
        kw = dict(lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
        if self.ds_config["zero_optimization"].get("offload_optimizer"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # the partitions live on CPU: DeepSpeed's CPU Adam

            optimizer = _skippable(DeepSpeedCPUAdam)(params, adamw_mode=True, **kw)
        else:
            optimizer = _skippable(torch.optim.AdamW)(params, **kw)
        optimizer.skip = self._should_skip
        self.optimizer = optimizer
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        # Our schedule, stepped by us: DeepSpeed would not advance it on a skipped step.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(config.schedule, config.warmup_steps, total_steps, config.min_lr_ratio))
        self.model = self.engine.module
        self.skipped_steps = 0

    # --- the TrainerBackend protocol ------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the ranks' losses are parts of one sum.
        self.engine.backward(loss * self.world)
        # engine.forward() would do this before the next pass; train.forward calls the module itself.
        self.engine.optimizer.clear_backward_seen_flag()

    def step(self) -> tuple[float, bool]:
        self.optimizer.skipped = False
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else math.nan
        skipped = self.optimizer.skipped or not math.isfinite(norm)  # non-finite: ZeRO skipped it itself
        if skipped:
            self.skipped_steps += 1
        self.scheduler.step()  # the schedule advances either way, as in the torch backend
        return norm, skipped

    def _should_skip(self) -> bool:
        # The pre-clip global norm ZeRO computed just before calling the inner optimizer.
        norm = float(getattr(self.engine.optimizer, "_global_grad_norm", 0.0) or 0.0)
        limit = self.config.skip_grad_norm_above
        return not math.isfinite(norm) or (limit is not None and norm > limit)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        # Optimizer moments are partitioned across ranks: save_shards writes them, every rank its own.
        return {"scheduler": self.scheduler.state_dict(), "skipped_steps": self.skipped_steps}

    def save_shards(self, directory: Path) -> None:
        """Collective: each rank writes its optimizer partition (and fp32 master weights) in
        DeepSpeed's own format, so a resumed run continues Adam's moments."""
        self.engine.save_checkpoint(str(directory), tag="zero", save_latest=False)

    def load_shards(self, directory: Path) -> None:
        try:
            with config_hyperparameters(self.optimizer, self.scheduler):  # as in the torch backend
                self.engine.load_checkpoint(str(directory), tag="zero", load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        except Exception as e:  # e.g. a different number of processes than when it was saved
            raise RuntimeError(f"{directory}: cannot load the DeepSpeed optimizer shards ({e}). They must come "
                               "from the same number of processes and ZeRO stage; delete the directory to resume "
                               "from the HF weights with fresh optimizer moments.") from e

    def load_state_dict(self, state: dict) -> None:
        with config_hyperparameters(self.optimizer, self.scheduler):
            self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = state.get("skipped_steps", 0)

    # --- what the engine asks of a distributed backend -------------------------------------------

    def prepare_reference(self, model, *, full_head: bool = False):
        """The frozen reference model: partitioned for inference under ZeRO-3, as is otherwise.

        ``full_head``: keep a whole, unpartitioned copy of its LM head (V×H: about 1 GiB for a
        7B model in bf16). A full-vocabulary loss calls the reference head once per chunk of
        positions, again when backward recomputes a checkpointed chunk; those counts differ
        between ranks, and a partitioned head would all-gather on every call.
        """
        if self.stage != 3:
            return model
        import deepspeed

        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
               "bf16": self.ds_config.get("bf16", {"enabled": False}), "steps_per_print": 2**62}
        engine, _, _, _ = deepspeed.initialize(model=model, config=cfg)
        module = engine.module.eval()
        head = module.get_output_embeddings()
        if full_head and isinstance(head, torch.nn.Linear):
            with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
                w = head.weight
                full = torch.nn.Linear(w.shape[1], w.shape[0], bias=head.bias is not None, device=w.device, dtype=w.dtype)
                full.load_state_dict({k: v.detach().clone() for k, v in head.state_dict().items()})
            module.set_output_embeddings(full.requires_grad_(False))
        return module

    def consolidated_model(self):
        """What rank 0 saves as HF weights. Collective under ZeRO-3 (every rank must call it):
        parameters are gathered one at a time into a CPU state dict, never the whole model per GPU."""
        if self.stage != 3:
            return self.model
        import deepspeed

        state = {}
        for name, p in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if D.is_main():
                    state[name] = p.data.detach().to("cpu", copy=True)
        return _Consolidated(self.model, state) if D.is_main() else None


class _Consolidated:
    """``save_pretrained`` of the module with the gathered (full) weights."""

    def __init__(self, module, state: dict):
        self.module, self.state = module, state

    def save_pretrained(self, path, **kw):
        return self.module.save_pretrained(path, state_dict=self.state, **kw)


def deepspeed_backend(model: Any, config: Any, total_steps: int) -> DeepSpeedBackend:
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ImportError(f"trainer.backend=deepspeed needs DeepSpeed ({e}): pip install 'posttrain[deepspeed]'") from e
    return DeepSpeedBackend(model, config, total_steps)
