"""``client.with_options(...)`` / ``client.copy(...)``, as in the openai SDK: a client with
some options changed that shares the original's connections, catalogue and health (against
the emulator, over real sockets)."""

from __future__ import annotations

import gc
import inspect
from typing import Any

import httpx
import pytest

from lunar import APITimeoutError, AsyncLunar, ClientClosedError, Lunar, ServerError
from lunar._http import AsyncPool
from lunar.testing import Reply

MESSAGES = [{"role": "user", "content": "Hi"}]

#: Lunar's own pool (sync: httpx; async: Lunar's pool, or httpx when a proxy is set), or a
#: caller's httpx client.
MODES = ["sync", "sync-httpx", "async", "async-own-httpx", "async-httpx"]


def client_for(mode: str, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Any:
    if mode == "sync-httpx":
        return Lunar(**kw, http_client=httpx.Client(headers={"x-custom": "1"}))
    if mode == "async-httpx":
        return AsyncLunar(**kw, http_client=httpx.AsyncClient(headers={"x-custom": "1"}))
    if mode == "async-own-httpx":  # a proxy configured: AsyncLunar's own client is httpx
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        client = AsyncLunar(**kw)
        assert isinstance(client._http, httpx.AsyncClient)
        return client
    client = (Lunar if mode == "sync" else AsyncLunar)(**kw)
    if mode == "async":
        assert isinstance(client._http, AsyncPool)
    return client


async def call(result: Any) -> Any:
    return (await result) if inspect.isawaitable(result) else result


async def create(client: Any, **kw: Any) -> Any:
    return await call(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **kw))


async def close(client: Any) -> None:
    await call(client.close())


@pytest.mark.parametrize("mode", MODES)
async def test_with_options_changes_headers_for_the_copy_only(mock, monkeypatch, mode):
    client = client_for(mode, monkeypatch, default_headers={"x-team": "a", "x-tier": "gold"})
    copy = client.with_options(default_headers={"X-Team": "b", "x-run": "7"})
    await create(copy)
    sent = mock.requests[-1].headers
    assert (sent["x-team"], sent["x-tier"], sent["x-run"]) == ("b", "gold", "7")
    assert sent["user-agent"].startswith("lunar-python/")
    assert sent["authorization"] == "Bearer sk-openai"
    await create(copy, extra_headers={"x-run": "8"})  # a request's own still win
    assert mock.requests[-1].headers["x-run"] == "8"

    # set_default_headers replaces the client's (the user agent stays, as in the openai SDK).
    bare = client.copy(set_default_headers={"x-only": "1"})
    await create(bare)
    sent = mock.requests[-1].headers
    assert sent["x-only"] == "1" and "x-team" not in sent and "x-tier" not in sent
    assert sent["user-agent"].startswith("lunar-python/")
    await create(bare, extra_headers={"x-team": "c"})  # asked for again per request: sent
    assert mock.requests[-1].headers["x-team"] == "c"

    # The original is as it was.
    await create(client)
    sent = mock.requests[-1].headers
    assert (sent["x-team"], sent["x-tier"]) == ("a", "gold") and "x-run" not in sent
    if mode.endswith("-httpx") and mode != "async-own-httpx":
        assert sent["x-custom"] == "1"
    assert copy._http is client._http and bare._http is client._http
    await close(client)


@pytest.mark.parametrize("mode", MODES)
async def test_with_options_max_retries_and_timeout(mock, monkeypatch, mode):
    client = client_for(mode, monkeypatch, max_retries=1)
    failing = Reply(status=500, retry_after_ms=1)
    mock.enqueue(failing, failing, model="gpt-4o-mini")
    with pytest.raises(ServerError) as info:
        await create(client.with_options(max_retries=0))
    assert len(info.value.attempts) == 1
    assert len(mock.requests) == 1
    mock.reset()

    mock.enqueue(Reply(delay=0.5), model="gpt-4o-mini")
    with pytest.raises(APITimeoutError):
        await create(client.with_options(timeout=0.05, max_retries=0))
    # The original's timeout (600 s) waits for the same answer.
    mock.enqueue(Reply(delay=0.2), model="gpt-4o-mini")
    assert (await create(client)).choices[0].message.content
    # A request's own timeout still wins over the copy's.
    mock.enqueue(Reply(delay=0.2), model="gpt-4o-mini")
    slow = client.with_options(timeout=0.05, max_retries=0)
    assert (await create(slow, timeout=30)).choices[0].message.content
    assert client.max_retries == 1 and slow.max_retries == 0
    assert slow.timeout.read == 0.05 and client.timeout.read == 600
    await close(client)


