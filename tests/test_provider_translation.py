"""Anthropic and Gemini adapters, sans I/O: requests built, responses and streams parsed.

Stream inputs follow the recorded shapes of each provider's documentation."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunar import APIConnectionError, BadRequestError, RateLimitError, ServerError
from lunar._catalog import Catalog
from lunar._streaming import ChatAccumulator
from lunar.providers import Target, adapter_for

CATALOG = Catalog.load()
ANTHROPIC = adapter_for("anthropic")
GEMINI = adapter_for("gemini")
A_TARGET = Target(
    CATALOG.resolve("claude-3-haiku")[0], CATALOG.providers["anthropic"], "http://127.0.0.1:9", "ak"
)
G_TARGET = Target(
    CATALOG.resolve("gemini-2.0-flash")[0], CATALOG.providers["gemini"], "http://127.0.0.1:9", "gk"
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "additionalProperties": False,
            },
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "And this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]


def sse(events: list[tuple[str | None, dict]]) -> bytes:
    out = []
    for name, obj in events:
        if name:
            out.append(f"event: {name}\n")
        out.append(f"data: {json.dumps(obj)}\n\n")
    return "".join(out).encode()


def run(translator, pieces):
    chunks = []
    for p in pieces:
        chunks.extend(translator.feed(p))
    chunks.extend(translator.close())
    return chunks


def assemble(chunks):
    acc = ChatAccumulator()
    for c in chunks:
        acc.add(c)
    return acc.completion()


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


# --- Anthropic -----------------------------------------------------------------------------


def test_anthropic_request_lifts_system_merges_turns_and_translates_tools_and_images():
    req = ANTHROPIC.build_request(
        {
            "messages": CONVERSATION,
            "tools": TOOLS,
            "tool_choice": "required",
            "stop": "END",
            "user": "u1",
            "temperature": 0.2,
        },
        A_TARGET,
        stream=True,
    )
    assert req.url == "http://127.0.0.1:9/v1/messages"
    assert req.headers["x-api-key"] == "ak"
    assert req.headers["anthropic-version"] == "2023-06-01"
    body = json.loads(req.content)
    assert body["model"] == "claude-3-haiku-20240307"
    assert body["system"] == "Be brief."
    assert body["max_tokens"] == 4096  # catalogue default when the caller gives none
    assert body["stream"] is True and body["stop_sequences"] == ["END"]
    assert body["metadata"] == {"user_id": "u1"} and body["temperature"] == 0.2
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"]  # the two user turns merged
    first = body["messages"][0]["content"]
    assert [b["type"] for b in first] == ["text", "text", "image", "image"]
    assert first[2]["source"] == {
        "type": "base64",
        "media_type": "image/png",
        "data": "iVBORw0KGgo=",
    }
    assert first[3]["source"] == {"type": "url", "url": "https://example.com/cat.jpg"}
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}
    ]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": '{"temp_c": 21}'}
    ]
    assert body["tools"][0]["name"] == "get_weather"
    assert body["tools"][0]["input_schema"]["properties"] == {"city": {"type": "string"}}
    assert body["tool_choice"] == {"type": "any"}


def test_anthropic_named_tool_choice_and_parallel_off():
    req = ANTHROPIC.build_request(
        {
            "messages": CONVERSATION[:2],
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,
            "max_tokens": 50,
        },
        A_TARGET,
        stream=False,
    )
    body = json.loads(req.content)
    assert body["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }
    assert body["max_tokens"] == 50 and "stream" not in body


ANTHROPIC_TEXT = sse(
    [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude-3-haiku-20240307",
                    "stop_reason": None,
                    "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5},
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hello"},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": " wörld ☃"},
            },
        ),
        ("brand_new_event", {"type": "brand_new_event", "x": 1}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                "usage": {"output_tokens": 15},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
)

ANTHROPIC_TOOL = sse(
    [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_2",
                    "model": "claude-3-haiku-20240307",
                    "usage": {"input_tokens": 40},
                },
            },
        ),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Let me check."},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {},
                },
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city": "Pa'},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": 'ris"}'},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 1}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 30},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
)


def test_anthropic_text_stream():
    told, *chunks = run(ANTHROPIC.stream_translator(A_TARGET), [ANTHROPIC_TEXT])
    # message_start's count comes first, on a chunk of no choice (the engine keeps it for a
    # stream cut short, and hands it to no caller).
    assert told.choices == [] and told.usage.prompt_tokens == 30 and told.usage.cached_tokens == 5
    assert chunks[0].choices[0].delta.role == "assistant"
    done = assemble(chunks)
    assert done.choices[0].message.content == "Hello wörld ☃"
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (30, 15)
    assert done.usage.cached_tokens == 5
    assert done.id == "msg_1" and done.model == "claude-3-haiku-20240307"


def test_anthropic_tool_stream_numbers_calls_among_calls():
    chunks = [c for c in run(ANTHROPIC.stream_translator(A_TARGET), [ANTHROPIC_TOOL]) if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert {tc.index for tc in calls} == {0}  # block 1 is tool call 0
    done = assemble(chunks)
    [call] = done.choices[0].message.tool_calls
    assert (call.id, call.function.name) == ("toolu_1", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert done.choices[0].message.content == "Let me check."
    assert done.choices[0].finish_reason == "tool_calls"


def test_anthropic_streamed_call_without_arguments_gives_an_empty_object():
    # As Claude streams it: the only delta of a call without arguments is an empty string.
    wire = sse(
        [
            ("message_start", {"type": "message_start", "message": {"id": "msg_4"}}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "tool_use", "id": "toolu_9", "name": "now"},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": ""},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use"}}),
            ("message_stop", {"type": "message_stop"}),
        ]
    )
    done = assemble(run(ANTHROPIC.stream_translator(A_TARGET), [wire]))
    [call] = done.choices[0].message.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == ("toolu_9", "now", "{}")


@pytest.mark.parametrize(
    ("start_usage", "delta_usage", "expected"),
    [
        ({"input_tokens": 40}, {"output_tokens": 7}, (40, 7)),
        ({"input_tokens": 40}, {}, (40, 0)),  # no output count anywhere: 0
        ({"input_tokens": 40, "output_tokens": 2}, {}, (40, 2)),
        ({}, {"output_tokens": 7}, (0, 7)),
        ({"input_tokens": 40, "output_tokens": None}, {"output_tokens": None}, (40, 0)),
        (None, None, None),  # no usage on the wire: none, so the engine estimates it
        ({"input_tokens": None}, {"output_tokens": None}, None),
    ],
)
def test_anthropic_stream_usage_as_far_as_the_wire_gave_it(start_usage, delta_usage, expected):
    start: dict = {"id": "msg_3", "model": "claude-3-haiku-20240307"}
    if start_usage is not None:
        start["usage"] = start_usage
    delta: dict = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}
    if delta_usage is not None:
        delta["usage"] = delta_usage
    raw = sse(
        [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "Hi"}}),
            ("message_delta", delta),
            ("message_stop", {"type": "message_stop"}),
        ]
    )  # fmt: skip
    chunks = run(ANTHROPIC.stream_translator(A_TARGET), [raw])
    usage = chunks[-1].usage
    if expected is None:
        assert usage is None
    else:
        assert (usage.prompt_tokens, usage.completion_tokens) == expected


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        # The answer was cut short by the context window: as cut by max_tokens.
        ("model_context_window_exceeded", "length"),
    ],
)
def test_anthropic_stop_reasons(reason, finish):
    data = ANTHROPIC_TEXT.replace(b'"max_tokens"', json.dumps(reason).encode())
    assert (
        assemble(run(ANTHROPIC.stream_translator(A_TARGET), [data])).choices[0].finish_reason
        == finish
    )
    message = {"id": "msg_5", "content": [{"type": "text", "text": "Hi"}], "stop_reason": reason}
    done = ANTHROPIC.parse_response(json.dumps(message).encode(), A_TARGET)
    assert done.choices[0].finish_reason == finish


def test_anthropic_says_which_stop_sequence_ended_the_answer():
    """Anthropic names the stop sequence that matched; OpenAI's finish_reason "stop" cannot,
    so the choice carries it beside (``stop_sequence``), streamed and not."""
    data = ANTHROPIC_TEXT.replace(
        b'"stop_reason": "max_tokens", "stop_sequence": null',
        b'"stop_reason": "stop_sequence", "stop_sequence": "END"',
    )
    chunks = run(ANTHROPIC.stream_translator(A_TARGET), [data])
    assert chunks[-1].choices[0].stop_sequence == "END"
    assert chunks[-1].to_dict()["choices"][0]["stop_sequence"] == "END"
    done = assemble(chunks)
    assert (done.choices[0].finish_reason, done.choices[0].stop_sequence) == ("stop", "END")
    message = {
        "id": "msg_5",
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "stop_sequence",
        "stop_sequence": "END",
    }
    done = ANTHROPIC.parse_response(json.dumps(message).encode(), A_TARGET)
    assert (done.choices[0].finish_reason, done.choices[0].stop_sequence) == ("stop", "END")
    message["stop_reason"] = "end_turn"  # a sequence beside another reason is no match
    done = ANTHROPIC.parse_response(json.dumps(message).encode(), A_TARGET)
    assert done.choices[0].stop_sequence is None
    assert "stop_sequence" not in done.to_dict()["choices"][0]


@settings(max_examples=150)
@given(st.lists(st.integers(0, 10_000), max_size=25))
def test_anthropic_any_split_gives_the_same_final_message(cuts):
    whole = assemble(run(ANTHROPIC.stream_translator(A_TARGET), [ANTHROPIC_TOOL]))
    split = assemble(run(ANTHROPIC.stream_translator(A_TARGET), splits(ANTHROPIC_TOOL, cuts)))
    split.created = whole.created  # each translator's clock, read a moment apart
    assert split == whole


def test_anthropic_overloaded_error_event_mid_stream_raises():
    data = ANTHROPIC_TEXT.split(b"event: content_block_stop")[0] + sse(
        [
            (
                "error",
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            )
        ]
    )
    with pytest.raises(ServerError, match="Overloaded"):
        run(ANTHROPIC.stream_translator(A_TARGET), [data])


def test_anthropic_cut_stream_raises():
    data = ANTHROPIC_TEXT.split(b"event: message_delta")[0]
    with pytest.raises(APIConnectionError):
        run(ANTHROPIC.stream_translator(A_TARGET), [data])


def test_anthropic_non_stream_response_and_errors():
    body = {
        "id": "msg_3",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-haiku-20240307",
        "stop_reason": "tool_use",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
        "usage": {"input_tokens": 12, "output_tokens": 7},
    }
    done = ANTHROPIC.parse_response(json.dumps(body).encode(), A_TARGET)
    assert done.choices[0].finish_reason == "tool_calls"
    assert json.loads(done.choices[0].message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (12, 7)
    err = ANTHROPIC.parse_error(
        529,
        {},
        b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        A_TARGET,
    )
    assert isinstance(err, ServerError) and err.retryable
    err = ANTHROPIC.parse_error(429, {"retry-after": "4"}, b"{}", A_TARGET)
    assert isinstance(err, RateLimitError) and err.retry_after == 4.0


def test_bad_tool_arguments_in_history_are_named():
    bad = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{nope"}}
            ],
        }
    ]
    with pytest.raises(BadRequestError, match="Tool call arguments must be JSON"):
        ANTHROPIC.build_request({"messages": bad}, A_TARGET, stream=False)


# --- Gemini --------------------------------------------------------------------------------


def test_gemini_request_shape():
    req = GEMINI.build_request(
        {
            "messages": CONVERSATION,
            "tools": TOOLS,
            "tool_choice": "auto",
            "temperature": 0.3,
            "top_p": 0.8,
            "max_tokens": 64,
            "stop": ["X"],
            "response_format": {"type": "json_object"},
        },
        G_TARGET,
        stream=True,
    )
    assert req.url == (
        "http://127.0.0.1:9/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    )
    assert req.headers["x-goog-api-key"] == "gk"
    body = json.loads(req.content)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    parts = body["contents"][0]["parts"]
    assert parts[2] == {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}
    assert parts[3] == {
        "fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg"}
    }
    assert body["contents"][1]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}
    ]
    assert body["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}
    ]
    assert body["generationConfig"] == {
        "temperature": 0.3,
        "topP": 0.8,
        "maxOutputTokens": 64,
        "stopSequences": ["X"],
        "responseMimeType": "application/json",
    }
    decl = body["tools"][0]["functionDeclarations"][0]
    assert decl["name"] == "get_weather"
    assert "additionalProperties" not in decl["parameters"]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}
    plain = GEMINI.build_request({"messages": CONVERSATION[:2]}, G_TARGET, stream=False)
    assert plain.url.endswith("/v1beta/models/gemini-2.0-flash:generateContent")


def g_event(parts=None, finish=None, usage=None):
    cand = {"content": {"role": "model", "parts": parts or []}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    obj = {"candidates": [cand], "modelVersion": "gemini-2.0-flash-001"}
    if usage:
        obj["usageMetadata"] = usage
    return (None, obj)


GEMINI_TEXT = sse(
    [
        g_event([{"text": "Once upon"}]),
        g_event([{"text": " a time ☃"}]),
        g_event(
            [{"text": "."}],
            "STOP",
            {"promptTokenCount": 8, "candidatesTokenCount": 6, "totalTokenCount": 14},
        ),
    ]
)
GEMINI_TOOL = sse(
    [
        g_event(
            [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
            "STOP",
            {"promptTokenCount": 20, "candidatesTokenCount": 5},
        ),
    ]
)


def test_gemini_text_stream():
    chunks = run(GEMINI.stream_translator(G_TARGET), [GEMINI_TEXT])
    done = assemble(chunks)
    assert done.choices[0].message.content == "Once upon a time ☃."
    assert done.choices[0].finish_reason == "stop"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (8, 6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert done.model == "gemini-2.0-flash-001"


def test_gemini_tool_stream():
    done = assemble(run(GEMINI.stream_translator(G_TARGET), [GEMINI_TOOL]))
    [call] = done.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert done.choices[0].finish_reason == "tool_calls"


SIGNED_CALLS = [
    {
        "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
        "thoughtSignature": "c2lnLTE=",
    },
    # Gemini 3 signs the first of parallel calls only.
    {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
]
SIGNED = {"google": {"thought_signature": "c2lnLTE="}}


def test_gemini_thought_signature_stays_on_the_tool_call_streamed_and_not():
    """Where Google's OpenAI-compatible endpoint puts it: ``extra_content.google``."""
    chunks = run(GEMINI.stream_translator(G_TARGET), [sse([g_event(SIGNED_CALLS, "STOP")])])
    pieces = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert [p.extra_content for p in pieces] == [SIGNED, None]
    assert pieces[0].to_dict()["extra_content"] == SIGNED
    assert "extra_content" not in pieces[1].to_dict()
    streamed = assemble(chunks).choices[0].message.tool_calls
    body = {"candidates": [candidate(0, SIGNED_CALLS, "STOP")]}
    whole = GEMINI.parse_response(json.dumps(body).encode(), G_TARGET).choices[0].message
    for calls in (streamed, whole.tool_calls):
        assert [c.extra_content for c in calls] == [SIGNED, None]
        assert calls[0].to_dict()["extra_content"] == SIGNED
        assert "extra_content" not in calls[1].to_dict()


