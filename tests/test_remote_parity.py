"""Remote mode against direct mode: the same call made by ``Lunar``/``AsyncLunar`` straight to
the providers and through a real `lunar serve` process, both in front of the same emulator,
must give the same objects, errors and behaviour (README: "the same objects")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import lunar
from lunar.testing import MockServer, Reply

from .test_server import CONFIG, MASTER, MESSAGES, GatewayProcess, every_wire

pytest.importorskip("uvicorn")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


@pytest.fixture(scope="module")
def gw(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(
        tmp_path_factory.mktemp("gateway"),
        upstream,
        # Time for the local model to load in the gateway's process (no test here stalls).
        CONFIG.replace("timeout_seconds = 2.0", "timeout_seconds = 60.0"),
        **every_wire(upstream),
    )
    yield proc
    proc.stop()


def direct_env(upstream: MockServer, monkeypatch: pytest.MonkeyPatch, *, native: bool) -> None:
    """Direct mode sees the emulator the gateway sees: the OpenAI-compatible providers, and
    with ``native`` Anthropic's and Gemini's wires too (a fresh emulator each test)."""
    upstream.reset()
    for p in ("OPENAI", "GROQ", "TOGETHER", "FIREWORKS"):
        monkeypatch.setenv(f"{p}_API_KEY", f"sk-{p.lower()}")
        monkeypatch.setenv(f"{p}_BASE_URL", upstream.base_url)
    for p in ("ANTHROPIC", "GEMINI") if native else ():
        monkeypatch.setenv(f"{p}_API_KEY", f"sk-{p.lower()}")
        monkeypatch.setenv(f"{p}_BASE_URL", upstream.url)


@pytest.fixture(autouse=True)
def _direct_env(upstream: MockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Direct mode sees the providers the gateway sees (the gateway's own environment)."""
    direct_env(upstream, monkeypatch, native=True)


@pytest.fixture(params=["sync", "async"])
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def call(result: Any) -> Any:
    return (await result) if hasattr(result, "__await__") else result


async def collect(stream: Any) -> list[Any]:
    if hasattr(stream, "__aiter__"):
        return [chunk async for chunk in stream]
    return list(stream)


async def raised(fn: Callable[[], Any]) -> lunar.LunarError:
    """The error ``fn()`` raises, called (and awaited, for an async client) or iterated to
    its end when it is a stream."""
    with pytest.raises(lunar.LunarError) as info:
        result = await call(fn())
        if hasattr(result, "__aiter__") or hasattr(result, "__iter__"):
            await collect(result)
    return info.value


class Pair:
    """A direct client and a remote one, of one flavour, with the same arguments. The remote
    one holds a virtual key, or with ``master`` the gateway's master key (told every error
    in full, as direct mode is)."""

    def __init__(
        self, gw: GatewayProcess, upstream: MockServer, flavor: str, master: bool = False, **kw: Any
    ) -> None:
        cls = lunar.Lunar if flavor == "sync" else lunar.AsyncLunar
        kw.setdefault("max_retries", 0)
        self.upstream = upstream
        self.direct = cls(**kw)
        key = MASTER if master else gw.new_key()[0]
        self.remote = cls(base_url=gw.url + "/v1", api_key=key, **kw)

    async def run(self, fn: Callable[[Any], Any], *replies: Reply) -> tuple[Any, Any]:
        """``fn(client)`` (a coroutine) against each client, the emulator scripted the same
        for both: (direct's result, remote's)."""
        out = []
        for client in (self.direct, self.remote):
            self.upstream.reset()
            self.upstream.enqueue(*replies)
            out.append(await fn(client))
        return out[0], out[1]

    async def close(self) -> None:
        await call(self.direct.close())
        await call(self.remote.close())


@pytest.fixture
async def pair(gw: GatewayProcess, upstream: MockServer, flavor: str) -> Any:
    made: list[Pair] = []

    def make(**kw: Any) -> Pair:
        made.append(Pair(gw, upstream, flavor, **kw))
        return made[-1]

    yield make
    for p in made:
        await p.close()


def error_view(e: lunar.LunarError, attempts: bool = False) -> dict[str, Any]:
    """What a user reads off an error, the same in both modes (with ``attempts``: each
    attempt's model, provider, class and status too)."""
    view = {
        "class": type(e).__name__,
        "str": str(e),
        "status_code": getattr(e, "status_code", None),
        "param": getattr(e, "param", None),
        "code": getattr(e, "code", None),
        "type": getattr(e, "type", None),
        "retry_after": getattr(e, "retry_after", None),
    }
    if attempts:
        view["attempts"] = [
            (a.model, a.provider, type(a.error).__name__, getattr(a.error, "status_code", None))
            for a in e.attempts
        ]
    return view


