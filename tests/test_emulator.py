"""The OpenAI emulator (`lunar.testing`) pinned over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lunar.testing import STORY, MockServer, Reply

SRC = str(Path(__file__).resolve().parents[1] / "src")

MESSAGES = [{"role": "user", "content": "Tell me a story"}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}
STREAM = {**CHAT, "stream": True}
STREAM_USAGE = {**STREAM, "stream_options": {"include_usage": True}}


# -- helpers ------------------------------------------------------------------------------


def sse_data(raw: str) -> list[str]:
    """The data of each event of an SSE body (any line ending); comments skipped."""
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    events: list[str] = []
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                events.append("\n".join(data))
                data = []
        elif line.startswith(":"):
            continue
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        events.append("\n".join(data))
    return events


def chunks_of(raw: str) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body, without [DONE]."""
    return [json.loads(d) for d in sse_data(raw) if d != "[DONE]"]


def stable(chunk: dict[str, Any]) -> dict[str, Any]:
    """A chunk without its per-request fields."""
    return {k: v for k, v in chunk.items() if k not in ("id", "created")}


def content(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )


def story(n: int) -> str:
    return " ".join(STORY[i % len(STORY)] for i in range(n))


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def mock() -> Iterator[MockServer]:
    with MockServer() as server:
        yield server


@pytest.fixture
def client(mock: MockServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=mock.base_url, timeout=10) as c:
        yield c


# -- shapes -------------------------------------------------------------------------------


def test_urls(mock: MockServer) -> None:
    assert mock.url == f"http://127.0.0.1:{mock.port}"
    assert mock.base_url == mock.url + "/v1"


def test_stream_shape_and_done(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=STREAM)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    assert r.headers["cache-control"] == "no-cache"
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    chunks = chunks_of(r.text)
    assert len(chunks) == 1 + 8 + 1
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "gpt-4o-mini"
        assert c["system_fingerprint"] == "fp_lunar_mock"
        assert isinstance(c["created"], int)
        assert "usage" not in c
        assert c["choices"][0]["logprobs"] is None
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks[1:-1]:
        assert set(c["choices"][0]["delta"]) == {"content"}
        assert c["choices"][0]["finish_reason"] is None
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert content(chunks) == story(8)
    # Each piece is one word ("token").
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:3]] == [STORY[0], " " + STORY[1]]


def test_usage_chunk_only_when_asked(mock: MockServer, client: httpx.Client) -> None:
    chunks = chunks_of(client.post("/chat/completions", json=STREAM_USAGE).text)
    assert len(chunks) == 1 + 8 + 1 + 1
    for c in chunks[:-1]:
        assert c["usage"] is None
    last = chunks[-1]
    assert last["choices"] == []
    # prompt: "Tell me a story" = 4 words + 3 per message
    assert last["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}

    asked_false = {**STREAM, "stream_options": {"include_usage": False}}
    chunks = chunks_of(client.post("/chat/completions", json=asked_false).text)
    assert all("usage" not in c for c in chunks)

    mock.enqueue(Reply(usage=False))
    chunks = chunks_of(client.post("/chat/completions", json=STREAM_USAGE).text)
    assert len(chunks) == 10
    assert all("usage" not in c for c in chunks)


def test_non_stream_shape(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert abs(body["created"] - time.time()) < 120
    assert body["model"] == "gpt-4o-mini"
    assert body["system_fingerprint"] == "fp_lunar_mock"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": story(8), "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}


def test_ids_are_unique(client: httpx.Client) -> None:
    ids = {client.post("/chat/completions", json=CHAT).json()["id"] for _ in range(3)}
    ids |= {chunks_of(client.post("/chat/completions", json=STREAM).text)[0]["id"]}
    assert len(ids) == 4


def test_prompt_tokens_counting(client: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},  # 3 words
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "two words"},
                {"type": "image_url", "image_url": {"url": "data:..."}},
            ],
        },  # 2 words
        {"role": "assistant", "content": None},  # 0 words
    ]
    body = client.post("/chat/completions", json={**CHAT, "messages": messages}).json()
    assert body["usage"]["prompt_tokens"] == (3 + 3) + (2 + 3) + (0 + 3)


