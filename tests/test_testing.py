"""posttrain.testing: the tiny model factory and the conformance suite plugins run in their CI.

The suite is tested the way a plugin author meets it: deliberately broken inline plugins (a
wrong shape, a NaN, a non-LossTerm, an index out of range, a loss that depends on how the
batch is split ...) must fail with a message naming the hook, the rule and the tiny case.
"""

import dataclasses
import math

import pytest
import torch

from posttrain import GRPOConfig, LossTerm, Needs, Route, help_field, hookimpl
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.testing import (ContractChecker, PluginContractError, check_algorithm_plugin, check_two_step_run,
                               make_tiny_model, tiny_group, tiny_groups)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def test_tiny_model_loads_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / "m", hidden=32, layers=1, heads=2)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = tok.apply_chat_template([{"role": "user", "content": "1+1="}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) == len("Q: 1+1=\nA: ")  # one token per character
    assert tok.decode(ids) == text
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))


def test_tiny_groups_cover_the_cases():
    g = tiny_groups()
    assert list(g) == ["all_wrong", "mixed", "all_correct", "two_teachers"]
    assert [x.num_correct() for x in g.values()] == [0, 2, 4, 1]
    assert [len(x.demonstrations) for x in g.values()] == [1, 1, 1, 2]
    bare = tiny_groups(demonstrations=False)
    assert [len(x.demonstrations) for x in bare.values()] == [0, 0, 0, 0]
    assert all(not x.example.demonstrations for x in bare.values())
    # the same rollouts, so a difference in behaviour comes from the demonstrations alone
    assert [[m.response_ids for m in x.members] for x in bare.values()] == [[m.response_ids for m in x.members] for x in g.values()]


# --- the first-party behaviour passes -------------------------------------------------------------


def test_grpo_passes_every_case(model_dir):
    report = check_algorithm_plugin("grpo", model_dir=model_dir)
    assert report["routes"] == ["rl", "rl", "rl", "rl"]
    assert report["rows"] == 16 and set(report["terms"]) == {"pg"} and math.isfinite(report["loss"])
    assert report["needs"] == Needs()
    cases = report["cases"]
    assert set(cases) == {f"{c}{s}" for c in ("all cases", "all_wrong", "mixed", "all_correct", "two_teachers")
                          for s in ("", ", no demonstrations")} - {"all cases"}
    assert all(cases[k]["rows"] == 4 for k in cases if not k.startswith("all cases"))
    # all-correct and all-wrong groups have advantage 0 everywhere, and the PG loss is exactly 0
    assert cases["all_correct"]["terms"] == {"pg": 0.0} and cases["all_wrong"]["terms"] == {"pg": 0.0}
    # two teachers: r = [0, 1, 0, 0] → Â = (r − 0.25) / 0.5 = [−0.5, 1.5, −0.5, −0.5] on rollouts of
    # 3, 7, 6, 5 tokens; ratio 1 (π_old = π_θ), token-mean: −Σ Â·|y| / Σ|y| = −(−1.5 + 10.5 − 3 − 2.5) / 21
    assert [len(m.response_ids) for m in tiny_groups()["two_teachers"].members] == [3, 7, 6, 5]
    assert cases["two_teachers"]["terms"]["pg"] == pytest.approx(-3.5 / 21, rel=1e-5)


def test_sft_drops_prompts_without_demonstrations(model_dir):
    report = check_algorithm_plugin("sft", model_dir=model_dir)
    assert report["routes"] == ["sft"] * 4
    assert report["rows"] == 5  # 3 prompts × 1 demonstration + 2 teachers (demos: all)
    bare = report["cases"]["all cases, no demonstrations"]
    assert bare == {"routes": ["drop"] * 4, "rows": 0}  # offline with nothing to imitate: no rows, no error


# --- broken plugins: the message names the hook, the rule and the case ----------------------------


class RatioPerRow:
    @hookimpl
    def shape_ratio(self, ratio):
        return ratio.mean(-1)  # [N]: a per-sequence ratio squeezed to one value per row


class NaNTerm:
    @hookimpl
    def build_loss(self, outputs):
        return [LossTerm("pg", outputs.logprobs.sum() * float("nan"))]


class BareTensorLoss:
    @hookimpl
    def build_loss(self, batch, outputs):
        return -(outputs.logprobs * batch.token_mask).sum() / batch.totals.tokens


class FloatMask:
    @hookimpl
    def stabilization_mask(self, ratio):
        return (ratio < 2).float()