def test_the_copy_matches_the_openai_sdks(mock):
    """The same ``with_options()`` call on both SDKs sends the same headers and as many
    requests."""
    import openai

    theirs = openai.OpenAI(
        base_url=mock.base_url, api_key="sk-openai", default_headers={"x-team": "a"}
    )
    ours = Lunar(default_headers={"x-team": "a"})
    failing = Reply(status=500, retry_after_ms=1)
    sent = []
    for sdk in (theirs, ours):
        mock.reset()
        mock.enqueue(failing, failing, failing, model="gpt-4o-mini")
        copy: Any = sdk.with_options(max_retries=1, default_headers={"x-run": "7"})
        with pytest.raises(Exception) as info:
            copy.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert getattr(info.value, "status_code", None) == 500
        sent.append([(r.headers["x-team"], r.headers["x-run"]) for r in mock.requests])
        assert sdk.max_retries == 2 and copy.max_retries == 1
    assert sent[0] == sent[1] == [("a", "7"), ("a", "7")]


@pytest.mark.parametrize("mode", ["sync", "async", "async-own-httpx"])
async def test_closing_a_copy_never_closes_the_shared_pool(mock, monkeypatch, mode):
    client = client_for(mode, monkeypatch)
    copy = client.with_options(max_retries=0)
    await create(copy)
    await close(copy)
    with pytest.raises(ClientClosedError):
        await create(copy)
    assert (await create(client)).choices  # the original's connections are open
    assert not client._http.is_closed

    # One used once and dropped: collected, the pool is untouched.
    await create(client.with_options(timeout=30))
    gc.collect()
    assert (await create(client)).choices

    # A copy whose original was dropped keeps the pool open (it holds it).
    orphan = client_for(mode, monkeypatch).with_options(max_retries=0)
    gc.collect()
    assert (await create(orphan)).choices

    # Closing the original closes the pool for its copies, which say so.
    other = client.with_options(max_retries=1).with_options(timeout=30)
    await close(client)
    with pytest.raises(ClientClosedError, match="copied from"):
        await create(other)
    await close(orphan)


def test_copy_shares_catalogue_and_health_and_can_change_fallbacks(mock, monkeypatch):
    client = Lunar(fallbacks={"gpt-4o-mini": ["llama-3.1-8b"]})
    copy = client.with_options(fallbacks={"gpt-4o-mini": ["claude-3-haiku"]})
    assert copy.catalog is client.catalog
    assert copy._settings.router.health is client._settings.router.health
    assert client._settings.router.fallbacks == {"gpt-4o-mini": ["llama-3.1-8b"]}
    assert copy._settings.router.fallbacks == {"gpt-4o-mini": ["claude-3-haiku"]}
    # The fallbacks a copy was given are the ones it tries.
    mock.enqueue(Reply(status=500), Reply(status=500), model="gpt-4o-mini")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-a")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", mock.url)
    answer = client.with_options(max_retries=0, fallbacks={"gpt-4o-mini": ["claude-3-haiku"]})
    assert answer.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    assert [r.model for r in mock.requests][-2:] == ["gpt-4o-mini", "claude-3-haiku-20240307"]


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"timeout": httpx.Timeout(5, read=float("nan"))}, "timeout.read"),
        ({"default_headers": {"x": 1}}, "default_headers"),
        ({"set_default_headers": "x"}, "set_default_headers"),
        ({"default_headers": {"a": "1"}, "set_default_headers": {"b": "2"}}, "set_default_headers"),
        ({"fallbacks": ["x"]}, "fallbacks"),
        ({"default_query": {"v": [1]}}, "default_query.v"),
        ({"set_default_query": "x"}, "set_default_query"),
        ({"default_query": {"a": "1"}, "set_default_query": {"b": "2"}}, "set_default_query"),
        ({"base_url": "127.0.0.1:4000/v1"}, "base_url"),
        ({"api_key": "lk-1"}, "gateway key"),
    ],
)
def test_with_options_checks_its_options_as_the_constructor_does(kwargs, names):
    client = Lunar()
    with pytest.raises(ValueError, match=names):
        client.with_options(**kwargs)
    if not {"set_default_headers", "set_default_query", "fallbacks"} & set(kwargs):
        with pytest.raises(ValueError, match=names):
            Lunar(**kwargs)
    with pytest.raises(TypeError):
        client.with_options(providers={})  # type: ignore[call-arg]


