"""uvicorn's server with Lunar's own accept: every pending connection, each time the listening
socket is readable.

uvloop runs on libuv, which accepts one connection per event-loop iteration (libuv pull
request 3696, 2022). On a loaded gateway an iteration takes tens of milliseconds (it relays
hundreds of stream events), so a burst of new clients waits in the kernel's listen queue:
under lane 3's 1,000 paced streams, ~430 connections waited ~5 s each (``ss`` showed the
queue, ``strace`` one ``accept4`` per ~50 ms). asyncio's own loop accepts up to ``backlog``
connections per wake-up; this does the same on either loop, and hands each connection to
uvicorn's protocol with ``loop.connect_accepted_socket``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

import uvicorn

log = logging.getLogger("lunar.server")

# Out of descriptors or memory: accepting again at once would spin; asyncio waits 1 s too.
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
RETRY_AFTER_S = 1.0


class GatewayServer(uvicorn.Server):
    """``uvicorn.Server`` serving ``sock`` (bound, not yet listening) with the accept above.
    Everything else (the lifespan, the HTTP protocol, signals, graceful shutdown) is
    uvicorn's."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        super().__init__(config)
        self.sock = sock
        self.accepted = 0  # connections taken from the listen queue
        self._opening: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listening = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the lifespan, and no listener of uvicorn's
        if not self.started:
            return
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.sock.listen(self.config.backlog)
        self._listen()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._unlisten()
        await super().shutdown(sockets=[self.sock])  # closes it, then drains connections

    def _listen(self) -> None:
        if self._loop is not None and not self._listening and self.sock.fileno() != -1:
            self._loop.add_reader(self.sock.fileno(), self.accept_pending)
            self._listening = True

    def _unlisten(self) -> None:
        if self._loop is not None and self._listening:
            self._loop.remove_reader(self.sock.fileno())
            self._listening = False

    def accept_pending(self) -> None:
        """Take every connection waiting in the listen queue (at most ``backlog``)."""
        assert self._loop is not None
        config = self.config
        for _ in range(config.backlog):
            try:
                conn, _address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client left before it was accepted
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                log.error("cannot accept connections (%s); retrying in %g s", exc, RETRY_AFTER_S)
                self._unlisten()
                self._loop.call_later(RETRY_AFTER_S, self._listen)
                return
            self.accepted += 1
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket) -> None:
        config = self.config

        def protocol() -> asyncio.Protocol:
            # As uvicorn's own startup builds it for the servers it creates.
            made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )
            return made

        try:
            await self._loop.connect_accepted_socket(protocol, conn)  # type: ignore[union-attr]
        except OSError:  # reset before its transport was made: nothing to serve
            conn.close()
