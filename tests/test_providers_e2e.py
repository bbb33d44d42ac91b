"""The SDK end to end against Anthropic and Gemini, both played by the emulator over real
sockets: what reaches each provider (``mock.requests``) and what the caller gets back, sync
and async, streamed and not, with faults, fallbacks, usage and cost.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from lunar import (
    AsyncLunar,
    BadRequestError,
    Lunar,
    ServerError,
    UnprocessableEntityError,
)
from lunar._streaming import ChatAccumulator
from lunar.testing import STORY, MockServer, Reply
from lunar.testing._gemini import thought_signature

from .conftest import busy_connections

SYSTEM = "Be brief."  # 2 words
QUESTION = "Tell me a story."  # 4 words
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
PROMPT_TOKENS = (2 + 3) + (4 + 3)  # the emulator's accounting, the same on every wire

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


class P:
    """One provider under test: Lunar's model name, the provider's id, prices per 1M."""

    def __init__(
        self, name: str, model: str, provider_model: str, prices: tuple[float, float, float]
    ) -> None:
        self.name = name
        self.model = model
        self.provider_model = provider_model
        self.price_in, self.price_out, self.price_cached = prices

    def __repr__(self) -> str:
        return self.name

    def path(self, stream: bool) -> str:
        if self.name == "anthropic":
            return "/v1/messages"
        action = "streamGenerateContent" if stream else "generateContent"
        return f"/v1beta/models/{self.provider_model}:{action}"


ANTHROPIC = P("anthropic", "claude-3-haiku", "claude-3-haiku-20240307", (0.25, 1.25, 0.03))
GEMINI = P("gemini", "gemini-2.0-flash", "gemini-2.0-flash", (0.10, 0.40, 0.025))
PROVIDERS = pytest.mark.parametrize("p", [ANTHROPIC, GEMINI], ids=repr)
MODES = pytest.mark.parametrize("mode", ["sync", "async"])
STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
FAST: dict[str, Any] = {"max_retries": 0, "timeout": 5.0}


@pytest.fixture
def mock(mock: MockServer, monkeypatch: pytest.MonkeyPatch) -> MockServer:
    """conftest's emulator (already OpenAI & co.), now Anthropic and Gemini too."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", mock.url)
    monkeypatch.setenv("GEMINI_API_KEY", "g-test")
    monkeypatch.setenv("GEMINI_BASE_URL", mock.url)
    return mock


def story(n: int) -> str:
    return " ".join(STORY[i % len(STORY)] for i in range(n))


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def call(mode: str, *, stream: bool, client_kw: dict[str, Any] | None = None, **kw: Any):
    """One request in ``mode``; returns (completion or list of chunks, client)."""
    kw.setdefault("messages", MESSAGES)
    if mode == "sync":
        client = Lunar(**(client_kw or FAST))
        result = client.chat.completions.create(stream=stream, **kw)
        return (list(result) if stream else result), client
    aclient = AsyncLunar(**(client_kw or FAST))
    result = await aclient.chat.completions.create(stream=stream, **kw)
    if stream:
        return [c async for c in result], aclient
    return result, aclient


def final_of(result: Any, stream: bool) -> tuple[str, str | None, Any]:
    """(text, finish_reason, usage) of a completion or of a list of chunks."""
    if stream:
        return text_of(result), result[-1].choices[0].finish_reason, result[-1].usage
    choice = result.choices[0]
    return choice.message.content or "", choice.finish_reason, result.usage


def tool_calls_of(result: Any, stream: bool) -> list[dict[str, Any]]:
    """The tool calls, the stream's ``delta.tool_calls`` pieces put together by index."""
    if not stream:
        return [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in result.choices[0].message.tool_calls
        ]
    calls: dict[int, dict[str, Any]] = {}
    for chunk in result:
        for piece in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            if piece.id:
                assert call["id"] is None, "the id comes once"
                call["id"] = piece.id
            if piece.function.name:
                assert call["name"] is None, "the name comes once"
                call["name"] = piece.function.name
            call["arguments"] += piece.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


def whole(result: Any, stream: bool) -> Any:
    """The completion, or the stream's chunks put together as one."""
    if not stream:
        return result
    acc = ChatAccumulator()
    for chunk in result:
        acc.add(chunk)
    return acc.completion()


