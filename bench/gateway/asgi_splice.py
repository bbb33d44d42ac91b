"""An experiment: how many paced streams could uvicorn carry if a gateway kept ASGI for the
request but spliced each stream's events outside it?

    python bench/gateway/asgi_splice.py --port N --upstream http://127.0.0.1:M

The request goes through uvicorn and ASGI as in asgi-relay (body read, parsed as JSON). The
upstream's answer is read by a protocol callback (httptools), and every SSE event is parsed
and re-written (orjson, a ``provider`` field added: the least a gateway that accounts for a
stream and tags its chunks must do) and written straight to the client's transport, chunked,
from the upstream's ``data_received``: no coroutine wakes per event, no ASGI message. The
stream's end goes back through ASGI, so uvicorn's keep-alive handling is unchanged. The
client's transport is uvicorn's (``send.__self__.transport``): an internal, which is why this
is a floor to measure and not how Lunar's gateway runs.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson
from asgi_relay import read_body  # run as a script: its folder is on sys.path

_EVENT_END = b"\n\n"


class Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Any = None  # the client's transport while a stream is spliced
        self.head: asyncio.Future[int] | None = None
        self.done: asyncio.Future[None] | None = None
        self.buf = b""
        self.pending: list[bytes] = []  # events parsed before the splice was in place
        self.reusable = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        if self.head is not None and not self.head.done():
            self.head.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        buf = self.buf + body if self.buf else body
        out = []
        start = 0
        while True:
            end = buf.find(_EVENT_END, start)
            if end < 0:
                break
            event = buf[start:end]
            start = end + 2
            if not event.startswith(b"data: "):
                continue
            data = event[6:]
            if data == b"[DONE]":
                out.append(b"data: [DONE]\n\n")
                continue
            obj = orjson.loads(data)
            obj["provider"] = "openai"
            out.append(b"data: " + orjson.dumps(obj) + b"\n\n")
        self.buf = buf[start:]
        if out:
            payload = b"".join(out)
            if self.sink is None:
                self.pending.append(payload)
            else:
                self.sink.write(b"%x\r\n%s\r\n" % (len(payload), payload))

    def on_message_complete(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        for fut in (self.head, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("upstream closed"))


def app_for(upstream: str) -> Any:
    parts = urlsplit(upstream)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: list[Upstream] = []

    async def connection() -> Upstream:
        while idle:
            up = idle.pop()
            if up.reusable:
                return up
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(Upstream, host, port)
        return up

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = await read_body(receive)
        orjson.loads(body)
        up = await connection()
        loop = asyncio.get_running_loop()
        up.parser = httptools.HttpResponseParser(up)
        up.head, up.done, up.buf = loop.create_future(), loop.create_future(), b""
        assert up.transport is not None
        up.transport.write(
            b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (scope["path"].encode(), host.encode(), port, len(body), body)
        )
        status = await up.head
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        sink = send.__self__.transport
        for payload in up.pending:
            sink.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        up.pending.clear()
        up.sink = sink
        try:
            await up.done
        finally:
            up.sink = None
        idle.append(up)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


if __name__ == "__main__":
    from asgi_relay import main  # the same serving as the floor it is measured beside

    main(app_for)
