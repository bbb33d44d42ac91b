"""Clients shared the way production apps share them: one ``Lunar`` by many threads, one
``AsyncLunar`` by many tasks (and across event loops), with faults from the emulator over
real sockets. Outcome and state asserts only: every caller gets its own answer or one of
Lunar's typed errors, nothing hangs, and the pool's books balance afterwards."""

from __future__ import annotations

import asyncio
import time

from lunar import AsyncLunar

MESSAGES = [{"role": "user", "content": "hi"}]


def settles(check: object, tries: int = 200) -> bool:
    """Whether ``check()`` comes true within a bounded wait (the server's side of a socket
    notices its end a moment later)."""
    for _ in range(tries):
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_an_async_client_across_two_event_loops_leaves_no_socket_of_the_first_open(mock):
    """The first ``asyncio.run``'s kept-alive connections cannot serve the second loop: they
    are dropped, and their sockets closed then, not left open (to the server too) until a
    garbage collection."""
    client = AsyncLunar(max_retries=0)

    async def burst(n: int) -> None:
        await asyncio.gather(
            *(
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
                for _ in range(n)
            )
        )

    asyncio.run(burst(20))
    assert client._http.idle_connections == mock.open_connections == 20
    asyncio.run(burst(1))  # drops the first loop's 20
    assert client._http.connections == 1
    assert settles(lambda: mock.open_connections == 1), mock.open_connections
    asyncio.run(client.close())
    assert settles(lambda: mock.open_connections == 0), mock.open_connections