def cost(tokens: int, price: float) -> float:
    return round(tokens * price / 1e6, 10)


# -- text --------------------------------------------------------------------------------


@PROVIDERS
@MODES
@STREAMS
async def test_text_with_usage_and_cost(mock: MockServer, p: P, mode: str, stream: bool) -> None:
    mock.default = Reply(chunks=6)
    result, client = await call(mode, stream=stream, model=p.model)
    text, finish, usage = final_of(result, stream)
    assert text == story(6) and finish == "stop"
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, 6)
    assert usage.total_tokens == PROMPT_TOKENS + 6 and usage.cached_tokens == 0
    assert usage.input_cost_usd == cost(PROMPT_TOKENS, p.price_in)
    assert usage.output_cost_usd == cost(6, p.price_out)
    assert usage.total_cost_usd == round(usage.input_cost_usd + usage.output_cost_usd, 10)
    assert usage.latency_ms >= usage.ttft_ms > 0
    if stream:
        assert result[0].choices[0].delta.role == "assistant"
        assert all(c.usage is None for c in result[:-1])
        assert all(c.choices[0].finish_reason is None for c in result[:-1])
        assert {c.provider for c in result} == {p.name}
    else:
        assert result.provider == p.name and result.choices[0].message.role == "assistant"
    sent = mock.requests[-1]
    assert sent.path == p.path(stream) and sent.model == p.provider_model
    if p is ANTHROPIC:
        assert sent.headers["x-api-key"] == "sk-ant-test"
        assert sent.headers["anthropic-version"] == "2023-06-01"
        assert sent.json.get("stream", False) is stream
    else:
        assert sent.headers["x-goog-api-key"] == "g-test"
        assert (sent.query == "alt=sse") is stream
    assert busy_connections(client) == 0


@PROVIDERS
def test_system_prompt_reaches_the_right_field(mock: MockServer, p: P) -> None:
    Lunar(**FAST).chat.completions.create(model=p.model, messages=MESSAGES)
    sent = mock.requests[-1].json
    if p is ANTHROPIC:
        assert sent["system"] == SYSTEM
        assert sent["messages"] == [
            {"role": "user", "content": [{"type": "text", "text": QUESTION}]}
        ]
    else:
        assert sent["systemInstruction"] == {"parts": [{"text": SYSTEM}]}
        assert sent["contents"] == [{"role": "user", "parts": [{"text": QUESTION}]}]


@PROVIDERS
@STREAMS
def test_multi_turn(mock: MockServer, p: P, stream: bool) -> None:
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": "Once upon a time."},  # 4 words
        {"role": "user", "content": "And then?"},  # 2 words
    ]
    result = Lunar(**FAST).chat.completions.create(model=p.model, messages=messages, stream=stream)
    text, finish, usage = final_of(list(result) if stream else result, stream)
    assert text == story(8) and finish == "stop"
    assert usage.prompt_tokens == PROMPT_TOKENS + (4 + 3) + (2 + 3)
    sent = mock.requests[-1].json
    if p is ANTHROPIC:
        assert [(m["role"], m["content"][0]["text"]) for m in sent["messages"]] == [
            ("user", QUESTION),
            ("assistant", "Once upon a time."),
            ("user", "And then?"),
        ]
    else:
        assert [(c["role"], c["parts"][0]["text"]) for c in sent["contents"]] == [
            ("user", QUESTION),
            ("model", "Once upon a time."),
            ("user", "And then?"),
        ]


# -- tools -------------------------------------------------------------------------------


