"""What a new user meets in the first hour: stopping and resuming runs, re-running into a run
directory, staged overrides, path mistakes, --dry-run, checkpoint file modes, the README's
install commands (issue 18; issue 19 items 5 and 11)."""

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain import checkpoint as ckpt
from posttrain.cli import build_parser, main
from posttrain.config import ConfigError
from posttrain.logging import read_metrics
from posttrain.run import load_config, resolve_stages, train
from posttrain.testing import make_tiny_model, tiny_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- Ctrl-C / SIGTERM --------------------------------------------------------------------------


def _start_and_interrupt(cfg_path: Path, run_dir: Path, sig: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start ``posttrain train``, wait for the first metrics row, send ``sig``; returns the result
    and the step logged when the signal was sent."""
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "train", str(cfg_path)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600  # generous: the machine may be heavily loaded
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and read_metrics(metrics):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    seen = read_metrics(metrics)[-1]["step"]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), seen


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_says_how_to_resume_and_the_resume_continues(model_dir, tmp_path, sig, code):
    run_dir = tmp_path / "run"
    # save_every 0: without the signal handling nothing would be saved before step 400
    cfg_path = _write(tiny_config(model_dir, run_dir, steps=400, overrides={"save_every": 0}), tmp_path / "c.yaml")
    done, seen = _start_and_interrupt(cfg_path, run_dir, sig)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    m = re.fullmatch(rf"interrupted \({signal.Signals(sig).name}\) at step (\d+): saved (\S+); "
                     rf"resume with: posttrain train {re.escape(str(cfg_path))} --resume (\S+)", last)
    assert m, done.stderr
    step, saved = int(m.group(1)), Path(m.group(2))
    assert seen <= step < 400  # it finished the step it was in, then stopped
    assert saved == run_dir / "checkpoints" / f"step-{step:06d}" and ckpt.is_complete(saved)
    assert Path(m.group(3)) == saved
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, step + 1))
    if sig == signal.SIGTERM:
        return
    # Resume (the printed command, two steps further) continues from that step.
    result = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(cfg_path), f"trainer.steps={step + 2}",
                             "--resume", str(saved)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"resuming from step {step} of {run_dir}" in result.stdout
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == list(range(1, step + 3))
    assert ckpt.latest_checkpoint(run_dir).name == f"step-{step + 2:06d}"


# --- re-running into a run directory -----------------------------------------------------------


def test_rerun_says_it_resumes_refuses_a_changed_config_unless_forced(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = tiny_config(model_dir, run_dir, steps=1)
    train(cfg, base=None)
    capsys.readouterr()
    rows = read_metrics(run_dir / "metrics.jsonl")
    # the same config: a finished run resumes (and has nothing left to train), and says so
    train(cfg, base=None)
    assert f"resuming from step 1 of {run_dir}" in capsys.readouterr().out
    assert read_metrics(run_dir / "metrics.jsonl") == rows
    # a training-relevant change is refused, naming each changed key with both values
    changed = tiny_config(model_dir, run_dir, steps=1, overrides={"trainer.lr": 2e-3, "rollout.n": 2})
    with pytest.raises(ConfigError) as e:
        train(changed, base=None)
    assert "trainer.lr: 0.001 -> 0.002" in str(e.value) and "rollout.n: 4 -> 2" in str(e.value)
    assert "--force-resume" in str(e.value)
    # on the command line: one line, exit 2, no traceback
    assert main(["train", str(_write(changed, tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "trainer.lr: 0.001 -> 0.002" in err and "Traceback" not in err
    # more steps, or other logging, are not a different run
    train(tiny_config(model_dir, run_dir, steps=2, overrides={"logging.console_every": 7}), base=None)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    # forced: continues with the new config, and says what an optimizer-state key does
    capsys.readouterr()
    forced = tiny_config(model_dir, run_dir, steps=3, overrides={"trainer.lr": 2e-3, "rollout.n": 2})
    train(forced, base=None, force_resume=True)
    out = capsys.readouterr().out
    assert "--force-resume: continuing with changed rollout.n: 4 -> 2; trainer.lr: 0.001 -> 0.002\n" in out
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-1]["step"] == 3 and rows[-1]["train/rows"] == 8  # 4 prompts × the new n=2
    # the new lr trains (constant schedule): the optimizer moments come from the checkpoint, the lr from the config
    assert [r["train/lr"] for r in rows] == [1e-3, 1e-3, 2e-3]


def test_config_yaml_is_the_full_validated_config(model_dir, tmp_path):
    train(tiny_config(model_dir, tmp_path / "run", steps=1), base=None)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    # plugin defaults nobody wrote in the config
    assert saved["algorithm"] == {"name": "grpo", "norm_adv_by_std": True, "adv_eps": 1e-6, "clip_low": 0.2,
                                  "clip_high": None, "clip_dual": None, "ratio_level": "token", "loss_agg": "token-mean",
                                  "loss_max_len": None, "sft_coef": 1.0, "entropy_coef": 0.0, "kl_coef": 0.0,
                                  "kl_estimator": "k3", "kl_reward_coef": 0.0, "kl_reward_estimator": "k1"}
    assert saved["trainer"]["weight_decay"] == 0.01 and saved["data"]["max_prompt_tokens"] == 1024


def test_resume_never_moves_the_old_run_aside(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_config(model_dir, run_dir, steps=2), base=None)
    capsys.readouterr()
    train(tiny_config(model_dir, run_dir, steps=1, overrides={"resume": "never"}), base=None)
    out = capsys.readouterr().out
    (aside,) = tmp_path.glob("run.old-*")
    assert f"resume=never: moved the previous run in {run_dir} to {aside}" in out
    assert ckpt.latest_checkpoint(aside).name == "step-000002"  # the old run, whole
    assert [d.name for d in (run_dir / "checkpoints").iterdir()] == ["step-000001"]  # no newer leftover
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]


def test_resume_never_refuses_a_directory_that_is_not_a_run(model_dir, tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("not a run")
    with pytest.raises(ConfigError, match=r"resume=never: run_dir .*mine is not empty and holds no posttrain run"):
        train(tiny_config(model_dir, run_dir, steps=1, overrides={"resume": "never"}), base=None)
    assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]


def test_resume_from_a_chosen_checkpoint(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    over = {"save_every": 1, "keep_checkpoints": None}
    train(tiny_config(model_dir, run_dir, steps=3, overrides=over), base=None)
    first = read_metrics(run_dir / "metrics.jsonl")
    chosen = run_dir / "checkpoints" / "step-000001"
    capsys.readouterr()
    train(tiny_config(model_dir, run_dir, steps=2, overrides=over), base=None, resume_path=chosen)
    out = capsys.readouterr().out
    assert f"resuming from step 1 of {run_dir}" in out
    assert "--resume: moved the later checkpoint" in out
    again = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2]
    assert again[1]["loss/total"] == first[1]["loss/total"]  # CPU resume is exact: the same step 2
    names = sorted(d.name for d in (run_dir / "checkpoints").iterdir())
    assert names[:2] == ["step-000001", "step-000002"]  # the new step 2; the old steps 2 and 3 moved aside:
    assert [re.sub(r"\d{8}-\d{6}", "T", n) for n in names[2:]] == ["step-000002.old-T", "step-000003.old-T"]
    assert ckpt.latest_checkpoint(run_dir).name == "step-000002"  # step 3 of the abandoned branch is out of view
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        train(tiny_config(model_dir, run_dir, steps=2), base=None, resume_path=tmp_path)


# --- staged configs ----------------------------------------------------------------------------


def _staged(model_dir, tmp_path) -> dict:
    cfg = tiny_config(model_dir, tmp_path / "run", steps=9)
    cfg["stages"] = [{"algorithm": {"name": "sft"}, "trainer": {"steps": 3000, "lr": 3e-3}},
                     {"algorithm": {"name": "grpo"}, "trainer": {"steps": 60}}]
    return cfg


def _steps(cfg, overrides) -> list[int]:
    return [st.run.trainer.steps for st in resolve_stages(load_config(cfg, overrides, base=None))]


def test_overrides_of_staged_configs(model_dir, tmp_path):
    cfg = _staged(model_dir, tmp_path)
    assert _steps(cfg, []) == [3000, 60]
    assert _steps(cfg, ["trainer.steps=5"]) == [5, 5]  # a top-level override beats every stage's own value
    assert _steps(cfg, ["stages.0.trainer.steps=7"]) == [7, 60]
    assert _steps(cfg, ["trainer.steps=5", "stages.1.trainer.steps=7"]) == [5, 7]  # the more specific wins
    stages = resolve_stages(load_config(cfg, ["trainer.lr=1e-5"], base=None))
    assert [st.run.trainer.lr for st in stages] == [1e-5, 1e-5]
    assert stages[0].run.model.path == str(model_dir)
    with pytest.raises(ConfigError) as e:
        resolve_stages(load_config(cfg, ["trainer.lr=fast"], base=None))
    assert "(stage 0: sft): trainer.lr" in str(e.value) and "(stage 1: grpo): trainer.lr" in str(e.value)
    with pytest.raises(ConfigError, match=r"stages.2.trainer.steps: there is no stage 2 \(the config has 2 stage"):
        load_config(cfg, ["stages.2.trainer.steps=1"], base=None)


# --- paths, --dry-run, the command line --------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "empty", "no-weights"])
def test_a_bad_model_path_is_one_line_before_anything_is_written(model_dir, tmp_path, capsys, case):
    path = tmp_path / "model"
    if case == "empty":
        path.mkdir()
    elif case == "no-weights":
        shutil.copytree(model_dir, path)
        (path / "model.safetensors").unlink()
    cfg = _write(tiny_config(path, tmp_path / "run", steps=1), tmp_path / "c.yaml")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"missing": f"model.path: {path} does not exist (give a local HF model directory",
                "empty": f"model.path: {path} is empty: not an HF model directory",
                "no-weights": f"model.path: {path} has no weights (*.safetensors or pytorch_model*.bin)"}[case]
    assert len(err) == 2 and err[1].startswith(f"  - {expected}"), err
    assert not (tmp_path / "run").exists()


def test_a_missing_data_file_is_reported_before_the_run_dir_and_base_model_exist(tmp_path, capsys):
    cfg = tiny_config("tiny:hidden=32,layers=1", tmp_path / "run", steps=1,
                      overrides={"data.train": str(tmp_path / "train.jsonl"), "data.eval": str(tmp_path / "eval.jsonl")})
    assert main(["train", str(_write(cfg, tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err
    assert f"data.train: {tmp_path / 'train.jsonl'} does not exist" in err
    assert f"data.eval: {tmp_path / 'eval.jsonl'} does not exist" in err
    assert not (tmp_path / "run").exists()  # no run dir, no base-model built


def test_dry_run_prints_the_resolved_config_and_the_step_plan(capsys):
    demo = REPO / "configs" / "demo" / "demo.yaml"
    assert main(["train", str(demo), "run_dir=/nonexistent/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# --- stage 0: sft ---" in out and "# --- stage 1: grpo ---" in out
    assert "kl_estimator: k3" in out  # the algorithm's defaults, filled in
    assert ("stage 0 (sft): 1500 optimizer steps, starts at step 0; 1500 rollout step(s) to go × 32 prompts "
            "(1 optimizer step(s) each); run dir /nonexistent/dry/stage0-sft") in out
    assert "stage 1 (grpo): 40 optimizer steps, starts at step 0; 40 rollout step(s) to go × 32 prompts" in out
    assert not Path("/nonexistent/dry").exists()


def test_train_without_arguments_asks_only_for_the_config(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "the following arguments are required: config" in err and "overrides" not in err.splitlines()[-1]
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    assert all(a.help for a in train_parser._actions)


# --- checkpoint files --------------------------------------------------------------------------


def test_checkpoint_files_share_one_mode(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    path = ckpt.save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, trainer_state={"step": 1})
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


# --- the README's install and test commands are what CI runs ------------------------------------


def _readme_block(name: str) -> str:
    """The block as .ci/run extracts it (its own readme_block function, run by bash)."""
    script = f'source <(sed -n "/^readme_block()/,/^}}/p" .ci/run) && readme_block {name}'
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, check=True).stdout


def _fenced_after(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(re.escape(marker) + r"[^\n]*\n```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no block after {marker!r}"
    return m.group(1)


def test_ci_runs_the_readme_commands_verbatim():
    install, tests = _readme_block("install"), _readme_block("test")
    assert install == _fenced_after("<!-- .ci/run: install")
    assert tests == _fenced_after("<!-- .ci/run: test") == "pytest -q\n"
    assert 'pip install -e ".[dev]"' in install and "posttrain plugins" in install
    ci = (REPO / ".ci" / "run").read_text()
    # .ci/run installs and tests only through the README's blocks
    own = [line for line in ci.splitlines() if re.match(r"\s*(pip|pytest|python -m pip)\b", line)]
    assert own == [] and 'eval "$install"' in ci and 'eval "$tests"' in ci


@pytest.mark.slow
def test_readme_install_commands_work_in_a_fresh_venv(tmp_path):
    """The Quick start's block, verbatim, in a copy of the repository, with the pip that
    ``python -m venv`` brings (23.2.1 on Python 3.11; it failed on ``pip install -e ".[dev]" plugins/*/``)."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "wandb"))
    script = (f'source <(sed -n "/^readme_block()/,/^}}/p" .ci/run) && set -e && eval "$(readme_block install)" '
              '&& pip --version')
    env = {k: v for k, v in ENV.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(REPO / ".venv")))
    done = subprocess.run(["bash", "-c", script], cwd=copy, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    installed = re.findall(r"^  (\w+)\s+(?:algorithm|extension)", done.stdout, re.M)
    assert sorted(installed) == ["cispo", "dapo", "dypo", "gift", "grpo", "hpt", "luffy", "reinforce_pp", "rloo", "sft", "srft"]
    assert str(copy / ".venv") in done.stdout.splitlines()[-1]  # pip --version: the fresh venv's own pip
