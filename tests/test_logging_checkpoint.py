"""metrics.jsonl, wandb modes, progress bars, and atomic checkpoints."""

import random

import numpy as np
import pytest
import torch

from posttrain import checkpoint as ckpt
from posttrain.config import LoggingConfig
from posttrain.logging import RunLogger, progress, read_metrics
from posttrain.testing import make_tiny_model


def test_metrics_jsonl_and_resume_truncation(tmp_path):
    with RunLogger(tmp_path, LoggingConfig(), {"a": 1}) as log:
        for s in range(1, 6):
            log.log(s, {"loss/total": s / 10, "odd": float("nan") if s == 3 else 1.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[1]["loss/total"] == 0.2 and rows[2]["odd"] is None  # non-finite → null
    with RunLogger(tmp_path, LoggingConfig(), {}, resume_step=2) as log:
        log.log(3, {"loss/total": 9.0})
    assert [(r["step"], r["loss/total"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 0.1), (2, 0.2), (3, 9.0)]
    RunLogger(tmp_path, LoggingConfig(), {}).close()  # a fresh (non-resumed) run starts a fresh file
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_wandb_offline_and_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with RunLogger(tmp_path / "off", LoggingConfig(wandb="offline"), {"x": 1}) as log:
        log.log(1, {"loss/total": 1.0})
    assert list((tmp_path / "off" / "wandb").glob("offline-run-*"))
    with RunLogger(tmp_path / "dis", LoggingConfig(wandb="disabled"), {}) as log:
        log.log(1, {"loss/total": 1.0})
    assert not (tmp_path / "dis" / "wandb").exists()


def test_progress_enabled_and_disabled():
    assert list(progress(range(3), enabled=False)) == [0, 1, 2]
    assert list(progress(range(3), enabled=True, desc="x")) == [0, 1, 2]
    bar = progress(total=3, enabled=False)
    bar.update(2)
    bar.close()


def _model_and_tok(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / "m", hidden=32, layers=1, heads=2)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _adam_step(model, opt):
    loss = model(torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_checkpoint_round_trip_continues_identically(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = _model_and_tok(tmp_path)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _adam_step(model, opt)
    path = ckpt.save_checkpoint(tmp_path / "run", 1, model=model, tokenizer=tok, trainer_state={"opt": opt.state_dict(), "step": 1})
    assert path.name == "step-000001" and (path / "COMPLETE").exists()
    _adam_step(model, opt)  # the uninterrupted run's next step
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    loaded = AutoModelForCausalLM.from_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("1+1").input_ids == tok("1+1").input_ids
    state, _ = ckpt.load_checkpoint_state(path)
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    opt2.load_state_dict(state["opt"])
    _adam_step(loaded, opt2)
    assert all(torch.allclose(expected[k], v, atol=1e-7) for k, v in loaded.state_dict().items())


def test_rng_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    s = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(s)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, tok = _model_and_tok(tmp_path)
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, 1, model=model, tokenizer=tok, trainer_state={})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_fsync_dir", boom)  # crash after the weights, before COMPLETE + rename
    with pytest.raises(OSError):
        ckpt.save_checkpoint(run, 2, model=model, tokenizer=tok, trainer_state={})
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(run).name == "step-000001"
    assert not (run / "checkpoints" / "step-000002").exists()
    assert list((run / "checkpoints").glob(".tmp-*"))  # the partial save is only a temp dir...
    ckpt.save_checkpoint(run, 3, model=model, tokenizer=tok, trainer_state={})
    assert not list((run / "checkpoints").glob(".tmp-*"))  # ...removed by the next save


def test_keep_last_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = _model_and_tok(tmp_path)
    run = tmp_path / "run"
    for s in (1, 2, 3):
        ckpt.save_checkpoint(run, s, model=model, tokenizer=tok, trainer_state={}, keep_last=2)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    out = ckpt.export_hf(ckpt.latest_checkpoint(run), tmp_path / "export")
    assert not (out / "trainer_state.pt").exists()
    m = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))
