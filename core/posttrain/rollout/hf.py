"""The default rollout engine: a KV-cached decode loop on the policy itself (CPU works).

Faster than ``model.generate`` for n samples per prompt, and sampling exactly what the config
says:

* each distinct prompt is prefilled once and its KV cache copied to its n samples;
* a sequence that emitted EOS leaves the decode batch (its cache rows are dropped), so the
  batch shrinks instead of decoding padding to the longest response;
* tokens are drawn from softmax(z / T), restricted only by top-p and by top-k when asked for
  (transformers' warpers, called directly: no generic logits-processor stack and no hidden
  default top-k of 50);
* the log-prob of each sampled token, log softmax(z / T)[token], is computed from the same
  logits, without keeping a [B, T, V] stack of them.

Under ZeRO-3 every rank must join every forward until all have finished, which transformers'
``generate`` arranges (synced_gpus); there the engine uses ``generate`` with the same sampling
settings.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from ..logging import progress as progress_bar
from ..types import Trajectory
from .base import SamplingParams


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
        flat = [i for i in range(len(prompts)) for _ in range(params.n)]
        out: list[Trajectory] = []
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling; log-probs must describe what we sampled
        chunk_fn = self._generate_synced if _zero3(self.model) else self._decode_chunk
        try:
            bar = progress_bar(total=len(flat), desc="rollout", enabled=progress)
            for start in range(0, len(flat), self.batch_size):
                chunk = flat[start : start + self.batch_size]
                out.extend(self._trajectory(toks, lps) for toks, lps in chunk_fn(prompts, chunk, params))
                bar.update(len(chunk))
            bar.close()
        finally:
            self.model.train(was_training)
        return [out[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _trajectory(self, toks: list[int], lps: list[float]) -> Trajectory:
        finished = self.eos_id in toks
        n = toks.index(self.eos_id) + 1 if finished else len(toks)
        return Trajectory(response_ids=toks[:n], text=self.tokenizer.decode(toks[:n], skip_special_tokens=True),
                          sampling_logprobs=lps[:n], finished=finished)

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues from the last column
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        return ids, mask

    def _decode_chunk(self, prompts: list[list[int]], chunk: list[int], params: SamplingParams):
        """(tokens, log-probs) for each sequence of ``chunk`` (indices into ``prompts``)."""
        device = next(self.model.parameters()).device
        unique = sorted(set(chunk))
        ids, mask = self._left_pad([prompts[i] for i in unique])
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses for left-padded rows
        cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache, last_only=True)  # [U, V]
        # Every sample of a prompt starts from the prompt's one prefill.
        expand = torch.tensor([unique.index(i) for i in chunk], device=device)
        cache.batch_select_indices(expand)
        logits, mask, next_pos = logits[expand], mask[expand], pos[expand, -1] + 1

        B = len(chunk)
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        rows = torch.arange(B, device=device)  # which sequence each row of the decode batch is
        for t in range(params.max_new_tokens):
            tok, lp = sample(logits, params)
            for r, k, v in zip(rows.tolist(), tok.tolist(), lp.tolist()):
                toks[r].append(k)
                lps[r].append(v)
            if t == params.max_new_tokens - 1:
                break
            live = tok != self.eos_id
            if not bool(live.all()):  # finished sequences leave the batch, and their cache rows with them
                keep = live.nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits = self._forward(tok[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        return zip(toks, lps)

    def _forward(self, ids, mask, pos, cache, last_only: bool = False) -> torch.Tensor:
        kw = {_cache_kwarg(self.model): cache}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1 if last_only else 0, **kw)
        return out.logits[:, -1]

    def _generate_synced(self, prompts: list[list[int]], chunk: list[int], params: SamplingParams):
        """``model.generate`` (ZeRO-3: synced_gpus), with exactly the same sampling settings."""
        device = next(self.model.parameters()).device
        ids, mask = self._left_pad([prompts[i] for i in chunk])
        greedy = params.temperature <= 0
        gen = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=0 if greedy else params.top_k,  # 0: off. None would mean transformers' default of 50
            max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        res = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen)
        seq = res.sequences[:, ids.shape[1]:].cpu()  # [B, T]
        temp = 1.0 if greedy else params.temperature
        # One [B, V] step at a time: a stacked [B, T, V] float copy would double peak memory.
        logp = torch.stack([
            torch.log_softmax(step.float() / temp, dim=-1).gather(-1, seq[:, t, None].to(step.device)).squeeze(-1).cpu()
            for t, step in enumerate(res.logits)
        ], dim=1)  # [B, T]
        return zip(seq.tolist(), logp.tolist())


def sample(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of [B, V] ``logits``; return (tokens [B], log softmax(z/T)[token] [B]).

    Greedy (temperature 0) takes the argmax and reports log softmax(z). Otherwise the token is
    drawn from softmax(z/T) restricted to the top-k (``params.top_k`` > 0) and the top-p
    nucleus (``params.top_p`` < 1), renormalised; the reported log-prob is that of the full
    softmax(z/T), which is what the trainer recomputes (equal to it when top-p = 1, top-k = 0).
    """
    greedy = params.temperature <= 0
    z = logits.float() / (1.0 if greedy else params.temperature)
    logp = torch.log_softmax(z, dim=-1)
    if greedy:
        tok = z.argmax(-1)
    else:
        w = z
        if params.top_k > 0:
            w = TopKLogitsWarper(top_k=params.top_k)(None, w)
        if params.top_p < 1.0:
            w = TopPLogitsWarper(top_p=params.top_p)(None, w)
        tok = torch.multinomial(torch.softmax(w, dim=-1), 1).squeeze(1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(1)


@functools.lru_cache(maxsize=8)
def _cache_kwarg_of(forward_fn) -> str:
    return "cache" if "cache" in inspect.signature(forward_fn).parameters else "past_key_values"


def _cache_kwarg(model) -> str:
    """transformers 5 names the KV-cache argument ``cache``; earlier versions ``past_key_values``."""
    return _cache_kwarg_of(type(model).forward)


def _zero3(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 marks its partitioned parameters
