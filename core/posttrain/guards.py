"""Guards the training loop calls so that no failure is silent.

* ``NonFiniteGuard`` — weights that are not finite are refused before training; an optimizer step
  whose loss or gradient is not finite is skipped (the backend already does not apply it) and
  counted; too many in a row, or every step of a run, stop it with an error.
* ``apply_timeout_policy`` — what a verifier timeout means for the advantage (``verifier.on_timeout``).
* ``verify_within_budget`` — one step's answers verified within ``verifier.step_budget_s``.
* ``fit_prompt`` — a prompt that does not fit the model's context (``data.overlong_prompt``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from .config import ConfigError
from .metrics import Metrics
from .types import PromptGroup


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses or gradients too often to go on."""


class NonFiniteGuard:
    def __init__(self, max_skipped_steps: int, model: Any, source: str):
        self.max_skipped = max_skipped_steps
        self.consecutive = self.updates = self.skipped = 0
        bad = [n for n, p in model.named_parameters() if not bool(p.detach().isfinite().all())]
        if bad:
            # Sampling from such a model fails inside torch ("probability tensor contains nan"),
            # and an SFT loss is NaN at every step: nothing can be trained from it.
            raise ConfigError([f"model.path: {source} has non-finite (NaN/inf) weights in {len(bad)} tensor(s), "
                               f"first '{bad[0]}'; use an intact checkpoint"])

    def after_update(self, grad_norm: float, skipped: bool, loss: float, m: Metrics) -> None:
        """Count an optimizer step the backend skipped because its loss or gradient was not finite."""
        nonfinite = skipped and not (math.isfinite(grad_norm) and math.isfinite(loss))
        self.updates += 1
        self.skipped += nonfinite
        self.consecutive = self.consecutive + 1 if nonfinite else 0
        m.log("train/nonfinite_skipped", float(nonfinite), reduce="sum")
        if self.consecutive >= self.max_skipped:
            raise NonFiniteError(f"{self.consecutive} consecutive optimizer steps had a non-finite loss or gradient "
                                 f"(last loss {loss}, grad norm {grad_norm}) and were skipped "
                                 f"(trainer.max_skipped_steps={self.max_skipped}); lower trainer.lr or check the data")

    def finish(self) -> None:
        """A run whose every step was skipped trained nothing: that is a failure, not a result."""
        if self.updates and self.skipped == self.updates:
            raise NonFiniteError(f"all {self.updates} optimizer step(s) of this run had a non-finite loss or gradient "
                                 f"and were skipped: nothing was trained")


def apply_timeout_policy(groups: list[PromptGroup], policy: str, m: Metrics) -> list[PromptGroup]:
    """``verifier.on_timeout``: a timed-out answer is not a wrong one, so by default it does not
    enter its group's statistics (``drop_member``) or the group goes (``drop_group``); ``zero``
    keeps it as a reward of 0. A group left without any of its sampled answers goes too: routing
    it would train on its demonstrations alone, which is not what its algorithm asked for."""
    if policy == "zero":
        return groups
    kept, members_dropped = [], 0
    for g in groups:
        timed_out = [t for t in g.members if t.verify_status == "timeout"]
        if not timed_out:
            kept.append(g)
            continue
        if policy == "drop_member":
            had_on_policy = bool(g.on_policy)
            g.members = [t for t in g.members if t.verify_status != "timeout"]
            members_dropped += len(timed_out)
            if g.members and (g.on_policy or not had_on_policy):
                kept.append(g)
    m.log("verify/dropped_members", members_dropped, reduce="sum")
    m.log("verify/dropped_groups", len(groups) - len(kept), reduce="sum")
    return kept


def verify_within_budget(verifier: Any, items: list[tuple[str, str]], budget_s: float | None) -> list:
    """``verifier.verify(items)``, giving it ``budget_s`` for all of them when it takes one
    (the built-in ``math`` verifier; plugin verifiers may accept ``budget_s`` too)."""
    if budget_s is not None and "budget_s" in inspect.signature(verifier.verify).parameters:
        return verifier.verify(items, budget_s=budget_s)
    return verifier.verify(items)


class PromptFit:
    """``data.overlong_prompt``: a prompt must leave ``rollout.max_new_tokens`` positions of the
    model's context (``max_position_embeddings``) for the response. Past that, positions the model
    never learned are used and the run trains on garbage without a word, so: ``error`` names the
    row; ``truncate_left`` keeps the prompt's last tokens (the question usually ends it);
    ``skip`` leaves it out of training steps (evaluation still scores it, truncated, so the
    denominator stays). Either way the prompt is counted in ``data/overlong_prompts``.
    ``data.max_prompt_tokens`` stays a hard limit whatever the policy."""

    def __init__(self, config: Any, model_config: Any, rollouts: bool = True):
        self.policy = config.data.overlong_prompt
        self.max_prompt_tokens = config.data.max_prompt_tokens
        self.max_new = config.rollout.max_new_tokens if rollouts else 0  # offline: nothing is generated
        self.context = getattr(model_config, "max_position_embeddings", None)
        self.room = self.context - self.max_new if self.context else None
        if self.room is not None and self.room < 1:
            raise ConfigError([f"rollout.max_new_tokens: {self.max_new} leaves no room for a prompt in the model's "
                               f"{self.context} positions (max_position_embeddings); lower it or use a model with a longer context"])
        self.overlong: set[str] = set()  # uids truncated or skipped

    def __call__(self, ids: list[int], uid: str, prompt_key: str = "prompt") -> list[int]:
        if len(ids) > self.max_prompt_tokens:
            from .data import DataError

            raise DataError(f"{uid}: field '{prompt_key}' is {len(ids)} tokens after templating, "
                            f"over data.max_prompt_tokens={self.max_prompt_tokens}")
        if self.room is None or len(ids) <= self.room:
            return ids
        if self.policy == "error":
            from .data import DataError

            raise DataError(f"{uid}: field '{prompt_key}' is {len(ids)} tokens after templating; with "
                            f"rollout.max_new_tokens={self.max_new} the model's {self.context} positions leave {self.room}. "
                            f"Shorten it, lower rollout.max_new_tokens, or set data.overlong_prompt=truncate_left | skip")
        self.overlong.add(uid)
        return ids[-self.room:]

    def drop_skipped(self, groups: list[PromptGroup], m: Metrics) -> list[PromptGroup]:
        m.log("data/overlong_prompts", sum(g.example.uid in self.overlong for g in groups), reduce="sum")
        return [g for g in groups if g.example.uid not in self.overlong] if self.policy == "skip" else groups
