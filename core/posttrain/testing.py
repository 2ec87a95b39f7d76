"""Test helpers for the core and for plugin authors: tiny local models, tiny groups, and
``check_algorithm_plugin(name)``, which runs a plugin's hooks on tiny inputs and checks the
contract (types, shapes, finite gradients, micro-batch invariance)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Sequence

import torch

from .types import Example, PromptGroup, Trajectory

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer with a chat template; no download."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                 unk_token="<unk>", padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_tiny_model(path: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """Save a random-weight Llama-architecture causal LM and the tiny tokenizer to ``path``.

    Load it back with ``AutoModelForCausalLM.from_pretrained(path)`` — the same code path as a
    real checkpoint. (Llama, not Qwen2: transformers maps model_type qwen2 to Qwen2Tokenizer,
    whose byte-level pre-tokenizer would silently replace our character-level one on reload.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_group(rewards: Sequence[float], *, demos: Sequence[str] = ("1+1=2 \\boxed{2}",), prompt: str = "1+1=",
               answer: str = "2", uid: str = "tiny:1", demo_reward: float | None = 1.0, seed: int = 0) -> PromptGroup:
    """A verified group: one rollout per reward (random tokens), plus tokenized demonstrations."""
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(seed)
    members = []
    for r in rewards:
        n = int(torch.randint(2, 7, (1,), generator=g))
        ids = torch.randint(len(SPECIALS), len(tok), (n,), generator=g).tolist() + [tok.eos_token_id]
        lp = (-torch.rand(len(ids), generator=g) * 3).tolist()
        members.append(Trajectory(response_ids=ids, text=tok.decode(ids, skip_special_tokens=True), sampling_logprobs=lp, reward=float(r)))
    demo_trajs = [
        Trajectory(response_ids=tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id], text=d, off_policy=True,
                   teacher=i, reward=demo_reward)
        for i, d in enumerate(demos)
    ]
    ex = Example(prompt=prompt, answer=answer, demonstrations=list(demos), uid=uid)
    return PromptGroup(example=ex, prompt_ids=tok(prompt, add_special_tokens=False).input_ids, members=members,
                       demonstrations=demo_trajs)


def tiny_groups() -> dict[str, PromptGroup]:
    """The cases every algorithm must handle: all wrong, mixed, all correct, two teachers."""
    return {
        "all_wrong": tiny_group([0, 0, 0, 0], uid="tiny:1", seed=1),
        "mixed": tiny_group([1, 0, 0, 1], uid="tiny:2", seed=2),
        "all_correct": tiny_group([1, 1, 1, 1], uid="tiny:3", seed=3),
        "two_teachers": tiny_group([0, 1, 0, 0], demos=("2+2=4 \\boxed{4}", "2 plus 2 is 4 \\boxed{4}"),
                                   prompt="2+2=", answer="4", uid="tiny:4", seed=4),
    }


def tiny_config(model_dir: str | Path, run_dir: str | Path, *, algorithm: str = "grpo", steps: int = 2,
                overrides: dict[str, Any] | None = None) -> dict:
    """A complete run config for the tiny model on the synthetic task (seconds on a CPU)."""
    cfg = {
        "algorithm": {"name": algorithm},
        "model": {"path": str(model_dir)},
        "data": {"train": "synthetic:arithmetic?n=64&seed=0", "demo_keys": ["demos"]},
        "rollout": {"n": 4, "max_new_tokens": 16, "temperature": 1.0},
        "verifier": {"name": "math", "workers": 1, "timeout_s": 10},
        "trainer": {"steps": steps, "prompts_per_step": 4, "lr": 1e-3, "seed": 0, "micro_batch_tokens": 4096},
        "logging": {"progress": False, "console_every": 1000},
        "run_dir": str(run_dir),
    }
    for dotted, value in (overrides or {}).items():  # {"rollout.n": 8}
        node = cfg
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


# --- conformance ---------------------------------------------------------------------------------


class PluginContractError(AssertionError):
    """A plugin hook broke a rule of the contract; the message names the hook and the rule."""


def _require(cond: bool, hook: str, rule: str) -> None:
    if not cond:
        raise PluginContractError(f"{hook}: {rule}")


