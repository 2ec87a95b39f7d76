"""Hook contract v2: stateful class plugins, step planning, offline groups, rollout requests with
forced prefixes, the token-level off-policy mask, mini-batch statistics, what the batch knows.

The algorithms here are written the way an outside package would write them: inline plugins,
no module globals, no private imports.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain import Example, GroupSelection, Needs, Route, RolloutRequest, StepPlan, Trajectory, hookimpl
from posttrain.batching import build_train_batch, totals_of, trim_padding
from posttrain.logging import read_metrics
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.run import train
from posttrain.testing import make_tiny_model, sized_group, tiny_config, tiny_group, tiny_tokenizer

TOK = tiny_tokenizer()
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _params(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# --- a ReLIFT-like algorithm: a hard-prompt buffer across steps, periodic SFT-only steps -------------


class HardPromptBuffer:
    """Buffers prompts no rollout solved; every third step is SFT on the buffer, without rollouts."""

    def __init__(self, config):
        self.config = config
        self.buffer: list[list] = []  # [prompt, answer, demonstrations, uid]

    def sft_step(self, step):
        return step % 3 == 2 and bool(self.buffer)

    @hookimpl
    def plan_step(self, step):
        return StepPlan(rollouts=False, prompts=0) if self.sft_step(step) else None

    @hookimpl
    def add_groups(self, step, make_group):
        if not self.sft_step(step):
            return None
        taken, self.buffer = self.buffer[:4], self.buffer[4:]
        return [make_group(Example(prompt=p, answer=a, demonstrations=list(d), uid=u), "buffer") for p, a, d, u in taken]

    @hookimpl
    def on_rollout_end(self, groups):
        for g in groups:
            if g.source == "train" and g.members and g.num_correct() == 0 and g.demonstrations:
                ex = g.example
                self.buffer.append([ex.prompt, ex.answer, list(ex.demonstrations), ex.uid])

    def state_dict(self):
        return {"buffer": [list(x) for x in self.buffer]}

    def load_state_dict(self, state):
        self.buffer = [list(x) for x in state["buffer"]]


class ForgetfulBuffer(HardPromptBuffer):
    """The same algorithm with its state in the instance but not in the checkpoint."""

    state_dict = None
    load_state_dict = None


def test_hook_plan_step(model_dir, tmp_path):
    # Steps 1, 2 sample (RL); step 3 is SFT on the buffered prompts with no generation at all.
    train(tiny_config(model_dir, tmp_path, steps=3), base=None, plugins=[HardPromptBuffer])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert "rollout/response_length" in rows[0] and "rollout/response_length" in rows[1]
    assert "rollout/response_length" not in rows[2] and "reward/mean" not in rows[2]
    assert rows[2]["route/sft"] == 1.0 and rows[2]["loss/sft"] > 0 and "loss/pg" not in rows[2]
    # 4 buffered prompts; the default route trains a member-less group on its first demonstration
    assert rows[2]["train/rows"] == 4


def test_stateful_plugin_resumes_exactly(model_dir, tmp_path):
    over = {"save_every": 2, "algorithm.entropy_coef": 0.01}
    train(tiny_config(model_dir, tmp_path / "full", steps=3, overrides=over), base=None, plugins=[HardPromptBuffer])
    train(tiny_config(model_dir, tmp_path / "resumed", steps=2, overrides=over), base=None, plugins=[HardPromptBuffer])
    train(tiny_config(model_dir, tmp_path / "resumed", steps=3, overrides=over), base=None, plugins=[HardPromptBuffer])
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert full[2]["route/sft"] == 1.0  # the resumed step is the buffer's SFT step
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if not k.startswith(("time/", "perf/"))} == \
               {k: v for k, v in b.items() if not k.startswith(("time/", "perf/"))}
    fa, fb = _params(tmp_path / "full" / "checkpoints" / "step-000003"), _params(tmp_path / "resumed" / "checkpoints" / "step-000003")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)

    # Without its state in the checkpoint the resumed run takes an RL step where the uninterrupted one fine-tuned.
    train(tiny_config(model_dir, tmp_path / "forgetful", steps=2, overrides=over), base=None, plugins=[ForgetfulBuffer])
    train(tiny_config(model_dir, tmp_path / "forgetful", steps=3, overrides=over), base=None, plugins=[ForgetfulBuffer])
    assert read_metrics(tmp_path / "forgetful" / "metrics.jsonl")[2]["route/rl"] == 1.0


def test_two_runs_in_one_process_do_not_share_state(model_dir, tmp_path):
    seen = []

    class Probe(HardPromptBuffer):
        @hookimpl
        def on_train_start(self):
            seen.append(len(self.buffer))

    train(tiny_config(model_dir, tmp_path / "a", steps=2), base=None, plugins=[Probe])
    train(tiny_config(model_dir, tmp_path / "b", steps=2), base=None, plugins=[Probe])
    assert seen == [0, 0]  # a fresh instance per stage


# --- offline groups -----------------------------------------------------------------------------


def test_hook_add_groups(model_dir, tmp_path):
    class Replay:
        @hookimpl
        def add_groups(self, make_group):
            g = make_group(Example(prompt="2+2=", answer="4", demonstrations=["4"], uid="replay:0"), "replay")
            return [g]

        @hookimpl
        def on_rollout_end(self, groups):
            sources = [g.source for g in groups]
            assert sources == ["train"] * 4 + ["replay"]
            assert groups[-1].members == [] and groups[-1].demonstrations[0].response_ids == TOK("4", add_special_tokens=False).input_ids + [EOS]

    train(tiny_config(model_dir, tmp_path, steps=1), base=None, plugins=[Replay()])
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["route/rl"] == pytest.approx(4 / 5) and row["route/sft"] == pytest.approx(1 / 5)
    assert row["train/rows"] == 4 * 4 + 1


def test_offline_data_stream(model_dir, tmp_path):
    over = {"data.offline": "synthetic:arithmetic?n=16&seed=5", "data.offline_per_step": 2}
    train(tiny_config(model_dir, tmp_path, steps=1, overrides=over), base=None)
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    # 4 drawn prompts sampled (RL, 4 rows each) + 2 offline prompts trained on their first demonstration
    assert row["train/rows"] == 4 * 4 + 2 and row["route/sft"] == pytest.approx(2 / 6)


# --- rollout requests: forced prefixes ---------------------------------------------------------------


def test_hook_rollout_requests(model_dir, tmp_path):
    seen = {}

    class PrefixGuided:
        """Hard prompts roll out from the first 3 tokens of their demonstration (UFT / Prefix-RFT)."""

        @hookimpl
        def rollout_requests(self, groups, requests):
            return [RolloutRequest(n=q.n, prefix=tuple(g.demonstrations[0].response_ids[:3]), tag="hint")
                    for g, q in zip(groups, requests)]

        @hookimpl
        def compute_advantage(self, batch):
            seen["mask"] = batch.off_policy_mask.clone()
            seen["lengths"] = batch.response_lengths.clone()
            return None

        @hookimpl
        def on_rollout_end(self, groups):
            seen["groups"] = groups

    train(tiny_config(model_dir, tmp_path, steps=1, overrides={"rollout.is_cap": 2.0}), base=None, plugins=[PrefixGuided()])
    for g in seen["groups"]:
        for t in g.members:
            assert t.response_ids[:3] == g.demonstrations[0].response_ids[:3] and t.prefix_len == 3 and t.tag == "hint"
            assert t.sampling_logprobs[:3] == [0.0, 0.0, 0.0] and len(t.sampling_logprobs) == len(t.response_ids)
            assert t.text == TOK.decode(t.response_ids, skip_special_tokens=True)
            assert len(t.response_ids) <= 16  # the prefix counts against rollout.max_new_tokens
    mask = seen["mask"]
    assert mask[:, :3].all() and not (mask[:, 3:] & (seen["lengths"][:, None] > torch.arange(3, mask.shape[1]))).any()


def test_prefix_tokens_are_off_policy_in_clipping_and_is_weights():
    g = sized_group([1, 0], [5, 5])
    g.members[0].prefix_len = 2
    g.members[1].prefix_len = 2
    pm = make_plugin_manager("grpo")
    from posttrain.config import GRPOConfig

    cfg = GRPOConfig(clip_low=0.2)
    batch = build_train_batch([g], [Route(rl=1.0)], PAD)
    assert batch.off_policy_mask.tolist() == [[True, True, False, False, False]] * 2
    batch.advantages = torch.tensor([1.0, -1.0])
    batch.old_logprobs = torch.zeros(2, 5)
    batch.sampling_logprobs = torch.full((2, 5), -3.0)  # π_old/π_sampling = e^3: truncated to the cap where it applies
    logprobs = torch.full((2, 5), 0.5)  # ratio e^0.5 = 1.65: outside the clip region for A > 0
    totals = totals_of(batch, max_len=16)

    def run(is_cap):
        from unittest import mock

        from posttrain import ModelOutputs
        from posttrain import loss as loss_module

        lp = logprobs.clone().requires_grad_(True)
        fwd = lambda model, micro, **kw: ModelOutputs(logprobs=lp, entropy=torch.zeros_like(lp))  # noqa: E731
        with mock.patch.object(loss_module, "policy_outputs", fwd):
            terms, stats = loss_module.micro_batch_loss(pm.hook, cfg, 0, None, batch.with_(totals=totals), Metrics(),
                                                        needs=Needs(), is_cap=is_cap)
        sum(t.value for t in terms).backward()
        return lp.grad, stats

    grad, stats = run(is_cap=2.0)
    r = float(torch.exp(torch.tensor(0.5)))
    # Prefix tokens: kept despite ρ = 1.65 > 1.2 (never sampled: no trust region), IS weight 1.
    # Sampled tokens, row 0 (A = 1): clipped. Row 1 (A = −1, ρ > 1): kept, weighted by min(e^3, 2) = 2.
    n = 10  # token-mean over the mini-batch's 10 RL tokens
    expected = torch.tensor([[-r / n, -r / n, 0.0, 0.0, 0.0], [r / n, r / n, 2 * r / n, 2 * r / n, 2 * r / n]])
    assert torch.allclose(grad, expected, atol=1e-6)
    assert stats["train/is_weight"] == pytest.approx(2.0)  # over the 6 sampled tokens only
    assert stats["train/clip_frac"] == pytest.approx(3 / 6)


# --- select_groups -----------------------------------------------------------------------------------


def test_hook_select_groups(model_dir, tmp_path):
    calls = []

    class KeepOdd:
        """Keeps every other group and asks for the rest: a refill of 2, then 1, then done."""

        @hookimpl
        def select_groups(self, groups, target):
            calls.append(len(groups))
            keep = groups[::2] if len(calls) == 1 else groups
            return GroupSelection(keep[:target], more=max(0, target - len(keep)))

    train(tiny_config(model_dir, tmp_path, steps=1), base=None, plugins=[KeepOdd()])
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert calls == [4, 2 + 2]  # first round: 4 drawn; second: 2 kept + 2 more drawn
    assert row["plan/rounds"] == 2 and row["plan/groups"] == 4 and row["train/rows"] == 16


# --- mini-batch statistics ---------------------------------------------------------------------------


def test_hook_minibatch_statistics(model_dir, tmp_path):
    seen = []

    class MeanEntropy:
        @hookimpl
        def requirements(self):
            return Needs(rollouts=False, minibatch_stats=True)

        @hookimpl
        def minibatch_statistics(self, batch, outputs):
            m = batch.response_mask
            return {"h": ((outputs.entropy * m).sum(), m.sum())}

        @hookimpl
        def build_loss(self, batch):
            seen.append(batch.stats["h"])
            return None

    for budget in (4096, 40):  # one micro-batch, or many: the statistic is the same
        train(tiny_config(model_dir, tmp_path / str(budget), algorithm="sft", steps=1,
                          overrides={"trainer.micro_batch_tokens": budget}), base=None, plugins=[MeanEntropy()])
    one, many = seen[0], seen[-1]
    assert len(set(seen[1:])) == 1 and len(seen) > 2  # every micro-batch of a mini-batch sees the same number
    assert many == pytest.approx(one, rel=1e-6) and 0 < one < float(torch.log(torch.tensor(float(len(TOK)))))


# --- what the batch knows ----------------------------------------------------------------------------


def test_batch_knows_finished_lengths_and_max_len(model_dir, tmp_path):
    seen = {}

    class Look:
        @hookimpl
        def compute_advantage(self, batch):
            seen.update(max_len=batch.totals.max_len, tokens=batch.totals.tokens, finished=batch.finished.clone(),
                        lengths=batch.response_lengths.clone(), mask=batch.response_mask.clone())
            return None

        @hookimpl
        def on_rollout_end(self, groups):
            seen["trajs"] = [t for g in groups for t in g.members]

    train(tiny_config(model_dir, tmp_path, steps=1), base=None, plugins=[Look()])
    assert seen["max_len"] == 16.0 and seen["tokens"] == float(seen["mask"].sum())
    assert seen["finished"].tolist() == [t.finished for t in seen["trajs"]]
    assert seen["lengths"].tolist() == [len(t.response_ids) for t in seen["trajs"]]


def test_token_extras_are_trimmed_with_the_padding():
    g = tiny_group([1, 0, 1])
    batch = build_train_batch([g], [Route(rl=1.0)], PAD)
    N, L = batch.response_mask.shape
    batch.extras["per_token"] = torch.arange(N * L, dtype=torch.float).reshape(N, L)
    batch.extras["per_row"] = torch.arange(N, dtype=torch.float)
    short = trim_padding(batch.select([1]))
    width = short.response_mask.shape[1]
    assert width < L
    assert short.extras["per_token"].tolist() == [list(range(L, L + width))]
    assert short.extras["per_row"].tolist() == [1.0]


def test_hand_built_batches_default_the_new_fields():
    g = tiny_group([1, 0])
    batch = build_train_batch([g], [Route(rl=1.0, sft=1.0)], PAD)
    # rollouts on-policy, the demonstration row off-policy on every token
    assert batch.off_policy_mask.tolist() == (batch.response_mask & batch.off_policy[:, None]).tolist()
    assert batch.response_lengths.tolist() == [len(t.response_ids) for t in g.members] + [len(g.demonstrations[0].response_ids)]
    assert batch.finished.all() and Trajectory(response_ids=[1]).prefix_len == 0


def test_the_plugin_guides_worked_example_runs(model_dir, tmp_path):
    """docs/plugin-guide.md §10's ReLIFT, exactly as printed, trained for 3 steps."""
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "plugin-guide.md").read_text()
    section = guide[guide.index("### Worked example"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) <= 200
    ns: dict = {}
    exec(compile(code, "plugin-guide.md", "exec"), ns)
    over = {"algorithm.sft_every": 3, "algorithm.sft_prompts": 4}
    train(tiny_config(model_dir, tmp_path, steps=3, overrides=over), base=None, plugins=[ns["ReLIFT"]])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r.get("route/sft", 0.0) for r in rows] == [0.0, 0.0, 1.0]  # the third step fine-tunes on the buffer
    assert "rollout/response_length" not in rows[2] and rows[1]["relift/buffer"] >= 4


