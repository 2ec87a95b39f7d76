"""DAPO plugin: overlong shaping (Eq. 13), shaped advantages, clip-higher, dynamic sampling.

Every expected number is written out as arithmetic from the paper's formulas.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from posttrain import GroupSelection, Route, hookimpl
from posttrain.batching import build_train_batch
from posttrain.config import validate_algorithm
from posttrain.metrics import Metrics
from posttrain.plugins import make_plugin_manager
from posttrain.testing import sized_group, tiny_group, tiny_tokenizer
from posttrain.types import Totals
from posttrain.verify import VerifyResult
from posttrain_dapo.plugin import DAPOConfig, overlong_penalty

PAD = tiny_tokenizer().pad_token_id


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager("dapo")


def test_paper_defaults_validate():
    cfg, problems = validate_algorithm({"name": "dapo"}, DAPOConfig, "dapo")
    assert not problems
    assert (cfg.clip_low, cfg.clip_high, cfg.loss_agg, cfg.overlong_buffer, cfg.kl_coef) == (0.2, 0.28, "token-mean", 4096, 0.0)
    _, problems = validate_algorithm({"name": "dapo", "max_response_length": 100, "overlong_buffer": 200}, DAPOConfig, "dapo")
    assert problems and "must exceed overlong_buffer" in problems[0]


def test_overlong_penalty_eq13():
    # L_max = 20, L_cache = 4: no penalty up to 16 tokens, then linear to −1 at 20, −1 beyond.
    got = overlong_penalty(torch.tensor([10, 16, 17, 19, 20, 21]), 20.0, 4)
    assert got.tolist() == [0.0, 0.0, (16 - 17) / 4, (16 - 19) / 4, -1.0, -1.0]


def test_shaped_advantages_by_hand(pm):
    cfg = DAPOConfig(overlong_buffer=4, max_response_length=20)
    g = sized_group([1, 0, 0, 1], [3, 18, 5, 20])
    batch = build_train_batch([g], [Route(rl=1.0)], PAD).with_(totals=Totals(max_len=20))
    adv = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=Metrics())
    # R = 2r − 1 + R_length: [1 + 0, −1 − 0.5, −1 + 0, 1 − 1]
    r = [1.0, -1.5, -1.0, 0.0]
    mean = sum(r) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
    assert adv.tolist() == pytest.approx([(x - mean) / (std + 1e-6) for x in r], abs=1e-6)


def test_max_len_comes_from_the_batch_totals(pm):
    # max_response_length None: L_max = batch.totals.max_len (the engine fills it before compute_advantage)
    cfg = DAPOConfig(overlong_buffer=4)
    g = sized_group([1, 1], [3, 10])
    batch = build_train_batch([g], [Route(rl=1.0)], PAD).with_(totals=Totals(max_len=10))
    adv = pm.hook.compute_advantage(batch=batch, config=cfg, step=0, metrics=Metrics())
    r = [1.0, 1.0 - 1.0]  # 10 tokens = L_max: penalty −1
    assert adv.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1e-6), -0.5 / (math.sqrt(0.5) + 1e-6)], abs=1e-6)
    assert r[0] - r[1] == 1.0


def test_clip_higher_mask(pm):
    cfg = DAPOConfig()
    g = sized_group([1, 0], [2, 2])
    batch = build_train_batch([g], [Route(rl=1.0)], PAD)
    ratio = torch.tensor([[1.25, 1.30], [0.75, 0.85]])  # row 0: A > 0, row 1: A < 0
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    (mask,) = [m for m in pm.hook.stabilization_mask(batch=batch, logprobs=ratio.log(), ratio=ratio, advantages=adv,
                                                      config=cfg, step=0) if m is not None]
    # A > 0 clips above 1 + 0.28 (1.25 kept; GRPO's 0.2 would clip it), A < 0 below 1 − 0.2
    assert mask.tolist() == [[True, False], [False, True]]


def test_select_groups_keeps_informative_groups_and_asks_for_the_rest(pm):
    groups = [tiny_group([0, 0, 0, 0], uid="a"), tiny_group([1, 0, 0, 0], uid="b"), tiny_group([1, 1, 1, 1], uid="c"),
              tiny_group([0, 1, 1, 1], uid="d")]
    sel = pm.hook.select_groups(groups=groups, target=2, config=DAPOConfig(), step=0, metrics=Metrics())
    assert [g.example.uid for g in sel.groups] == ["b", "d"] and sel.more == 0
    sel = pm.hook.select_groups(groups=groups, target=3, config=DAPOConfig(), step=0, metrics=Metrics())
    assert [g.example.uid for g in sel.groups] == ["b", "d"] and sel.more == 1
    sel = pm.hook.select_groups(groups=groups, target=3, config=DAPOConfig(refill_prompts=6), step=0, metrics=Metrics())
    assert sel.more == 6
    sel = pm.hook.select_groups(groups=groups + [tiny_group([1, 0], uid="e")], target=3, config=DAPOConfig(), step=0,
                                metrics=Metrics())
    assert [g.example.uid for g in sel.groups] == ["b", "d", "e"] and sel.more == 0
    assert pm.hook.select_groups(groups=groups, target=3, config=DAPOConfig(dynamic_sampling=False), step=0,
                                 metrics=Metrics()) is None


def test_overlong_filter_drops_truncated_rollouts(pm):
    g = tiny_group([1, 0, 1])
    g.members[1].finished = False
    assert pm.hook.route_group(group=g, config=DAPOConfig(overlong_filter=True), step=0, metrics=Metrics()) == Route(rl=1.0, members=(0, 2))
    assert pm.hook.route_group(group=g, config=DAPOConfig(), step=0, metrics=Metrics()) == Route(rl=1.0)  # the default


def test_check_algorithm_plugin():
    from posttrain.testing import check_algorithm_plugin

    report = check_algorithm_plugin("dapo")
    assert "pg" in report["terms"]


class HalfHardVerifier:
    """Prompts whose gold answer is even are never solved; the others are solved by responses
    whose CRC is even (a fair coin per response): about half the groups are uninformative, so
    dynamic sampling must refill."""

    def verify(self, items):
        return [VerifyResult(0.0 if int(gold) % 2 == 0 else float(zlib.crc32(text.encode()) % 2 == 0))
                for text, gold in items]

    def close(self):
        pass


class Recorder:
    def __init__(self):
        self.steps = []

    @hookimpl
    def register_verifiers(self, register):
        register("half-hard", lambda config: HalfHardVerifier())

    @hookimpl
    def on_rollout_end(self, groups, step):
        self.steps.append((step, [(g.num_correct(), len(g.on_policy)) for g in groups]))


def test_dynamic_sampling_refills_the_batch(tmp_path):
    from posttrain.logging import read_metrics
    from posttrain.testing import check_two_step_run

    rec = Recorder()
    check_two_step_run("dapo", tmp_path, plugins=[rec], steps=3,
                             overrides={"verifier.name": "half-hard", "trainer.prompts_per_step": 4,
                                        "algorithm.overlong_buffer": 4})
    assert len(rec.steps) == 3
    for _, groups in rec.steps:
        assert len(groups) == 4  # exactly prompts_per_step groups ...
        assert all(0 < c < n for c, n in groups)  # ... every one informative
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert max(r["plan/rounds"] for r in rows) > 1  # some step drew more prompts
    assert all(r["plan/groups"] == 4 for r in rows) and "plan/rounds_capped" not in rows[0]


def test_sampling_rounds_cap(tmp_path):
    from posttrain.logging import read_metrics
    from posttrain.testing import check_two_step_run

    rec = Recorder()
    check_two_step_run("dapo", tmp_path, plugins=[rec], steps=1,
                       overrides={"verifier.name": "half-hard", "trainer.prompts_per_step": 4,
                                  "trainer.max_sampling_rounds": 1, "trainer.seed": 3})
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    # one round only: the step trains on the informative groups it has, and says the cap stopped it
    assert row["plan/rounds"] == 1 and row["plan/rounds_capped"] == 1.0 and row["plan/groups"] < 4
    assert GroupSelection  # the public type the hook returns
