"""What a user sees: progress lines and bars, a quiet log, training-curve plots, TensorBoard."""

import json
import os
import re
import subprocess
import sys

import pytest

import posttrain.logging as logging_mod
from posttrain.cli import main
from posttrain.config import ConfigError, LoggingConfig
from posttrain.logging import RunLogger, console_line
from posttrain.testing import make_tiny_model, tiny_config

PNG = b"\x89PNG\r\n\x1a\n"
PANEL_FILES = ["entropy.png", "grad_norm.png", "heldout_accuracy.png", "loss.png", "response_length.png",
               "reward.png", "routes.png"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}  # DeepSpeed's own default: auto-detect
    return {**env, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


# --- one real run, its output sent to a file ---------------------------------------------------------


def test_train_into_a_log_file_is_plain_quiet_and_ends_with_plots(model_dir, tmp_path):
    """`posttrain train cfg > log 2>&1`: no carriage returns or escape codes, a progress line per
    step with step/total, reward and ETA, no DeepSpeed or transformers noise, plots at the end."""
    cfg = tiny_config(model_dir, tmp_path / "run", steps=2, overrides={
        "logging.progress": True, "logging.console_every": 1, "data.eval": "synthetic:arithmetic?n=4&seed=1",
        "eval.max_new_tokens": 8})
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(path)], stdout=f,
                             stderr=subprocess.STDOUT, env=_env(), timeout=900)
    raw = log.read_bytes()  # bytes: reading text would turn a carriage return into a newline
    text = raw.decode()
    assert res.returncode == 0, text[-3000:]
    assert b"\r" not in raw and b"\x1b[" not in raw, text[:2000]
    lines = text.splitlines()
    step2 = [line for line in lines if line.startswith("[run] step 2/2 |")]
    assert len(step2) == 1, text
    assert re.search(r"\| reward [-0-9.e]+ \|", step2[0]) and re.search(r"\| loss [-0-9.e]+ \|", step2[0])
    assert re.search(r"\| eval [0-9.]+ \|", step2[0])  # the held-out accuracy of the last evaluation
    assert re.search(r"\| \d+:\d\d elapsed, ETA 0:00$", step2[0]), step2[0]
    assert any(re.fullmatch(r"\[run\] step 1/2 \| .* \| \d+:\d\d elapsed, ETA \d+:\d\d", line) for line in lines), text
    for noise in ("Setting accelerator to CPU", "Writing model shards", "Loading weights", "FutureWarning"):
        assert noise not in text, noise
    plots = tmp_path / "run" / "plots"
    assert f"plots: {plots}" in text
    assert sorted(p.name for p in plots.glob("*.png")) == PANEL_FILES
    assert all(p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000 for p in plots.glob("*.png"))


# --- the progress line and the stage bar ---------------------------------------------------------------


def test_progress_line_format():
    m = {"reward/mean": 0.41, "loss/total": 0.0123, "eval/accuracy": 0.285, "time/step_s": 1.93}
    assert (console_line(12, m, total=60, stage="stage1-grpo", elapsed=23.4, eta=3725.0)
            == "[stage1-grpo] step 12/60 | reward 0.41 | eval 0.285 | loss 0.0123 | 1.9 s | 0:23 elapsed, ETA 1:02:05")
    assert console_line(12, m) == "step 12 | reward 0.41 | eval 0.285 | loss 0.0123 | 1.9 s"  # the record's line as before


