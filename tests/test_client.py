"""The SDK's public API against the emulator over real sockets: the quickstart, objects,
usage and cost, remote mode, configuration, legacy completions and models."""

from __future__ import annotations

import gc
import inspect
import json

import pytest

from lunar import (
    APIError,
    AsyncLunar,
    AuthenticationError,
    BadRequestError,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    Lunar,
    NotFoundError,
)
from lunar.testing import Reply

from .conftest import busy_connections

MESSAGES = [{"role": "user", "content": "Write a short story about a robot."}]
PRICE_IN, PRICE_OUT = 0.15, 0.60  # gpt-4o-mini, per 1M


def expected_cost(usage):
    return round(usage.prompt_tokens * PRICE_IN / 1e6, 10), round(
        usage.completion_tokens * PRICE_OUT / 1e6, 10
    )


def test_quickstart_streams_openai_shaped_chunks(mock):
    mock.default = Reply(chunks=6)
    client = Lunar()
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        fallbacks=["claude-3-haiku", "llama-3.1-8b"],
    )
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert all(c.object == "chat.completion.chunk" and isinstance(c.created, int) for c in chunks)
    assert all(c.choices and c.choices[0].index == 0 for c in chunks)  # loop never breaks
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    final = chunks[-1]
    assert final.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(text.split()) == 6
    u = final.usage
    assert u.completion_tokens == 6 and u.prompt_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert (u.input_cost_usd, u.output_cost_usd) == expected_cost(u)
    assert u.total_cost_usd == round(u.input_cost_usd + u.output_cost_usd, 10)
    assert u.latency_ms >= u.ttft_ms > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert final.provider == "openai"
    sent = mock.requests[-1]
    assert sent.json["stream_options"] == {"include_usage": True}
    assert sent.headers["authorization"] == "Bearer sk-openai"
    assert busy_connections(client) == 0


def test_non_streaming_returns_chat_completion_with_cost(mock):
    done = Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert isinstance(done, ChatCompletion)
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content
    assert done.choices[0].finish_reason == "stop"
    u = done.usage
    assert (u.input_cost_usd, u.output_cost_usd) == expected_cost(u)
    assert u.latency_ms > 0 and u.ttft_ms == u.latency_ms


async def test_async_client_gives_the_same_objects(mock):
    mock.default = Reply(chunks=5)
    async with AsyncLunar() as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].usage.total_cost_usd > 0
        done = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert done.usage.total_cost_usd > 0
        assert busy_connections(client) == 0


def test_every_parameter_reaches_the_provider(mock):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    Lunar().chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        temperature=0.3,
        top_p=0.9,
        max_tokens=50,
        stop=["END"],
        n=1,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        seed=7,
        user="u1",
        tools=tools,
        tool_choice="none",
        response_format={"type": "json_object"},
        extra_headers={"x-trace": "abc"},
        extra_body={"metadata": {"k": "v"}},
    )
    sent = mock.requests[-1]
    for key, value in [
        ("temperature", 0.3),
        ("top_p", 0.9),
        ("max_tokens", 50),
        ("stop", ["END"]),
        ("n", 1),
        ("presence_penalty", 0.1),
        ("frequency_penalty", 0.2),
        ("seed", 7),
        ("user", "u1"),
        ("tools", tools),
        ("tool_choice", "none"),
        ("response_format", {"type": "json_object"}),
        ("metadata", {"k": "v"}),
    ]:
        assert sent.json[key] == value, key
    assert sent.headers["x-trace"] == "abc"
    assert sent.json["model"] == "gpt-4o-mini"


def test_a_lone_surrogate_in_a_message_is_sent_as_its_json_escape(mock):
    """JSON text may carry a lone surrogate (as \\ud800), UTF-8 bytes cannot: the request
    body writes the escape instead of failing with UnicodeEncodeError."""
    text = "half a pair: \ud83d"
    Lunar().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
    )
    sent = mock.requests[-1]
    assert b"\\ud83d" in sent.body
    assert sent.json["messages"][0]["content"] == text


def test_alias_resolves_to_provider_model_id_and_answer_names_the_model(mock):
    done = Lunar().chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
    assert mock.requests[-1].json["model"] == "llama-3.1-8b-instant"
    assert done.model == "llama-3.1-8b-instant"
    assert done.provider == "groq"