class DenominatorPerRow:
    @hookimpl
    def reference_denominator(self, batch):
        return batch.old_logprobs.sum(-1)


class SftWithoutDemo:  # routes all-wrong prompts to SFT without checking they have a demonstration
    @hookimpl
    def route_group(self, group):
        if group.num_correct() == 0:
            return Route(rl=0.0, sft=1.0, demos=(0,), members=())


class NegativeWeight:
    @hookimpl
    def route_group(self, group):
        return Route(rl=-1.0)


class StdWithoutEps:  # (r − mean)/std: 0/0 on groups whose rewards are all equal
    @hookimpl
    def compute_advantage(self, batch):
        adv = torch.zeros_like(batch.rewards)
        for g in batch.group_index.unique():
            rows = batch.group_index == g
            r = batch.rewards[rows]
            adv[rows] = (r - r.mean()) / r.std()
        return adv


class SftNormalisedAlways:  # divides by the SFT token count even when the batch has no SFT rows
    @hookimpl
    def route_group(self, group):
        if group.num_correct() == 0 and group.demonstrations:
            return Route(rl=0.0, sft=1.0, demos=(0,), members=())

    @hookimpl
    def build_loss(self, batch, outputs):
        sft = batch.token_mask * (batch.sft_weight > 0)[:, None]
        return [LossTerm("nll", -(outputs.logprobs * sft).sum() / batch.totals.sft_tokens)]


class Raises:
    @hookimpl
    def route_group(self, group):
        return {"a": 1}["b"]


class ListNotGroup:
    @hookimpl
    def compose_group(self, group):
        return [group]


class NeedsAsDict:
    @hookimpl
    def requirements(self):
        return {"rollouts": True}


class BadAdvantageShape:
    @hookimpl
    def compute_advantage(self, batch):
        return torch.zeros(3, 3, 3)


class DuplicateTerms:
    @hookimpl
    def build_loss(self, batch, outputs):
        half = -(outputs.logprobs * batch.token_mask).sum() / batch.totals.tokens / 2
        return [LossTerm("nll", half), LossTerm("nll", half)]


class DropAll:
    @hookimpl
    def route_group(self):
        return Route(drop=True)


class MembersOutOfRange:
    @hookimpl
    def route_group(self):
        return Route(rl=1.0, members=(0, 7))


class IntegerAdvantages:
    @hookimpl
    def compute_advantage(self, batch):
        return (batch.rewards > 0.5).long()


class NaNDenominator:
    @hookimpl
    def reference_denominator(self, batch):
        return batch.old_logprobs * float("nan")


class InfiniteShaping:
    @hookimpl
    def shape_ratio(self, ratio):
        return ratio / 0.0


class NoGradient:
    @hookimpl
    def build_loss(self, outputs):
        return [LossTerm("zero", outputs.logprobs.sum() * 0.0)]


class EmptyResponse:
    @hookimpl
    def compose_group(self, group):
        from posttrain import Trajectory

        group.members.append(Trajectory(response_ids=[], off_policy=True))
        return group


class TextMetric:
    @hookimpl
    def build_loss(self, batch, outputs):
        loss = -(outputs.logprobs * batch.token_mask).sum() / batch.totals.tokens
        return [LossTerm("nll", loss, metrics={"nll/level": "high"})]


