"""CPU thread policy: how many intra-op threads torch uses, and how its OpenMP threads wait.

torch's own default is one intra-op thread per CPU the process sees, with OpenMP worker threads
that spin between parallel regions. On cores shared with anything else (a browser, another
user, posttrain's own verifier workers) every parallel region then waits for its slowest
thread, and a thread that lost its core stalls the whole region: the issue-28 measurements had
the demo's SFT step 3.5x slower with one busy neighbour, 65x slower when the neighbour had the
higher priority. What posttrain does instead (README "CPU threads"; numbers from
benchmarks/bench_threads.py):

* a short OpenMP spin (``GOMP_SPINCOUNT=10000``, about a third of a millisecond; ``KMP_BLOCKTIME=1``
  for Intel's OpenMP), then sleep. Measured on the demo's SFT step (2 cores): torch's default spin
  (300,000) and ``ACTIVE`` cost 24x and 5x a sleeping wait with one busy neighbour, while
  ``PASSIVE`` (no spin) made the idle step 37 % slower than torch's default; 10,000 spins matched
  torch's idle step time. OpenMP reads this once, when torch's library loads, so
  ``prepare_environment`` must run before ``import torch``; setting it afterwards has no effect.
* ``auto`` adapts (``adapt``, called between steps and rollout batches): when this process's
  threads wait for a core (the kernel's run-queue statistics), the count drops by the threads'
  worth that waited; a lowered count is probed with one more thread now and then. One thread
  beside a busy neighbour was as fast as two on an idle machine; two threads fighting a
  neighbour were 4.6x slower even with the short spin.
* ``auto`` starts from the CPUs this process may run on (affinity, then the cgroup CPU quota;
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Set before torch loads unless the user chose a wait policy: spin briefly, then sleep.
WAIT_ENV = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}
USER_WAIT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def prepare_environment() -> Optional[str]:
    """Set the OpenMP wait policy in this process's environment (children inherit it).

    Returns a note when it came too late (torch already imported: the policy then only reaches
    child processes), else None. Idempotent; values the user set are kept.
    """
    import sys

    global _late
    if not any(os.environ.get(k) for k in USER_WAIT_KEYS):
        os.environ.update(WAIT_ENV)
        if "torch" in sys.modules:
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
    adaptive: bool = False

    def line(self) -> str:
        return f"threads: {self.threads} intra-op per process ({self.source}); OpenMP wait: {wait_description()}"


def wait_description() -> str:
    if _late:
        return _late
    if os.environ.get("OMP_WAIT_POLICY"):
        return f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    if os.environ.get("GOMP_SPINCOUNT"):
        return f"spin GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}, then sleep"
    return "OpenMP's default (spin, then sleep)"


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
    if processes > 1:  # ranks on one host share the cores by design: each would count the others as load
        return Policy(auto_threads(cores, processes), f"auto: {how}{per}")
    return Policy(auto_threads(cores), f"auto: {how}; fewer while other programs use them", adaptive=True)


def apply(value: object = "auto", key: str = "trainer.threads", *, processes: int = 1) -> Policy:
    """Resolve the policy and set torch's intra-op threads (one inter-op thread: eager training
    never uses that pool). Called once per process, by the command line, before any model loads."""
    import torch

    global _adaptive
    policy = resolve(value, key, processes=processes)
    if torch.get_num_threads() != policy.threads:
        # Only on a change: set_num_threads also turns off MKL's dynamic thread count (small
        # GEMMs on one thread), which made the demo's decode loop 25-40 % slower at an equal count.
        torch.set_num_threads(policy.threads)
    _adaptive = None
    if policy.adaptive and policy.threads > 1:
        try:
            run_queue_wait()
            _adaptive = Adaptive(policy.threads)
        except OSError:  # no scheduler statistics in this kernel: a fixed count
            pass
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
    if not any(os.environ.get(k) for k in USER_WAIT_KEYS):
        os.environ.update(WAIT_ENV)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


# --- adapting to other programs on the same cores -------------------------------------------------

_adaptive: Optional["Adaptive"] = None


def adapt(probe: bool = True) -> int:
    """Between steps, on the thread that runs torch (OpenMP's count is per calling thread): under
    ``auto``, lower the intra-op count while other programs take the cores, raise it when they
    stop (``Adaptive``). Cheap enough to call every decoded token: it reads the kernel's
    statistics (about 60 µs) only when a decision is due. ``probe=False``: this look may lower
    the count or judge a probe, but not start one (the middle of a rollout, whose end may be too
    near for the judgement). Returns the count."""
    if _adaptive is not None:
        return _adaptive(probe)
    import torch

    return torch.get_num_threads()


def ceiling() -> int:
    """The count this process was given (under ``auto``, before any adaptation lowered it)."""
    import torch

    return _adaptive.ceiling if _adaptive is not None else torch.get_num_threads()


def set_count(n: int) -> None:
    """Give this process ``n`` threads from now on, e.g. when it starts a rollout worker and
    shares its cores with it: under ``auto`` that becomes the ceiling adaptation works below."""
    import torch

    torch.set_num_threads(n)
    if _adaptive is not None:
        _adaptive.ceiling = _adaptive.current = n
        _adaptive.probing = False


def run_queue_wait() -> tuple[float, float]:
    """(monotonic time, seconds this process's threads have spent runnable but waiting for a core,
    summed over threads, from /proc/self/task/*/schedstat). OSError where the kernel keeps no
    scheduler statistics."""
    waited = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                waited += int(f.read().split()[1])  # on-CPU ns, run-queue wait ns, time slices
        except FileNotFoundError:  # the thread ended in between
            pass
    return time.monotonic(), waited / 1e9


class Adaptive:
    """The ``auto`` count, adapted to whoever else runs on this process's cores.

    Contention shows as this process's threads being runnable but not running: each look (at
    most every ``interval`` s) reads that wait from the kernel's scheduler statistics, in threads'
    worth (seconds waited per second). Above ``contended`` the count drops at once by the threads'
    worth that waited (at least 1 remains). A lowered count is probed: after ``probe_after`` s one
    more thread is tried, at a look that allows it (the start of a step or of a rollout, so the
    probe is judged while the work goes on, not after a whole train phase on a contended core);
    if it waited too, the count goes back down and the next probe waits twice as long (up to
    ``max_probe_after``). A count just tried (the first, a probe) is judged after ``judge_after``
    s, not ``interval``: each look at two threads fighting a neighbour costs their slowdown.
    Waiting, not other programs' CPU use, is the signal because a lower-priority neighbour uses
    idle cores without taking them from us.
    """

    interval = 0.5
    judge_after = 0.1
    contended = 0.2
    probe_after = 5.0
    max_probe_after = 80.0

    def __init__(self, ceiling: int, sample=run_queue_wait, clock=time.monotonic):
        import torch

        self.set_threads, self.ceiling, self.sample, self.clock = torch.set_num_threads, ceiling, sample, clock
        self.due = -math.inf  # clock time before which a look cannot decide anything: skip reading the kernel
        self.current, self.probing, self.backoff = ceiling, False, self.probe_after
        self.last: Optional[tuple[float, float]] = None  # the first look only starts the clock:
        self.next_probe = math.inf  # what waited while the model loaded says nothing about training
        self.judged = False  # the starting count is judged as soon as a probe is

    def __call__(self, probe: bool = True) -> int:
        if self.clock() < self.due:
            return self.current
        now, waited = self.sample()
        if self.last is None:
            self.last = (now, waited)
            return self.current
        dt = now - self.last[0]
        window = self.interval if self.judged and not self.probing else self.judge_after
        if dt < window:
            self.due = self.last[0] + window
            return self.current
        waiting = (waited - self.last[1]) / dt
        self.last, self.judged = (now, waited), True
        if waiting > self.contended:
            if self.probing:
                self.backoff = min(2 * self.backoff, self.max_probe_after)
            self._set(max(1, self.current - math.ceil(waiting)))
            self.probing, self.next_probe = False, now + self.backoff
        elif self.probing:  # the extra thread found a free core
            self.probing, self.backoff = False, self.probe_after
            self.next_probe = now + self.backoff
        elif probe and self.current < self.ceiling and now >= self.next_probe:
            self._set(self.current + 1)
            self.probing = True
        return self.current

    def _set(self, n: int) -> None:
        if n != self.current:
            self.current = n
            self.set_threads(n)
