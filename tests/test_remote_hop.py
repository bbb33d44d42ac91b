"""Remote mode's hop to the gateway is honest about retries, timeouts and attempts: the SDK
and a real `lunar serve` process (both at their default retry budgets) in front of the
emulator, counting the requests the upstream received."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import lunar
from lunar.testing import MockServer, Reply

from .test_remote_parity import call, collect, raised
from .test_server import CONFIG, MESSAGES, GatewayProcess

pytest.importorskip("uvicorn")

# The gateway at its default retry budget (2 per model), a read timeout no test reaches,
# and a 1 s rate-limit window (a key's 429 says "Retry-After: 1").
HOP_CONFIG = (
    CONFIG.replace("max_retries = 0", "max_retries = 2")
    .replace("timeout_seconds = 2.0", "timeout_seconds = 60.0")
    .replace("window_seconds = 60", "window_seconds = 1")
)


@pytest.fixture(scope="module")
def gw(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(tmp_path_factory.mktemp("gateway"), upstream, HOP_CONFIG)
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _fresh(upstream: MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct mode (for the parity checks) sees the emulator the gateway sees."""
    upstream.reset()
    for p in ("OPENAI", "GROQ", "TOGETHER", "FIREWORKS"):
        monkeypatch.setenv(f"{p}_API_KEY", f"sk-{p.lower()}")
        monkeypatch.setenv(f"{p}_BASE_URL", upstream.base_url)


@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def remote(gw: GatewayProcess, flavor: str, key: str | None = None, **kw: Any) -> Any:
    cls = lunar.Lunar if flavor == "sync" else lunar.AsyncLunar
    return cls(base_url=gw.url + "/v1", api_key=key or gw.new_key()[0], **kw)


def direct(flavor: str, **kw: Any) -> Any:
    return (lunar.Lunar if flavor == "sync" else lunar.AsyncLunar)(**kw)


def received(upstream: MockServer, *models: str) -> list[str]:
    """The models of the requests the upstream received, of those named."""
    return [r.model for r in upstream.requests if r.model in models]  # type: ignore[misc]


def attempts_view(err: lunar.LunarError) -> list[tuple[str, str, str, Any, Any]]:
    return [
        (
            a.model,
            a.provider,
            type(a.error).__name__,
            getattr(a.error, "status_code", None),
            getattr(a.error, "code", None),
        )
        for a in err.attempts
    ]


def post(gw: GatewayProcess, key: str, model: str, **headers: str) -> httpx.Response:
    return gw.http.post(
        "/v1/chat/completions",
        headers={"x-api-key": key, **headers},
        json={"model": model, "messages": MESSAGES},
    )


FAILING = Reply(status=503, retry_after=0)  # retried at once, by whoever retries


# ---------------------------------------------------------------------------------------------
# 1. The gateway's give-up is final: retries do not stack


async def test_a_failure_the_gateway_retried_is_not_retried_again_by_the_sdk(gw, upstream, flavor):
    """SDK and gateway at their defaults (2 retries each): the gateway retried the upstream's
    503 twice, gave up, and the SDK started the whole chain again, twice: 9 upstream
    requests for one call. The gateway's answer now says ``x-should-retry: false``."""
    model = f"hop-{flavor}"
    upstream.enqueue(*[FAILING] * 12, model=model)
    client = remote(gw, flavor)
    try:
        err = await raised(
            lambda: client.chat.completions.create(model=f"openai/{model}", messages=MESSAGES)
        )
    finally:
        await call(client.close())
    assert isinstance(err, lunar.ServiceUnavailableError)
    assert received(upstream, model) == [model] * 3


async def test_fallbacks_the_gateway_tried_are_not_tried_again_by_the_sdk(gw, upstream, flavor):
    """The client's fallbacks travel to the gateway, which tries them once: with the model
    and its fallback failing, 3 + 3 upstream requests, not three times as many."""
    model, fallback = f"hopm-{flavor}", f"hopf-{flavor}"
    upstream.enqueue(*[FAILING] * 12, model=model)
    upstream.enqueue(*[FAILING] * 12, model=fallback)
    client = remote(gw, flavor, fallbacks={f"openai/{model}": [f"openai/{fallback}"]})
    try:
        err = await raised(
            lambda: client.chat.completions.create(
                model=f"openai/{model}", messages=MESSAGES, stream=True
            )
        )
    finally:
        await call(client.close())
    assert isinstance(err, lunar.ServiceUnavailableError)
    assert received(upstream, model, fallback) == [model] * 3 + [fallback] * 3