@pytest.mark.parametrize("plugin, message", [
    (DropAll(), r"^route_group: dropped every tiny group; the check needs at least one routed row \(all cases\)$"),
    (MembersOutOfRange(), r"^route_group: Route.members=\(0, 7\) names members the group does not have \(it has 4\) \(all cases, step 0\)$"),
    (IntegerAdvantages(), r"^compute_advantage: must be a float tensor, got torch.int64 \(all cases, step 0\)$"),
    (NaNDenominator(), r"^reference_denominator: non-finite values on response tokens \(all cases, step 0\)$"),
    (InfiniteShaping(), r"^shape_ratio: non-finite values on response tokens \(all cases, step 0\)$"),
    (NoGradient(), r"^build_loss: the loss has no gradient on the tiny batch \(all cases\)$"),
    (EmptyResponse(), r"^compose_group: members\[4\].response_ids must be a non-empty list of token ids \(all cases, step 0\)$"),
    (TextMetric(), r"^build_loss: term 'nll': metrics must map names to numbers, got \{'nll/level': 'high'\}"),
    (RatioPerRow(), r"^shape_ratio: must return f\(ρ\) of the ratio's shape \[16, \d+\] \[N, L\], got Tensor \[16\] \(all cases, step 0\)$"),
    (NaNTerm(), r"^build_loss: term 'pg' is nan \(all cases, step 0\)$"),
    (BareTensorLoss(), r"^build_loss: must return a list of posttrain.LossTerm, got tensor\("),
    (FloatMask(), r"^stabilization_mask: must return None or a bool tensor \[16, \d+\] \[N, L\], got Tensor \[16, \d+\] torch.float32 \(all cases, step 0\)$"),
    (DenominatorPerRow(), r"^reference_denominator: must return log π_ref of the logprobs' shape \[16, \d+\] \[N, L\], got Tensor \[16\]"),
    (SftWithoutDemo(), r"^route_group: Route.demos=\(0,\) names demonstrations the group does not have \(it has 0\); "
                       r"check group.demonstrations before routing to SFT \(all cases, no demonstrations, step 0\)$"),
    (NegativeWeight(), r"^route_group: weights must be finite and >= 0, got Route\(rl=-1.0"),
    (StdWithoutEps(), r"^compute_advantage: returned non-finite advantages \(all cases, step 0\)$"),
    (SftNormalisedAlways(), r"^build_loss: term 'nll' is nan \(mixed, step 0\)$"),  # 0/0 only when no row is SFT
    (Raises(), r"^route_group: raised KeyError: 'b' \(all cases, step 0\)$"),
    (ListNotGroup(), r"^compose_group: must return a PromptGroup, got list \(all cases, step 0\)$"),
    (NeedsAsDict(), r"^requirements: must return posttrain.Needs, got dict \(setup\)$"),
    (BadAdvantageShape(), r"^compute_advantage: must return \[N\] or \[N, L\], got Tensor \[3, 3, 3\] for N, L = \(16, \d+\)"),
    (DuplicateTerms(), r"^build_loss: term names must be unique \(they become loss/<name> metrics\): \['nll', 'nll'\]"),
], ids=lambda x: type(x).__name__ if not isinstance(x, str) else "")
def test_broken_hook_is_named_with_rule_and_case(model_dir, plugin, message):
    with pytest.raises(PluginContractError, match=message):
        check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[plugin])


class PerMicroBatchMean:  # normalises by the micro-batch's own token count: not allowed
    @hookimpl
    def build_loss(self, batch, outputs):
        m = batch.response_mask.float()
        return [LossTerm("nll", -(outputs.logprobs * m).sum() / m.sum())]


class PerPromptMean:
    """Averages each prompt's rows over the rows the micro-batch holds: right only when a
    prompt's rows never straddle two micro-batches, i.e. with Needs(whole_groups=True)."""

    @hookimpl
    def build_loss(self, batch, outputs):
        seq = (outputs.logprobs * batch.token_mask).sum(-1)  # [N]
        per_prompt = [seq[batch.prompt_index == p].mean() for p in batch.prompt_index.unique()]
        return [LossTerm("pp", -torch.stack(per_prompt).sum() / batch.totals.seqs)]


class WholeGroups:
    @hookimpl
    def requirements(self):
        return Needs(whole_groups=True)


def test_micro_batch_invariance(model_dir):
    with pytest.raises(PluginContractError, match=r"^build_loss: loss depends on micro-batching: .* split per prompt"):
        check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[PerMicroBatchMean()])
    with pytest.raises(PluginContractError, match=r"^build_loss: loss depends on micro-batching: (\S+) as one micro-batch, "
                                                  r"(\S+) split every 3 rows .*Needs\(whole_groups=True\)"):
        check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[PerPromptMean()])
    report = check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[PerPromptMean(), WholeGroups()])
    assert set(report["terms"]) == {"pp"} and report["needs"].whole_groups


def test_token_distribution_loss_shape(model_dir):
    class PerRowDistribution:
        @hookimpl
        def requirements(self):
            return Needs(reference_vocab=True)

        @hookimpl
        def token_distribution_loss(self, logits, reference_logprobs):
            return (logits.log_softmax(-1).exp() * (logits.log_softmax(-1) - reference_logprobs)).sum((-1, -2))  # [n]

    with pytest.raises(PluginContractError, match=r"^token_distribution_loss: must return a per-token loss of the labels' "
                                                  r"shape \[16, \d+\] \[n, c\], got Tensor \[16\]"):
        check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[PerRowDistribution()])


@dataclasses.dataclass
class NoHelp(GRPOConfig):
    name: str = help_field("grpo", "Algorithm entry-point name.")
    threshold: int = 3


