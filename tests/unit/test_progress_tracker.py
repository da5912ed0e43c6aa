"""dsfm/progress.py: plain lines off a terminal, a redrawn bar on one, the ETA both use."""

from __future__ import annotations

import io
import re

from rich.console import Console

from dsfm.progress import Tracker, duration, eta_s

LINE = re.compile(
    r"^work: +(\d+)% (\d+)/100 items \| elapsed \d:\d\d:\d\d \| eta (\d:\d\d:\d\d|\?)"
)


def plain_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out  # a file: not a terminal, as in a Slurm log


def test_eta_is_the_average_rate_extrapolated():
    assert eta_s(25, 100, 10.0) == 30.0
    assert eta_s(0, 100, 10.0) is None and eta_s(5, None, 1.0) is None
    assert eta_s(120, 100, 10.0) == 0  # more than the estimate: nothing left, not negative
    assert duration(3725) == "1:02:05" and duration(None) == "?"


def test_off_a_terminal_a_line_per_tenth_with_eta_and_one_at_the_end():
    console, out = plain_console()
    with Tracker(console=console, every_s=3600) as progress:
        task = progress.add_task("work", 100, "items")
        for _ in range(100):
            progress.update(task, advance=1, detail="busy")
    lines = out.getvalue().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    percents = [int(m[1]) for m in matches]
    # the start, each 10% crossed once, and the finish: never a redraw per update
    assert percents == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100], lines
    assert all(m[3] != "?" for m in matches[1:]), lines
    assert lines[1].endswith("| busy")


def test_slow_or_open_ended_work_still_prints_every_few_seconds():
    console, out = plain_console()
    with Tracker(console=console, every_s=0) as progress:  # every update is "a while later"
        with progress.phase("reading weights"):
            pass
        task = progress.add_task("scanning", None, "files")
        for _ in range(3):
            progress.update(task, advance=1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("reading weights | elapsed")
    assert lines[1].startswith("reading weights: done | elapsed")
    assert [line.split(" |")[0] for line in lines[2:]] == [
        "scanning",
        "scanning: 1 files",
        "scanning: 2 files",
        "scanning: 3 files",
        "scanning: 100% 3/3 files",  # finished: what was done is the total
    ], lines


def test_on_a_terminal_the_bar_is_drawn_and_no_plain_lines():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with Tracker(console=console, every_s=0) as progress:
        task = progress.add_task("work", 100, "items")
        progress.update(task, advance=50)
    text = out.getvalue()
    assert "work" in text and "items" in text and "eta" in text
    assert not LINE.search(text.replace("\r", "\n"))  # no plain line format among the redraws


def test_disabled_prints_nothing():
    console, out = plain_console()
    with Tracker(console=console, enabled=False) as progress:
        progress.update(progress.add_task("work", 10), advance=10)
    assert out.getvalue() == ""
