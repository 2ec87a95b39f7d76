"""Layered loading and two-phase validation."""

import pytest
from omegaconf import OmegaConf

from posttrain.config import ConfigError, GRPOConfig
from posttrain.run import load_config, resolve, resolve_stages

BASE = {"algorithm": {"name": "grpo"}, "model": {"path": "m"}, "data": {"train": "t.jsonl"}}


def test_layers_later_wins(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("trainer: {lr: 0.5, steps: 7}\nrollout: {n: 3}\n")
    run = tmp_path / "run.yaml"
    run.write_text("algorithm: {name: grpo, clip_low: 0.3}\nmodel: {path: m}\ndata: {train: t.jsonl}\ntrainer: {lr: 0.25}\n")
    cfg = load_config(run, ["trainer.lr=0.125"], base=base)
    r = resolve(cfg)
    assert r.run.trainer.lr == 0.125  # override beats run yaml beats base
    assert r.run.trainer.steps == 7  # from base
    assert r.run.rollout.n == 3
    assert r.run.rollout.temperature == 1.0  # dataclass default
    assert isinstance(r.algo, GRPOConfig) and r.algo.clip_low == 0.3
    assert r.run.run_dir == "runs/grpo"  # the default interpolates the algorithm name
    assert OmegaConf.to_container(cfg, resolve=False)["run_dir"] == "runs/${algorithm.name}"


def test_all_problems_collected_with_suggestions():
    cfg = load_config(BASE, ["trainer.lr_rate=1", "rollout.n=0", "trainer.schedule=cosin", "algorithm.clip_lo=0.1"], base=None)
    with pytest.raises(ConfigError) as e:
        resolve(cfg)
    msg = str(e.value)
    assert "trainer.lr_rate: unknown key. Did you mean 'lr'?" in msg
    # core section problems stop phase 1 before value checks, but phase 2 still runs
    assert "algorithm.clip_lo: unknown key. Did you mean 'clip_low'?" in msg


def test_value_errors_and_type_errors():
    with pytest.raises(ConfigError) as e:
        resolve(load_config(BASE, ["rollout.n=0", "trainer.schedule=cosin", "algorithm.loss_agg=token_mean"], base=None))
    msg = str(e.value)
    assert "rollout.n: must be >= 1, got 0." in msg
    assert "Did you mean 'cosine'?" in msg
    assert "algorithm.loss_agg: 'token_mean' is not one of" in msg and "Did you mean 'token-mean'?" in msg
    with pytest.raises(ConfigError, match="trainer.lr"):
        resolve(load_config(BASE, ["trainer.lr=fast"], base=None))


def test_unknown_algorithm_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        resolve(load_config({**BASE, "algorithm": {"name": "hptt"}}, base=None))
    assert "algorithm.name: Unknown algorithm 'hptt'" in str(e.value)


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve(load_config({"algorithm": {"name": "grpo"}}, base=None))
    assert "model.path: missing" in str(e.value) and "data.train: missing" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_stages_merge_over_top_level_and_validate_each():
    cfg = load_config({
        **BASE, "trainer": {"lr": 1e-3, "steps": 5},
        "stages": [
            {"algorithm": {"name": "sft"}, "trainer": {"steps": 2}},
            {"algorithm": {"name": "grpo", "norm_adv_by_std": False}},
        ],
    }, base=None)
    s0, s1 = resolve_stages(cfg)
    assert type(s0.algo).__name__ == "SFTConfig" and s0.run.trainer.steps == 2 and s0.run.trainer.lr == 1e-3
    assert s1.algo.norm_adv_by_std is False and s1.run.trainer.steps == 5
    bad = load_config({**BASE, "stages": [{"algorithm": {"name": "sft", "demos": 3, "bogus": 1}}]}, base=None)
    with pytest.raises(ConfigError, match="algorithm.bogus: unknown key"):
        resolve_stages(bad)


def test_every_field_has_help():
    import dataclasses

    from posttrain.config import RunConfig

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            d = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(d):
                yield from walk(type(d), prefix + f.name + ".")
            else:
                yield prefix + f.name, f.metadata.get("help")

    missing = [n for n, h in list(walk(RunConfig)) + list(walk(GRPOConfig)) if not h]
    assert missing == []