def test_gemini_thought_signature_goes_back_on_its_function_call_part():
    body = {"candidates": [candidate(0, SIGNED_CALLS, "STOP")]}
    answer = GEMINI.parse_response(json.dumps(body).encode(), G_TARGET).choices[0].message
    calls = [c.to_dict() for c in answer.tool_calls]
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        *({"role": "tool", "tool_call_id": c["id"], "content": "sunny"} for c in calls),
    ]
    sent = json.loads(GEMINI.build_request({"messages": messages}, G_TARGET, False).content)
    assert sent["contents"][1]["parts"] == SIGNED_CALLS


def test_gemini_thought_signature_of_the_wrong_type_is_named():
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
        "extra_content": {"google": {"thought_signature": 5}},
    }
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]
    with pytest.raises(BadRequestError) as info:
        GEMINI.build_request({"messages": messages}, G_TARGET, False)
    assert info.value.param == "messages.tool_calls.extra_content.google.thought_signature"


def candidate(index, parts, finish=None):
    cand = {"content": {"role": "model", "parts": parts}, "index": index}
    if finish:
        cand["finishReason"] = finish
    return cand


# candidateCount=2: each event carries the candidates that have something new, each with its
# index; one finishes (MAX_TOKENS) before the other has said all it will (a tool call).
GEMINI_TWO_CANDIDATES = sse(
    [
        (None, {"candidates": [candidate(0, [{"text": "Once"}]), candidate(1, [{"text": "Hi"}])]}),
        (None, {"candidates": [candidate(1, [{"text": " there"}], "MAX_TOKENS")]}),
        (
            None,
            {
                "candidates": [
                    candidate(
                        0,
                        [
                            {"text": " upon"},
                            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
                        ],
                        "STOP",
                    )
                ],
                "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 9},
            },
        ),
    ]
)