def test_provider_prefix_and_provider_argument_force_a_provider(mock):
    done = Lunar().chat.completions.create(model="together/llama-3.1-8b", messages=MESSAGES)
    assert done.provider == "together"
    assert mock.requests[-1].json["model"] == "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"
    done = Lunar().chat.completions.create(
        model="llama-3.1-8b", provider="fireworks", messages=MESSAGES
    )
    assert done.provider == "fireworks"


def test_tool_calls_stream_and_assemble(mock):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    stream = Lunar().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=tools, stream=True
    )
    pieces = [tc for c in stream for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    done = stream.get_final_completion()
    [call] = done.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "robot"}
    assert done.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-haiku"])
def test_tool_arguments_are_counted_when_the_provider_sends_no_usage(mock, model, monkeypatch):
    # 400 characters of arguments: about 100 tokens, not 0, when usage must be estimated.
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", mock.url)
    mock.default = Reply(
        usage=False, tool_calls=[{"name": "get_weather", "arguments": {"city": "x" * 400}}]
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    client = Lunar()
    chunks = list(
        client.chat.completions.create(model=model, messages=MESSAGES, tools=tools, stream=True)
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage.completion_tokens >= 100
    if model.startswith("claude"):  # its whole answer then has no usage either
        done = client.chat.completions.create(model=model, messages=MESSAGES, tools=tools)
        assert done.choices[0].message.tool_calls
        assert done.usage.completion_tokens >= 100


def test_get_final_completion_includes_chunks_already_read(mock):
    mock.default = Reply(chunks=8)
    stream = Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    first = [next(stream) for _ in range(3)]
    done = stream.get_final_completion()
    assert len(done.choices[0].message.content.split()) == 8
    assert done.usage.completion_tokens == 8
    assert first[0].choices[0].delta.role == "assistant"


def test_text_stream_yields_only_text(mock):
    mock.default = Reply(chunks=4)
    stream = Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    texts = list(stream.text_stream)
    assert len(texts) == 4 and all(isinstance(t, str) and t for t in texts)


def test_break_releases_the_connection(mock):
    mock.default = Reply(chunks=50)
    client = Lunar()
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert busy_connections(client) == 0


def test_garbage_collected_stream_releases_the_connection(mock):
    mock.default = Reply(chunks=50)
    client = Lunar()
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    next(stream)
    assert busy_connections(client) == 1
    del stream
    gc.collect()
    assert busy_connections(client) == 0


def test_context_manager_closes_the_stream(mock):
    mock.default = Reply(chunks=50)
    client = Lunar()
    with client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True
    ) as stream:
        next(stream)
    assert busy_connections(client) == 0


async def test_async_break_and_close_release_the_connection(mock):
    mock.default = Reply(chunks=50)
    async with AsyncLunar() as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        )
        async for _ in stream:
            break
        await stream.close()
        assert busy_connections(client) == 0
        async with await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        ) as stream2:
            await stream2.__anext__()
        assert busy_connections(client) == 0


async def open_async_stream(client: AsyncLunar):
    return await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)


async def test_an_async_stream_gives_nothing_after_close(mock):
    """The engine hands chunks on a read at a time; closing drops what is left of the read."""
    mock.default = Reply(chunks=50)
    async with AsyncLunar() as client:
        stream = await open_async_stream(client)
        await stream.__anext__()
        await stream.close()
        assert [chunk async for chunk in stream] == []


def test_connections_are_reused(mock):
    client = Lunar()
    for _ in range(3):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert len(client._http._transport._pool.connections) == 1


