"""Ctrl-C and scheduler SIGTERM: finish the current step, save a checkpoint, stop.

While the training loop runs (``catching()``), the first SIGINT/SIGTERM only sets a flag; the
engine checks ``requested()`` after each step, saves and leaves its loop. Outside the loop
(loading models, before the first step) and on a second signal there is no consistent state to
save, so the signal raises ``Interrupted`` at once. ``Interrupted`` is a ``KeyboardInterrupt``:
library callers see what they would see without this module, and ``except Exception`` in the
middle of a step does not swallow it.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import distributed as dist_utils

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal. ``checkpoint``: where the state was saved (None: nothing saved)."""

    def __init__(self, signum: int, checkpoint: Path | None = None, step: int | None = None):
        self.signum, self.checkpoint, self.step = signum, checkpoint, step
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_pending = 0   # the first signal received while the loop runs (0: none)
_armed = False  # the training loop is running: a signal asks it to stop after the step


def _handle(signum: int, frame) -> None:
    global _pending
    if not _armed or _pending:
        raise Interrupted(signum)
    _pending = signum
    if dist_utils.is_main():
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(send it again to stop at once without saving)", file=sys.stderr, flush=True)


@contextmanager
def handlers() -> Iterator[None]:
    """Install the handlers for the duration of a run (main thread only; elsewhere a no-op)."""
    global _pending, _armed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    _pending, _armed = 0, False
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _pending, _armed = 0, False


@contextmanager
def catching() -> Iterator[None]:
    """Within: a signal is a request to stop after the current step (see ``requested``)."""
    global _armed
    _armed = True
    try:
        yield
    finally:
        _armed = False


def requested() -> int:
    """The signal number asking to stop (0: none). Collective under several processes: every rank
    calls it after every step, so all stop at the same step (the ZeRO-3 save is collective)."""
    global _pending
    _pending = dist_utils.max_int(_pending)
    return _pending


def pending() -> int:
    """This process's record of the stop request (no collective; after the loop has agreed on it)."""
    return _pending
