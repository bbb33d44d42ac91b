"""A client used before ``os.fork()`` (gunicorn ``--preload``, celery's prefork pool,
multiprocessing's ``fork``) keeps working in the child with no change to user code: the
child opens connections of its own, never writes to nor closes the parent's, and the
parent's pooled connections keep serving it. Real forks, real sockets, the emulator on
127.0.0.1 (in a thread of the parent: it serves both processes)."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lunar import APIConnectionError, AsyncLunar, Lunar, _http
from lunar._catalog import Deployment
from lunar._health import Health
from lunar.testing import MockServer, Reply

from .conftest import Forked

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def words(n: int) -> list[dict[str, str]]:
    """A prompt of ``n`` words: the emulator answers ``n + 3`` prompt tokens, so an answer
    read by the wrong caller (a shared connection's) shows."""
    return [{"role": "user", "content": " ".join(["w"] * n)}]


def ask(client: Lunar, n: int) -> int:
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=words(n))
    assert reply.choices[0].message.content
    assert reply.usage is not None
    return reply.usage.prompt_tokens - 3


def ask_streamed(client: Lunar, n: int) -> int:
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=words(n),
        stream=True,
        stream_options={"include_usage": True},
    )
    text, prompt = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            prompt = chunk.usage.prompt_tokens
    assert len(text.split()) == 6, text  # every piece of its own answer, in order
    assert prompt is not None
    return prompt - 3


async def ask_async(client: AsyncLunar, n: int) -> int:
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=words(n))
    assert reply.usage is not None
    return reply.usage.prompt_tokens - 3


def peers(mock: MockServer, ns: list[int]) -> set[tuple[str, int]]:
    """The client addresses the emulator saw the requests of ``n`` words come from."""
    seen = set()
    for r in mock.requests:
        if r.json and len(r.json["messages"][0]["content"].split()) in ns:
            assert r.peer is not None
            seen.add(r.peer)
    return seen


def still_open(mock: MockServer, peer: tuple[str, int]) -> bool:
    """Whether the connection from ``peer`` is open on the server's side, given the server
    time to notice an end the child might have caused (it has exited by now)."""
    for _ in range(30):
        if peer not in mock.open_peers:
            return False
        time.sleep(0.01)
    return True


def is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False


@pytest.fixture
def mock() -> Iterator[MockServer]:
    with MockServer() as server:  # its own: no other test's connections seen
        yield server


def providers(mock: MockServer) -> dict[str, Any]:
    return {"openai": {"api_key": "sk", "base_url": mock.base_url}}


def async_client(mock: MockServer, http: str) -> AsyncLunar:
    """Lunar's own pool, or the httpx client AsyncLunar makes itself without httptools
    (or behind a proxy)."""
    with pytest.MonkeyPatch.context() as m:
        if http == "httpx":
            m.setattr(_http, "available", lambda: False)
        client = AsyncLunar(max_retries=0, timeout=10, providers=providers(mock))
    assert isinstance(client._http, _http.AsyncPool) == (http == "lunar")
    return client


def test_a_sync_client_used_before_fork_works_in_the_child_on_connections_of_its_own(mock):
    client = Lunar(max_retries=0, timeout=10, providers=providers(mock))
    assert ask(client, 1) == 1
    (pooled,) = peers(mock, [1])  # the parent's kept-alive connection
    pool = client._http._transport._pool
    (fd,) = (
        c._connection._network_stream.get_extra_info("socket").fileno() for c in pool.connections
    )

    def child() -> list[Any]:
        # The parent's connection is not the child's any more: its descriptor no longer
        # refers to the socket (nothing of the child can reach it).
        return [is_socket(fd), *(ask(client, n) for n in (2, 3, 4, 5, 6))]

    forked = Forked(child)
    meanwhile = [ask(client, n) for n in (7, 8, 9, 10, 11)]
    assert forked.result() == [False, 2, 3, 4, 5, 6]
    assert meanwhile == [7, 8, 9, 10, 11]
    assert ask(client, 12) == 12
    # The child came on connections of its own; the parent kept using its pooled one,
    # which the child left open.
    assert pooled not in peers(mock, [2, 3, 4, 5, 6])
    assert peers(mock, [7, 8, 9, 10, 11, 12]) == {pooled}
    assert still_open(mock, pooled)
    client.close()


def test_a_sync_stream_used_before_fork_streams_in_the_child_on_connections_of_its_own(mock):
    mock.default = Reply(chunks=6, pacing=0.002)  # the two processes' streams overlap
    client = Lunar(max_retries=0, timeout=10, providers=providers(mock))
    assert ask_streamed(client, 1) == 1
    (pooled,) = peers(mock, [1])

    forked = Forked(lambda: [ask_streamed(client, n) for n in (2, 3, 4)])
    meanwhile = [ask_streamed(client, n) for n in (5, 6, 7)]
    assert forked.result() == [2, 3, 4]
    assert meanwhile == [5, 6, 7]
    assert pooled not in peers(mock, [2, 3, 4])
    assert peers(mock, [5, 6, 7]) == {pooled}
    assert still_open(mock, pooled)
    client.close()


