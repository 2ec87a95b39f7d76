"""Hardening (issue 19): nothing but tensors is unpickled from a checkpoint, a user's mistake is
one line (exit 2) checked before the model loads, and no failure is silent."""

import os
import pickle

import pytest
import torch
import yaml

from posttrain import checkpoint as ckpt
from posttrain.cli import main
from posttrain.run import train
from posttrain.testing import make_tiny_model, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def _cli(capsys, cfg: dict, tmp_path, *overrides: str) -> tuple[int, str]:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(path), *overrides])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


# --- 1. a checkpoint cannot run code -------------------------------------------------------------


class _Planted:
    """Unpickling this creates a marker file: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_planted_pickle_in_rng_pt_is_refused_and_never_runs(model_dir, tmp_path, capsys):
    cfg = tiny_config(model_dir, tmp_path / "run", steps=1, overrides={"rollout.n": 2})
    train(cfg, base=None)
    rng = tmp_path / "run" / "checkpoints" / "step-000001" / ckpt.RNG_STATE
    marker = tmp_path / "pwned"
    rng.write_bytes(pickle.dumps({"python": _Planted(marker)}, protocol=2))
    cfg["trainer"]["steps"] = 2
    code, err = _cli(capsys, cfg, tmp_path)  # resume: auto finds step 1
    assert not marker.exists()
    assert code == 2
    assert err == [
        f"error: {rng}: refused to load: it holds GLOBAL os.makedirs besides tensors and plain values, "
        "and unpickling it could run code; delete this checkpoint directory or set resume=never"]


def test_a_torch_saved_object_is_refused_too(tmp_path):
    torch.save({"x": _Planted(tmp_path / "pwned")}, tmp_path / "state.pt")
    with pytest.raises(ckpt.CheckpointError, match="GLOBAL os.makedirs"):
        ckpt.safe_load(tmp_path / "state.pt")
    assert not (tmp_path / "pwned").exists()


def test_rng_file_is_plain_and_older_numpy_array_files_still_load(tmp_path):
    import numpy as np

    np.random.seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "new.pt")
    torch.save({**ckpt.rng_state(), "numpy": np.random.get_state()}, tmp_path / "old.pt")  # before the fix
    want = np.random.rand(3)
    for name in ("new.pt", "old.pt"):
        state = ckpt.safe_load(tmp_path / name)
        ckpt.set_rng_state(state)
        assert np.array_equal(np.random.rand(3), want)
    assert isinstance(ckpt.safe_load(tmp_path / "new.pt")["numpy"][1], list)


def test_a_planted_pickle_of_any_protocol_is_refused(tmp_path):
    (tmp_path / "rng.pt").write_bytes(pickle.dumps({"python": _Planted(tmp_path / "pwned")}))  # protocol 4+
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        ckpt.safe_load(tmp_path / "rng.pt")
    assert not (tmp_path / "pwned").exists()
