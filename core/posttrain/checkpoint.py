"""Checkpoints: HF-format weights + trainer state + RNG, written atomically.

Layout: ``run_dir/checkpoints/step-NNNNNN/`` holds ``config.json``, ``model.safetensors``, the
tokenizer files (so ``from_pretrained`` loads the directory as is), ``trainer_state.pt`` (whatever
the caller needs to resume: optimizer, scheduler, sampler, step), ``rng.pt`` and ``COMPLETE``.

Atomicity: a save writes everything into ``checkpoints/.tmp-step-NNNNNN-<pid>``, fsyncs it,
writes ``COMPLETE`` last, then renames the directory into place. A crash at any point leaves
either no ``step-NNNNNN`` or a complete one, so ``latest_checkpoint`` never sees half a save.
Temp directories left by a crashed process are removed by the next save / ``latest_checkpoint``.
One host writes a run directory (rank 0): temp-dir ownership is judged by process id.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CHECKPOINTS_DIR = "checkpoints"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
RNG_STATE = "rng.pt"
_OWN_FILES = frozenset({COMPLETE, TRAINER_STATE, RNG_STATE})  # everything else in a checkpoint is HF's
_STEP_RE = re.compile(r"step-(\d+)")
_TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(r"\.tmp-.*-(\d+)")  # .tmp-<what>-<pid>

# Temp dirs this process is writing right now: a cleanup running meanwhile (another thread) must spare them.
_in_progress: set[Path] = set()


# --- RNG ---------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or read; the message names the file and the fix."""


def rng_state() -> dict:
    """Python, numpy (global) and torch CPU generators, plus every CUDA device's when CUDA is up.

    Only tensors and plain values (lists, tuples, numbers, strings), so that the file loads with
    ``torch.load(weights_only=True)``: numpy's key array is stored as a list of ints."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured. CUDA states are restored for the devices both runs have."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)


# --- naming ------------------------------------------------------------------------------------


def _root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(ckpt_dir: str | Path) -> int:
    """The step a ``step-NNNNNN`` directory holds."""
    m = _STEP_RE.fullmatch(Path(ckpt_dir).name)
    if m is None:
        raise ValueError(f"{ckpt_dir}: not a checkpoint directory (expected a name like step-000012)")
    return int(m.group(1))


def is_complete(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / COMPLETE).is_file()


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete ``step-*`` directories, oldest first."""
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and _STEP_RE.fullmatch(d.name) and is_complete(d)]
    return sorted(found, key=checkpoint_step)


# --- durability helpers ------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    # Directories need an fsync too on POSIX, or a rename/new entry may not survive a power cut.
    if path.is_dir() and os.name != "posix":
        return  # Windows cannot open a directory for fsync; NTFS journals the rename itself
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_stale(tmp: Path) -> bool:
    """A temp dir nobody is writing: its owner is dead, or it is ours but no save of ours is running."""
    if tmp.resolve() in _in_progress:
        return False
    m = _TMP_RE.fullmatch(tmp.name)
    if m is None:
        return True  # not a name we make; nothing can be writing it under our protocol
    pid = int(m.group(1))
    # Our own pid without a save in progress: an earlier save in this process died, or (containers)
    # the crashed process had the same pid as this one.
    return pid == os.getpid() or not _pid_alive(pid)


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete temp dirs left by crashed saves/prunes; returns what was removed."""
    root = _root(run_dir)
    if not root.is_dir():
        return []
    stale = [d for d in root.iterdir() if d.name.startswith(_TMP_PREFIX) and _is_stale(d)]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


# --- save --------------------------------------------------------------------------------------


def save_checkpoint(run_dir: str | Path, step: int, *, model: Any, tokenizer: Any, trainer_state: dict,
                    keep_last: int | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-NNNNNN`` atomically and return it.

    ``keep_last``: afterwards keep only the newest ``keep_last`` complete checkpoints (the one just
    written always survives, also when ``keep_last < 1`` or newer steps exist); ``None`` keeps all.
    """
    root = _root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    key = tmp.resolve()
    _in_progress.add(key)
    try:
        tmp.mkdir()
        _write_contents(tmp, model=model, tokenizer=tokenizer, trainer_state=trainer_state)
        _mark_complete(tmp, step)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing partial stays behind, in or out of view
        raise
    finally:
        _in_progress.discard(key)
    if keep_last is not None:
        prune_checkpoints(run_dir, keep_last, protect=final)
    return final


def _write_contents(tmp: Path, *, model: Any, tokenizer: Any, trainer_state: dict) -> None:
    # safe_serialization=True: transformers 4.x would otherwise default to safetensors too, but say so;
    # 5.x always writes safetensors and ignores the argument.
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / TRAINER_STATE)
    torch.save(rng_state(), tmp / RNG_STATE)
    # transformers writes the weights through a private temp file (0600); give every file the
    # mode a plain open() would, so a checkpoint is as readable as the rest of the run directory.
    mode = 0o666 & ~_umask()
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(mode)
    _fsync_tree(tmp)


