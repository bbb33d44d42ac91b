"""A paced upstream for thousands of concurrent streams: the emulator's bytes, replayed.

    python bench/gateway/upstream.py --port N [--chunks 64] [--pacing-ms 20] [--burst 1]

The emulator (``python -m lunar.testing --pacing-ms``) paces each stream with its own
``asyncio.sleep`` per event: at 1,000 streams × 50 events/s that costs the load core more than
it has, and the upstream, not the gateway, would set the gaps. This server renders one reply
with the emulator at start (``lunar.testing.MockServer``: the same JSON, the same SSE events,
with usage), then replays those bytes: event *k* of a stream is due *k* × pacing after its
head, and one timer wheel (1 ms slots) writes every due event, so an event costs a list append
and a ``transport.write``. Same wire, same pacing rule as the emulator (first event at once,
then one every ``pacing``); ids and ``created`` are those of the rendered reply.

``--burst N`` writes N events at a time, a write every N × pacing (the same rate of events,
in clumps, as real providers often send them).

Serves ``POST /v1/chat/completions`` (a stream when the body asks ``"stream": true``, else the
JSON reply) and ``GET /health``, HTTP/1.1 keep-alive, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import signal
from typing import Any

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_CL = re.compile(rb"content-length:\s*(\d+)", re.I)


def render(chunks: int) -> tuple[list[bytes], bytes]:
    """(SSE events, JSON reply) as the emulator renders them for a chat request."""
    from lunar.testing import MockServer, Reply

    msgs = [{"role": "user", "content": "Write a long story."}]
    with MockServer() as mock:
        mock.default = Reply(chunks=chunks)
        conn = http.client.HTTPConnection("127.0.0.1", mock.port, timeout=10)
        body = {
            "model": "gpt-4o-mini",
            "messages": msgs,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        conn.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"}
        )
        sse = conn.getresponse().read()
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({"model": "gpt-4o-mini", "messages": msgs}),
            {"content-type": "application/json"},
        )
        reply = conn.getresponse().read()
        conn.close()
    events = [e + b"\n\n" for e in sse.split(b"\n\n") if e.strip()]
    return events, reply


class Replay:
    def __init__(self, events: list[bytes], reply: bytes, pacing: float, burst: int = 1) -> None:
        frames = [f"{len(e):x}\r\n".encode() + e + b"\r\n" for e in events]
        frames[-1] += b"0\r\n\r\n"
        self.frames = [b"".join(frames[i : i + burst]) for i in range(0, len(frames), burst)]
        self.whole = b"".join(self.frames)
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        self.json = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(reply)}\r\n\r\n".encode()
            + reply
        )
        self.pacing = pacing * burst
        self.slots: dict[int, list[tuple[_Conn, int]]] = {}
        self.next_slot: int | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.ticking = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.t0 = 0.0

    def now(self) -> float:
        assert self.loop is not None
        return self.loop.time()

    def _slot(self, at: float) -> int:
        return int((at - self.t0) * 1000.0) + 1  # ceil-ish: never early

    def schedule(self, conn: _Conn, k: int, at: float) -> None:
        s = self._slot(at)
        slot = self.slots.get(s)
        if slot is None:
            self.slots[s] = [(conn, k)]
        else:
            slot.append((conn, k))
        if not self.ticking and (self.next_slot is None or s < self.next_slot):
            self._arm(s)

    def _arm(self, s: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.next_slot = s
        assert self.loop is not None
        self.timer = self.loop.call_at(self.t0 + s / 1000.0, self.tick)

    def tick(self) -> None:
        self.timer = None
        self.next_slot = None
        self.ticking = True
        # timers may fire up to a slot early (libuv has 1 ms resolution): take that slot too
        now_slot = self._slot(self.now()) + 1
        try:
            for s in sorted(x for x in self.slots if x <= now_slot):
                for conn, k in self.slots.pop(s):
                    conn.emit(k)
        finally:
            self.ticking = False
        if self.slots:
            self._arm(min(self.slots))


class _Conn(asyncio.Protocol):
    def __init__(self, replay: Replay) -> None:
        self.r = replay
        self.buf = bytearray()
        self.busy = False
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        buf = self.buf
        i = buf.find(b"\r\n\r\n")
        if i < 0:
            return
        head = bytes(buf[:i])
        m = _CL.search(head)
        n = int(m.group(1)) if m else 0
        if len(buf) < i + 4 + n:
            return
        body = bytes(buf[i + 4 : i + 4 + n])
        del buf[: i + 4 + n]
        assert self.transport is not None
        line = head.split(b"\r\n", 1)[0]
        if line.startswith(b"GET /health"):
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
                b'{"status":"ok"}'
            )
        elif not line.startswith(b"POST /v1/chat/completions"):
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        elif _STREAM.search(body) is None:
            self.transport.write(self.r.json)
        elif self.r.pacing <= 0:
            self.transport.write(self.r.stream_head + self.r.whole)
        else:
            self.busy = True
            self.started = self.r.now()
            self.transport.write(self.r.stream_head + self.r.frames[0])
            self.r.schedule(self, 1, self.started + self.r.pacing)
            return
        if buf:
            self._next()

    def emit(self, k: int) -> None:
        if self.closed:
            return
        assert self.transport is not None
        frames = self.r.frames
        self.transport.write(frames[k])
        if k + 1 < len(frames):
            self.r.schedule(self, k + 1, self.started + (k + 1) * self.r.pacing)
        else:
            self.busy = False
            if self.buf:
                self._next()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--pacing-ms", type=float, default=20.0)
    ap.add_argument("--burst", type=int, default=1, help="events per write")
    args = ap.parse_args()
    events, reply = render(args.chunks)
    replay = Replay(events, reply, args.pacing_ms / 1000.0, max(1, args.burst))
    try:
        import uvloop

        loop: Any = uvloop.new_event_loop()
        kind = "uvloop"
    except ImportError:
        loop = asyncio.new_event_loop()
        kind = "asyncio"
    asyncio.set_event_loop(loop)
    replay.loop = loop
    replay.t0 = loop.time()
    server = loop.run_until_complete(
        loop.create_server(lambda: _Conn(replay), "127.0.0.1", args.port, backlog=4096)
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, loop.stop)
    print(
        f"replay upstream on http://127.0.0.1:{args.port}/v1 ({len(events)} events, "
        f"{args.pacing_ms:g} ms pacing, {args.burst} per write, {kind})",
        flush=True,
    )
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()


if __name__ == "__main__":
    main()
