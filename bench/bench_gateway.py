"""Gateway lanes 1–3: Lunar's gateway against the LiteLLM proxy and the bare upstream (direct).

    python bench/bench_gateway.py [--full] [--lanes 1,2,3] [--targets lunar,litellm,...]
                                  [--python PATH] [--json out.json] [--img docs/img]
                                  [--no-plots] [--no-install]

Method. The upstream is an emulator in its own process (pre-rendered bytes), so it never
limits the measurement; ``direct`` is that upstream alone, the physical floor. Every gateway is
pinned to core 0, the upstream and the load generator to core 1 (``taskset``). Each figure is a
median over several runs with the min–max beside it; A and B alternate within one run (the
order rotates every round), and every ratio is taken between runs of the same round.

1. Added latency, non-streaming, 1 connection: ``wrk -c1`` for a few seconds per target per
   round; added = gateway − direct (p50 and p99) in the same round. Twice: as pinned above
   (split), then with each gateway moved onto the load core (shared): direct's wrk and
   upstream share one core, so in split placement a gateway pays four cross-core wake-ups per
   request that direct does not, and at one connection sharing a core costs no CPU time.
2. Throughput frontier: ``wrk`` closed loop, connections stepped 1, 2, 4, … (a target stops
   after two steps in a row with p99 past 50 ms or 5 % of its requests failing); the frontier
   at a bound is the highest rate of successful requests among the steps whose p99 ≤ bound
   and error rate ≤ 1 %.
3. Streams: 64 deltas at 20 ms pacing from the replay upstream (the emulator's bytes,
   bench/gateway/upstream.py). A few concurrent streams give TTFT and inter-chunk gaps, added
   = gateway − direct in the same round; then N connections stream back to back for T seconds
   (N concurrent streams) and every stream is checked: content equal to the reference, a
   ``[DONE]``, no gap > 10 × pacing (a stall; the wait for the first delta counts as a gap).

Lunar is ``python -m lunar.server serve`` (= ``lunar serve``) with its OpenAI provider pointed
at the upstream; LiteLLM is the proxy from bench/.venv-litellm (installed by
bench/gateway/litellm_env.py on first use) with ``--num_workers 1`` and the same upstream.
Two floors run beside them: ``asgi-relay`` (uvicorn on uvloop + httptools, as Lunar runs, with
an app that copies the upstream's bytes through Lunar's pool: what any ASGI gateway costs
before doing anything) and ``relay`` (a byte relay that parses nothing: the event loop and
the socket calls alone).
The tables go to stdout (markdown); progress to stderr; plots to --img.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway import litellm_env, plots, procs, stats, streams, targets, wrk
from gateway.stats import fmt, med, mm, pct, table, verdict

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"

PROFILES: dict[str, dict[str, Any]] = {
    "quick": {
        "l1_runs": 5,
        "l1_seconds": 2,
        "l2_rounds": 3,
        "l2_seconds": 1,
        "l2_steps": [1, 2, 4, 8, 16, 32, 64, 128, 256],
        "l3_rounds": 3,
        "l3_connections": 8,
        "l3_per_connection": 2,
        "l3_steps": [100, 250, 500, 1000],
        "l3_seconds": 4,
    },
    "full": {
        "l1_runs": 9,
        "l1_seconds": 10,
        "l2_rounds": 5,
        "l2_seconds": 5,
        "l2_steps": [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256],
        "l3_rounds": 5,
        "l3_connections": 8,
        "l3_per_connection": 6,
        "l3_steps": [100, 250, 500, 1000, 1500, 2000],
        "l3_seconds": 20,
    },
}
NONSTREAM_CHUNKS = 16
STREAM_CHUNKS = 64
PACING_MS = 20.0
BOUNDS = (10.0, 50.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rotate(xs: Sequence[Any], r: int) -> list[Any]:
    r %= len(xs)
    return [*xs[r:], *xs[:r]]


# -- set-up ---------------------------------------------------------------------------------


def start_targets(
    ps: procs.Procs, emu: procs.Emulator, names: Sequence[str]
) -> list[targets.Target]:
    ts = [targets.direct(emu)]
    for name in names:
        spec = targets.SPECS[name]
        t0 = time.monotonic()
        ts.append(targets.start(spec, ps, emu))
        log(f"{name} ready in {time.monotonic() - t0:.1f}s: {ts[-1].command}")
    return ts


def warm_up(ts: Sequence[targets.Target], work: Path) -> None:
    for t in ts:
        lua = wrk.script(t, work)
        wrk.run(t, lua, connections=1, seconds=1)
        wrk.run(t, lua, connections=8, seconds=1)


# -- lane 1 ---------------------------------------------------------------------------------


def lane1(ts: Sequence[targets.Target], work: Path, runs: int, seconds: int) -> dict[str, Any]:
    """Both placements: ``split`` (each gateway on its own core, as in every lane) and
    ``shared`` (the gateway moved onto the load core for the while). At one connection only
    one process runs at a time, so sharing a core costs no CPU; it takes away the cross-core
    wake-ups that ``split`` adds to every gateway and that direct (wrk and the upstream on
    one core) never pays: a few tens of µs each on this VM, four per proxied request."""
    luas = {t.name: wrk.script(t, work) for t in ts}
    out: dict[str, Any] = {"runs": runs, "seconds": seconds}
    for placement in ("split", "shared"):
        moved = placement == "shared" and procs.can_pin()
        if placement == "shared" and not moved:
            continue
        res: dict[str, list[wrk.Result]] = {t.name: [] for t in ts}
        try:
            for t in ts:
                if moved and t.pid is not None:
                    procs.move(t.pid, procs.LOAD_CORE)
            for r in range(runs):
                for t in rotate(ts, r):
                    res[t.name].append(wrk.run(t, luas[t.name], connections=1, seconds=seconds))
                shown = ", ".join(
                    f"{n} p50 {v[-1].p(50):.3f} p99 {v[-1].p(99):.3f}" for n, v in res.items()
                )
                log(f"lane 1 {placement} round {r + 1}: {shown}")
        finally:
            for t in ts:
                if moved and t.pid is not None:
                    procs.move(t.pid, procs.GATEWAY_CORE)
        out["results" if placement == "split" else "shared"] = res
    return out


def _lane1_table(res: dict[str, list[wrk.Result]]) -> tuple[str, dict[str, dict[str, list[float]]]]:
    direct = res["direct"]
    rows = []
    added: dict[str, dict[str, list[float]]] = {}
    for name, rs in res.items():
        a50 = [g.p(50) - b.p(50) for g, b in zip(rs, direct)]
        a99 = [g.p(99) - b.p(99) for g, b in zip(rs, direct)]
        added[name] = {"p50": a50, "p99": a99}
        rows.append(
            [
                name,
                mm([x.p(50) for x in rs], 3),
                mm([x.p(99) for x in rs], 3),
                "–" if name == "direct" else mm(a50, 3),
                "–" if name == "direct" else mm(a99, 3),
                mm([x.rate for x in rs], 0),
                str(sum(x.errors for x in rs)),
            ]
        )
    return table(["target", "p50", "p99", "added p50", "added p99", "req/s", "errors"], rows), added


def lane1_md(d: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    res: dict[str, list[wrk.Result]] = d["results"]
    direct = res["direct"]
    split, added = _lane1_table(res)
    out = [
        f"`wrk -t1 -c1 -d{d['seconds']}s` per target, {d['runs']} rounds alternating the targets "
        "(order rotated each round); added = target − direct in the same round. "
        "Median (min–max) over rounds, ms.",
        "",
        "Split placement (each gateway on its own core, as in every lane; wrk and the upstream "
        "on the other):",
        "",
        split,
        "",
    ]
    if "shared" in d:
        shared, added_shared = _lane1_table(d["shared"])
        out += [
            "Shared placement (the same processes, each gateway moved onto the load core for "
            "these rounds: one core for all, as direct's wrk and upstream always are; at one "
            "connection only one process runs at a time, so nothing waits for the CPU, and "
            "no request crosses cores):",
            "",
            shared,
            "",
        ]
    met: dict[str, bool] = {}
    if "lunar" in added:
        m50, m99 = med(added["lunar"]["p50"]), med(added["lunar"]["p99"])
        met["lane1 p50"] = m50 <= 0.3
        out.append(
            f"- Lunar added p50 ≤ 0.3 ms, split: {verdict(met['lane1 p50'], f'{m50:.3f} ms')}"
        )
        if "shared" in d:
            s50 = med(added_shared["lunar"]["p50"])
            met["lane1 p50 shared"] = s50 <= 0.3
            out.append(
                "- Lunar added p50 ≤ 0.3 ms, shared: "
                + verdict(met["lane1 p50 shared"], f"{s50:.3f} ms")
            )
        if m99 >= 0:
            met["lane1 p99"] = m99 <= 1.0
            out.append(
                f"- Lunar added p99 ≤ 1 ms, split: {verdict(met['lane1 p99'], f'{m99:.3f} ms')}"
            )
        else:
            out.append(
                f"- Lunar added p99 ≤ 1 ms: not judged ({m99:.3f} ms: direct's own p99 was worse "
                "than the gateway's, i.e. the machine was busy; re-run on a quiet machine)"
            )
    d99 = [x.p(99) for x in direct]
    if max(d99) > 5.0:
        out.append(
            f"- Note: direct's p99 reached {max(d99):.1f} ms (its p50 is "
            f"{med([x.p(50) for x in direct]):.3f} ms): other work on the machine; p99 figures "
            "of this run are not reliable."
        )
    if "litellm" in added and "lunar" in added:
        ratio = [
            ll / lu if lu > 0 else math.inf
            for ll, lu in zip(added["litellm"]["p50"], added["lunar"]["p50"])
        ]
        out.append(f"- LiteLLM adds {mm(ratio, 1)}× Lunar's added p50 (same rounds).")
    return "\n".join(out), met


# -- lane 2 ---------------------------------------------------------------------------------


def lane2(
    ts: Sequence[targets.Target], work: Path, rounds: int, seconds: int, steps: Sequence[int]
) -> dict[str, Any]:
    luas = {t.name: wrk.script(t, work) for t in ts}
    sweep: dict[str, list[list[wrk.Result]]] = {t.name: [] for t in ts}
    for r in range(rounds):
        active = {t.name for t in ts}
        over = {t.name: 0 for t in ts}
        for t in ts:
            sweep[t.name].append([])
        for c in steps:
            for t in rotate(ts, r):
                if t.name not in active:
                    continue
                x = wrk.run(t, luas[t.name], connections=c, seconds=seconds)
                sweep[t.name][r].append(x)
                # two steps in a row past the widest bound (or failing): saturated, stop
                bad = x.p(99) > max(BOUNDS) or x.error_rate > 0.05
                over[t.name] = over[t.name] + 1 if bad else 0
                if over[t.name] >= 2 or x.error_rate > 0.5:
                    active.discard(t.name)
            if not active:
                break
        shown = ", ".join(
            f"{n} {fmt(frontier(v[r], BOUNDS[0]), 0)}/{fmt(frontier(v[r], BOUNDS[1]), 0)}"
            for n, v in sweep.items()
        )
        log(f"lane 2 round {r + 1} (req/s within 10/50 ms): {shown}")
    return {"rounds": rounds, "seconds": seconds, "steps": list(steps), "sweep": sweep}


def ok_rate(x: wrk.Result) -> float:
    return (x.requests - x.raw["errors"]["status"]) / x.seconds if x.seconds else 0.0


def frontier(results: Sequence[wrk.Result], bound: float) -> float:
    ok = [ok_rate(x) for x in results if x.p(99) <= bound and x.error_rate <= 0.01]
    return max(ok) if ok else 0.0


def lane2_md(d: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    sweep: dict[str, list[list[wrk.Result]]] = d["sweep"]
    names = list(sweep)
    rows = []
    met: dict[str, bool] = {}
    notes = []
    for b in BOUNDS:
        per = {n: [frontier(rnd, b) for rnd in sweep[n]] for n in names}
        row = [f"p99 ≤ {b:g} ms", *[mm(per[n], 0) for n in names]]
        if "lunar" in per and "litellm" in per:
            ratio = [
                (lu / ll) if ll > 0 else (math.inf if lu > 0 else math.nan)
                for lu, ll in zip(per["lunar"], per["litellm"])
            ]
            r = med(ratio)
            met[f"lane2 {b:g}ms"] = r >= 10
            row.append(mm(ratio, 1))
            shown = f"{fmt(r, 1)}×" + (
                " (LiteLLM has no step within the bound)" if math.isinf(r) else ""
            )
            notes.append(f"- Lunar ≥ 10× LiteLLM at p99 ≤ {b:g} ms: {verdict(r >= 10, shown)}")
        rows.append(row)
    head = ["bound", *[f"{n} req/s" for n in names]]
    if "lunar" in names and "litellm" in names:
        head.append("Lunar / LiteLLM")
    steps_rows = []
    for n in names:
        by_c: dict[int, list[wrk.Result]] = {}
        for rnd in sweep[n]:
            for x in rnd:
                by_c.setdefault(x.connections, []).append(x)
        for c, xs in sorted(by_c.items()):
            steps_rows.append(
                [
                    n,
                    str(c),
                    mm([ok_rate(x) for x in xs], 0),
                    mm([x.p(50) for x in xs], 2),
                    mm([x.p(99) for x in xs], 2),
                    mm([100 * x.error_rate for x in xs], 2),
                    f"{len(xs)}/{len(sweep[n])}",
                ]
            )
    out = [
        f"Closed loop: `wrk -t1 -cN -d{d['seconds']}s`, N = {', '.join(map(str, d['steps']))}, "
        f"{d['rounds']} rounds alternating the targets at every step; a target stops after "
        "two steps in a row with p99 > 50 ms or > 5 % errors. Frontier = highest successful "
        "req/s among the steps with p99 within the bound and ≤ 1 % errors (0: none). "
        "Median (min–max) over rounds.",
        "",
        table(head, rows),
        "",
        *notes,
        "",
        "Every step (median (min–max) over the rounds that reached it):",
        "",
        table(
            ["target", "connections", "req/s", "p50 ms", "p99 ms", "errors %", "rounds"], steps_rows
        ),
    ]
    return "\n".join(out), met


# -- lane 3 ---------------------------------------------------------------------------------


def decode_all(raws: Sequence[streams.Raw]) -> list[streams.Stream]:
    return [streams.decode(r) for r in raws]


def lane3_latency(
    ts: Sequence[targets.Target], rounds: int, conns: int, per_conn: int
) -> dict[str, Any]:
    out: dict[str, list[dict[str, Any]]] = {t.name: [] for t in ts}
    ref: str | None = None
    for r in range(rounds):
        for t in rotate(ts, r):
            ss = decode_all(
                streams.run(
                    t,
                    connections=conns,
                    streams_per_connection=per_conn,
                    stagger_s=0.3,
                )
            )
            if ref is None and t.name == "direct" and ss and ss[0].ok:
                ref = ss[0].content
            out[t.name].append(
                {
                    "ttft": [s.ttft_ms for s in ss if s.ttft_ms is not None],
                    "gaps": [g for s in ss for g in s.gaps_ms],
                    "streams": len(ss),
                    "ok": sum(s.ok for s in ss),
                    "deltas": sorted({s.deltas for s in ss}),
                }
            )
        shown = ", ".join(
            f"{n} ttft {pct(v[-1]['ttft'], 50):.2f} gap p99 {pct(v[-1]['gaps'], 99):.2f}"
            for n, v in out.items()
        )
        log(f"lane 3 latency round {r + 1}: {shown}")
    return {
        "rounds": rounds,
        "connections": conns,
        "per_connection": per_conn,
        "rounds_data": out,
        "reference": ref,
    }


def lane3_sustained(
    ts: Sequence[targets.Target],
    steps: Sequence[int],
    seconds: float,
    ref: str | None,
    upstream_pid: int,
) -> dict[str, Any]:
    """Each step, each target: N concurrent streams for ``seconds``. Besides the gateway's
    CPU, the load core's (this process, the stream client, and the upstream's): a step
    whose load core is near 100 % measures the harness, not the gateway."""
    out: dict[str, list[dict[str, Any]]] = {t.name: [] for t in ts}
    failed: set[str] = set()
    for i, n in enumerate(steps):
        for t in rotate(ts, i):
            if t.name in failed:
                continue
            cpu0 = procs.cpu_seconds(t.pid) if t.pid else 0.0
            load0 = time.process_time() + procs.cpu_seconds(upstream_pid)
            t0 = time.perf_counter()
            raws = streams.run(
                t,
                connections=n,
                seconds=seconds,
                stagger_s=PACING_MS * STREAM_CHUNKS / 1000.0,
                per_stream_timeout=30.0,
            )
            wall = time.perf_counter() - t0
            cpu = (procs.cpu_seconds(t.pid) - cpu0) / wall if t.pid else math.nan
            load = (time.process_time() + procs.cpu_seconds(upstream_pid) - load0) / wall
            ss = decode_all(raws)
            gaps = [g for s in ss for g in s.gaps_ms]
            ttft = [s.ttft_ms for s in ss if s.ttft_ms is not None]
            lost = [s for s in ss if not s.ok or (ref is not None and s.content != ref)]
            # a stall: a gap > 10 × pacing, counting the wait for the first delta as a gap
            # (direct's first delta comes one pacing after the request)
            limit = 10 * PACING_MS
            stalls = sum(1 for g in gaps if g > limit) + sum(1 for x in ttft if x > limit)
            stalled = sum(
                1 for s in ss if (s.ttft_ms or 0) > limit or any(g > limit for g in s.gaps_ms)
            )
            passed = not lost and stalls == 0 and len(ss) >= n
            errors: dict[str, int] = {}
            for s in lost:
                key = s.error or (
                    f"HTTP {s.status}"
                    if s.status != 200
                    else "no [DONE]"
                    if not s.done
                    else "content differs"
                )
                errors[key[:80]] = errors.get(key[:80], 0) + 1
            row = {
                "concurrent": n,
                "seconds": seconds,
                "streams": len(ss),
                "lost": len(lost),
                "stalls": stalls,
                "stalled_streams": stalled,
                "passed": passed,
                "gap_p50": pct(gaps, 50),
                "gap_p99": pct(gaps, 99),
                "gap_max": max(gaps) if gaps else math.nan,
                "ttft_p50": pct(ttft, 50),
                "ttft_p99": pct(ttft, 99),
                "cpu": cpu,
                "load_cpu": load,
                "errors": errors,
                "wall": wall,
            }
            out[t.name].append(row)
            log(
                f"lane 3 sustained {t.name} {n}: {len(ss)} streams, lost {len(lost)}, "
                f"stalls {stalls}, gap p99 {row['gap_p99']:.1f} max {row['gap_max']:.1f}, "
                f"cpu {cpu:.2f} load core {load:.2f} {'PASS' if passed else 'FAIL'} "
                f"{errors or ''}"
            )
            if not passed:
                failed.add(t.name)
        if len(failed) == len(ts):
            break
    return {"steps": list(steps), "seconds": seconds, "results": out}


def lane3_md(lat: dict[str, Any], sus: dict[str, Any] | None) -> tuple[str, dict[str, bool]]:
    data: dict[str, list[dict[str, Any]]] = lat["rounds_data"]
    direct = data["direct"]
    rows = []
    added: dict[str, dict[str, list[float]]] = {}
    for name, rs in data.items():
        t50 = [pct(x["ttft"], 50) for x in rs]
        g99 = [pct(x["gaps"], 99) for x in rs]
        added[name] = {
            "ttft": [a - pct(b["ttft"], 50) for a, b in zip(t50, direct)],
            "gap": [a - pct(b["gaps"], 99) for a, b in zip(g99, direct)],
        }
        rows.append(
            [
                name,
                mm(t50),
                mm([pct(x["ttft"], 99) for x in rs]),
                mm([pct(x["gaps"], 50) for x in rs]),
                mm(g99),
                "–" if name == "direct" else mm(added[name]["ttft"]),
                "–" if name == "direct" else mm(added[name]["gap"]),
                f"{sum(x['ok'] for x in rs)}/{sum(x['streams'] for x in rs)}",
            ]
        )
    per_round = lat["connections"] * lat["per_connection"]
    out = [
        f"{STREAM_CHUNKS} deltas at {PACING_MS:g} ms pacing; {lat['connections']} concurrent "
        f"streams, {per_round} streams per target per round, {lat['rounds']} rounds alternating "
        "the targets. TTFT = request written → first content delta read (the upstream sends "
        "its first content delta one pacing after the role chunk, so direct ≈ 20 ms); gap = "
        "between consecutive content deltas. Added = target − direct in the same round. "
        "Median (min–max) over rounds, ms.",
        "",
        table(
            [
                "target",
                "TTFT p50",
                "TTFT p99",
                "gap p50",
                "gap p99",
                "added TTFT p50",
                "added gap p99",
                "complete",
            ],
            rows,
        ),
        "",
    ]
    met: dict[str, bool] = {}
    if "lunar" in added:
        a, g = med(added["lunar"]["ttft"]), med(added["lunar"]["gap"])
        met["lane3 ttft"] = a <= 0.5
        met["lane3 gap"] = g <= 2.0
        out.append(f"- Lunar added TTFT p50 ≤ 0.5 ms: {verdict(met['lane3 ttft'], f'{a:.2f} ms')}")
        out.append(f"- Lunar added gap p99 ≤ 2 ms: {verdict(met['lane3 gap'], f'{g:.2f} ms')}")
    if sus is not None:
        srows = []
        best: dict[str, int] = {}
        for name, rs in sus["results"].items():
            best[name] = max([r["concurrent"] for r in rs if r["passed"]], default=0)
            for r in rs:
                errs = "; ".join(f"{k}: {v}" for k, v in r["errors"].items()) or ""
                srows.append(
                    [
                        name,
                        f"{r['concurrent']:,}",
                        f"{r['streams']:,}",
                        str(r["lost"]),
                        f"{r['stalls']} ({r['stalled_streams']} streams)",
                        fmt(r["gap_p50"]),
                        fmt(r["gap_p99"]),
                        fmt(r["gap_max"]),
                        fmt(r["ttft_p99"]),
                        "–" if math.isnan(r["cpu"]) else f"{100 * r['cpu']:.0f} %",
                        f"{100 * r['load_cpu']:.0f} %" if "load_cpu" in r else "–",
                        "yes" if r["passed"] else f"**no** {errs}",
                    ]
                )
        out += [
            "",
            f"Sustained: N connections stream back to back for {sus['seconds']:g} s (N concurrent "
            "streams; starts spread over one stream's length); every stream checked: HTTP 200, "
            f"content equal to the reference, `[DONE]`; a stall = a gap > {10 * PACING_MS:g} ms "
            "between deltas, or a first delta later than that after the request. "
            "A target stops at its first failing step. One run per step; gateway CPU = its "
            "process's CPU time / wall time (100 % = its whole core); load core = the stream "
            "client's and the upstream's, the same way (near 100 %, the step measures the "
            "harness).",
            "",
            table(
                [
                    "target",
                    "concurrent",
                    "streams",
                    "lost",
                    "stalls",
                    "gap p50",
                    "gap p99",
                    "gap max",
                    "TTFT p99",
                    "gateway CPU",
                    "load core",
                    "no loss, no stall",
                ],
                srows,
            ),
            "",
        ]
        line = ", ".join(f"{n} {v:,}" for n, v in best.items())
        out.append(f"Highest step sustained with no loss and no stall: {line}.")
        top = max(sus["steps"])
        if best.get("direct", top) < top:
            out.append(
                f"- Direct (the upstream and client alone) fails above {best['direct']:,}: "
                "the load core, not the gateway, limits the steps above it."
            )
        if "lunar" in best:
            met["lane3 streams"] = best["lunar"] >= 1000
            shown = f"{best['lunar']:,}"
            out.append(
                f"- Lunar ≥ 1,000 concurrent streams: {verdict(met['lane3 streams'], shown)}"
            )
    return "\n".join(out), met


# -- plots ----------------------------------------------------------------------------------


def plot_all(img: Path, l1: Any, l2: Any, l3: Any) -> list[Path]:
    made: list[Path | None] = []
    if l1 is not None:
        series = {}
        for name, rs in l1["results"].items():
            mid = sorted(rs, key=lambda x: x.p(50))[len(rs) // 2]
            series[name] = mid.pct
        made.append(
            plots.cdf_from_percentiles(
                img / "gateway_lane1_latency_cdf.png",
                "Lane 1: non-streaming latency, 1 connection (median round)",
                series,
            )
        )
    if l2 is not None:
        series2 = {
            n: [[(ok_rate(x), x.p(99)) for x in rnd] for rnd in rounds]
            for n, rounds in l2["sweep"].items()
        }
        made.append(
            plots.frontier(
                img / "gateway_lane2_frontier.png",
                "Lane 2: throughput frontier (wrk closed loop, rounds)",
                series2,
                BOUNDS,
            )
        )
    if l3 is not None:
        lat = l3["latency"]["rounds_data"]
        made.append(
            plots.cdf_from_samples(
                img / "gateway_lane3_ttft_cdf.png",
                "Lane 3: time to first content delta",
                {n: [v for x in rs for v in x["ttft"]] for n, rs in lat.items()},
                "TTFT (ms)",
            )
        )
        made.append(
            plots.cdf_from_samples(
                img / "gateway_lane3_gap_cdf.png",
                "Lane 3: inter-chunk gap (20 ms pacing)",
                {n: [v for x in rs for v in x["gaps"]] for n, rs in lat.items()},
                "gap (ms)",
                log=False,
            )
        )
    return [p for p in made if p is not None]


# -- the whole --------------------------------------------------------------------------------


def _serial(o: Any) -> Any:
    if isinstance(o, wrk.Result):
        d = asdict(o)
        d["pct"] = {str(k): v for k, v in o.pct.items()}
        return d
    return str(o)


def run(
    full: bool = False,
    lanes: Sequence[int] = (1, 2, 3),
    names: Sequence[str] = ("lunar", "litellm"),
    img: Path | None = IMG,
    json_out: Path | None = None,
    install: bool = True,
) -> str:
    """Run the lanes; return the markdown (what ``main`` prints)."""
    profile = PROFILES["full" if full else "quick"]
    if (why := wrk.check()) is not None and (1 in lanes or 2 in lanes):
        raise SystemExit(why)
    if "litellm" in names and install and targets.LITELLM.available() is not None:
        log("installing the LiteLLM proxy into bench/.venv-litellm (once)")
        litellm_env.install()
    skipped = []
    avail = []
    for n in names:
        why = targets.SPECS[n].available()
        if why is None:
            avail.append(n)
        else:
            skipped.append(f"{n}: {why}")
            log(f"skipping {n}: {why}")
    procs.pin_self(procs.LOAD_CORE)
    load_before = stats.loadavg()
    t_start = time.monotonic()
    commands: dict[str, str] = {}
    versions = {n: targets.SPECS[n].version() for n in avail}
    l1 = l2 = l3 = None
    with tempfile.TemporaryDirectory(prefix="lunar-bench-") as tmp:
        work = Path(tmp)
        if 1 in lanes or 2 in lanes:
            with procs.Procs(work) as ps:
                emu = procs.start_emulator(ps, chunks=NONSTREAM_CHUNKS)
                commands["emulator (lanes 1–2)"] = emu.proc.shown()
                versions["emulator"] = f"lunar.testing on {emu.loop}"
                ts = start_targets(ps, emu, avail)
                for t in ts[1:]:
                    commands[f"{t.name} (lanes 1–2)"] = t.command
                warm_up(ts, work)
                if 1 in lanes:
                    log("lane 1")
                    l1 = lane1(ts, work, profile["l1_runs"], profile["l1_seconds"])
                if 2 in lanes:
                    log("lane 2")
                    l2 = lane2(
                        ts, work, profile["l2_rounds"], profile["l2_seconds"], profile["l2_steps"]
                    )
        if 3 in lanes:
            with procs.Procs(work) as ps:
                up = procs.start_replay(ps, chunks=STREAM_CHUNKS, pacing_ms=PACING_MS)
                commands["replay upstream (lane 3)"] = up.proc.shown()
                ts = start_targets(ps, up, avail)
                for t in ts[1:]:
                    commands[f"{t.name} (lane 3)"] = t.command
                for t in ts:  # warm up
                    streams.run(t, connections=4, streams_per_connection=1, stagger_s=0.1)
                log("lane 3: latency")
                lat = lane3_latency(
                    ts,
                    profile["l3_rounds"],
                    profile["l3_connections"],
                    profile["l3_per_connection"],
                )
                log("lane 3: sustained")
                sus = lane3_sustained(
                    ts, profile["l3_steps"], profile["l3_seconds"], lat["reference"], up.proc.pid
                )
                l3 = {"latency": lat, "sustained": sus}
    elapsed = time.monotonic() - t_start
    load_after = stats.loadavg()

    sections = []
    met: dict[str, bool] = {}
    if l1 is not None:
        md, m = lane1_md(l1)
        sections += ["### Lane 1: added latency, non-streaming, concurrency 1", "", md, ""]
        met.update(m)
    if l2 is not None:
        md, m = lane2_md(l2)
        sections += ["### Lane 2: throughput frontier", "", md, ""]
        met.update(m)
    if l3 is not None:
        md, m = lane3_md(l3["latency"], l3["sustained"])
        sections += ["### Lane 3: streams", "", md, ""]
        met.update(m)
    made = plot_all(img, l1, l2, l3) if img is not None else []

    head = [
        f"Machine: {procs.machine()}. Load average (1, 5, 15 min) {load_before} before, "
        f"{load_after} after; {elapsed:.0f} s in all ({'full' if full else 'quick'} profile).",
        "Pinning: "
        + (
            "gateway on core 0; upstream, wrk and the stream client on core 1 (`taskset`)"
            + ("; lane 1 also with each gateway moved to core 1 (shared placement)." if l1 else ".")
            if procs.can_pin()
            else "none (one core or no taskset)."
        ),
        f"Versions: {'; '.join(f'{k}: {v}' for k, v in versions.items())}; {procs.wrk_version()}; "
        f"stream client on {streams.client_loop()}.",
        "",
        "Processes (the command behind every figure; ports and temp paths vary per run):",
        "",
        *[f"- {k}: `{v}`" for k, v in commands.items()],
        "- load: `taskset -c 1 wrk -t1 -cN -dTs --timeout=5s -s <POST script> URL` (lanes 1–2); "
        "the asyncio stream client in bench/gateway/streams.py (lane 3).",
    ]
    if skipped:
        head += ["", "Not measured: " + "; ".join(skipped)]
    if met:
        summary = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items())
        head += ["", f"Targets: {summary}."]
    if made:
        head += ["", "Plots: " + ", ".join(f"![{p.stem}]({stats.doc_link(p)})" for p in made)]
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {
                    "lane1": l1,
                    "lane2": l2,
                    "lane3": l3,
                    "versions": versions,
                    "commands": commands,
                    "met": met,
                },
                default=_serial,
                indent=1,
            )
        )
    return "\n".join([*head, "", *sections]).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the long profile")
    ap.add_argument("--lanes", default="1,2,3", help="which lanes (default 1,2,3)")
    ap.add_argument(
        "--targets",
        default="lunar,litellm,asgi-relay,relay",
        help="gateways beside direct (known: lunar, litellm, asgi-relay, relay, granian-relay)",
    )
    ap.add_argument(
        "--python",
        metavar="PATH",
        help="also run the gateway under this interpreter (a venv's python with Lunar "
        "installed); plots then only with --img (not over docs/img)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results")
    ap.add_argument("--img", type=Path, default=None, help="PNG folder (default docs/img)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--no-install",
        action="store_true",
        help="do not install the LiteLLM proxy (skip it when missing)",
    )
    args = ap.parse_args()
    lanes = [int(x) for x in args.lanes.split(",") if x.strip()]
    names = [x.strip() for x in args.targets.split(",") if x.strip()]
    if args.python:
        alt = targets.lunar_on(args.python)
        targets.SPECS[alt.name] = alt
        names.append(alt.name)
    for n in names:
        if n not in targets.SPECS:
            ap.error(f"unknown target {n!r} (known: {', '.join(targets.SPECS)})")
    print(
        run(
            args.full,
            lanes,
            names,
            None if args.no_plots or (args.python and args.img is None) else args.img or IMG,
            args.json,
            not args.no_install,
        ),
        end="",
    )


if __name__ == "__main__":
    main()
