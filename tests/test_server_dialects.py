"""Each inference route of a real gateway validates what it is sent before any upstream call,
whatever the provider behind the model (OpenAI, Anthropic, Gemini wires on the emulator): bad
input is a 4xx naming the field, in that route's error shape — never a 500, never a silent drop
of what the client asked for."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from lunar import BadRequestError, Lunar

from .test_server import GatewayProcess

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

MODELS = ["gpt-4o-mini", "claude-3-haiku", "gemini-2.0-flash"]
HI = [{"role": "user", "content": "hi"}]


pytestmark = pytest.mark.usefixtures("fresh_upstream")


@pytest.fixture(scope="module")
def key(gw: GatewayProcess) -> str:
    return gw.new_key()[0]


def post(gw: GatewayProcess, key: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return gw.http.post(path, headers={"x-api-key": key}, json=body)


# ---------------------------------------------------------------------------------------------
# OpenAI chat: tools, tool calls and their options


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BAD_CHAT = [
    pytest.param(
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
        "tools[0].function.parameters",
        id="parameters-not-an-object",
    ),
    pytest.param(
        {"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": "x"}]},
        "messages[1].tool_calls",
        id="tool_calls-not-a-list",
    ),
    pytest.param(
        {"messages": [*HI, {"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}]},
        "messages[1].tool_calls[0].function",
        id="tool_call-without-function",
    ),
    pytest.param(
        {
            "messages": [
                *HI,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "a", "type": "function", "function": {"name": ""}}],
                },
            ]
        },
        "messages[1].tool_calls[0].function.name",
        id="tool_call-without-name",
    ),
    pytest.param({"tools": [TOOL], "tool_choice": 5}, "tool_choice", id="tool_choice-number"),
    pytest.param(
        {"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice", id="tool_choice-unknown"
    ),
    pytest.param(
        {"tools": [TOOL], "tool_choice": {"type": "function"}},
        "tool_choice.function.name",
        id="tool_choice-without-name",
    ),
    pytest.param(
        {"tools": [TOOL], "parallel_tool_calls": "no"},
        "parallel_tool_calls",
        id="parallel_tool_calls-string",
    ),
    pytest.param({"logprobs": "yes"}, "logprobs", id="logprobs-string"),
    pytest.param({"logprobs": True, "top_logprobs": 50}, "top_logprobs", id="top_logprobs-50"),
]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("fields", "param"), BAD_CHAT)
def test_bad_tool_fields_on_chat_are_a_400_naming_them_for_every_provider(
    gw, key, upstream, model, fields, param
):
    r = post(gw, key, "/v1/chat/completions", {"model": model, "messages": HI, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert upstream.requests == []


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT)
def test_direct_mode_refuses_the_same_tool_fields(mock, fields, param):
    kwargs = {"messages": HI, **fields}
    with pytest.raises(BadRequestError) as info:
        Lunar().chat.completions.create(model="gpt-4o-mini", **kwargs)
    assert info.value.param == param
    assert mock.requests == []


def test_good_tool_fields_still_pass(gw, key, upstream):
    for choice in ("auto", "none", "required", {"type": "function", "function": {"name": "f"}}):
        body = {"model": "gpt-4o-mini", "messages": HI, "tools": [TOOL], "tool_choice": choice}
        r = post(gw, key, "/v1/chat/completions", {**body, "parallel_tool_calls": False})
        assert r.status_code == 200, r.text
        assert upstream.requests[-1].json["tool_choice"] == choice
    call = {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [
        *HI,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "a", "content": "done"},
    ]
    body = {"messages": history, "logprobs": True, "top_logprobs": 20}
    for model in MODELS:
        r = post(gw, key, "/v1/chat/completions", {"model": model, **body})
        assert r.status_code == 200, r.text


def test_empty_tool_names_on_messages_name_the_anthropic_field(gw, key, upstream):
    """What the chat check above refuses comes from an Anthropic request as its own field."""
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    base = {"model": "claude-3-haiku", "max_tokens": 5, "tools": tools}
    choice = {"type": "tool", "name": ""}
    r = post(gw, key, "/v1/messages", {**base, "messages": HI, "tool_choice": choice})
    assert r.status_code == 400 and "tool_choice.name" in r.json()["error"]["message"]
    use = {"type": "tool_use", "id": "toolu_1", "name": "", "input": {}}
    history = [*HI, {"role": "assistant", "content": [use]}]
    r = post(gw, key, "/v1/messages", {**base, "messages": history})
    assert r.status_code == 400 and "messages[1].content[0]" in r.json()["error"]["message"]
    assert r.json()["type"] == "error"
    assert upstream.requests == []


# ---------------------------------------------------------------------------------------------
# Anthropic messages: fields the Messages API does not have, and fields of the wrong type


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seed": 1}, "seed"),
        ({"max_completion_tokens": 5}, "max_completion_tokens"),
        ({"n": 3}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"stop": ["END"]}, "stop"),
        ({"top_k": "x"}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"thinking": "on"}, "thinking"),
        ({"metadata": {"user_id": 5}}, "metadata.user_id"),
        ({"mcp_servers": []}, "mcp_servers"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format"),
    ],
)
def test_messages_refuses_what_anthropic_refuses_naming_the_field(gw, key, upstream, fields, param):
    """An OpenAI parameter sent to the Anthropic route, or an Anthropic feature the answer
    depends on, is a 400 naming it (as Anthropic's API answers a field it does not have):
    dropped without a word, the answer was not what was asked."""
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="gpt-4o-mini", max_tokens=5, messages=HI, extra_body=fields)
    error = info.value.body["error"]
    assert error["type"] == "invalid_request_error"
    assert f"(param: {param})" in error["message"]
    assert upstream.requests == []


@pytest.mark.parametrize("model", MODELS)
def test_messages_still_takes_every_anthropic_field_it_can_serve(gw, key, upstream, model):
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    msg = client.messages.create(
        model=model,
        max_tokens=20,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=HI,
        metadata={"user_id": "u-1"},
        stop_sequences=["END"],
        thinking={"type": "disabled"},
        service_tier="auto",
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        # (this SDK's create() has no sampling arguments; Anthropic's API still takes them)
        extra_body={
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "cache_control": {"type": "ephemeral"},
            "output_config": {"effort": "low"},
            "context_management": {"edits": []},
            "fallbacks": ["gpt-4o-mini"],
        },
    )
    assert msg.type == "message"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "body",
    [{"messages": HI}, {"model": 5, "messages": HI}, {"model": "", "messages": HI}],
    ids=["missing", "number", "empty"],
)
def test_count_tokens_requires_a_model(gw, key, body):
    """Anthropic's count_tokens needs the model, as its OpenAPI entry here says."""
    r = post(gw, key, "/v1/messages/count_tokens", body)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error"
    assert "(param: model)" in r.json()["error"]["message"]
