"""uvicorn's server with Lunar's own accept: every pending connection, each time the listening
socket is readable.

uvloop runs on libuv, which accepts one connection per event-loop iteration (libuv pull
request 3696, 2022). On a loaded gateway an iteration takes tens of milliseconds (it relays
hundreds of stream events), so a burst of new clients waits in the kernel's listen queue:
under lane 3's 1,000 paced streams, 503-591 streams got their first token after 200 ms, the
worst ~5 s late (``ss`` showed the queue, up to ~460; ``strace`` one ``accept4`` per ~50
ms). asyncio's own loop accepts up to ``backlog`` connections per wake-up; this does the
same on either loop, and hands each connection to uvicorn's protocol with
``loop.connect_accepted_socket``.

Each connection's protocol is uvicorn's, with one bound added (``bounded_head_protocol``): a
request head larger than ``MAX_HEAD_BYTES`` is refused with a 431; and bytes that are not
HTTP get a 400 in OpenAI's error shape instead of uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import weakref
from typing import Any

import uvicorn

from .._json import dumps
from .relay import CYCLE_EXTENSION

log = logging.getLogger("lunar.server")

# Out of descriptors or memory: accepting again at once would spin; asyncio waits 1 s too.
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
RETRY_AFTER_S = 1.0

# The request line and headers together. uvicorn's h11 protocol refuses a head past 16 KiB;
# with httptools nothing bounded it, so a head that never ended grew in memory without end.
MAX_HEAD_BYTES = 64 * 1024


def bounded_head_protocol(cls: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """``cls``, or when it is uvicorn's httptools protocol, that protocol answering a request
    head past ``MAX_HEAD_BYTES`` with a 431 (OpenAI's error shape) and closing the
    connection. A head is counted from the first read that lies wholly inside it, so it is
    refused within ``MAX_HEAD_BYTES`` and one read (at most 256 KiB) of its start; a head that
    ends is measured when it does, so one past the bound is refused however it arrived."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn uses h11, which bounds the head itself
        return cls
    if cls is not HttpToolsProtocol:
        return cls

    class BoundedHead(HttpToolsProtocol):
        _in_head = False  # between a request's first byte and the end of its headers
        _began = False  # a request began during the current read
        _head_bytes = 0
        _read_bytes = 0  # the current read's length
        _refused = False

        def on_message_begin(self) -> None:
            self._in_head = self._began = True
            self._head_bytes = 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            if self._refused:  # a request pipelined behind a refused one
                return
            # A head that began in this read, no longer than the bound, is within it; any
            # other is measured (the per-read count misses the read that began it and the
            # one that ended it): the request line and each header line.
            if not (self._began and self._read_bytes <= MAX_HEAD_BYTES):
                size = len(self.url) + 16 + sum(len(n) + len(v) + 4 for n, v in self.headers)
                if size > MAX_HEAD_BYTES:
                    earlier = self.cycle
                    self._refuse_head()
                    # A stand-in for the request's cycle, complete: the parser's callbacks for
                    # the rest of its bytes do nothing, and no app task starts. The closing
                    # connection is then told to it, not to an earlier request still being
                    # answered (pipelined): that one is told now, as uvicorn would.
                    self.cycle = _Refused()  # type: ignore[assignment]
                    if earlier is not None and not earlier.response_complete:
                        earlier.disconnected = True
                        earlier.message_event.set()
                    return
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None:
                # The request's own cycle, for the gateway's relay of stream events past
                # ASGI's send (``relay.client_sink``); the app task has not started yet.
                # Weakly: the cycle holds the scope, and a scope holding the cycle would
                # leave every request a reference cycle for the cyclic GC.
                extensions: dict[str, Any] = cycle.scope.setdefault("extensions", {})
                extensions[CYCLE_EXTENSION] = weakref.ref(cycle)

        def data_received(self, data: bytes) -> None:
            self._began = False
            self._read_bytes = len(data)
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            if not self._began:
                self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse_head()

        def _refuse_head(self) -> None:
            self._in_head = False
            self._refused = True
            self._refuse(
                b"431 Request Header Fields Too Large",
                f"Request headers larger than {MAX_HEAD_BYTES // 1024} KiB: "
                "send large data in the request body",
                "header_too_large",
            )

        def send_400_response(self, msg: str) -> None:
            # uvicorn's answer to bytes that are not HTTP: a text/plain 400, which clients
            # that read OpenAI's error shape cannot parse.
            self._refuse(
                b"400 Bad Request",
                "Invalid HTTP request: the bytes received are not an HTTP/1.1 request",
                "invalid_http_request",
            )

        def _refuse(self, status: bytes, message: str, code: str) -> None:
            """Answer ``status`` with an error in OpenAI's shape, then close. While an earlier
            (pipelined) request is answered, an answer written now would cut into it: the
            connection is closed without one."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                error = {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": code,
                }
                body = dumps({"error": error})
                head = [b"HTTP/1.1 %s\r\n" % status]
                for name, value in self.server_state.default_headers:
                    head.append(b"%s: %s\r\n" % (name, value))
                head.append(
                    b"content-type: application/json\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n" % len(body)
                )
                self.transport.write(b"".join(head) + body)
            self.transport.close()

    return BoundedHead


class _Refused:
    """The cycle of a request refused for its head, as uvicorn's callbacks read it."""

    response_complete = True

    def __init__(self) -> None:
        self.message_event = asyncio.Event()


class GatewayServer(uvicorn.Server):
    """``uvicorn.Server`` serving ``sock`` (bound, not yet listening) with the accept above.
    Everything else (the lifespan, the HTTP protocol, signals, graceful shutdown) is
    uvicorn's."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        super().__init__(config)
        self.sock = sock
        self.accepted = 0  # connections taken from the listen queue
        self._opening: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1  # the descriptor being watched, -1 when none
        self._protocol_class: type[asyncio.Protocol] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets:
            raise ValueError("GatewayServer serves the socket it was given, not `sockets`")
        await super().startup(sockets=[])  # the lifespan, and no listener of uvicorn's
        if not self.started:
            return
        self._loop = asyncio.get_running_loop()
        self._protocol_class = bounded_head_protocol(self.config.http_protocol_class)
        self.sock.setblocking(False)
        self.sock.listen(self.config.backlog)
        self._listen()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._unlisten()
        self.sock.close()
        # Connections taken but not yet handed over register with uvicorn one or two loop
        # turns later; uvicorn's shutdown asks every registered connection to close, so
        # they must be registered by then, or an idle one would hold the shutdown open.
        await asyncio.gather(*self._opening, return_exceptions=True)
        await super().shutdown(sockets=[])

    def _listen(self) -> None:
        if self._loop is not None and self._fd == -1 and self.sock.fileno() != -1:
            self._fd = self.sock.fileno()
            self._loop.add_reader(self._fd, self.accept_pending)

    def _unlisten(self) -> None:
        if self._loop is not None and self._fd != -1:
            self._loop.remove_reader(self._fd)
            self._fd = -1

    def accept_pending(self) -> None:
        """Take every connection waiting in the listen queue (at most ``backlog``)."""
        loop = self._loop
        assert loop is not None
        for _ in range(self.config.backlog):
            try:
                conn, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client left before it was accepted
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                log.error(
                    "cannot accept connections (%s); retrying in %g s. Raise the limit on open "
                    "files (ulimit -n, or LimitNOFILE= in a systemd unit) if this repeats.",
                    exc,
                    RETRY_AFTER_S,
                )
                self._unlisten()
                loop.call_later(RETRY_AFTER_S, self._listen)
                return
            self.accepted += 1
            # (TCP_NODELAY: uvloop's transports set it, and asyncio's for IPPROTO_TCP sockets.)
            task = loop.create_task(self._open(loop, conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        config = self.config
        cls = self._protocol_class or config.http_protocol_class

        def protocol() -> asyncio.Protocol:
            # As uvicorn's own startup builds it for the servers it creates.
            made: asyncio.Protocol = cls(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )
            return made

        try:
            await loop.connect_accepted_socket(protocol, conn, ssl=config.ssl)
        except OSError:  # reset before its transport was made: nothing to serve
            conn.close()
        except BaseException:  # cancelled with the loop: the socket must not outlive it
            conn.close()
            raise
