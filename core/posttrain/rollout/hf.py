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

With ``rollout.compile`` the decode runs through ``torch.compile``, ``BLOCK`` tokens per call
(forward, sample, feed back, four times: one graph), with dynamic batch size and cache length
over the same growing ``DynamicCache``, so rows still leave the batch (between blocks) and
attention still covers only the tokens written so far (a ``StaticCache`` attends over its whole
length: on a CPU that made the compiled step slower than the eager one at 64 × 128). It removes
most of the per-token Python overhead of transformers' forward after a one-off compilation of
tens of seconds (cached on disk by torch afterwards); any failure to compile logs one warning and
the engine decodes eagerly from then on. The random draws are made outside the graph, from
torch's generator, so the seed decides them in both modes.

Under ZeRO-3 every rank must join every forward until all have finished, which transformers'
``generate`` arranges (synced_gpus); there the engine uses ``generate`` with the same sampling
settings.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from .. import threads
from ..logging import progress as progress_bar
from ..types import Trajectory
from .base import SamplingParams

log = logging.getLogger(__name__)

# Tokens per compiled decode call. Each call of a compiled graph pays ~0.3 ms on a CPU (guards,
# the wrapper's Python) whatever it computes, as much as a small model's whole step: four tokens
# per call cut the decode of the tiny model at 16 × 64 from 0.61 to 0.39 ms a token (eight: 0.34,
# but twice the compilation time). A row that ends inside a block decodes to the block's end.
BLOCK = 4


class HFRolloutEngine:
    """Samples from the very module being trained, so weights are always in sync."""

    def __init__(self, model, tokenizer, batch_size: int = 64, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.compile = compile  # torch.compile'd decode step (rollout.compile)
        self._compiled = None
        self._cache_kw = _cache_kwarg(model)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sync_weights(self, model) -> None:
        self.model = model
        self._cache_kw = _cache_kwarg(model)

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
        if self.compile:
            try:
                return self._decode(prompts, chunk, params, compiled=True)
            except Exception as e:  # no compiler, an untraceable model...: eager from now on (a real bug fails there too)
                log.warning("rollout.compile: the compiled decode step failed (%s: %s); decoding eagerly from now on",
                            type(e).__name__, str(e)[:300])
                self.compile = False
        return self._decode(prompts, chunk, params, compiled=False)

    def _decode(self, prompts: list[list[int]], chunk: list[int], params: SamplingParams, *, compiled: bool):
        device = next(self.model.parameters()).device
        unique = sorted(set(chunk))
        ids, mask = self._left_pad([prompts[i] for i in unique])
        W, T, B = ids.shape[1], params.max_new_tokens, len(chunk)
        k = BLOCK if compiled else 1  # tokens per decode call
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate uses for left-padded rows
        # The attention mask of every step, preallocated (k - 1 columns beyond T for a last block
        # that runs past T): a step's mask is a slice of it. For sdpa the slice is the
        # [B, 1, 1, kv] boolean mask it reads, which transformers takes as it is instead of
        # building it again every token; other attention implementations read other formats
        # (eager adds a float mask), so they get the 2-D mask and build theirs.
        full_mask = torch.cat([mask, mask.new_ones(len(unique), T + k - 1)], dim=1)
        if _attention(self.model) == "sdpa":
            full_mask = full_mask.bool()[:, None, None, :]
        cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache, last_only=True)  # [U, V]
        # Every sample of a prompt starts from the prompt's one prefill.
        expand = torch.tensor([unique.index(i) for i in chunk], device=device)
        cache.reorder_cache(expand)
        full_mask, next_pos = full_mask[expand], pos[expand, -1:] + 1
        tok, lp = sample(logits[expand], params, _noise(params, (B, logits.shape[-1]), device))
        step = self._compiled_block() if compiled else self._block
        # Tokens past T (a last block running over) are decoded, then cut; past the model's
        # position table (learned positions) they could not be: there the rest goes token by token.
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        room = limit is None or W + T + k - 1 <= limit

        toks = torch.full((B, T + k - 1), self.pad_id, dtype=torch.long, device=device)
        lps = torch.zeros((B, T + k - 1), dtype=torch.float32, device=device)
        toks[:, 0], lps[:, 0] = tok, lp
        rows = torch.arange(B, device=device)  # which sequence each row of the decode batch is
        finished = tok == self.eos_id  # a finished row kept in the batch writes past its EOS, which is cut
        tok = tok[:, None]
        min_rows = 2 if compiled else 1  # a batch of 1 would make the compiled step specialise and recompile
        t = 1  # tokens written
        while t < T:
            threads.adapt(probe=t == 1)  # a long rollout gives its threads up to a neighbour without waiting for the step's end
            if bool(finished.any()):  # finished sequences leave the batch, and their cache rows with them
                keep = (~finished).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                if keep.numel() < min_rows:
                    keep = torch.cat([keep, finished.nonzero()[:min_rows - keep.numel(), 0]]).sort().values
                if keep.numel() < rows.numel():
                    cache.reorder_cache(keep)
                    rows, tok, full_mask, next_pos, finished = (
                        rows[keep], tok[keep], full_mask[keep], next_pos[keep], finished[keep])
            n, fn = (k, step) if t + k <= T or room else (1, self._block)
            new, lp = fn(tok, full_mask[..., :W + t + n - 1], next_pos, cache, params, n,
                         _noise(params, (n, len(rows), logits.shape[-1]), device))
            toks[rows, t:t + n], lps[rows, t:t + n] = new, lp
            finished |= (new == self.eos_id).any(1)
            tok, next_pos, t = new[:, -1:], next_pos + n, t + n
        return zip(toks[:, :T].tolist(), lps[:, :T].tolist())

    def _block(self, tok, mask, pos, cache, params, n: int, noise) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tok`` [b, 1] at positions ``pos`` [b, 1] and sample n tokens, each fed back in:
        (tokens [b, n], their log-probs [b, n]). ``mask`` ends with the n - 1 columns of the tokens
        fed after ``tok``; ``noise`` [n, b, V] is ``sample``'s (None: greedy)."""
        toks, lps = [], []
        for j in range(n):
            logits = self._forward(tok, mask[..., :mask.shape[-1] - (n - 1 - j)], pos + j, cache)
            tok, lp = sample(logits, params, None if noise is None else noise[j])
            toks.append(tok)
            lps.append(lp)
            tok = tok[:, None]
        return torch.stack(toks, 1), torch.stack(lps, 1)

    def _compiled_block(self):
        if self._compiled is None:
            # dynamic: one graph for every batch size and cache length (rows leave the batch, the
            # cache grows, prompt widths change); the first chunk pays the compilation.
            self._compiled = torch.compile(self._block, fullgraph=True, dynamic=True)
        return self._compiled

    def _forward(self, ids, mask, pos, cache, last_only: bool = False) -> torch.Tensor:
        kw = {self._cache_kw: cache}
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


