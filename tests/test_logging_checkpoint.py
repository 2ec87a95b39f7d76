"""metrics.jsonl / console / wandb logging, progress bars, and atomic resumable checkpoints."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain import checkpoint as ckpt
from posttrain.config import LoggingConfig
from posttrain.logging import RunLogger, console_line, progress, read_metrics

# --- metrics.jsonl -----------------------------------------------------------------------------


def _rows(n: int) -> list[dict[str, float]]:
    return [{"reward/accuracy": i / 10, "loss/total": 0.5 - i * 0.01, "train/lr": 1e-6} for i in range(1, n + 1)]


def test_metrics_round_trip(tmp_path):
    with RunLogger(tmp_path / "run", LoggingConfig(), {"a": 1}) as log:
        for step, m in enumerate(_rows(5), start=1):
            log.log(step, m)
    back = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert back == [{"step": s, **m} for s, m in enumerate(_rows(5), start=1)]


def test_metrics_accept_numpy_and_tensor_scalars(tmp_path):
    with RunLogger(tmp_path, LoggingConfig(), {}) as log:
        log.log(1, {"a": np.float32(0.5), "b": torch.tensor(2.0), "c": 3})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 0.5, "b": 2.0, "c": 3.0}]


def test_metrics_reject_non_numbers_and_step_key(tmp_path):
    with RunLogger(tmp_path, LoggingConfig(), {}) as log:
        with pytest.raises(TypeError, match="'name'"):
            log.log(1, {"name": "grpo"})
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3.0})


def test_non_finite_values_are_written_as_null(tmp_path):
    # JSON has no NaN/inf; null keeps the file parseable by strict readers (jq, JS, pandas).
    with RunLogger(tmp_path, LoggingConfig(), {}) as log:
        log.log(1, {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "none": None, "ok": 1.5})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "nan": None, "inf": None, "ninf": None,
                                                         "none": None, "ok": 1.5}]


def test_resume_truncates_to_resume_step(tmp_path):
    with RunLogger(tmp_path, LoggingConfig(), {}) as log:
        for step, m in enumerate(_rows(5), start=1):
            log.log(step, m)
    # The checkpoint was at step 3; steps 4-5 are re-run and must not appear twice.
    with RunLogger(tmp_path, LoggingConfig(), {}, resume_step=3) as log:
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        log.log(4, {"x": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_fresh_run_starts_a_fresh_record(tmp_path):
    # No checkpoint to resume from (e.g. a crash before the first save): the old rows would be re-run.
    with RunLogger(tmp_path, LoggingConfig(), {}) as log:
        log.log(1, {"x": 1.0})
    with RunLogger(tmp_path, LoggingConfig(), {}) as log:
        log.log(1, {"x": 2.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "x": 2.0}]


def test_read_metrics_skips_a_torn_last_line_only(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x": ')
    assert read_metrics(p) == [{"step": 1, "x": 1.0}]
    p.write_text('{"step": 1, "x": \n{"step": 2, "x": 1.0}\n')
    with pytest.raises(ValueError):
        read_metrics(p)


def test_console_line(tmp_path, capsys):
    m = {"reward/mean": 0.41, "reward/accuracy": 0.38, "loss/total": 0.0123, "train/grad_norm": 0.71,
         "train/lr": 1e-6, "time/step_s": 1.93, "perf/ignored": 5.0}
    assert console_line(12, m) == "step 12 | reward 0.41 | acc 0.38 | loss 0.0123 | gn 0.71 | lr 1.0e-06 | 1.9 s"
    with RunLogger(tmp_path, LoggingConfig(console_every=2), {}) as log:
        log.log(1, {"loss/total": 1.0})
        log.log(2, {"loss/total": 2.0})
        log.log(3, {"eval/accuracy": 0.5})  # eval rows are always shown
    assert capsys.readouterr().out.splitlines() == ["step 2 | loss 2", "step 3 | eval 0.5"]


def test_wandb_disabled_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    with RunLogger(tmp_path, LoggingConfig(wandb="disabled"), {}) as log:
        log.log(1, {"x": 1.0})
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb_id.txt").exists()


def test_wandb_offline_writes_a_local_run_and_resumes_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the mode must come from the config
    cfg = LoggingConfig(wandb="offline", project="posttrain-test")
    with RunLogger(tmp_path, cfg, {"trainer": {"lr": 1e-6}}) as log:
        log.log(1, {"loss/total": 0.5, "train/grad_norm": math.nan})
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("run-*.wandb"))
    with RunLogger(tmp_path, cfg, {}, resume_step=1):
        pass
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id  # same wandb run continues
    with RunLogger(tmp_path, cfg, {}):
        pass
    assert (tmp_path / "wandb_id.txt").read_text().strip() != run_id  # a fresh run is a new wandb run


# --- progress ----------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_iterates_and_updates(enabled, capsys):
    assert list(progress(range(5), desc="x", enabled=enabled)) == [0, 1, 2, 3, 4]
    bar = progress(total=3, desc="manual", enabled=enabled)
    for _ in range(3):
        bar.update(1)
    bar.set_postfix(loss=0.1)
    bar.close()
    err = capsys.readouterr().err
    assert ("manual" in err) == enabled  # bars go to stderr, and only when enabled


# --- checkpoints -------------------------------------------------------------------------------


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789+-=abcdefghijklmnopqrstuvwxyz ")
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _tiny_model(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def _train_step(model, opt) -> None:
    ids = torch.tensor([[1, 5, 7, 9, 2, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def _fake_state(step: int) -> dict:
    return {"step": step}


@pytest.fixture(scope="module")
def tok():
    return _tiny_tokenizer()


@pytest.fixture
def model():
    return _tiny_model()


def test_tiny_tokenizer_is_char_level(tok):
    assert tok.convert_ids_to_tokens(tok("1+2", add_special_tokens=False).input_ids) == ["1", "+", "2"]


def test_checkpoint_round_trip_and_exact_resume(tmp_path, tok, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, opt)
    path = ckpt.save_checkpoint(tmp_path, 1, model=model, tokenizer=tok,
                                trainer_state={"step": 1, "optimizer": opt.state_dict(), "sampler": {"epoch": 0}})
    assert path == tmp_path / "checkpoints" / "step-000001" and ckpt.checkpoint_step(path) == 1
    assert ckpt.latest_checkpoint(tmp_path) == path
    _train_step(model, opt)  # the uninterrupted run's step 2
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("1+2").input_ids == tok("1+2").input_ids
    state, _ = ckpt.load_checkpoint_state(path)
    assert state["step"] == 1 and state["sampler"] == {"epoch": 0}
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    opt2.load_state_dict(state["optimizer"])
    _train_step(loaded, opt2)  # the resumed run's step 2
    got = loaded.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_checkpoint_weights_equal_after_load(tmp_path, tok, model):
    from transformers import AutoModelForCausalLM

    path = ckpt.save_checkpoint(tmp_path, 3, model=model, tokenizer=tok, trainer_state=_fake_state(3))
    loaded = AutoModelForCausalLM.from_pretrained(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_rng_round_trip(tmp_path, tok, model):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = ckpt.save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, trainer_state=_fake_state(1))
    draws = (torch.rand(3), random.random(), np.random.rand(2))
    _, rng = ckpt.load_checkpoint_state(path)
    ckpt.set_rng_state(rng)
    again = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and np.array_equal(draws[2], again[2])


def _visible(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("fail_at", ["_mark_complete", "_publish", "_write_contents"])
def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, tok, model, monkeypatch, fail_at):
    first = ckpt.save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, trainer_state=_fake_state(1))

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, fail_at, crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model=model, tokenizer=tok, trainer_state=_fake_state(2))
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert _visible(tmp_path) == ["step-000001"]  # no step-000002, no temp dir


def test_a_killed_save_is_invisible_and_cleaned_up(tmp_path, tok, model):
    # A hard crash (SIGKILL, power cut) runs no except-block: it leaves a temp dir named after a dead pid.
    first = ckpt.save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, trainer_state=_fake_state(1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    partial = tmp_path / "checkpoints" / f".tmp-step-000002-{dead.pid}"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-000003").mkdir()  # a dir without COMPLETE (e.g. a cut-short copy)
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert not partial.exists()


def test_a_live_process_temp_dir_is_spared(tmp_path):
    # Another process's save in progress is not stale, even though it looks incomplete.
    (tmp_path / "checkpoints").mkdir()
    busy = tmp_path / "checkpoints" / f".tmp-step-000002-{1}"  # pid 1 always exists
    busy.mkdir()
    ckpt.latest_checkpoint(tmp_path)
    assert busy.exists()


def test_resaving_a_step_replaces_it(tmp_path, tok, model):
    ckpt.save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, trainer_state={"step": 1, "v": "old"})
    path = ckpt.save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, trainer_state={"step": 1, "v": "new"})
    assert ckpt.load_checkpoint_state(path)[0]["v"] == "new"
    assert _visible(tmp_path) == ["step-000001"]


def test_keep_last_prunes_oldest(tmp_path, tok, model):
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, step, model=model, tokenizer=tok, trainer_state=_fake_state(step), keep_last=2)
    assert _visible(tmp_path) == ["step-000006", "step-000008"]
    # The checkpoint just written survives even when newer ones exist (a rerun in the same run_dir).
    ckpt.save_checkpoint(tmp_path, 1, model=model, tokenizer=tok, trainer_state=_fake_state(1), keep_last=1)
    assert _visible(tmp_path) == ["step-000001", "step-000008"]


def test_export_hf_loads_without_trainer_state(tmp_path, tok, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ckpt.save_checkpoint(tmp_path, 5, model=model, tokenizer=tok, trainer_state=_fake_state(5))
    out = ckpt.export_hf(path, tmp_path / "export")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"trainer_state.pt", "rng.pt", "COMPLETE"}
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>"


def test_incomplete_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "checkpoints" / "step-000001"
    bad.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        ckpt.load_checkpoint_state(bad)
    with pytest.raises(FileNotFoundError):
        ckpt.export_hf(bad, tmp_path / "out")
    with pytest.raises(ValueError):
        ckpt.checkpoint_step(tmp_path / "final")
