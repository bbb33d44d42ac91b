"""Lunar's own upstream HTTP/1.1 client for asyncio: the gateway's (and, when httptools is
installed, ``AsyncLunar``'s) way to talk to providers.

Why not httpx here: profiled in the gateway (docs/benchmarks.md), httpx + httpcore took about
60 % of its CPU for a non-streamed request and about half of it for paced streams: anyio
cancel scopes around every read, several layers of request/response objects, and a pool that
rescans every connection whenever one changes state. Here a read is one ``data_received``
callback that feeds httptools (llhttp, in C), a request is one ``write``, and taking a
connection is a pop from a per-origin deque (most recently used first, expired ones dropped
from the other end).

Scope, on purpose: HTTP/1.1 with keep-alive, TLS (certifi's CA bundle when installed),
``content-length``, chunked and close-delimited bodies, gzip/deflate bodies, connect, read and
pool (the wait for a free connection) timeouts, a ceiling on open connections with a fair queue.
No write timeout: a request is handed to the transport's buffer in one ``write`` and never
waits on the socket; a peer that stops reading shows as a read timeout. Not here: proxies, HTTP/2,
redirects, cookies — ``AsyncLunar`` uses httpx when a proxy is configured or an
``http_client`` is given.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import socket
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from . import _fork

try:
    import httptools
except ImportError:  # without it there is no pool: AsyncLunar then uses httpx
    httptools = None  # type: ignore[assignment]

_HIGH_WATER = 256 * 1024  # buffered body bytes before the socket stops being read
_MAX_CACHED = 512  # URLs, and sets of request headers, remembered per pool


class TransportError(Exception):
    """The connection failed, was lost, or the peer's answer was not valid HTTP/1.1."""


class TransportTimeout(TransportError):
    """Nothing arrived (or the connection did not open) within the timeout."""


class HeaderDefaults:
    """Headers written with every request that does not set them itself, and the header
    blocks written with them (kept per set of request headers: a target sends the same
    ones request after request). A pool has its own; ``AsyncPool.send(defaults=...)`` takes
    others for some requests (a client's ``with_options()`` copy sharing the pool)."""

    __slots__ = ("block", "blocks", "lines")

    def __init__(self, headers: Mapping[str, str] | None = None) -> None:
        self.lines = {k.lower(): _header_line(k, v) for k, v in (headers or {}).items()}
        self.block = b"".join(self.lines.values())
        self.blocks: dict[tuple[tuple[str, str], ...], bytes] = {}


class Timeouts(NamedTuple):
    """One request's timeouts for ``AsyncPool.send``, in seconds; ``None`` is no limit.
    ``read`` bounds every wait for bytes (a pause mid-stream too), ``connect`` the opening of
    a connection, ``pool`` the wait for a free connection at the ceiling."""

    read: float | None
    connect: float | None
    pool: float | None


class Headers(dict):  # type: ignore[type-arg]
    """Response headers: names lower-cased, looked up case-insensitively; a repeated header's
    values joined with ``", "``."""

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())  # type: ignore[no-any-return]

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


# ---------------------------------------------------------------------------------------------
# One connection: an asyncio protocol that feeds httptools and wakes one waiting reader


#: No deadline (``math.inf``), as a module global: compared once per tapped read.
_NEVER = math.inf


