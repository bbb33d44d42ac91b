"""What ``/v1/messages`` (and the SDK's chat requests) carry to each upstream and back,
through a real gateway with the official ``anthropic`` SDK and the emulator as Anthropic,
OpenAI and Gemini: every provider's own limit on stop sequences, ``top_k``, prompt caching
(``cache_control``) and ``max_tokens`` within each model's maximum output."""

from __future__ import annotations

from typing import Any

import pytest

from lunar import BadRequestError, Lunar
from lunar.testing import MockServer, Reply

from .test_server import GatewayProcess

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

HI = [{"role": "user", "content": "hi"}]
SIX = ["s1", "s2", "s3", "s4", "s5", "s6"]


pytestmark = pytest.mark.usefixtures("fresh_upstream")


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> Any:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.new_key()[0], max_retries=0)


@pytest.fixture
def direct(mock: MockServer, monkeypatch: pytest.MonkeyPatch) -> Lunar:
    """The SDK in direct mode, the emulator as OpenAI, Anthropic and Gemini."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", mock.url)
    monkeypatch.setenv("GEMINI_API_KEY", "g-test")
    monkeypatch.setenv("GEMINI_BASE_URL", mock.url)
    return Lunar(max_retries=0, timeout=10.0)


def _sent(upstream: MockServer) -> list[Any]:
    """The bodies the upstream got, in order."""
    return [r.json for r in upstream.requests]


# ---------------------------------------------------------------------------------------------
# Stop sequences: each provider's own limit


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_claude_takes_more_than_four_stop_sequences(client, upstream, stream):
    """4 is OpenAI's limit, not Anthropic's: six reach Claude."""
    kw: dict[str, Any] = {"model": "claude-3-haiku", "max_tokens": 20, "messages": HI}
    if stream:
        with client.messages.stream(stop_sequences=SIX, **kw) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(stop_sequences=SIX, **kw)
    assert msg.type == "message"
    assert [b["stop_sequences"] for b in _sent(upstream)] == [SIX]


@pytest.mark.parametrize(("model", "limit"), [("gpt-4o-mini", 4), ("gemini-2.0-flash", 5)])
def test_more_stop_sequences_than_the_provider_takes_is_a_400_naming_the_field(
    client, upstream, model, limit
):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=model, max_tokens=20, messages=HI, stop_sequences=SIX)
    message = info.value.body["error"]["message"]
    assert "(param: stop_sequences)" in message and f"at most {limit}" in message
    assert upstream.requests == []
    # As many as the provider takes: sent.
    client.messages.create(model=model, max_tokens=20, messages=HI, stop_sequences=SIX[:limit])
    assert len(upstream.requests) == 1


def test_a_fallback_that_takes_fewer_stop_sequences_is_skipped_with_the_reason(client, upstream):
    """Claude fails; gpt-4o-mini (4 at most) would refuse six: skipped, never sent them,
    and the error is Claude's, with the skip among the attempts."""
    upstream.enqueue(Reply.status_error(500), model="claude-3-haiku-20240307")
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(
            model="claude-3-haiku",
            max_tokens=20,
            messages=HI,
            stop_sequences=SIX,
            extra_body={"fallbacks": ["gpt-4o-mini", "gemini-2.0-flash"]},
        )
    assert [r.model for r in upstream.requests] == ["claude-3-haiku-20240307"]


def test_the_sdk_refuses_more_stops_than_the_provider_takes_before_sending(direct, mock):
    direct.chat.completions.create(model="claude-3-haiku", messages=HI, stop=SIX)
    assert mock.requests[-1].json["stop_sequences"] == SIX
    mock.reset()
    with pytest.raises(BadRequestError) as info:
        direct.chat.completions.create(model="gemini-2.0-flash", messages=HI, stop=SIX)
    assert info.value.param == "stop" and "at most 5" in str(info.value)
    with pytest.raises(BadRequestError, match="at most 4"):
        direct.chat.completions.create(model="gpt-4o-mini", messages=HI, stop=SIX[:5])
    assert mock.requests == []


# ---------------------------------------------------------------------------------------------
# top_k: to the providers that take it, in their own form


def _top_k_sent(request: Any) -> Any:
    """The top_k an upstream request carried, whatever its wire (None: none)."""
    body = request.json
    if "generationConfig" in body or "contents" in body:
        return (body.get("generationConfig") or {}).get("topK")
    return body.get("top_k")


@pytest.mark.parametrize(
    ("model", "sent"),
    [("claude-3-haiku", 7), ("gemini-2.0-flash", 7), ("gpt-4o-mini", None)],
)
def test_messages_top_k_reaches_the_providers_that_take_it(client, upstream, model, sent):
    """Anthropic's top_k and Gemini's topK; OpenAI's API has none (it refuses the field):
    left out there, as before."""
    msg = client.messages.create(model=model, max_tokens=20, messages=HI, extra_body={"top_k": 7})
    assert msg.type == "message"
    [request] = upstream.requests
    assert _top_k_sent(request) == sent
    assert "top_k" not in request.json or sent is not None


