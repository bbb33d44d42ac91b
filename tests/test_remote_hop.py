"""Remote mode's hop to the gateway is honest about retries, timeouts and attempts: the SDK
and a real `lunar serve` process (both at their default retry budgets) in front of the
emulator, counting the requests the upstream received."""

from __future__ import annotations

import asyncio
import select
import socket
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import httpx
import pytest

import lunar
from lunar.testing import MockServer, Reply

from .test_relay import MASTER as IN_PROCESS_MASTER
from .test_relay import gateway
from .test_remote_parity import call, collect, direct_env, raised
from .test_server import CONFIG, MASTER, MESSAGES, GatewayProcess

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
    direct_env(upstream, monkeypatch, native=False)


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


async def test_a_provider_cooling_down_is_still_tried_so_no_give_up_comes_untried(upstream):
    """Every deployment of the request cooling down (its breaker open) does not make the
    gateway give up without trying, which would say ``x-should-retry: false`` for nothing
    sent: a deployment cooling down is tried last, never skipped. It fails again: the
    give-up lists the attempts it made; it has recovered: it serves."""
    async with gateway(upstream) as (base, _, server):
        app = server.config.app
        (dep,) = app.catalog.resolve("openai/cooling")
        headers = {"authorization": f"Bearer {IN_PROCESS_MASTER}"}
        body = {"model": "openai/cooling", "messages": MESSAGES}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
            upstream.enqueue(*[FAILING] * 3, model="cooling")
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 503
            assert app.router.health.cooling_down(dep)

            upstream.enqueue(*[FAILING] * 3, model="cooling")
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 503
            assert r.headers["x-should-retry"] == "false"
            assert [(a["provider"], a["status"]) for a in r.json()["attempts"]] == [
                ("openai", 503)
            ] * 3
            assert len(received(upstream, "cooling")) == 6

            assert app.router.health.cooling_down(dep)
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200
            assert len(received(upstream, "cooling")) == 7


# ---------------------------------------------------------------------------------------------
# 2. e.attempts shows what the gateway did


async def test_attempts_show_the_gateways_upstream_attempts_as_direct_mode_does(
    gw, upstream, flavor
):
    """``e.attempts`` in remote mode held one entry, the hop ("lunar"); the gateway now
    reports its attempts (model, provider, status, error) and they read as direct mode's."""
    views = []
    for run, client in enumerate(
        (
            direct(flavor),
            remote(gw, flavor, key=MASTER),  # told in full: the same words too
            remote(gw, flavor),  # a virtual key: the same attempts, the gateway's words
        )
    ):
        # Models of each run's own: the gateway's health learns from the run before.
        model, fallback = f"openai/att{run}-{flavor}", f"openai/attf{run}-{flavor}"
        upstream.reset()
        upstream.enqueue(FAILING, Reply(status=502), FAILING, model=model[7:])
        upstream.enqueue(Reply(status=429, retry_after=90), model=fallback[7:])
        try:
            err = await raised(
                lambda c=client, m=model, f=fallback: c.chat.completions.create(
                    model=m, messages=MESSAGES, fallbacks=[f, "no-such-model"]
                )
            )
        finally:
            await call(client.close())
        names = {model: "model", fallback: "fallback"}
        attempts = [
            (names.get(a.model, a.model), a.provider, a.error.status_code) for a in err.attempts
        ]
        views.append((attempts, str(err).replace(model, "model").replace(fallback, "fallback")))
    direct_view, master_view, remote_view = views
    assert direct_view[0] == [
        ("model", "openai", 503),
        ("model", "openai", 502),
        ("model", "openai", 503),
        ("fallback", "openai", 429),
        ("no-such-model", "?", 404),
    ]
    assert master_view == direct_view
    assert remote_view[0] == direct_view[0]
    assert "sk-" not in remote_view[1] and "http" not in remote_view[1]


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


# ---------------------------------------------------------------------------------------------
# 3. The SDK's retry budget and timeout are the gateway's


@pytest.mark.parametrize(("asked", "made"), [(0, 1), (1, 2), (5, 3)])
async def test_the_sdks_max_retries_reaches_the_gateway(gw, upstream, flavor, asked, made):
    """``Lunar(max_retries=n)`` is the retry budget of the whole call: the gateway retries
    each model up to ``n`` times, never more than its own ``max_retries`` (2 here). It
    retried 2 times whatever the client asked."""
    model = f"budget-{asked}-{flavor}"
    upstream.enqueue(*[FAILING] * 12, model=model)
    client = remote(gw, flavor, max_retries=asked)
    try:
        await raised(
            lambda: client.chat.completions.create(model=f"openai/{model}", messages=MESSAGES)
        )
    finally:
        await call(client.close())
    assert len(received(upstream, model)) == made