def test_missing_key_names_the_env_var(mock, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(AuthenticationError, match="set OPENAI_API_KEY") as info:
        Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 401
    assert mock.requests == []


def test_a_key_set_after_a_missing_key_error_is_used_by_the_same_client(mock, monkeypatch):
    """A notebook's order: the call fails for want of a key, the key is set, the call is
    made again with the same client."""
    monkeypatch.delenv("OPENAI_API_KEY")
    client = Lunar()
    with pytest.raises(AuthenticationError, match="set OPENAI_API_KEY"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-set-later")
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert mock.requests[-1].headers["authorization"] == "Bearer sk-set-later"


def test_providers_argument_overrides_env(mock, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    client = Lunar(providers={"openai": {"api_key": "sk-explicit", "base_url": mock.base_url}})
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert mock.requests[-1].headers["authorization"] == "Bearer sk-explicit"


def test_default_headers_are_sent(mock):
    Lunar(default_headers={"x-team": "a"}).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES
    )
    assert mock.requests[-1].headers["x-team"] == "a"
    assert mock.requests[-1].headers["user-agent"].startswith("lunar-python/")


def test_custom_http_client_is_used(mock):
    import httpx

    http = httpx.Client(headers={"x-custom": "1"})
    Lunar(http_client=http).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert mock.requests[-1].headers["x-custom"] == "1"
    http.close()


HTTP_CLIENTS = ["sync", "sync-httpx", "async", "async-httpx"]


def client_for(mode: str, **kw):
    """``Lunar``/``AsyncLunar`` on their own HTTP client, or on a caller's httpx client that
    has a header of its own."""
    import httpx

    if mode == "sync-httpx":
        return Lunar(**kw, http_client=httpx.Client(headers={"x-custom": "1"}))
    if mode == "async-httpx":
        return AsyncLunar(**kw, http_client=httpx.AsyncClient(headers={"x-custom": "1"}))
    return (Lunar if mode == "sync" else AsyncLunar)(**kw)


async def call(result):
    return (await result) if inspect.isawaitable(result) else result


@pytest.mark.parametrize("mode", HTTP_CLIENTS)
async def test_default_headers_are_sent_with_or_without_an_http_client(mock, mode):
    """The openai SDK sends them whatever ``http_client`` is; the caller's client adds its own
    headers under them. A request's ``extra_headers`` win, names compared without case."""
    client = client_for(mode, default_headers={"x-team": "a", "x-tier": "gold"})
    await call(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES))
    sent = mock.requests[-1].headers
    assert (sent["x-team"], sent["x-tier"]) == ("a", "gold")
    assert sent["user-agent"].startswith("lunar-python/")
    assert sent["authorization"] == "Bearer sk-openai"
    if mode.endswith("httpx"):
        assert sent["x-custom"] == "1"
    await call(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Team": "b"}
        )
    )
    assert mock.requests[-1].headers["x-team"] == "b"


@pytest.mark.parametrize("mode", HTTP_CLIENTS)
async def test_remote_models_list_sends_default_headers_with_or_without_an_http_client(mock, mode):
    client = client_for(mode, base_url=mock.base_url, api_key="k", default_headers={"x-team": "a"})
    assert [m.id for m in await call(client.models.list())]
    sent = mock.requests[-1].headers
    assert (sent["x-team"], sent["x-api-key"]) == ("a", "k")
    assert sent["user-agent"].startswith("lunar-python/")


def test_remote_mode_sends_api_key_model_and_lunar_options(mock, monkeypatch):
    monkeypatch.setenv("LUNAR_BASE_URL", mock.base_url)
    monkeypatch.setenv("LUNAR_API_KEY", "lk-team")
    client = Lunar()
    list(
        client.chat.completions.create(
            model="anything-the-gateway-knows",
            messages=MESSAGES,
            stream=True,
            fallbacks=["b"],
            provider="groq",
        )
    )
    sent = mock.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["x-api-key"] == "lk-team"
    assert "authorization" not in sent.headers
    assert (sent.json["model"], sent.json["fallbacks"], sent.json["provider"]) == (
        "anything-the-gateway-knows",
        ["b"],
        "groq",
    )


def test_remote_mode_with_jwt_uses_bearer(mock):
    client = Lunar(base_url=mock.base_url, jwt="eyJ.token")
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert mock.requests[-1].headers["authorization"] == "Bearer eyJ.token"


def test_remote_mode_without_credentials_says_what_to_set(mock):
    with pytest.raises(AuthenticationError, match="LUNAR_API_KEY"):
        Lunar(base_url=mock.base_url)


def test_remote_models_list_asks_the_gateway(mock):
    page = Lunar(base_url=mock.base_url, api_key="k").models.list()
    assert [m.id for m in page] and mock.requests[-1].path == "/v1/models"