def same_but_the_words(direct: dict[str, Any], remote: dict[str, Any]) -> None:
    """A virtual key's error: what code reads off it (class, status, type, code, param,
    wait, attempts) as in direct mode; its message may be the gateway's generic one."""
    assert {**remote, "str": ""} == {**direct, "str": ""}


# ---------------------------------------------------------------------------------------------
# Fallbacks


async def test_client_level_fallbacks_are_honoured_in_remote_mode(pair, flavor):
    """``Lunar(fallbacks={model: [...]})`` is the client's mapping in both modes: remote
    mode sent no fallbacks to the gateway, so the first 503 was the caller's error."""
    # Models of this test's own: the gateway's health (one process) learns across tests.
    model, fallback = f"openai/nano-{flavor}", f"openai/big-{flavor}"
    p = pair(fallbacks={model: [fallback]})

    async def served_by(client: Any) -> tuple[str, list[str]]:
        done = await call(client.chat.completions.create(model=model, messages=MESSAGES))
        return done.model, [r.model for r in p.upstream.requests]

    direct, remote = await p.run(served_by, Reply(status=503))
    assert direct == remote == (fallback[7:], [model[7:], fallback[7:]])

    async def streamed(client: Any) -> str:
        stream = await call(
            client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
        )
        return str((await collect(stream))[-1].model)

    assert await p.run(streamed, Reply(status=503)) == (fallback[7:], fallback[7:])

    # Per-request fallbacks replace the client's, in both modes ([] means none).
    async def none(client: Any) -> int | None:
        err = await raised(
            lambda: client.chat.completions.create(model=model, messages=MESSAGES, fallbacks=[])
        )
        return err.status_code  # type: ignore[attr-defined,no-any-return]

    assert await p.run(none, Reply(status=503)) == (503, 503)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("model", ["openai/errs", "claude-3-5-haiku", "gemini-2.0-flash"])
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 429, 500, 502, 503, 504, 529])
async def test_an_upstream_error_reads_the_same_in_both_modes(pair, status, model):
    """The gateway's error message already names the provider at fault; remote mode added
    ``(provider: lunar)`` after it, so ``str(e)`` differed from direct mode's."""

    async def fails(client: Any) -> dict[str, Any]:
        err = await raised(
            lambda: client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=5, fallbacks=[]
            )
        )
        return error_view(err, attempts=True)

    direct, remote = await pair(master=True).run(fails, Reply(status=status, retry_after=3))
    assert remote == direct
    direct, remote = await pair().run(fails, Reply(status=status, retry_after=3))
    if status in (401, 403):
        # The upstream refused the gateway's own key, not the client's: a virtual key gets
        # a 502 upstream_auth_error (docs/gateway.md, Security), its attempts alike.
        assert (remote["class"], remote["status_code"], remote["code"]) == (
            "ServerError",
            502,
            "upstream_auth_error",
        )
        assert [a[2:] for a in remote["attempts"]] == [("ServerError", 502)] * len(
            direct["attempts"]
        )
    else:
        same_but_the_words(direct, remote)
    provider = {"openai/errs": "openai", "claude-3-5-haiku": "anthropic"}.get(model, "gemini")
    assert direct["str"].endswith(f"(provider: {provider})")


@pytest.mark.parametrize("model", ["openai/mid", "claude-3-5-haiku", "gemini-2.0-flash"])
@pytest.mark.parametrize(
    "reply",
    [
        Reply(chunks=5, error_after=2),
        Reply(chunks=5, error_after=2, error_type="rate_limit_error"),
        Reply(chunks=5, error_after=2, error_type="invalid_request_error"),
    ],
)
async def test_a_mid_stream_error_reads_the_same_in_both_modes(pair, reply, model):
    """The gateway relays an upstream's error event with its message ("Error event in the
    stream: … (provider: openai)"); remote mode said "Error event in the stream: " twice.
    And the event's ``type`` alone lost the class of a Gemini error (``UNAVAILABLE``,
    ``RESOURCE_EXHAUSTED``): remote mode raised a bare ``StreamError`` where direct mode
    raises ``ServiceUnavailableError`` / ``RateLimitError``; the event now says its
    ``status``."""

    async def fails(client: Any) -> dict[str, Any]:
        err = await raised(
            lambda: client.chat.completions.create(
                model=model, messages=MESSAGES, stream=True, max_tokens=50
            )
        )
        return error_view(err, attempts=True)

    direct, remote = await pair(master=True).run(fails, reply)
    assert remote == direct
    same_but_the_words(*await pair().run(fails, reply))


