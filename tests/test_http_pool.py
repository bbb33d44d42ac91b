"""Lunar's own upstream HTTP/1.1 pool (``lunar._http``), against a scripted raw server on
127.0.0.1: keep-alive, streaming, framing, faults, the connection ceiling, timeouts, TLS.

The server reads real requests off real sockets and answers each with a scripted coroutine,
so every byte boundary, pause and cut is the test's choice.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import shutil
import ssl
import subprocess
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lunar._http import AsyncPool, Response, Timeouts, TransportError, TransportTimeout

Answer = Callable[[asyncio.StreamWriter], Awaitable[bool]]  # True: keep the connection open


def ok(body: bytes = b"hello", extra: bytes = b"") -> Answer:
    async def answer(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body))
        await w.drain()
        return True

    return answer


def chunked(pieces: list[bytes]) -> bytes:
    out = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    for p in pieces:
        out += b"%x\r\n%s\r\n" % (len(p), p)
    return out + b"0\r\n\r\n"


class Server:
    """Answers the n-th request with ``answers[n]`` (the last one repeats)."""

    def __init__(self, answers: list[Answer], tls: ssl.SSLContext | None = None) -> None:
        self.answers = answers
        self.tls = tls
        self.requests: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.closed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/v1/x"

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                try:
                    head = await r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await r.readexactly(length))
                answer = self.answers[min(len(self.requests) - 1, len(self.answers) - 1)]
                if not await answer(w):
                    return
        finally:
            self.open -= 1
            w.close()
            self.closed.set()


async def read_until(
    resp: Response, error: type[Exception], match: str | None = None
) -> list[bytes]:
    """The body pieces that arrived before the read raised ``error``."""
    got = []
    with pytest.raises(error, match=match):
        async for d in resp.aiter_bytes():
            got.append(d)
    return got


def pool(**kw: object) -> AsyncPool:
    kw.setdefault("timeout", 5.0)
    return AsyncPool(**kw)  # type: ignore[arg-type]


async def test_keep_alive_reuses_one_connection():
    async with Server([ok()]) as srv:
        p = pool(headers={"user-agent": "t"})
        for _ in range(3):
            resp = await p.send("POST", srv.url, {"x-a": "1"}, b'{"a":1}')
            assert (resp.status_code, resp.content) == (200, b"hello")
        assert srv.connections == 1
        assert (p.connections, p.idle_connections, p.busy_connections) == (1, 1, 0)
        first = srv.requests[0]
        assert first.startswith(b"POST /v1/x HTTP/1.1\r\nhost: 127.0.0.1:")
        assert b"user-agent: t\r\n" in first and b"x-a: 1\r\n" in first
        assert first.endswith(b'content-length: 7\r\n\r\n{"a":1}')
        await p.aclose()
        await asyncio.wait_for(srv.closed.wait(), 2)  # idle connections are closed


async def test_a_stream_yields_bytes_as_they_arrive():
    release = asyncio.Event()

    async def answer(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await release.wait()
        w.write(b"6\r\nsecond\r\n0\r\n\r\n")
        return True

    async with Server([answer]) as srv:
        p = pool()
        resp = await p.send("POST", srv.url, {}, stream=True)
        it = resp.aiter_bytes()
        assert await it.__anext__() == b"first"  # before the server sends the rest
        release.set()
        assert [d async for d in it] == [b"second"]
        assert p.idle_connections == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), min_size=0, max_size=8),
    cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=12),
)
def test_any_split_of_a_chunked_body_reads_back_whole(pieces, cuts):
    wire = chunked(pieces)

    async def answer(w: asyncio.StreamWriter) -> bool:
        at = 0
        for c in sorted(set(cuts)):
            if at < c < len(wire):
                w.write(wire[at:c])
                await w.drain()
                await asyncio.sleep(0)
                at = c
        w.write(wire[at:])
        return True

    async def main() -> None:
        async with Server([answer]) as srv:
            p = pool()
            resp = await p.send("GET", srv.url, {}, stream=True)
            assert b"".join([d async for d in resp.aiter_bytes()]) == b"".join(pieces)
            again = await p.send("GET", srv.url, {})  # the connection is still in step
            assert again.content == b"".join(pieces)
            assert srv.connections == 1
            await p.aclose()

    asyncio.run(main())


async def test_a_kept_alive_connection_the_server_dropped_is_retried_once():
    async def drop(w: asyncio.StreamWriter) -> bool:
        return False  # reads the request, closes without a byte

    async with Server([ok(), drop, ok(b"again")]) as srv:
        p = pool()
        await p.send("POST", srv.url, {})
        resp = await p.send("POST", srv.url, {})
        assert resp.content == b"again"
        assert (srv.connections, len(srv.requests)) == (2, 3)


async def test_a_fresh_connection_closed_without_an_answer_is_an_error():
    async def drop(w: asyncio.StreamWriter) -> bool:
        return False

    async with Server([drop]) as srv:
        p = pool()
        with pytest.raises(TransportError, match="closed the connection"):
            await p.send("POST", srv.url, {})
        assert len(srv.requests) == 1  # not sent twice
        assert p.connections == 0


async def test_silence_before_the_head_or_mid_body_is_a_timeout():
    async def stall_head(w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async def stall_body(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        await asyncio.sleep(5)
        return False

    async with Server([stall_head]) as srv:
        p = pool(timeout=0.2)
        with pytest.raises(TransportTimeout, match=r"No data from the server for 0\.2 s"):
            await p.send("POST", srv.url, {})
        assert p.connections == 0
    async with Server([stall_body]) as srv:
        p = pool(timeout=10)
        resp = await p.send("POST", srv.url, {}, stream=True, timeout=0.2)  # per request
        assert await read_until(resp, TransportTimeout) == [b"12345"]
        assert p.connections == 0


def paced(pieces: int, every: float, then_stall: bool) -> Answer:
    """A chunked body of ``pieces`` pieces ``every`` seconds apart, then the end or silence."""

    async def answer(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(pieces):
            await asyncio.sleep(every)
            w.write(b"1\r\n%d\r\n" % (i % 10))
            await w.drain()
        if then_stall:
            await asyncio.sleep(5)
            return False
        w.write(b"0\r\n\r\n")
        return True

    return answer


async def test_the_read_timeout_counts_silence_not_the_whole_stream():
    # Pieces 0.1 s apart for 0.6 s, under a 0.3 s timeout: each piece moves the deadline.
    async with Server([paced(6, 0.1, then_stall=False)]) as srv:
        p = pool()
        resp = await p.send("POST", srv.url, {}, stream=True, timeout=0.3)
        assert b"".join([d async for d in resp.aiter_bytes()]) == b"012345"
    # Two pieces, then silence: the timer armed at the start fires at 0.3 s while the reader
    # waits with its deadline at 0.5 s (the last piece came at 0.2 s); only its re-arming
    # for what is left can end that wait.
    async with Server([paced(2, 0.1, then_stall=True)]) as srv:
        p = pool()
        resp = await p.send("POST", srv.url, {}, stream=True, timeout=0.3)
        got = await asyncio.wait_for(read_until(resp, TransportTimeout, r"for 0\.3 s"), 3)
        assert b"".join(got) == b"01"


async def test_a_timer_that_fired_on_an_idle_connection_arms_again():
    async def stall(w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async with Server([ok(), stall]) as srv:
        p = pool(timeout=0.1)
        assert (await p.send("POST", srv.url, {})).content == b"hello"
        await asyncio.sleep(0.2)  # its timer fires with nobody waiting
        with pytest.raises(TransportTimeout, match=r"for 0\.1 s"):
            await asyncio.wait_for(p.send("POST", srv.url, {}), 3)


async def test_no_timeout_after_a_timed_wait_on_the_same_connection():
    async def late(w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.3)
        return await ok()(w)

    async with Server([ok(), late]) as srv:
        p = pool(timeout=None)
        first = await p.send("POST", srv.url, {}, timeout=0.1)  # arms a 0.1 s timer
        assert first.content == b"hello"
        assert (await p.send("POST", srv.url, {})).content == b"hello"  # 0.3 s, no limit
        assert srv.connections == 1


async def test_a_shorter_timeout_on_a_kept_alive_connection_is_kept():
    async def stall(w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    async with Server([ok(), stall]) as srv:
        p = pool(timeout=30)  # the first request arms the connection's timer 30 s out
        assert (await p.send("POST", srv.url, {})).content == b"hello"
        with pytest.raises(TransportTimeout, match=r"for 0\.2 s"):
            await asyncio.wait_for(p.send("POST", srv.url, {}, timeout=0.2), 3)


async def test_a_dropped_connection_is_freed_at_once():
    async def cut(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        await w.drain()
        await asyncio.sleep(0.05)
        return False

    async with Server([cut]) as srv:
        p = pool(timeout=30)  # its read timer is armed 30 s out when the server cuts
        resp = await p.send("POST", srv.url, {}, stream=True)
        conn = weakref.ref(resp._conn)  # type: ignore[arg-type]
        await read_until(resp, TransportError, "closed the connection")
        del resp
        await asyncio.sleep(0.05)  # the transport lets go of it once it has closed
        gc.collect()
        assert conn() is None  # no read-timeout timer holds it for its timeout


async def test_a_body_cut_short_raises_after_what_arrived_and_drops_the_connection():
    async def cut(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        await w.drain()
        return False

    async with Server([cut]) as srv:
        p = pool()
        resp = await p.send("POST", srv.url, {}, stream=True)
        got = await read_until(resp, TransportError, "closed the connection")
        assert got == [b"0123456789"]
        assert p.connections == 0


async def test_connection_close_and_http_1_0_are_not_reused():
    async def close_after(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi")
        return True

    async def old(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nhi")
        return True

    for answer in (close_after, old):
        async with Server([answer]) as srv:
            p = pool()
            for _ in range(2):
                assert (await p.send("GET", srv.url, {})).content == b"hi"
            assert srv.connections == 2
            assert p.connections == 0


async def test_gzip_bodies_are_decoded_and_headers_are_case_insensitive():
    body = gzip.compress(b'{"ok": true}' * 100)
    extra = b"Content-Encoding: gzip\r\nX-Rep: a\r\nx-rep: b\r\nRetry-After: 3\r\n"
    async with Server([ok(body, extra)]) as srv:
        resp = await pool().send("GET", srv.url, {})
        assert resp.content == b'{"ok": true}' * 100
        assert resp.headers["retry-after"] == resp.headers.get("Retry-After") == "3"
        assert "RETRY-AFTER" in resp.headers
        assert resp.headers["x-rep"] == "a, b"


async def test_an_answer_that_is_not_http_is_an_error():
    async def garbage(w: asyncio.StreamWriter) -> bool:
        w.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        return True

    async with Server([garbage]) as srv:
        p = pool()
        with pytest.raises(TransportError, match="Invalid HTTP response"):
            await p.send("GET", srv.url, {})
        assert p.connections == 0


async def test_bad_urls_and_header_injection_are_refused_before_sending():
    p = pool()
    with pytest.raises(TransportError, match="Unsupported URL"):
        await p.send("GET", "ftp://example.com/x", {})
    with pytest.raises(TransportError, match="Invalid port"):
        await p.send("GET", "http://127.0.0.1:99999/x", {})
    async with Server([ok()]) as srv:
        with pytest.raises(ValueError, match="may not contain a newline"):
            await p.send("GET", srv.url, {"x-a": "1\r\nx-evil: 1"})
        assert srv.requests == []
    with pytest.raises(TransportError, match="Could not connect"):
        await p.send("GET", "http://127.0.0.1:1/x", {})
    assert p.connections == 0


async def test_the_connection_ceiling_queues_callers_and_serves_them_all():
    async def slow(w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        return await ok(b"done")(w)

    async with Server([slow]) as srv:
        p = pool(max_connections=2)
        results = await asyncio.gather(*(p.send("GET", srv.url, {}) for _ in range(8)))
        assert [r.content for r in results] == [b"done"] * 8
        assert srv.most_open <= 2
        assert p.connections <= 2 and p.busy_connections == 0


async def test_waiting_for_a_free_connection_times_out_with_a_clear_error():
    async with Server([ok(b"x" * 10)]) as srv:
        p = pool(max_connections=1)
        held = await p.send("GET", srv.url, {}, stream=True)  # not read: holds the connection
        with pytest.raises(TransportTimeout, match=r"No free connection within 0\.2 s"):
            await p.send("GET", srv.url, {}, timeout=0.2)
        await held.aclose()
        assert (await p.send("GET", srv.url, {}, timeout=0.2)).content == b"x" * 10


async def test_the_pool_timeout_bounds_the_wait_for_a_free_connection_apart_from_reads():
    async with Server([ok(b"x" * 10)]) as srv:
        p = pool(timeout=30, max_connections=1, pool_timeout=0.2)
        held = await p.send("GET", srv.url, {}, stream=True)
        with pytest.raises(TransportTimeout, match=r"No free connection within 0\.2 s"):
            await p.send("GET", srv.url, {})
        per_request = Timeouts(read=30, connect=30, pool=0.1)
        with pytest.raises(TransportTimeout, match=r"No free connection within 0\.1 s"):
            await p.send("GET", srv.url, {}, timeout=per_request)
        await held.aclose()
        assert (await p.send("GET", srv.url, {}, timeout=per_request)).content == b"x" * 10


async def test_per_request_timeouts_replace_the_read_and_connect_timeouts():
    async def silent(w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(10)
        return False

    async with Server([silent]) as srv:
        p = pool(timeout=30, connect_timeout=30)
        with pytest.raises(TransportTimeout, match=r"No data from the server for 0\.2 s"):
            await p.send("GET", srv.url, {}, timeout=Timeouts(read=0.2, connect=30, pool=30))
        assert p.connections == 0

        loop = asyncio.get_running_loop()

        async def never_connects(*args: object, **kwargs: object) -> None:
            await asyncio.sleep(10)

        loop.create_connection = never_connects  # type: ignore[method-assign,assignment]
        try:
            with pytest.raises(TransportTimeout, match=r"Could not connect .* within 0\.2 s"):
                await p.send("GET", srv.url, {}, timeout=Timeouts(read=30, connect=0.2, pool=30))
        finally:
            del loop.create_connection  # type: ignore[method-assign]
        assert p.connections == 0


async def test_a_cancelled_reader_closes_its_connection():
    async def endless(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            w.write(b"1\r\nx\r\n")
            await w.drain()
            await asyncio.sleep(0.01)

    async with Server([endless]) as srv:
        p = pool()

        async def read() -> None:
            resp = await p.send("GET", srv.url, {}, stream=True)
            async for _ in resp.aiter_bytes():
                pass

        task = asyncio.ensure_future(read())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert p.connections == 0
        await asyncio.wait_for(srv.closed.wait(), 2)


async def test_idle_connections_expire():
    async with Server([ok()]) as srv:
        p = pool(keepalive_expiry=0.05)
        await p.send("GET", srv.url, {})
        await asyncio.sleep(0.15)
        await p.send("GET", srv.url, {})
        assert srv.connections == 2
        assert p.connections == 1


async def test_a_slow_reader_pushes_back_on_the_server():
    total = 32 * 1024 * 1024
    sent = 0

    async def flood(w: asyncio.StreamWriter) -> bool:
        nonlocal sent
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        piece = b"x" * 65536
        while sent < total:
            w.write(piece)
            await w.drain()
            sent += len(piece)
        return True

    async with Server([flood]) as srv:
        p = pool()
        resp = await p.send("GET", srv.url, {}, stream=True)
        it = resp.aiter_bytes()
        got = len(await it.__anext__())
        await asyncio.sleep(0.3)
        assert sent < total / 2  # the reader stopped reading, so the server had to wait
        async for d in it:
            got += len(d)
        assert got == total


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_verifies_the_certificate(self_signed):
    cert, key = self_signed
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    async with Server([ok(b"secret")], tls=server_ctx) as srv:
        trusted = ssl.create_default_context(cafile=str(cert))
        p = pool(ssl_context=trusted)
        assert (await p.send("GET", srv.url, {})).content == b"secret"
        assert (await p.send("GET", srv.url, {})).content == b"secret"
        assert srv.connections == 1
        with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
            await pool().send("GET", srv.url, {})  # default CAs do not know it


def test_a_pool_serves_successive_event_loops():
    """A client kept across two ``asyncio.run`` calls: the first loop's connections are
    dropped, not reused under the second."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    p = pool()
    try:
        for _ in range(2):
            assert asyncio.run(p.send("GET", url, {})).content == b"ok"
        assert p.connections == 1
    finally:
        server.shutdown()