@PROVIDERS
@MODES
@STREAMS
async def test_tool_call(mock: MockServer, p: P, mode: str, stream: bool) -> None:
    result, client = await call(mode, stream=stream, model=p.model, tools=TOOLS)
    (tool_call,) = tool_calls_of(result, stream)
    assert tool_call["name"] == "get_weather" and tool_call["id"]
    assert json.loads(tool_call["arguments"]) == {"city": "robot"}
    _, finish, usage = final_of(result, stream)
    assert finish == "tool_calls"
    assert usage.completion_tokens == 3  # the emulator's argument pieces
    if stream and p is ANTHROPIC:  # arguments arrive in pieces to concatenate
        pieces = [
            c.choices[0].delta.tool_calls[0].function.arguments
            for c in result
            if c.choices and c.choices[0].delta.tool_calls
        ]
        assert len([x for x in pieces if x]) == 3
    sent = mock.requests[-1].json
    if p is ANTHROPIC:
        assert sent["tools"] == [
            {
                "name": "get_weather",
                "description": "Weather in a city",
                "input_schema": TOOLS[0]["function"]["parameters"],
            }
        ]
    else:
        assert sent["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    assert busy_connections(client) == 0


@STREAMS
async def test_gemini_calls_without_an_id_get_ids_unique_across_answers(
    mock: MockServer, stream: bool
) -> None:
    """Gemini may send a call without an id; every answer made them call_0, call_1 … again,
    so a conversation keeping calls by id mixed up the turns'."""
    ids = []
    for _ in range(2):
        result, _ = await call("async", stream=stream, model=GEMINI.model, tools=TOOLS)
        ids += [c["id"] for c in tool_calls_of(result, stream)]
    assert len(ids) == len(set(ids)) == 2
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids), ids


@PROVIDERS
@MODES
@STREAMS
async def test_tool_result_round_trip(mock: MockServer, p: P, mode: str, stream: bool) -> None:
    first, _ = await call(mode, stream=stream, model=p.model, tools=TOOLS)
    (tool_call,) = tool_calls_of(first, stream)
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": tool_call["id"],
                    "type": "function",
                    "function": {"name": tool_call["name"], "arguments": tool_call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": tool_call["id"], "content": '{"temp_c": 21}'},
    ]
    result, client = await call(mode, stream=stream, model=p.model, tools=TOOLS, messages=messages)
    text, finish, _ = final_of(result, stream)
    assert text == story(8) and finish == "stop"
    sent = mock.requests[-1].json
    if p is ANTHROPIC:
        assert sent["messages"][-2] == {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": tool_call["id"],
                    "name": "get_weather",
                    "input": {"city": "robot"},
                }
            ],
        }
        assert sent["messages"][-1] == {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": tool_call["id"], "content": '{"temp_c": 21}'}
            ],
        }
    else:
        assert sent["contents"][-2] == {
            "role": "model",
            "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "robot"}}}],
        }
        assert sent["contents"][-1] == {
            "role": "user",
            "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}}],
        }
    assert busy_connections(client) == 0


GEMINI_3 = "gemini/gemini-3-pro-preview"  # signs its calls, and checks them (the emulator)
SIGNED = {"google": {"thought_signature": thought_signature("get_weather")}}


@MODES
@STREAMS
async def test_gemini_3_tool_use_round_trip_carries_the_thought_signature(
    mock: MockServer, mode: str, stream: bool
) -> None:
    """The call comes back with Gemini's signature where Google's OpenAI-compatible endpoint
    puts it; the answer's message put back in the conversation returns it to its
    ``functionCall`` part, and Gemini 3 (which refuses a call without it) answers."""
    first, _ = await call(mode, stream=stream, model=GEMINI_3, tools=TOOLS)
    message = whole(first, stream).choices[0].message
    [tool_call] = message.tool_calls
    assert tool_call.extra_content == SIGNED
    assert tool_call.to_dict()["extra_content"] == SIGNED
    result = {"role": "tool", "tool_call_id": tool_call.id, "content": '{"temp_c": 21}'}
    for turn in (message, message.to_dict()):  # the answer's object, or its dict
        messages = [*MESSAGES, turn, result]
        second, client = await call(
            mode, stream=stream, model=GEMINI_3, tools=TOOLS, messages=messages
        )
        text, finish, _ = final_of(second, stream)
        assert text == story(8) and finish == "stop"
        sent = mock.requests[-1].json["contents"][-2]
        assert sent["parts"][0]["thoughtSignature"] == SIGNED["google"]["thought_signature"]
        assert busy_connections(client) == 0


def test_gemini_3_refuses_a_call_sent_back_without_its_signature(mock: MockServer) -> None:
    client = Lunar(**FAST)
    answer = client.chat.completions.create(model=GEMINI_3, messages=MESSAGES, tools=TOOLS)
    message = answer.choices[0].message
    [tool_call] = message.tool_calls
    bare = {
        "role": "assistant",
        "tool_calls": [{k: v for k, v in tool_call.to_dict().items() if k != "extra_content"}],
    }
    result = {"role": "tool", "tool_call_id": tool_call.id, "content": "21"}
    with pytest.raises(BadRequestError, match="missing a thought_signature"):
        client.chat.completions.create(
            model=GEMINI_3, messages=[*MESSAGES, bare, result], tools=TOOLS
        )


