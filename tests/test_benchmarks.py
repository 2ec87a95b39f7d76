"""benchmarks/: bench_gpu.py's arithmetic and one real run of it on the CPU (a GPU user runs the
same script; only the numbers change); bench_vs_trl.py and bench_async.py."""

import importlib.util
import json
from pathlib import Path

import pytest

from posttrain.logging import read_metrics
from posttrain.testing import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_summary_by_hand():
    rows = [{"time/step_s": 2.0, "train/tokens": 8000, "mem/peak_gib": 30.0, "time/rollout_s": 1.0,
             "time/verify_s": 0.2, "time/train_s": 0.6, "time/sync_s": 0.2},
            {"time/step_s": 4.0, "train/tokens": 16000, "mem/peak_gib": 31.5, "time/rollout_s": 3.0,
             "time/verify_s": 0.2, "time/train_s": 0.6, "time/sync_s": 0.2}]
    s = _load("bench_gpu").summarize(rows, gpus=4)
    assert s["step_s"] == 3.0 and s["tokens_per_step"] == 12000
    assert s["tokens_per_s_per_gpu"] == pytest.approx(12000 / (3.0 * 4))  # 1000
    assert s["peak_mem_gib"] == 31.5  # the worst step, not the mean
    assert s["rollout_s"] == 2.0 and s["rollout_frac"] == pytest.approx(2 / 3)
    assert s["sync_frac"] == pytest.approx(0.2 / 3)


def test_a_cpu_run_prints_the_summary_of_its_metrics(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "m")
    run = tmp_path / "run"
    code = _load("bench_gpu").main(["--model", str(model), "--steps", "3", "--run-dir", str(run), "--json",
                              "trainer.device=cpu", "rollout.n=4", "rollout.max_new_tokens=8",
                              "trainer.prompts_per_step=4"])
    assert code == 0
    out = capsys.readouterr().out
    s = json.loads(out[out.rindex("{\n"):])
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    measured = rows[1:]  # step 1 is warm-up
    assert s["steps"] == 2 and s["gpus"] == 1
    assert s["tokens_per_step"] == pytest.approx(sum(r["train/tokens"] for r in measured) / 2)
    assert s["tokens_per_step"] >= 4 * 4 * 2  # 16 responses of at least one token, plus their prompts
    assert s["tokens_per_s_per_gpu"] == pytest.approx(s["tokens_per_step"] / s["step_s"])
    parts = sum(s[f"{p}_s"] for p in ("rollout", "verify", "train", "sync"))
    assert 0 < parts <= s["step_s"] * 1.001  # the split is inside the step


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_verifier_runs_and_times_out_only_the_hanging_answers(capsys):
    out = _load("bench_verifier").main(["--answers", "40", "--timeout", "1.0", "--hang-frac", "0.05", "--workers", "1"])
    assert set(out) == {"numeric", "symbolic", "hanging"} and all(1 in v for v in out.values())
    text = capsys.readouterr().out
    assert "numeric   workers=1: 40 answers" in text
    assert "(correct 20, timeouts 0)" in text  # numeric and symbolic: every other answer is right
    assert "(correct 18, timeouts 2)" in text  # 2 of the 40 hang; the 18 right ones around them still count


def test_bench_vs_trl_smoke_without_trl(capsys):
    """The raw-torch floor and posttrain at the smallest size (TRL left out: an optional extra)."""
    s = _load("bench_vs_trl").main(["--sizes", "tiny-8x32", "--rounds", "1", "--steps", "2", "--threads", "1", "--no-trl"])
    row = s["tiny-8x32"]
    assert "trl_s" not in row and row["posttrain_s"] > 0 and row["raw_s"] > 0
    assert 0 < row["rollout_frac"] < 1 and 0 < row["train_frac"] < 1 and row["train_vs_raw"] > 0
    assert 1 <= row["posttrain_len"] <= 32
    assert row["posttrain_cpu"] > 0 and row["raw_cpu"] > 0  # CPU seconds per step, beside the wall clock
    out = capsys.readouterr().out
    assert "posttrain/raw" in out and f"train phase / raw torch's {row['train_vs_raw']:.2f}" in out


# --- benchmarks/bench_async.py: its arithmetic by hand (the runs themselves are the benchmark) ---


def test_summary_of_a_sync_run_by_hand():
    warm = {"time/step_s": 99.0, "train/tokens": 1, "time/rollout_s": 99.0}  # left out
    rows = [warm] + [{"time/step_s": 2.0, "train/tokens": 400, "time/rollout_s": 1.5, "rollout/response_length": 10.0,
                      "train/rows": 16}] * 2
    s = _load("bench_async").summarize(rows)
    assert s["steps_per_s"] == 0.5 and s["train_tokens_per_s"] == 200
    assert s["generated_tokens_per_s"] == 80  # 2 × 160 tokens in 4 s
    assert s["trainer_waited"] == pytest.approx(0.75)  # the trainer idles while it samples
    assert s["rollout_side_waited"] == pytest.approx(0.25)


def test_summary_of_an_async_run_by_hand():
    rows = [{"time/step_s": 5.0, "train/tokens": 1}] + [
        {"time/step_s": 1.0, "train/tokens": 300, "time/rollout_s": 0.8, "async/wait_s": 0.1,
         "rollout/response_length": 8.0, "train/rows": 16}] * 4
    s = _load("bench_async").summarize(rows)
    assert s["steps_per_s"] == 1.0 and s["train_tokens_per_s"] == 300
    assert s["trainer_waited"] == pytest.approx(0.1)  # async/wait_s, not the worker's rollout time
    assert s["rollout_side_waited"] == pytest.approx(0.2)


def test_the_queued_start_up_steps_are_left_out():
    rows = [{"time/step_s": 9.0, "train/tokens": 1}] * 3 + [{"time/step_s": 1.0, "train/tokens": 10}]
    assert _load("bench_async").summarize(rows, skip=3)["steps_per_s"] == 1.0


def test_bench_threads_cells_are_medians_over_rounds(capsys):
    bt = _load("bench_threads")
    runs = [{"workload": "sft", "variant": "posttrain", "scenario": "idle", "step_s": s, "timed_out": False}
            for s in (0.08, 0.06, 0.07)]
    runs += [{"workload": "sft", "variant": "torch", "scenario": "idle", "step_s": s, "timed_out": t}
             for s, t in ((0.05, False), (None, True))]
    cells = bt.combine(runs)
    assert cells[("sft", "posttrain", "idle")] == {"step_s": 0.07, "timed_out": False}
    assert cells[("sft", "torch", "idle")] == {"step_s": 0.05, "timed_out": True}  # a round without steps adds none
    bt.report(runs)
    assert "posttrain / torch   1.40x" in capsys.readouterr().out


def test_bench_threads_grpo_stage_can_start_from_the_sft_weights(tmp_path):
    from omegaconf import OmegaConf

    bt = _load("bench_threads")
    demo = OmegaConf.load(bt.DEMO)
    grpo = OmegaConf.load(bt.stage_yaml("grpo", None, tmp_path / "run", tmp_path / "g.yaml", model="/ckpt/step-001500"))
    assert grpo.model.path == "/ckpt/step-001500" and grpo.algorithm.name == "grpo"
    assert grpo.trainer.steps == demo.stages[1].trainer.steps and grpo.eval.enabled is False
    sft = OmegaConf.load(bt.stage_yaml("sft", 7, tmp_path / "run", tmp_path / "s.yaml"))
    assert sft.model.path == demo.model.path and sft.trainer.steps == 7 and sft.algorithm.name == "sft"
