"""benchmarks/bench_async.py: its arithmetic by hand (the runs themselves are the benchmark)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_async", ROOT / "benchmarks" / "bench_async.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_of_a_sync_run_by_hand():
    warm = {"time/step_s": 99.0, "train/tokens": 1, "time/rollout_s": 99.0}  # left out
    rows = [warm] + [{"time/step_s": 2.0, "train/tokens": 400, "time/rollout_s": 1.5, "rollout/response_length": 10.0,
                      "train/rows": 16}] * 2
    s = _bench().summarize(rows)
    assert s["steps_per_s"] == 0.5 and s["train_tokens_per_s"] == 200
    assert s["generated_tokens_per_s"] == 80  # 2 × 160 tokens in 4 s
    assert s["trainer_waited"] == pytest.approx(0.75)  # the trainer idles while it samples
    assert s["rollout_side_waited"] == pytest.approx(0.25)


def test_summary_of_an_async_run_by_hand():
    rows = [{"time/step_s": 5.0, "train/tokens": 1}] + [
        {"time/step_s": 1.0, "train/tokens": 300, "time/rollout_s": 0.8, "async/wait_s": 0.1,
         "rollout/response_length": 8.0, "train/rows": 16}] * 4
    s = _bench().summarize(rows)
    assert s["steps_per_s"] == 1.0 and s["train_tokens_per_s"] == 300
    assert s["trainer_waited"] == pytest.approx(0.1)  # async/wait_s, not the worker's rollout time
    assert s["rollout_side_waited"] == pytest.approx(0.2)


def test_the_queued_start_up_steps_are_left_out():
    rows = [{"time/step_s": 9.0, "train/tokens": 1}] * 3 + [{"time/step_s": 1.0, "train/tokens": 10}]
    assert _bench().summarize(rows, skip=3)["steps_per_s"] == 1.0
