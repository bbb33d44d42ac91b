"""The OpenAI-compatible adapter, sans I/O: bytes in, chunks out."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunar import APIConnectionError, RateLimitError, StreamError
from lunar._catalog import Catalog
from lunar._streaming import ChatAccumulator
from lunar.providers import Target, adapter_for

ADAPTER = adapter_for("openai")
CATALOG = Catalog.load()
TARGET = Target(
    CATALOG.resolve("llama-3.1-8b")[0],
    CATALOG.providers["groq"],
    "http://127.0.0.1:9/openai/v1",
    "gk",
)


def event(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(delta, finish=None, **extra):
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


TOOL_STREAM = b"".join(
    [
        event(
            chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ],
                }
            )
        ),
        event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]})),
        event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})),
        event(chunk({}, "tool_calls")),
        event(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
            }
        ),
        b"data: [DONE]\n\n",
    ]
)


def feed_all(pieces):
    t = ADAPTER.stream_translator(TARGET)
    out = []
    for p in pieces:
        out.extend(t.feed(p))
    out.extend(t.close())
    return out


def test_build_request_targets_provider_model_and_asks_for_usage():
    req = ADAPTER.build_request(
        {"messages": [], "temperature": 0.5, "stream_options": {"x": 1}}, TARGET, stream=True
    )
    assert req.url == "http://127.0.0.1:9/openai/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer gk"
    body = json.loads(req.content)
    assert body["model"] == "llama-3.1-8b-instant"
    assert body["stream"] is True
    assert body["stream_options"] == {"x": 1, "include_usage": True}
    assert body["temperature"] == 0.5


def test_tool_call_stream_assembles_arguments_by_index():
    chunks = feed_all([TOOL_STREAM])
    acc = ChatAccumulator()
    for c in chunks:
        acc.add(c)
    done = acc.completion()
    [call] = done.choices[0].message.tool_calls
    assert (call.id, call.function.name) == ("call_1", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert done.choices[0].finish_reason == "tool_calls"
    assert done.usage.total_tokens == 13


@settings(max_examples=200)
@given(st.lists(st.integers(0, len(TOOL_STREAM)), max_size=20))
def test_any_split_gives_the_same_final_message(cuts):
    points = sorted(set(cuts))
    pieces = [TOOL_STREAM[a:b] for a, b in zip([0, *points], [*points, len(TOOL_STREAM)])]
    acc = ChatAccumulator()
    for c in feed_all(pieces):
        acc.add(c)
    assert json.loads(acc.completion().choices[0].message.tool_calls[0].function.arguments) == {
        "city": "Paris"
    }


def test_error_event_raises_typed_error():
    t = ADAPTER.stream_translator(TARGET)
    t.feed(event(chunk({"content": "Hi"})))
    with pytest.raises(RateLimitError, match="slow down"):
        t.feed(event({"error": {"message": "slow down", "type": "rate_limit_error"}}))


def test_malformed_event_raises_stream_error():
    t = ADAPTER.stream_translator(TARGET)
    with pytest.raises(StreamError, match="Malformed"):
        t.feed(b'data: {"id": "broken\n\n')


def test_stream_ending_without_done_or_finish_raises():
    t = ADAPTER.stream_translator(TARGET)
    t.feed(event(chunk({"content": "Hi"})))
    with pytest.raises(APIConnectionError, match="ended before it was complete"):
        t.close()


def test_finish_reason_without_done_is_accepted():
    t = ADAPTER.stream_translator(TARGET)
    t.feed(event(chunk({"content": "Hi"}, "stop")))
    assert t.close() == []


def test_parse_response_and_invalid_json():
    body = {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": 3,
            "completion_tokens": 1,
            "total_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 2},
        },
    }
    done = ADAPTER.parse_response(json.dumps(body).encode(), TARGET)
    assert done.choices[0].message.content == "Hi"
    assert done.usage.cached_tokens == 2
    assert done.provider == "groq"
    with pytest.raises(Exception, match=r"\[502\] Invalid JSON"):
        ADAPTER.parse_response(b"<html>", TARGET)


# --- ChatCompletionChunk.compact_json: the gateway's per-event writer ----------------------

_texts = st.one_of(st.none(), st.text(), st.sampled_from(["", "assistant", "stop", "\ud800x"]))


@st.composite
def chunks(draw):
    from lunar._types import (
        ChatCompletionChunk,
        ChoiceDelta,
        ChoiceDeltaToolCall,
        ChunkChoice,
        Function,
        Usage,
    )

    tool_calls = draw(
        st.one_of(
            st.none(),
            st.lists(
                st.builds(
                    ChoiceDeltaToolCall,
                    st.integers(0, 3),
                    _texts,
                    st.just("function"),
                    st.builds(Function, _texts, _texts),
                ),
                max_size=2,
            ),
        )
    )
    choice = ChunkChoice(
        draw(st.one_of(st.integers(0, 10**12), st.booleans())),
        ChoiceDelta(draw(_texts), draw(_texts), tool_calls, draw(_texts)),
        draw(_texts),
        draw(st.one_of(st.none(), st.just({"content": []}))),
    )
    choices = draw(st.sampled_from([[choice], [], [choice, choice]]))
    usage = draw(st.one_of(st.none(), st.builds(Usage, st.integers(0, 99), st.integers(0, 99))))
    return ChatCompletionChunk(
        id=draw(st.one_of(st.text(), st.integers())),
        created=draw(st.one_of(st.integers(0, 2**40), st.floats(0, 1e9), st.booleans())),
        model=draw(st.text()),
        choices=choices,
        usage=usage,
        system_fingerprint=draw(_texts),
        provider=draw(_texts),
    )


@settings(max_examples=400)
@given(chunks())
def test_compact_json_writes_what_the_general_encoder_writes(chunk):
    from lunar._json import utf8
    from lunar._types import compact_json
    from lunar.server.dialects import ChatWriter

    assert chunk.compact_json() == compact_json(chunk.to_dict())
    json.loads(chunk.compact_json())  # and it is JSON
    # The gateway's bytes: the same text, but that orjson may spell a float's exponent
    # differently (1e-7 for 1e-07).
    sent = ChatWriter().chunk(chunk)
    assert sent.startswith(b"data: ") and sent.endswith(b"\n\n")
    if type(chunk.created) is float:
        assert json.loads(sent[6:]) == json.loads(chunk.compact_json())
    else:
        assert sent[6:-2] == utf8(chunk.compact_json())


_CHUNK = "chat.completion.chunk"
ENVELOPES = [  # (id, created, model, object, provider, fingerprint), shared between chunks
    ("c1", 1, "m", _CHUNK, "openai", None),
    ("c1", True, "m", _CHUNK, "openai", None),  # equal to the first in a tuple, but "true"
    # each differs from the first in one field
    ("c2", 1, "m", _CHUNK, "openai", None),
    ("c1", 2, "m", _CHUNK, "openai", None),
    ("c1", 1, "m2", _CHUNK, "openai", None),
    ("c1", 1, "m", "chat.completion", "openai", None),
    ("c1", 1, "m", _CHUNK, None, None),
    ("c1", 1, "m", _CHUNK, "openai", "fp"),
    # not the usual shape
    (7, 2**40, "m\u2028", _CHUNK, "openai", "fp"),
    ("c2", 1.5, "m", _CHUNK, "openai", None),
]


@st.composite
def text_chunks(draw):
    """The shape nearly every streamed chunk has: one choice, a text delta, no usage."""
    from lunar._types import ChatCompletionChunk, ChoiceDelta, ChunkChoice

    delta = ChoiceDelta(draw(_texts), draw(_texts), None, draw(_texts))
    choice = ChunkChoice(draw(st.integers(0, 3)), delta, draw(_texts))
    return ChatCompletionChunk("", 0, "", [choice])


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.one_of(text_chunks(), chunks()), st.sampled_from(ENVELOPES)),
        min_size=1,
        max_size=12,
    )
)
def test_one_writer_for_a_whole_stream_writes_each_chunk_as_the_general_encoder(stream):
    """The gateway keeps one writer for a stream, which writes the fields every chunk
    repeats once and keeps them while they stay the same: each chunk, in any order of
    shared and changed envelopes, must still be written as on its own."""
    from lunar._json import loads, utf8
    from lunar._types import compact_json
    from lunar.server.dialects import ChatWriter

    writer = ChatWriter()
    for chunk, (id, created, model, obj, provider, fp) in stream:
        chunk.id, chunk.created, chunk.model, chunk.object = id, created, model, obj
        chunk.provider, chunk.system_fingerprint = provider, fp
        sent = writer.chunk(chunk)
        assert sent.startswith(b"data: ") and sent.endswith(b"\n\n")
        assert loads(sent[6:-2]) == loads(compact_json(chunk.to_dict()))
        if type(created) is not float:  # orjson may spell a float differently (1e-7)
            assert sent[6:-2] == utf8(chunk.compact_json())


def test_provider_is_lunars_name_for_the_target_unless_a_gateway_reports_it():
    """An upstream's own ``provider`` field (OpenRouter sends one) is not who answered in
    Lunar's terms; a Lunar gateway's is (remote mode), for streams and completions alike."""
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "provider": "SomeHost",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}],
    }
    whole = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "provider": "SomeHost",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    }
    data = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    adapter = adapter_for("openai")
    assert adapter.stream_translator(TARGET).feed(data)[0].provider == TARGET.provider
    assert adapter.parse_response(json.dumps(whole).encode(), TARGET).provider == TARGET.provider
    from lunar._catalog import Deployment, ProviderSpec

    gateway = Target(Deployment("m", "lunar", "m", None), ProviderSpec("lunar", "openai", "x"), "x")
    assert adapter.stream_translator(gateway).feed(data)[0].provider == "SomeHost"
    assert adapter.parse_response(json.dumps(whole).encode(), gateway).provider == "SomeHost"
