"""A stage's models: the policy, the frozen reference, and LoRA adapters (``model.lora``, via peft).

Full fine-tuning: the policy loads from the checkpoint being resumed (else ``model.path``); the
reference is a second, frozen copy of ``model.path``.

LoRA: the policy is ``model.path`` frozen, plus trainable adapters (``get_peft_model``, or the
adapters of the checkpoint being resumed). The reference is the same module with its adapters
switched off (``AdaptersOff``): the base never changes, so π_ref needs no second copy in memory.
A LoRA checkpoint holds the adapter (``adapter_config.json`` + ``adapter_model.safetensors``:
``PeftModel.from_pretrained`` and transformers load it on its base) and, with
``model.lora.save_merged``, the merged full weights in ``merged/``. ``load_pretrained`` reads
either kind of directory, so a later stage can start from a LoRA stage's checkpoint.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import ConfigError
from .logging import hf_bars, on_terminal

ADAPTER_CONFIG = "adapter_config.json"  # peft's file name: its presence marks an adapter checkpoint
MERGED_DIR = "merged"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ConfigError([f"model.lora: needs the peft package ({e}): pip install 'posttrain[lora]'"]) from None
    return peft


def is_peft(model: Any) -> bool:
    """A peft-wrapped model (without importing peft when it is not installed)."""
    return type(model).__module__.startswith("peft.")


def load_pretrained(path: str | Path, dtype: torch.dtype):
    """A plain causal LM from an HF directory, or from a LoRA checkpoint: its base (itself
    possibly a LoRA checkpoint) with the adapter merged in."""
    from transformers import AutoModelForCausalLM

    adapter, merged = Path(path) / ADAPTER_CONFIG, Path(path) / MERGED_DIR
    if not adapter.is_file():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if (merged / "config.json").is_file():  # save_merged wrote the sum already (and vLLM can load it by path)
        return AutoModelForCausalLM.from_pretrained(merged, dtype=dtype)
    base = load_pretrained(json.loads(adapter.read_text())["base_model_name_or_path"], dtype)
    model = _peft().PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    model.name_or_path = model.config._name_or_path = str(path)  # an adapter trained on it names this as its base
    return model


def peft_config(lora: Any):
    """peft's LoraConfig from ``model.lora``."""
    return _peft().LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                              target_modules=list(lora.target_modules) or "all-linear", task_type="CAUSAL_LM")


def build_models(config: Any, *, device: torch.device, needs_reference: bool, resume_from: Path | None):
    """(policy in train mode, frozen reference or None) for a stage. ``config``: the RunConfig.
    transformers' "Loading weights" bars are shown on a terminal only (a log file keeps no \\r)."""
    with hf_bars(on_terminal()), warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing; nothing for the user to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _build_models(config, device=device, needs_reference=needs_reference, resume_from=resume_from)


def _build_models(config: Any, *, device: torch.device, needs_reference: bool, resume_from: Path | None):
    m = config.model
    dtype = getattr(torch, m.dtype)
    if m.lora is None:
        model = load_pretrained(resume_from or m.path, dtype).to(device)
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        reference = None
        if needs_reference:
            # The stage's initial weights, also after a resume: π_ref must not drift.
            reference = load_pretrained(m.path, dtype).to(device).eval()
            reference.requires_grad_(False)
        return model, reference

    _check_lora(config)
    peft = _peft()
    base = load_pretrained(m.path, dtype).to(device)
    if m.gradient_checkpointing:
        base.gradient_checkpointing_enable()  # peft then makes the frozen embeddings' output require grad
    if resume_from is not None:
        model = peft.PeftModel.from_pretrained(base, str(resume_from), is_trainable=True)
    else:
        model = peft.get_peft_model(base, peft_config(m.lora))
    model.train()
    return model, (AdaptersOff(model) if needs_reference else None)


