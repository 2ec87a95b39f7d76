"""A process pool whose tasks can hang or crash without taking the caller down with them.

Why not ``multiprocessing.Pool`` / ``ProcessPoolExecutor``: neither can cancel a task that is
already running. A hung task keeps its worker forever (``Pool``) or, once killed from outside,
breaks the whole executor (``BrokenProcessPool``). Here the parent owns every worker and its
pipe, gives each idle worker a short run of tasks, and waits on all pipes at once
(``multiprocessing.connection.wait``) against per-task deadlines. A worker runs its tasks in
order and answers each as soon as it is done, so the parent always knows which task is running
and when it started. A task past its deadline has its worker killed (SIGTERM, then SIGKILL) and
replaced; the task's result is ``"timeout"`` and the rest of its run goes back to the queue. A
worker that dies mid-task yields ``"error"`` for that task and is replaced. Either way the other
tasks of the batch carry on and ``map`` returns one outcome per input, in order.

Why runs of tasks rather than one at a time: with one task per message every answer costs a
round trip through the parent, and on a busy machine each wake-up of the parent waits for a
time slice; a worker then idles between tasks, and a second worker added contention rather than
throughput (2 workers measured slower than 1). With a run queued in its pipe a worker goes
straight on to its next task. Runs are short (``max_run`` tasks, fewer near the end of a batch)
so the workers finish together.

Two limits, both optional to the task:

* ``timeout_s`` — hard, wall-clock, enforced by the parent. Works whatever the task is doing
  (even stuck inside one C call, where no Python signal handler can run).
* ``soft_timeout_s`` — enforced inside the worker with ``signal.setitimer`` (workers run tasks
  in their main thread, where signals work). The task is interrupted by an exception, the
  worker survives and answers ``"timeout"``, so no replacement process has to start. Set it a
  bit below ``timeout_s`` so that the hard kill is the exception rather than the rule.

Workers are started with the ``spawn`` method by default: the parent of a training run has
torch's threads running, and ``fork`` from a threaded process can deadlock in the child.
A task function must therefore be picklable, i.e. defined at module level.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger(__name__)

# How long a killed worker gets to exit after SIGTERM before SIGKILL, and after SIGKILL.
_KILL_GRACE_S = 0.5


@dataclass(frozen=True)
class Outcome:
    """The result of one task: ``status`` is "ok" (``value`` set), "timeout" or "error" (``error`` set)."""

    status: str
    value: Any = None
    error: Optional[str] = None


class _SoftTimeout(BaseException):
    """Raised inside a worker by SIGALRM. A BaseException so that task code catching
    ``Exception`` (math-verify does, everywhere) cannot swallow it."""


def _raise_soft_timeout(signum: int, frame: Any) -> None:
    raise _SoftTimeout()


def _run_task(fn: Callable[[Any], Any], arg: Any, soft_timeout_s: Optional[float]) -> tuple[str, Any]:
    try:
        try:
            if soft_timeout_s:
                signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            value = fn(arg)
        finally:
            if soft_timeout_s:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return ("ok", value)
    except _SoftTimeout:
        # Also lands here if the alarm fires inside the ``finally`` above: the timer is one-shot,
        # so nothing is left pending either way.
        return ("timeout", None)
    except Exception as e:  # a raising task is the task's problem, not the worker's: keep serving
        return ("error", f"{type(e).__name__}: {str(e)[:500]}")


def _worker_main(conn: Connection, fn: Callable[[Any], Any], initializer: Optional[Callable[[], None]],
                 soft_timeout_s: Optional[float]) -> None:
    """A worker's whole life: initialise, say ready, then run each message's list of tasks in
    order, answering each one as it finishes, until told to stop (``None``) or until the
    parent's end of the pipe goes away."""
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if soft_timeout_s:
        signal.signal(signal.SIGALRM, _raise_soft_timeout)
    from ..threads import limit_worker

    # Tasks are single-threaded Python; one torch/OpenMP thread each keeps workers + trainer within the cores.
    limit_worker(1)
    try:
        if initializer is not None:
            initializer()
    except Exception as e:
        conn.send(("init_error", f"{type(e).__name__}: {str(e)[:500]}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            run = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if run is None:
            return
        for arg in run:
            reply = _run_task(fn, arg, soft_timeout_s)
            try:
                conn.send(reply)
            except (EOFError, OSError):
                return
            except Exception as e:  # the value did not pickle; pickling fails before anything is written
                conn.send(("error", f"result not picklable: {type(e).__name__}: {str(e)[:300]}"))


@dataclass(eq=False)
class _Worker:
    process: Any  # a multiprocessing Process of the pool's context
    conn: Connection
    started_at: float
    ready: bool = False
    tasks: deque = field(default_factory=deque)  # indices in the current batch sent and not answered; [0] runs
    deadline: float = field(default=float("inf"))  # for tasks[0]: when it started + timeout_s


def _kill(w: _Worker) -> None:
    """Stop a worker now, whatever it is doing."""
    try:
        w.conn.close()
    except OSError:
        pass
    p = w.process
    if p.is_alive():
        p.terminate()
        p.join(_KILL_GRACE_S)
    if p.is_alive():
        p.kill()
        p.join(_KILL_GRACE_S)
    else:
        p.join()


def _stop_all(workers: list[_Worker]) -> None:
    """Ask every worker to exit, give them a moment, then kill what is left.

    Module level (not a method) so ``weakref.finalize`` can call it without keeping the pool alive.
    """
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + 1.0
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        _kill(w)
    workers.clear()


class WorkerPool:
    """``fn`` applied to each argument in a pool of processes, with hard per-task deadlines.

    ``map(args)`` returns one ``Outcome`` per argument, in order, and never raises for a task's
    sake: a task that hangs past ``timeout_s`` gives ``Outcome("timeout")`` (its worker is killed
    and replaced), one that raises or kills its worker gives ``Outcome("error")``.

    Workers start on the first ``map`` with work in it and persist across calls. A worker only
    gets tasks after it has imported everything and run ``initializer`` (it then reports ready),
    so start-up time never counts against a task's deadline. ``close()`` stops them; so does
    garbage collection of the pool, and interpreter exit.

    Not meant for concurrent ``map`` calls from several threads (they are serialised by a lock).
    """

    def __init__(self, fn: Callable[[Any], Any], workers: int = 2, timeout_s: float = 10.0, *,
                 soft_timeout_s: Optional[float] = None, initializer: Optional[Callable[[], None]] = None,
                 start_method: str = "spawn", start_timeout_s: float = 120.0, max_start_failures: int = 3,
                 max_run: int = 16):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if soft_timeout_s is not None and not hasattr(signal, "setitimer"):
            soft_timeout_s = None  # no SIGALRM on this platform: the hard limit alone applies
        self.fn = fn
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.soft_timeout_s = soft_timeout_s
        self.initializer = initializer
        self.start_timeout_s = start_timeout_s
        self.max_start_failures = max_start_failures
        self.max_run = max(1, int(max_run))
        self.stats: dict[str, int] = {"tasks": 0, "timeouts": 0, "errors": 0, "restarts": 0}
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._started_once = False
        # Runs _stop_all on close(), on garbage collection and at interpreter exit.
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)

    # --- worker management ----------------------------------------------------------------------

    def _start_worker(self) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        p = self._ctx.Process(target=_worker_main, args=(child_conn, self.fn, self.initializer, self.soft_timeout_s),
                              name="posttrain-verify-worker", daemon=True)
        p.start()
        # Drop our copy of the child's end, or the child's death would never show as EOF here.
        child_conn.close()
        self._workers.append(_Worker(process=p, conn=parent_conn, started_at=time.monotonic()))

    def _fill(self) -> None:
        missing = self.workers - len(self._workers)
        if self._started_once and missing > 0:
            self.stats["restarts"] += missing
        for _ in range(missing):
            self._start_worker()
        self._started_once = True

    def _remove(self, w: _Worker) -> None:
        _kill(w)
        self._workers.remove(w)

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers (for tests and debugging)."""
        return [w.process.pid for w in self._workers]

    # --- the batch loop -------------------------------------------------------------------------

    def map(self, args: Sequence[Any], budget_s: Optional[float] = None) -> list[Outcome]:
        """``budget_s``: wall-clock for the whole batch, counted from its first task handed out;
        tasks running or waiting when it ends are ``"timeout"``."""
        args = list(args)
        if not args:
            return []
        with self._lock:
            if self._closed:
                raise RuntimeError("WorkerPool is closed")
            try:
                results = self._run_batch(args, budget_s)
            finally:
                # Interrupted mid-batch (KeyboardInterrupt...): a busy worker would later answer a
                # task of this batch as if it were the next batch's, so it cannot be kept.
                for w in [w for w in self._workers if w.tasks]:
                    self._remove(w)
        self.stats["tasks"] += len(results)
        self.stats["timeouts"] += sum(r.status == "timeout" for r in results)
        self.stats["errors"] += sum(r.status == "error" for r in results)
        return results

    def _run_batch(self, args: list[Any], budget_s: Optional[float] = None) -> list[Outcome]:
        results: list[Optional[Outcome]] = [None] * len(args)
        budget_end = float("inf")  # set when the first task starts: worker start-up is not charged
        pending = deque(range(len(args)))
        start_failures, last_start_error = 0, ""
        # A worker that died between batches (OOM killer, a stray signal) is replaced before it is
        # handed a task, so a task is only charged with a death that happened while it ran.
        for w in [w for w in self._workers if not w.process.is_alive()]:
            self._remove(w)
        self._fill()

        while pending or any(w.tasks for w in self._workers):
            # 1. Hand a run of tasks to every idle worker.
            now = time.monotonic()
            for w in list(self._workers):
                if not pending:
                    break
                if not w.ready or w.tasks:
                    continue
                size = max(1, min(self.max_run, len(pending) // (2 * self.workers)))  # short runs near the end
                run = [pending.popleft() for _ in range(min(size, len(pending)))]
                try:
                    w.conn.send([args[i] for i in run])
                except OSError:  # the worker died while idle; the tasks never reached it
                    pending.extendleft(reversed(run))
                    self._remove(w)
                    continue
                except Exception:  # an argument does not pickle; nothing was sent
                    pending.extendleft(reversed(self._unpicklable(args, run, results)))
                    continue
                if budget_s is not None and budget_end == float("inf"):
                    budget_end = now + budget_s
                w.tasks, w.deadline = deque(run), min(now + self.timeout_s, budget_end)

            # 2. Wait for an answer, a death, or the nearest deadline.
            waitables: dict[Any, _Worker] = {}
            for w in self._workers:
                waitables[w.conn] = w
                waitables[w.process.sentinel] = w
            deadlines = [w.deadline for w in self._workers if w.tasks]
            deadlines += [w.started_at + self.start_timeout_s for w in self._workers if not w.ready]
            deadlines += [budget_end] if pending and budget_end < float("inf") else []
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            if waitables:
                ready = wait(list(waitables), timeout=timeout)
            else:
                ready = []

            # 3. Read what arrived; notice deaths.
            seen: set[int] = set()
            for obj in ready:
                w = waitables[obj]
                if id(w) in seen or w not in self._workers:
                    continue
                seen.add(id(w))
                msgs = []
                try:
                    # Results may have been sent just before the process exited: read them all first.
                    while w.conn.poll():
                        msgs.append(w.conn.recv())
                except (EOFError, OSError):
                    pass
                for kind, payload in msgs:
                    if kind == "ready":
                        w.ready = True
                        start_failures = 0
                    elif kind == "init_error":
                        start_failures += 1
                        last_start_error = f"worker initializer failed: {payload}"
                        log.warning("verify worker failed to initialise: %s", payload)
                        self._remove(w)
                    elif w.tasks:
                        i = w.tasks.popleft()
                        if kind == "ok":
                            results[i] = Outcome("ok", value=payload)
                        elif kind == "timeout":
                            results[i] = Outcome("timeout")
                        else:
                            results[i] = Outcome("error", error=str(payload))
                        # The next task of the run starts now: its own full timeout.
                        w.deadline = min(time.monotonic() + self.timeout_s, budget_end) if w.tasks else float("inf")
                if msgs or w not in self._workers:
                    continue
                if w.process.is_alive() and not w.conn.closed:
                    continue  # woken without news (should not happen), keep waiting
                code = w.process.exitcode
                self._remove(w)
                if w.tasks:
                    results[w.tasks.popleft()] = Outcome("error", error=f"worker died during the task (exit code {code})")
                    pending.extendleft(reversed(w.tasks))  # the rest of its run never started
                    log.warning("verify worker died during a task (exit code %s); replacing it", code)
                else:
                    start_failures += not w.ready
                    last_start_error = f"worker exited during start-up (exit code {code})"
                    log.warning("verify worker exited (exit code %s); replacing it", code)

            # 4. Kill workers past their deadline.
            now = time.monotonic()
            for w in list(self._workers):
                if w.tasks and now >= w.deadline:
                    results[w.tasks.popleft()] = Outcome("timeout")
                    pending.extendleft(reversed(w.tasks))  # the rest of its run never started
                    log.info("verify task exceeded %.1f s; killing worker %s", self.timeout_s, w.process.pid)
                    self._remove(w)
                elif not w.ready and now - w.started_at >= self.start_timeout_s:
                    start_failures += 1
                    last_start_error = f"worker not ready after {self.start_timeout_s:.0f} s"
                    self._remove(w)

            if pending and now >= budget_end:  # the batch's budget is spent: nothing more starts
                for i in pending:
                    results[i] = Outcome("timeout")
                pending.clear()

            # 5. Keep the pool at full strength, unless workers cannot start at all.
            if start_failures >= self.max_start_failures and not any(w.ready for w in self._workers):
                log.error("verify workers cannot start (%s); failing %d task(s)", last_start_error, len(pending))
                for i in pending:
                    results[i] = Outcome("error", error=last_start_error)
                pending.clear()
                if not any(w.tasks for w in self._workers):
                    break
            else:
                self._fill()

        return [r if r is not None else Outcome("error", error="no result") for r in results]

    @staticmethod
    def _unpicklable(args: list[Any], run: list[int], results: list[Optional[Outcome]]) -> list[int]:
        """Fail the tasks of ``run`` whose argument does not pickle; return the others."""
        ok = []
        for i in run:
            try:
                pickle.dumps(args[i])
                ok.append(i)
            except Exception as e:
                results[i] = Outcome("error", error=f"argument not picklable: {type(e).__name__}: {e}")
        return ok

    # --- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop all workers (idempotent). The pool cannot be used afterwards."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