async def test_a_request_header_replaces_the_pools_default_of_that_name():
    async with Server([ok()]) as srv:
        p = pool(headers={"User-Agent": "lunar", "x-keep": "1"})
        await p.send("GET", srv.url, {"user-agent": "mine"})
        head = srv.requests[0].lower()
        assert head.count(b"user-agent:") == 1 and b"user-agent: mine\r\n" in head
        assert b"x-keep: 1\r\n" in head


async def test_each_request_sends_its_own_headers_when_header_sets_alternate():
    """Header lines are remembered per set of headers: sets that alternate, or differ in
    one value, each go out as their own; a refused one is refused every time."""
    sets = [{"authorization": "Bearer a"}, {"authorization": "Bearer b"}, {}, {"x-b": "2"}]
    async with Server([ok()]) as srv:
        p = pool(headers={"user-agent": "lunar"})
        for headers in sets * 2:
            assert (await p.send("POST", srv.url, headers, b"{}")).content == b"hello"
        for _ in range(2):
            with pytest.raises(ValueError, match="may not contain a newline"):
                await p.send("GET", srv.url, {"x-a": "1\nx-evil: 1"})
        # Values that are not str are written as before, each as its own text, and one
        # that cannot be a key does not fail the request.
        for value in (1, True, 1.0, ["a"], 1):
            await p.send("POST", srv.url, {"x-n": value}, b"{}")  # type: ignore[dict-item]
    assert [r.split(b"x-n: ")[1].split(b"\r\n")[0] for r in srv.requests[8:]] == [
        b"1",
        b"True",
        b"1.0",
        b"['a']",
        b"1",
    ]
    del srv.requests[8:]
    assert len(srv.requests) == 8
    for headers, request in zip(sets * 2, srv.requests):
        lines = request.split(b"\r\n\r\n")[0].split(b"\r\n")[2:]  # after request line, host
        expected = [b"user-agent: lunar"] + [f"{k}: {v}".encode() for k, v in headers.items()]
        assert lines == [*expected, b"content-length: 2"]