def _umask() -> int:
    current = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(current)
    return current


def _mark_complete(tmp: Path, step: int) -> None:
    # Last file written, after everything else is on disk: a directory without it is never trusted,
    # even if it reached its final name some other way (a manual copy, an rsync cut short).
    marker = tmp / COMPLETE
    marker.write_text(f"{step}\n")
    _fsync_path(marker)
    _fsync_path(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``. A directory cannot atomically replace a non-empty one, so an
    existing ``final`` (the same step saved again) is moved aside first and deleted afterwards;
    a crash between the two renames loses only that step, and the previous checkpoint is latest."""
    if not final.exists():
        os.replace(tmp, final)
        _fsync_path(final.parent)
        return
    aside = final.with_name(f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}")
    os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(aside, final)  # put the old one back rather than leave the step missing
        raise
    _fsync_path(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def build_atomically(final: str | Path, build: Callable[[Path], Any]) -> Path:
    """Make directory ``final`` the way a checkpoint is saved: ``build(tmp)`` fills a temp sibling,
    which is fsynced, marked ``COMPLETE`` and renamed into place, replacing an incomplete ``final``
    (one a killed process left half-written). Callers test ``is_complete(final)`` to skip it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for d in final.parent.glob(f"{_TMP_PREFIX}{final.name}-*"):  # left by a killed build
        if _is_stale(d):
            shutil.rmtree(d, ignore_errors=True)
    tmp = final.with_name(f"{_TMP_PREFIX}{final.name}-{os.getpid()}")
    key = tmp.resolve()
    _in_progress.add(key)
    try:
        tmp.mkdir()
        build(tmp)
        _fsync_tree(tmp)
        _mark_complete(tmp, 0)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _in_progress.discard(key)
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int, *, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` (at least 1) complete checkpoints; returns the deleted."""
    done = _complete_checkpoints(_root(run_dir))
    doomed = [d for d in done[: max(0, len(done) - max(1, keep_last))] if d != protect]
    for d in doomed:
        # Rename out of view first: a crash mid-rmtree must not leave a half-deleted dir that still
        # carries COMPLETE. The leftover temp dir is cleaned up as stale later.
        gone = d.with_name(f"{_TMP_PREFIX}del-{d.name}-{os.getpid()}")
        os.replace(d, gone)
        shutil.rmtree(gone, ignore_errors=True)
    return doomed


# --- load --------------------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint, or None. Also clears crashed saves' temp dirs."""
    remove_stale_temps(run_dir)
    done = _complete_checkpoints(_root(run_dir))
    return done[-1] if done else None


def load_checkpoint_state(ckpt_dir: str | Path) -> tuple[dict, dict]:
    """``(trainer_state, rng)``; tensors land on CPU (``optimizer.load_state_dict`` moves them to the
    parameters' device), so a GPU checkpoint also resumes on a CPU-only machine."""
    ckpt_dir = Path(ckpt_dir)
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: not a complete checkpoint (no {COMPLETE} marker)")
    return safe_load(ckpt_dir / TRAINER_STATE), safe_load(ckpt_dir / RNG_STATE)


def _numpy_array_globals() -> list:
    """What unpickling a numeric numpy array needs: older checkpoints stored numpy's RNG key
    array as an ndarray (transformers' Trainer allow-lists the same for its rng files)."""
    core = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``: tensors, plain containers and numeric numpy arrays only.

    Anything else in the file (a pickled object whose loading could run code) is refused with a
    ``CheckpointError``; nothing from it is executed."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page long; its first "GLOBAL ..." names what was refused.
        what = re.search(r"GLOBAL [\w.]+", str(e))
        raise CheckpointError(
            f"{path}: refused to load: it holds {what.group(0) if what else 'an object'} besides tensors and plain "
            f"values, and unpickling it could run code; delete this checkpoint directory or set resume=never") from None


def export_hf(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy the HF files (weights, configs, tokenizer) to ``out_dir``: a directory that
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load, without trainer state."""
    src, out = Path(ckpt_dir), Path(out_dir)
    if not is_complete(src):
        raise FileNotFoundError(f"{src}: not a complete checkpoint (no {COMPLETE} marker)")
    out.mkdir(parents=True, exist_ok=True)
    # Copy everything but our own files, rather than a list of HF names: shard names, tokenizer
    # files and chat templates vary by model and transformers version.
    for f in src.iterdir():
        if f.name in _OWN_FILES:
            continue
        if f.is_dir():
            shutil.copytree(f, out / f.name, dirs_exist_ok=True)
        else:
            shutil.copy2(f, out / f.name)
    return out