def test_gemini_stream_gives_each_candidate_its_own_choice():
    chunks = run(GEMINI.stream_translator(G_TARGET), [GEMINI_TWO_CANDIDATES])
    # The first usageMetadata's count, on a chunk of no choice before that event's content
    # (the engine keeps it for a stream cut short, and hands it to no caller).
    [told] = [c for c in chunks if not c.choices]
    assert told.usage.prompt_tokens == 8 and chunks.index(told) == len(chunks) - 5
    chunks.remove(told)
    assert all(len(c.choices) == 1 for c in chunks)
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]  # each choice opens with its role, as OpenAI's stream does
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks]
    assert [f for f in finishes if f[1] is not None] == [(0, "tool_calls"), (1, "length")]
    assert [c.usage is not None for c in chunks].count(True) == 1 and chunks[-1].usage
    done = assemble(chunks)
    assert [c.index for c in done.choices] == [0, 1]
    first, second = done.choices
    assert first.message.content == "Once upon"
    [call] = first.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert (second.message.content, second.message.tool_calls) == ("Hi there", None)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (8, 9)


def test_gemini_stream_with_a_candidate_left_unfinished_raises():
    cut = GEMINI_TWO_CANDIDATES.rsplit(b"data:", 1)[0]  # candidate 0 never finishes
    with pytest.raises(APIConnectionError):
        run(GEMINI.stream_translator(G_TARGET), [cut])


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
    ],
)
def test_gemini_finish_reasons(reason, finish):
    data = GEMINI_TEXT.replace(b'"STOP"', json.dumps(reason).encode())
    assert (
        assemble(run(GEMINI.stream_translator(G_TARGET), [data])).choices[0].finish_reason == finish
    )


