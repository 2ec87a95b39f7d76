"""End-to-end runs of the engine on the tiny model: GRPO, SFT, stages, resume, micro-batching."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.logging import read_metrics
from posttrain.run import train
from posttrain.testing import make_tiny_model, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _params(path):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def test_grpo_two_steps(model_dir, tmp_path):
    # A random model solves nothing (A = 0 everywhere); the entropy bonus still moves the weights.
    final, = train(tiny_config(model_dir, tmp_path / "run", steps=2, overrides={"algorithm.entropy_coef": 0.01}), base=None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["reward/accuracy"] <= 1.0
        assert r["route/rl"] == 1.0
        assert r["train/rows"] == 16  # 4 prompts × n=4
        assert 1 <= r["rollout/response_length"] <= 16
        assert r["train/grad_norm"] > 0 and r["train/lr"] == pytest.approx(1e-3)
        assert r["verify/timeouts"] == 0 and r["train/offline_data_ratio"] == 0.0
        for k in ("loss/pg", "loss/entropy", "loss/total", "train/entropy", "train/clip_frac", "perf/train_tokens_per_s", "time/step_s"):
            assert k in r, k
    assert final.name == "step-000002"
    before, after = _params(model_dir), _params(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: grpo" in saved and str(model_dir) in saved


def test_sft_two_steps_is_offline(model_dir, tmp_path):
    train(tiny_config(model_dir, tmp_path / "run", algorithm="sft", steps=2), base=None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    for r in rows:
        assert "reward/accuracy" not in r and "rollout/response_length" not in r  # no rollout happened
        assert r["route/sft"] == 1.0 and r["train/offline_data_ratio"] == 1.0
        assert r["train/rows"] == 8  # 4 prompts × 2 teachers (demos: all)
        assert r["loss/sft"] > 0
    assert rows[1]["loss/sft"] < rows[0]["loss/sft"]  # lr 1e-3 on a tiny model: the NLL drops


def test_resume_reproduces_uninterrupted_run(model_dir, tmp_path):
    over = {"save_every": 2, "algorithm.entropy_coef": 0.01}
    train(tiny_config(model_dir, tmp_path / "full", steps=4, overrides=over), base=None)
    # "Crash" after step 2: run to 2, then ask for 4 with resume: auto.
    train(tiny_config(model_dir, tmp_path / "resumed", steps=2, overrides=over), base=None)
    train(tiny_config(model_dir, tmp_path / "resumed", steps=4, overrides=over), base=None)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    skip = ("time/", "perf/")  # wall-clock numbers differ, everything else must not
    for a, b in zip(full, resumed):
        for k in a:
            if not k.startswith(skip):
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
    fa, fb = _params(tmp_path / "full" / "checkpoints" / "step-000004"), _params(tmp_path / "resumed" / "checkpoints" / "step-000004")
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_micro_batching_does_not_change_the_update(model_dir, tmp_path):
    # SFT over 8 prompts: 8 rows as one micro-batch (1×8) or one row each (8×1).
    def run(name, budget):
        over = {"trainer.micro_batch_tokens": budget, "trainer.prompts_per_step": 8, "algorithm.demos": "first"}
        final, = train(tiny_config(model_dir, tmp_path / name, algorithm="sft", steps=1, overrides=over), base=None)
        return _params(final), read_metrics(tmp_path / name / "metrics.jsonl")[0]

    (pa, ma), (pb, mb) = run("one", 100_000), run("eight", 1)
    assert ma["train/rows"] == mb["train/rows"] == 8
    assert ma["loss/sft"] == pytest.approx(mb["loss/sft"], rel=1e-5)
    assert ma["train/grad_norm"] == pytest.approx(mb["train/grad_norm"], rel=1e-5)
    # Adam divides by √v: on weights whose gradient is ~0, float-rounding differences between the
    # two summation orders become visible (up to a few % of lr = 1e-3), so compare loosely.
    assert all(torch.allclose(pa[k], pb[k], atol=1e-4) for k in pa)


def test_grpo_micro_batching_and_minibatches(model_dir, tmp_path):
    # GRPO: 4 prompts × 4 rollouts in 1 micro-batch vs 16; same data, same sampled rollouts.
    def run(name, budget):
        over = {"trainer.micro_batch_tokens": budget, "algorithm.entropy_coef": 0.01}
        final, = train(tiny_config(model_dir, tmp_path / name, steps=1, overrides=over), base=None)
        return _params(final), read_metrics(tmp_path / name / "metrics.jsonl")[0]

    (pa, ma), (pb, mb) = run("one", 100_000), run("many", 1)
    assert ma["reward/accuracy"] == mb["reward/accuracy"]
    assert ma["loss/pg"] == pytest.approx(mb["loss/pg"], abs=1e-6)
    assert all(torch.allclose(pa[k], pb[k], atol=1e-4) for k in pa)
    # two mini-batches of 2 prompts: two optimizer steps per rollout step, π_old recomputed
    train(tiny_config(model_dir, tmp_path / "mini", steps=2, overrides={"trainer.prompts_per_minibatch": 2}), base=None)
    rows = read_metrics(tmp_path / "mini" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2]


def test_length_sorted_micro_batches_do_not_change_the_update(model_dir, tmp_path, monkeypatch):
    # GRPO rollouts of 1..16 tokens: a budget of 160 tokens (10 per pass) cuts the 16 rows into
    # micro-batches of similar length, not in batch order; the update must be that of one pass.
    import posttrain.engine as engine

    splits, charges = [], set()

    def recorded(*args, **kw):
        charges.add(kw["pass_cost"])
        splits.append([r.tolist() for r in micro_batch_rows(*args, **kw)])
        return [torch.tensor(r) for r in splits[-1]]

    def run(name, budget):
        over = {"trainer.micro_batch_tokens": budget, "algorithm.entropy_coef": 0.01}
        final, = train(tiny_config(model_dir, tmp_path / name, steps=1, overrides=over), base=None)
        return _params(final), read_metrics(tmp_path / name / "metrics.jsonl")[0]

    from posttrain.batching import micro_batch_rows

    monkeypatch.setattr(engine, "micro_batch_rows", recorded)
    (pa, ma) = run("one", 100_000)
    assert {str(s) for s in splits} == {str([list(range(16))])}
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    assert list(charges) == [pytest.approx(28 + 2.5e8 / (6 * params))]  # a CPU pass, charged by the model's size
    splits.clear()
    (pb, mb) = run("sorted", 160)
    cut = splits[-1]  # the update's
    assert len(cut) > 1 and any(r != list(range(r[0], r[0] + len(r))) for r in cut), cut
    assert sorted(sum(cut, [])) == list(range(16))
    assert ma["loss/pg"] == pytest.approx(mb["loss/pg"], abs=1e-6)
    assert ma["loss/entropy"] == pytest.approx(mb["loss/entropy"], rel=1e-5)
    assert ma["train/grad_norm"] == pytest.approx(mb["train/grad_norm"], rel=1e-5)
    assert all(torch.allclose(pa[k], pb[k], atol=1e-4) for k in pa)


def test_stages_chain_weights(model_dir, tmp_path):
    cfg = tiny_config(model_dir, tmp_path / "run", steps=1)
    cfg["stages"] = [{"algorithm": {"name": "sft"}, "trainer": {"steps": 1}}, {"algorithm": {"name": "grpo"}}]
    s0, s1 = train(cfg, base=None)
    assert s0.parent.parent.name == "stage0-sft" and s1.parent.parent.name == "stage1-grpo"
    saved = (tmp_path / "run" / "stage1-grpo" / "config.yaml").read_text()
    assert str(s0) in saved  # stage 2 started from stage 1's final weights


def test_verifier_timeout_is_counted_not_fatal(model_dir, tmp_path):
    # A prompt whose rollouts would never be checked in time: 0 s budget → every answer times out.
    over = {"verifier.timeout_s": 0.001, "verifier.workers": 1}
    train(tiny_config(model_dir, tmp_path / "run", steps=1, overrides=over), base=None)
    r = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert r["verify/timeouts"] > 0 and r["reward/accuracy"] == 0.0


def test_cli_train_and_show_config(model_dir, tmp_path):
    import yaml

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(model_dir, tmp_path / "run", steps=1)))
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "show-config", str(cfg_path), "trainer.lr=0.5"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "lr: 0.5" in out.stdout and "clip_low: 0.2" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(cfg_path), "trainer.lr_rate=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "trainer.lr_rate: unknown key. Did you mean 'lr'?" in bad.stderr
    # As the deepspeed launcher calls it: a trailing --local_rank=N is accepted (the rank comes from the env).
    ok = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(cfg_path), "--local_rank=0"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "final checkpoint:" in ok.stdout
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


def test_cli_accuracy_summary_reads_each_stage(tmp_path):
    from posttrain.cli import accuracy_summary

    stages = []
    for name, rows in (("stage0-sft", [(0, 0.0), (5, None), (10, 0.25)]), ("stage1-grpo", [(0, 0.25), (4, 0.3125)])):
        d = tmp_path / name
        (d / "checkpoints" / "step-000010").mkdir(parents=True)
        d.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"step": s, **({} if a is None else {"eval/accuracy": a})}) + "\n" for s, a in rows))
        stages.append(d / "checkpoints" / "step-000010")
    assert accuracy_summary(stages) == [
        "held-out accuracy (stage0-sft): 0.000 at step 0 -> 0.250 at step 10",
        "held-out accuracy (stage1-grpo): 0.250 at step 0 -> 0.312 at step 4",
    ]