async def test_a_pool_that_keeps_nothing_idle_closes_each_connection():
    async with Server([ok()]) as srv:
        p = pool(max_idle_per_origin=0)
        for _ in range(2):
            assert (await p.send("GET", srv.url, {})).content == b"hello"
        assert srv.connections == 2 and p.connections == 0


async def test_a_body_that_ends_with_the_connection_is_read_whole():
    """With neither content-length nor chunked framing, the body is what comes until the
    server closes (an HTTP/1.0 server's usual answer; RFC 9112 section 6.3): that close is
    the body's end, not a failure."""

    def until_close(head: bytes, pieces: list[bytes]) -> Answer:
        async def answer(w: asyncio.StreamWriter) -> bool:
            w.write(head)
            for piece in pieces:
                await asyncio.sleep(0.01)
                w.write(piece)
            await w.drain()
            return False

        return answer

    heads = (
        b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n",
    )
    for head in heads:
        async with Server([until_close(head, [b'{"a": ', b"1}"])]) as srv:
            p = pool()
            resp = await p.send("POST", srv.url, {})
            assert (resp.status_code, resp.content) == (200, b'{"a": 1}')
            resp = await p.send("POST", srv.url, {}, stream=True)
            assert [d async for d in resp.aiter_bytes()] == [b'{"a": ', b"1}"]
            assert p.connections == 0  # never kept: the close was its end