@pytest.mark.parametrize("stream", [False, True])
async def test_the_sdks_timeout_caps_the_gateways_whole_request(gw, upstream, flavor, stream):
    """``timeout=3`` on create covered only the hop: the gateway waited on the upstream
    (its own 60 s), the SDK gave up at 3 s and sent the request again, twice: three
    upstream requests and an ``APITimeoutError`` that said nothing of them. The SDK now
    sends its deadline (``x-lunar-timeout-ms``), the gateway cuts its attempt there and
    answers a 504 ``deadline_exceeded`` with its attempts, which the SDK does not retry."""
    model = f"slow-{flavor}-{stream}"
    upstream.enqueue(*[Reply(delay=8)] * 4, model=model)
    client = remote(gw, flavor)
    try:
        err = await raised(
            lambda: client.chat.completions.create(
                model=f"openai/{model}", messages=MESSAGES, stream=stream, timeout=3
            )
        )
    finally:
        await call(client.close())
    assert isinstance(err, lunar.GatewayTimeoutError)
    assert isinstance(err, lunar.APITimeoutError)  # one `except` for both modes
    assert err.code == "deadline_exceeded"
    assert "x-lunar-timeout-ms" in str(err)
    assert attempts_view(err) == [
        (f"openai/{model}", "openai", "GatewayTimeoutError", 504, "deadline_exceeded")
    ]
    assert received(upstream, model) == [model]


def test_the_deadline_on_the_wire_and_in_the_ledger(gw, upstream):
    """Any client may send ``x-lunar-timeout-ms``: past it, a 504 ``deadline_exceeded``
    that says not to retry, with the attempt it cut; the ledger tells it from a provider's
    own timeout."""
    key, key_id = gw.new_key()
    upstream.enqueue(Reply(delay=5), model="wire-slow")
    r = post(gw, key, "openai/wire-slow", **{"x-lunar-timeout-ms": "300"})
    assert r.status_code == 504
    assert r.headers["x-should-retry"] == "false"
    body = r.json()
    assert body["error"]["code"] == "deadline_exceeded"
    assert body["error"]["type"] == "timeout_error"
    assert [(a["provider"], a["status"], a["code"]) for a in body["attempts"]] == [
        ("openai", 504, "deadline_exceeded")
    ]
    (row,) = gw.rows(key_id, 1)
    assert (row["error_type"], row["http_status"], row["attempts"]) == (
        "deadline_exceeded",
        504,
        1,
    )
    assert received(upstream, "wire-slow") == ["wire-slow"]


def test_no_retry_waits_past_the_deadline(gw, upstream):
    """A retry whose wait (here the upstream's ``Retry-After: 5``) would end past the
    client's deadline is not waited for: the gateway answers what it has, at once."""
    key, _ = gw.new_key()
    upstream.enqueue(*[Reply(status=503, retry_after=5)] * 3, model="wait-long")
    r = post(gw, key, "openai/wait-long", **{"x-lunar-timeout-ms": "2000"})
    assert r.status_code == 503
    assert r.headers["x-should-retry"] == "false"
    assert received(upstream, "wait-long") == ["wait-long"]


async def test_a_deadline_cut_does_not_count_against_the_provider(mock):
    """The client's short deadline is its own limit: a provider cut at it, again and again,
    is not cooled down (it would have been after 3, moving every caller's traffic)."""
    from lunar._catalog import Catalog
    from lunar._engine import AsyncEngine, Router, _now
    from lunar._http import AsyncPool
    from lunar._request import RequestOptions

    router = Router(Catalog.load(None))
    engine = AsyncEngine(router, AsyncPool(timeout=60))
    mock.enqueue(*[Reply(delay=3)] * 4, model="cut-often")
    try:
        for _ in range(4):
            opts = RequestOptions("openai/cut-often", deadline=_now() + 0.2)
            with pytest.raises(lunar.GatewayTimeoutError) as info:
                await engine.complete({"messages": MESSAGES}, opts)
            assert info.value.code == "deadline_exceeded"
            assert len(info.value.attempts) == 1
    finally:
        await engine.http.aclose()
    (_, target), *_ = router.chain(RequestOptions("openai/cut-often"))
    assert not router.health.cooling_down(target.deployment)  # type: ignore[union-attr]
    assert received(mock, "cut-often") == ["cut-often"] * 4


