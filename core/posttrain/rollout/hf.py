"""The default rollout engine: transformers ``generate`` on the policy itself (CPU works)."""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from ..logging import progress as progress_bar
from ..types import Trajectory
from . import SamplingParams


class HFRolloutEngine:
    """Samples from the very module being trained, so weights are always in sync."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sync_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, *, progress: bool = False) -> list[list[Trajectory]]:
        # Each prompt repeated n times, contiguous, so results regroup by integer division.
        flat = [p for p in prompts for _ in range(params.n)]
        out: list[Trajectory] = []
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling; log-probs must describe what we sampled
        try:
            bar = progress_bar(total=len(flat), desc="rollout", enabled=progress)
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start : start + self.batch_size]
                out.extend(self._generate_chunk(chunk, params))
                bar.update(len(chunk))
            bar.close()
        finally:
            self.model.train(was_training)
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> list[Trajectory]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues from the last column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        greedy = params.temperature <= 0
        gen = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None,  # no hidden top-k: the sampling distribution is exactly softmax(z/T) (top-p aside)
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        res = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
        seq = res.sequences[:, width:].cpu()  # [B, T]
        temp = 1.0 if greedy else params.temperature
        # One [B, V] step at a time: a stacked [B, T, V] float copy would double peak memory.
        logp = torch.stack([
            torch.log_softmax(step.float() / temp, dim=-1).gather(-1, seq[:, t, None].to(step.device)).squeeze(-1).cpu()
            for t, step in enumerate(res.logits)
        ], dim=1)  # [B, T]
        trajs = []
        for i in range(seq.shape[0]):
            toks = seq[i].tolist()
            finished = self.eos_id in toks
            n = toks.index(self.eos_id) + 1 if finished else len(toks)
            toks = toks[:n]
            trajs.append(Trajectory(
                response_ids=toks,
                text=self.tokenizer.decode(toks, skip_special_tokens=True),
                sampling_logprobs=logp[i, :n].tolist(),
                finished=finished,
            ))
        return trajs