class _Connection(asyncio.Protocol):
    def __init__(self, origin: tuple[str, str, int], loop: asyncio.AbstractEventLoop) -> None:
        self.origin = origin
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        # The read timeout: one timer per connection, moved on lazily (see ``wait``).
        self._deadline = math.inf  # loop time at which the reader waiting now gives up
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.idle_since = 0.0
        self.reused = False
        self.lost = False
        self.closed_here = False
        self.awaiting = False  # a request was sent whose final answer has not ended yet
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.error: TransportError | None = None
        self.interim = False  # parsing a 1xx answer, which the final one follows
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.got_bytes = False
        #: Takes the body's bytes as they arrive instead of the reader (``Response.tap``),
        #: returning those it leaves: the reader then has them, and the tap is gone.
        self.tap: Callable[[bytes], bytes] | None = None

    # -- asyncio ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransportError(f"Invalid HTTP response: {exc}"))
            self.close()
        if self.tap is None or self.chunks or self.complete or self.error is not None:
            self._wake()
        elif self._deadline != _NEVER:
            # The tap took it all, and the reader sleeps on: bytes came, so its read
            # timeout starts again.
            self._deadline = self.loop.time() + self._timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._disarm()
        if (
            not self.complete
            and exc is None
            and self.error is None
            and self.headers_done
            and not self.closed_here
            and self._ends_at_close()
        ):
            self.complete = True  # a clean close is the end of a body framed by nothing else
        if not self.complete:
            detail = f": {exc}" if exc else ""
            self._fail(TransportError(f"The server closed the connection{detail}"))
        self._wake()
        # The parser holds this connection's callbacks: a cycle that would keep a closed
        # connection (its buffers, its error) for the cyclic GC. Nothing arrives any more.
        del self.parser

    # -- httptools ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.awaiting:
            # An answer to no request: the server is out of step with this connection,
            # which must not carry another request (its answer would be misread).
            raise TransportError("An answer arrived with no request outstanding")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200 and status >= 100 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints), possibly unasked for: the
            # final one follows on this connection (RFC 9110 section 15.2).
            self.interim = True
            self.raw_headers = []
            return
        self.status = status
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if self.tap is not None:
            body = self.tap(body)
            if not body:
                return
            self.tap = None
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.awaiting = False
        self.complete = True
        # Asked now: once this callback returns, llhttp has reset for the next message.
        self.keep_alive = self.parser.should_keep_alive()

    def _ends_at_close(self) -> bool:
        """Whether the body has no framing but the connection's end (no content-length,
        and not chunked): an HTTP/1.0 server's usual answer (RFC 9112 section 6.3)."""
        for name, value in self.raw_headers:
            name = name.lower()
            if name == b"content-length":
                return False
            if name == b"transfer-encoding" and value.strip().lower().endswith(b"chunked"):
                return False
        return True

    # -- the reader's side --------------------------------------------------------------------

    def _fail(self, err: TransportError) -> None:
        if self.error is None:
            self.error = err

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def send(self, data: bytes) -> None:
        self._reset()
        self.awaiting = True
        assert self.transport is not None
        self.transport.write(data)

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def wait(self, timeout: float | None) -> None:
        """Until something arrives or the connection ends; ``TransportTimeout`` after
        ``timeout`` seconds of silence.

        A stream waits once per event, and a timer armed and cancelled each time was a
        cost of every event. Instead each wait only moves the connection's deadline; its
        one timer is armed when none is, or for an earlier deadline, and when it fires
        before the deadline (the reader was woken since) it re-arms for what is left."""
        self.waiter = fut = self.loop.create_future()
        if timeout is None:
            self._deadline = math.inf
        else:
            self._timeout = timeout
            self._deadline = deadline = self.loop.time() + timeout
            if deadline < self._timer_at:
                self._arm(deadline)
        try:
            await fut
        finally:
            self.waiter = None

    def _arm(self, when: float) -> None:
        self._disarm()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._check_deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is already closed
                self._timer.cancel()
            self._timer = None
        self._timer_at = math.inf

    def _check_deadline(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        fut = self.waiter
        if fut is None or fut.done() or self._deadline == math.inf:
            return  # nobody waits with a timeout: the next wait arms again
        if self.loop.time() >= self._deadline - 0.001:  # timers fire to the millisecond
            fut.set_exception(TransportTimeout(f"No data from the server for {self._timeout:g} s"))
        else:
            self._arm(self._deadline)

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost

    def close(self) -> None:
        self.lost = True  # never reused, even before connection_lost says so
        self.closed_here = True  # so a close-delimited body is not taken as whole
        self._disarm()
        transport = self.transport
        if transport is not None:
            try:
                transport.close()
            except RuntimeError:  # its event loop is closed (a client kept across two
                # asyncio.run calls): the transport cannot end the connection there, and
                # with this protocol it is a cycle the cyclic GC alone would free, the
                # socket open till then. Shut the socket down (the server sees it end now)
                # and let go of the transport, which closes the socket when freed.
                self.transport = None
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


# ---------------------------------------------------------------------------------------------
# A response, read whole or as a stream of body bytes


class Response:
    """``status_code``, ``headers``, and the body: ``content`` (after ``aread``, which
    ``send(stream=False)`` has done) or ``aiter_bytes()``. ``aclose()`` gives the connection
    back when the body was read to its end, and closes it otherwise."""

    __slots__ = (
        "_conn",
        "_decoder",
        "_headers",
        "_pool",
        "_raw",
        "_timeout",
        "content",
        "status_code",
    )

    def __init__(self, pool: AsyncPool, conn: _Connection, timeout: float | None) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._timeout = timeout
        self.status_code = conn.status
        self._raw = conn.raw_headers
        self._headers: Headers | None = None
        self.content = b""
        self._decoder = None
        for name, value in self._raw:
            if (
                len(name) == 16
                and name.lower() == b"content-encoding"
                and value.strip().lower() in (b"gzip", b"deflate")
            ):
                self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)

    @property
    def headers(self) -> Headers:
        """Decoded on first use: a successful answer is usually read without them."""
        if self._headers is None:
            headers = self._headers = Headers()
            for name, value in self._raw:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return self._headers

    def tap(self, tap: Callable[[bytes], bytes]) -> bool:
        """Have ``tap`` take the body's bytes as they arrive, from now until it leaves some
        (``aiter_bytes`` then reads those) or the response is closed: whether it was set.
        It is not when bytes are waiting to be read, or the body is compressed, complete or
        failed."""
        conn = self._conn
        if (
            conn is None
            or conn.chunks
            or conn.complete
            or conn.error is not None
            or self._decoder is not None
        ):
            return False
        conn.tap = tap
        return True

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        try:
            while True:
                if conn.chunks:
                    data = conn.take()
                    if self._decoder is not None:
                        data = self._decoder.decompress(data)
                    if data:
                        yield data
                elif conn.complete:
                    break
                elif conn.error is not None:
                    raise conn.error
                else:
                    await conn.wait(self._timeout)
        finally:
            await self.aclose()

    async def aread(self) -> bytes:
        conn = self._conn
        if conn is not None and conn.complete and self._decoder is None:
            # Usually the whole body came with the head: no iterator to run.
            self.content = conn.take() if conn.chunks else b""
            await self.aclose()
            return self.content
        parts = [data async for data in self.aiter_bytes()]
        self.content = b"".join(parts)
        return self.content

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.tap = None
            self._pool._release(conn)