async def test_a_request_the_gateway_refuses_reads_as_direct_mode_refuses_it(pair):
    """A request the engine refuses before sending (here ``n`` > 1 to Anthropic): the same
    class, ``param``, ``code`` and message in both modes."""
    p = pair()

    async def refused(client: Any) -> dict[str, Any]:
        err = await raised(
            lambda: client.chat.completions.create(model="claude-3-haiku", messages=MESSAGES, n=2)
        )
        return error_view(err)

    direct, remote = await p.run(refused)
    assert remote == direct
    assert direct["param"] == "n"


# ---------------------------------------------------------------------------------------------
# Objects


def same_shape(obj: Any) -> Any:
    """``obj.to_dict()`` without what differs between any two requests: ids, ``created``,
    timing (measured by each client) and the emulator's numbered tool-call ids."""
    if isinstance(obj, list):
        return [same_shape(o) for o in obj]
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    if isinstance(obj, dict):
        return {
            k: same_shape(v)
            for k, v in obj.items()
            if k not in ("id", "created", "latency_ms", "ttft_ms")
        }
    return obj


ANSWERS = {
    "text": ("gpt-4o-mini", {}, Reply(chunks=4, cached_tokens=3)),
    "n=2": ("gpt-4o-mini", {"n": 2}, Reply(chunks=3)),
    "tools": (
        "gpt-4o-mini",
        {"tools": TOOLS},
        Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris"}}]),
    ),
    "anthropic": (
        "claude-3-5-haiku",
        {"max_tokens": 50},
        Reply(chunks=4, cached_tokens=5, cache_write_tokens=7, cache_write_1h_tokens=3),
    ),
    "anthropic tools": (
        "claude-3-5-haiku",
        {"max_tokens": 50, "tools": TOOLS},
        Reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}]),
    ),
    "gemini": ("gemini-2.0-flash", {}, Reply(chunks=4, cached_tokens=2)),
    "gemini n=2": ("gemini-2.0-flash", {"n": 2}, Reply(chunks=2)),
    "length": ("gpt-4o-mini", {"max_tokens": 2}, Reply(chunks=6)),
}


@pytest.mark.parametrize("case", list(ANSWERS))
async def test_answers_streamed_or_not_are_the_same_objects(pair, case):
    """Chunks, completions, ``get_final_completion()``, ``text_stream`` and legacy
    completions: field for field what direct mode gives (usage with cached tokens and
    costs, ``provider``, ``model``, tool calls), timing and ids aside."""
    model, kwargs, reply = ANSWERS[case]
    p = pair()

    async def whole(client: Any) -> Any:
        done = await call(client.chat.completions.create(model=model, messages=MESSAGES, **kwargs))
        assert done.usage.ttft_ms is not None and done.usage.latency_ms is not None
        return same_shape(done)

    async def chunks(client: Any) -> Any:
        stream = await call(
            client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kwargs)
        )
        got = await collect(stream)
        assert got[-1].usage.ttft_ms is not None and got[-1].usage.latency_ms is not None
        assert len({c.id for c in got}) == 1
        return same_shape(got)

    async def final(client: Any) -> Any:
        stream = await call(
            client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kwargs)
        )
        done = await call(stream.get_final_completion())
        return type(done).__name__, same_shape(done)

    async def text(client: Any) -> Any:
        stream = await call(
            client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kwargs)
        )
        return await collect(stream.text_stream)

    for fn in (whole, chunks, final, text):
        direct, remote = await p.run(fn, reply)
        assert remote == direct, fn.__name__

    if "tools" in kwargs or kwargs.get("n", 1) > 1:
        return
    for stream in (False, True):

        async def legacy(client: Any, stream: bool = stream) -> Any:
            answer = await call(
                client.completions.create(model=model, prompt="Once", stream=stream, **kwargs)
            )
            return same_shape(await collect(answer) if stream else answer)

        direct, remote = await p.run(legacy, reply)
        assert remote == direct, f"legacy stream={stream}"