@dataclasses.dataclass
class WrongName(GRPOConfig):
    name: str = help_field("grpo_v2", "Algorithm entry-point name.")


@dataclasses.dataclass
class NotGRPO:
    name: str = help_field("grpo", "Algorithm entry-point name.")


@dataclasses.dataclass
class RejectsDefaults(GRPOConfig):
    name: str = help_field("grpo", "Algorithm entry-point name.")
    gamma: float = help_field(-1.0, "Must be set in the YAML.")

    def __post_init__(self):
        if self.gamma < 0:
            raise ValueError("gamma must be >= 0")


@pytest.mark.parametrize("schema, message", [
    (RejectsDefaults, r"^algorithm_config: RejectsDefaults\(\) with its defaults raised ValueError: gamma must be >= 0$"),
    (NoHelp, r"^algorithm_config: fields without help text: \['threshold'\] \(use posttrain.help_field\) \(setup\)$"),
    (WrongName, r"^algorithm_config: WrongName.name must default to the entry-point name 'grpo', got 'grpo_v2'$"),
    (NotGRPO, r"^algorithm_config: NotGRPO must subclass posttrain.GRPOConfig"),
    (dict, r"^algorithm_config: must return a dataclass type, got <class 'dict'>"),
])
def test_config_rules(schema, message):
    class Config:
        @hookimpl
        def algorithm_config(self):
            return schema

    with pytest.raises(PluginContractError, match=message):
        check_algorithm_plugin("grpo", plugins=[Config()])


def test_checker_passes_results_through_unchanged():
    """The wrappers only look: the hooks return exactly what they return without the checker."""
    plain, checked = make_plugin_manager("sft"), make_plugin_manager("sft", plugins=[ContractChecker()])
    cfg = plain.hook.algorithm_config()()
    assert checked.hook.algorithm_config() is plain.hook.algorithm_config()
    g = tiny_group([0, 1], demos=("a", "b"))
    assert checked.hook.route_group(group=g, config=cfg, step=3, metrics=Metrics()) == Route(rl=0.0, sft=1.0, demos=(0, 1), members=())
    assert checked.hook.requirements(config=cfg) == plain.hook.requirements(config=cfg) == Needs(rollouts=False)


# --- the 2-step run --------------------------------------------------------------------------------


def test_two_step_run(model_dir, tmp_path):
    seen = []

    class Recorder:
        @hookimpl
        def on_step_end(self, step, metrics):
            seen.append((step, metrics["route/rl"]))

    report = check_two_step_run("grpo", tmp_path / "run", model_dir=model_dir, plugins=[Recorder()],
                                overrides={"algorithm.entropy_coef": 0.01})
    assert [r["step"] for r in report["metrics"]] == [1, 2]
    assert seen == [(1, 1.0), (2, 1.0)]
    assert report["final"].name == "step-000002" and report["changed"]  # the entropy bonus moves the weights
    assert all(r["loss/entropy"] < 0 for r in report["metrics"])


def test_two_step_run_names_the_hook(model_dir, tmp_path):
    class BrokenAtStepEnd:
        @hookimpl
        def on_step_end(self, step):
            raise RuntimeError(f"cannot write my_plugin/state.json at step {step}")

    with pytest.raises(PluginContractError, match=r"^on_step_end: raised RuntimeError: cannot write my_plugin/state.json "
                                                  r"at step 1 \(2-step run, step 1\)$"):
        check_two_step_run("grpo", tmp_path / "run", model_dir=model_dir, plugins=[BrokenAtStepEnd()])


def test_tiny_tokenizer_is_one_token_per_character_newlines_included():
    from posttrain.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    text = "Q: 1+2=\n\nA: \\boxed{3}"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_split_loss_matches_a_hand_computed_grpo_loss_for_any_split():
    from posttrain.batching import build_train_batch
    from posttrain.config import GRPOConfig
    from posttrain.metrics import Metrics
    from posttrain.plugins import make_plugin_manager
    from posttrain.testing import fill_tokens, sized_group, split_loss, tiny_tokenizer
    from posttrain.types import Route

    g = sized_group([1.0, 0.0], [2, 3], demo_lens=(4,))
    assert [len(m.response_ids) for m in g.members] == [2, 3] and len(g.demonstrations[0].response_ids) == 4
    pm, cfg = make_plugin_manager("grpo"), GRPOConfig()
    batch = build_train_batch([g], [Route()], tiny_tokenizer().pad_token_id)
    batch.advantages = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=Metrics())
    a = 0.5 / (2 ** -0.5 + 1e-6)  # (r − mean) / (unbiased std + eps): ±0.70711
    lp = fill_tokens(batch, [-1.0, [-0.5, -1.5, -2.0]])  # ρ = 1 (π_old is the current policy)
    whole = split_loss(pm.hook, cfg, batch, [[0, 1]], lp)
    apart = split_loss(pm.hook, cfg, batch, [[0], [1]], lp)
    # token-mean over 5 tokens of −A·ρ: −(2a − 3a)/5
    assert whole.total == pytest.approx(a / 5, rel=1e-5) and whole.parts == pytest.approx({"pg": a / 5}, rel=1e-5)
    assert apart.total == pytest.approx(whole.total, rel=1e-6)
    assert torch.allclose(whole.logprob_grad, fill_tokens(batch, [-a / 5, a / 5]), atol=1e-6)
    assert torch.allclose(apart.logprob_grad, whole.logprob_grad, atol=1e-7) and whole.entropy_grad is None


