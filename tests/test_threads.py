"""posttrain.threads: the CPU thread policy reaches torch, the verifier workers and the start-up
line; auto follows affinity, the cgroup quota and the ranks on the host; the user's choice wins."""

from __future__ import annotations

import operator
import math
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from posttrain import threads
from posttrain.cli import _trainer_threads, build_parser, main
from posttrain.config import ConfigError, merge_layers, validate_core
from posttrain.distributed import local_world_size
from posttrain.verify import WorkerPool

CALL = operator.methodcaller("__call__")  # fn(task) = task(), as in test_verify.py
ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, env: dict | None = None, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "MKL_", "KMP_", "LOCAL_"))}
    return subprocess.run([*prefix, sys.executable, "-c", code], env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=300)


# --- the count reaches torch, in a fresh process ----------------------------------------------


def test_configured_count_reaches_torch_and_the_startup_line_says_so():
    r = _python("from posttrain.cli import apply_threads; apply_threads('3', 'trainer.threads'); import torch, os; "
                "print(torch.get_num_threads(), torch.get_num_interop_threads(), os.environ['GOMP_SPINCOUNT'])")
    assert r.returncode == 0, r.stderr
    line, counts = r.stdout.splitlines()
    assert counts == "3 1 10000"
    assert line == "threads: 3 intra-op per process (trainer.threads=3); OpenMP wait: spin GOMP_SPINCOUNT=10000, then sleep"


def test_auto_reaches_torch_with_the_cores_of_the_affinity_mask():
    n = len(os.sched_getaffinity(0))
    r = _python("from posttrain.cli import apply_threads; apply_threads('auto', 'trainer.threads'); "
                "import torch; print(torch.get_num_threads())")
    assert r.returncode == 0, r.stderr
    line, count = r.stdout.splitlines()
    assert int(count) == threads.auto_threads(n)
    assert line.startswith(f"threads: {threads.auto_threads(n)} intra-op per process (auto: {n} CPUs in affinity")


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_auto_respects_affinity_under_taskset():
    r = _python("from posttrain.cli import apply_threads; apply_threads('auto', 'trainer.threads'); "
                "import torch; print(torch.get_num_threads())", prefix=["taskset", "-c", "0"])
    assert r.returncode == 0, r.stderr
    line, count = r.stdout.splitlines()
    assert count == "1"
    assert "(auto: 1 CPUs in affinity" in line


def test_omp_num_threads_wins_over_auto_and_the_config_wins_over_it():
    r = _python("from posttrain.cli import apply_threads; apply_threads('auto', 'trainer.threads'); "
                "import torch; print(torch.get_num_threads())", env={"OMP_NUM_THREADS": "1"})
    assert r.stdout.splitlines() == ["threads: 1 intra-op per process (OMP_NUM_THREADS=1); OpenMP wait: spin GOMP_SPINCOUNT=10000, then sleep", "1"]
    r = _python("from posttrain.cli import apply_threads; apply_threads(2, 'trainer.threads'); "
                "import torch; print(torch.get_num_threads())", env={"OMP_NUM_THREADS": "1"})
    assert r.stdout.splitlines()[1] == "2"


