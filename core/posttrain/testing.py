"""Test helpers for the core and for plugin authors.

- ``tiny_tokenizer``, ``make_tiny_model``: a character-level tokenizer and a random-weight
  Llama saved locally (no download), loaded back with ``from_pretrained``;
- ``tiny_group``, ``tiny_groups``, ``tiny_config``: verified prompt groups and a complete
  seconds-long run config on the synthetic arithmetic task;
- the conformance suite a plugin runs in its own CI: ``check_algorithm_plugin(name)`` (every
  hook on tiny groups through the engine's loss path: types, shapes, finite gradients,
  micro-batch invariance), ``check_two_step_run(name, run_dir)`` (two real training steps) and
  ``check_async_run(name, run_dir)`` (asynchronous rollouts, k = 1, and their exact resume),
  all raising ``PluginContractError`` messages of the form ``"<hook>: <rule> (<case>)"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.utils.checkpoint

from . import hookimpl
from .tiny import CHARS, SPECIALS, make_tiny_model, tiny_tokenizer  # noqa: F401  (re-exported: part of this API)
from .types import Example, PromptGroup, Trajectory

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


def tiny_rl_sft_batch() -> Any:
    """``tiny_group([1, 0, 0, 1], seed=2)`` routed to RL and SFT as one TrainBatch: GRPO advantages
    ±0.866 on the rollouts, the demonstration routed to SFT, totals with L_max = 16."""
    from . import functional as F
    from .batching import build_train_batch, totals_of
    from .types import Route

    batch = build_train_batch([tiny_group([1, 0, 0, 1], seed=2)], [Route(rl=1.0, sft=1.0)], tiny_tokenizer().pad_token_id)
    batch.advantages = F.group_advantages(batch.rewards, batch.group_index, rows=batch.rl_weight > 0)
    return batch.with_(totals=totals_of(batch, max_len=16))


def sized_group(rewards: Sequence[float], lens: Sequence[int], *, demo_lens: Sequence[int] = (3,), uid: str = "tiny:1",
                demo_reward: float | None = 1.0) -> PromptGroup:
    """A verified group with chosen token counts (EOS included), for losses computed by hand.

    Rollout i is token 10 repeated ``lens[i] − 1`` times, then EOS, sampled at log-prob −1 per
    token; demonstration t (one per entry of ``demo_lens``) is token 11 + t repeated, then EOS.
    """
    eos = tiny_tokenizer().eos_token_id
    g = tiny_group(rewards, uid=uid, demos=tuple(f"demo{t}" for t in range(len(demo_lens))), demo_reward=demo_reward)
    for m, n in zip(g.members, lens):
        m.response_ids = [10] * (n - 1) + [eos]
        m.sampling_logprobs = [-1.0] * n
    for d, n in zip(g.demonstrations, demo_lens):
        d.response_ids = [11 + d.teacher] * (n - 1) + [eos]
    return g


def fill_tokens(batch: Any, values: Sequence[Any]) -> torch.Tensor:
    """[N, L]: row i's response tokens set from ``values[i]`` (a number, or one number per token), 0 on padding."""
    out = torch.zeros(batch.response_mask.shape)
    for i, v in enumerate(values):
        n = int(batch.response_mask[i].sum())
        out[i, :n] = torch.tensor(v if isinstance(v, list) else [float(v)] * n)
    return out


@dataclass
class SplitLoss:
    """What ``split_loss`` returns: the loss summed over micro-batches, each term's sum, and the
    gradients of that loss w.r.t. the given log-probs and entropy ([N, L]; None without entropy)."""

    total: float
    parts: dict[str, float]
    logprob_grad: torch.Tensor
    entropy_grad: torch.Tensor | None


def split_loss(hook: Any, config: Any, batch: Any, split: Sequence[Sequence[int]], logprobs: torch.Tensor,
               entropy: torch.Tensor | None = None, *, needs: Any = None, max_len: float = 16,
               metrics: Any = None, step: int = 0) -> SplitLoss:
    """Run the engine's own loss path on ``batch`` split into the micro-batches ``split`` (row
    indices), with the policy's forward pass replaced by the given ``logprobs`` [N, L] (and
    ``entropy`` [N, L]). Loss tests then compare numbers and gradients with hand computations,
    and two splits of one mini-batch with each other (micro-batching must not change the update).
    ``batch.advantages`` must be set; ``max_len`` is the L_max of ``token-sum-norm``.
    """
    from unittest import mock

    from . import loss as loss_module
    from .batching import totals_of, trim_padding
    from .metrics import Metrics
    from .types import ModelOutputs, Needs

    lp = logprobs.clone().requires_grad_(True)
    ent = entropy.clone().requires_grad_(True) if entropy is not None else None
    batch = batch.with_(extras={**batch.extras, "_split_loss_row": torch.arange(len(batch))})

    def forward(model, micro, **kw):  # stands in for the policy's chunked forward pass
        rows, width = micro.extras["_split_loss_row"], micro.response_ids.shape[1]
        return ModelOutputs(logprobs=lp[rows, :width],
                            entropy=ent[rows, :width] if ent is not None else torch.zeros(len(rows), width))

    needs = needs if needs is not None else Needs(entropy=entropy is not None)
    metrics = metrics if metrics is not None else Metrics()
    totals = totals_of(batch, max_len=max_len, micro_batches=len(split))
    total, parts = 0.0, {}
    with mock.patch.object(loss_module, "policy_outputs", forward):
        for rows in split:
            micro = trim_padding(batch.select(torch.as_tensor(list(rows)))).with_(totals=totals)
            terms, _ = loss_module.micro_batch_loss(hook, config, step, None, micro, metrics, needs=needs)
            for t in terms:
                parts[t.name] = parts.get(t.name, 0.0) + float(t.value.detach())
            loss = sum(t.value for t in terms)
            loss.backward()
            total += float(loss.detach())
    return SplitLoss(total, parts, lp.grad, ent.grad if ent is not None else None)