@settings(max_examples=150)
@given(st.lists(st.integers(0, 10_000), max_size=25))
def test_gemini_any_split_gives_the_same_final_message(cuts):
    whole = assemble(run(GEMINI.stream_translator(G_TARGET), [GEMINI_TEXT]))
    split = assemble(run(GEMINI.stream_translator(G_TARGET), splits(GEMINI_TEXT, cuts)))
    assert split.choices == whole.choices and split.usage == whole.usage


def test_gemini_cut_stream_and_error_event_raise():
    with pytest.raises(APIConnectionError):
        run(GEMINI.stream_translator(G_TARGET), [GEMINI_TEXT.rsplit(b"data:", 1)[0]])
    err = sse([(None, {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})])
    with pytest.raises(ServerError):
        run(GEMINI.stream_translator(G_TARGET), [GEMINI_TEXT.split(b"\n\n")[0] + b"\n\n", err])


def test_gemini_non_stream_response():
    body = {
        "candidates": [
            {"content": {"parts": [{"text": "Hi"}], "role": "model"}, "finishReason": "MAX_TOKENS"}
        ],
        "usageMetadata": {
            "promptTokenCount": 3,
            "candidatesTokenCount": 1,
            "thoughtsTokenCount": 2,
        },
    }
    done = GEMINI.parse_response(json.dumps(body).encode(), G_TARGET)
    assert done.choices[0].message.content == "Hi"
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 3)


