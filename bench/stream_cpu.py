"""The gateway's CPU for N paced streams, working tree against git revisions, in one run.

    python bench/stream_cpu.py --against REV [--against REV2] [--streams 250] [--rounds 3]
                               [--burst 1]

Lane 3's sustained shape (bench_gateway.py): N connections stream back to back for
``--seconds``, 64 deltas at 20 ms pacing from the replay upstream, the gateway pinned to its
core and the load to the other (``--burst N``: the upstream writes N events at a time, every
N × 20 ms, as real providers often do). For each revision a fresh ``lunar serve`` runs from a
temporary worktree (``PYTHONPATH``); the revisions alternate within every round, the order
reversed each round. Printed per revision: the gateway's CPU time over the wall time of the
step (100 % = its whole core), median (min–max) over rounds, and the streams completed and
stalled (a gap over 200 ms) in all.

What ``bench/instructions.py`` cannot see, this does: the socket writes, wake-ups and
uvicorn's share, which are most of a streamed event's cost. It is wall-clock work on a noisy
VM, hence the alternation and the ranges; read a difference only where the ranges do not
overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gateway import procs, streams, targets  # noqa: E402
from instructions import worktree  # noqa: E402

STALL_MS = 200.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", action="append", default=[], metavar="REV")
    ap.add_argument("--streams", type=int, default=250, help="concurrent streams")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--burst", type=int, default=1, help="events per upstream write")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        sources: dict[str, str | None] = {"working tree": None}
        for rev in args.against:
            sources[rev] = str(stack.enter_context(worktree(rev)))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lunar-cpu-")))
        ps = stack.enter_context(procs.Procs(work))
        upstream = procs.start_replay(ps, chunks=64, pacing_ms=20, burst=args.burst)
        if procs.can_pin():
            procs.pin_self(procs.LOAD_CORE)
        cpu: dict[str, list[float]] = {name: [] for name in sources}
        done: dict[str, list[int]] = {name: [0, 0, 0] for name in sources}  # ok, all, stalled
        for rnd in range(args.rounds):
            order = list(sources) if rnd % 2 == 0 else list(reversed(sources))
            for name in order:
                src = sources[name]
                if src is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = src
                gateway = targets.start(targets.LUNAR, ps, upstream)
                proc = gateway.proc
                assert proc is not None
                t0, c0 = time.perf_counter(), procs.cpu_seconds(proc.pid)
                raws = streams.run(gateway, connections=args.streams, seconds=args.seconds)
                c1, t1 = procs.cpu_seconds(proc.pid), time.perf_counter()
                ps.stop(proc)
                decoded = [streams.decode(raw) for raw in raws]
                stalled = sum(1 for d in decoded if d.gaps_ms and max(d.gaps_ms) > STALL_MS)
                share = (c1 - c0) / (t1 - t0)
                cpu[name].append(share)
                counts = done[name]
                counts[0] += sum(1 for d in decoded if d.ok)
                counts[1] += len(decoded)
                counts[2] += stalled
                print(f"round {rnd + 1}: {name}: {100 * share:.1f} %", file=sys.stderr)
    print(f"    python bench/stream_cpu.py {' '.join(sys.argv[1:])}\n")
    shape = f"{args.burst} events per upstream write, " if args.burst > 1 else ""
    print(
        f"{args.streams} concurrent streams, {shape}{args.seconds:g} s per step, "
        f"{args.rounds} rounds"
    )
    print("\n| gateway | CPU, median (min–max) | streams ok | stalled |")
    print("| --- | --- | --- | --- |")
    for name, shares in cpu.items():
        ok, total, stalled = done[name]
        spread = f"{100 * min(shares):.1f}–{100 * max(shares):.1f}"
        print(
            f"| {name} | {100 * statistics.median(shares):.1f} % ({spread}) "
            f"| {ok:,}/{total:,} | {stalled:,} |"
        )


if __name__ == "__main__":
    main()
