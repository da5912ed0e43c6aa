"""A rank that stops making progress is reported and the job exits, instead of hanging.

A daemon thread per rank watches a heartbeat the trainer updates at each phase (step,
eval, save). When no beat arrives for `timeout_s`, it prints which rank is stuck, in which
phase and after which step, and calls `os._exit(EXIT_HUNG)`: a rank blocked in a
collective cannot be interrupted from Python, and the launcher (deepspeed, torchrun,
srun) tears down the other ranks once one exits non-zero. The process-group timeout
(`engine.init_distributed(timeout_s)`) is the second line: it turns a collective that never
completes into an error where the backend supports it. The watchdog also catches what
that cannot: a rank stuck outside any collective (I/O on a dead filesystem, a deadlock).
"""

from __future__ import annotations

import os
import sys
import threading
import time

EXIT_HUNG = 124  # as timeout(1): the job did not finish in time


class Watchdog:
    def __init__(self, timeout_s: float, rank: int) -> None:
        self.timeout_s, self.rank = timeout_s, rank
        self.step, self.phase = 0, "start"
        self.last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="dsfm-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int, phase: str) -> None:
        self.step, self.phase, self.last_beat = step, phase, time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last_beat
            if idle > self.timeout_s:
                print(
                    f"watchdog: rank {self.rank} stuck for {idle:.0f}s in {self.phase} after "
                    f"step {self.step} (train.watchdog_s={self.timeout_s:g}); a rank is hung or "
                    f"a collective never returned. Exiting with status {EXIT_HUNG}.",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_HUNG)
