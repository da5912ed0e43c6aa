"""`dsfm plot`: one dashboard figure of one or more runs, for a glance or a report.

Panels share one x axis (step, or tokens seen): loss (train raw, faint, under a centred
moving average; validation as dashed markers), validation perplexity (exp of the smoothed
train loss for a run without evals), learning rate, gradient norm (log scale) and
throughput, plus MFU when the accelerator's peak is known (never on CPU) and GPU memory
when the run logged `mem_gb` (CUDA only). A run keeps one color in every panel and the
figure has one legend. The Figure is built without pyplot: no global state and no
display, and it renders anywhere (Agg for PNG).

Readable at a glance: log axes label 1-2-5 (or finer, down to 1-1.5-2-3-5-7, when they
span less than two decades) in plain numbers, learning rates read 3e-3 as configs write
them, and the last validation perplexity is written inside its panel, never clipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from matplotlib.transforms import blended_transform_factory

from dsfm.observe.numbers import human, scientific
from dsfm.observe.rundir import METRICS
from dsfm.observe.runs import Run, load_run

FORMATS = (".png", ".pdf", ".svg")
LOG_FINE_SUBS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
MARKED_EVENTS = ("rollback", "spike", "nonfinite", "nonfinite_grad", "warning")
FIGSIZE_IN = (14, 9)
DPI = 120


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Each run's directory name; names that repeat get their parent directory in front."""
    names = [p.resolve().name for p in paths]
    return [
        f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)
    ]