def test_wait_policy_is_set_before_torch_loads_and_a_users_choice_is_kept():
    r = _python("import posttrain.cli, os; print(os.environ['GOMP_SPINCOUNT'], os.environ['KMP_BLOCKTIME'])")
    assert r.stdout.split() == ["10000", "1"]
    r = _python("import posttrain.cli, os; print(os.environ['OMP_WAIT_POLICY'], os.getenv('GOMP_SPINCOUNT'))",
                env={"OMP_WAIT_POLICY": "PASSIVE"})
    assert r.stdout.split() == ["PASSIVE", "None"]  # a user's wait policy is not overridden by a spin count
    r = _python("from posttrain.cli import apply_threads; apply_threads(1, 'trainer.threads')", env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert r.stdout.strip() == "threads: 1 intra-op per process (trainer.threads=1); OpenMP wait: OMP_WAIT_POLICY=ACTIVE"
    # Too late when torch came first: OpenMP has read its environment already, and the line says so.
    r = _python("import torch; from posttrain.cli import apply_threads; apply_threads(1, 'trainer.threads')")
    assert r.stdout.strip() == ("threads: 1 intra-op per process (trainer.threads=1); OpenMP wait: torch was "
                                "imported first: its OpenMP threads keep their default wait policy")


# --- resolution rules, in this process (no torch state touched) -------------------------------


@pytest.mark.parametrize("cores,processes,expected", [(1, 1, 1), (2, 1, 2), (4, 1, 4), (7, 1, 7), (8, 1, 7),
                                                      (16, 1, 15), (16, 2, 7), (8, 3, 2), (2, 4, 1)])
def test_auto_threads(cores, processes, expected):
    assert threads.auto_threads(cores, processes) == expected


def test_resolve_divides_auto_among_the_ranks_on_the_host(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: (8, "8 CPUs in affinity"))
    assert threads.resolve("auto", processes=2) == threads.Policy(3, "auto: 8 CPUs in affinity, 2 processes on this host")
    assert threads.resolve(5, processes=2) == threads.Policy(5, "trainer.threads=5")  # N is per process, as given


def test_local_world_size_from_either_launcher(monkeypatch):
    for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert local_world_size() == 1
    monkeypatch.setenv("LOCAL_SIZE", "4")  # deepspeed launcher
    assert local_world_size() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun
    assert local_world_size() == 2


def test_unreadable_omp_num_threads_falls_back_to_auto(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    monkeypatch.setattr(threads, "usable_cores", lambda: (4, "4 CPUs in affinity"))
    assert threads.resolve("auto") == threads.Policy(4, "auto: 4 CPUs in affinity; fewer while other programs use them", adaptive=True)


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5", ""])
def test_bad_values_name_the_key(bad):
    with pytest.raises(ValueError) as e:
        threads.parse(bad, "trainer.threads")
    assert str(e.value) == f"trainer.threads: '{bad}' is not auto or a positive integer (e.g. trainer.threads=1 on shared cores)."


def test_config_validation_reports_a_bad_value():
    cfg = merge_layers({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "trainer": {"threads": 0}}, base=None)
    _, problems = validate_core(cfg)
    assert problems == ["trainer.threads: '0' is not auto or a positive integer (e.g. trainer.threads=1 on shared cores)."]
    ok = merge_layers({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "trainer": {"threads": 4}}, base=None)
    obj, problems = validate_core(ok)
    assert problems == [] and obj.trainer.threads == "4"


def test_cli_rejects_a_bad_count_with_one_error_and_exit_2(capsys):
    assert main(["train", str(ROOT / "configs" / "demo" / "demo.yaml"), "trainer.threads=0"]) == 2
    err = capsys.readouterr().err
    assert "trainer.threads: '0' is not auto or a positive integer" in err and "Traceback" not in err


def test_train_prints_the_line_before_anything_else(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: m}\n")  # data.train missing: a config error, after the policy is set
    r = subprocess.run([sys.executable, "-m", "posttrain.cli", "train", str(cfg), "trainer.threads=1"], capture_output=True,
                       text=True, timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))})
    assert r.returncode == 2
    assert r.stdout.splitlines() == ["threads: 1 intra-op per process (trainer.threads=1); OpenMP wait: spin GOMP_SPINCOUNT=10000, then sleep"]
    assert "data.train: missing" in r.stderr


def test_eval_rejects_a_bad_count_with_exit_2(capsys):
    assert main(["eval", "--model", "m", "--benchmarks", "b", "--threads", "many"]) == 2
    assert "--threads: 'many' is not auto or a positive integer" in capsys.readouterr().err


def test_threads_are_set_once_per_run_not_per_stage(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: m}\ntrainer: {threads: 2}\nstages:\n  - algorithm: {name: sft}\n"
                   "  - algorithm: {name: grpo}\n    trainer: {threads: 1}\n")
    with pytest.raises(ConfigError, match=r"stages\[1\]\.trainer\.threads: threads are set once per run"):
        _trainer_threads(build_parser().parse_args(["train", str(cfg)]))
    cfg.write_text("model: {path: m}\ntrainer: {threads: 2}\nstages:\n  - algorithm: {name: sft}\n")
    assert _trainer_threads(build_parser().parse_args(["train", str(cfg), "trainer.threads=3"])) == 3


