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
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

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
        self._opening: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1  # the descriptor being watched, -1 when none

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets:
            raise ValueError("GatewayServer serves the socket it was given, not `sockets`")
        await super().startup(sockets=[])  # the lifespan, and no listener of uvicorn's
        if not self.started:
            return
        self._loop = asyncio.get_running_loop()
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

        def protocol() -> asyncio.Protocol:
            # As uvicorn's own startup builds it for the servers it creates.
            made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
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
