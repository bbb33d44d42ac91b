"""The Anthropic translation of the gateway, sans I/O: request dicts in, OpenAI bodies out;
chunks in, Anthropic event bytes out."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunar import BadRequestError, RateLimitError
from lunar._types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChunkChoice,
    Function,
    ReasoningDelta,
    ToolCall,
    Usage,
)
from lunar.server.anthropic_compat import (
    MessageStreamEncoder,
    error_body,
    message_from_completion,
    signed_tool_id,
    to_chat_body,
    unsigned_tool_id,
)


def events(data: bytes) -> list[tuple[str, dict]]:
    out = []
    for block in data.decode().split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ")
        kind, payload = lines[0][7:], json.loads(lines[1][6:])
        assert payload["type"] == kind
        out.append((kind, payload))
    return out


def chunk(content=None, tool_calls=None, finish=None, usage=None, role=None):
    delta = ChoiceDelta(role=role, content=content, tool_calls=tool_calls)
    return ChatCompletionChunk(
        "chatcmpl-7", 1, "gpt-4o-mini", [ChunkChoice(0, delta, finish)], usage, provider="openai"
    )


def test_request_translates_system_blocks_tools_and_options():
    body, lunar = to_chat_body(
        {
            "model": "gpt-4o-mini",
            "max_tokens": 300,
            "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "No lies."}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": "iVBORw0K",
                            },
                        },
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "x"},
                        {"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"x": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "a cat"}],
                        },
                        {"type": "text", "text": "So?"},
                    ],
                },
            ],
            "tools": [{"name": "look", "description": "Look", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
            "stop_sequences": ["END"],
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "metadata": {"user_id": "u-1"},
            "stream": True,
            "fallbacks": ["gpt-4o"],
        }
    )
    assert lunar == {
        "model": "gpt-4o-mini",
        "stream": True,
        "fallbacks": ["gpt-4o"],
        "provider": None,
    }
    assert body["messages"] == [
        {"role": "system", "content": "Be brief.\n\nNo lies."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "look", "arguments": '{"x":1}'},
                },
            ],
            # Claude's signed thinking, for an Anthropic upstream (the others drop it).
            "thinking_blocks": [{"type": "thinking", "thinking": "hmm", "signature": "x"}],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "a cat"},
        {"role": "user", "content": [{"type": "text", "text": "So?"}]},
    ]
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "look", "description": "Look", "parameters": {"type": "object"}},
        }
    ]
    assert body["tool_choice"] == "required"
    assert body["parallel_tool_calls"] is False
    assert body["max_tokens"] == 300
    assert body["stop"] == ["END"]
    assert (body["temperature"], body["top_p"], body["user"]) == (0.5, 0.9, "u-1")
    assert body["top_k"] == 5


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "look"}, {"type": "function", "function": {"name": "look"}}),
    ],
)
def test_tool_choice_maps_to_openai(choice, expected):
    body, _ = to_chat_body(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "look", "input_schema": {"type": "object"}}],
            "tool_choice": choice,
        }
    )
    assert body["tool_choice"] == expected


@pytest.mark.parametrize(
    ("request_body", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        (
            {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
        ),
        ({"model": "m", "max_tokens": 5, "messages": []}, "messages"),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
            "messages[0].role",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "video"}]}],
            },
            "messages[0].content[0].type",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "temperature": 1.5,
                "messages": [{"role": "user", "content": "x"}],
            },
            "temperature",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "tools": [{"name": "t"}],
                "messages": [{"role": "user", "content": "x"}],
            },
            "tools[0].input_schema",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "stop_sequences": "END",
                "messages": [{"role": "user", "content": "x"}],
            },
            "stop_sequences",
        ),
    ],
)
def test_invalid_requests_name_the_field(request_body, param):
    with pytest.raises(BadRequestError) as info:
        to_chat_body(request_body)
    assert info.value.param == param


def test_completion_becomes_a_message_with_parsed_tool_input():
    completion = ChatCompletion(
        "chatcmpl-abc",
        1,
        "gpt-4o-mini",
        [
            Choice(
                0,
                ChatCompletionMessage(
                    content="Checking.",
                    tool_calls=[ToolCall("call_1", Function("look", '{"where": "sky"}'))],
                ),
                "tool_calls",
            )
        ],
        Usage(
            20,
            7,
            cached_tokens=5,
            input_cost_usd=1e-6,
            output_cost_usd=2e-6,
            total_cost_usd=3e-6,
            latency_ms=12.0,
            ttft_ms=12.0,
        ),
        provider="openai",
    )
    msg = message_from_completion(completion)
    assert msg["id"] == "msg_abc" and msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "look", "input": {"where": "sky"}},
    ]
    assert msg["stop_reason"] == "tool_use" and msg["stop_sequence"] is None
    assert msg["usage"]["input_tokens"] == 15
    assert msg["usage"]["cache_read_input_tokens"] == 5
    assert msg["usage"]["output_tokens"] == 7
    assert msg["usage"]["total_cost_usd"] == 3e-6


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
    ],
)
def test_stop_reasons(finish, stop_reason):
    completion = ChatCompletion(
        "c", 1, "m", [Choice(0, ChatCompletionMessage(content="x"), finish)]
    )
    assert message_from_completion(completion)["stop_reason"] == stop_reason


def test_the_stop_sequence_that_matched_is_named_whole_and_streamed():
    """ "stop_sequence" only with the sequence the upstream named; a bare "stop" (OpenAI's,
    Gemini's: a natural end or a stop sequence, unknown which) reads "end_turn"."""
    for sequence, expected in (("END", ("stop_sequence", "END")), (None, ("end_turn", None))):
        choice = Choice(0, ChatCompletionMessage(content="x"), "stop", None, sequence)
        msg = message_from_completion(ChatCompletion("c", 1, "m", [choice]))
        assert (msg["stop_reason"], msg["stop_sequence"]) == expected
        enc = MessageStreamEncoder("m")
        last = chunk(finish="stop")
        last.choices[0].stop_sequence = sequence
        got = events(enc.feed(chunk(content="x")) + enc.feed(last) + enc.end())
        [delta] = [e for k, e in got if k == "message_delta"]
        assert (delta["delta"]["stop_reason"], delta["delta"]["stop_sequence"]) == expected
    # A sequence beside another finish is no match.
    choice = Choice(0, ChatCompletionMessage(content="x"), "length", None, "END")
    msg = message_from_completion(ChatCompletion("c", 1, "m", [choice]))
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("max_tokens", None)


def test_text_stream_becomes_anthropic_events():
    enc = MessageStreamEncoder("gpt-4o-mini", input_tokens_estimate=9)
    out = enc.feed(chunk(content="", role="assistant"))
    out += enc.feed(chunk(content="Hello"))
    out += enc.feed(chunk(content=" world"))
    out += enc.feed(chunk(finish="stop", usage=Usage(12, 2, total_cost_usd=1e-6)))
    out += enc.end()
    got = events(out)
    assert [k for k, _ in got] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = got[0][1]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] == 9
    assert start["id"].startswith("msg_") and start["model"] == "gpt-4o-mini"
    assert got[1][1]["content_block"] == {"type": "text", "text": ""}
    assert [e[1]["delta"]["text"] for e in got[2:4]] == ["Hello", " world"]
    delta = got[5][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == 2 and delta["usage"]["input_tokens"] == 12
    assert delta["usage"]["total_cost_usd"] == 1e-6


def test_tool_calls_stream_as_tool_use_blocks_with_json_deltas():
    enc = MessageStreamEncoder("m")
    out = enc.feed(chunk(content="On it.", role="assistant"))
    out += enc.feed(
        chunk(tool_calls=[ChoiceDeltaToolCall(0, "call_a", "function", Function("look", ""))])
    )
    out += enc.feed(chunk(tool_calls=[ChoiceDeltaToolCall(0, function=Function(None, '{"x"'))]))
    out += enc.feed(chunk(tool_calls=[ChoiceDeltaToolCall(0, function=Function(None, ": 1}"))]))
    out += enc.feed(
        chunk(tool_calls=[ChoiceDeltaToolCall(1, "call_b", "function", Function("find", "{}"))])
    )
    out += enc.feed(chunk(finish="tool_calls"))
    out += enc.end()
    got = events(out)
    starts = [e for k, e in got if k == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[1]["content_block"] == {
        "type": "tool_use",
        "id": "call_a",
        "name": "look",
        "input": {},
    }
    assert starts[2]["content_block"]["id"] == "call_b"
    json_parts = [
        e["delta"]["partial_json"] for k, e in got if k == "content_block_delta" and e["index"] == 1
    ]
    assert "".join(json_parts) == '{"x": 1}'
    stops = [e["index"] for k, e in got if k == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert got[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_mid_stream_error_is_an_error_event_and_nothing_after():
    enc = MessageStreamEncoder("m")
    out = enc.feed(chunk(content="Once", role="assistant"))
    err = RateLimitError("Rate limited upstream")
    got = events(out + enc.error(err))
    assert got[-1] == (
        "error",
        {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": "Rate limited upstream"},
        },
    )
    assert not any(k == "message_stop" for k, _ in got)


def test_error_body_shape():
    assert error_body(BadRequestError("bad 'x'", param="x")) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "bad 'x'"},
    }


def test_cache_reads_and_writes_come_back_where_anthropic_puts_them():
    """An answer of Claude's with a prompt cache: ``input_tokens`` is what was neither read
    from nor written to the cache, as Anthropic counts it, streamed or not."""
    usage = Usage(3050, 10, cached_tokens=2000, cache_write_tokens=1000, cache_write_1h_tokens=400)
    expected = {
        "input_tokens": 50,
        "cache_read_input_tokens": 2000,
        "cache_creation_input_tokens": 1000,
        "cache_creation": {"ephemeral_5m_input_tokens": 600, "ephemeral_1h_input_tokens": 400},
        "output_tokens": 10,
    }
    completion = ChatCompletion(
        "chatcmpl-c", 1, "claude-sonnet-4-5",
        [Choice(0, ChatCompletionMessage(content="Hi"), "stop")], usage, provider="anthropic",
    )  # fmt: skip
    got = message_from_completion(completion)["usage"]
    assert {k: got[k] for k in expected} == expected
    enc = MessageStreamEncoder("claude-sonnet-4-5")
    out = enc.feed(chunk(content="Hi", role="assistant"))
    out += enc.feed(chunk(finish="stop", usage=usage)) + enc.end()
    [delta] = [e for k, e in events(out) if k == "message_delta"]
    assert {k: delta["usage"][k] for k in expected} == expected


# -- Gemini's thought signatures, carried in the tool_use id ------------------------------

SIG = "CiQB+/x=="  # base64, as Gemini's: every character that needs a stand-in in an id
SIGNED = {"google": {"thought_signature": SIG}}
ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]+")


def tool_turns(use_id: str, result_id: str | None = None) -> dict:
    return {
        "model": "m",
        "max_tokens": 5,
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": use_id, "name": "look", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": result_id or use_id, "content": "21"}
                ],
            },
        ],
    }