def test_chord_fits_as_a_build_loss_wrapper():
    """CHORD (μ-weighted GRPO + φ(p) = p(1−p)-weighted SFT on expert data) needs only a wrapper
    around the default loss, reading the stable term names ``pg`` and ``sft``."""
    import math

    from posttrain import LossTerm
    from posttrain.config import GRPOConfig
    from posttrain.testing import fill_tokens, split_loss

    class CHORD:
        def __init__(self, config):
            self.mu = 0.3  # μ(step): constant here; the paper decays it

        @hookimpl(wrapper=True)
        def build_loss(self, batch, outputs):
            terms = yield
            out = []
            for t in terms:
                if t.name == "pg":
                    out.append(LossTerm("pg", (1 - self.mu) * t.value))
                elif t.name == "sft":
                    p = outputs.logprobs.detach().exp()
                    tokens = batch.response_mask & (batch.sft_weight > 0)[:, None]
                    phi_nll = -(p * (1 - p) * outputs.logprobs * tokens).sum() / batch.totals.sft_tokens
                    out.append(LossTerm("sft", self.mu * phi_nll))
                else:
                    out.append(t)
            return out

    pm = make_plugin_manager("grpo", plugins=[CHORD])
    from posttrain.plugins import bind_plugins

    cfg = GRPOConfig()
    bind_plugins(pm, cfg)
    g = sized_group([1.0, 0.0], [2, 3], demo_lens=(4,))
    batch = build_train_batch([g], [Route(rl=1.0, sft=1.0, demos=(0,))], PAD)
    batch.advantages = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=Metrics())
    lp = fill_tokens(batch, [-1.0, -1.0, math.log(0.5)])
    got = split_loss(pm.hook, cfg, batch, [[0, 1, 2]], lp)
    a = 0.5 / (2 ** -0.5 + 1e-6)
    assert got.parts["pg"] == pytest.approx(0.7 * a / 5, rel=1e-5)  # (1 − μ)·token-mean(−Â·ρ)
    assert got.parts["sft"] == pytest.approx(0.3 * 0.25 * math.log(2), rel=1e-5)  # μ·φ(½)·(−log ½)
    assert got.logprob_grad[2, :4].tolist() == pytest.approx([-0.3 * 0.25 / 4] * 4, rel=1e-5)  # φ is a weight, not differentiated