def test_a_stream_open_at_the_fork_stays_the_parents(mock):
    """The child cannot read on a stream the parent had open (its bytes are the parent's):
    it gets a connection error, and its own requests work; the parent reads the whole."""
    mock.default = Reply(chunks=20, pacing=0.005)
    client = Lunar(max_retries=0, timeout=10, providers=providers(mock))
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=words(1), stream=True)
    chunks = iter(stream)
    head = [next(chunks), next(chunks)]

    def child() -> list[Any]:
        try:
            read = sum(1 for _ in chunks)
        except APIConnectionError:
            read = -1
        stream.close()
        return [read, ask(client, 2)]

    forked = Forked(child)
    text = "".join(c.choices[0].delta.content or "" for c in [*head, *chunks] if c.choices)
    assert len(text.split()) == 20
    assert forked.result() == [-1, 2]
    client.close()


@pytest.mark.parametrize("http", ["lunar", "httpx"])
def test_an_async_client_used_before_fork_works_under_the_childs_own_event_loop(mock, http):
    """The parent's event loop runs on (in a thread of the parent) with a kept-alive
    connection; the child, which has no running loop, runs one of its own."""
    client = async_client(mock, http)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def in_parent_loop(n: int) -> int:
        return asyncio.run_coroutine_threadsafe(ask_async(client, n), loop).result(15)

    try:
        assert in_parent_loop(1) == 1
        (pooled,) = peers(mock, [1])

        async def in_child() -> list[int]:
            return [await ask_async(client, n) for n in (2, 3, 4)]

        forked = Forked(lambda: asyncio.run(in_child()))
        meanwhile = [in_parent_loop(n) for n in (5, 6, 7)]
        assert forked.result() == [2, 3, 4]
        assert meanwhile == [5, 6, 7]
        assert in_parent_loop(8) == 8
        assert pooled not in peers(mock, [2, 3, 4])
        assert peers(mock, [5, 6, 7, 8]) == {pooled}
        asyncio.run_coroutine_threadsafe(client.close(), loop).result(15)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(15)
        loop.close()


@pytest.mark.parametrize("http", ["lunar", "httpx"])
def test_an_async_client_of_an_ended_loop_leaves_the_parents_connection_alone(mock, http):
    """The usual shape: ``asyncio.run`` in the parent, a fork, ``asyncio.run`` in the child.
    The child's loop cannot use the first loop's connection, and it does not close it
    either: closing it there would shut down the socket the parent still holds."""
    client = async_client(mock, http)
    assert asyncio.run(ask_async(client, 1)) == 1
    (pooled,) = peers(mock, [1])

    async def in_child() -> list[int]:
        return [await ask_async(client, n) for n in (2, 3)]

    assert Forked(lambda: asyncio.run(in_child())).result() == [2, 3]
    assert pooled not in peers(mock, [2, 3])
    assert still_open(mock, pooled)
    if http == "lunar":  # (httpx cannot close a connection of an ended loop under another)
        asyncio.run(client.close())


async def test_an_async_client_forked_inside_its_running_loop_works_in_the_childs_loop(mock):
    """A fork from a coroutine (multiprocessing from async code): the child runs a loop of
    its own, and the parent's loop goes on with its pooled connection."""
    client = AsyncLunar(max_retries=0, timeout=10, providers=providers(mock))
    assert await ask_async(client, 1) == 1
    (pooled,) = peers(mock, [1])

    async def in_child() -> list[int]:
        return [await ask_async(client, n) for n in (2, 3)]

    forked = Forked(lambda: asyncio.run(in_child()))
    assert [await ask_async(client, n) for n in (4, 5)] == [4, 5]
    assert await asyncio.get_running_loop().run_in_executor(None, forked.result) == [2, 3]
    assert await ask_async(client, 6) == 6
    assert pooled not in peers(mock, [2, 3])
    assert peers(mock, [4, 5, 6]) == {pooled}
    await client.close()


def test_locks_held_by_another_thread_at_the_fork_do_not_hang_the_child(mock):
    """A thread of the parent inside the pool (or the providers' health) when another
    forks: the child inherits those locks held, by a thread it does not have."""
    client = Lunar(max_retries=0, timeout=10, providers=providers(mock))
    assert ask(client, 1) == 1
    locks = [
        client._http._transport._pool._optional_thread_lock,
        client._engine.router.health._lock,
    ]
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        for lock in locks:
            lock.__enter__()
        holding.set()
        release.wait(30)
        for lock in reversed(locks):
            lock.__exit__(None, None, None)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(10)
        forked = Forked(lambda: [ask(client, n) for n in (2, 3)])
    finally:
        release.set()
        thread.join(10)
    assert forked.result() == [2, 3]
    assert ask(client, 4) == 4
    client.close()


def test_providers_health_is_the_childs_as_it_stood_at_the_fork():
    """An open breaker stays open in the child (its health is data, true for the child too);
    each process learns on its own from then on."""
    health = Health()
    dep = Deployment("m", "openai", "m", None)
    for _ in range(3):
        health.failure(dep)
    forked = Forked(lambda: [health.snapshot(dep)["cooling_down"], health.success(dep, 0.1, 0.2)])
    assert forked.result() == [True, None]
    assert health.snapshot(dep)["samples"] == 3  # the child's success is the child's


def test_health_half_changed_at_the_fork_starts_empty_in_the_child():
    """One of the parent's threads held the health's lock at the fork (its books perhaps
    half-changed): the child has none of them, and waits on no lock."""
    health = Health()
    dep = Deployment("m", "openai", "m", None)
    health.failure(dep)
    with health._lock:  # as a thread of the parent recording an outcome would
        forked = Forked(lambda: health.snapshot(dep)["samples"])
    assert forked.result() == 0
    assert health.snapshot(dep)["samples"] == 1