# --- contract v2: planning hooks, state, a run that trains nothing ----------------------------------


def test_new_hooks_are_checked(model_dir):
    from posttrain import GroupSelection, RolloutRequest

    class NewGroups:
        @hookimpl
        def select_groups(self, groups):
            return GroupSelection([tiny_group([1, 0])])  # not one of the verified groups

    with pytest.raises(PluginContractError, match=r"^select_groups: GroupSelection.groups must be groups it was given"):
        check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[NewGroups()])

    class TooFewRequests:
        @hookimpl
        def rollout_requests(self, groups):
            return [RolloutRequest(n=2)]

    with pytest.raises(PluginContractError, match=r"^rollout_requests: must return one RolloutRequest per group \(4\)"):
        check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[TooFewRequests()])

    class BadPlan:
        @hookimpl
        def plan_step(self):
            return {"rollouts": False}

    with pytest.raises(PluginContractError, match=r"^plan_step: must return None or a StepPlan"):
        check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[BadPlan()])


def test_prefix_requests_and_refills_run_through_the_check(model_dir):
    from posttrain import GroupSelection, RolloutRequest

    seen = {}

    class PrefixAndRefill:
        @hookimpl
        def rollout_requests(self, groups, requests):
            return [RolloutRequest(n=q.n, prefix=(12, 13)) for q in requests]

        @hookimpl
        def select_groups(self, groups, target):
            keep = [g for g in groups if 0 < g.num_correct() < len(g.on_policy)]
            seen.setdefault("calls", []).append(len(groups))
            return GroupSelection(keep[:target], more=max(0, target - len(keep)))

        @hookimpl
        def compute_advantage(self, batch):
            seen["prefix_tokens"] = int(batch.off_policy_mask.sum())
            return None

    report = check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[PrefixAndRefill()])
    assert seen["calls"][:2] == [4, 2 + 2]  # 2 informative of 4, then a refill round with 2 more
    assert report["rows"] == 3 * 4  # mixed, two_teachers, and the refill's one informative group (all_wrong, mixed)
    assert seen["prefix_tokens"] > 0


class Counter:
    """A stateful class plugin: counts steps and routes to SFT from the third one on."""

    def __init__(self, config):
        self.steps = 0

    @hookimpl
    def on_rollout_end(self):
        self.steps += 1

    @hookimpl
    def route_group(self, group):
        if self.steps > 2 and group.demonstrations:
            return Route(rl=0.0, sft=1.0, demos=(0,), members=())
        return None

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


def test_state_round_trip_is_checked(model_dir):
    check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[Counter])  # restores exactly: passes

    class Amnesiac(Counter):
        def load_state_dict(self, state):
            pass

    with pytest.raises(PluginContractError, match=r"^state_dict: the next step differs after state_dict → load_state_dict"):
        check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[Amnesiac])

    class Unsafe(Counter):
        def state_dict(self):
            return {"steps": self.steps, "rng": __import__("random").Random(0)}

    with pytest.raises(PluginContractError, match=r"^state_dict: must hold only tensors"):
        check_algorithm_plugin("grpo", model_dir=model_dir, plugins=[Unsafe])


def test_two_step_run_that_trains_nothing_fails(model_dir, tmp_path):
    class DropAll:
        @hookimpl
        def route_group(self):
            return Route(drop=True)

    with pytest.raises(PluginContractError, match=r"^build_loss: no step of the 2-step run trained on any loss term"):
        check_two_step_run("grpo", tmp_path / "run", model_dir=model_dir, plugins=[DropAll()])