@STREAMS
def test_a_gemini_signature_is_not_sent_to_another_provider(mock: MockServer, stream: bool) -> None:
    """A conversation begun on Gemini and carried on elsewhere (another model, a fallback):
    OpenAI and other strict servers refuse a tool call with a field they do not know."""
    client = Lunar(**FAST)
    answer = client.chat.completions.create(model=GEMINI_3, messages=MESSAGES, tools=TOOLS)
    message = answer.choices[0].message
    turn = message.to_dict()
    result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "21"}
    for model in ("gpt-4o-mini", ANTHROPIC.model):
        answer = client.chat.completions.create(
            model=model, messages=[*MESSAGES, turn, result], tools=TOOLS, stream=stream
        )
        if stream:
            list(answer)
        assert "extra_content" not in json.dumps(mock.requests[-1].json)
    assert turn["tool_calls"][0]["extra_content"] == SIGNED  # the caller's dict unchanged


@MODES
@STREAMS
async def test_anthropic_names_the_stop_sequence_that_ended_the_answer(
    mock: MockServer, mode: str, stream: bool
) -> None:
    mock.enqueue(Reply(finish_reason="stop_sequence"))
    result, _ = await call(mode, stream=stream, model=ANTHROPIC.model, stop=["END", "STOP"])
    choice = result[-1].choices[0] if stream else result.choices[0]
    assert (choice.finish_reason, choice.stop_sequence) == ("stop", "END")
    assert mock.requests[-1].json["stop_sequences"] == ["END", "STOP"]


# -- limits, faults, fallbacks -------------------------------------------------------------


@PROVIDERS
@STREAMS
def test_max_tokens_gives_length(mock: MockServer, p: P, stream: bool) -> None:
    result = Lunar(**FAST).chat.completions.create(
        model=p.model, messages=MESSAGES, max_tokens=3, stream=stream
    )
    text, finish, usage = final_of(list(result) if stream else result, stream)
    assert (text, finish, usage.completion_tokens) == (story(3), "length", 3)
    sent = mock.requests[-1].json
    if p is ANTHROPIC:
        assert sent["max_tokens"] == 3
    else:
        assert sent["generationConfig"]["maxOutputTokens"] == 3


@PROVIDERS
def test_default_max_tokens(mock: MockServer, p: P) -> None:
    Lunar(**FAST).chat.completions.create(model=p.model, messages=MESSAGES)
    sent = mock.requests[-1].json
    if p is ANTHROPIC:
        assert sent["max_tokens"] == 4096  # the catalogue's max output for claude-3-haiku
    else:
        assert "generationConfig" not in sent


@PROVIDERS
@MODES
async def test_error_after_first_chunk_raises_in_the_callers_loop(
    mock: MockServer, p: P, mode: str
) -> None:
    mock.enqueue(Reply(chunks=8, error_after=2), model=p.provider_model)
    seen: list[Any] = []
    kw = {"model": p.model, "messages": MESSAGES, "stream": True, "fallbacks": ["gpt-4o-mini"]}
    client_kw = {"max_retries": 2, "timeout": 5.0}
    if mode == "sync":
        client: Any = Lunar(**client_kw)
        with pytest.raises(ServerError) as info:
            for chunk in client.chat.completions.create(**kw):
                seen.append(chunk)
    else:
        client = AsyncLunar(**client_kw)
        with pytest.raises(ServerError) as info:
            async for chunk in await client.chat.completions.create(**kw):
                seen.append(chunk)
    assert text_of(seen) == story(2)  # the caller got content first
    assert all(c.choices[0].finish_reason is None for c in seen)
    assert info.value.provider == p.name
    if p is ANTHROPIC:
        assert info.value.type == "overloaded_error" and info.value.status_code == 529
    else:
        assert info.value.status_code == 503
    assert [r.path for r in mock.requests] == [p.path(True)]  # no retry, no fallback
    assert [a.provider for a in info.value.attempts] == [p.name]
    assert busy_connections(client) == 0


