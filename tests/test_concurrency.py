"""Clients shared the way production apps share them: one ``Lunar`` by many threads, one
``AsyncLunar`` by many tasks (and across event loops), with faults from the emulator over
real sockets. Outcome and state asserts only: every caller gets its own answer or one of
Lunar's typed errors, nothing hangs, and the pool's books balance afterwards."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lunar import AsyncLunar, Lunar, LunarError
from lunar.testing import MockServer, Reply

from .conftest import busy_connections

MESSAGES = [{"role": "user", "content": "hi"}]


def settles(check: object, tries: int = 200) -> bool:
    """Whether ``check()`` comes true within a bounded wait (the server's side of a socket
    notices its end a moment later)."""
    for _ in range(tries):
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_an_async_client_across_two_event_loops_leaves_no_socket_of_the_first_open():
    """The first ``asyncio.run``'s kept-alive connections cannot serve the second loop: they
    are dropped, and their sockets closed then, not left open (to the server too) until a
    garbage collection."""
    with MockServer() as mock:  # its own: no other test's connections counted
        client = AsyncLunar(
            max_retries=0, providers={"openai": {"api_key": "sk", "base_url": mock.base_url}}
        )

        async def burst(n: int) -> None:
            create = client.chat.completions.create
            await asyncio.gather(
                *(create(model="gpt-4o-mini", messages=MESSAGES) for _ in range(n))
            )

        asyncio.run(burst(20))
        assert client._http.idle_connections == 20
        assert settles(lambda: mock.open_connections == 20), mock.open_connections
        asyncio.run(burst(1))  # drops the first loop's 20
        assert client._http.connections == 1
        assert settles(lambda: mock.open_connections == 1), mock.open_connections
        asyncio.run(client.close())
        assert settles(lambda: mock.open_connections == 0), mock.open_connections


#: The fault mix: 429 with Retry-After, 500, a cut and a stall mid-stream, slow streams.
FAULTS = [
    Reply(status=429, retry_after=0.01),
    Reply(status=500),
    Reply(cut_after=2, chunks=6),
    Reply(stall_after=1, stall=1.0, chunks=4),
    Reply(chunks=12, pacing=0.001),
]


def words(i: int) -> tuple[list[dict[str, str]], int]:
    """Caller ``i``'s messages and the prompt tokens its own answer reports (the emulator
    counts words + 3): an answer delivered to another caller shows."""
    n = i % 23 + 1
    return [{"role": "user", "content": " ".join(["w"] * n)}], n + 3


def test_one_sync_client_shared_by_many_threads_under_faults(mock):
    """32 threads, streamed and not, some leaving streams early, with faults: each caller
    gets its own answer or a typed error, and no connection stays busy."""
    client = Lunar(max_retries=2, timeout=0.5)
    copy = client.with_options(max_retries=1)
    mock.enqueue(*(FAULTS * 12))

    def call(i: int) -> str:
        c = copy if i % 3 == 0 else client
        messages, prompt = words(i)
        try:
            if i % 2:
                r = c.chat.completions.create(model="gpt-4o-mini", messages=messages)
                assert r.usage is not None and r.usage.prompt_tokens == prompt
                return "ok"
            stream = c.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            for n, chunk in enumerate(stream):
                if i % 4 == 0 and n == 1:
                    stream.close()
                    return "left"
                if chunk.usage is not None:
                    assert chunk.usage.prompt_tokens == prompt
            return "ok"
        except LunarError:
            return "typed"

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(call, range(160), timeout=50))
    assert set(outcomes) <= {"ok", "left", "typed"} and "ok" in outcomes
    assert busy_connections(client) == 0
    client.close()


async def test_one_async_client_shared_by_hundreds_of_tasks_some_cancelled(mock):
    """300 tasks on one ``AsyncLunar`` (and a copy), with faults, early exits and tasks
    cancelled mid-request: typed errors only, each its own answer, the pool's books even."""
    client = AsyncLunar(max_retries=2, timeout=0.5)
    client._http.max_connections = 16  # callers queue for connections too
    copy = client.with_options(max_retries=1)
    mock.enqueue(*(FAULTS * 20))

    async def call(i: int) -> str:
        c = copy if i % 3 == 0 else client
        messages, prompt = words(i)
        try:
            if i % 2:
                r = await c.chat.completions.create(model="gpt-4o-mini", messages=messages)
                assert r.usage is not None and r.usage.prompt_tokens == prompt
                return "ok"
            stream = await c.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                n = 0
                async for chunk in stream:
                    n += 1
                    if i % 4 == 0 and n == 2:
                        return "left"
                    if chunk.usage is not None:
                        assert chunk.usage.prompt_tokens == prompt
            return "ok"
        except LunarError:
            return "typed"

    tasks = [asyncio.ensure_future(call(i)) for i in range(300)]
    for k in range(0, 300, 7):
        await asyncio.sleep(0.005)
        tasks[k].cancel()
    outcomes: list[Any] = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 50)
    kinds = {o if isinstance(o, str) else type(o).__name__ for o in outcomes}
    assert kinds <= {"ok", "left", "typed", "CancelledError"} and "ok" in kinds
    pool = client._http
    assert pool.busy_connections == 0 and not pool._streaming and not pool._queue
    assert pool.connections == pool.idle_connections <= 16
    await client.close()
    assert pool.connections == 0