def test_progress_lines_carry_eta_and_the_latest_held_out_accuracy(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 140.0, 150.0, 160.0, 190.0, 200.0])  # start, then one reading per logged row
    monkeypatch.setattr(logging_mod, "monotonic", lambda: next(clock))
    monkeypatch.setattr(logging_mod, "on_terminal", lambda: False)
    with RunLogger(tmp_path / "stage0-sft", LoggingConfig(console_every=2), {"trainer": {"steps": 8}}, resume_step=2) as log:
        log.log(2, {"eval/accuracy": 0.125})  # 40 s of loading and evaluating: not part of the step rate
        log.log(3, {"loss/total": 1.0})  # 1 step in 10 s
        log.log(4, {"loss/total": 0.5, "eval/accuracy": 0.25})  # 2 steps in 20 s: 10 s per step, 4 to go
        log.log(6, {"loss/total": 0.25})  # 4 steps in 50 s: 12.5 s per step, 2 to go
        log.log(8, {"loss/total": 0.125})
    assert capsys.readouterr().out.splitlines() == [
        "[stage0-sft] step 2/8 | eval 0.125 | 0:40 elapsed",
        "[stage0-sft] step 4/8 | eval 0.25 | loss 0.5 | 1:00 elapsed, ETA 0:40",
        "[stage0-sft] step 6/8 | eval 0.25 | loss 0.25 | 1:30 elapsed, ETA 0:25",
        "[stage0-sft] step 8/8 | eval 0.25 | loss 0.125 | 1:40 elapsed, ETA 0:00",
    ]


def test_stage_bar_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    cfg, resolved = LoggingConfig(console_every=1), {"trainer": {"steps": 4}}
    monkeypatch.setattr(logging_mod, "on_terminal", lambda: True)
    with RunLogger(tmp_path / "grpo", cfg, resolved) as log:
        log.log(1, {"reward/mean": 0.5, "loss/total": 0.1, "train/lr": 1e-6})
        log.log(2, {"reward/mean": 0.75, "loss/total": 0.2})
    out, err = capsys.readouterr()
    assert re.search(r"grpo:  50%\|.*\| 2/4 \[.*, reward 0.75 \| loss 0.2\]", err), err  # the bar, with its postfix
    assert out.splitlines()[1].startswith("[grpo] step 2/4 | reward 0.75 | loss 0.2 |")
    assert "\r" not in out
    monkeypatch.setattr(logging_mod, "on_terminal", lambda: False)
    with RunLogger(tmp_path / "grpo2", cfg, resolved) as log:
        log.log(1, {"reward/mean": 0.5})
    assert capsys.readouterr().err == ""  # no terminal: no bar at all


# --- plots ----------------------------------------------------------------------------------------------


def _write_run(run_dir, algorithm, rows, steps):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"algorithm: {{name: {algorithm}}}\ntrainer: {{steps: {steps}}}\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(n, reward, loss_terms, **extra):
    return [{"step": s, "reward/mean": reward + 0.01 * s, "reward/accuracy": reward, "train/grad_norm": 1.0 / s,
             "train/entropy": 2.0, "rollout/response_length": 9.0 + s, "route/rl": 1.0, "route/sft": 0.0,
             "route/drop": 0.0, **{f"loss/{t}": 0.1 * s for t in loss_terms}, **extra}
            for s in range(1, n + 1)]


@pytest.fixture
def three_runs(tmp_path):
    """A two-stage SFT → GRPO run, a GRPO run and an HPT run (with evaluations)."""
    staged = tmp_path / "sft_then_grpo"
    sft_rows = [{"step": 0, "eval/accuracy": 0.0}] + [{"step": s, "loss/sft": 2.0 / s, "loss/total": 2.0 / s,
                                                       "route/sft": 1.0, "route/rl": 0.0, "train/grad_norm": 1.0}
                                                      for s in range(1, 5)]
    sft_rows[-1]["eval/accuracy"] = 0.2
    _write_run(staged / "stage0-sft", "sft", sft_rows, 4)
    _write_run(staged / "stage1-grpo", "grpo", [{"step": 0, "eval/accuracy": 0.2}] + _rows(3, 0.3, ["pg", "total"]), 3)
    _write_run(tmp_path / "grpo", "grpo", _rows(6, 0.3, ["pg", "total"]), 6)
    _write_run(tmp_path / "hpt", "hpt", _rows(6, 0.3, ["pg", "sft", "entropy", "total"], **{"eval/accuracy": 0.5}), 6)
    return [staged, tmp_path / "grpo", tmp_path / "hpt"]