def test_gemini_retry_info_becomes_retry_after_and_bad_key_is_401():
    body = json.dumps(
        {
            "error": {
                "code": 429,
                "message": "Quota",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}
                ],
            }
        }
    ).encode()
    err = GEMINI.parse_error(429, {}, body, G_TARGET)
    assert isinstance(err, RateLimitError) and err.retry_after == 37.0
    body = json.dumps(
        {
            "error": {
                "code": 400,
                "message": "API key not valid.",
                "status": "INVALID_ARGUMENT",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                    }
                ],
            }
        }
    ).encode()
    from lunar import AuthenticationError

    assert isinstance(GEMINI.parse_error(400, {}, body, G_TARGET), AuthenticationError)


OPENAI = adapter_for("openai")
O_TARGET = Target(
    CATALOG.resolve("gpt-4o-mini")[0], CATALOG.providers["openai"], "http://127.0.0.1:9", "ok"
)


def _openai_chunk(text: str) -> tuple[None, dict]:
    return (
        None,
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        },
    )


# Content then an error event, all in one read: what each wire sends when it fails mid-stream.
ERROR_AFTER_CONTENT = {
    "openai": (
        OPENAI,
        O_TARGET,
        sse(
            [
                _openai_chunk("Once"),
                _openai_chunk(" upon"),
                (None, {"error": {"message": "boom", "type": "server_error", "code": 500}}),
            ]
        ),
    ),
    "anthropic": (
        ANTHROPIC,
        A_TARGET,
        ANTHROPIC_TEXT.split(b"event: content_block_stop")[0]
        + sse([("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})]),
    ),
    "gemini": (
        GEMINI,
        G_TARGET,
        GEMINI_TEXT.split(b"\n\n")[0]
        + b"\n\n"
        + sse([(None, {"error": {"code": 500, "message": "boom", "status": "INTERNAL"}})]),
    ),
}


@pytest.mark.parametrize("wire", list(ERROR_AFTER_CONTENT))
def test_an_error_event_in_the_same_read_comes_after_the_content_before_it(wire):
    adapter, target, data = ERROR_AFTER_CONTENT[wire]
    translator = adapter.stream_translator(target)
    chunks = translator.feed(data)  # one read, as a pool hands over what has arrived
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with pytest.raises(ServerError, match="boom"):
        translator.close()
    with pytest.raises(ServerError, match="boom"):
        translator.feed(b"")
    # and when the error comes first, it raises at once
    error_only = data[data.rstrip(b"\n").rindex(b"\n\n") + 2 :]
    with pytest.raises(ServerError, match="boom"):
        adapter.stream_translator(target).feed(error_only)