def _check_lora(config: Any) -> None:
    lora, t = config.model.lora, config.trainer
    problems = []
    if lora.rank < 1:
        problems.append(f"model.lora.rank: must be >= 1, got {lora.rank}")
    if not 0 <= lora.dropout < 1:
        problems.append(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if t.backend == "deepspeed" and t.zero_stage == 3:
        # ZeRO-3 would partition the reference too (prepare_reference), and here it is the policy itself.
        problems.append("model.lora: not supported with trainer.zero_stage=3; use 1 or 2 (the adapters' optimizer "
                        "state is small, and the frozen base is not partitioned)")
    if problems:
        raise ConfigError(problems)


class AdaptersOff:
    """The base model inside a peft model, as the frozen reference: every forward runs with the
    adapters disabled and in eval mode. It offers what the engine's forward passes use
    (``get_decoder``, ``get_output_embeddings``, calling it, ``parameters``, ``config``)."""

    def __init__(self, model: Any):
        self.model = model

    @contextmanager
    def _off(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield
        finally:
            self.model.train(was_training)

    def _wrap(self, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._off():
                return fn(*args, **kwargs)

        return call

    def get_decoder(self) -> Any:
        return self._wrap(self.model.get_decoder())

    def get_output_embeddings(self) -> Any:
        head = self.model.get_output_embeddings()
        if head is None:
            return None
        if isinstance(head, torch.nn.Linear):  # no adapter on it (peft's all-linear leaves the LM head alone)
            # Its weight, not the module: while the policy's loss runs, the engine has patched this very
            # module's forward (train.forward: one head call per pass), and the reference reads it inside.
            return lambda x: torch.nn.functional.linear(x, head.weight, head.bias)
        return self._wrap(head)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self.model)(*args, **kwargs)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    @property
    def config(self) -> Any:
        return self.model.config

    def eval(self) -> AdaptersOff:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdaptersOff:
        return self  # the base is frozen already; the adapters belong to the policy


# --- weights out: checkpoints and inference engines ----------------------------------------------


def merged_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the plain model's parameters with the active adapters added (W + ΔW),
    under the base model's own parameter names; the model itself is left unchanged (merging
    in place and back would round bf16 weights)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapted = {name: mod for name, mod in base.named_modules() if isinstance(mod, LoraLayer)}
    with torch.no_grad():
        for name, p in base.named_parameters():
            if ".lora_" in name:
                continue
            owner, _, leaf = name.rpartition(".")
            if owner.endswith(".base_layer") and owner[: -len(".base_layer")] in adapted:
                owner = owner[: -len(".base_layer")]
                layer = adapted[owner]
                if leaf == "weight" and not layer.disable_adapters:
                    p = p + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            yield f"{owner}.{leaf}", p.detach()


class _CheckpointView:
    """What ``checkpoint.save_checkpoint`` calls ``save_pretrained`` on: the model's own files
    (a LoRA policy: its adapter), with ``save_merged`` also a full HF model (weights + tokenizer)
    in ``merged/``; quietly (no "Writing model shards" bar, no DeepSpeed import)."""

    def __init__(self, model: Any, tokenizer: Any, save_merged: bool):
        self.model, self.tokenizer, self.save_merged = model, tokenizer, save_merged

    def save_pretrained(self, path: str | Path, **kw: Any) -> None:
        with quiet_save():
            self._save(Path(path), **kw)

    def _save(self, path: Path, **kw: Any) -> None:
        self.model.save_pretrained(path, **kw)
        if self.save_merged:
            out = Path(path) / MERGED_DIR
            base = self.model.get_base_model()
            state = dict(merged_weights(self.model))
            for name, t in base.state_dict().items():  # persistent buffers, and tied weights under their second name
                if ".lora_" not in name:
                    state.setdefault(name.replace(".base_layer", ""), t)
            base.save_pretrained(out, state_dict=state, **kw)
            self.tokenizer.save_pretrained(out)


def for_checkpoint(model: Any, tokenizer: Any, lora: Any) -> Any:
    """The object whose ``save_pretrained`` writes a checkpoint's model files."""
    return _CheckpointView(model, tokenizer, save_merged=lora is not None and lora.save_merged)


@contextmanager
def quiet_save() -> Iterator[None]:
    """Around ``save_pretrained``: no "Writing model shards" bar, no DeepSpeed import."""
    with hf_bars(False), _no_deepspeed_probe():
        yield


@contextmanager
def _no_deepspeed_probe() -> Iterator[None]:
    """save_pretrained unwraps the model through accelerate, which imports deepspeed whenever it is
    installed, to recognise a DeepSpeedEngine: a second of import and a "Setting accelerator to
    CPU" warning on every run. A model cannot be a DeepSpeedEngine unless deepspeed was imported,
    so until then accelerate is told it is absent."""
    import sys

    try:
        import accelerate.utils.other as acc
    except ImportError:  # no accelerate: transformers unwraps by itself, without deepspeed
        yield
        return
    probe = acc.is_deepspeed_available
    acc.is_deepspeed_available = lambda: "deepspeed" in sys.modules and probe()
    try:
        yield
    finally:
        acc.is_deepspeed_available = probe