def test_n_choices(client: httpx.Client) -> None:
    body = client.post("/chat/completions", json={**CHAT, "n": 3}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in body["choices"]} == {story(8)}
    assert body["usage"]["completion_tokens"] == 24

    chunks = chunks_of(client.post("/chat/completions", json={**STREAM_USAGE, "n": 2}).text)
    per_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        per_index[choice["index"]].append(choice)
    for choices in per_index.values():
        assert choices[0]["delta"]["role"] == "assistant"
        assert "".join(ch["delta"].get("content", "") for ch in choices) == story(8)
        assert choices[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_gives_length(client: httpx.Client, field: str) -> None:
    body = client.post("/chat/completions", json={**CHAT, field: 3}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == story(3)
    assert body["usage"]["completion_tokens"] == 3

    chunks = chunks_of(client.post("/chat/completions", json={**STREAM_USAGE, field: 3}).text)
    assert content(chunks) == story(3)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3

    body = client.post("/chat/completions", json={**CHAT, field: 100}).json()
    assert body["choices"][0]["finish_reason"] == "stop"


def test_text_chunks_and_finish_reason(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(
        Reply(text="Hello there, general Kenobi!", chunks=2, finish_reason="content_filter")
    )
    chunks = chunks_of(client.post("/chat/completions", json=STREAM).text)
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert pieces == ["Hello there,", " general Kenobi!"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"

    mock.enqueue(Reply(text="héllo", chunks=10))  # fewer characters than chunks: per character
    chunks = chunks_of(client.post("/chat/completions", json=STREAM).text)
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]] == list("héllo")

    mock.enqueue(Reply(chunks=64))
    body = client.post("/chat/completions", json=CHAT).json()
    assert body["choices"][0]["message"]["content"] == story(64)
    assert body["usage"]["completion_tokens"] == 64


# -- status errors ------------------------------------------------------------------------


def test_429_with_retry_headers(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(status=429, retry_after=1.5, retry_after_ms=250, should_retry=False))
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1.5"
    assert r.headers["retry-after-ms"] == "250"
    assert r.headers["x-should-retry"] == "false"
    error = r.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["param"] is None and error["code"] is None
    assert error["message"]

    mock.enqueue(
        Reply(status=429, retry_after=2.0),
        Reply(status=503, retry_after="Wed, 21 Oct 2015 07:28:00 GMT", should_retry=True),
    )
    r = client.post("/chat/completions", json=STREAM)  # errors are JSON even when streaming
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert "retry-after-ms" not in r.headers
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert r.headers["x-should-retry"] == "true"
    # The queue is empty again: the default reply.
    assert client.post("/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (404, "not_found_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "server_error"),
        (504, "server_error"),
    ],
)
def test_error_types(mock: MockServer, client: httpx.Client, status: int, type_: str) -> None:
    mock.enqueue(Reply(status=status))
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == status
    assert r.json()["error"]["type"] == type_
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_body_override_and_headers(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(
        Reply(status=400, body={"error": {"message": "custom", "type": "x"}}, headers={"X-A": "1"}),
        Reply(status=502, body="<html>bad gateway</html>"),
        Reply.status_error(422, "nope", code="bad_thing"),
    )
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 400 and r.json()["error"]["message"] == "custom"
    assert r.headers["x-a"] == "1"
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 502 and r.text == "<html>bad gateway</html>"
    r = client.post("/chat/completions", json=CHAT)
    assert r.status_code == 422
    assert r.json()["error"] == {
        "message": "nope",
        "type": "invalid_request_error",
        "param": None,
        "code": "bad_thing",
    }


# -- timing faults ------------------------------------------------------------------------


def test_delay(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(delay=0.2), Reply(delay=0.2, status=500))
    start = time.monotonic()
    r = client.post("/chat/completions", json=STREAM)
    assert r.status_code == 200 and sse_data(r.text)[-1] == "[DONE]"
    assert client.post("/chat/completions", json=CHAT).status_code == 500
    assert time.monotonic() - start >= 0.3  # generous: two delays of 0.2 s


def test_delay_times_out_client(mock: MockServer) -> None:
    mock.enqueue(Reply(delay=2))
    with httpx.Client(base_url=mock.base_url, timeout=0.2) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/chat/completions", json=CHAT)
    assert wait_for(lambda: mock.disconnects == 1)


def test_stall(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(stall_after=2, stall=0.3), Reply(stall_after=2, stall=0.2))
    chunks = chunks_of(client.post("/chat/completions", json=STREAM).text)
    assert content(chunks) == story(8)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    body = client.post("/chat/completions", json=CHAT).json()  # non-stream: an extra delay
    assert body["choices"][0]["message"]["content"] == story(8)


def test_pacing(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(pacing=0.02, chunks=5))
    arrivals: list[float] = []
    with client.stream("POST", "/chat/completions", json=STREAM) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 1 + 5 + 1 + 1
    assert arrivals[-1] - arrivals[0] >= 0.05  # generous: 7 gaps of 0.02 s


# -- stream faults ------------------------------------------------------------------------


def test_cut_after(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(cut_after=3))
    received: list[str] = []
    with (
        pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
        client.stream("POST", "/chat/completions", json=STREAM) as r,
    ):
        for line in r.iter_lines():
            received.append(line)
    data = [json.loads(d) for d in sse_data("\n".join(received) + "\n\n")]
    assert content(data) == story(3)
    assert mock.disconnects == 0  # the server cut, the client did not abandon
    # The server survives and serves the next request.
    assert client.post("/chat/completions", json=CHAT).status_code == 200


def test_cut_after_non_stream(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(cut_after=0))
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.post("/chat/completions", json=CHAT)


def test_end_after(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(end_after=4))
    r = client.post("/chat/completions", json=STREAM_USAGE)
    assert r.status_code == 200
    data = sse_data(r.text)
    assert "[DONE]" not in data
    chunks = [json.loads(d) for d in data]
    assert len(chunks) == 1 + 4
    assert content(chunks) == story(4)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert all(c["usage"] is None for c in chunks)
    # The connection stays usable (a clean end of the HTTP response).
    assert client.post("/chat/completions", json=CHAT).status_code == 200


def test_malformed_after(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(malformed_after=2))
    r = client.post("/chat/completions", json=STREAM)
    data = sse_data(r.text)
    assert data[3] == '{"id": "broken'
    with pytest.raises(json.JSONDecodeError):
        json.loads(data[3])
    good = [json.loads(d) for d in data if d not in ('{"id": "broken', "[DONE]")]
    assert content(good) == story(8)
    assert data[-1] == "[DONE]"


def test_error_after(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(error_after=2, error_type="overloaded_error", error_message="busy"))
    r = client.post("/chat/completions", json=STREAM)
    assert r.status_code == 200
    data = sse_data(r.text)
    assert "[DONE]" not in data
    assert json.loads(data[-1]) == {
        "error": {"message": "busy", "type": "overloaded_error", "param": None, "code": None}
    }
    assert content([json.loads(d) for d in data[:-1]]) == story(2)

    mock.enqueue(Reply(error_after=0))
    body = client.post("/chat/completions", json=CHAT)  # non-stream: a 500 error JSON
    assert body.status_code == 500
    assert body.json()["error"]["type"] == "server_error"


def test_fault_beyond_the_end_comes_before_finish(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(end_after=100))
    chunks = chunks_of(client.post("/chat/completions", json=STREAM).text)
    assert content(chunks) == story(8)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


@pytest.mark.parametrize(
    ("reply", "separator"), [(Reply(crlf=True), b"\r\n\r\n"), (Reply(cr=True), b"\r\r")]
)
def test_line_endings(
    mock: MockServer, client: httpx.Client, reply: Reply, separator: bytes
) -> None:
    normal = [stable(c) for c in chunks_of(client.post("/chat/completions", json=STREAM).text)]
    mock.enqueue(reply)
    raw = client.post("/chat/completions", json=STREAM).content
    assert raw.count(separator) == len(normal) + 1
    if separator == b"\r\r":
        assert b"\n" not in raw
    assert [stable(c) for c in chunks_of(raw.decode())] == normal


def test_comments(mock: MockServer, client: httpx.Client) -> None:
    normal = sse_data(client.post("/chat/completions", json=STREAM).text)
    mock.enqueue(Reply(comments=True))
    raw = client.post("/chat/completions", json=STREAM).text
    assert raw.startswith(": keep-alive\n\n")
    assert raw.count(": keep-alive\n\n") == len(normal)
    data = sse_data(raw)
    assert [stable(json.loads(d)) for d in data[:-1]] == [
        stable(json.loads(d)) for d in normal[:-1]
    ]


def test_split_bytes(mock: MockServer, client: httpx.Client) -> None:
    normal = client.post("/chat/completions", json=STREAM_USAGE).text
    mock.enqueue(Reply(split_bytes=True, text="Ünïcode ✓ text", chunks=3))
    mock.enqueue(Reply(split_bytes=True))
    odd = chunks_of(client.post("/chat/completions", json=STREAM).text)
    assert content(odd) == "Ünïcode ✓ text"
    pieces: list[bytes] = []
    with client.stream("POST", "/chat/completions", json=STREAM_USAGE) as r:
        pieces.extend(r.iter_raw())
    body = b"".join(pieces).decode()
    assert len(pieces) > 1
    assert [stable(c) for c in chunks_of(body)] == [stable(c) for c in chunks_of(normal)]
    assert sse_data(body)[-1] == "[DONE]"


def test_faults_compose(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(
        Reply(crlf=True, comments=True, pacing=0.001, stall_after=1, stall=0.05, malformed_after=1)
    )
    data = sse_data(client.post("/chat/completions", json=STREAM).text)
    assert '{"id": "broken' in data
    good = [json.loads(d) for d in data if d not in ('{"id": "broken', "[DONE]")]
    assert content(good) == story(8)
    assert data[-1] == "[DONE]"


# -- tool calls ---------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"q": {"type": "number"}}},
        },
    },
]