def in_loop(kind: str, work: Coroutine[Any, Any, None]) -> None:
    """``work`` run in a new event loop of ``kind``: asyncio's, or uvloop (`lunar serve`'s)."""
    if kind == "uvloop":
        loop = pytest.importorskip("uvloop").new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(work)
    finally:
        loop.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_first_chunk_in_when_the_deadline_comes_is_served(upstream, loop):
    """The deadline came in the same turn of the event loop as the bytes that completed the
    attempt (a stream's first chunk; a whole answer goes the same way): the deadline's
    timer cancelled the attempt before it could take what had arrived, and the client got
    a 504 ``deadline_exceeded`` for an answer the gateway had. Here the gateway's loop is
    held while the upstream's first chunk arrives (after a stall) and the deadline passes,
    so the loop finds both at once: the attempt that has its answer is served."""

    async def work() -> None:
        async with gateway(upstream) as (base, _, server):
            pool = server.config.app._http
            upstream.enqueue(Reply(stall_after=0, stall=0.3, chunks=3), model="gpt-4o-mini")
            waiting = []

            async def hold_the_loop_past_the_deadline() -> None:
                while not pool._streaming:  # the upstream's head and role chunk came
                    await asyncio.sleep(0.001)
                (conn,) = pool._streaming
                began = time.perf_counter()  # the request came before: its deadline too
                waiting.append(conn.waiter is not None and not conn.waiter.done())
                select.select([conn.transport.get_extra_info("socket")], [], [], 10)
                while time.perf_counter() < began + 1.05:  # past the 1000 ms deadline
                    time.sleep(0.01)

            holder = asyncio.ensure_future(hold_the_loop_past_the_deadline())
            async with httpx.AsyncClient(timeout=30) as http:
                r = await http.post(
                    f"{base}/v1/chat/completions",
                    headers={
                        "authorization": f"Bearer {IN_PROCESS_MASTER}",
                        "x-lunar-timeout-ms": "1000",
                    },
                    json={"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True},
                )
            await holder
            assert waiting == [True]  # the chunk came while the attempt waited for it
            assert r.status_code == 200, r.text
            assert '"error"' not in r.text
            assert r.text.endswith("data: [DONE]\n\n")

    in_loop(loop, work())


@pytest.mark.parametrize("mode", ["direct", "remote"])
async def test_a_stream_may_outlast_the_timeout_while_its_pauses_do_not(gw, upstream, flavor, mode):
    """The timeout bounds each wait, not a stream's length, in direct mode (as in the
    openai SDK) and through the gateway alike: its deadline stops at the first chunk. Each
    pause (0.3 s) is within the timeout (1 s), the whole stream (at least 1.2 s) is not."""
    client = remote(gw, flavor) if mode == "remote" else direct(flavor)
    upstream.enqueue(Reply(chunks=4, pacing=0.3), model="long-stream")
    try:
        stream = await call(
            client.chat.completions.create(
                model="openai/long-stream", messages=MESSAGES, stream=True, timeout=1.0
            )
        )
        chunks = await collect(stream)
    finally:
        await call(client.close())
    assert chunks[-1].usage is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("mode", ["direct", "remote"])
async def test_a_pause_mid_stream_past_the_timeout_raises_in_the_loop(gw, upstream, flavor, mode):
    """After the first chunk, a pause longer than the timeout is a timeout in the caller's
    loop, in direct mode and through the gateway alike (there the client's own read
    timeout, and it hangs up: the gateway closes the upstream connection)."""
    client = remote(gw, flavor) if mode == "remote" else direct(flavor)
    upstream.enqueue(Reply(chunks=4, stall_after=2, stall=5), model="paused")
    got = []
    try:
        stream = await call(
            client.chat.completions.create(
                model="openai/paused", messages=MESSAGES, stream=True, timeout=1.0
            )
        )
        with pytest.raises(lunar.APITimeoutError):
            if hasattr(stream, "__aiter__"):
                async for chunk in stream:
                    got.append(chunk)
            else:
                for chunk in stream:
                    got.append(chunk)
    finally:
        await call(client.close())
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    assert received(upstream, "paused") == ["paused"]
    for _ in range(300):  # the event loop runs meanwhile (an async client closes in it)
        if upstream.disconnects:
            break
        await asyncio.sleep(0.01)
    assert upstream.disconnects == 1  # in the stall, not after it


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-lunar-timeout-ms", "abc"),
        ("x-lunar-timeout-ms", "0"),
        ("x-lunar-timeout-ms", "1.5"),
        ("x-lunar-timeout-ms", "-100"),
        ("x-lunar-timeout-ms", ""),
        ("x-lunar-max-retries", "-1"),
        ("x-lunar-max-retries", "two"),
    ],
)
def test_a_bad_hop_header_is_a_400_naming_it(gw, upstream, name, value):
    key, _ = gw.new_key()
    r = post(gw, key, "gpt-4o-mini", **{name: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == name
    assert error["code"] == "invalid_header"
    assert name in error["message"]
    assert upstream.requests == []
    # One bad request hurts no other.
    assert post(gw, key, "gpt-4o-mini").status_code == 200


def test_a_huge_deadline_is_no_deadline_to_speak_of(gw, upstream):
    key, _ = gw.new_key()
    headers = {"x-lunar-timeout-ms": "9" * 40, "x-lunar-max-retries": "9" * 40}
    assert post(gw, key, "gpt-4o-mini", **headers).status_code == 200


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, ("1", "19000")),
        ({"timeout": 5}, ("1", "4500")),
        ({"timeout": httpx.Timeout(3, read=0.5)}, ("1", "450")),
        ({"timeout": None}, ("1", None)),
        ({"extra_headers": {"X-Lunar-Timeout-Ms": "1234"}}, ("1", "1234")),
    ],
)
async def test_the_sdk_sends_its_retry_budget_and_deadline(upstream, flavor, kw, expected):
    """What the hop carries (the emulator standing in for the gateway shows it): the
    client's ``max_retries``, and a deadline a little under the read timeout the client
    waits with (the request's, else the client's: a tenth less, at most a second), so the
    gateway's answer comes back in time; none for ``timeout=None``. ``extra_headers``
    win, whatever their case."""
    cls = lunar.Lunar if flavor == "sync" else lunar.AsyncLunar
    client = cls(base_url=upstream.base_url, api_key="lk-x", max_retries=1, timeout=20)
    try:
        await call(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **kw))
    finally:
        await call(client.close())
    (request,) = upstream.requests
    sent = request.headers
    assert (sent.get("x-lunar-max-retries"), sent.get("x-lunar-timeout-ms")) == expected