def test_a_signed_call_round_trips_through_its_tool_use_id_streamed_and_not():
    completion = ChatCompletion(
        "chatcmpl-1",
        1,
        "gemini-3-pro-preview",
        [
            Choice(
                0,
                ChatCompletionMessage(
                    tool_calls=[
                        ToolCall("call_1", Function("look", "{}"), extra_content=SIGNED),
                        ToolCall("call_2", Function("look", "{}")),
                    ]
                ),
                "tool_calls",
            )
        ],
        provider="gemini",
    )
    first, second = message_from_completion(completion)["content"]
    assert second["id"] == "call_2"  # no signature: the id as it was
    enc = MessageStreamEncoder("m")
    piece = ChoiceDeltaToolCall(0, "call_1", "function", Function("look", "{}"), SIGNED)
    streamed = [e for k, e in events(enc.feed(chunk(tool_calls=[piece]))) if k.endswith("start")]
    assert streamed[-1]["content_block"]["id"] == first["id"]
    assert ANTHROPIC_ID.fullmatch(first["id"]) and first["id"].startswith("call_1__lsig_")
    body, _ = to_chat_body(tool_turns(first["id"]))
    [call] = body["messages"][1]["tool_calls"]
    assert call["id"] == body["messages"][2]["tool_call_id"] == "call_1"
    assert call["extra_content"] == SIGNED


