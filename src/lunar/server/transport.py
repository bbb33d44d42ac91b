"""The upstream HTTP transport the gateway hands to the engine: several connection pools.

httpcore's connection pool rescans every connection for every waiting request each time a
request or connection changes state, so its cost grows with the square of the concurrent
requests: with 100 concurrent streams re-using keep-alive connections, a request can wait
seconds for its first byte while the pool scans (measured: TTFT 0.5–4.9 s for 100 streams
whose upstream answers in 35 ms). ``ShardedTransport`` spreads requests over ``shards``
independent pools in turn, each holding a share of the connections, which divides that cost
by about ``shards``² while keeping connection reuse (TLS handshakes to real providers are
expensive). The engine is unchanged: it receives an ordinary ``httpx.AsyncClient``.
"""

from __future__ import annotations

import itertools

import httpx


class ShardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, shards: int, max_connections: int, max_keepalive: int) -> None:
        shards = max(1, shards)
        limits = httpx.Limits(
            max_connections=max(1, max_connections // shards),
            max_keepalive_connections=max(1, max_keepalive // shards),
        )
        self._pools = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(shards)]
        self._turn = itertools.cycle(self._pools)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await next(self._turn).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


def upstream_client(
    timeout: float, connect_timeout: float, max_connections: int, shards: int, user_agent: str
) -> httpx.AsyncClient:
    """The engine's client: read timeout ``timeout`` (also the longest pause mid-stream),
    ``max_connections`` in all, spread over ``shards`` pools."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        transport=ShardedTransport(shards, max_connections, min(max_connections, 200)),
        headers={"user-agent": user_agent},
    )