def test_eval_has_a_threads_flag():
    args = build_parser().parse_args(["eval", "--model", "m", "--benchmarks", "b", "--threads", "1"])
    assert args.threads == "1"
    assert build_parser().parse_args(["eval", "--model", "m", "--benchmarks", "b"]).threads == "auto"


# --- cgroup CPU quota -------------------------------------------------------------------------


def test_cgroup_v2_quota_tightest_on_the_way_up(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "a" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "a" / "b" / "cpu.max").write_text("300000 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    assert threads.cgroup_cpu_limit(tmp_path, proc) == 1.5
    proc.write_text("0::/\n")
    assert threads.cgroup_cpu_limit(tmp_path, proc) is None


def test_cgroup_v1_quota(tmp_path):
    d = tmp_path / "cpu,cpuacct" / "job"
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text("250000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/x\n3:cpu,cpuacct:/job\n")
    assert threads.cgroup_cpu_limit(tmp_path, proc) == 2.5
    (d / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path, proc) is None


def test_a_quota_below_the_affinity_caps_auto(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert threads.usable_cores() == (3, "cgroup quota 2.5 CPUs, affinity 8")
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.usable_cores() == (8, "8 CPUs in affinity")


# --- worker processes -------------------------------------------------------------------------


def test_verifier_workers_run_one_torch_thread(monkeypatch):
    # Inherited from the parent, 4 would be every worker's count without the worker's own limit.
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    with WorkerPool(CALL, workers=2, timeout_s=120.0) as pool:
        out = pool.map([torch.get_num_threads, partial(os.getenv, "OMP_NUM_THREADS"), partial(os.getenv, "GOMP_SPINCOUNT")])
    assert [o.status for o in out] == ["ok"] * 3, out
    assert [o.value for o in out] == [1, "1", "10000"]


# --- adapting to other programs on the same cores ---------------------------------------------


class _Clock:
    """A scripted run-queue wait: each look advances time by 1 s and the wait by the next value."""

    def __init__(self, waits):
        self.t, self.w, self.waits, self.started = 0.0, 0.0, list(waits), False

    def __call__(self):
        if self.started and self.waits:
            self.t, self.w = self.t + 1.0, self.w + self.waits.pop(0)
        self.started = True
        return self.t, self.w


def test_adaptive_drops_by_the_threads_that_waited_and_probes_back_up(monkeypatch):
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(threads.Adaptive, "probe_after", 2.0)
    clock = _Clock([0.1, 1.6, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    a = threads.Adaptive(4, sample=clock)
    assert a() == 4  # the first look starts the clock
    counts = [a() for _ in range(13)]
    # t=1 s: 0.1 threads' worth waited, calm. t=2: 1.6 waited, 4 - 2 = 2 at once. Two seconds later
    # (t=4) a probe with 3; it waited 0.9 (t=5): back to 2, and the next probe waits twice as
    # long (t=9). That one holds (t=10); the next, 2 s later (t=12), reaches 4 and holds (t=13).
    assert counts == [4, 2, 2, 3, 2, 2, 2, 2, 3, 3, 3, 4, 4]
    assert set_to == [2, 3, 2, 3, 4]
    assert a.probing is False and a() == 4  # at the ceiling: no more probes


def test_adaptive_judges_a_new_count_quickly_and_a_steady_one_every_interval(monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    monkeypatch.setattr(threads.Adaptive, "probe_after", 5.0)
    # (time s, run-queue wait s so far); every look reads the next one
    samples = iter([(0.0, 0.0), (0.05, 0.0), (0.15, 0.001), (0.4, 2.0), (0.7, 2.0),
                    (6.0, 2.0), (6.6, 2.0), (6.65, 2.0), (6.75, 2.05)])
    a = threads.Adaptive(2, sample=lambda: next(samples), clock=lambda: math.inf)  # this clock never skips a look
    assert a() == 2  # the first look starts the clock
    assert a() == 2  # 0.05 s: too soon even for the starting count
    assert a() == 2  # 0.15 s: the starting count is judged after 0.1 s (calm)
    assert a() == 2  # 0.4 s: a steady count waits 0.5 s between decisions, however much it waited
    assert a() == 1  # 0.7 s: 2 s waited over 0.55 s, 3.6 threads' worth: down to 1
    assert a(probe=False) == 1  # 6.0 s: a probe is due (5 s after the drop) but this look may not start one
    assert a() == 2  # 6.6 s: this one may
    assert a() == 2  # 6.65 s: the probe is judged after 0.1 s, not before
    assert a() == 1  # 6.75 s: 0.05 s waited over 0.15 s, 0.33 threads' worth: the probe failed
    assert a.next_probe == pytest.approx(6.75 + 10.0)  # and the next one waits twice as long


def test_adaptive_reads_the_kernel_only_when_a_decision_is_due():
    now, reads = [0.0], []

    def sample():
        reads.append(now[0])
        return now[0], 0.0

    a = threads.Adaptive(2, sample=sample, clock=lambda: now[0])
    for t in (0.0, 0.05, 0.06, 0.08, 0.09, 0.1, 0.2, 0.59, 0.6):
        now[0] = t
        a()
    # 0: starts the clock; 0.05: too soon, nothing due before 0.1; 0.1: the first judgement;
    # 0.2: too soon, nothing due before 0.6 (a steady count); 0.6: the next decision
    assert reads == [0.0, 0.05, 0.1, 0.2, 0.6]


def test_run_queue_wait_reads_this_process():
    t0, w0 = threads.run_queue_wait()
    sum(range(10**6))
    t1, w1 = threads.run_queue_wait()
    assert t1 > t0 and w1 >= w0 >= 0.0


@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2, reason="needs taskset and 2 CPUs")
def test_auto_drops_to_one_thread_beside_busy_neighbours_on_its_cores():
    # Two CPU-bound neighbours at equal priority on the same 2 CPUs as the trainer: its 2 threads
    # wait for cores, and auto goes down to 1. With 2 neighbours on 2 CPUs this holds however
    # loaded the machine is besides.
    burn = [subprocess.Popen(["taskset", "-c", "0,1", sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        r = _python("from posttrain.cli import apply_threads; apply_threads('auto', 'trainer.threads'); "
                    "import time, torch; from posttrain import threads; x = torch.randn(256, 256); t = time.monotonic(); "
                    "seen = set()\n"
                    "while time.monotonic() - t < 6:\n    (x @ x).relu().sum(); seen.add(threads.adapt())\n"
                    "print(sorted(seen), torch.get_num_threads())", prefix=["taskset", "-c", "0,1"])
    finally:
        for p in burn:
            p.kill()
            p.wait()
    assert r.returncode == 0, r.stderr
    line, counts = r.stdout.splitlines()
    assert line.startswith("threads: 2 intra-op per process (auto: 2 CPUs in affinity; fewer while other programs use them)")
    assert counts.startswith("[1, 2]")


def test_set_count_moves_the_adaptive_ceiling(monkeypatch):
    # An async run gives the rollout worker part of the cores: adaptation then works below the
    # trainer's share, and gets the whole count back when the worker is closed.
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    a = threads.Adaptive(4, sample=_Clock([0.0] * 20))
    monkeypatch.setattr(threads, "_adaptive", a)
    assert threads.ceiling() == 4
    threads.set_count(2)
    assert (threads.ceiling(), a.current, set_to) == (2, 2, [2])
    assert [a() for _ in range(12)] == [2] * 12  # no probe above the new ceiling
    threads.set_count(4)
    assert (threads.ceiling(), a.current, set_to) == (4, 4, [2, 4])


def test_apply_leaves_torch_alone_when_the_count_is_already_right(monkeypatch):
    # torch.set_num_threads also switches MKL's dynamic thread count off, which made the demo's
    # decode 25-40 % slower at the same count: only a change of count may call it.
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(torch, "set_num_interop_threads", lambda n: None)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    threads.apply("2")
    assert set_to == []
    threads.apply("3")
    assert set_to == [3]