@pytest.mark.parametrize("mode", ["sync", "async", "async-httpx"])
async def test_remote_copies_send_their_own_hop_headers(mock, monkeypatch, mode):
    """Through a gateway, the copy's ``max_retries`` and timeout are what the gateway is told
    (``x-lunar-max-retries``, ``x-lunar-timeout-ms``), and its fallbacks travel in the body."""
    client = client_for(mode, monkeypatch, base_url=mock.base_url, api_key="lk")
    await create(client)
    sent = mock.requests[-1].headers
    assert (sent["x-lunar-max-retries"], sent["x-lunar-timeout-ms"]) == ("2", "599000")
    copy = client.with_options(
        max_retries=0, timeout=5, fallbacks={"gpt-4o-mini": ["claude-3-haiku"]}
    )
    await create(copy)
    sent = mock.requests[-1]
    assert (sent.headers["x-lunar-max-retries"], sent.headers["x-lunar-timeout-ms"]) == (
        "0",
        "4500",
    )
    assert sent.headers["x-api-key"] == "lk"
    assert sent.json["fallbacks"] == ["claude-3-haiku"]
    await create(client.with_options(timeout=None))
    assert "x-lunar-timeout-ms" not in mock.requests[-1].headers
    await create(client)  # the original's, as before
    sent = mock.requests[-1].headers
    assert (sent["x-lunar-max-retries"], sent["x-lunar-timeout-ms"]) == ("2", "599000")
    assert "fallbacks" not in mock.requests[-1].json
    models = await call(copy.models.list())
    assert models.data and mock.requests[-1].headers["x-api-key"] == "lk"
    await close(client)


async def test_a_copy_keeps_a_caller_http_clients_own_timeout(mock):
    """As the constructor: a timeout left out defers to the caller's client's own; one given
    to ``with_options()`` replaces it."""
    http = httpx.AsyncClient(timeout=0.05)
    client = AsyncLunar(http_client=http, max_retries=0)
    mock.enqueue(Reply(delay=0.5), model="gpt-4o-mini")
    with pytest.raises(APITimeoutError):
        await create(client.with_options(default_headers={"x": "1"}))
    mock.enqueue(Reply(delay=0.2), model="gpt-4o-mini")
    assert (await create(client.with_options(timeout=30))).choices
    await http.aclose()