async def test_interim_1xx_answers_are_skipped_for_the_final_one():
    """A 100 Continue or 103 Early Hints may come before the answer, even unasked for
    (RFC 9110 section 15.2): the answer is the final one, with its own headers only."""

    def interim(first: bytes) -> Answer:
        async def answer(w: asyncio.StreamWriter) -> bool:
            w.write(first)
            await w.drain()
            await asyncio.sleep(0.02)  # the interim answer arrives on its own
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-final: 1\r\n\r\nhello")
            await w.drain()
            return True

        return answer

    for first in (
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ):
        async with Server([interim(first), ok(b"again")]) as srv:
            p = pool()
            resp = await p.send("POST", srv.url, {})
            assert (resp.status_code, resp.content) == (200, b"hello")
            assert dict(resp.headers) == {"content-length": "5", "x-final": "1"}
            assert (await p.send("POST", srv.url, {})).content == b"again"
            assert srv.connections == 1  # kept alive across the interim answer


async def test_a_connection_that_gets_bytes_after_its_answer_is_not_reused():
    """Bytes beyond the answer (an answer to no request, in the same packet or while the
    connection is idle) mean the server is out of step with it: the answer is what its
    framing says, and the next request goes on a fresh connection."""
    stray = b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n"

    def then_stray(together: bool) -> Answer:
        async def answer(w: asyncio.StreamWriter) -> bool:
            w.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello" + (stray if together else b"")
            )
            await w.drain()
            if not together:
                await asyncio.sleep(0.02)
                w.write(stray + b"stale")
                await w.drain()
            return True

        return answer

    for together in (True, False):
        async with Server([then_stray(together), ok(b"second")]) as srv:
            p = pool()
            assert (await p.send("POST", srv.url, {})).content == b"hello"
            await asyncio.sleep(0.05)
            assert (await p.send("POST", srv.url, {})).content == b"second"
            assert srv.connections == 2


