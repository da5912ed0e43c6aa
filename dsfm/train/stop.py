"""How a run stops other than by finishing: a signal (preemption) or a hang (the watchdog).

Preemption: SIGUSR1 (Slurm's `--signal`), SIGTERM or SIGINT (Ctrl-C) makes every rank
finish the current step, save a checkpoint and exit with EXIT_REQUEUE, which the sbatch
scripts read as "put me back in the queue"; a second signal exits at once. Ctrl-C reaches
every process of the terminal's foreground group: under `dsfm train` that is the one
process; under the `deepspeed` launcher the launcher as well (torchrun's too, untested),
which sends its ranks SIGTERM and waits for them (30 s each) before killing them. A SIGTERM
that follows a SIGINT within FORWARD_WINDOW_S is therefore the same Ctrl-C passed on, not a
second request: the ranks still finish the step and save. A second Ctrl-C exits at once.
`StopSignal` only records the request: ranks agree on stopping through the all-reduce that
averages the loss (the trainer), so a signal seen by one rank stops all of them.

The watchdog: a rank that stops making progress is reported and the job exits, instead of
hanging. A daemon thread per rank watches a heartbeat the trainer updates at each phase (step,
eval, save). When no beat arrives for `timeout_s`, it prints which rank is stuck, in which
phase and after which step, and calls `os._exit(EXIT_HUNG)`: a rank blocked in a
collective cannot be interrupted from Python, and the launcher (deepspeed, torchrun,
srun) tears down the other ranks once one exits non-zero. The process-group timeout
(`engine.init_distributed(timeout_s)`) is the second line: it turns a collective that
never completes into an error where the backend supports it. The watchdog also catches what
that cannot: a rank stuck outside any collective (I/O on a dead filesystem, a deadlock).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from dsfm.distributed.env import print0

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after saving; run again to continue
EXIT_HUNG = 124  # as timeout(1): the job did not finish in time
EXIT_ABORTED = 143  # a second signal: stopped at once, no checkpoint
FORWARD_WINDOW_S = 5.0  # a launcher passes Ctrl-C on as SIGTERM within this time


class StopSignal:
    """SIGUSR1/SIGTERM/SIGINT ask for a checkpoint and a clean exit; a second one exits at once,
    with EXIT_REQUEUE when the checkpoint is already saved (srun terminates the remaining
    tasks as soon as one exits), else EXIT_ABORTED."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.saved = False
        self.first: tuple[int, float] | None = None  # (signal, when) of the request
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers need the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    @property
    def received(self) -> bool:
        return self.first is not None

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.received:
            if self._passed_on(signum, now):
                return
            os._exit(EXIT_REQUEUE if self.saved else EXIT_ABORTED)
        self.first = (signum, now)
        print0(
            f"received {signal.Signals(signum).name}: stopping after this step with a "
            "checkpoint (a second signal stops at once, without saving)"
        )

    def _passed_on(self, signum: int, now: float) -> bool:
        """A launcher's SIGTERM right after the terminal's SIGINT: the same Ctrl-C, once."""
        first, at = self.first
        if first != signal.SIGINT or signum != signal.SIGTERM or now - at > FORWARD_WINDOW_S:
            return False
        self.first = (signum, at)  # a further SIGTERM is a second request
        print0("received SIGTERM from the launcher passing on Ctrl-C: still saving this step")
        return True

    def restore(self) -> None:
        if self.saved:  # keep exiting 75 on a late signal until the process ends
            return
        for s, handler in self.previous.items():
            signal.signal(s, handler)


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


class PeerLost(RuntimeError):
    """A collective failed because another rank is gone (its process killed, its node down):
    one message naming this rank, the phase and the step, and where to resume, instead of
    the backend's traceback. The rank exits 1 and its launcher ends the ranks beside it."""

    def __init__(self, rank: int, phase: str, step: int, cause: str, resume: str | None) -> None:
        where = f"from {resume}" if resume else "from the start (no checkpoint yet)"
        super().__init__(
            f"rank {rank}: a collective failed in {phase} after step {step}: a peer rank is "
            f"gone (killed, or its node down) [{cause}]. Restart every node with the same "
            f"train.out_dir to resume {where}."
        )