def test_a_call_without_a_signature_reads_as_today():
    body, _ = to_chat_body(tool_turns("toolu_01A"))
    assert body["messages"][1]["tool_calls"] == [
        {"id": "toolu_01A", "type": "function", "function": {"name": "look", "arguments": "{}"}}
    ]
    assert body["messages"][2]["tool_call_id"] == "toolu_01A"


@pytest.mark.parametrize(
    ("use_id", "result_id", "param"),
    [
        ("call_1__lsig_a+b", None, "messages[1].content[0].id"),
        ("call_1", "call_1__lsig_a_xb", "messages[2].content[0].tool_use_id"),
    ],
)
def test_a_changed_signature_in_an_id_is_refused_naming_the_field(use_id, result_id, param):
    with pytest.raises(BadRequestError) as info:
        to_chat_body(tool_turns(use_id, result_id))
    assert info.value.param == param
    assert "__lsig_" in info.value.message


# Any text, often holding the marker and the pieces of an encoded signature.
CALL_IDS = st.lists(
    st.one_of(st.sampled_from(["__lsig_", "_", "_s", "_p", "-"]), st.text(max_size=4))
).map("".join)


@settings(max_examples=300)
@given(
    CALL_IDS,
    st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9+/=]+", fullmatch=True)),
)
def test_signed_tool_ids_round_trip(call_id, signature):
    extra = None if signature is None else {"google": {"thought_signature": signature}}
    tool_id = signed_tool_id(call_id, extra)
    assert unsigned_tool_id(tool_id, "id") == (call_id, signature)
    if ANTHROPIC_ID.fullmatch(call_id):
        assert ANTHROPIC_ID.fullmatch(tool_id)
    if signature is None and "__lsig_" not in call_id:
        assert tool_id == call_id  # byte for byte what the gateway wrote before


