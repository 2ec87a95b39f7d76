"""CPU thread policy: how many intra-op threads torch uses, and how its OpenMP threads wait.

torch's own default is one intra-op thread per CPU the process sees, with OpenMP worker threads
that spin between parallel regions. On cores shared with anything else (a browser, another
user, posttrain's own verifier workers) every parallel region then waits for its slowest
thread, and a thread that lost its core stalls the whole region: the issue-28 measurements had
the demo's SFT step 3.5x slower with one busy neighbour, 65x slower when the neighbour had the
higher priority. What posttrain does instead (README "CPU threads"; numbers from
benchmarks/bench_threads.py):

* ``OMP_WAIT_POLICY=PASSIVE`` (and ``KMP_BLOCKTIME=0`` for Intel's OpenMP): an idle OpenMP thread
  sleeps instead of spinning. libgomp reads this once, when torch's library loads, so
  ``prepare_environment`` must run before ``import torch``; setting it afterwards has no effect
  (measured: 12-20 s vs 0.5 s for the same 300 small matmuls on a loaded 2-core machine).
* ``auto`` threads: the CPUs this process may run on (affinity, then the cgroup CPU quota;
  not ``os.cpu_count()``, which counts the host's), divided among the processes posttrain
  starts on this host (torchrun / deepspeed ranks), less one core left to the rest of the
  machine from eight cores up. See ``auto_threads`` for why.
* the user's choice wins: ``trainer.threads: N`` (``posttrain eval --threads N``), else
  ``OMP_NUM_THREADS`` from the environment, else ``auto``.

Stdlib only: verifier workers import this without paying for torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Set before torch loads unless the user set them: idle OpenMP threads sleep instead of spinning.
WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
CGROUP_ROOT = Path("/sys/fs/cgroup")


def prepare_environment() -> Optional[str]:
    """Set the OpenMP wait policy in this process's environment (children inherit it).

    Returns a note when it came too late (torch already imported: the policy then only reaches
    child processes), else None. Idempotent; values the user set are kept.
    """
    import sys

    global _late
    for key, value in WAIT_ENV.items():
        os.environ.setdefault(key, value)
    if "torch" in sys.modules and os.environ["OMP_WAIT_POLICY"] == WAIT_ENV["OMP_WAIT_POLICY"]:
        _late = "torch was imported first: its OpenMP threads keep their default wait policy"
    return _late


_late: Optional[str] = None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Optional[float]:
    """CPUs' worth of time the cgroup quota allows this process (e.g. 1.5), None without a quota.

    cgroup v2 (``cpu.max`` "QUOTA PERIOD" or "max PERIOD") and v1 (``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``, quota -1 = none); the tightest limit on the way up to the root wins.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2: 0::/path
            for d in _up_to_root(root, rel):
                limits += [_v2_limit(d / "cpu.max")]
        elif "cpu" in controllers.split(","):  # v1: N:cpu,cpuacct:/path
            base = next((root / n for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / n).is_dir()), None)
            if base is not None:
                for d in _up_to_root(base, rel):
                    limits += [_v1_limit(d)]
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def _up_to_root(base: Path, rel: str) -> list[Path]:
    parts = [p for p in rel.strip("/").split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_limit(path: Path) -> Optional[float]:
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(d: Path) -> Optional[float]:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def usable_cores() -> tuple[int, str]:
    """CPUs this process may use, and how that was found (for the start-up line)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit()
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"cgroup quota {quota:g} CPUs, affinity {affinity}"
    return affinity, f"{affinity} CPUs in affinity" + (f", cgroup quota {quota:g}" if quota is not None else "")


def auto_threads(cores: int, processes: int = 1) -> int:
    """Intra-op threads per process for ``auto``.

    Each of ``processes`` (ranks on this host) gets an equal share of the cores. From eight cores
    up one core is kept out of the shares, for posttrain's helper processes (verifier workers, a
    rollout worker), data and logging threads and whatever else runs there, so that a parallel
    region does not wait for a thread that lost its core to them; there it costs at most 1/8 of
    ideal scaling, and intra-op scaling of these models is well below ideal. On fewer cores that
    reserve would cost the trainer a quarter to a half of an idle machine, and the passive wait
    policy already removes most of the contention penalty (bench_threads.py), so every core is used.
    Verifier workers run while the trainer waits for their answers (one thread each).
    """
    spare = 1 if cores >= 8 else 0
    return max(1, (cores - spare) // max(1, processes))


def parse(value: object, key: str) -> Optional[int]:
    """``auto`` -> None, a positive integer (or its string) -> int; else ValueError naming ``key``."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{key}: '{value}' is not auto or a positive integer (e.g. {key}=1 on shared cores).")
    return n


@dataclass(frozen=True)
class Policy:
    threads: int
    source: str

    def line(self) -> str:
        wait = _late or os.environ.get("OMP_WAIT_POLICY", "unset (spin, then sleep)")
        return f"threads: {self.threads} intra-op per process ({self.source}); OpenMP wait policy {wait}"


def resolve(value: object = "auto", key: str = "trainer.threads", *, processes: int = 1) -> Policy:
    """The thread count for ``value`` (a config value or flag), and where it came from."""
    n = parse(value, key)
    if n is not None:
        return Policy(n, f"{key}={n}")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            return Policy(parse(env, "OMP_NUM_THREADS"), f"OMP_NUM_THREADS={env}")
        except ValueError:
            pass  # OpenMP ignores a value it cannot read; so does auto
    cores, how = usable_cores()
    per = f", {processes} processes on this host" if processes > 1 else ""
    return Policy(auto_threads(cores, processes), f"auto: {how}{per}")


def apply(value: object = "auto", key: str = "trainer.threads", *, processes: int = 1) -> Policy:
    """Resolve the policy and set torch's intra-op threads (one inter-op thread: eager training
    never uses that pool). Called once per process, by the command line, before any model loads."""
    import torch

    policy = resolve(value, key, processes=processes)
    torch.set_num_threads(policy.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # the inter-op pool already started (a second call in one process)
        pass
    return policy


def limit_worker(threads: int = 1) -> None:
    """In a helper process (a verifier worker): ``threads`` torch/OpenMP threads, whether torch is
    imported already or later, so helpers and the trainer together stay within the cores."""
    import sys

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    for key, value in WAIT_ENV.items():
        os.environ.setdefault(key, value)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