async def test_a_callers_http_client_timeout_is_the_deadline_sent(upstream, flavor):
    """With an ``http_client`` of the caller's that keeps its own timeout, that is the one
    the client waits with, and so the deadline it sends."""
    own = httpx.Client(timeout=7) if flavor == "sync" else httpx.AsyncClient(timeout=7)
    cls = lunar.Lunar if flavor == "sync" else lunar.AsyncLunar
    client = cls(base_url=upstream.base_url, api_key="lk-x", http_client=own)
    try:
        await call(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    finally:
        await call(client.close())
        await call(own.close() if flavor == "sync" else own.aclose())
    (request,) = upstream.requests
    assert request.headers["x-lunar-timeout-ms"] == "6300"
    assert request.headers["x-lunar-max-retries"] == "2"


@pytest.mark.parametrize(("own", "expected"), [(float("inf"), None), (1e300, "999999999000")])
async def test_a_callers_http_client_without_a_finite_timeout_sends_a_sane_deadline(
    upstream, own, expected
):
    """A caller's ``http_client`` keeps its timeout unvalidated: an infinite one is no
    deadline (the client's construction raised OverflowError), a huge one is capped as
    Lunar's own are (it sent a 301-digit header)."""
    mine = httpx.AsyncClient(timeout=own)
    client = lunar.AsyncLunar(base_url=upstream.base_url, api_key="lk-x", http_client=mine)
    try:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    finally:
        await client.close()
        await mine.aclose()
    (request,) = upstream.requests
    assert request.headers.get("x-lunar-timeout-ms") == expected


async def test_a_relayed_attempt_whose_type_is_no_string_is_no_crash(upstream, flavor):
    """An attempt in a gateway's answer whose ``type`` was not a string (and whose status
    was no number) raised a ``TypeError`` (unhashable) in place of the gateway's error; its
    type is now ignored, as a wrong status is (502)."""
    weird = {"model": "m", "provider": "p", "status": "bad", "type": [1], "message": "x"}
    fine = {"model": "openai/gpt-4o-mini", "provider": "openai", "status": 503,
            "type": "server_error", "message": "down"}  # fmt: skip
    body = {"error": {"message": "gave up", "type": "api_error"}, "attempts": [weird, fine]}
    upstream.enqueue(Reply(status=502, should_retry=False, body=body), model="gpt-4o-mini")
    client = remote_to(upstream, flavor)
    try:
        err = await raised(
            lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        )
    finally:
        await call(client.close())
    assert isinstance(err, lunar.APIError), err
    assert (err.status_code, str(err)) == (502, "[502] gave up")
    assert [(a.model, a.provider, a.error.status_code) for a in err.attempts] == [
        ("m", "p", 502),
        ("openai/gpt-4o-mini", "openai", 503),
    ]


def remote_to(upstream: MockServer, flavor: str) -> Any:
    """A remote-mode client of the emulator standing in for a gateway."""
    cls = lunar.Lunar if flavor == "sync" else lunar.AsyncLunar
    return cls(base_url=upstream.base_url, api_key="lk-x", max_retries=0)