def test_models_list_from_catalogue_in_direct_mode(mock):
    models = {m.id: m for m in Lunar().models.list()}
    assert {"gpt-4o-mini", "claude-3-haiku", "llama-3.1-8b", "smollm2"} <= set(models)
    assert models["gpt-4o-mini"].output_price_per_1m == 0.60
    assert Lunar().models.retrieve("gpt-4o-mini").owned_by == "openai"


def test_legacy_completions_stream_and_not(mock):
    mock.default = Reply(chunks=3)
    client = Lunar()
    done = client.completions.create(model="gpt-4o-mini", prompt="Say hi")
    assert done.object == "text_completion"
    assert len(done.choices[0].text.split()) == 3
    assert done.usage.total_cost_usd > 0
    pieces = list(client.completions.create(model="gpt-4o-mini", prompt="Say hi", stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == done.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "stop"
    assert pieces[-1].usage.completion_tokens == 3
    assert mock.requests[-1].json["messages"] == [{"role": "user", "content": "Say hi"}]


def assert_whole_legacy_answer(final, done, first):
    """A legacy stream's whole answer is what the call without ``stream`` returns, the piece
    read before ``get_final_completion()`` included."""
    assert type(first) is Completion
    assert type(final) is Completion and type(done) is Completion
    assert final.object == done.object == "text_completion"
    assert final.id.startswith("cmpl-") and done.id.startswith("cmpl-")
    assert final.id == first.id
    assert final.choices[0].text == done.choices[0].text
    assert final.choices[0].text.startswith(first.choices[0].text)
    assert final.choices[0].finish_reason == done.choices[0].finish_reason == "stop"
    assert final.usage.completion_tokens == done.usage.completion_tokens == 3
    assert final.usage.total_cost_usd == done.usage.total_cost_usd > 0
    assert final.model == done.model and final.provider == done.provider == "openai"


def test_a_legacy_streams_final_completion_is_a_completion(mock):
    mock.default = Reply(chunks=3)
    client = Lunar()
    done = client.completions.create(model="gpt-4o-mini", prompt="Say hi")
    stream = client.completions.create(model="gpt-4o-mini", prompt="Say hi", stream=True)
    first = next(stream)
    assert_whole_legacy_answer(stream.get_final_completion(), done, first)


async def test_an_async_legacy_streams_final_completion_is_a_completion(mock):
    mock.default = Reply(chunks=3)
    async with AsyncLunar() as client:
        done = await client.completions.create(model="gpt-4o-mini", prompt="Say hi")
        stream = await client.completions.create(model="gpt-4o-mini", prompt="Say hi", stream=True)
        first = await stream.__anext__()
        assert_whole_legacy_answer(await stream.get_final_completion(), done, first)


def test_max_tokens_gives_length(mock):
    mock.default = Reply(chunks=10)
    chunks = list(
        Lunar().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=4, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages[0].content"),
        ({"messages": MESSAGES, "temperature": 2.5}, "temperature"),
        ({"messages": MESSAGES, "temperature": -0.1}, "temperature"),
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "fallbacks": "claude-3-haiku"}, "fallbacks"),
    ],
)
def test_bad_input_fails_before_any_network_call(mock, kwargs, param):
    with pytest.raises(BadRequestError) as info:
        Lunar().chat.completions.create(model="gpt-4o-mini", **kwargs)
    assert info.value.param == param
    assert param in str(info.value)
    assert mock.requests == []


def test_nan_parameter_is_named_as_nan(mock):
    with pytest.raises(BadRequestError) as info:
        Lunar().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, temperature=float("nan")
        )
    assert (info.value.param, "got NaN" in str(info.value)) == ("temperature", True)
    assert mock.requests == []


BAD_OPTIONS = [
    ({"extra_headers": [("x-a", "b")]}, "extra_headers", "mapping of header names"),
    ({"extra_headers": {"x-a": 1}}, "extra_headers", "str to str"),
    ({"extra_body": [1]}, "extra_body", "mapping of field names"),
    ({"extra_body": {1: "x"}}, "extra_body", "keys must be strings"),
    ({"provider": 5}, "provider", "'provider' must be a provider name"),
    ({"provider": ""}, "provider", "'provider' must be a provider name"),
    ({"extra_body": {"model": "gpt-4o"}}, "extra_body.model", "pass model="),
    ({"extra_body": {"stream": True}}, "extra_body.stream", "pass stream="),
    ({"extra_body": {"fallbacks": ["claude-3-haiku"]}}, "extra_body.fallbacks", "pass fallbacks="),
    ({"extra_body": {"provider": "groq"}}, "extra_body.provider", "pass provider="),
    ({"extra_body": {"messages": []}}, "extra_body.messages", "pass messages="),
]