def reasoning(text=None, blocks=None):
    delta = ReasoningDelta(reasoning_content=text, thinking_blocks=blocks)
    return ChatCompletionChunk("msg_7", 1, "m", [ChunkChoice(0, delta, None)], provider="x")


def test_reasoning_streams_as_thinking_blocks_signed_redacted_and_unsigned():
    enc = MessageStreamEncoder("m")
    out = enc.feed(reasoning("Let me "))
    out += enc.feed(reasoning("think."))
    out += enc.feed(reasoning(blocks=[{"type": "thinking", "signature": "SIG"}]))
    out += enc.feed(reasoning(blocks=[{"type": "redacted_thinking", "data": "ENC"}]))
    out += enc.feed(reasoning("Unsigned"))  # another provider's: closed by the text
    out += enc.feed(chunk(content="Hi"))
    out += enc.feed(chunk(finish="stop"))
    got = events(out + enc.end())
    blocks = [(e["index"], e["content_block"]) for k, e in got if k == "content_block_start"]
    assert blocks == [
        (0, {"type": "thinking", "thinking": "", "signature": ""}),
        (1, {"type": "redacted_thinking", "data": "ENC"}),
        (2, {"type": "thinking", "thinking": "", "signature": ""}),
        (3, {"type": "text", "text": ""}),
    ]
    deltas = [(e["index"], e["delta"]) for k, e in got if k == "content_block_delta"]
    assert deltas == [
        (0, {"type": "thinking_delta", "thinking": "Let me "}),
        (0, {"type": "thinking_delta", "thinking": "think."}),
        (0, {"type": "signature_delta", "signature": "SIG"}),
        (2, {"type": "thinking_delta", "thinking": "Unsigned"}),
        (3, {"type": "text_delta", "text": "Hi"}),
    ]
    stops = [e["index"] for k, e in got if k == "content_block_stop"]
    assert stops == [0, 1, 2, 3]


def test_reasoning_in_a_whole_message_comes_first():
    signed = ChatCompletionMessage(
        content="Hi",
        reasoning_content="hmm",
        thinking_blocks=[{"type": "thinking", "thinking": "hmm", "signature": "S"}],
    )
    other = ChatCompletionMessage(content="Hi", reasoning_content="hmm")
    for message, first in (
        (signed, {"type": "thinking", "thinking": "hmm", "signature": "S"}),
        (other, {"type": "thinking", "thinking": "hmm", "signature": ""}),
    ):
        completion = ChatCompletion("c", 1, "m", [Choice(0, message, "stop")])
        assert message_from_completion(completion)["content"] == [
            first,
            {"type": "text", "text": "Hi"},
        ]
