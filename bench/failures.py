"""What failed requests leave behind in the gateway: reference cycles and memory.

    python bench/failures.py [--requests 800]

The gateway's ASGI app runs in-process (as in bench/instructions.py) in front of the
emulator, which fails each request in one way (an upstream 400; 500s until the retries are
spent, whole and streamed; 500s hidden by a retry or a fallback; a stream cut or ending in
an error event after its first chunks; a client gone mid-stream; a provider without a key)
or serves it. For each kind:

- the objects one request leaves that only the cyclic GC can free (``gc.DEBUG_SAVEALL``;
  the process's all, and Lunar's own: its errors, plans, traces, watches, connections and
  frames of its code, as the tests count them with ``tests/conftest.py``'s
  ``cyclic_garbage``). The emulator runs in the same process on asyncio's own loop, whose
  socket transports make cycles of their own; ``lunar serve`` runs uvloop;
- Lunar's live allocations after a warm-up of a quarter of ``--requests``, then after the
  rest: their growth, and per request. tracemalloc keeps 25 frames a block and counts the
  blocks with a frame of Lunar's code in them (what asyncio makes for Lunar too), not the
  emulator's. Approximate both ways: an object from a free list keeps the site that
  first made it.

Each request's status is checked against the kind's (a setup that no longer produces the
failure would otherwise be measured as one that does).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.conftest import EMULATOR_DIR, LUNAR_DIR, cyclic_garbage, lunar_own  # noqa: E402

import instructions  # noqa: E402
from lunar.server import create_app, load_config  # noqa: E402
from lunar.testing import MockServer, Reply  # noqa: E402

E500 = Reply(status=500, retry_after=0)
STREAM = {"stream": True}
# kind: (what the upstream does, the request's fields, the client leaves after N writes,
# the status the client gets)
KINDS: dict[str, tuple[list[Reply], dict[str, Any], int | None, int]] = {
    "served": ([Reply()], {}, None, 200),
    "served, streamed": ([Reply()], STREAM, None, 200),
    "an upstream 400": ([Reply(status=400)], {}, None, 400),
    "500s until the retries are spent": ([E500] * 3, {}, None, 500),
    "the same, streamed": ([E500] * 3, STREAM, None, 500),
    "a 500, then a retry that serves": ([E500], {}, None, 200),
    "500s, then a fallback that serves, streamed": (
        [E500] * 3,
        {**STREAM, "fallbacks": ["gpt-4o"]},
        None,
        200,
    ),
    "a fallback that does not resolve, the model serving": (
        [Reply()],
        {"fallbacks": ["typo"]},
        None,
        200,
    ),
    "a stream cut after its first chunks": ([Reply(chunks=6, cut_after=2)], STREAM, None, 200),
    "an error event after the first chunks": ([Reply(chunks=6, error_after=2)], STREAM, None, 200),
    "a client gone mid-stream": ([Reply(chunks=40, pacing=0.005)], STREAM, 2, 200),
    "a provider without a key": ([], {"model": "claude-3-haiku"}, None, 401),
}
LUNAR_CODE = [
    tracemalloc.Filter(True, LUNAR_DIR + "*", all_frames=True),
    tracemalloc.Filter(False, EMULATOR_DIR + "*", all_frames=True),
]


def _lunar_bytes() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces(LUNAR_CODE)
    return sum(stat.size for stat in snapshot.statistics("filename"))


async def _measure(kind: str, requests: int) -> tuple[int, int, int]:
    """One kind, with a gateway and an emulator of its own (nothing left from another kind
    lands in its counts): the process's cyclic garbage from one request, Lunar's part of
    it, and the growth of Lunar's allocations over ``requests`` after a warm-up."""
    replies, fields, leave_after, status = KINDS[kind]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    data = json.dumps({**body, **fields}).encode()
    auth = (b"authorization", b"Bearer " + instructions.MASTER.encode())
    scope = instructions.chat_scope([(b"content-type", b"application/json"), auth])
    with MockServer() as upstream, tempfile.TemporaryDirectory() as work:
        env = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": upstream.base_url}
        env["LUNAR_MASTER_KEY"] = instructions.MASTER
        app = create_app(load_config(None, env, db=f"{work}/ledger.db"))
        # Every request meets its failure: a deployment that keeps failing would open its
        # breaker and go to the back of the line, and a fallback would hide nothing.
        app.router.health.policy.trip_after = 10**9
        await app.startup()

        async def run(n: int) -> None:
            for _ in range(n):
                upstream.reset()  # (also what the emulator keeps of each request)
                upstream.enqueue(*replies, model="gpt-4o-mini")
                got = await instructions._one(app, scope, data, leave_after)
                if got != status:
                    raise RuntimeError(f"{kind}: answered {got}, not {status}")
            await asyncio.sleep(0.1)  # watches due, closed connections told they are lost

        try:
            await run(3)  # warm
            with cyclic_garbage(only_lunar=False) as everything:
                await run(1)
            left, lunars = len(everything), sum(map(lunar_own, everything))
            del everything
            tracemalloc.start(25)
            await run(requests // 4)
            gc.collect()
            before = _lunar_bytes()
            await run(requests - requests // 4)
            gc.collect()
            grown = _lunar_bytes() - before
            tracemalloc.stop()
        finally:
            await app.shutdown()
    return left, lunars, grown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=800, help="requests of each kind")
    args = ap.parse_args()
    if args.requests < 200:
        ap.error("--requests must be at least 200 (a quarter warms up, health's history too)")
    rows = [(kind, *asyncio.run(_measure(kind, args.requests))) for kind in KINDS]
    rest = args.requests - args.requests // 4
    print(f"    python bench/failures.py --requests {args.requests}\n")
    print(
        "| request | objects left to the cyclic GC | of them Lunar's | Lunar's allocations, "
        f"growth over {rest} requests | per request |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, everything, lunars, grown in rows:
        growth = f"{grown / 1024:+.1f} kB | {grown / rest:+.0f} B"
        print(f"| {kind} | {everything} | {lunars} | {growth} |")


if __name__ == "__main__":
    main()
