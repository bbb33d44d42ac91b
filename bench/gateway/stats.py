"""Medians with min–max, percentiles, and the markdown of a figure (tables, links)."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def pct(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100), nearest rank on the sorted values."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]


def fmt(x: float, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if math.isinf(x):
        return "∞"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def mm(xs: Sequence[float], digits: int = 2) -> str:
    """median (min–max)"""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt(xs[0], digits)
    return f"{fmt(med(xs), digits)} ({fmt(min(xs), digits)}–{fmt(max(xs), digits)})"


def verdict(ok: bool, shown: str) -> str:
    return f"met ({shown})" if ok else f"**NOT met** ({shown})"


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def doc_link(p: Path) -> str:
    """``p`` as a page in docs/ links it: relative to docs/, or as given when outside it."""
    try:
        return str(p.resolve().relative_to(DOCS.resolve()))
    except ValueError:
        return str(p)