@pytest.mark.parametrize("remote", [False, True], ids=["direct", "remote"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("kwargs", "param", "says"), BAD_OPTIONS)
async def test_bad_options_name_the_argument_before_any_network_call(
    mock, mode, remote, kwargs, param, says
):
    """Lunar's own options are checked at the boundary, as the parameters are, the same in
    both clients and both modes; ``extra_body`` adds fields, it does not replace
    ``create()``'s own arguments (which it would silently lose or bypass)."""
    kw = {"base_url": mock.base_url, "api_key": "k"} if remote else {}
    client = (Lunar if mode == "sync" else AsyncLunar)(**kw)
    with pytest.raises(BadRequestError, match=says) as info:
        await call(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **kwargs))
    assert info.value.param == param
    if param == "extra_body.messages":  # the legacy endpoint names its own argument
        says = "pass prompt="
    with pytest.raises(BadRequestError, match=says) as info:
        await call(client.completions.create(model="gpt-4o-mini", prompt="Say hi", **kwargs))
    assert info.value.param == param
    assert mock.requests == []


def test_extra_body_fields_of_the_provider_still_go_through(mock):
    Lunar().chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_body={"metadata": {"k": "v"}, "store": True, "temperature": 0.5},
    )
    sent = mock.requests[-1].json
    assert (sent["metadata"], sent["store"], sent["temperature"]) == ({"k": "v"}, True, 0.5)
    assert sent["model"] == "gpt-4o-mini"


def test_unknown_model_lists_close_matches_before_any_network_call(mock):
    with pytest.raises(NotFoundError, match="Did you mean: gpt-4o-mini") as info:
        Lunar().chat.completions.create(model="gpt-4o-mni", messages=MESSAGES, stream=True)
    assert info.value.param == "model"
    assert mock.requests == []


async def test_async_client_picks_its_http_client(mock, monkeypatch):
    """Lunar's pool by default; httpx without httptools or behind a proxy; the caller's own."""
    import httpx

    from lunar import _http

    async with AsyncLunar() as client:
        assert isinstance(client._http, _http.AsyncPool)
        assert (await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)).usage
    with monkeypatch.context() as m:
        m.setattr(_http, "available", lambda: False)
        async with AsyncLunar() as client:
            assert isinstance(client._http, httpx.AsyncClient)
            completion = await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES
            )
            assert completion.usage
    with monkeypatch.context() as m:
        m.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
        async with AsyncLunar() as client:
            assert isinstance(client._http, httpx.AsyncClient)
    own = httpx.AsyncClient()
    async with AsyncLunar(http_client=own) as client:
        assert client._http is own
    await own.aclose()


def test_a_stream_closed_before_its_first_read_releases_the_connection(mock):
    mock.default = Reply(chunks=50)
    client = Lunar()
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    stream.close()
    assert busy_connections(client) == 0
    with client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
        pass
    assert busy_connections(client) == 0


async def test_an_async_stream_closed_before_its_first_read_releases_the_connection(mock):
    mock.default = Reply(chunks=50)
    async with AsyncLunar() as client:
        stream = await open_async_stream(client)
        await stream.close()
        assert busy_connections(client) == 0
        async with await open_async_stream(client):
            pass
        assert busy_connections(client) == 0


async def test_remote_models_list_with_the_gateway_down_is_a_connection_error():
    from lunar import APIConnectionError

    with pytest.raises(APIConnectionError, match="Connection to provider 'lunar'"):
        Lunar(base_url="http://127.0.0.1:1/v1", api_key="k", max_retries=0).models.list()
    async with AsyncLunar(base_url="http://127.0.0.1:1/v1", api_key="k") as client:
        with pytest.raises(APIConnectionError, match="Connection to provider 'lunar'"):
            await client.models.list()