async def test_closing_the_pool_cuts_a_body_that_ends_with_the_connection():
    """A body framed by the connection's close ended cleanly when the pool itself closed
    that connection (AsyncLunar.close() mid-stream): the reader took a truncated stream for
    a whole one. Only the server's close ends such a body."""

    async def slow(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\ndata: 1\n\n")
        await w.drain()
        await asyncio.sleep(30)
        return False

    async with Server([slow]) as srv:
        p = pool()
        resp = await p.send("POST", srv.url, {}, stream=True)
        it = resp.aiter_bytes()
        assert await it.__anext__() == b"data: 1\n\n"
        await p.aclose()
        with pytest.raises(TransportError, match="closed the connection"):
            await it.__anext__()


# -- the tap (the gateway's relay of plain stream events: Response.tap) ----------------------


def taking(upto: bytes, taken: list[bytes]) -> Callable[[bytes], bytes]:
    """A tap that takes every piece until one holding ``upto``, and leaves that one's bytes
    from ``upto`` on."""

    def tap(body: bytes) -> bytes:
        at = body.find(upto)
        if at < 0:
            taken.append(body)
            return b""
        taken.append(body[:at])
        return body[at:]

    return tap


async def test_a_tap_takes_the_body_until_it_leaves_bytes_which_the_reader_then_gets():
    release = asyncio.Event()

    async def answer(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await release.wait()
        for piece in (b"aa", b"bb", b"ccSTOPdd", b"ee"):
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await w.drain()
            await asyncio.sleep(0.01)
        w.write(b"0\r\n\r\n")
        return True

    async with Server([answer]) as srv:
        p = pool()
        resp = await p.send("POST", srv.url, {}, stream=True)
        it = resp.aiter_bytes()
        assert await it.__anext__() == b"first"
        taken: list[bytes] = []
        assert resp.tap(taking(b"STOP", taken))
        release.set()
        rest = [d async for d in it]
        assert taken == [b"aa", b"bb", b"cc"]
        assert b"".join(rest) == b"STOPddee"  # in order, and the tap is gone
        assert p.idle_connections == 1
        again = await p.send("POST", srv.url, {}, stream=True)  # the same connection, no tap
        assert b"".join([d async for d in again.aiter_bytes()]) == b"firstaabbccSTOPddee"
        assert srv.connections == 1


async def test_bytes_a_tap_takes_restart_the_read_timeout_and_silence_after_them_is_one():
    # 8 pieces 0.1 s apart: 0.8 s in all, four times the 0.2 s timeout, each gap within it.
    async with Server([paced(8, 0.1, then_stall=True)]) as srv:
        p = pool(timeout=0.2)
        resp = await p.send("POST", srv.url, {}, stream=True)
        taken: list[bytes] = []
        assert resp.tap(taking(b"never", taken))
        got = await read_until(resp, TransportTimeout)
        assert (got, b"".join(taken)) == ([], b"01234567")
        assert p.connections == 0


async def test_no_tap_while_bytes_wait_for_the_reader_or_once_the_body_ended():
    async with Server([ok(b"whole")]) as srv:
        p = pool()
        resp = await p.send("POST", srv.url, {}, stream=True)
        assert not resp.tap(lambda body: b"")  # the body is here already, and complete
        assert b"".join([d async for d in resp.aiter_bytes()]) == b"whole"