# ---------------------------------------------------------------------------------------------
# The pool


class _SameAsRead:
    """``AsyncPool(pool_timeout=...)`` not given: the read timeout."""


_SAME_AS_READ = _SameAsRead()


def available() -> bool:
    """Whether the pool can run here (it needs httptools)."""
    return httptools is not None


class AsyncPool:
    """Keep-alive HTTP/1.1 connections per origin, at most ``max_connections`` open at once
    (callers beyond that wait their turn, first come first served), at most
    ``max_idle_per_origin`` kept idle, each for at most ``keepalive_expiry`` seconds.
    ``timeout`` bounds every wait for bytes (so also a pause mid-stream); ``connect_timeout``
    the opening of a connection; ``pool_timeout`` (by default ``timeout``) the wait for a
    free connection. ``None`` is no limit."""

    def __init__(
        self,
        *,
        timeout: float | None = 600.0,
        connect_timeout: float | None = 10.0,
        pool_timeout: float | _SameAsRead | None = _SAME_AS_READ,
        max_connections: int = 1000,
        max_idle_per_origin: int = 100,
        keepalive_expiry: float = 5.0,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.pool_timeout = timeout if isinstance(pool_timeout, _SameAsRead) else pool_timeout
        self.max_connections = max(1, max_connections)
        self.max_idle_per_origin = max_idle_per_origin
        self.keepalive_expiry = keepalive_expiry
        self.defaults = HeaderDefaults(headers)
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], collections.deque[_Connection]] = {}
        self._open = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._urls: dict[str, tuple[tuple[str, str, int], bytes]] = {}
        self._closed = False
        # The connections carrying a stream now: closing the pool ends them too, as closing
        # an httpx client does (a response read whole is left to finish).
        self._streaming: set[_Connection] = set()
        _fork.track(self, AsyncPool._forked)

    @property
    def is_closed(self) -> bool:
        """Whether ``aclose()`` was called (as httpx's clients say it)."""
        return self._closed

    @property
    def connections(self) -> int:
        """Connections open (or opening) now."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(len(q) for q in self._idle.values())

    @property
    def busy_connections(self) -> int:
        """Connections carrying a request or a response now."""
        return self._open - self.idle_connections

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        content: bytes = b"",
        *,
        stream: bool = False,
        timeout: Timeouts | float | None = None,
        defaults: HeaderDefaults | None = None,
    ) -> Response:
        """Send one request; the response once its head has arrived (and, unless ``stream``,
        its whole body). ``timeout``: ``None`` keeps the pool's timeouts; a number replaces
        its read and pool timeouts for this request; ``Timeouts`` replaces all three.
        ``defaults``: the default headers for this request instead of the pool's."""
        if self._closed:
            raise TransportError("The HTTP pool is closed")
        if timeout is None:
            read_timeout, connect_timeout, pool_timeout = (
                self.timeout,
                self.connect_timeout,
                self.pool_timeout,
            )
        elif isinstance(timeout, Timeouts):
            read_timeout, connect_timeout, pool_timeout = timeout
        else:
            read_timeout, connect_timeout, pool_timeout = timeout, self.connect_timeout, timeout
        origin, head = self._target(url)
        data = b"".join(
            (
                method.encode("ascii"),
                head,
                self._header_block(headers, self.defaults if defaults is None else defaults),
                b"content-length: %d\r\n\r\n" % len(content),
                content,
            )
        )
        while True:
            conn = await self._acquire(origin, pool_timeout, connect_timeout)
            try:
                conn.send(data)
                while not conn.headers_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(read_timeout)
            except TransportError as err:
                self._discard(conn)
                # A kept-alive connection the server had already closed: nothing was
                # processed, so the request goes again on a fresh connection.
                if conn.reused and not conn.got_bytes and not isinstance(err, TransportTimeout):
                    continue
                raise
            except BaseException:
                self._discard(conn)
                raise
            response = Response(self, conn, read_timeout)
            if not stream:
                await response.aread()
            else:
                self._streaming.add(conn)
            return response

    async def aclose(self) -> None:
        self._closed = True
        for conn in self._streaming:
            conn.close()  # its reader gets "the server closed the connection" at once
        self._streaming.clear()
        for queue in self._idle.values():
            for conn in queue:
                conn.close()
                self._open -= 1
        self._idle.clear()
        while self._queue:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(TransportError("The HTTP pool is closed"))

    def _forked(self) -> None:
        """In a child process (``lunar._fork``): the parent's connections stay the parent's.
        The idle ones and those carrying a stream are disowned (never written to or closed
        here); the books start empty, so the child opens connections of its own, under
        whichever event loop it runs. (The parent's loop does not run in the child: the
        requests it had in flight never resume here.)"""
        inherited = [conn for queue in self._idle.values() for conn in queue]
        inherited += self._streaming
        self._idle = {}
        self._streaming = set()
        self._queue = collections.deque()
        self._open = 0
        _fork.disown(
            inherited,
            (c.transport.get_extra_info("socket") for c in inherited if c.transport is not None),
        )

    # -- internals ----------------------------------------------------------------------------

    def _target(self, url: str) -> tuple[tuple[str, str, int], bytes]:
        """The origin and the request line's tail plus ``host`` header; cached per URL."""
        cached = self._urls.get(url)
        if cached is not None:
            return cached
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise TransportError(f"Unsupported URL {url!r}: expected http:// or https://")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise TransportError(f"Invalid port in URL {url!r}") from exc
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        host = parts.netloc.rsplit("@", 1)[-1]
        if any(c in path or c in host for c in " \r\n"):
            raise TransportError(f"Invalid characters in URL {url!r}")
        head = b" %s HTTP/1.1\r\nhost: %s\r\n" % (path.encode("ascii"), host.encode("idna"))
        cached = ((scheme, parts.hostname, port), head)
        if len(self._urls) < _MAX_CACHED:
            self._urls[url] = cached
        return cached

    async def _acquire(
        self, origin: tuple[str, str, int], timeout: float | None, connect_timeout: float | None
    ) -> _Connection:
        waited = False
        loop = asyncio.get_running_loop()
        while True:
            idle = self._idle.get(origin)
            if idle:
                now = time.monotonic()
                while idle and now - idle[0].idle_since > self.keepalive_expiry:
                    self._discard(idle.popleft())
                while idle:
                    conn = idle.pop()
                    # A connection made under another event loop (a client used across two
                    # asyncio.run calls) cannot serve this one.
                    if not conn.lost and conn.loop is loop:
                        conn.reused = True
                        return conn
                    self._discard(conn)
            if self._open < self.max_connections or self._evict_idle():
                return await self._connect(origin, connect_timeout)
            # At the ceiling: wait for a connection to come back or close. One already woken
            # that lost its turn to a newcomer goes back to the front.
            fut = asyncio.get_running_loop().create_future()
            if waited:
                self._queue.appendleft(fut)
            else:
                self._queue.append(fut)
            waited = True
            try:
                await asyncio.wait_for(fut, timeout)
            except BaseException as exc:
                if fut.done() and not fut.cancelled():
                    self._wake_one()  # woken but leaving: the turn goes to the next one
                else:
                    with contextlib.suppress(ValueError):
                        self._queue.remove(fut)
                if isinstance(exc, asyncio.TimeoutError):
                    raise TransportTimeout(
                        f"No free connection within {timeout:g} s "
                        f"({self.max_connections} connections are in use)"
                    ) from None
                raise

    async def _connect(self, origin: tuple[str, str, int], timeout: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        conn = _Connection(origin, loop)
        self._open += 1
        try:
            tls = self._ssl_context() if scheme == "https" else None
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: conn, host, port, ssl=tls, server_hostname=host if tls else None
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            self._closed_one()
            raise TransportTimeout(
                f"Could not connect to {host}:{port} within {timeout:g} s"
            ) from None
        except OSError as exc:
            self._closed_one()
            raise TransportError(f"Could not connect to {host}:{port}: {exc}") from exc
        except BaseException:
            self._closed_one()
            conn.close()
            raise
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = default_ssl_context()
        return self._ssl

    @staticmethod
    def _header_block(headers: Mapping[str, str], defaults: HeaderDefaults) -> bytes:
        """The header lines of a request: the defaults it does not set, then its own. Kept
        per set of headers (in ``defaults``), when every name and value is a str: 1, 1.0
        and True are equal keys but not equal text."""
        blocks = defaults.blocks
        try:
            key: tuple[tuple[str, str], ...] | None = tuple(headers.items())
            block = blocks.get(key)  # type: ignore[arg-type]
        except TypeError:  # an unhashable value: written, not kept
            key, block = None, None
        if block is None:
            lines = [_header_line(k, v) for k, v in headers.items()]
            block = _defaults_besides(headers, defaults) + b"".join(lines)
            if (
                key is not None
                and len(blocks) < _MAX_CACHED
                and all(type(k) is str and type(v) is str for k, v in key)
            ):
                blocks[key] = block
        return block

    def _release(self, conn: _Connection) -> None:
        """The response is done with ``conn``: keep it idle when it can serve another."""
        self._streaming.discard(conn)
        if self._closed or not conn.reusable() or self.max_idle_per_origin <= 0:
            self._discard(conn)
            return
        idle = self._idle.setdefault(conn.origin, collections.deque())
        if len(idle) >= self.max_idle_per_origin:
            self._discard(idle.popleft())
        conn.idle_since = time.monotonic()
        idle.append(conn)
        self._wake_one()

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._closed_one()

    def _closed_one(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._queue:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _evict_idle(self) -> bool:
        """At the ceiling: close the longest-idle connection of any origin to make room."""
        oldest: collections.deque[_Connection] | None = None
        for queue in self._idle.values():
            if queue and (oldest is None or queue[0].idle_since < oldest[0].idle_since):
                oldest = queue
        if oldest is None:
            return False
        conn = oldest.popleft()
        conn.close()
        self._open -= 1
        return True


def _defaults_besides(headers: Mapping[str, str], defaults: HeaderDefaults) -> bytes:
    """The default header lines a request does not set itself (its own value wins)."""
    names = {k.lower() for k in headers}
    if names.isdisjoint(defaults.lines):
        return defaults.block
    return b"".join(line for k, line in defaults.lines.items() if k not in names)


def _header_line(name: str, value: str) -> bytes:
    line = f"{name}: {value}\r\n"
    if "\n" in line[:-2] or "\r" in line[:-2]:
        raise ValueError(f"Invalid header {name!r}: a name or value may not contain a newline")
    return line.encode("latin-1")


def default_ssl_context() -> ssl.SSLContext:
    """Verification on, with ``SSL_CERT_FILE`` or else certifi's bundle (as httpx does)."""
    cafile = os.environ.get("SSL_CERT_FILE")
    if not cafile:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:
            cafile = None
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