def tiny_groups(demonstrations: bool = True) -> dict[str, PromptGroup]:
    """The cases every algorithm must handle: all wrong, mixed, all correct, two teachers.

    ``demonstrations=False`` gives the same rollouts for prompts that have no demonstration
    (plain RL data: the gates of HPT-like algorithms must fall back to something sensible).
    """
    def demos(*texts: str) -> tuple[str, ...]:
        return texts if demonstrations else ()

    return {
        "all_wrong": tiny_group([0, 0, 0, 0], demos=demos("1+1=2 \\boxed{2}"), uid="tiny:1", seed=1),
        "mixed": tiny_group([1, 0, 0, 1], demos=demos("1+1=2 \\boxed{2}"), uid="tiny:2", seed=2),
        "all_correct": tiny_group([1, 1, 1, 1], demos=demos("1+1=2 \\boxed{2}"), uid="tiny:3", seed=3),
        "two_teachers": tiny_group([0, 1, 0, 0], demos=demos("2+2=4 \\boxed{4}", "2 plus 2 is 4 \\boxed{4}"),
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
#
# Two entry points for a plugin's own tests:
#   check_algorithm_plugin(name)     hooks on tiny groups/batches through the engine's loss path
#   check_two_step_run(name, dir)    two real training steps on the tiny model, synthetic task
# Both register a ContractChecker: outermost wrappers that check what every hook returns, so a
# failure says which hook broke which rule, in which tiny case or at which step.


class PluginContractError(AssertionError):
    """A plugin hook broke a rule of the contract; the message names the hook and the rule."""


def _require(cond: bool, hook: str, rule: str, where: str = "") -> None:
    if not cond:
        raise PluginContractError(f"{hook}: {rule}{where}")


def _shape(x: Any) -> str:
    return f"{type(x).__name__} {list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)


def _finite_on(x: torch.Tensor, mask: torch.Tensor) -> bool:
    return bool(torch.isfinite(x.detach()[mask]).all())


# Exceptions torch raises through hooks on purpose: non-reentrant activation checkpointing stops
# a recomputation early with one once it has what backward needs (token_distribution_loss).
_TORCH_CONTROL_FLOW = tuple(c for c in [getattr(torch.utils.checkpoint, "_StopRecomputationError", None)] if c)


class ContractChecker:
    """An in-process plugin whose outermost wrappers check every hook's result.

    Register it last (``make_plugin_manager(name, plugins=[..., ContractChecker()])`` or
    ``posttrain.run.train(cfg, plugins=[ContractChecker()])``). A hook that raises is re-raised
    as a ``PluginContractError`` naming the hook; a result that breaks the contract (type, shape,
    non-finite values, out-of-range indices) raises one naming the hook and the rule. ``case``
    labels the tiny input or run being checked and ends every message.
    """

    def __init__(self, case: str = "") -> None:
        self.case = case

    def where(self, step: Any = None) -> str:
        parts = [p for p in (self.case, None if step is None else f"step {step}") if p]
        return f" ({', '.join(parts)})" if parts else ""

    def _call(self, name: str, step: Any = None):
        """``out = yield from self._call(name)`` inside a wrapper: the hook's result, or its error named."""
        try:
            return (yield)
        except (PluginContractError, *_TORCH_CONTROL_FLOW):
            raise
        except Exception as e:  # whatever the plugin raised: say which hook raised it
            raise PluginContractError(f"{name}: raised {type(e).__name__}: {e}{self.where(step)}") from e

    # --- setup ---

    @hookimpl(wrapper=True, tryfirst=True)
    def algorithm_config(self):
        import dataclasses

        from .config import GRPOConfig

        schema = yield from self._call("algorithm_config")
        w = self.where()
        _require(isinstance(schema, type) and dataclasses.is_dataclass(schema), "algorithm_config",
                 f"must return a dataclass type, got {schema!r}", w)
        _require(issubclass(schema, GRPOConfig), "algorithm_config",
                 f"{schema.__name__} must subclass posttrain.GRPOConfig (the default hooks read its fields)", w)
        missing = [f.name for f in dataclasses.fields(schema) if not f.metadata.get("help")]
        _require(not missing, "algorithm_config", f"fields without help text: {missing} (use posttrain.help_field)", w)
        return schema

    @hookimpl(wrapper=True, tryfirst=True)
    def requirements(self, config):
        from .types import Needs

        needs = yield from self._call("requirements")
        _require(isinstance(needs, Needs), "requirements", f"must return posttrain.Needs, got {type(needs).__name__}", self.where())
        return needs

    # --- planning a step ---

    @hookimpl(wrapper=True, tryfirst=True)
    def plan_step(self, step):
        from .types import StepPlan

        plan = yield from self._call("plan_step", step)
        w = self.where(step)
        _require(plan is None or isinstance(plan, StepPlan), "plan_step", f"must return None or a StepPlan, got {plan!r:.200}", w)
        if plan is not None:
            _require(plan.prompts is None or (isinstance(plan.prompts, int) and plan.prompts >= 0), "plan_step",
                     f"StepPlan.prompts must be None or an int >= 0, got {plan.prompts!r}", w)
        return plan

    @hookimpl(wrapper=True, tryfirst=True)
    def add_groups(self, step):
        results = yield from self._call("add_groups", step)
        for r in results:  # a broadcast hook: one list (or None) per implementation
            _require(r is None or (isinstance(r, list) and all(isinstance(g, PromptGroup) for g in r)), "add_groups",
                     f"must return None or a list of PromptGroup, got {r!r:.200}", self.where(step))
        return results

    @hookimpl(wrapper=True, tryfirst=True)
    def rollout_requests(self, groups, step):
        from .types import RolloutRequest

        reqs = yield from self._call("rollout_requests", step)
        if reqs is None:  # nobody overrides it: the engine's default requests
            return None
        w = self.where(step)
        _require(isinstance(reqs, list) and len(reqs) == len(groups) and all(isinstance(q, RolloutRequest) for q in reqs),
                 "rollout_requests", f"must return one RolloutRequest per group ({len(groups)}), got {reqs!r:.200}", w)
        for q in reqs:
            _require(isinstance(q.n, int) and q.n >= 0 and all(isinstance(t, int) for t in q.prefix), "rollout_requests",
                     f"n must be an int >= 0 and prefix token ids, got {q!r:.200}", w)
        return reqs

    @hookimpl(wrapper=True, tryfirst=True)
    def select_groups(self, groups, step):
        from .types import GroupSelection

        sel = yield from self._call("select_groups", step)
        if sel is None:  # nobody overrides it: every group is kept
            return None
        w = self.where(step)
        _require(isinstance(sel, GroupSelection), "select_groups", f"must return a GroupSelection, got {sel!r:.200}", w)
        ids = {id(g) for g in groups}
        _require(all(id(g) in ids for g in sel.groups), "select_groups",
                 "GroupSelection.groups must be groups it was given (the verified ones), not new objects", w)
        _require(isinstance(sel.more, int) and sel.more >= 0, "select_groups", f"more must be an int >= 0, got {sel.more!r}", w)
        return sel

    # --- per group ---

    @hookimpl(wrapper=True, tryfirst=True)
    def compose_group(self, group, step):
        g = yield from self._call("compose_group", step)
        w = self.where(step)
        _require(isinstance(g, PromptGroup), "compose_group", f"must return a PromptGroup, got {type(g).__name__}", w)
        for i, m in enumerate(g.members):
            _require(isinstance(m, Trajectory), "compose_group", f"members[{i}] must be a Trajectory, got {type(m).__name__}", w)
            _require(len(m.response_ids) > 0 and all(isinstance(t, int) for t in m.response_ids), "compose_group",
                     f"members[{i}].response_ids must be a non-empty list of token ids", w)
        return g

    @hookimpl(wrapper=True, tryfirst=True)
    def route_group(self, group, step):
        import math

        from .types import Route

        r = yield from self._call("route_group", step)
        w = self.where(step)
        _require(isinstance(r, Route), "route_group", f"must return a Route, got {type(r).__name__}", w)
        _require(math.isfinite(r.rl) and math.isfinite(r.sft) and r.rl >= 0 and r.sft >= 0, "route_group",
                 f"weights must be finite and >= 0, got {r}", w)
        if r.kind == "drop":
            return r
        if r.sft > 0:
            k = len(group.demonstrations)
            _require(len(r.demos) > 0 and all(0 <= d < k for d in r.demos), "route_group",
                     f"Route.demos={r.demos} names demonstrations the group does not have (it has {k}); "
                     "check group.demonstrations before routing to SFT", w)
        if r.members is not None:
            n = len(group.members)
            _require(all(0 <= i < n for i in r.members), "route_group",
                     f"Route.members={r.members} names members the group does not have (it has {n})", w)
        return r

    # --- per batch ---

    @hookimpl(wrapper=True, tryfirst=True)
    def compute_advantage(self, batch, step):
        adv = yield from self._call("compute_advantage", step)
        w = self.where(step)
        n_l = tuple(batch.response_ids.shape)
        _require(isinstance(adv, torch.Tensor) and tuple(adv.shape) in (n_l[:1], n_l), "compute_advantage",
                 f"must return [N] or [N, L], got {_shape(adv)} for N, L = {n_l}", w)
        _require(adv.is_floating_point(), "compute_advantage", f"must be a float tensor, got {adv.dtype}", w)
        _require(bool(torch.isfinite(adv).all()), "compute_advantage", "returned non-finite advantages", w)
        return adv

    @hookimpl(wrapper=True, tryfirst=True)
    def reference_denominator(self, batch, logprobs, step):
        denom = yield from self._call("reference_denominator", step)
        w = self.where(step)
        _require(isinstance(denom, torch.Tensor) and denom.shape == logprobs.shape, "reference_denominator",
                 f"must return log π_ref of the logprobs' shape {list(logprobs.shape)} [N, L], got {_shape(denom)}", w)
        _require(_finite_on(denom, batch.response_mask), "reference_denominator", "non-finite values on response tokens", w)
        return denom

    @hookimpl(wrapper=True, tryfirst=True)
    def shape_ratio(self, batch, ratio, step):
        shaped = yield from self._call("shape_ratio", step)
        w = self.where(step)
        _require(isinstance(shaped, torch.Tensor) and shaped.shape == ratio.shape, "shape_ratio",
                 f"must return f(ρ) of the ratio's shape {list(ratio.shape)} [N, L], got {_shape(shaped)}", w)
        _require(_finite_on(shaped, batch.response_mask), "shape_ratio", "non-finite values on response tokens", w)
        return shaped

    @hookimpl(wrapper=True, tryfirst=True)
    def stabilization_mask(self, ratio, step):
        masks = yield from self._call("stabilization_mask", step)
        for m in masks:  # a broadcast hook: one result per implementation, None = no opinion
            _require(isinstance(m, torch.Tensor) and m.dtype == torch.bool and m.shape == ratio.shape, "stabilization_mask",
                     f"must return None or a bool tensor {list(ratio.shape)} [N, L], got "
                     f"{_shape(m)}{f' {m.dtype}' if isinstance(m, torch.Tensor) else ''}", self.where(step))
        return masks

    @hookimpl(wrapper=True, tryfirst=True)
    def minibatch_statistics(self, step):
        import math

        results = yield from self._call("minibatch_statistics", step)
        for r in results:
            _require(r is None or (isinstance(r, dict) and all(
                isinstance(v, tuple) and len(v) == 2 and all(math.isfinite(float(x)) for x in v) for v in r.values())),
                "minibatch_statistics", f"must return None or {{name: (sum, count)}} of finite numbers, got {r!r:.200}",
                self.where(step))
        return results

    @hookimpl(wrapper=True, tryfirst=True)
    def token_distribution_loss(self, labels, step):
        out = yield from self._call("token_distribution_loss", step)
        w = self.where(step)
        _require(isinstance(out, torch.Tensor) and out.shape == labels.shape, "token_distribution_loss",
                 f"must return a per-token loss of the labels' shape {list(labels.shape)} [n, c], got {_shape(out)}", w)
        _require(bool(torch.isfinite(out.detach()).all()), "token_distribution_loss", "returned non-finite values", w)
        return out

    @hookimpl(wrapper=True, tryfirst=True)
    def build_loss(self, step):
        from .types import LossTerm

        terms = yield from self._call("build_loss", step)
        w = self.where(step)
        _require(isinstance(terms, list) and all(isinstance(t, LossTerm) for t in terms), "build_loss",
                 f"must return a list of posttrain.LossTerm, got {terms!r:.200}", w)
        names = [t.name for t in terms]
        _require(len(set(names)) == len(names), "build_loss", f"term names must be unique (they become loss/<name> metrics): {names}", w)
        for t in terms:
            _require(isinstance(t.name, str) and t.name != "", "build_loss", f"term name must be a non-empty string, got {t.name!r}", w)
            _require(isinstance(t.value, torch.Tensor) and t.value.dim() == 0, "build_loss",
                     f"term {t.name!r} must be a scalar tensor, got {_shape(t.value)}", w)
            _require(bool(torch.isfinite(t.value.detach())), "build_loss", f"term {t.name!r} is {float(t.value.detach())}", w)
            _require(isinstance(t.metrics, dict) and all(isinstance(v, (int, float, torch.Tensor)) for v in t.metrics.values()),
                     "build_loss", f"term {t.name!r}: metrics must map names to numbers, got {t.metrics!r:.200}", w)
        return terms

    # --- lifecycle: results are ignored, exceptions are named ---

    @hookimpl(wrapper=True, tryfirst=True)
    def on_train_start(self):
        return (yield from self._call("on_train_start"))

    @hookimpl(wrapper=True, tryfirst=True)
    def on_rollout_end(self, step):
        return (yield from self._call("on_rollout_end", step))

    @hookimpl(wrapper=True, tryfirst=True)
    def on_step_end(self, step):
        return (yield from self._call("on_step_end", step))

    @hookimpl(wrapper=True, tryfirst=True)
    def on_train_end(self):
        return (yield from self._call("on_train_end"))


CASES = ("all_wrong", "mixed", "all_correct", "two_teachers")


def check_algorithm_plugin(name: str, *, model_dir: str | Path | None = None, step: int = 0,
                           plugins: Sequence[Any] = ()) -> dict[str, Any]:
    """Run an installed algorithm's hooks on tiny inputs through the engine's own code path.

    Checks, with every hook's result checked by a ``ContractChecker``:

    - the config dataclass: subclasses ``GRPOConfig``, help text on every field, ``name``
      defaults to the entry-point name, its defaults validate like a YAML section;
    - ``requirements``, ``compose_group``, ``on_rollout_end``, ``route_group``,
      ``compute_advantage``, then ``reference_denominator`` → ``shape_ratio`` →
      ``stabilization_mask`` → (``token_distribution_loss``) → ``build_loss`` → backward on:
      all four tiny groups together (all wrong, mixed, all correct, two teachers), the same
      groups without demonstrations, and each group alone, with and without demonstrations;
    - finite loss terms and gradients everywhere; a non-zero gradient on the four groups;
    - micro-batch invariance: the loss and gradients of the four groups (with and without
      demonstrations) are the same as one micro-batch, split per prompt, and split every 3
      rows, across groups (per prompt only when ``Needs.whole_groups``).

    Raises ``PluginContractError`` naming the hook, the rule and the case. Returns a report:
    ``loss``, ``terms``, ``rows``, ``routes`` and ``needs`` of the four groups together, and
    ``cases``: the same numbers for every other case.
    """
    import dataclasses
    import tempfile

    from transformers import AutoModelForCausalLM

    from .config import validate_algorithm
    from .plugins import bind_plugins, make_plugin_manager, stateful_plugins

    checker = ContractChecker("setup")
    pm = make_plugin_manager(name, plugins=[*plugins, checker])  # ``plugins``: extra in-process ones; the checker last
    hook = pm.hook
    schema = hook.algorithm_config()
    name_field = {f.name: f for f in dataclasses.fields(schema)}.get("name")
    _require(name_field is not None and name_field.default == name, "algorithm_config",
             f"{schema.__name__}.name must default to the entry-point name '{name}', "
             f"got {getattr(name_field, 'default', None)!r}")
    try:
        config = schema()
    except Exception as e:  # a __post_init__ that rejects the defaults
        raise PluginContractError(f"algorithm_config: {schema.__name__}() with its defaults raised {type(e).__name__}: {e}") from e
    _, problems = validate_algorithm({"name": name}, schema, f"algorithm '{name}'")
    _require(not problems, "algorithm_config", f"its defaults do not validate as a config section: {problems}")
    bind_plugins(pm, config)
    needs = hook.requirements(config=config)
    hook.on_train_start(config={"algorithm": dataclasses.asdict(config)}, run_dir=tempfile.gettempdir())

    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir or make_tiny_model(Path(tmp) / "model")
        model = AutoModelForCausalLM.from_pretrained(path)
        reference = AutoModelForCausalLM.from_pretrained(path).eval() if (needs.reference or needs.reference_vocab) else None

    def batch_of(label: str, groups: list[PromptGroup]) -> tuple[Any, list[str]]:
        """Compose, 'verify', route and batch the groups the way a step does; (batch or None, route kinds)."""
        checker.case = label
        return _routed_batch(hook, config, needs, groups, step, reference)

    whole, cases = None, {}
    for demos in (True, False):
        suffix = "" if demos else ", no demonstrations"
        batch, kinds = batch_of(f"all cases{suffix}", list(tiny_groups(demos).values()))
        if demos:
            _require(batch is not None, "route_group", "dropped every tiny group; the check needs at least one routed row",
                     checker.where())
        entry = {"routes": kinds, "rows": 0 if batch is None else len(batch)}
        if batch is not None:
            loss, parts, grads = _loss(hook, config, step, needs, model, reference, batch, [torch.arange(len(batch))], checker)
            if demos:
                _require(any(bool(g.abs().sum() > 0) for g in grads), "build_loss",
                         "the loss has no gradient on the tiny batch", checker.where())
            _check_invariance(hook, config, step, needs, model, reference, batch, loss, grads, checker)
            entry.update(loss=loss, terms=parts)
        if demos:
            whole = entry
        else:
            cases[f"all cases{suffix}"] = entry
        for case in CASES:  # each group alone: catches 0/0 when a kind of row is absent from the batch
            batch, kinds = batch_of(f"{case}{suffix}", [tiny_groups(demos)[case]])
            entry = {"routes": kinds, "rows": 0 if batch is None else len(batch)}
            if batch is not None:
                loss, parts, _ = _loss(hook, config, step, needs, model, reference, batch, [torch.arange(len(batch))], checker)
                entry.update(loss=loss, terms=parts)
            cases[f"{case}{suffix}"] = entry
    hook.on_step_end(step=step + 1, metrics={"loss/total": whole.get("loss", 0.0)})
    if stateful_plugins(pm):
        checker.case = "state_dict round trip"
        _check_state_round_trip(name, plugins, pm, config, needs, model, reference, step + 1, checker)
    hook.on_train_end(run_dir=tempfile.gettempdir())
    return {**whole, "needs": needs, "cases": cases}


def _check_state_round_trip(name, plugins, pm, config, needs, model, reference, step, checker):
    """A plugin restored from its ``state_dict`` (through a weights-only checkpoint load) takes
    the same next step as the instance that wrote it."""
    import io

    from .plugins import bind_plugins, load_plugin_state, make_plugin_manager, plugin_state

    buf = io.BytesIO()
    torch.save(plugin_state(pm), buf)
    buf.seek(0)
    try:
        state = torch.load(buf, weights_only=True)
    except Exception as e:
        raise PluginContractError(f"state_dict: must hold only tensors, numbers, strings, bools, None and lists / "
                                  f"tuples / dicts of those (checkpoints load with weights_only=True): {e}") from e
    restored = make_plugin_manager(name, plugins=[*plugins, ContractChecker("restored from state_dict")])
    bind_plugins(restored, config)
    load_plugin_state(restored, state)
    results = []
    for p in (pm, restored):
        batch, kinds = _routed_batch(p.hook, config, needs, list(tiny_groups().values()), step, reference)
        loss = None if batch is None else _loss(p.hook, config, step, needs, model, reference, batch,
                                                [torch.arange(len(batch))], checker)[0]
        results.append((kinds, loss))
    _require(results[0] == results[1], "state_dict",
             f"the next step differs after state_dict → load_state_dict: {results[0]} vs {results[1]}", checker.where())


def _tiny_make_group(example: Example, source: str = "buffer") -> PromptGroup:
    """``make_group`` for ``add_groups`` in the conformance check: the tiny tokenizer, no template."""
    tok = tiny_tokenizer()
    demos = [Trajectory(response_ids=tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id], text=d,
                        off_policy=True, teacher=i) for i, d in enumerate(example.demonstrations)]
    return PromptGroup(example=example, prompt_ids=tok(example.prompt, add_special_tokens=False).input_ids,
                       demonstrations=demos, source=source)


def _as_requested(group: PromptGroup, request: Any) -> None:
    """What a rollout engine would return for ``request``, made from the group's tiny rollouts."""
    import copy

    pool = group.members or []
    members = [copy.deepcopy(pool[i % len(pool)]) for i in range(request.n)] if pool else []
    for m in members:
        if request.prefix:
            m.response_ids = list(request.prefix) + m.response_ids
            m.sampling_logprobs = [0.0] * len(request.prefix) + list(m.sampling_logprobs or [])
            m.prefix_len = len(request.prefix)
        m.tag = request.tag
    group.members = members


def _routed_batch(hook, config, needs, groups, step, reference):
    """A step's hooks on tiny groups, as the engine calls them: plan, add, request, compose,
    'verify', select (one refill round), route, batch, advantage."""
    from .batching import build_train_batch, totals_of
    from .metrics import Metrics
    from .train.forward import policy_outputs
    from .types import GroupSelection, RolloutRequest, StepPlan

    metrics = Metrics()
    plan = hook.plan_step(config=config, step=step, metrics=metrics) or StepPlan()
    sampling = needs.rollouts and plan.rollouts
    for extra in hook.add_groups(config=config, step=step, metrics=metrics, make_group=_tiny_make_group):
        groups = groups + list(extra or [])

    def sample(gs):
        defaults = [RolloutRequest(n=len(g.members) if sampling and g.source == "train" else 0) for g in gs]
        for g, q in zip(gs, hook.rollout_requests(groups=gs, requests=defaults, config=config, step=step, metrics=metrics) or defaults):
            _as_requested(g, q)
        gs = [hook.compose_group(group=g, config=config, step=step, metrics=metrics) for g in gs]
        for g in gs:  # what the verifier does for members the plugin added
            for m in g.members:
                if m.reward is None:
                    m.reward = 1.0
        return gs

    groups = sample(groups)
    target = len(groups)
    sel = hook.select_groups(groups=groups, target=target, config=config, step=step, metrics=metrics) or GroupSelection(groups)
    if sel.more > 0:  # one refill round, with fresh copies of the tiny groups standing in for new prompts
        fresh = sample(list(tiny_groups(any(g.demonstrations for g in groups)).values())[:sel.more])
        sel = hook.select_groups(groups=list(sel.groups) + fresh, target=target, config=config, step=step,
                                 metrics=metrics) or GroupSelection(list(sel.groups) + fresh)
    groups = list(sel.groups)
    hook.on_rollout_end(groups=groups, step=step, metrics=metrics)
    routes = [hook.route_group(group=g, config=config, step=step, metrics=metrics) for g in groups]
    batch = build_train_batch(groups, routes, tiny_tokenizer().pad_token_id) if groups else None
    if batch is None:
        return None, [r.kind for r in routes]
    batch = batch.with_(totals=totals_of(batch, max_len=16))
    if needs.reference:  # before advantages, as in the engine (KL in the reward reads it)
        with torch.no_grad():
            batch.ref_logprobs = policy_outputs(reference, batch, temperature=1.0, chunk=4).logprobs
    batch.advantages = hook.compute_advantage(batch=batch, config=config, step=step, metrics=metrics)
    return batch, [r.kind for r in routes]


def _loss(hook, config, step, needs, model, reference, batch, split, checker):
    """(total loss, loss per term, gradients) of the batch processed as the given micro-batches."""
    from .batching import totals_of, trim_padding
    from .loss import add_statistics, finish_statistics, micro_batch_loss
    from .metrics import Metrics

    model.zero_grad(set_to_none=True)
    totals = totals_of(batch, max_len=16, micro_batches=len(split))
    sums: dict = {}
    if needs.minibatch_stats:  # the engine's statistic pass over the whole mini-batch, before its loss
        for rows in split:
            add_statistics(sums, hook, config, step, model, trim_padding(batch.select(rows)), temperature=1.0, chunk=4)
    stats = finish_statistics(sums)
    total, parts = 0.0, {}
    for rows in split:
        micro = trim_padding(batch.select(rows)).with_(totals=totals, stats=stats)
        terms, _ = micro_batch_loss(hook, config, step, model, micro, Metrics(), needs=needs, reference=reference, chunk=4)
        for t in terms:
            parts[t.name] = parts.get(t.name, 0.0) + float(t.value.detach())
        loss = sum(t.value for t in terms)
        if torch.is_tensor(loss) and loss.requires_grad:
            try:
                loss.backward()
            except PluginContractError:
                raise
            except RuntimeError as e:  # e.g. token_distribution_loss recomputed in backward
                raise PluginContractError(f"build_loss: backward through the loss failed: {e}{checker.where(step)}") from e
        total += float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    _require(all(bool(torch.isfinite(g).all()) for g in grads), "build_loss", "gradients are not finite", checker.where(step))
    return total, parts, grads


def _check_invariance(hook, config, step, needs, model, reference, batch, whole, g_whole, checker):
    """Splitting a mini-batch into micro-batches must not change the loss or the update."""
    from .batching import micro_batch_rows

    n = len(batch)
    splits = {"split per prompt": micro_batch_rows(batch, token_budget=1, whole_groups=True)}
    if not needs.whole_groups:  # micro-batches that cut through prompt groups (4 rollouts per group)
        splits["split every 3 rows"] = [torch.arange(i, min(i + 3, n)) for i in range(0, n, 3)]
    for how, split in splits.items():
        total, _, grads = _loss(hook, config, step, needs, model, reference, batch, split, checker)
        _require(abs(whole - total) <= 1e-4 * max(1.0, abs(whole)), "build_loss",
                 f"loss depends on micro-batching: {whole:.6g} as one micro-batch, {total:.6g} {how} "
                 "(normalise with batch.totals, not with counts of the micro-batch; a loss over a group's "
                 "rows needs Needs(whole_groups=True))", checker.where())
        worst = max(float((a - b).abs().max()) for a, b in zip(g_whole, grads))
        _require(worst <= 1e-4, "build_loss", f"gradient depends on micro-batching ({how}: max diff {worst:.3g})",
                 checker.where())


def check_two_step_run(name: str, run_dir: str | Path, *, model_dir: str | Path | None = None, steps: int = 2,
                       overrides: dict[str, Any] | None = None, plugins: Sequence[Any] = ()) -> dict[str, Any]:
    """Train ``name`` for ``steps`` steps on the tiny model and the synthetic arithmetic task.

    Runs ``posttrain.run.train`` (what ``posttrain train`` runs) on ``tiny_config`` with a
    ``ContractChecker`` registered, then checks one metrics row per step, finite losses and
    gradient norms, and a final checkpoint that loads with finite weights. ``model_dir``
    defaults to a fresh tiny model built in ``run_dir``; ``overrides`` are dotted keys, e.g.
    ``{"algorithm.entropy_coef": 0.01}``. Returns ``final`` (checkpoint path), ``metrics``
    (one dict per step) and ``changed`` (whether training moved the weights).
    """
    import math

    from transformers import AutoModelForCausalLM

    from .logging import read_metrics
    from .run import train

    run_dir = Path(run_dir)
    checker = ContractChecker("2-step run" if steps == 2 else f"{steps}-step run")
    (final,) = train(tiny_config(model_dir or "tiny:", run_dir, algorithm=name, steps=steps, overrides=overrides),
                     base=None, plugins=[*plugins, checker])
    rows = read_metrics(run_dir / "metrics.jsonl")
    where = checker.where()
    _require([r.get("step") for r in rows] == list(range(1, steps + 1)), "engine",
             f"expected one metrics row per step {list(range(1, steps + 1))}, got steps {[r.get('step') for r in rows]}", where)
    for r in rows:
        for k, v in r.items():
            if k.startswith("loss/") or k == "train/grad_norm":
                _require(v is not None and math.isfinite(v), "build_loss", f"{k} is {v} at step {r['step']}", where)
    trained = [r["step"] for r in rows if any(k.startswith("loss/") and k != "loss/total" for k in r)]
    _require(bool(trained), "build_loss", f"no step of the {steps}-step run trained on any loss term (every step's "
             "batch was empty or build_loss returned no terms): the run changed nothing", where)
    base = Path(model_dir) if model_dir else run_dir / "base-model"
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(final).state_dict()
    _require(all(bool(torch.isfinite(v).all()) for v in after.values()), "build_loss",
             f"the final checkpoint {final} has non-finite weights", where)
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    return {"final": Path(final), "metrics": rows, "changed": changed}


ASYNC_K1 = {"rollout.max_staleness": 1, "rollout.is_cap": 2.0}


def check_async_run(name: str, run_dir: str | Path, *, model_dir: str | Path | None = None, steps: int = 3,
                    overrides: dict[str, Any] | None = None, plugins: Sequence[Any] = ()) -> dict[str, Any]:
    """``name`` with asynchronous rollouts (``rollout.max_staleness=1``, pipelined, ``is_cap=2``):
    ``check_two_step_run`` for ``steps`` steps, then the async resume check: the same run stopped
    after ``steps − 2`` steps and resumed must equal the uninterrupted one bit for bit (every
    metric but wall-clock times, and the final weights). The resumed part trains one step sampled
    before the stop (held by the checkpoint) and one planned and sampled after it.
    Plugins' producer-side hooks (plan_step, add_groups, rollout_requests) run one step ahead of
    the trainer side here; their state must survive the checkpoint like everything else.
    Returns ``check_two_step_run``'s report."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import CHECKPOINTS_DIR, step_dir_name
    from .logging import read_metrics
    from .run import train

    run_dir = Path(run_dir)
    if steps < 3:
        raise ValueError(f"check_async_run: steps must be >= 3, got {steps}")
    stop = steps - 2
    over = {**ASYNC_K1, "save_every": stop, **(overrides or {})}
    report = check_two_step_run(name, run_dir / "full", model_dir=model_dir, steps=steps, overrides=over, plugins=plugins)
    model = model_dir or run_dir / "full" / "base-model"
    for n in (stop, steps):  # stopped, then resumed (resume: auto)
        train(tiny_config(model, run_dir / "resumed", algorithm=name, steps=n, overrides=over), base=None, plugins=list(plugins))
    full, resumed = read_metrics(run_dir / "full" / "metrics.jsonl"), read_metrics(run_dir / "resumed" / "metrics.jsonl")
    where = f"async resume check of {name} ({run_dir})"
    _require([r["step"] for r in resumed] == [r["step"] for r in full], "engine",
             f"the resumed run logged steps {[r['step'] for r in resumed]}, the uninterrupted one {[r['step'] for r in full]}", where)
    for a, b in zip(full, resumed):
        for k in a:
            if not k.startswith(("time/", "perf/", "async/wait_s")) and a[k] != b.get(k):
                _require(False, "state_dict", f"step {a['step']}: {k} is {b.get(k)} after resuming, {a[k]} without "
                         "stopping (a plugin's state or something sampled ahead did not survive the checkpoint)", where)
    weights = [AutoModelForCausalLM.from_pretrained(d).state_dict()
               for d in (report["final"], run_dir / "resumed" / CHECKPOINTS_DIR / step_dir_name(steps))]
    _require(all(torch.equal(v, weights[1][k]) for k, v in weights[0].items()), "state_dict",
             "the resumed run's final weights differ from the uninterrupted run's", where)
    return report