# -- api_key, base_url, http_client ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async", "async-httpx"])
async def test_a_copy_with_another_base_url_or_key_sends_there_with_it(mock, monkeypatch, mode):
    """``with_options(base_url=..., api_key=...)``, as the openai SDK's: they were a
    TypeError. The copy's requests go to its gateway with its key; the original's stay as
    they were. The pool is the same object (it keeps connections per host, so the new
    gateway gets connections of its own); the routes and their health are the copy's own."""
    from lunar.testing import MockServer

    client = client_for(mode, monkeypatch, base_url=mock.base_url, api_key="lk-a")
    with MockServer() as other:
        moved = client.with_options(base_url=other.base_url)
        rekeyed = client.with_options(api_key="lk-b", max_retries=0)
        for copy in (moved, rekeyed):
            assert copy._http is client._http
            assert copy._settings.router.health is not client._settings.router.health
        await create(moved)
        assert len(other.requests) == 1 and not mock.requests
        sent = other.requests[-1]
        assert (sent.path, sent.headers["x-api-key"]) == ("/v1/chat/completions", "lk-a")
        await call(moved.models.list())
        assert len(other.requests) == 2 and not mock.requests
        await create(rekeyed)
        assert mock.requests[-1].headers["x-api-key"] == "lk-b"
        assert mock.requests[-1].headers["x-lunar-max-retries"] == "0"
        await create(client)  # the original's, as before
        assert mock.requests[-1].headers["x-api-key"] == "lk-a" and len(other.requests) == 2
        # Both at once, and a copy of a copy.
        both = rekeyed.with_options(base_url=other.base_url, api_key="lk-c")
        await create(both)
        assert other.requests[-1].headers["x-api-key"] == "lk-c"
    await close(client)


def test_a_copy_into_another_mode_never_carries_the_other_sides_key(mock, monkeypatch):
    """Direct mode's ``api_key`` is OpenAI's and a gateway's key is no provider's: a copy
    that moves between the two takes the credential of its own side (given, or from the
    environment), never the original's."""
    from lunar import AuthenticationError

    direct = Lunar(api_key="sk-mine")
    with pytest.raises(AuthenticationError, match="LUNAR_API_KEY"):
        direct.with_options(base_url=mock.base_url)
    remote = direct.with_options(base_url=mock.base_url, api_key="lk-a")
    create_sync(remote)
    sent = mock.requests[-1].headers
    assert sent["x-api-key"] == "lk-a" and "authorization" not in sent
    create_sync(remote.with_options(base_url=None))  # back to direct: OPENAI_API_KEY
    sent = mock.requests[-1].headers
    assert sent["authorization"] == "Bearer sk-openai" and "x-api-key" not in sent
    assert "x-lunar-max-retries" not in sent
    create_sync(direct.with_options(api_key="sk-other"))  # direct: OpenAI's key
    assert mock.requests[-1].headers["authorization"] == "Bearer sk-other"
    create_sync(direct)
    assert mock.requests[-1].headers["authorization"] == "Bearer sk-mine"
    # A key given in providers= is replaced by the copy's, the rest of OpenAI's settings kept.
    given = Lunar(providers={"openai": {"api_key": "sk-1", "base_url": mock.base_url}})
    create_sync(given.with_options(api_key="sk-2"))
    assert mock.requests[-1].headers["authorization"] == "Bearer sk-2"


def test_a_copy_with_its_own_http_client_sends_with_it(mock):
    client = Lunar(default_headers={"x-team": "a"})
    http = httpx.Client(headers={"x-mine": "1"})
    copy = client.with_options(http_client=http)
    assert copy._http is http
    create_sync(copy)
    sent = mock.requests[-1].headers
    assert (sent["x-mine"], sent["x-team"]) == ("1", "a")
    copy.close()
    assert not http.is_closed  # the caller's, as a client given one leaves it
    create_sync(client)
    assert "x-mine" not in mock.requests[-1].headers
    client.close()
    assert not http.is_closed
    http.close()


def test_the_copy_with_another_base_url_matches_the_openai_sdks(mock):
    """The same ``with_options(base_url=..., api_key=...)`` on both SDKs: the same server,
    the same path, each SDK's credential header carrying the new key."""
    import openai

    from lunar.testing import MockServer

    with MockServer() as other:
        theirs = openai.OpenAI(base_url=mock.base_url, api_key="sk-a", max_retries=0)
        ours = Lunar(base_url=mock.base_url, api_key="lk-a", max_retries=0)
        theirs.with_options(base_url=other.base_url, api_key="sk-b").chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        create_sync(ours.with_options(base_url=other.base_url, api_key="lk-b"))
        want, got = other.requests
        assert want.path == got.path == "/v1/chat/completions"
        assert (want.headers["authorization"], got.headers["x-api-key"]) == ("Bearer sk-b", "lk-b")
    assert not mock.requests


def create_sync(client: Any) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