def test_plot_runs_draws_several_runs_with_one_colour_per_algorithm(three_runs, tmp_path, monkeypatch):
    import posttrain.plotting as plotting

    figures = {}
    real_save = plotting._save

    def keep(fig, plt, path, title, n_axes):  # look at each figure before it is written and closed
        figures[path.name] = [{
            "ylabel": ax.get_ylabel(), "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else None,
            "lines": {ln.get_label(): (ln.get_color(), ln.get_linestyle(), ln.get_marker(), list(ln.get_xdata()))
                      for ln in ax.get_lines() if not ln.get_label().startswith("_")},
            "xticks": list(ax.get_xticks())} for ax in fig.axes if ax.get_visible()]
        return real_save(fig, plt, path, title, n_axes)

    monkeypatch.setattr(plotting, "_save", keep)
    written = plotting.plot_runs(three_runs, tmp_path / "out")
    assert sorted(p.name for p in written) == PANEL_FILES
    assert all(p.read_bytes()[:8] == PNG for p in written)

    colours = {"sft": plotting.colour_for("sft"), "grpo": plotting.colour_for("grpo"), "hpt": plotting.colour_for("hpt")}
    assert len(set(colours.values())) == 3
    for name, axes in figures.items():
        for ax in axes:
            assert ax["ylabel"], name  # every subplot says what its y axis is
            assert ax["legend"] and set(ax["legend"]) == set(ax["lines"]), name  # and has a legend of its lines
            assert all(float(t).is_integer() for t in ax["xticks"]), (name, ax["xticks"])
            for label, (colour, style, marker, _) in ax["lines"].items():
                run, algorithm = label.split(": ")
                assert colour == colours[algorithm], (name, label)  # the algorithm's colour in every panel
                # runs are told apart by line style and marker: the two GRPO curves never look alike
                assert (style, marker) == {"sft_then_grpo": ("-", "o"), "grpo": ("--", "s"), "hpt": ("-.", "^")}[run]
    held_out = figures["heldout_accuracy.png"][0]["lines"]
    assert held_out["sft_then_grpo: sft"][3] == [0, 4] and held_out["sft_then_grpo: grpo"][3] == [4]  # stage 1 after stage 0
    assert figures["reward.png"][0]["lines"]["sft_then_grpo: grpo"][3] == [5, 6, 7]
    loss_titles = [ax["ylabel"] for ax in figures["loss.png"]]
    assert loss_titles[0] == "loss (sum of terms)" and "loss term: sft" in loss_titles and "loss term: entropy" in loss_titles
    # route/drop is 0 in every run: left out; rl and sft are drawn
    assert [ax["ylabel"] for ax in figures["routes.png"]] == ["fraction of prompts routed rl", "fraction of prompts routed sft"]


def test_plot_command(three_runs, tmp_path, capsys):
    assert main(["plot", *map(str, three_runs), "--out", str(tmp_path / "cmp")]) == 0
    assert sorted(p.name for p in (tmp_path / "cmp").glob("*.png")) == PANEL_FILES
    assert main(["plot", str(three_runs[1])]) == 0  # one run: into RUN_DIR/plots
    assert (three_runs[1] / "plots" / "reward.png").is_file()
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a run directory" in err and len(err.splitlines()) == 1


def test_experiment_plots_keep_their_style(tmp_path):
    from posttrain.plotting import plot_curves

    curves = {"grpo": [{"eval/accuracy": {0: 0.1, 4: 0.3}}, {"eval/accuracy": {0: 0.1, 4: 0.5}}],
              "hpt": [{"eval/accuracy": {0: 0.1, 4: 0.6}}]}
    written = plot_curves(curves, tmp_path)
    assert [p.name for p in written] == ["heldout_accuracy.png"] and written[0].read_bytes()[:8] == PNG


# --- TensorBoard ------------------------------------------------------------------------------------------


def test_tensorboard_event_file_holds_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with RunLogger(tmp_path, LoggingConfig(tensorboard=True), {}) as log:
        log.log(1, {"loss/total": 0.5, "reward/mean": float("nan")})
        log.log(2, {"loss/total": 0.25, "reward/mean": 0.75})
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/total")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(2, 0.75)]  # NaN is not written


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"logging.tensorboard: needs the tensorboard package .*posttrain\[tensorboard\]"):
        RunLogger(tmp_path, LoggingConfig(tensorboard=True), {})