FALLBACKS = {
    "anthropic_529_to_gemini": (ANTHROPIC, Reply(status=529), GEMINI),
    "anthropic_error_event_to_openai": (ANTHROPIC, Reply(error_after=0), None),
    "gemini_429_to_anthropic": (GEMINI, Reply(status=429, retry_after=0), ANTHROPIC),
    "gemini_error_event_to_openai": (GEMINI, Reply(error_after=0), None),
}


@MODES
@STREAMS
@pytest.mark.parametrize("case", list(FALLBACKS))
async def test_failure_before_the_first_chunk_falls_back(
    mock: MockServer, mode: str, stream: bool, case: str
) -> None:
    primary, fault, fallback = FALLBACKS[case]
    mock.enqueue(fault, model=primary.provider_model)
    fallback_model = fallback.model if fallback else "gpt-4o-mini"
    result, client = await call(
        mode, stream=stream, model=primary.model, fallbacks=[fallback_model]
    )
    text, finish, usage = final_of(result, stream)
    assert text == story(8) and finish == "stop"
    answered = result[-1].provider if stream else result.provider
    assert answered == (fallback.name if fallback else "openai")
    paths = [r.path for r in mock.requests]
    assert paths[0] == primary.path(stream)
    assert paths[1] == (fallback.path(stream) if fallback else "/v1/chat/completions")
    assert len(paths) == 2
    if fallback is not None:  # billed at the price of the model that answered
        assert usage.input_cost_usd == cost(PROMPT_TOKENS, fallback.price_in)
    assert busy_connections(client) == 0


@PROVIDERS
@MODES
@STREAMS
async def test_cached_tokens_are_billed_at_the_cached_price(
    mock: MockServer, p: P, mode: str, stream: bool
) -> None:
    mock.enqueue(Reply(chunks=5, cached_tokens=4), model=p.provider_model)
    result, _ = await call(mode, stream=stream, model=p.model)
    _, _, usage = final_of(result, stream)
    assert (usage.prompt_tokens, usage.cached_tokens) == (PROMPT_TOKENS, 4)
    assert usage.input_cost_usd == cost(PROMPT_TOKENS - 4, p.price_in)
    assert usage.cached_input_cost_usd == cost(4, p.price_cached)
    assert usage.output_cost_usd == cost(5, p.price_out)
    assert usage.total_cost_usd == round(
        usage.input_cost_usd + usage.cached_input_cost_usd + usage.output_cost_usd, 10
    )


# -- inputs and formats --------------------------------------------------------------------

IMAGE_MESSAGE = {
    "role": "user",
    "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ],
}


