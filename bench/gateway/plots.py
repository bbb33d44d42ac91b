"""PNG plots (matplotlib, Agg): latency CDFs, the throughput frontier, RSS over time.

matplotlib is a bench-only tool (``pip install matplotlib``); without it the plots are skipped
and the tables still print.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLORS = {
    "direct": "#7f7f7f",
    "lunar": "#1f77b4",
    "litellm": "#d62728",
    "asgi-relay": "#2ca02c",
    "relay": "#9467bd",
    "granian-relay": "#8c564b",
}


def color(name: str) -> str | None:
    """Each target its own colour (one left to matplotlib's cycle would take lunar's blue)."""
    return COLORS.get(name) or ("#17becf" if name.startswith("lunar@") else None)


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def _plain_ticks(axis: Any) -> None:
    """Plain numbers on a log axis (1, 2, 5, 10, … instead of 2×10²)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.{0 if v >= 1 else 2}f}"))
    axis.set_minor_formatter(NullFormatter())


def available() -> bool:
    return _plt() is not None


def cdf_from_percentiles(
    path: Path,
    title: str,
    series: Mapping[str, Mapping[float, float]],
    xlabel: str = "latency (ms)",
) -> Path | None:
    """``series``: name -> {percentile: value}. Log x, linear y (0–100 %)."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, pts in series.items():
        qs = sorted(pts)
        ax.plot([pts[q] for q in qs], qs, label=name, color=color(name), lw=1.6)
    _finish_cdf(ax, title, xlabel)
    return _save(plt, fig, path)


def cdf_from_samples(
    path: Path,
    title: str,
    series: Mapping[str, Sequence[float]],
    xlabel: str = "latency (ms)",
    log: bool = True,
) -> Path | None:
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, xs in series.items():
        s = sorted(xs)
        if not s:
            continue
        n = len(s)
        ax.plot(
            s,
            [100.0 * (i + 1) / n for i in range(n)],
            label=f"{name} (n={n:,})",
            color=color(name),
            lw=1.6,
        )
    _finish_cdf(ax, title, xlabel, log)
    return _save(plt, fig, path)


def _finish_cdf(ax: Any, title: str, xlabel: str, log: bool = True) -> None:
    if log:
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("percentile (%)")
    ax.set_ylim(0, 100.5)
    for q in (50, 99):
        ax.axhline(q, color="#cccccc", lw=0.8, ls="--", zorder=0)
    ax.grid(True, which="both", color="#eeeeee", lw=0.6)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")


def frontier(
    path: Path,
    title: str,
    series: Mapping[str, Sequence[Sequence[tuple[float, float]]]],
    bounds: Sequence[float] = (10.0, 50.0),
) -> Path | None:
    """``series``: name -> rounds -> [(rate req/s, p99 ms)] by rising concurrency."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, rounds in series.items():
        for i, pts in enumerate(rounds):
            if not pts:
                continue
            ax.plot(
                [r for r, _ in pts],
                [p for _, p in pts],
                marker="o",
                ms=3,
                color=color(name),
                alpha=0.9 if i == 0 else 0.35,
                lw=1.2,
                label=name if i == 0 else None,
            )
    for b in bounds:
        ax.axhline(b, color="#999999", lw=0.8, ls="--")
        ax.text(ax.get_xlim()[0], b, f" p99 = {b:g} ms", va="bottom", fontsize=7, color="#666666")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_ticks(ax.xaxis)
    _plain_ticks(ax.yaxis)
    ax.set_xlabel("throughput (successful requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.grid(True, which="both", color="#eeeeee", lw=0.6)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return _save(plt, fig, path)


def rss(
    path: Path, title: str, series: Mapping[str, Sequence[tuple[float, float, float]]]
) -> Path | None:
    """``series``: name -> [(seconds, requests done, RSS MiB)]; RSS over time, with the
    requests done so far marked on a second axis."""
    plt = _plt()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax2 = ax.twinx()
    for name, pts in series.items():
        ax.plot(
            [t for t, _, _ in pts],
            [m for _, _, m in pts],
            label=f"{name} RSS",
            color=color(name),
            lw=1.6,
        )
        ax2.plot(
            [t for t, _, _ in pts],
            [n for _, n, _ in pts],
            color=color(name),
            lw=0.8,
            ls=":",
            label=f"{name} requests done",
        )
    ax.set_xlabel("time (s)")
    ax.set_ylabel("RSS (MiB)")
    ax2.set_ylabel("streamed requests completed (dotted)")
    ax.grid(True, color="#eeeeee", lw=0.6)
    ax.set_title(title, fontsize=10)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="center right")
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