def check_algorithm_plugin(name: str, *, model_dir: str | Path | None = None, step: int = 0,
                           plugins: Sequence[Any] = ()) -> dict[str, Any]:
    """Run an installed algorithm's hooks on tiny inputs through the engine's own code path.

    Checks: the config dataclass (defaults, help text), ``requirements``, ``compose_group`` and
    ``route_group`` on all-wrong / mixed / all-correct / two-teacher groups, advantage shape,
    loss terms (named, scalar, finite), finite gradients, and that splitting the mini-batch into
    one micro-batch per prompt gives the same loss and gradients. Returns a small report.
    """
    import dataclasses
    import tempfile

    from transformers import AutoModelForCausalLM

    from .batching import build_train_batch, micro_batch_rows, totals_of, trim_padding
    from .loss import micro_batch_loss
    from .metrics import Metrics
    from .plugins import make_plugin_manager
    from .types import LossTerm, Needs, Route

    pm = make_plugin_manager(name, plugins=plugins)  # ``plugins``: extra in-process ones, registered last
    hook = pm.hook
    schema = hook.algorithm_config()
    _require(dataclasses.is_dataclass(schema), "algorithm_config", f"must return a dataclass type, got {schema!r}")
    missing_help = [f.name for f in dataclasses.fields(schema) if not f.metadata.get("help")]
    _require(not missing_help, "algorithm_config", f"fields without help text: {missing_help}")
    config = schema()
    needs = hook.requirements(config=config)
    _require(isinstance(needs, Needs), "requirements", f"must return Needs, got {type(needs).__name__}")

    metrics = Metrics()
    groups, routes = [], []
    for case, group in tiny_groups().items():
        if not needs.rollouts:
            group.members = []
        g = hook.compose_group(group=group, config=config, step=step, metrics=metrics)
        _require(isinstance(g, PromptGroup), "compose_group", f"must return a PromptGroup ({case})")
        for mem in g.members:  # what the verifier would do for members the plugin added
            if mem.reward is None:
                mem.reward = 1.0
        r = hook.route_group(group=g, config=config, step=step, metrics=metrics)
        _require(isinstance(r, Route), "route_group", f"must return a Route ({case}), got {type(r).__name__}")
        _require(r.rl >= 0 and r.sft >= 0, "route_group", f"weights must be >= 0 ({case}: {r})")
        groups.append(g)
        routes.append(r)

    tok = tiny_tokenizer()
    batch = build_train_batch(groups, routes, tok.pad_token_id)
    _require(batch is not None, "route_group", "dropped every tiny group; the check needs at least one routed row")
    adv = hook.compute_advantage(batch=batch, config=config, step=step, metrics=metrics)
    _require(isinstance(adv, torch.Tensor) and adv.shape in (batch.rewards.shape, batch.response_ids.shape),
             "compute_advantage", f"must return [N] or [N, L], got {getattr(adv, 'shape', adv)} for N, L = {tuple(batch.response_ids.shape)}")
    _require(bool(torch.isfinite(adv).all()), "compute_advantage", "returned non-finite advantages")
    batch.advantages = adv

    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir or make_tiny_model(Path(tmp) / "model")
        model = AutoModelForCausalLM.from_pretrained(path)
        reference = AutoModelForCausalLM.from_pretrained(path).eval() if (needs.reference or needs.reference_vocab) else None
    if needs.reference:
        with torch.no_grad():
            from .train.forward import policy_outputs

            batch.ref_logprobs = policy_outputs(reference, batch, temperature=1.0, chunk=4).logprobs

    def run(split: list[torch.Tensor]) -> tuple[float, dict[str, float], list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        totals = totals_of(batch, max_len=16, micro_batches=len(split))
        total, parts = 0.0, {}
        for rows in split:
            micro = trim_padding(batch.select(rows)).with_(totals=totals)
            terms, _ = micro_batch_loss(hook, config, step, model, micro, Metrics(), needs=needs, reference=reference, chunk=4)
            _require(isinstance(terms, list) and all(isinstance(t, LossTerm) for t in terms), "build_loss",
                     "must return a list of LossTerm")
            for t in terms:
                _require(t.value.dim() == 0, "build_loss", f"term {t.name!r} must be a scalar, got shape {tuple(t.value.shape)}")
                value = float(t.value.detach())
                _require(torch.isfinite(torch.tensor(value)).item(), "build_loss", f"term {t.name!r} is {value}")
                parts[t.name] = parts.get(t.name, 0.0) + value
            loss = sum(t.value for t in terms)
            if torch.is_tensor(loss) and loss.requires_grad:
                loss.backward()
            total += float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        return total, parts, grads

    whole, parts, g_whole = run([torch.arange(len(batch))])
    _require(all(bool(torch.isfinite(g).all()) for g in g_whole), "build_loss", "gradients are not finite")
    _require(any(bool(g.abs().sum() > 0) for g in g_whole), "build_loss", "the loss has no gradient on the tiny batch")
    per_prompt = micro_batch_rows(batch, token_budget=1, whole_groups=True)
    split, _, g_split = run(per_prompt)
    _require(abs(whole - split) <= 1e-4 * max(1.0, abs(whole)), "build_loss",
             f"loss depends on micro-batching: {whole:.6g} as one micro-batch, {split:.6g} split per prompt "
             "(normalise with batch.totals, not with counts of the micro-batch)")
    worst = max(float((a - b).abs().max()) for a, b in zip(g_whole, g_split))
    _require(worst <= 1e-4, "build_loss", f"gradient depends on micro-batching (max diff {worst:.3g})")
    return {"loss": whole, "terms": parts, "rows": len(batch), "routes": [r.kind for r in routes], "needs": needs}