def test_an_answers_message_object_can_be_appended_to_messages(mock):
    """The openai SDK's idiom: ``messages.append(response.choices[0].message)``. Lunar's
    message object, and the openai SDK's own, travel as their dicts, without unset fields."""
    import openai.types.chat as oai

    client = Lunar()
    first = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    theirs = oai.ChatCompletionMessage(role="assistant", content="From openai.")
    messages = [*MESSAGES, first.choices[0].message, {"role": "user", "content": "More."}, theirs]
    client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    sent = mock.requests[-1].json["messages"]
    assert sent[1] == {"role": "assistant", "content": first.choices[0].message.content}
    assert sent[2] == {"role": "user", "content": "More."}
    assert sent[3] == {"role": "assistant", "content": "From openai."}
    assert isinstance(messages[1], type(first.choices[0].message))  # the caller's list as it was


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-haiku"])
def test_an_answers_tool_calls_can_be_put_in_a_message_dict(mock, monkeypatch, model):
    """The other idiom: ``{"role": "assistant", "tool_calls": message.tool_calls}``, the
    answer's call objects (Lunar's or the openai SDK's) in a dict of the caller's."""
    import openai.types.chat as oai

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", mock.url)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    client = Lunar()
    mock.default = Reply(tool_calls=[{"name": "f", "arguments": {"a": 1}}])
    first = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=tools)
    [ours] = first.choices[0].message.tool_calls
    theirs = oai.ChatCompletionMessageFunctionToolCall(
        id="call_2", type="function", function={"name": "f", "arguments": '{"a": 2}'}
    )
    mock.default = Reply(chunks=2)
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [ours, theirs]},
        {"role": "tool", "tool_call_id": ours.id, "content": "one"},
        {"role": "tool", "tool_call_id": "call_2", "content": "two"},
    ]
    answer = client.chat.completions.create(model=model, messages=messages, tools=tools)
    assert answer.choices[0].finish_reason == "stop"
    sent = mock.requests[-1].json["messages"][1]
    if model == "gpt-4o-mini":
        assert [c["function"]["arguments"] for c in sent["tool_calls"]] == ['{"a":1}', '{"a": 2}']
    else:
        assert [b["input"] for b in sent["content"]] == [{"a": 1}, {"a": 2}]
    assert messages[1]["tool_calls"][0] is ours  # the caller's list as it was


@pytest.mark.parametrize("bad", [[object()], [{"role": "user", "content": "hi"}, 3]])
def test_a_message_that_is_no_object_is_still_named(mock, bad):
    with pytest.raises(BadRequestError, match=r"messages\[\d\]' must be an object"):
        Lunar().chat.completions.create(model="gpt-4o-mini", messages=bad)
    assert mock.requests == []


async def test_messages_may_be_any_iterable_as_in_the_openai_sdk(mock):
    def turns():
        yield {"role": "user", "content": "Say hi"}

    Lunar().chat.completions.create(model="gpt-4o-mini", messages=turns())
    await AsyncLunar().chat.completions.create(model="gpt-4o-mini", messages=iter(MESSAGES))
    assert [r.json["messages"] for r in mock.requests] == [
        [{"role": "user", "content": "Say hi"}],
        MESSAGES,
    ]


