"""The stream client: raw asyncio sockets, one timestamp per socket read, parsed afterwards.

The hot path (``data_received``) only appends the bytes and ``(perf_counter(), length)``; the
HTTP chunked framing, the SSE events and their JSON are decoded after the run, so the client
costs the load core as little as possible while it measures. Each content delta's arrival time
is the read that completed it.

Two shapes:
- ``latency``: K streams over C connections (few), for TTFT and inter-chunk gaps;
- ``sustained``: N connections each streaming back to back for T seconds (N concurrent
  streams), for loss (content differs from the reference, no ``[DONE]``, a non-200, a broken
  connection) and stalls (a gap > ``stall_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .targets import CHAT_PATH, MODEL, Target

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def request_bytes(target: Target, host: str) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a long story."}],
            "stream": True,
        },
        separators=(",", ":"),
    ).encode()
    head = [
        f"POST {CHAT_PATH} HTTP/1.1",
        f"Host: {host}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in target.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class Raw:
    """One stream as received: bytes and read marks."""

    sent: float
    buf: bytearray = field(default_factory=bytearray)
    marks: list[tuple[float, int]] = field(default_factory=list)
    error: str | None = None


@dataclass
class Stream:
    ok: bool
    status: int
    ttft_ms: float | None
    gaps_ms: list[float]
    content: str
    deltas: int
    done: bool
    error: str | None


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.cur: Raw | None = None
        self.header_end = -1
        self.chunked = False
        self.length = -1
        self.close_after = False
        self.waiter: asyncio.Future[Raw] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, req: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Raw]:
        self.cur = Raw(time.perf_counter())
        self.header_end = -1
        self.chunked = False
        self.length = -1
        self.waiter = loop.create_future()
        assert self.transport is not None
        self.transport.write(req)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        cur = self.cur
        if cur is None:
            return
        now = time.perf_counter()
        buf = cur.buf
        buf += data
        cur.marks.append((now, len(buf)))
        if self.header_end < 0:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                return
            self.header_end = i + 4
            head = bytes(buf[:i]).lower()
            self.chunked = b"transfer-encoding: chunked" in head
            m = re.search(rb"content-length:\s*(\d+)", head)
            self.length = int(m.group(1)) if m else -1
            self.close_after = b"connection: close" in head
        if self.chunked:
            if buf.endswith(b"\r\n0\r\n\r\n") or (
                len(buf) - self.header_end == 5 and buf.endswith(b"0\r\n\r\n")
            ):
                self._complete()
        elif self.length >= 0 and len(buf) - self.header_end >= self.length:
            self._complete()

    def _complete(self, error: str | None = None) -> None:
        cur, w = self.cur, self.waiter
        self.cur = self.waiter = None
        if cur is not None and error:
            cur.error = error
        if w is not None and not w.done() and cur is not None:
            w.set_result(cur)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.cur is not None and not self.chunked and self.length < 0 and self.header_end >= 0:
            self._complete()  # read-until-close body
        else:
            self._complete(f"connection lost ({exc or 'closed'})")


def decode(raw: Raw) -> Stream:
    """HTTP response → content deltas with their arrival times (after the run)."""
    buf = bytes(raw.buf)
    if raw.error and not buf:
        return Stream(False, 0, None, [], "", 0, False, raw.error)
    he = buf.find(b"\r\n\r\n")
    if he < 0:
        return Stream(False, 0, None, [], "", 0, False, raw.error or "no response head")
    head = buf[:he].decode("latin-1")
    try:
        status = int(head.split(" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    pos = he + 4
    # decoded body and, per decoded segment, (decoded start, raw start)
    segs: list[tuple[int, int]] = []
    parts: list[bytes] = []
    n = 0
    if "transfer-encoding: chunked" in head.lower():
        while pos < len(buf):
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";")[0] or b"0", 16)
            if size == 0:
                break
            start = eol + 2
            segs.append((n, start))
            parts.append(buf[start : start + size])
            n += size
            pos = start + size + 2
    else:
        segs.append((0, pos))
        parts.append(buf[pos:])
    body = b"".join(parts)
    marks = raw.marks

    def arrival(decoded_end: int) -> float:
        # raw offset of the decoded byte before decoded_end
        d = decoded_end - 1
        lo, hi = 0, len(segs) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if segs[mid][0] <= d:
                lo = mid
            else:
                hi = mid - 1
        r_end = segs[lo][1] + (d - segs[lo][0]) + 1
        mlo, mhi = 0, len(marks) - 1
        while mlo < mhi:
            mid = (mlo + mhi) // 2
            if marks[mid][1] >= r_end:
                mhi = mid
            else:
                mlo = mid + 1
        return marks[mlo][0]

    times: list[float] = []
    content: list[str] = []
    done = False
    start = 0
    for m in _EVENT_END.finditer(body):
        event = body[start : m.start()]
        end = m.end()
        start = end
        data = b"\n".join(
            line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")
        )
        if not data:
            continue
        if data == b"[DONE]":
            done = True
            continue
        try:
            obj: Any = json.loads(data)
            text = obj["choices"][0]["delta"].get("content") if obj.get("choices") else None
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            text = None
        if text:
            content.append(text)
            times.append(arrival(end))
    ttft = (times[0] - raw.sent) * 1000 if times else None
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    ok = status == 200 and done and raw.error is None
    return Stream(ok, status, ttft, gaps, "".join(content), len(times), done, raw.error)


async def _open(port: int) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Conn, "127.0.0.1", port)
    return proto


async def _worker(
    target: Target,
    req: bytes,
    port: int,
    count: int | None,
    deadline: float | None,
    delay: float,
    per_stream_timeout: float,
    out: list[Raw],
) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(delay)
    conn: _Conn | None = None
    done = 0
    while (count is None or done < count) and (deadline is None or time.perf_counter() < deadline):
        if conn is None or conn.lost or conn.close_after:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            try:
                conn = await _open(port)
            except OSError as e:
                out.append(Raw(time.perf_counter(), error=f"connect: {e}"))
                done += 1
                await asyncio.sleep(0.05)
                conn = None
                continue
        fut = conn.send(req, loop)
        try:
            raw = await asyncio.wait_for(fut, per_stream_timeout)
        except asyncio.TimeoutError:
            raw = conn.cur or Raw(time.perf_counter())
            raw.error = f"timeout after {per_stream_timeout:g}s"
            assert conn.transport is not None
            conn.transport.abort()
            conn = None
        out.append(raw)
        done += 1
    if conn is not None and conn.transport is not None:
        conn.transport.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def client_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(
    target: Target,
    *,
    connections: int,
    streams_per_connection: int | None = None,
    seconds: float | None = None,
    stagger_s: float = 1.3,
    per_stream_timeout: float = 30.0,
    out: list[Raw] | None = None,
) -> list[Raw]:
    """Stream over ``connections`` connections: each does ``streams_per_connection`` streams
    (latency shape) or streams back to back for ``seconds`` (sustained shape); starts spread
    over ``stagger_s``. Bounded: every stream times out, and so does the whole run."""
    host_port = target.base.split("://", 1)[1]
    port = int(host_port.rsplit(":", 1)[1])
    req = request_bytes(target, host_port)
    if out is None:
        out = []  # streams are appended as they finish (a caller may watch its length)

    async def main() -> None:
        deadline = time.perf_counter() + stagger_s + seconds if seconds is not None else None
        tasks = [
            asyncio.ensure_future(
                _worker(
                    target,
                    req,
                    port,
                    streams_per_connection,
                    deadline,
                    stagger_s * i / max(1, connections),
                    per_stream_timeout,
                    out,
                )
            )
            for i in range(connections)
        ]
        budget = stagger_s + per_stream_timeout + 5
        if seconds is not None:
            budget += seconds
        else:
            budget += per_stream_timeout * (streams_per_connection or 1)
        _, pending = await asyncio.wait(tasks, timeout=budget)
        for t in pending:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)

    loop = _new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return out
