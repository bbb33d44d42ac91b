"""`lunar serve`'s accept (lunar.server.serving): every connection waiting in the listen queue
is taken at once, over real sockets, and each is served by uvicorn's HTTP protocol."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

uvicorn = pytest.importorskip("uvicorn")

from lunar.server import serving  # noqa: E402


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-length", b"5")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello"})


def new_server() -> serving.GatewayServer:
    """A GatewayServer for ``hello`` on a free port (bound, not listening yet)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        hello, lifespan="on", log_level="warning", backlog=128, timeout_graceful_shutdown=2
    )
    return serving.GatewayServer(config, sock)


@contextlib.asynccontextmanager
async def serving_in_this_loop(
    server: serving.GatewayServer,
) -> AsyncIterator[serving.GatewayServer]:
    """``server`` run as `lunar serve` runs it (``serve()``), in this event loop, until the
    block ends."""
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started
        yield server
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def running_server() -> AsyncIterator[serving.GatewayServer]:
    """A GatewayServer for ``hello`` on a free port, run as `lunar serve` runs it."""
    server = new_server()
    sock = server.sock
    async with serving_in_this_loop(server):
        yield server
    assert sock.fileno() == -1  # the listening socket is closed at shutdown


def connect_clients(server: serving.GatewayServer, n: int) -> list[socket.socket]:
    """``n`` connections the kernel has completed: all waiting in the listen queue."""
    address = server.sock.getsockname()
    return [socket.create_connection(address, timeout=5) for _ in range(n)]


async def test_one_wake_up_accepts_every_waiting_connection_and_each_is_served():
    async with running_server() as server:
        server._unlisten()  # the test calls the accept itself, once
        clients = connect_clients(server, 40)
        try:
            # One call, as for one readiness event (libuv's own accept would take one).
            server.accept_pending()
            assert server.accepted == 40
            loop = asyncio.get_running_loop()
            for c in clients:
                c.setblocking(False)
                await loop.sock_sendall(c, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            for c in clients:
                reply = b""
                while not reply.endswith(b"hello"):
                    data = await loop.sock_recv(c, 4096)
                    assert data, f"closed before the whole answer: {reply!r}"
                    reply += data
                assert reply.startswith(b"HTTP/1.1 200 ")
        finally:
            for c in clients:
                c.close()


async def test_out_of_descriptors_pauses_accepting_then_resumes(monkeypatch):
    monkeypatch.setattr(serving, "RETRY_AFTER_S", 0.01)
    async with running_server() as server:
        real = server.sock
        failures = [OSError(errno.EMFILE, "Too many open files")]

        class Exhausted:
            """The listening socket, whose next accept finds no descriptor left."""

            def accept(self) -> tuple[socket.socket, Any]:
                if failures:
                    raise failures.pop()
                return real.accept()

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        server._unlisten()
        server.sock = Exhausted()  # type: ignore[assignment]
        clients = connect_clients(server, 3)
        try:
            server.accept_pending()  # EMFILE: stops listening instead of spinning on it
            assert server.accepted == 0 and server._fd == -1
            for _ in range(300):  # the retry listens again; the loop accepts the three
                if server.accepted == 3:
                    break
                await asyncio.sleep(0.01)
            assert server.accepted == 3 and server._fd != -1
        finally:
            for c in clients:
                c.close()
            server.sock = real


async def test_connections_taken_just_before_shutdown_are_closed_by_it():
    """Accepted, not yet handed to uvicorn when the shutdown starts: they are still told to
    close, so an idle one neither holds the shutdown open nor stays connected after it.
    (Driven as uvicorn's ``_serve`` drives it, to put the shutdown in the same loop turn.)"""
    server = new_server()
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    await server.startup()
    server._unlisten()
    clients = connect_clients(server, 20)
    try:
        server.accept_pending()
        assert len(server._opening) == 20  # none handed over yet
        await server.shutdown()
        assert not server.server_state.connections  # every one closed by the shutdown
        for c in clients:
            c.settimeout(5)
            assert c.recv(100) == b""  # closed by the server (a timeout would raise)
    finally:
        for c in clients:
            c.close()