@pytest.mark.parametrize(
    ("model", "sent"),
    [
        ("claude-3-haiku", 3),
        ("gemini-2.0-flash", 3),
        ("gpt-4o-mini", None),
        ("together/meta-llama/Llama-3.3-70B-Instruct-Turbo", 3),
    ],
)
def test_chat_completions_top_k_reaches_the_providers_that_take_it(gw, upstream, model, sent):
    """``top_k`` beside OpenAI's fields (the openai SDK's ``extra_body``) on the gateway's
    chat route, for a virtual key: translated per provider, never sent where refused."""
    r = gw.http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": HI, "top_k": 3},
        headers={"authorization": f"Bearer {gw.new_key()[0]}"},
    )
    assert r.status_code == 200, r.text
    [request] = upstream.requests
    assert _top_k_sent(request) == sent


def test_the_sdk_sends_top_k_in_each_providers_form(direct, mock):
    direct.chat.completions.create(
        model="gemini-2.0-flash", messages=HI, temperature=0.5, extra_body={"top_k": 4}
    )
    assert mock.requests[-1].json["generationConfig"] == {"temperature": 0.5, "topK": 4}
    direct.chat.completions.create(model="claude-3-haiku", messages=HI, extra_body={"top_k": 4})
    assert mock.requests[-1].json["top_k"] == 4
    direct.chat.completions.create(model="gpt-4o-mini", messages=HI, extra_body={"top_k": 4})
    assert "top_k" not in mock.requests[-1].json
    with pytest.raises(BadRequestError) as info:
        direct.chat.completions.create(
            model="claude-3-haiku", messages=HI, extra_body={"top_k": "4"}
        )
    assert info.value.param == "top_k"


# ---------------------------------------------------------------------------------------------
# max_tokens: within each model's maximum output


def _budget(request: Any) -> Any:
    body = request.json
    if "contents" in body:
        return body["generationConfig"]["maxOutputTokens"]
    return body["max_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_fallback_gets_max_tokens_within_its_maximum_output(client, upstream, stream):
    """64000 suits claude-sonnet-4; its fallbacks give at most 8192 (claude-3-5-haiku and
    gemini-2.0-flash) and 16384 (gpt-4o-mini): each is asked its own maximum, never a 400."""
    upstream.enqueue(Reply.status_error(500), model="claude-sonnet-4-20250514")
    upstream.enqueue(Reply.status_error(500), model="claude-3-5-haiku-20241022")
    upstream.enqueue(Reply.status_error(500), model="gemini-2.0-flash")
    kw: dict[str, Any] = {
        "model": "claude-sonnet-4",
        "max_tokens": 64000,
        "messages": HI,
        "extra_body": {"fallbacks": ["claude-3-5-haiku", "gemini-2.0-flash", "gpt-4o-mini"]},
        "timeout": 30.0,  # (else the SDK refuses so large a budget unstreamed)
    }
    if stream:
        with client.messages.stream(**kw) as s:
            msg = s.get_final_message()
    else:
        msg = client.messages.create(**kw)
    assert msg.type == "message"
    assert [(r.model, _budget(r)) for r in upstream.requests] == [
        ("claude-sonnet-4-20250514", 64000),
        ("claude-3-5-haiku-20241022", 8192),
        ("gemini-2.0-flash", 8192),
        ("gpt-4o-mini", 16384),
    ]


def test_max_tokens_beyond_the_models_maximum_is_asked_as_the_maximum(client, upstream):
    """The answer cannot be longer than the model's maximum output: asking more is sent as
    the maximum (the upstream would refuse it), and ``stop_reason`` says when it is reached."""
    msg = client.messages.create(
        model="claude-3-haiku", max_tokens=100000, messages=HI, timeout=30.0
    )
    assert msg.type == "message"
    assert [_budget(r) for r in upstream.requests] == [4096]


def test_the_sdk_caps_max_tokens_and_max_completion_tokens_per_model(direct, mock):
    mock.enqueue(Reply.status_error(500), model="gpt-4o-mini")
    direct.chat.completions.create(
        model="gpt-4o-mini",
        messages=HI,
        max_completion_tokens=50000,
        fallbacks=["claude-3-5-haiku"],
    )
    assert [
        (r.model, r.json.get("max_completion_tokens"), r.json.get("max_tokens"))
        for r in mock.requests
    ] == [
        ("gpt-4o-mini", 16384, None),
        ("claude-3-5-haiku-20241022", None, 8192),
    ]


# ---------------------------------------------------------------------------------------------
# Prompt caching: cache_control to Anthropic's models, cache usage back

EPHEMERAL = {"type": "ephemeral"}
LONG_SYSTEM = [
    {"type": "text", "text": "You are a careful assistant who answers in one line."},
    {"type": "text", "text": "Here is a long document to cache. " * 20, "cache_control": EPHEMERAL},
]
CACHED_TOOLS = [
    {"name": "Read", "input_schema": {"type": "object"}},
    {"name": "Write", "input_schema": {"type": "object"}, "cache_control": EPHEMERAL},
]
AGENT_TURNS = [
    {"role": "user", "content": "look at a.txt"},
    {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"p": "a"}}],
    },
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": "the file says hello",
                "cache_control": {"type": "ephemeral", "ttl": "1h"},
            },
            {"type": "text", "text": "and so?", "cache_control": EPHEMERAL},
        ],
    },
]


