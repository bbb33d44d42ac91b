"""The floor of an ASGI gateway: uvicorn (uvloop + httptools, as ``lunar serve`` runs) with an
app that copies the upstream's bytes to the client through Lunar's upstream pool, parsing no
JSON and checking nothing.

    python bench/gateway/asgi_relay.py --port N --upstream http://127.0.0.1:M

What Lunar's gateway costs above this is Lunar's own work (auth, validation, translation,
accounting); what this costs above bench/gateway/relay.py is the ASGI server and the HTTP
parsing on both sides.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from lunar._http import AsyncPool


async def read_body(receive: Any) -> bytes:
    """An ASGI request's whole body."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def app_for(upstream: str) -> Any:
    pool: AsyncPool | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal pool
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    pool = AsyncPool(max_connections=4000)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if pool is not None:
                        await pool.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert pool is not None
        body = await read_body(receive)
        resp = await pool.send(
            scope["method"],
            upstream + scope["path"],
            {"content-type": "application/json"},
            body,
            stream=True,
        )
        headers = [(b"content-type", resp.headers.get("content-type", "").encode())]
        await send({"type": "http.response.start", "status": resp.status_code, "headers": headers})
        async for data in resp.aiter_bytes():
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def granian_app() -> Any:
    """For ``granian --factory``: the upstream comes from ``RELAY_UPSTREAM``."""
    import os

    return app_for(os.environ["RELAY_UPSTREAM"].rstrip("/"))


def main(app_for: Any = app_for) -> None:
    """Serve ``app_for(upstream)`` as ``lunar serve`` serves its app (uvloop, httptools)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="http://host:port")
    args = ap.parse_args()
    uvicorn.run(
        app_for(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