def test_tool_call_non_stream(client: httpx.Client) -> None:
    body = client.post("/chat/completions", json={**CHAT, "tools": TOOLS}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {
        "city": "robot",
        "days": 42,
        "metric": True,
        "unit": "c",
    }
    assert body["usage"]["completion_tokens"] == 3


def test_tool_call_stream(client: httpx.Client) -> None:
    request = {
        **STREAM_USAGE,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
    }
    chunks = chunks_of(client.post("/chat/completions", json=request).text)
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    (head,) = first["tool_calls"]
    assert head["index"] == 0 and head["id"].startswith("call_")
    assert head["type"] == "function"
    assert head["function"] == {"name": "lookup", "arguments": ""}
    argument_chunks = chunks[1:-2]
    assert len(argument_chunks) == 3
    for c in argument_chunks:
        (tc,) = c["choices"][0]["delta"]["tool_calls"]
        assert set(tc) == {"index", "function"} and tc["index"] == 0
        assert "content" not in c["choices"][0]["delta"]
    arguments = "".join(
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in argument_chunks
    )
    assert json.loads(arguments) == {"q": 42}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


def test_tool_choice_none_and_tool_results(client: httpx.Client) -> None:
    body = client.post("/chat/completions", json={**CHAT, "tools": TOOLS, "tool_choice": "none"})
    assert body.json()["choices"][0]["message"]["content"] == story(8)
    # After a tool result, an "auto" turn answers with text (agent loops end).
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    body = client.post("/chat/completions", json={**CHAT, "messages": messages, "tools": TOOLS})
    assert body.json()["choices"][0]["finish_reason"] == "stop"


def test_explicit_tool_calls(mock: MockServer, client: httpx.Client) -> None:
    calls: list[dict[str, Any]] = [
        {"name": "a", "arguments": '{"x": 1}'},
        {"name": "b", "arguments": {"y": "z"}, "id": "call_fixed"},
    ]
    mock.enqueue(Reply(tool_calls=calls), Reply(tool_calls=calls))
    message = client.post("/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["a", "b"]
    assert message["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'
    assert message["tool_calls"][1]["id"] == "call_fixed"

    chunks = chunks_of(client.post("/chat/completions", json=STREAM).text)
    calls_seen: dict[int, dict[str, str]] = {}
    for c in chunks:
        for tc in c["choices"][0]["delta"].get("tool_calls") or []:
            entry = calls_seen.setdefault(tc["index"], {"name": "", "arguments": "", "id": ""})
            entry["id"] += tc.get("id", "")
            entry["name"] += tc["function"].get("name", "")
            entry["arguments"] += tc["function"].get("arguments", "")
    assert calls_seen[0]["name"] == "a" and json.loads(calls_seen[0]["arguments"]) == {"x": 1}
    assert calls_seen[1] == {"name": "b", "arguments": '{"y":"z"}', "id": "call_fixed"}


# -- scripting and recording --------------------------------------------------------------


def test_requests_recorded(mock: MockServer, client: httpx.Client) -> None:
    client.post(
        "/chat/completions?x=1", json=CHAT, headers={"Authorization": "Bearer k", "X-Trace": "t"}
    )
    client.get("/models")
    first, second = mock.requests
    assert first.method == "POST"
    assert first.path == "/v1/chat/completions" and first.query == "x=1"
    assert first.headers["authorization"] == "Bearer k"
    assert first.headers["x-trace"] == "t"
    assert first.json == CHAT
    assert json.loads(first.body) == CHAT
    assert first.model == "gpt-4o-mini"
    assert second.method == "GET" and second.path == "/v1/models"
    assert second.json is None and second.body == b""


def test_per_model_queue(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(status=503), model="gpt-4o")
    mock.enqueue(Reply(status=429))
    assert client.post("/chat/completions", json=CHAT).status_code == 429
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert mock.pending == 1
    assert client.post("/chat/completions", json={**CHAT, "model": "gpt-4o"}).status_code == 503
    assert client.post("/chat/completions", json={**CHAT, "model": "gpt-4o"}).status_code == 200
    assert mock.pending == 0


def test_default_and_reset(mock: MockServer, client: httpx.Client) -> None:
    mock.default = Reply(chunks=2)
    body = client.post("/chat/completions", json=CHAT).json()
    assert body["choices"][0]["message"]["content"] == story(2)
    mock.enqueue(Reply(status=500))
    mock.reset()
    assert mock.requests == [] and mock.pending == 0 and mock.disconnects == 0
    assert mock.default == Reply()
    body = client.post("/chat/completions", json=CHAT).json()
    assert body["choices"][0]["message"]["content"] == story(8)


def test_keep_alive_reuses_one_connection(mock: MockServer, client: httpx.Client) -> None:
    assert client.post("/chat/completions", json=STREAM).status_code == 200
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    mock.enqueue(Reply(status=429), Reply(pacing=0.001, chunks=3), Reply(delay=0.01))
    for _ in range(3):
        client.post("/chat/completions", json=STREAM)
    assert mock.open_connections == 1
    assert mock.total_connections == 1


def test_connection_close(mock: MockServer) -> None:
    with httpx.Client(base_url=mock.base_url, headers={"Connection": "close"}) as c:
        r = c.post("/chat/completions", json=CHAT)
        assert r.headers["connection"] == "close"
        assert c.post("/chat/completions", json=STREAM).status_code == 200
    assert wait_for(lambda: mock.open_connections == 0)


def test_disconnect_counting(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(pacing=0.05, chunks=50))
    with client.stream("POST", "/chat/completions", json=STREAM) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    assert wait_for(lambda: mock.disconnects == 1)
    assert wait_for(lambda: mock.open_connections == 0)
    # Complete responses are not counted.
    client.post("/chat/completions", json=STREAM)
    assert mock.disconnects == 1


# -- endpoints and errors -----------------------------------------------------------------


def test_require_api_key() -> None:
    with MockServer(require_api_key="sk-test") as mock, httpx.Client(base_url=mock.base_url) as c:
        r = c.post("/chat/completions", json=CHAT)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
        r = c.post("/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong-key"})
        assert r.status_code == 401
        assert c.get("/models").status_code == 401
        ok = c.post("/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-test"})
        assert ok.status_code == 200
        assert c.get("/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200
        assert mock.url and c.get(mock.url + "/health").status_code == 200


def test_bad_requests(mock: MockServer, client: httpx.Client) -> None:
    mock.enqueue(Reply(status=500))
    r = client.post(
        "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 400
    assert "model" in r.json()["error"]["message"] and r.json()["error"]["param"] == "model"
    r = client.post("/chat/completions", json={"model": "gpt-4o-mini"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert client.get("/chat/completions").status_code == 405
    assert mock.pending == 1  # invalid requests do not consume scripted replies
    assert len(mock.requests) == 4


def test_models_health_and_404(client: httpx.Client, mock: MockServer) -> None:
    models = client.get("/models").json()
    assert models["object"] == "list"
    assert {"id": "gpt-4o-mini", "object": "model", "created": 0, "owned_by": "lunar-mock"} in (
        models["data"]
    )
    assert client.get("/models/gpt-4o").json()["id"] == "gpt-4o"
    assert client.get(mock.url + "/health").json() == {"status": "ok"}
    r = client.get(mock.url + "/nope")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert client.post(mock.url + "/chat/completions", json=CHAT).status_code == 404


def test_legacy_completions(mock: MockServer, client: httpx.Client) -> None:
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say something nice"}
    body = client.post("/completions", json=request).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [
        {"text": story(8), "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}

    stream = {**request, "stream": True, "stream_options": {"include_usage": True}}
    chunks = chunks_of(client.post("/completions", json=stream).text)
    assert len(chunks) == 8 + 1 + 1
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == story(8)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8

    mock.enqueue(Reply(end_after=2))
    data = sse_data(client.post("/completions", json={**request, "stream": True}).text)
    assert len(data) == 2 and "[DONE]" not in data
    assert client.post("/completions", json={"model": "m"}).status_code == 400


def test_bad_http_does_not_hurt_others(mock: MockServer, client: httpx.Client) -> None:
    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
    assert client.post("/chat/completions", json=CHAT).status_code == 200


def test_http_1_0_and_pipelining(mock: MockServer) -> None:
    payload = json.dumps(STREAM).encode()
    request = b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%b" % (
        len(payload),
        payload,
    )
    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as s:
        s.sendall(request)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower() and b"transfer-encoding" not in head.lower()
    assert sse_data(body.decode())[-1] == "[DONE]"

    get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", mock.port), timeout=5) as s:
        s.sendall(get * 3)
        raw = b""
        while raw.count(b'{"status":"ok"}') < 3:
            chunk = s.recv(65536)
            assert chunk
            raw += chunk
    assert raw.count(b"HTTP/1.1 200 OK") == 3


def test_start_stop_without_context_manager() -> None:
    mock = MockServer()
    mock.start()
    try:
        assert httpx.get(mock.url + "/health").status_code == 200
    finally:
        mock.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(mock.url + "/health", timeout=2)


def test_openai_sdk_compatibility(mock: MockServer) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=mock.base_url, api_key="sk-test", max_retries=0)
    completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.choices[0].message.content == story(8)
    assert completion.usage.prompt_tokens == 7
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        tools=TOOLS,
    )
    arguments = ""
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                arguments += tc.function.arguments or ""
    assert json.loads(arguments)["city"] == "robot"
    assert usage is not None and usage.completion_tokens == 3
    mock.enqueue(Reply(status=429, retry_after=0))
    with pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


# -- async ----------------------------------------------------------------------------------


async def test_async_context_manager() -> None:
    async with MockServer() as mock, httpx.AsyncClient(base_url=mock.base_url) as c:
        mock.enqueue(Reply(pacing=0.001, chunks=4))
        r = await c.post("/chat/completions", json=STREAM_USAGE)
        chunks = chunks_of(r.text)
        assert content(chunks) == story(4)
        assert chunks[-1]["usage"]["completion_tokens"] == 4
    with pytest.raises(RuntimeError):
        _ = MockServer().base_url


async def test_async_stream_cut(mock: MockServer) -> None:
    mock.enqueue(Reply(cut_after=1, pacing=0.001))
    async with httpx.AsyncClient(base_url=mock.base_url) as c:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            async with c.stream("POST", "/chat/completions", json=STREAM) as r:
                async for _ in r.aiter_bytes():
                    pass
        assert (await c.get(mock.url + "/health")).status_code == 200


# -- standalone process ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_standalone_process(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "lunar.testing", "--port", str(port), "--chunks", "3"]
    with (
        (tmp_path / "stderr.txt").open("w+") as stderr,
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            stderr.seek(0)
            expected = f"lunar mock listening on http://127.0.0.1:{port}/v1"
            assert line.strip() == expected, stderr.read()
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            r = httpx.post(url, json=CHAT, timeout=10)
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"] == story(3)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0  # SIGTERM is a clean shutdown


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_the_emulator_served_from_the_command_line_keeps_no_requests() -> None:
    # `python -m lunar.testing` (and `lunar mock`) run until stopped, often under load: they
    # must not keep what they received. 400 requests of 400 KB each (160 MB) are sent.
    proc = subprocess.Popen(
        [sys.executable, "-m", "lunar.testing", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        base = line.strip().rsplit(" ", 1)[-1]
        assert base.startswith("http://127.0.0.1:"), line
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "word " * 80_000}],
            "max_tokens": 1,
        }
        with httpx.Client(timeout=10) as http:
            http.post(f"{base}/chat/completions", json=body).raise_for_status()
            before = _rss_kb(proc.pid)
            for _ in range(400):
                http.post(f"{base}/chat/completions", json=body).raise_for_status()
            grown_mb = (_rss_kb(proc.pid) - before) / 1024
        assert grown_mb < 40, f"the emulator grew by {grown_mb:.0f} MB"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_mock_server_that_records_nothing() -> None:
    with MockServer(record=False) as quiet, httpx.Client(base_url=quiet.base_url) as http:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        assert http.post("/chat/completions", json=body).status_code == 200
        assert quiet.requests == []
