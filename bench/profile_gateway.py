"""Where the gateway's CPU goes: py-spy on ``lunar serve`` under a lane's load.

    python bench/profile_gateway.py chat [--connections 1] [--seconds 6] [--top 30]
    python bench/profile_gateway.py streams [--connections 250] [--seconds 6] [--top 30]

``chat`` is lane 1/2's load (wrk, non-streamed, against the emulator); ``streams`` is lane 3's
(64 deltas at 20 ms pacing from the replay upstream, N concurrent streams). The gateway is
pinned to core 0 and the load to core 1, as in bench_gateway.py. Prints the functions with the
most samples on the gateway's event-loop thread, by own time and inclusive time (idle
threads such as the ledger's writer waiting for rows are left out). Needs py-spy (in the
``dev`` extra) and, for ``chat``, wrk.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway import procs, streams, targets, wrk

IDLE_THREADS = ("threading.py", "concurrent/futures/thread.py")


def top(raw: Path, k: int, within: str | None = None) -> str:
    """The functions with the most samples, own and inclusive; only stacks through a frame
    containing ``within`` when given."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or any(t in stack for t in IDLE_THREADS):
            continue
        if within is not None and within not in stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    out = [f"{total} samples on the event-loop thread", "", "own time:"]
    out += [f"{100 * n / total:5.1f} %  {f}" for f, n in own.most_common(k)]
    out += ["", "inclusive:"]
    out += [f"{100 * n / total:5.1f} %  {f}" for f, n in inclusive.most_common(k)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("load", choices=["chat", "streams"])
    ap.add_argument("--connections", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("needs py-spy: pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="lunar-profile-"))
    raw = work / "samples.txt"
    with procs.Procs(work) as ps:
        if args.load == "streams":
            upstream = procs.start_replay(ps, chunks=64, pacing_ms=20)
        else:
            upstream = procs.start_emulator(ps, chunks=16)
        gateway = targets.start(targets.LUNAR, ps, upstream)
        record = ["record", "-p", str(gateway.pid), "-d", f"{args.seconds:g}", "-r", "250"]
        recorder = subprocess.Popen(
            [spy, *record, "-f", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if args.load == "streams":
            if procs.can_pin():
                procs.pin_self(procs.LOAD_CORE)
            n = args.connections or 250
            done = streams.run(gateway, connections=n, seconds=args.seconds + 1, stagger_s=1.3)
            print(f"{len(done)} streams over {n} connections", file=sys.stderr)
        else:
            n = args.connections or 1
            script = wrk.script(gateway, work)
            cmd = ["wrk", "-t1", f"-c{n}", f"-d{args.seconds + 1:g}s", "-s", str(script)]
            subprocess.run(
                procs.pinned([*cmd, gateway.url], procs.LOAD_CORE),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        recorder.wait()
    print(top(raw, args.top))


if __name__ == "__main__":
    main()