@pytest.mark.parametrize("answer", [b"<html>a web page</html>", b"[1, 2]", b'{"data": 3}'])
async def test_remote_models_from_a_server_that_is_no_gateway_is_an_api_error(answer):
    """A base_url that points at some other web server answers 200 with its own page: an
    APIError that says to check base_url, not a JSON parser's exception."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        with pytest.raises(APIError, match="not a Lunar gateway's JSON"):
            Lunar(base_url=base, api_key="k", max_retries=0).models.list()
        async with AsyncLunar(base_url=base, api_key="k", max_retries=0) as client:
            with pytest.raises(APIError, match="check base_url"):
                await client.models.retrieve("gpt-4o-mini")
    finally:
        server.shutdown()


async def test_errors_carry_body_and_request_id_as_the_openai_sdks_do(mock):
    """`e.body` and `e.request_id`, the names openai SDK users read, in both clients."""
    mock.enqueue(Reply(status=400), Reply(status=400), model="gpt-4o-mini")
    with pytest.raises(BadRequestError) as info:
        Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with AsyncLunar() as client:
        with pytest.raises(BadRequestError) as async_info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    for err in (info.value, async_info.value):
        assert err.body == err.response_body["error"] and err.body["type"]
        assert err.request_id is not None and err.request_id.startswith("req_mock_")
    assert info.value.request_id != async_info.value.request_id
    assert BadRequestError("refused before sending").request_id is None


def test_a_base_url_without_a_scheme_fails_at_once_naming_the_variable(mock, monkeypatch):
    """`OPENAI_BASE_URL=127.0.0.1:9000/v1` was a connection error, retried `max_retries`
    times (with backoff) as if OpenAI were down, and never said what was wrong."""
    bare = mock.base_url.removeprefix("http://")
    monkeypatch.setenv("OPENAI_BASE_URL", bare)
    with pytest.raises(APIError, match="OPENAI_BASE_URL") as info:
        Lunar(max_retries=3).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    err = info.value
    assert err.code == "invalid_base_url" and err.provider == "openai"
    assert f"write 'http://{bare}'" in err.message
    assert len(err.attempts) == 1 and mock.requests == []
    # Only that provider: a fallback on another one serves.
    done = Lunar().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, fallbacks=["llama-3.1-8b"]
    )
    assert done.provider == "groq" and len(mock.requests) == 1


async def test_async_client_says_the_same_of_a_base_url_without_a_scheme(mock, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "localhost:9/v1")
    async with AsyncLunar(max_retries=3) as client:
        with pytest.raises(APIError, match="OPENAI_BASE_URL = 'localhost:9/v1'") as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.code == "invalid_base_url" and len(info.value.attempts) == 1


def test_spaces_around_a_base_url_are_dropped(mock, monkeypatch):
    """A value pasted with a space before or after it is the URL the user meant."""
    monkeypatch.setenv("OPENAI_BASE_URL", f"  {mock.base_url} \n")
    Lunar().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    client = Lunar(providers={"openai": {"base_url": f" {mock.base_url} "}})
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert len(mock.requests) == 2
    monkeypatch.setenv("LUNAR_BASE_URL", f" {mock.base_url} ")
    Lunar(api_key="lk-team").models.list()
    assert mock.requests[-1].path == "/v1/models"


@pytest.mark.parametrize(
    ("kwargs", "env", "named"),
    [
        ({"providers": {"openai": {"base_url": "127.0.0.1:9/v1"}}}, {}, "providers['openai']"),
        ({"base_url": "127.0.0.1:4000/v1", "api_key": "lk-x"}, {}, "base_url = "),
        ({}, {"LUNAR_BASE_URL": "localhost:4000", "LUNAR_API_KEY": "lk-x"}, "LUNAR_BASE_URL"),
        ({"providers": {"openai": {"base_url": "ftp://host/v1"}}}, {}, "http:// or https://"),
    ],
)
def test_a_base_url_argument_that_is_no_url_is_refused_by_the_constructor(
    mock, monkeypatch, kwargs, env, named
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for cls in (Lunar, AsyncLunar):
        with pytest.raises(ValueError, match="is not a usable base URL") as info:
            cls(**kwargs)
        assert named in str(info.value)
    assert mock.requests == []


def test_api_key_without_base_url_is_openais_key(mock, monkeypatch):
    """As with the openai SDK, `Lunar(api_key="sk-...")` is OpenAI's key (it beats
    OPENAI_API_KEY); it was silently ignored."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    Lunar(api_key="sk-given").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert mock.requests[-1].headers["authorization"] == "Bearer sk-given"
    monkeypatch.delenv("OPENAI_API_KEY")
    done = Lunar(api_key="sk-given").chat.completions.create(
        model="llama-3.1-8b", messages=MESSAGES
    )
    assert done.provider == "groq"  # other providers keep their own keys
    assert mock.requests[-1].headers["authorization"] == "Bearer sk-groq"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"api_key": "lk-abc"}, "is a Lunar gateway key"),
        ({"jwt": "eyJ.token"}, "jwt= is a Lunar gateway's credential"),
        (
            {"api_key": "sk-a", "providers": {"openai": {"api_key": "sk-b"}}},
            "both give OpenAI's key",
        ),
    ],
)
def test_a_credential_direct_mode_cannot_use_is_refused(mock, kwargs, message):
    """A gateway's key without the gateway is never sent to OpenAI."""
    for cls in (Lunar, AsyncLunar):
        with pytest.raises(ValueError, match=message):
            cls(**kwargs)
    assert mock.requests == []
