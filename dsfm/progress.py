"""Progress of long work (prepare, eval, export, merge, import, train), terminal or not.

- On a terminal, a rich bar per task, redrawn in place, with the elapsed time and ETA.
- Without one (Slurm logs, pipes, CI), redraws are noise and rich draws nothing, so each
  task prints plain lines instead: one when it starts, one each time it crosses another
  10% of its total or `every_s` seconds after the last (a slow task, or one whose total is
  unknown, still shows it is alive), and one when it finishes. Every line carries the
  elapsed time and, when the total is known, the ETA.
- The ETA is the average rate since the task started, extrapolated (`eta_s`); train's status
  lines use the same function, so a log and a terminal agree.
- Progress goes to stderr, so a command's stdout stays its result (`--json`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_EVERY_S = 30.0  # a plain line at least this often while a task runs
PLAIN_STEPS = 10  # and one per 10% of its total


def eta_s(done: float, total: float | None, elapsed_s: float) -> float | None:
    """Seconds left at the average rate so far; None before any progress or without a total."""
    if not total or done <= 0:
        return None
    return max(total - done, 0) * elapsed_s / done


def duration(seconds: float | None) -> str:
    """h:mm:ss as rich shows it; "?" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def amount(n: float, unit: str) -> str:
    """Bytes as MB, anything else as a count with its unit."""
    if unit == "B":
        return f"{n / 1e6:,.1f}"
    return f"{int(n):,}"


@dataclass
class _Task:
    description: str
    total: float | None
    unit: str
    detail: str = ""
    completed: float = 0.0
    start: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    next_mark: int = 1  # in tenths (PLAIN_STEPS) of the total
    done: bool = False

    def line(self, now: float) -> str:
        elapsed = now - self.start
        unit = " MB" if self.unit == "B" else f" {self.unit}" if self.unit else ""
        if self.total:
            pct = 100 * min(self.completed / self.total, 1.0)
            size = (
                f"{pct:3.0f}% {amount(self.completed, self.unit)}/{amount(self.total, self.unit)}"
            )
            eta = f" | eta {duration(eta_s(self.completed, self.total, elapsed))}"
        elif self.completed:
            size, eta = amount(self.completed, self.unit), ""
        else:  # a step without parts to count
            size, unit, eta = ("done" if self.done else ""), "", ""
        head = f"{self.description}: {size}{unit}" if size else self.description
        parts = [head, f"elapsed {duration(elapsed)}{eta}"]
        return " | ".join(parts + ([self.detail] if self.detail else []))


class Tracker:
    """Tasks with a total (or none), advanced by the caller; see the module docstring.

    `plain=False` draws the terminal bar only (train prints its own status lines off a
    terminal); `enabled=False` shows nothing.
    """

    def __init__(
        self,
        *,
        enabled: bool = True,
        console: Console | None = None,
        plain: bool = True,
        every_s: float = PLAIN_EVERY_S,
        transient: bool = False,
    ):
        self.console = console or Console(stderr=True)
        live = enabled and self.console.is_terminal
        self.plain = enabled and plain and not live
        self.every_s = every_s
        self.tasks: dict[int, _Task] = {}
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[amount]}"),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=transient,
            disable=not live,
        )

    def start(self) -> None:
        self.bar.start()

    def stop(self) -> None:
        """Stop drawing; unfinished tasks stay as they are (a run stopped early)."""
        self.bar.stop()

    def __enter__(self) -> Tracker:
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:  # a task its caller left open ends complete, with its line
            for task_id in self.tasks:
                self.finish(task_id)
        self.stop()

    def add_task(
        self, description: str, total: float | None = None, unit: str = "", detail: str = ""
    ) -> int:
        task_id = self.bar.add_task(description, total=total, amount="", detail=detail)
        self.tasks[task_id] = _Task(description, total, unit, detail)
        self._show(task_id, force=True)
        return task_id

    def update(
        self,
        task_id: int,
        *,
        advance: float = 0,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        detail: str | None = None,
    ) -> None:
        t = self.tasks[task_id]
        t.completed = completed if completed is not None else t.completed + advance
        t.total = total if total is not None else t.total
        t.description = description if description is not None else t.description
        t.detail = detail if detail is not None else t.detail
        self._show(task_id, force=description is not None)

    def finish(self, task_id: int, description: str | None = None) -> None:
        """The task is complete: its total becomes what was done (a bar at 100%)."""
        t = self.tasks[task_id]
        if t.done:
            return
        t.done, t.total = True, t.completed or t.total
        if description is not None:
            t.description = description
        self._show(task_id, force=True)

    @contextmanager
    def phase(self, description: str) -> Iterator[int]:
        """A step with no parts to count (reading weights): a line when it starts and one,
        with its duration, when it ends."""
        task_id = self.add_task(description)
        yield task_id
        self.finish(task_id)

    def _show(self, task_id: int, force: bool) -> None:
        t, now = self.tasks[task_id], time.monotonic()
        unit = " MB" if t.unit == "B" else f" {t.unit}" if t.unit else ""
        done = amount(t.completed, t.unit)
        self.bar.update(
            task_id,
            completed=t.completed,
            total=t.total,
            description=t.description,
            amount=f"{done}/{amount(t.total, t.unit)}{unit}" if t.total else f"{done}{unit}",
            detail=t.detail,
        )
        if not self.plain:
            return
        fraction = t.completed / t.total if t.total else 0.0
        if fraction >= 1 and not (t.done or force):
            return  # the finishing line says it
        if not (
            force
            or fraction * PLAIN_STEPS + 1e-9 >= t.next_mark
            or now - t.last_line >= self.every_s
        ):
            return
        self.console.print(t.line(now), markup=False, highlight=False, soft_wrap=True)
        t.last_line = now
        t.next_mark = math.floor(fraction * PLAIN_STEPS + 1e-9) + 1
