"""The floor for any Python gateway: a byte relay that parses nothing.

    python bench/gateway/relay.py --port N --upstream 127.0.0.1:M

Each client connection gets its own upstream connection, and bytes are copied both ways as
they arrive (uvloop when installed, one ``transport.write`` per read). No HTTP parsing, no
JSON, no accounting: what is left is the event loop and the socket calls, the part of a
gateway's cost that no Python code can remove. Lane 3 runs it as the target ``relay`` to show
how many paced streams one core can carry through a Python process at all.
"""

from __future__ import annotations

import argparse
import asyncio


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.upstream, _ = await loop.create_connection(
                lambda: Upstream(self), self.host, self.port
            )
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        for data in self.pending:
            self.upstream.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.upstream is not None:
            self.upstream.close()


async def serve(port: int, upstream: str) -> None:
    host, up_port = upstream.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(host, int(up_port)), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="host:port")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.port, args.upstream))


if __name__ == "__main__":
    main()