@PROVIDERS
def test_image_inputs_arrive_in_each_providers_form(mock: MockServer, p: P) -> None:
    done = Lunar(**FAST).chat.completions.create(model=p.model, messages=[IMAGE_MESSAGE])
    assert done.choices[0].message.content == story(8)
    assert done.usage.prompt_tokens == 3 + 3  # images count no words
    sent = mock.requests[-1].json
    if p is ANTHROPIC:
        assert sent["messages"][0]["content"] == [
            {"type": "text", "text": "What is this?"},
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
            },
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ]
    else:
        assert sent["contents"][0]["parts"] == [
            {"text": "What is this?"},
            {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
            {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg"}},
        ]


PDF = "JVBERi0xLjQK"  # "%PDF-1.4\n"
AUDIO = "UklGRiQAAABXQVZF"  # the start of a WAV file
FILE_PART = {
    "type": "file",
    "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF}"},
}
AUDIO_PART = {"type": "input_audio", "input_audio": {"data": AUDIO, "format": "wav"}}


@PROVIDERS
def test_file_inputs_arrive_in_each_providers_form(mock: MockServer, p: P) -> None:
    # A part the adapter cannot carry must not vanish: the model would answer without it.
    question = {"role": "user", "content": [{"type": "text", "text": "Summarize."}, FILE_PART]}
    done = Lunar(**FAST).chat.completions.create(model=p.model, messages=[question])
    assert done.choices[0].message.content == story(8)
    sent = mock.requests[-1].json
    if p is ANTHROPIC:
        assert sent["messages"][0]["content"][1] == {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
        }
    else:
        assert sent["contents"][0]["parts"][1] == {
            "inlineData": {"mimeType": "application/pdf", "data": PDF}
        }


def test_gemini_takes_audio_input(mock: MockServer) -> None:
    question = {"role": "user", "content": [{"type": "text", "text": "Transcribe."}, AUDIO_PART]}
    Lunar(**FAST).chat.completions.create(model=GEMINI.model, messages=[question])
    assert mock.requests[-1].json["contents"][0]["parts"][1] == {
        "inlineData": {"mimeType": "audio/wav", "data": AUDIO}
    }


@pytest.mark.parametrize(
    ("p", "part", "param"),
    [
        (ANTHROPIC, AUDIO_PART, "input_audio"),
        (ANTHROPIC, {"type": "file", "file": {"file_id": "file-abc"}}, "file"),
        (GEMINI, {"type": "file", "file": {"file_id": "file-abc"}}, "file"),
    ],
    ids=["anthropic-audio", "anthropic-file-id", "gemini-file-id"],
)
def test_a_part_the_provider_cannot_take_is_refused_before_sending(
    mock: MockServer, p: P, part: dict[str, Any], param: str
) -> None:
    question = {"role": "user", "content": [{"type": "text", "text": "Here."}, part]}
    with pytest.raises(BadRequestError) as info:
        Lunar(**FAST).chat.completions.create(model=p.model, messages=[question])
    assert info.value.param == f"messages.content.{param}"
    assert mock.requests == []


@STREAMS
def test_gemini_json_mode_is_native(mock: MockServer, stream: bool) -> None:
    mock.enqueue(Reply(text='{"ok": true}', chunks=3))
    result = Lunar(**FAST).chat.completions.create(
        model=GEMINI.model,
        messages=MESSAGES,
        response_format={"type": "json_object"},
        stream=stream,
    )
    text, finish, _ = final_of(list(result) if stream else result, stream)
    assert json.loads(text) == {"ok": True} and finish == "stop"
    sent = mock.requests[-1].json
    assert sent["generationConfig"]["responseMimeType"] == "application/json"
    assert sent["systemInstruction"] == {"parts": [{"text": SYSTEM}]}  # no instruction added


@MODES
@STREAMS
async def test_anthropic_json_mode_is_emulated_and_checked(
    mock: MockServer, mode: str, stream: bool
) -> None:
    fmt = {"type": "json_object"}
    mock.enqueue(Reply(text='{"ok": true}', chunks=3), model=ANTHROPIC.provider_model)
    result, _ = await call(mode, stream=stream, model=ANTHROPIC.model, response_format=fmt)
    text, finish, _ = final_of(result, stream)
    assert json.loads(text) == {"ok": True} and finish == "stop"
    sent = mock.requests[-1].json
    assert "response_format" not in sent
    assert "JSON" in sent["system"] and sent["system"].endswith(SYSTEM)
    assert [m["role"] for m in sent["messages"]] == ["user"]

    mock.enqueue(Reply(text="Sure! Here it is: ok", chunks=3), model=ANTHROPIC.provider_model)
    with pytest.raises(UnprocessableEntityError) as info:
        await call(mode, stream=stream, model=ANTHROPIC.model, response_format=fmt)
    assert info.value.status_code == 422 and info.value.provider == "anthropic"
    assert len(mock.requests) == 2  # not retried, no fallback


@MODES
@STREAMS
async def test_gemini_n_gives_every_candidate_as_a_choice(
    mock: MockServer, mode: str, stream: bool
) -> None:
    result, client = await call(mode, stream=stream, model=GEMINI.model, n=2)
    assert mock.requests[-1].json["generationConfig"]["candidateCount"] == 2
    if stream:
        assert {c.choices[0].index for c in result if c.choices} == {0, 1}
        assert [c.usage is not None for c in result].count(True) == 1  # once, on the last
        acc = ChatAccumulator()
        for chunk in result:
            acc.add(chunk)
        result = acc.completion()
    assert [(c.index, c.message.content, c.finish_reason) for c in result.choices] == [
        (0, story(8), "stop"),
        (1, story(8), "stop"),
    ]
    assert result.usage.completion_tokens == 16  # both candidates, as Gemini bills them
    assert result.usage.output_cost_usd == cost(16, GEMINI.price_out)
    assert busy_connections(client) == 0


@MODES
@STREAMS
@pytest.mark.parametrize("model", [ANTHROPIC.model, "anthropic/claude-3-haiku-20240307"])
async def test_anthropic_refuses_n_above_one_before_any_request(
    mock: MockServer, mode: str, stream: bool, model: str
) -> None:
    # Anthropic's Messages API has no n: one choice silently standing for two is refused.
    with pytest.raises(BadRequestError) as info:
        await call(mode, stream=stream, model=model, n=2)
    assert info.value.status_code == 400 and info.value.param == "n"
    assert "n=2" in str(info.value) and "anthropic" in str(info.value)
    assert mock.requests == []
    result, _ = await call(mode, stream=stream, model=model, n=1)  # n=1 is what it does
    assert final_of(result, stream)[0] == story(8)


@MODES
@STREAMS
async def test_fallbacks_that_give_one_choice_are_skipped_for_n_above_one(
    mock: MockServer, mode: str, stream: bool
) -> None:
    mock.enqueue(Reply(status=503), model="gpt-4o-mini")
    fallbacks = [ANTHROPIC.model, "smollm2", GEMINI.model]
    result, client = await call(mode, stream=stream, model="gpt-4o-mini", n=2, fallbacks=fallbacks)
    if stream:
        acc = ChatAccumulator()
        for chunk in result:
            acc.add(chunk)
        result = acc.completion()
    assert result.provider == "gemini" and len(result.choices) == 2
    assert [r.path for r in mock.requests] == ["/v1/chat/completions", GEMINI.path(stream)]

    # With nothing left that can serve n=2, the primary's own failure is what is raised;
    # the skipped fallbacks are on its attempts, with the reason.
    mock.enqueue(Reply(status=503), model="gpt-4o-mini")
    with pytest.raises(ServerError) as info:
        await call(mode, stream=stream, model="gpt-4o-mini", n=2, fallbacks=fallbacks[:2])
    attempts = info.value.attempts
    assert [(a.model, a.provider) for a in attempts] == [
        ("gpt-4o-mini", "openai"),
        (ANTHROPIC.model, "anthropic"),
        ("smollm2", "local"),
    ]
    assert all(isinstance(a.error, BadRequestError) for a in attempts[1:])
    assert all(a.error.param == "n" for a in attempts[1:])
    assert busy_connections(client) == 0


def test_capability_check_happens_before_any_request(mock: MockServer) -> None:
    with pytest.raises(BadRequestError) as info:
        Lunar(**FAST).chat.completions.create(model="smollm2", messages=MESSAGES, tools=TOOLS)
    assert info.value.code == "unsupported_capability"
    assert mock.requests == []


@pytest.mark.parametrize(
    ("model", "p"),
    [("gemini/gemini-2.0-flash", GEMINI), ("anthropic/claude-3-haiku-20240307", ANTHROPIC)],
)
@STREAMS
def test_provider_slash_model_form(mock: MockServer, model: str, p: P, stream: bool) -> None:
    result = Lunar(**FAST).chat.completions.create(model=model, messages=MESSAGES, stream=stream)
    text, _, usage = final_of(list(result) if stream else result, stream)
    assert text == story(8)
    assert mock.requests[-1].path == p.path(stream)
    assert usage.output_cost_usd == cost(8, p.price_out)  # the catalogued, priced deployment


async def test_async_client_streams_both_providers_concurrently(mock: MockServer) -> None:
    import asyncio

    async with AsyncLunar(**FAST) as client:

        async def one(p: P) -> str:
            stream = await client.chat.completions.create(
                model=p.model, messages=MESSAGES, stream=True
            )
            return text_of([c async for c in stream])

        texts = await asyncio.gather(one(ANTHROPIC), one(GEMINI), one(ANTHROPIC), one(GEMINI))
        assert texts == [story(8)] * 4
        assert busy_connections(client) == 0


# -- regressions found on the way -----------------------------------------------------------


def test_anthropic_temperature_above_one_is_capped(mock: MockServer) -> None:
    done = Lunar(**FAST).chat.completions.create(
        model=ANTHROPIC.model, messages=MESSAGES, temperature=1.5
    )
    assert done.choices[0].message.content == story(8)
    assert mock.requests[-1].json["temperature"] == 1.0


def test_streamed_tool_call_in_emulated_json_mode_is_not_checked_as_json(mock: MockServer) -> None:
    chunks = list(
        Lunar(**FAST).chat.completions.create(
            model=ANTHROPIC.model,
            messages=MESSAGES,
            tools=TOOLS,
            response_format={"type": "json_object"},
            stream=True,
        )
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_gemini_tool_without_arguments_is_declared_without_parameters(mock: MockServer) -> None:
    no_args = [
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    done = Lunar(**FAST).chat.completions.create(
        model=GEMINI.model, messages=MESSAGES, tools=no_args
    )
    assert done.choices[0].message.tool_calls[0].function.name == "get_time"


def test_gemini_keeps_a_tool_field_named_strict(mock: MockServer) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "set_mode",
                "parameters": {
                    "type": "object",
                    "properties": {"strict": {"type": "boolean"}},
                    "required": ["strict"],
                    "additionalProperties": False,
                },
            },
        }
    ]
    done = Lunar(**FAST).chat.completions.create(model=GEMINI.model, messages=MESSAGES, tools=tools)
    sent = mock.requests[-1].json["tools"][0]["functionDeclarations"][0]["parameters"]
    assert sent["properties"] == {"strict": {"type": "boolean"}}
    assert json.loads(done.choices[0].message.tool_calls[0].function.arguments) == {"strict": True}


