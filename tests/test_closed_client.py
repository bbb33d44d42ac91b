"""A closed client, over real sockets: ``Lunar`` and ``AsyncLunar`` (on Lunar's pool, on
httpx, on the caller's httpx client) all raise ``ClientClosedError`` at once, before any
attempt, without a retry, a fallback or a word to the providers' health."""

from __future__ import annotations

import asyncio
import inspect

import httpx
import pytest

from lunar import AsyncLunar, ClientClosedError, Lunar, LunarError, _http
from lunar.testing import Reply

MESSAGES = [{"role": "user", "content": "Write a short story about a robot."}]
MODES = ["sync", "sync-httpx", "async-pool", "async-httpx", "async-caller-httpx"]


def client_for(mode: str, monkeypatch: pytest.MonkeyPatch, **kw):
    if mode == "sync":
        return Lunar(**kw)
    if mode == "sync-httpx":
        return Lunar(**kw, http_client=httpx.Client())
    if mode == "async-pool":
        client = AsyncLunar(**kw)
        assert isinstance(client._http, _http.AsyncPool)
        return client
    if mode == "async-httpx":  # AsyncLunar's own httpx client (no httptools, or a proxy)
        with monkeypatch.context() as m:
            m.setattr(_http, "available", lambda: False)
            client = AsyncLunar(**kw)
        assert isinstance(client._http, httpx.AsyncClient)
        return client
    return AsyncLunar(**kw, http_client=httpx.AsyncClient())


async def call(result):
    return (await result) if inspect.isawaitable(result) else result


def health_records(client) -> dict:
    return dict(client._engine.router.health._stats)


REQUESTS = {
    "chat": lambda c: c.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, fallbacks=["claude-3-haiku"]
    ),
    "chat-stream": lambda c: c.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, fallbacks=["claude-3-haiku"], stream=True
    ),
    "legacy": lambda c: c.completions.create(model="gpt-4o-mini", prompt="Say hi"),
    "legacy-stream": lambda c: c.completions.create(
        model="gpt-4o-mini", prompt="Say hi", stream=True
    ),
    "local-model": lambda c: c.chat.completions.create(model="smollm2", messages=MESSAGES),
}


@pytest.mark.parametrize("request_kind", list(REQUESTS))
@pytest.mark.parametrize("mode", MODES)
async def test_a_closed_client_raises_at_once_without_any_attempt(
    mock, monkeypatch, mode, request_kind
):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", mock.url)
    client = client_for(mode, monkeypatch, max_retries=2)
    assert (await call(REQUESTS["chat"](client))).usage  # it works while open
    before = len(mock.requests)
    health = health_records(client)
    await call(client.close())
    with pytest.raises(ClientClosedError, match="client is closed") as info:
        await call(REQUESTS[request_kind](client))
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, LunarError)
    assert "create a new client" in str(info.value)
    assert info.value.attempts == []
    assert len(mock.requests) == before
    assert health_records(client) == health
    if mode.endswith("-httpx") and mode != "async-httpx":
        await call(client._http.close() if mode == "sync-httpx" else client._http.aclose())


@pytest.mark.parametrize("mode", MODES)
async def test_a_closed_client_in_remote_mode_asks_the_gateway_nothing(mock, monkeypatch, mode):
    client = client_for(mode, monkeypatch, base_url=mock.base_url, api_key="k")
    await call(client.close())
    requests = [
        lambda: client.models.list(),
        lambda: client.models.retrieve("gpt-4o-mini"),
        lambda: REQUESTS["chat"](client),
    ]
    for request in requests:
        with pytest.raises(ClientClosedError, match="client is closed"):
            await call(request())
    assert mock.requests == []


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_http_client_closed_by_its_owner_says_so(mock, mode):
    """The caller's ``http_client`` is the caller's to close; once it is, the Lunar client
    over it says so, as a closed client does."""
    if mode == "sync":
        own: httpx.Client | httpx.AsyncClient = httpx.Client()
        client: Lunar | AsyncLunar = Lunar(http_client=own)
        own.close()
    else:
        own = httpx.AsyncClient()
        client = AsyncLunar(http_client=own)
        await own.aclose()
    with pytest.raises(ClientClosedError, match="http_client given to this Lunar client"):
        await call(REQUESTS["chat"](client))
    assert mock.requests == []
    assert health_records(client) == {}


async def test_an_async_client_closed_while_backing_off_stops_there(mock):
    """Closed between a failed attempt and its retry: the retry is not made, nor a fallback
    tried, and the close is no failure of the provider."""
    mock.enqueue(Reply(status=500), model="gpt-4o-mini")
    client = AsyncLunar(max_retries=2)
    task = asyncio.ensure_future(REQUESTS["chat"](client))
    while not mock.requests:
        await asyncio.sleep(0.01)
    await client.close()
    with pytest.raises(ClientClosedError):
        await asyncio.wait_for(task, 5)
    assert len(mock.requests) == 1
    errors = [type(a.error).__name__ for a in task.exception().attempts]
    assert errors == ["ServerError", "ClientClosedError"]
    ((_, stats),) = health_records(client).items()  # the 500, nothing for the close
    assert (len(stats.outcomes), stats.failed) == (1, 1)


async def _next(stream):
    return await stream.__anext__() if hasattr(stream, "__anext__") else next(stream)


async def _rest(stream):
    if hasattr(stream, "__anext__"):
        return [c async for c in stream]
    return list(stream)


async def _close(client):
    await call(client.close())


@pytest.mark.parametrize("mode", MODES)
async def test_closing_a_client_ends_its_streams_in_flight(mock, monkeypatch, mode):
    """On the async pool, or with the caller's own httpx client (which stays open), a
    stream went on to its end after close(), while Lunar's own httpx client ended it: the
    same ClientClosedError now, whatever the client."""
    mock.default = Reply(chunks=40, pacing=0.005)
    client = client_for(mode, monkeypatch)
    stream = await call(
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    )
    await _next(stream)
    await _next(stream)
    await _close(client)
    with pytest.raises(ClientClosedError):
        await _rest(stream)
    assert health_records(client) == {}  # not the provider's doing


@pytest.mark.parametrize("mode", ["sync", "async-pool"])
async def test_closing_a_client_ends_its_local_streams_and_frees_the_model(mode, monkeypatch):
    pytest.importorskip("llama_cpp")
    from lunar.providers import local

    try:
        local.bundled_model_path()
    except Exception as exc:
        pytest.skip(f"bundled GGUF not available: {exc}")
    long = {"role": "user", "content": "Write a very long story."}
    client = client_for(mode, monkeypatch)
    stream = await call(
        client.chat.completions.create(
            model="smollm2", messages=[long], stream=True, max_tokens=1500, temperature=2.0
        )
    )
    await _next(stream)
    await _next(stream)
    await _close(client)
    with pytest.raises(ClientClosedError):
        await _rest(stream)
    # The generation stopped: the next local request is served (not after 1,500 tokens).
    fresh = client_for(mode, monkeypatch)
    answer = await call(
        fresh.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=3, timeout=30)
    )
    assert answer.choices[0].message.content
    await _close(fresh)
