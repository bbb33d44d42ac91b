"""The emulator's Anthropic Messages and Google Gemini wires, pinned over real sockets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lunar.testing import STORY, MockServer, Reply

# -- helpers ------------------------------------------------------------------------------

A_HEADERS = {"anthropic-version": "2023-06-01"}
A_BODY: dict[str, Any] = {
    "model": "claude-test",
    "max_tokens": 100,
    "system": "Be brief.",  # 2 words
    "messages": [{"role": "user", "content": "Tell me a story"}],  # 4 words
}
A_PROMPT = (2 + 3) + (4 + 3)
G_PATH = "/v1beta/models/gemini-test:generateContent"
G_STREAM = "/v1beta/models/gemini-test:streamGenerateContent?alt=sse"
G_BODY: dict[str, Any] = {
    "contents": [{"role": "user", "parts": [{"text": "Tell me a story"}]}],
    "systemInstruction": {"parts": [{"text": "Be brief."}]},
}
G_PROMPT = A_PROMPT

A_TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
    {
        "name": "lookup",
        "input_schema": {"type": "object", "properties": {"q": {"type": "number"}}},
    },
]
G_TOOLS = [
    {
        "functionDeclarations": [
            {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "OBJECT",
                    "properties": {"city": {"type": "STRING"}, "days": {"type": "INTEGER"}},
                    "required": ["city"],
                },
            },
            {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {}}}},
        ]
    }
]


def story(n: int) -> str:
    return " ".join(STORY[i % len(STORY)] for i in range(n))


def sse_events(raw: str) -> list[tuple[str | None, str]]:
    """``(event name, data)`` of each event of an SSE body (any line ending; comments
    skipped)."""
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    events: list[tuple[str | None, str]] = []
    name: str | None = None
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                events.append((name, "\n".join(data)))
            name, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        events.append((name, "\n".join(data)))
    return events


def a_events(raw: str) -> list[tuple[str | None, dict[str, Any]]]:
    return [(name, json.loads(data)) for name, data in sse_events(raw)]


def a_text(events: list[tuple[str | None, dict[str, Any]]]) -> str:
    return "".join(
        e["delta"]["text"]
        for _, e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
    )


def g_events(raw: str) -> list[dict[str, Any]]:
    events = sse_events(raw)
    assert all(name is None for name, _ in events)
    return [json.loads(data) for _, data in events]


def g_text(events: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        part.get("text", "")
        for e in events
        for cand in e.get("candidates", ())
        if cand["index"] == index
        for part in cand["content"]["parts"]
    )


@pytest.fixture
def mock(_server: MockServer) -> Iterator[MockServer]:
    _server.reset()
    yield _server
    _server.require_api_key = None


@pytest.fixture
def client(mock: MockServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock.url, timeout=10) as c:
        yield c


def anthropic(client: httpx.Client, **changes: Any) -> httpx.Response:
    return client.post("/v1/messages", json={**A_BODY, **changes}, headers=A_HEADERS)


def gemini(client: httpx.Client, stream: bool = False, **changes: Any) -> httpx.Response:
    return client.post(G_STREAM if stream else G_PATH, json={**G_BODY, **changes})


# == Anthropic ============================================================================


def test_anthropic_message_shape(client: httpx.Client) -> None:
    r = anthropic(client)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"].startswith("msg_")
    assert body == {
        "id": body["id"],
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [{"type": "text", "text": story(8)}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": A_PROMPT, "output_tokens": 8},
    }
    assert anthropic(client).json()["id"] != body["id"]


def test_anthropic_stream_is_exactly_the_event_sequence(client: httpx.Client) -> None:
    r = anthropic(client, stream=True)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = a_events(r.text)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 8,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["model"] == "claude-test"
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {"input_tokens": A_PROMPT, "output_tokens": 1}
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert events[3][1] == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": STORY[0]},
    }
    assert a_text(events) == story(8)
    assert events[-3][1] == {"type": "content_block_stop", "index": 0}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 8},
    }
    # Same id on every request? No: each message has its own.
    assert a_events(anthropic(client, stream=True).text)[0][1]["message"]["id"] != start["id"]


def test_anthropic_token_counting_with_blocks(client: httpx.Client) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "two words"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "three more words"}
            ],
        },
    ]
    system = [{"type": "text", "text": "You are terse."}]
    body = anthropic(client, system=system, messages=messages).json()
    assert body["usage"]["input_tokens"] == (3 + 3) + (2 + 3) + (0 + 3) + (3 + 3)
    counted = client.post(
        "/v1/messages/count_tokens",
        json={"model": "m", "system": system, "messages": messages},
        headers=A_HEADERS,
    )
    assert counted.json() == {"input_tokens": body["usage"]["input_tokens"]}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"model": None}, "model: Field required"),
        ({"response_format": {"type": "json_object"}}, "response_format: Extra inputs"),
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"temperature": 1.5}, "temperature: Input should be less than or equal to 1"),
        ({"messages": [{"role": "system", "content": "x"}]}, "'user' or 'assistant'"),
        ({"messages": [{"role": "user", "content": ""}]}, "non-empty content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]},
            "text content blocks must be non-empty",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "url": "x"}]}]},
            "Input tag 'image_url'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}
                ]
            },
            "unexpected `tool_use_id`",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Weather?"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                    },
                    {"role": "user", "content": "Well?"},
                ]
            },
            "`tool_use` ids were found without `tool_result` blocks",
        ),
        ({"tools": [{"name": "f"}]}, "input_schema: Field required"),
    ],
)
def test_anthropic_refuses_what_anthropic_refuses(
    mock: MockServer, client: httpx.Client, change: dict[str, Any], fragment: str
) -> None:
    mock.enqueue(Reply(status=500))
    body = {k: v for k, v in {**A_BODY, **change}.items() if v is not None}
    r = client.post("/v1/messages", json=body, headers=A_HEADERS)
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]
    assert mock.pending == 1  # refused requests take no scripted reply


def test_anthropic_requires_the_version_header_and_json(
    mock: MockServer, client: httpx.Client
) -> None:
    r = client.post("/v1/messages", json=A_BODY)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "anthropic-version: header is required"
    r = client.post("/v1/messages", content=b"{nope", headers=A_HEADERS)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/messages", headers=A_HEADERS)
    assert r.status_code == 405 and r.json()["type"] == "error"


def test_anthropic_max_tokens_cuts_the_pieces(client: httpx.Client) -> None:
    body = anthropic(client, max_tokens=3).json()
    assert body["stop_reason"] == "max_tokens"
    assert body["content"][0]["text"] == story(3)
    assert body["usage"]["output_tokens"] == 3
    events = a_events(anthropic(client, max_tokens=3, stream=True).text)
    assert a_text(events) == story(3)
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"] == {"output_tokens": 3}


def test_anthropic_tool_call_non_stream(client: httpx.Client) -> None:
    body = anthropic(client, tools=A_TOOLS).json()
    assert body["stop_reason"] == "tool_use"
    (block,) = body["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert block["name"] == "get_weather"
    assert block["input"] == {"city": "robot", "days": 42}
    assert body["usage"]["output_tokens"] == 3


def test_anthropic_tool_call_stream(client: httpx.Client) -> None:
    events = a_events(anthropic(client, tools=A_TOOLS, stream=True).text)
    names = [n for n, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    block = events[1][1]["content_block"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather"
    assert block["input"] == {} and block["id"].startswith("toolu_")
    deltas = [e["delta"] for n, e in events if n == "content_block_delta"]
    assert all(d["type"] == "input_json_delta" for d in deltas)
    assert json.loads("".join(d["partial_json"] for d in deltas)) == {"city": "robot", "days": 42}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"]["output_tokens"] == 3


def test_anthropic_tool_choice_and_tool_results(client: httpx.Client) -> None:
    assert anthropic(client, tools=A_TOOLS, tool_choice={"type": "none"}).json()["content"] == [
        {"type": "text", "text": story(8)}
    ]
    forced = anthropic(client, tools=A_TOOLS, tool_choice={"type": "tool", "name": "lookup"})
    assert forced.json()["content"][0]["input"] == {"q": 42}
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
    ]
    answer = anthropic(client, tools=A_TOOLS, messages=history).json()
    assert answer["stop_reason"] == "end_turn" and answer["content"][0]["type"] == "text"
    again = anthropic(client, tools=A_TOOLS, messages=history, tool_choice={"type": "any"})
    assert again.json()["stop_reason"] == "tool_use"


def test_anthropic_explicit_tool_calls_are_separate_blocks(
    mock: MockServer, client: httpx.Client
) -> None:
    calls = [
        {"name": "a", "arguments": {"x": 1}, "id": "toolu_fixed"},
        {"name": "b", "arguments": '{"y": "two"}'},
    ]
    mock.enqueue(Reply(tool_calls=calls), Reply(tool_calls=calls))
    body = anthropic(client).json()
    assert [(b["id"], b["name"], b["input"]) for b in body["content"]] == [
        ("toolu_fixed", "a", {"x": 1}),
        (body["content"][1]["id"], "b", {"y": "two"}),
    ]
    events = a_events(anthropic(client, stream=True).text)
    starts = [e for n, e in events if n == "content_block_start"]
    stops = [e for n, e in events if n == "content_block_stop"]
    assert [(s["index"], s["content_block"]["name"]) for s in starts] == [(0, "a"), (1, "b")]
    assert [s["index"] for s in stops] == [0, 1]
    per_block: dict[int, str] = {0: "", 1: ""}
    for n, e in events:
        if n == "content_block_delta":
            per_block[e["index"]] += e["delta"]["partial_json"]
    assert json.loads(per_block[0]) == {"x": 1} and json.loads(per_block[1]) == {"y": "two"}
    # Blocks never overlap: each stop comes before the next start.
    order = [(n, e.get("index")) for n, e in events if n and n.startswith("content_block_s")]
    assert order == [
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_stop", 1),
    ]


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (503, "api_error"),
        (529, "overloaded_error"),
    ],
)
def test_anthropic_error_statuses(
    mock: MockServer, client: httpx.Client, status: int, type_: str
) -> None:
    mock.enqueue(Reply(status=status, retry_after=2))
    r = anthropic(client, stream=True)  # errors are JSON even when streaming
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"] == "2"
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == type_
    assert set(body["error"]) == {"type", "message"} and body["error"]["message"]


def test_anthropic_529_and_custom_errors(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(
        Reply(status=529),
        Reply(status=429, error_message="slow down", error_type="rate_limit_error"),
    )
    r = anthropic(client)
    assert r.status_code == 529 and r.reason_phrase == "Site Overloaded"
    assert r.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert anthropic(client).json()["error"] == {"type": "rate_limit_error", "message": "slow down"}


def test_anthropic_error_mid_stream(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(
        Reply(error_after=2),
        Reply(error_after=1, error_type="server_error", error_message="boom"),
        Reply(error_after=0),
    )
    events = a_events(anthropic(client, stream=True).text)
    assert a_text(events) == story(2)
    assert events[-1] == (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    assert "message_stop" not in [n for n, _ in events]
    events = a_events(anthropic(client, stream=True).text)
    assert events[-1][1]["error"] == {"type": "api_error", "message": "boom"}
    r = anthropic(client)  # not streamed: the error JSON with its status
    assert r.status_code == 529 and r.json()["error"]["type"] == "overloaded_error"


def test_anthropic_end_cut_and_malformed(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(end_after=3), Reply(end_after=100), Reply(malformed_after=1))
    events = a_events(anthropic(client, stream=True).text)
    assert a_text(events) == story(3)
    assert [n for n, _ in events][-1] == "content_block_delta"
    events = a_events(anthropic(client, stream=True).text)  # after the last piece
    assert a_text(events) == story(8)
    assert not {"message_delta", "message_stop"} & {n for n, _ in events}
    raw = sse_events(anthropic(client, stream=True).text)
    assert raw[4] == ("content_block_delta", '{"type": "broken')
    good = [(n, json.loads(d)) for n, d in raw if d != '{"type": "broken']
    assert a_text(good) == story(8) and good[-1][0] == "message_stop"

    mock.enqueue(Reply(cut_after=2))
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        anthropic(client, stream=True)
    assert anthropic(client).status_code == 200


@pytest.mark.parametrize(
    "reply",
    [
        Reply(crlf=True),
        Reply(cr=True),
        Reply(comments=True),
        Reply(split_bytes=True),
        Reply(pacing=0.001, stall_after=2, stall=0.02, delay=0.02),
    ],
    ids=["crlf", "cr", "comments", "split_bytes", "timing"],
)
def test_anthropic_harmless_faults_keep_the_events(
    mock: MockServer, client: httpx.Client, reply: Reply
) -> None:
    def stable(events: list[tuple[str | None, dict[str, Any]]]) -> list[Any]:
        out = []
        for name, data in events:
            if name == "message_start":
                data = {**data, "message": {**data["message"], "id": None}}
            out.append((name, data))
        return out

    clean = a_events(anthropic(client, stream=True).text)
    mock.enqueue(reply)
    raw = anthropic(client, stream=True).text
    assert stable(a_events(raw)) == stable(clean)
    if reply.cr:
        assert "\n" not in raw
    if reply.comments:
        assert raw.count(": keep-alive") == len(clean)


def test_anthropic_finish_override_cached_and_usage(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(
        Reply(finish_reason="content_filter"),
        Reply(finish_reason="stop_sequence"),
        Reply(cached_tokens=4),
        Reply(cached_tokens=4),
        Reply(usage=False),
    )
    assert anthropic(client).json()["stop_reason"] == "refusal"
    body = anthropic(client, stop_sequences=["END", "STOP"]).json()
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "END")
    assert anthropic(client).json()["usage"] == {
        "input_tokens": A_PROMPT - 4,
        "output_tokens": 8,
        "cache_read_input_tokens": 4,
    }
    start = a_events(anthropic(client, stream=True).text)[0][1]["message"]
    assert start["usage"]["cache_read_input_tokens"] == 4
    assert "usage" not in anthropic(client).json()


def test_anthropic_cache_writes(mock: MockServer, client: httpx.Client) -> None:
    """Tokens written to the cache are reported apart, as read ones are, and by cache
    lifetime: ``input_tokens`` counts neither, streamed (``message_start``) or not."""
    reply = Reply(cached_tokens=4, cache_write_tokens=3, cache_write_1h_tokens=1)
    mock.enqueue(reply, reply)
    usage = {
        "input_tokens": A_PROMPT - 7,
        "output_tokens": 8,
        "cache_read_input_tokens": 4,
        "cache_creation_input_tokens": 3,
        "cache_creation": {"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 1},
    }
    assert anthropic(client).json()["usage"] == usage
    start = a_events(anthropic(client, stream=True).text)[0][1]["message"]
    assert start["usage"] == {**usage, "output_tokens": 1}
    with pytest.raises(ValueError, match="part of cache_write_tokens"):
        Reply(cache_write_tokens=1, cache_write_1h_tokens=2)


def test_anthropic_auth(mock: MockServer, client: httpx.Client) -> None:
    mock.require_api_key = "sk-ant"
    r = anthropic(client)
    assert r.status_code == 401
    assert r.json()["error"] == {
        "type": "authentication_error",
        "message": "x-api-key header is required",
    }
    r = client.post("/v1/messages", json=A_BODY, headers={**A_HEADERS, "x-api-key": "nope"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid x-api-key"
    bearer = {**A_HEADERS, "authorization": "Bearer sk-ant"}
    assert client.post("/v1/messages", json=A_BODY, headers=bearer).status_code == 401
    ok = client.post("/v1/messages", json=A_BODY, headers={**A_HEADERS, "x-api-key": "sk-ant"})
    assert ok.status_code == 200


def test_anthropic_per_model_queue_and_recording(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(status=529), model="claude-b")
    assert anthropic(client, model="claude-a").status_code == 200
    assert anthropic(client, model="claude-b").status_code == 529
    assert anthropic(client, model="claude-b").status_code == 200
    last = mock.requests[-1]
    assert last.path == "/v1/messages" and last.model == "claude-b"
    assert last.json["max_tokens"] == 100 and last.headers["anthropic-version"] == "2023-06-01"


# == Gemini ===============================================================================


def test_gemini_response_shape(client: httpx.Client) -> None:
    r = gemini(client)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body == {
        "candidates": [
            {
                "content": {"parts": [{"text": story(8)}], "role": "model"},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": G_PROMPT,
            "candidatesTokenCount": 8,
            "totalTokenCount": G_PROMPT + 8,
        },
        "modelVersion": "gemini-test",
        "responseId": body["responseId"],
    }


def test_gemini_stream_shape(client: httpx.Client) -> None:
    r = gemini(client, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text and "event:" not in r.text
    events = g_events(r.text)
    assert len(events) == 8  # one per piece; the last carries the finish and the usage
    assert g_text(events) == story(8)
    for e in events[:-1]:
        # As Gemini streams: the prompt's count on every event, the output's only at the end.
        assert e["usageMetadata"] == {"promptTokenCount": 12, "totalTokenCount": 12}
        assert "finishReason" not in e["candidates"][0]
        assert e["modelVersion"] == "gemini-test"
    last = events[-1]
    assert last["candidates"][0]["finishReason"] == "STOP"
    assert last["candidates"][0]["content"] == {"parts": [{"text": " named"}], "role": "model"}
    assert last["usageMetadata"]["candidatesTokenCount"] == 8
    assert len({e["responseId"] for e in events}) == 1


def test_gemini_stream_without_sse_is_a_json_array(client: httpx.Client) -> None:
    r = client.post("/v1beta/models/gemini-test:streamGenerateContent", json=G_BODY)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    events = r.json()
    assert isinstance(events, list) and len(events) == 8
    assert g_text(events) == story(8)
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"


def test_gemini_token_counting_and_snake_case(client: httpx.Client) -> None:
    image = {"inline_data": {"mime_type": "image/png", "data": "iVBO"}}
    contents = [
        {"role": "user", "parts": [{"text": "two words"}, image]},
        {"role": "model", "parts": [CALL]},
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "f", "response": {"temp_c": 21}}}],
        },
    ]
    body = {"contents": contents, "system_instruction": {"parts": [{"text": "You are terse."}]}}
    r = client.post(G_PATH, json={**body, "generation_config": {"max_output_tokens": 5}})
    assert r.status_code == 200, r.text
    usage = r.json()["usageMetadata"]
    # '{"temp_c": 21}' is 2 words.
    assert usage["promptTokenCount"] == (3 + 3) + (2 + 3) + (0 + 3) + (2 + 3)
    assert usage["candidatesTokenCount"] == 5
    assert r.json()["candidates"][0]["finishReason"] == "MAX_TOKENS"
    counted = client.post("/v1beta/models/gemini-test:countTokens", json=body)
    assert counted.json() == {"totalTokens": usage["promptTokenCount"]}


CALL = {"functionCall": {"name": "f", "args": {}}}
RESPONSE = {"functionResponse": {"name": "f", "response": {}}}
USER = {"role": "user", "parts": [{"text": "x"}]}
STRING = {"type": "string"}


def declare(parameters: Any = None, name: str = "f") -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"tools": [{"functionDeclarations": [fn]}]}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"contents": []}, "contents is not specified"),
        ({"generationConfig": {"max_tokens": 5}}, 'Unknown name "max_tokens"'),
        ({"response_format": {}}, 'Unknown name "response_format"'),
        ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "valid role"),
        ({"contents": [{"role": "user", "parts": []}]}, "must not be empty"),
        ({"contents": [{"role": "user", "parts": [{"txt": "x"}]}]}, 'Unknown name "txt"'),
        (
            {"contents": [{"role": "user", "parts": [{"text": "x", "inlineData": {}}]}]},
            "Oneof field 'data' is already set",
        ),
        (
            {"contents": [USER, {"role": "user", "parts": [RESPONSE]}]},
            "function response turn comes immediately after a function call turn",
        ),
        (
            {
                "contents": [
                    USER,
                    {"role": "model", "parts": [CALL, CALL]},
                    {"role": "user", "parts": [RESPONSE]},
                ]
            },
            "number of function response parts is equal",
        ),
        (
            declare({"type": "object", "properties": {"a": STRING}, "additionalProperties": False}),
            'Unknown name "additionalProperties"',
        ),
        (
            declare({"type": "object", "properties": {}}),
            "should be non-empty for OBJECT type",
        ),
        (
            declare({"type": "object", "properties": {"a": STRING}, "required": ["b"]}),
            "required[0]: property is not defined",
        ),
        (
            declare({"type": "object", "properties": {"a": {"type": ["string", "null"]}}}),
            "cannot start list",
        ),
        (declare(name="1bad"), "Invalid function name"),
        ({"toolConfig": {"functionCallingConfig": {"mode": "auto"}}}, "Invalid value"),
        ({"generationConfig": {"responseMimeType": "application/jsonl"}}, "allowed mimetypes"),
        ({"generationConfig": {"temperature": 2.5}}, "temperature must be in the range"),
    ],
)
def test_gemini_refuses_what_gemini_refuses(
    mock: MockServer, client: httpx.Client, change: dict[str, Any], fragment: str
) -> None:
    mock.enqueue(Reply(status=500))
    r = gemini(client, **change)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
    assert fragment in error["message"]
    assert mock.pending == 1
    r = client.post(G_PATH, content=b"[1, 2")
    assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_gemini_max_tokens_and_candidates(client: httpx.Client) -> None:
    events = g_events(gemini(client, True, generationConfig={"maxOutputTokens": 3}).text)
    assert g_text(events) == story(3)
    assert events[-1]["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert events[-1]["usageMetadata"]["candidatesTokenCount"] == 3
    body = gemini(client, generationConfig={"candidateCount": 2}).json()
    assert [c["index"] for c in body["candidates"]] == [0, 1]
    assert body["usageMetadata"]["candidatesTokenCount"] == 16
    events = g_events(gemini(client, True, generationConfig={"candidateCount": 2}).text)
    assert g_text(events, 0) == g_text(events, 1) == story(8)


def test_gemini_tool_calls(client: httpx.Client) -> None:
    body = gemini(client, tools=G_TOOLS).json()
    (cand,) = body["candidates"]
    assert cand["finishReason"] == "STOP"
    assert cand["content"]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"city": "robot", "days": 42}}}
    ]
    assert body["usageMetadata"]["candidatesTokenCount"] == 3
    events = g_events(gemini(client, True, tools=G_TOOLS).text)
    assert len(events) == 1  # a call comes whole, with the finish
    assert events[0]["candidates"][0]["content"]["parts"] == cand["content"]["parts"]
    assert events[0]["candidates"][0]["finishReason"] == "STOP"

    none = {"functionCallingConfig": {"mode": "NONE"}}
    assert (
        "text"
        in gemini(client, tools=G_TOOLS, toolConfig=none).json()["candidates"][0]["content"][
            "parts"
        ][0]
    )
    forced = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["lookup"]}}
    parts = gemini(client, tools=G_TOOLS, toolConfig=forced).json()["candidates"][0]["content"]
    assert parts["parts"] == [{"functionCall": {"name": "lookup", "args": {"q": "robot"}}}]

    history = [
        {"role": "user", "parts": [{"text": "Weather?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {}}}]},
    ]
    answer = gemini(client, tools=G_TOOLS, contents=history).json()["candidates"][0]
    assert answer["content"]["parts"] == [{"text": story(8)}]


def test_gemini_thinking_models_sign_the_first_call_and_gemini_3_checks_it(
    mock: MockServer, client: httpx.Client
) -> None:
    """2.5 and 3 sign the first call of each answer (as Gemini does for parallel calls);
    only 3 refuses a step of the current turn whose first call lacks its signature."""
    calls = [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]
    mark = "bW9jay10aG91Z2h0OmE="  # base64 of "mock-thought:a"
    signed = [
        {"functionCall": {"name": "a", "args": {"x": 1}}, "thoughtSignature": mark},
        {"functionCall": {"name": "b", "args": {}}},
    ]
    for model in ("gemini-2.5-flash", "gemini-3-pro-preview"):
        mock.enqueue(Reply(tool_calls=calls), Reply(tool_calls=calls))
        path = f"/v1beta/models/{model}:generateContent"
        body = client.post(path, json=G_BODY).json()
        assert body["candidates"][0]["content"]["parts"] == signed
        stream = f"/v1beta/models/{model}:streamGenerateContent?alt=sse"
        events = g_events(client.post(stream, json=G_BODY).text)
        assert [e["candidates"][0]["content"]["parts"][0] for e in events] == signed
    assert "thoughtSignature" not in gemini(client, tools=G_TOOLS).text  # 2.0 does not think

    def turn(*first_part_fields: dict[str, Any]) -> list[dict[str, Any]]:
        call = {"functionCall": {"name": "a", "args": {"x": 1}}}
        return [
            {"role": "user", "parts": [{"text": "Go"}]},
            {"role": "model", "parts": [{**call, **f} for f in first_part_fields]},
            {
                "role": "user",
                "parts": [{"functionResponse": {"name": "a", "response": {}}}]
                * len(first_part_fields),
            },
        ]

    path = "/v1beta/models/gemini-3-pro-preview:generateContent"
    ok = client.post(path, json={"contents": turn({"thoughtSignature": mark}, {})})
    assert ok.status_code == 200, ok.text
    missing = client.post(path, json={"contents": turn({})})
    assert missing.status_code == 400
    assert "missing a thought_signature" in missing.json()["error"]["message"]
    assert "function call `a` , position 2" in missing.json()["error"]["message"]
    wrong = client.post(path, json={"contents": turn({"thoughtSignature": "bm9wZQ=="})})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["message"] == "Corrupted thought signature."
    # A past turn (before the last user text) is not checked; 2.5 checks nothing.
    past = [*turn({}), {"role": "model", "parts": [{"text": "Done."}]}, *G_BODY["contents"]]
    assert client.post(path, json={"contents": past}).status_code == 200
    flash = "/v1beta/models/gemini-2.5-flash:generateContent"
    assert client.post(flash, json={"contents": turn({})}).status_code == 200


def test_gemini_explicit_tool_calls_stream_one_event_each(
    mock: MockServer, client: httpx.Client
) -> None:
    calls = [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}, "id": "c-2"}]
    mock.enqueue(Reply(tool_calls=calls), Reply(tool_calls=calls, end_after=1))
    events = g_events(gemini(client, True).text)
    assert [e["candidates"][0]["content"]["parts"] for e in events] == [
        [{"functionCall": {"name": "a", "args": {"x": 1}}}],
        [{"functionCall": {"name": "b", "args": {}, "id": "c-2"}}],
    ]
    assert events[-1]["usageMetadata"]["candidatesTokenCount"] == 3 + 2  # argument pieces
    events = g_events(gemini(client, True).text)  # positions are calls
    assert len(events) == 1 and "finishReason" not in events[0]["candidates"][0]


@pytest.mark.parametrize(
    ("status", "code_status"),
    [
        (400, "INVALID_ARGUMENT"),
        (401, "UNAUTHENTICATED"),
        (403, "PERMISSION_DENIED"),
        (404, "NOT_FOUND"),
        (429, "RESOURCE_EXHAUSTED"),
        (500, "INTERNAL"),
        (503, "UNAVAILABLE"),
        (504, "DEADLINE_EXCEEDED"),
    ],
)
def test_gemini_error_statuses(
    mock: MockServer, client: httpx.Client, status: int, code_status: str
) -> None:
    mock.enqueue(Reply(status=status))
    r = gemini(client, stream=True)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert (error["code"], error["status"]) == (status, code_status) and error["message"]


def test_gemini_429_carries_retry_info(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(status=429, retry_after=2), Reply(status=429, error_message="quota"))
    r = gemini(client)
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"]["details"] == [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2s"}
    ]
    assert gemini(client).json()["error"]["message"] == "quota"


def test_gemini_error_mid_stream(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(
        Reply(error_after=2),
        Reply(error_after=1, error_type="rate_limit_error", error_message="quota"),
        Reply(error_after=0),
    )
    events = g_events(gemini(client, True).text)
    assert g_text(events[:-1]) == story(2)
    assert events[-1] == {
        "error": {
            "code": 503,
            "message": "The model is overloaded. Please try again later.",
            "status": "UNAVAILABLE",
        }
    }
    events = g_events(gemini(client, True).text)
    assert events[-1]["error"] == {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}
    r = gemini(client)
    assert r.status_code == 503 and r.json()["error"]["status"] == "UNAVAILABLE"


def test_gemini_end_cut_and_malformed(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(end_after=3), Reply(end_after=8), Reply(malformed_after=1))
    events = g_events(gemini(client, True).text)
    assert g_text(events) == story(3)
    assert not any("finishReason" in e["candidates"][0] for e in events)
    assert not any("candidatesTokenCount" in e.get("usageMetadata", {}) for e in events)
    events = g_events(gemini(client, True).text)  # every piece, but no finish
    assert g_text(events) == story(8)
    assert not any("finishReason" in e["candidates"][0] for e in events)
    raw = sse_events(gemini(client, True).text)
    assert raw[1] == (None, '{"candidates": [{"broken')
    good = [json.loads(d) for _, d in raw if "broken" not in d]
    assert g_text(good) == story(8) and good[-1]["candidates"][0]["finishReason"] == "STOP"

    mock.enqueue(Reply(cut_after=2), Reply(cut_after=0))
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        gemini(client, True)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        gemini(client)
    assert gemini(client).status_code == 200


@pytest.mark.parametrize(
    "reply",
    [
        Reply(crlf=True),
        Reply(cr=True),
        Reply(comments=True),
        Reply(split_bytes=True),
        Reply(pacing=0.001, stall_after=8, stall=0.02, delay=0.02),
    ],
    ids=["crlf", "cr", "comments", "split_bytes", "timing"],
)
def test_gemini_harmless_faults_keep_the_content(
    mock: MockServer, client: httpx.Client, reply: Reply
) -> None:
    mock.enqueue(reply)
    events = g_events(gemini(client, True).text)
    assert g_text(events) == story(8)
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert events[-1]["usageMetadata"]["candidatesTokenCount"] == 8


def test_gemini_finish_override_cached_and_usage(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(
        Reply(finish_reason="content_filter"),
        Reply(finish_reason="RECITATION"),
        Reply(cached_tokens=4),
        Reply(usage=False),
    )
    assert gemini(client).json()["candidates"][0]["finishReason"] == "SAFETY"
    last = g_events(gemini(client, True).text)[-1]
    assert last["candidates"][0]["finishReason"] == "RECITATION"
    assert gemini(client).json()["usageMetadata"] == {
        "promptTokenCount": G_PROMPT,
        "cachedContentTokenCount": 4,
        "candidatesTokenCount": 8,
        "totalTokenCount": G_PROMPT + 8,
    }
    assert "usageMetadata" not in gemini(client).json()


def test_gemini_auth(mock: MockServer, client: httpx.Client) -> None:
    mock.require_api_key = "g-key"
    r = gemini(client)
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    r = client.post(G_PATH, json=G_BODY, headers={"x-goog-api-key": "nope"})
    assert r.status_code == 400
    assert r.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert client.post(G_PATH, json=G_BODY, headers={"x-goog-api-key": "g-key"}).is_success
    assert client.post(G_PATH + "?key=g-key", json=G_BODY).is_success
    sse = client.post(G_STREAM + "&key=g-key", json=G_BODY)
    assert sse.is_success and g_text(g_events(sse.text)) == story(8)


def test_gemini_per_model_queue_routes_and_recording(
    mock: MockServer, client: httpx.Client
) -> None:
    mock.enqueue(Reply(status=503), model="gemini-b")
    assert gemini(client).status_code == 200
    r = client.post("/v1beta/models/gemini-b:streamGenerateContent?alt=sse", json=G_BODY)
    assert r.status_code == 503
    r = client.post("/v1beta/models/tuned%2Fthing:generateContent", json=G_BODY)
    assert r.json()["modelVersion"] == "tuned/thing"
    last = mock.requests[-1]
    assert last.model == "tuned/thing" and last.path.endswith(":generateContent")
    assert last.json == G_BODY
    assert client.post("/v1/models/gemini-b:generateContent", json=G_BODY).is_success
    r = client.post("/v1beta/models/gemini-b:embedContent", json=G_BODY)
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    assert client.get(G_PATH).status_code == 405


# == all wires ============================================================================


def test_one_reply_means_the_same_on_every_wire(mock: MockServer, client: httpx.Client) -> None:
    """The same conversation and reply give the same text and token counts everywhere."""
    reply = Reply(text="Hello there, general Kenobi!", chunks=3, cached_tokens=2)
    mock.enqueue(reply, reply, reply)
    openai = client.post(
        "/v1/chat/completions",
        json={
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me a story"},
            ],
        },
    ).json()
    claude = anthropic(client).json()
    gem = gemini(client).json()
    assert openai["choices"][0]["message"]["content"] == "Hello there, general Kenobi!"
    assert claude["content"][0]["text"] == gem["candidates"][0]["content"]["parts"][0]["text"]
    assert claude["content"][0]["text"] == "Hello there, general Kenobi!"
    prompt = openai["usage"]["prompt_tokens"]
    assert prompt == A_PROMPT
    assert claude["usage"]["input_tokens"] + claude["usage"]["cache_read_input_tokens"] == prompt
    assert gem["usageMetadata"]["promptTokenCount"] == prompt
    assert (
        openai["usage"]["completion_tokens"]
        == claude["usage"]["output_tokens"]
        == gem["usageMetadata"]["candidatesTokenCount"]
        == 3
    )


def test_529_on_the_openai_wire(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(status=529))
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert r.status_code == 529 and r.json()["error"]["type"] == "server_error"