def _controls(node: Any) -> list[Any]:
    """Every cache_control in a request body, in order."""
    found: list[Any] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "cache_control":
                found.append(value)
            else:
                found += _controls(value)
    elif isinstance(node, list):
        for item in node:
            found += _controls(item)
    return found


def _ask(client: Any, model: str, stream: bool) -> Any:
    kw: dict[str, Any] = {
        "model": model,
        "max_tokens": 20,
        "system": LONG_SYSTEM,
        "tools": CACHED_TOOLS,
        "messages": AGENT_TURNS,
    }
    if stream:
        with client.messages.stream(**kw) as s:
            return s.get_final_message()
    return client.messages.create(**kw)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_cache_control_reaches_claude_and_the_cache_usage_comes_back(client, upstream, stream):
    """System, tool, tool_result and text breakpoints reach Anthropic where they were; the
    second request reads what the first wrote, and both say so in Anthropic's usage."""
    first = _ask(client, "claude-3-5-haiku", stream)
    sent = upstream.requests[0].json
    assert sent["system"][1]["cache_control"] == EPHEMERAL
    assert "cache_control" not in sent["system"][0]
    assert [t.get("cache_control") for t in sent["tools"]] == [None, EPHEMERAL]
    last = sent["messages"][-1]["content"]
    assert [b["type"] for b in last] == ["tool_result", "text"]
    assert [b.get("cache_control") for b in last] == [
        {"type": "ephemeral", "ttl": "1h"},
        EPHEMERAL,
    ]
    assert len(_controls(sent)) == 4
    assert first.usage.cache_creation_input_tokens > 0
    assert first.usage.cache_read_input_tokens == 0

    second = _ask(client, "claude-3-5-haiku", stream)
    assert second.usage.cache_read_input_tokens == first.usage.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    # Anthropic's input_tokens counts neither: the same uncached rest both times.
    assert second.usage.input_tokens == first.usage.input_tokens


def test_cached_reads_are_priced_as_such_on_the_chat_route(gw, upstream):
    """OpenAI's shape: ``prompt_tokens_details.cached_tokens``, and the cost of a cached
    read at the catalogue's cached price (cheaper than the write before it)."""
    key = gw.new_key()[0]
    messages = [
        {
            "role": "system",
            "content": [
                {"type": "text", "text": "A long manual. " * 40, "cache_control": EPHEMERAL}
            ],
        },
        {"role": "user", "content": "hi"},
    ]
    usages = []
    for _ in range(2):
        r = gw.http.post(
            "/v1/chat/completions",
            json={"model": "claude-3-5-haiku", "messages": messages},
            headers={"authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    first, second = usages
    assert upstream.requests[0].json["system"][0]["cache_control"] == EPHEMERAL
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["cache_write_tokens"] > 0
    assert second["prompt_tokens_details"]["cached_tokens"] == first["cache_write_tokens"]
    assert second["prompt_tokens"] == first["prompt_tokens"]
    assert second["cached_input_cost_usd"] > 0
    assert second["total_cost_usd"] < first["total_cost_usd"]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gemini-2.0-flash"])
def test_other_providers_get_no_cache_control(client, upstream, model):
    msg = _ask(client, model, False)
    assert msg.type == "message"
    [request] = upstream.requests
    assert _controls(request.json) == []


def test_the_sdk_carries_litellm_style_cache_control_to_claude_only(direct, mock):
    """OpenAI-shaped parts, messages and tools with ``cache_control`` (as LiteLLM takes
    them) reach Claude as breakpoints; OpenAI's API does not get them; the caller's dicts
    stay as they were."""
    messages = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "Rules. " * 30, "cache_control": EPHEMERAL}],
        },
        {"role": "user", "content": "question one", "cache_control": EPHEMERAL},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": [{"type": "text", "text": "two", "cache_control": EPHEMERAL}]},
    ]
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object"}},
            "cache_control": EPHEMERAL,
        }
    ]
    before = repr((messages, tools))
    direct.chat.completions.create(model="claude-3-haiku", messages=messages, tools=tools)
    sent = mock.requests[-1].json
    assert sent["system"] == [{"type": "text", "text": "Rules. " * 30, "cache_control": EPHEMERAL}]
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "question one", "cache_control": EPHEMERAL}
    ]
    assert sent["messages"][2]["content"][-1]["cache_control"] == EPHEMERAL
    assert sent["tools"][0]["cache_control"] == EPHEMERAL
    again = direct.chat.completions.create(model="claude-3-haiku", messages=messages, tools=tools)
    assert again.usage.cached_tokens > 0
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.cached_tokens
    direct.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=tools)
    assert _controls(mock.requests[-1].json) == []
    assert repr((messages, tools)) == before