def test_gemini_answer_without_usage_is_estimated(mock: MockServer) -> None:
    mock.enqueue(Reply(usage=False))
    done = Lunar(**FAST).chat.completions.create(model=GEMINI.model, messages=MESSAGES)
    assert done.usage.prompt_tokens > 0 and done.usage.completion_tokens > 0


NO_ARGS = [{"type": "function", "function": {"name": "get_time"}}]


@PROVIDERS
@MODES
@STREAMS
async def test_tool_call_without_arguments_has_empty_object_arguments(
    mock: MockServer, p: P, mode: str, stream: bool
) -> None:
    # Claude streams a call without arguments as one ``partial_json: ""``: the assembled
    # arguments must still be "{}" (JSON), as unstreamed and as OpenAI gives them.
    mock.enqueue(Reply(tool_calls=[{"name": "get_time", "arguments": {}}]), model=p.provider_model)
    result, _ = await call(mode, stream=stream, model=p.model, tools=NO_ARGS)
    (tool_call,) = tool_calls_of(result, stream)
    assert tool_call["name"] == "get_time"
    assert json.loads(tool_call["arguments"]) == {}


@PROVIDERS
@STREAMS
def test_an_empty_answer_put_back_in_the_conversation_is_accepted(
    mock: MockServer, p: P, stream: bool
) -> None:
    # Both providers refuse a turn without content (and empty text): the empty answer the
    # model gave (a refusal, an empty end_turn) must not break the next turn.
    client = Lunar(**FAST)
    mock.enqueue(Reply(text=""), model=p.provider_model)
    first = client.chat.completions.create(model=p.model, messages=MESSAGES)
    assert first.choices[0].message.content == ""
    messages = [
        *MESSAGES,
        first.choices[0].message,
        {"role": "user", "content": [{"type": "text", "text": ""}]},
        {"role": "user", "content": "Try again."},
    ]
    result = client.chat.completions.create(model=p.model, messages=messages, stream=stream)
    assert final_of(list(result) if stream else result, stream)[0] == story(8)


@PROVIDERS
@MODES
@STREAMS
async def test_extra_body_fields_reach_the_providers_body(
    mock: MockServer, p: P, mode: str, stream: bool
) -> None:
    # The provider's own fields are merged into its body (a nested object into the one Lunar
    # built); OpenAI's own (logit_bias) have no meaning there and are not sent.
    safety = [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}]
    extra: dict[str, Any] = (
        {"top_k": 5, "logit_bias": {"1": 2}}
        if p is ANTHROPIC
        else {"generationConfig": {"topK": 5}, "safetySettings": safety, "logit_bias": {"1": 2}}
    )
    result, _ = await call(mode, stream=stream, model=p.model, temperature=0.5, extra_body=extra)
    assert final_of(result, stream)[0] == story(8)
    sent = mock.requests[-1].json
    assert "logit_bias" not in sent
    if p is ANTHROPIC:
        assert (sent["top_k"], sent["temperature"]) == (5, 0.5)
    else:
        assert sent["generationConfig"] == {"temperature": 0.5, "topK": 5}
        assert sent["safetySettings"] == safety