def default_window(n_rows: int) -> int:
    return max(1, min(100, n_rows // 10))


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Mean over `window` points centred on each (fewer at the ends), skipping NaN (skipped
    steps). Centred, not trailing: the curve is drawn after the fact, and a trailing mean
    would lag a falling loss by half a window."""
    ok = np.isfinite(y)
    sums = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    counts = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(len(y))
    lo = np.maximum(i - window // 2, 0)
    hi = np.minimum(i + (window - 1) // 2, len(y) - 1) + 1
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[hi] - sums[lo]) / n, np.nan)


def column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def eval_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("val_loss") is not None]


def plot_runs(
    paths: Sequence[str | Path],
    x: str = "step",
    smooth: int | None = None,
    title: str | None = None,
) -> Figure:
    """The dashboard of these runs, overlaid; save it with `save_figure`."""
    if x not in ("step", "tokens"):
        raise ValueError(f"x={x!r}: plot against step or tokens")
    if smooth is not None and smooth < 1:
        raise ValueError(f"--smooth {smooth}: the moving average needs a window of 1 or more")
    runs = [load_run(p) for p in paths]
    for run in runs:
        if not run.rows:
            raise ValueError(
                f"{run.path} has no training steps in {METRICS} yet; "
                "plot it once it has logged a step"
            )
    labels = run_labels([run.path for run in runs])
    logged = {key: any(np.isfinite(column(run.rows, key)).any() for run in runs)
              for key in ("mfu", "mem_gb")}  # fmt: skip

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    rows = fig.add_gridspec(2, 1)
    top = rows[0].subgridspec(1, 2, width_ratios=(7, 5))
    loss_ax = fig.add_subplot(top[0])
    ppl_ax = fig.add_subplot(top[1], sharex=loss_ax)
    bottom = ["lr", "gnorm", "speed"] + [k for k in ("mfu", "mem_gb") if logged[k]]
    axes = {"loss": loss_ax, "ppl": ppl_ax}
    for name, cell in zip(bottom, rows[1].subgridspec(1, len(bottom))):
        axes[name] = fig.add_subplot(cell, sharex=loss_ax)

    windows = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        window = smooth or default_window(len(run.rows))
        windows.append(window)
        _plot_run(axes, run, label, f"C{i}", x, window)
    _style(axes, x)
    fig.suptitle(title or f"dsfm runs: {', '.join(labels)}", fontsize=15, fontweight="bold")
    _legend(fig, runs, labels, windows)
    return fig


def _plot_run(axes: dict[str, Any], run: Run, label: str, color: str, x: str, window: int) -> None:
    rows = run.rows
    xs = column(rows, x)
    loss = column(rows, "loss")
    loss_smooth = moving_average(loss, window)
    ax = axes["loss"]
    ax.plot(xs, loss, color=color, lw=0.8, alpha=0.3, gid=f"{label}/train")
    ax.plot(xs, loss_smooth, color=color, lw=2.0, gid=f"{label}/train_smooth")
    evals = eval_rows(rows)
    val_x = column(evals, x)
    val_style = {"color": color, "ls": "--", "lw": 1.2, "marker": "o", "ms": 5, "mec": "white"}
    ax.plot(val_x, column(evals, "val_loss"), gid=f"{label}/val", **val_style)
    _mark_events(ax, run, color, x)

    ax = axes["ppl"]
    if evals:
        ppl = np.exp(column(evals, "val_loss"))
        ax.plot(val_x, ppl, gid=f"{label}/val_ppl", **val_style)
        ax.annotate(  # left of the last point, above it; _style keeps it inside the panel
            f"{ppl[-1]:.1f}",
            (val_x[-1], ppl[-1]),
            xytext=(-4, 4),
            ha="right",
            va="bottom",
            textcoords="offset points",
            color=color,
            fontweight="bold",
            gid=f"{label}/val_ppl_last",
        )
    else:  # no evals yet: the smoothed train loss's perplexity, dotted (see the legend)
        ax.plot(xs, np.exp(loss_smooth), color=color, lw=1.8, ls=":", gid=f"{label}/train_ppl")

    axes["lr"].plot(xs, column(rows, "lr"), color=color, lw=1.8, gid=f"{label}/lr")
    for key, name in (("gnorm", "grad_norm"), ("speed", "tok_per_s")):
        y = column(rows, name)
        axes[key].plot(xs, y, color=color, lw=0.8, alpha=0.3)
        axes[key].plot(xs, moving_average(y, window), color=color, lw=1.8, gid=f"{label}/{name}")
    if "mfu" in axes:
        mfu = 100 * column(rows, "mfu")
        axes["mfu"].plot(xs, moving_average(mfu, window), color=color, lw=1.8, gid=f"{label}/mfu")
    if "mem_gb" in axes:  # a step's peak: no smoothing, the highest is what matters
        axes["mem_gb"].plot(xs, column(rows, "mem_gb"), color=color, lw=1.8, gid=f"{label}/mem_gb")


def _mark_events(ax: Any, run: Run, color: str, x: str) -> None:
    """Rollbacks, spikes, skipped steps and warnings: ticks along the loss panel's floor."""
    steps = [e["step"] for e in run.events if e.get("event") in MARKED_EVENTS and "step" in e]
    if not steps:
        return
    at = np.array(steps, dtype=float)
    if x == "tokens":  # events carry a step only: place them by the step rows' tokens
        at = np.interp(at, column(run.rows, "step"), column(run.rows, "tokens"))
    floor = blended_transform_factory(ax.transData, ax.transAxes)
    ax.plot(
        at,
        np.full(len(at), 0.03),
        ls="none",
        marker="|",
        ms=12,
        mew=2,
        color=color,
        transform=floor,
        gid="events",
    )


def _style(axes: dict[str, Any], x: str) -> None:
    xlabel = "training tokens" if x == "tokens" else "step"
    titles = {
        "loss": ("Loss", "cross-entropy (nats/token)"),
        "ppl": ("Perplexity", "perplexity (exp of loss)"),
        "lr": ("Learning rate", "learning rate"),
        "gnorm": ("Gradient norm", "global L2 norm, before clipping"),
        "speed": ("Throughput", "tokens/s"),
        "mfu": ("Model FLOPs utilization", "MFU (%)"),
        "mem_gb": ("GPU memory", "peak allocated per step (GiB)"),
    }
    count = FuncFormatter(lambda v, _: human(v) if v else "0")
    for key, ax in axes.items():
        name, ylabel = titles[key]
        ax.set_title(name, loc="left", fontsize=12, fontweight="bold")
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        ax.xaxis.set_major_formatter(count)
    axes["loss"].set_xlim(left=0)
    axes["speed"].yaxis.set_major_formatter(count)
    axes["lr"].yaxis.set_major_formatter(FuncFormatter(lambda v, _: scientific(v)))
    if "mem_gb" in axes:  # memory against zero: how full, not how it wiggles
        mem = [y for line in axes["mem_gb"].get_lines() for y in line.get_ydata()]
        axes["mem_gb"].set_ylim(0, 1.15 * np.nanmax(mem))
    _log_scale(axes["gnorm"])
    ppl = [y for line in axes["ppl"].get_lines() for y in line.get_ydata() if np.isfinite(y)]
    if ppl and max(ppl) / max(min(ppl), 1e-9) > 10:  # spans an order of magnitude: log
        _log_scale(axes["ppl"])
    _headroom(axes["ppl"])


def _log_scale(ax: Any) -> None:
    """Log y in plain numbers (0.5, 1, 2 read faster than 10^0), with ticks at 1-2-5 x 10^k,
    finer when the axis spans less than two decades, so it never shows just one or two."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    decades = np.log10(high / low) if low > 0 and high > low else 0.0
    subs = (1.0,) if decades > 4 else (1.0, 2.0, 5.0) if decades > 2 else LOG_FINE_SUBS
    ax.yaxis.set_major_locator(LogLocator(subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}" if v < 1e4 else human(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _headroom(ax: Any) -> None:
    """Room above the highest point for the labels written above points (a tenth of the
    panel, in its own scale), so the last perplexity is never cut at the panel's top."""
    if not ax.texts:
        return
    low, high = ax.get_ylim()
    if ax.get_yscale() == "log":
        ax.set_ylim(low, high * (high / low) ** 0.1)
    else:
        ax.set_ylim(low, high + 0.1 * (high - low))


def _legend(fig: Figure, runs: list[Run], labels: list[str], windows: list[int]) -> None:
    """One legend for every panel: a color per run, then what each line style means."""
    handles = [Line2D([], [], color=f"C{i}", lw=3, label=lab) for i, lab in enumerate(labels)]
    smooth = f"{windows[0]}-step mean" if len(set(windows)) == 1 else "smoothed"
    handles += [
        Line2D([], [], color="gray", lw=1.0, alpha=0.5, label="train (raw)"),
        Line2D([], [], color="gray", lw=2.0, label=f"train ({smooth})"),
        Line2D([], [], color="gray", ls="--", marker="o", mec="white", label="validation"),
    ]
    if any(not eval_rows(run.rows) for run in runs):
        handles.append(
            Line2D([], [], color="gray", ls=":", lw=1.8, label="exp(train loss), no evals")
        )
    if any(e.get("event") in MARKED_EVENTS for run in runs for e in run.events):
        handles.append(
            Line2D(
                [],
                [],
                color="gray",
                ls="none",
                marker="|",
                ms=12,
                mew=2,
                label="rollback / spike / skipped step / warning",
            )
        )
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(len(handles), 7),
        frameon=False,
        fontsize=11,
    )


def save_figure(fig: Figure, out: str | Path) -> Path:
    """PNG, PDF or SVG by the file's extension."""
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"--out {out}: name a .png, .pdf or .svg file (e.g. dashboard.png)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_command(runs: list[str], out: str, x: str, smooth: int | None, title: str | None) -> int:
    print(f"wrote {save_figure(plot_runs(runs, x=x, smooth=smooth, title=title), out)}")
    return 0