BAD = {
    "unknown provider of the model": dict(model="gpt-4o-mini", provider="groq"),
    "unknown provider": dict(model="gpt-4o-mini", provider="nope"),
    "tools to a model without": dict(model="smollm2", tools=TOOLS),
    "n to the local model": dict(model="smollm2", n=3),
    "bad extra_body": dict(model="gpt-4o-mini", extra_body={"temperature": 9}),
    "extra_body model": dict(model="gpt-4o-mini", extra_body={"model": "x"}),
    "bad temperature": dict(model="gpt-4o-mini", temperature=3),
    "unknown model": dict(model="gpt-4o-minii"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_requests_fail_the_same_in_both_modes(pair, case):
    p = pair()

    async def fails(client: Any) -> dict[str, Any]:
        err = await raised(lambda: client.chat.completions.create(messages=MESSAGES, **BAD[case]))
        return error_view(err)

    direct, remote = await p.run(fails)
    assert remote == direct


async def test_a_malformed_upstream_stream_is_the_gateways_502_in_remote_mode(pair):
    """By design: direct mode raises ``StreamError`` (no status) for a malformed event in an
    upstream stream; the gateway answers every failure with a status, here 502 in its error
    event, and remote mode raises that status's class (both are ``APIError``)."""

    async def fails(client: Any) -> dict[str, Any]:
        err = await raised(
            lambda: client.chat.completions.create(
                model="openai/malformed", messages=MESSAGES, stream=True
            )
        )
        assert isinstance(err, lunar.APIError)
        return error_view(err)

    for master in (True, False):
        direct, remote = await pair(master=master).run(fails, Reply(chunks=5, malformed_after=2))
        assert direct["class"] == "StreamError" and direct["status_code"] is None
        assert (remote["class"], remote["status_code"]) == ("ServerError", 502)
        if master:
            assert remote["str"] == "[502] " + direct["str"]
        else:  # what the broken event was is the operator's to read
            assert (
                remote["str"] == "[502] Provider 'openai' failed to answer (details are in "
                "the gateway's log)"
            )


async def test_a_mid_stream_error_names_the_request_id_of_who_answered(pair, gw):
    """``e.request_id`` is the answering server's id for the request (README): the
    provider's in direct mode, the gateway's (its ledger's) in remote mode, after the first
    chunk too. A mid-stream error had none in either mode."""
    p = pair()

    async def fails(client: Any) -> str | None:
        err = await raised(
            lambda: client.chat.completions.create(
                model="openai/mid-id", messages=MESSAGES, stream=True
            )
        )
        return err.request_id  # type: ignore[attr-defined,no-any-return]

    for reply in (Reply(chunks=5, error_after=2), Reply(chunks=5, error_after=0)):
        direct, remote = await p.run(fails, reply)
        assert direct is not None and direct.startswith("req_mock")
        assert remote is not None and remote.startswith("req_") and remote != direct


async def test_a_gateway_out_of_reach_is_a_connection_error_naming_it(flavor):
    """Nothing listening at ``base_url``: ``APIConnectionError`` (as for a provider out of
    reach in direct mode), for inference and ``models`` alike, naming the URL."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cls = lunar.Lunar if flavor == "sync" else lunar.AsyncLunar
    client = cls(base_url=url, api_key="lk-" + "a" * 32, max_retries=0)
    for fn in (
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES),
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True),
        client.models.list,
    ):
        err = await raised(fn)
        assert type(err) is lunar.APIConnectionError
        assert str(err).startswith(f"Connection to provider 'lunar' at {url} failed")
    await call(client.close())


@pytest.mark.local
async def test_the_local_model_through_the_gateway_is_the_same_answer(pair):
    """``smollm2`` served in the gateway's process: the same text (greedy, seeded), usage,
    ``provider`` and ``model`` as in-process, streamed or not."""
    pytest.importorskip("llama_cpp")
    p = pair()
    kwargs = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 6, "temperature": 0}

    async def whole(client: Any) -> Any:
        return same_shape(await call(client.chat.completions.create(seed=1, **kwargs)))

    async def streamed(client: Any) -> Any:
        stream = await call(client.chat.completions.create(stream=True, seed=1, **kwargs))
        return same_shape(await call(stream.get_final_completion()))

    for fn in (whole, streamed):
        direct, remote = await p.run(fn)
        assert remote == direct
        assert direct["provider"] == "local" and direct["usage"]["total_cost_usd"] == 0


async def test_service_tier_and_annotations_come_through_a_gateway(pair):
    """A whole answer's ``service_tier`` and its message's ``annotations`` are the provider's
    in both modes: the gateway passes them on, remote mode reads them back."""
    from .test_openai_sdk_parity import CITED

    p = pair()

    async def read(client: Any) -> Any:
        done = await call(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
        message = done.choices[0].message
        return done.service_tier, [a.to_dict() for a in message.annotations], message.audio

    direct, remote = await p.run(read, Reply(body=CITED))
    assert direct == remote == ("default", CITED["choices"][0]["message"]["annotations"], None)