def _noise(params: SamplingParams, shape: tuple[int, ...], device) -> torch.Tensor | None:
    """Exp(1) draws for ``sample`` (None when greedy): -log U with U ~ uniform [0, 1) from torch's
    generator, drawn outside any compiled graph so that the seed decides them either way."""
    return None if params.temperature <= 0 else -torch.rand(shape, device=device).log_()


def sample(logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of [B, V] ``logits``; return (tokens [B], log softmax(z/T)[token] [B]).

    Greedy (temperature 0) takes the argmax and reports log softmax(z). Otherwise the token is
    drawn from softmax(z/T) restricted to the top-k (``params.top_k`` > 0) and the top-p
    nucleus (``params.top_p`` < 1), renormalised; the reported log-prob is that of the full
    softmax(z/T), which is what the trainer recomputes (equal to it when top-p = 1, top-k = 0).

    The draw is an exponential race, argmax p_i / E_i with ``noise`` E [B, V] ~ Exp(1) i.i.d.,
    which picks i with probability exactly p_i (the smallest of independent exponentials
    E_i / p_i is the i-th with probability p_i / Σp); vLLM samples the same way. It is a third of
    ``torch.multinomial``'s time at a small batch and traces into a compiled graph.
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
        tok = (torch.softmax(w, dim=-1) / noise).argmax(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(1)


@functools.lru_cache(maxsize=8)
def _cache_kwarg_of(forward_fn) -> str:
    return "cache" if "cache" in inspect.signature(forward_fn).parameters else "past_key_values"


def _cache_kwarg(model) -> str:
    """transformers 5 names the KV-cache argument ``cache``; earlier versions ``past_key_values``."""
    return _cache_kwarg_of(type(model).forward)


def _attention(model) -> str | None:
    """The model's attention implementation (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _zero3(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 marks its partitioned parameters