async def test_the_sdk_still_retries_the_gateways_own_rate_limit(gw, upstream, flavor):
    """What the gateway did not retry, the SDK does: a key's rate limit (429 with
    ``Retry-After``, no ``x-should-retry``) is waited out and sent again."""
    key, _ = gw.new_key(rpm=1)
    client = remote(gw, flavor, key)
    try:
        for _ in range(2):  # the second is refused once (rpm=1), then served
            done = await call(
                client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
            )
            assert done.choices[0].message.content
    finally:
        await call(client.close())
    assert len(received(upstream, "gpt-4o-mini")) == 2

    client = remote(gw, flavor, key, max_retries=0)
    try:
        err = await raised(
            lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
    finally:
        await call(client.close())
    assert isinstance(err, lunar.RateLimitError)
    assert err.code == "rate_limit_exceeded"
    assert attempts_view(err) == [("gpt-4o-mini", "lunar", "RateLimitError", 429, err.code)]


async def test_the_sdk_still_retries_a_gateway_it_could_not_reach(flavor):
    """A connection refused by the gateway itself is retried (and shows as such)."""
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = (lunar.Lunar if flavor == "sync" else lunar.AsyncLunar)(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="lk-" + "a" * 32, max_retries=1
    )
    try:
        err = await raised(
            lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
    finally:
        await call(client.close())
    assert isinstance(err, lunar.APIConnectionError)
    assert [(a.provider, type(a.error).__name__) for a in err.attempts] == [
        ("lunar", "APIConnectionError")
    ] * 2


# ---------------------------------------------------------------------------------------------
# 2. e.attempts shows what the gateway did


async def test_attempts_show_the_gateways_upstream_attempts_as_direct_mode_does(
    gw, upstream, flavor
):
    """``e.attempts`` in remote mode held one entry, the hop ("lunar"); the gateway now
    reports its attempts (model, provider, status, error) and they read as direct mode's."""
    model, fallback = f"openai/att-{flavor}", f"openai/attf-{flavor}"
    views = []
    for client in (
        direct(flavor),
        remote(gw, flavor),
    ):
        upstream.reset()
        upstream.enqueue(FAILING, Reply(status=502), FAILING, model=model[7:])
        upstream.enqueue(Reply(status=429, retry_after=90), model=fallback[7:])
        try:
            err = await raised(
                lambda c=client: c.chat.completions.create(
                    model=model, messages=MESSAGES, fallbacks=[fallback, "no-such-model"]
                )
            )
        finally:
            await call(client.close())
        views.append(([(a.model, a.provider, a.error.status_code) for a in err.attempts], str(err)))
    direct_view, remote_view = views
    assert direct_view[0] == [
        (model, "openai", 503),
        (model, "openai", 502),
        (model, "openai", 503),
        (fallback, "openai", 429),
        ("no-such-model", "?", 404),
    ]
    assert remote_view == direct_view


async def test_a_mid_stream_failure_shows_the_gateways_attempts(gw, upstream, flavor):
    model = f"mid-{flavor}"
    upstream.enqueue(FAILING, Reply(chunks=5, error_after=2), model=model)
    client = remote(gw, flavor)
    try:
        stream = await call(
            client.chat.completions.create(model=f"openai/{model}", messages=MESSAGES, stream=True)
        )
        with pytest.raises(lunar.APIError) as info:
            await collect(stream)
    finally:
        await call(client.close())
    assert [(a.provider, a.error.status_code) for a in info.value.attempts] == [
        ("openai", 503),
        ("openai", 500),
    ]
    assert info.value.attempts[-1].error.message == info.value.message


def test_the_gateways_error_lists_its_attempts_for_any_client(gw, upstream):
    """The wire: ``x-should-retry: false`` and ``attempts`` beside ``error`` (what the
    openai SDK, or curl, sees too)."""
    key, _ = gw.new_key()
    upstream.enqueue(*[Reply(status=503, retry_after=0)] * 3, model="wire")
    r = post(gw, key, "openai/wire")
    assert r.status_code == 503
    assert r.headers["x-should-retry"] == "false"
    body = r.json()
    assert [(a["model"], a["provider"], a["status"], a["type"]) for a in body["attempts"]] == [
        ("openai/wire", "openai", 503, body["error"]["type"])
    ] * 3
    assert body["attempts"][-1]["message"] == body["error"]["message"]
