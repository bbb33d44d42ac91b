"""The fault matrix: every emulator fault x client (sync; async on Lunar's pool; async on a
caller's httpx client) x stream/non-stream -> what a user sees.

Faults are scripted on the emulator (real sockets). Before the first chunk reaches the
caller a failure may be retried or fall back; after it, it raises in the caller's loop.
"""

from __future__ import annotations

import inspect
import json
import traceback

import httpx
import pytest

from lunar import (
    APIConnectionError,
    APITimeoutError,
    AsyncLunar,
    AuthenticationError,
    BadRequestError,
    Lunar,
    LunarError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
)
from lunar._errors import Attempt
from lunar._request import validate_messages
from lunar.testing import Reply

from .conftest import busy_connections, cyclic_garbage

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
FAST = {"max_retries": 0, "timeout": 2.0}


async def run(mode: str, *, stream: bool, client_kw: dict, **kw):
    """Run one request in ``mode`` (sync/async); return (chunks or completion, client)."""
    if mode == "sync":
        client = Lunar(**client_kw)
        result = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=stream, **kw
        )
        return (list(result) if stream else result), client
    if mode == "async-httpx":  # a caller's own httpx client instead of Lunar's pool
        http = httpx.AsyncClient(timeout=client_kw.get("timeout", 600.0))
        aclient = AsyncLunar(**client_kw, http_client=http)
    else:
        aclient = AsyncLunar(**client_kw)
    result = await aclient.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=stream, **kw
    )
    if stream:
        return [c async for c in result], aclient
    return result, aclient


def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


MODES = pytest.mark.parametrize("mode", ["sync", "async", "async-httpx"])

# Faults a stream survives: the same text, usage and finish as a clean stream.
HARMLESS = {
    "slow_trickle": Reply(chunks=6, pacing=0.01),
    "crlf_framing": Reply(chunks=6, crlf=True),
    "cr_framing": Reply(chunks=6, cr=True),
    "comments_keepalives": Reply(chunks=6, comments=True),
    "bytes_one_at_a_time": Reply(chunks=6, split_bytes=True),
    "short_stall": Reply(chunks=6, stall_after=2, stall=0.2),
    "delay_before_first_byte": Reply(chunks=6, delay=0.2),
}


@MODES
@pytest.mark.parametrize("fault", list(HARMLESS))
async def test_harmless_faults_give_the_clean_result(mock, mode, fault):
    mock.default = Reply(chunks=6)
    clean, _ = await run(mode, stream=True, client_kw=FAST)
    mock.enqueue(HARMLESS[fault])
    chunks, client = await run(mode, stream=True, client_kw=FAST)
    assert text_of(chunks) == text_of(clean)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == 6
    assert busy_connections(client) == 0


# Faults after the first chunk reached the caller: they raise in the caller's loop, never a
# silent end, and nothing falls back (the fallback model is never asked).
AFTER_FIRST_CHUNK = {
    "cut": (Reply(chunks=8, cut_after=2), APIConnectionError),
    "ends_without_done": (Reply(chunks=8, end_after=2), APIConnectionError),
    "malformed_sse": (Reply(chunks=8, malformed_after=2), StreamError),
    "error_event": (Reply(chunks=8, error_after=2), ServerError),
    "rate_limit_event": (
        Reply(chunks=8, error_after=2, error_type="rate_limit_error"),
        RateLimitError,
    ),
    "stall_beyond_timeout": (Reply(chunks=8, stall_after=2, stall=3.0), APITimeoutError),
}


@MODES
@pytest.mark.parametrize("fault", list(AFTER_FIRST_CHUNK))
async def test_fault_after_first_chunk_raises_in_caller_loop(mock, mode, fault):
    reply, error = AFTER_FIRST_CHUNK[fault]
    mock.enqueue(reply, model="gpt-4o-mini")
    seen = []
    client_kw = {"max_retries": 2, "timeout": 1.0}
    if mode == "sync":
        client = Lunar(**client_kw)
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, fallbacks=["llama-3.1-8b"]
        )
        with pytest.raises(error) as info:
            for chunk in stream:
                seen.append(chunk)
    else:
        client = AsyncLunar(**client_kw)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, fallbacks=["llama-3.1-8b"]
        )
        with pytest.raises(error) as info:
            async for chunk in stream:
                seen.append(chunk)
    assert text_of(seen)  # the caller got content first
    assert all(c.choices[0].finish_reason is None for c in seen)  # never a clean stop
    assert [r.json["model"] for r in mock.requests] == ["gpt-4o-mini"]  # no fallback, no retry
    assert [a.provider for a in info.value.attempts] == ["openai"]
    assert busy_connections(client) == 0


# The same faults before the first chunk: the next candidate answers.
BEFORE_FIRST_CHUNK = {
    "status_429": Reply(status=429, retry_after=0),
    "status_500": Reply(status=500),
    "status_503": Reply(status=503),
    "cut": Reply(cut_after=0),
    "ends_without_done": Reply(end_after=0),
    "malformed_sse": Reply(malformed_after=0),
    "error_event": Reply(error_after=0),
    "delay_beyond_timeout": Reply(delay=3.0),
    "stall_beyond_timeout": Reply(stall_after=0, stall=3.0),
}


@MODES
@pytest.mark.parametrize("fault", list(BEFORE_FIRST_CHUNK))
async def test_stream_falls_back_before_first_chunk(mock, mode, fault):
    mock.enqueue(BEFORE_FIRST_CHUNK[fault], model="gpt-4o-mini")
    chunks, client = await run(
        mode, stream=True, client_kw={"max_retries": 0, "timeout": 1.0}, fallbacks=["llama-3.1-8b"]
    )
    assert {c.provider for c in chunks} == {"groq"}
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.total_cost_usd == round(
        chunks[-1].usage.prompt_tokens * 0.05 / 1e6
        + chunks[-1].usage.completion_tokens * 0.08 / 1e6,
        10,
    )
    assert [r.json["model"] for r in mock.requests] == ["gpt-4o-mini", "llama-3.1-8b-instant"]
    assert busy_connections(client) == 0


NON_STREAM_FALLBACK = {
    "status_429": Reply(status=429, retry_after=0),
    "status_500": Reply(status=500),
    "status_503": Reply(status=503),
    "delay_beyond_timeout": Reply(delay=3.0),
    "bad_json_body": Reply(status=200, body="<html>oops</html>"),
}


@MODES
@pytest.mark.parametrize("fault", list(NON_STREAM_FALLBACK))
async def test_non_stream_falls_back(mock, mode, fault):
    mock.enqueue(NON_STREAM_FALLBACK[fault], model="gpt-4o-mini")
    done, _ = await run(
        mode, stream=False, client_kw={"max_retries": 0, "timeout": 1.0}, fallbacks=["llama-3.1-8b"]
    )
    assert done.provider == "groq"
    assert done.model == "llama-3.1-8b-instant"
    assert done.usage.total_cost_usd > 0


@MODES
@pytest.mark.parametrize("stream", [True, False])
async def test_retry_after_is_honoured_then_succeeds(mock, mode, stream):
    mock.enqueue(Reply(status=429, retry_after_ms=50), Reply(status=503, retry_after=0))
    result, _ = await run(mode, stream=stream, client_kw={"max_retries": 2})
    assert len(mock.requests) == 3
    final = result[-1] if stream else result
    assert final.usage.total_cost_usd > 0


@MODES
@pytest.mark.parametrize("stream", [True, False])
async def test_rate_limit_error_carries_retry_after(mock, mode, stream):
    mock.enqueue(Reply(status=429, retry_after=7))
    with pytest.raises(RateLimitError) as info:
        await run(mode, stream=stream, client_kw=FAST)
    assert info.value.retry_after == 7.0
    assert str(info.value).startswith("[429] ")
    assert info.value.status_code == 429


@MODES
@pytest.mark.parametrize("stream", [True, False])
async def test_server_error_after_retries_is_typed_with_attempts(mock, mode, stream):
    mock.enqueue(*[Reply(status=503, retry_after=0)] * 3)
    with pytest.raises(ServiceUnavailableError) as info:
        await run(mode, stream=stream, client_kw={"max_retries": 2})
    assert isinstance(info.value, ServerError)
    assert len(info.value.attempts) == 3 and len(mock.requests) == 3


@MODES
@pytest.mark.parametrize("stream", [True, False])
async def test_client_errors_do_not_fall_back(mock, mode, stream):
    mock.enqueue(Reply(status=400), model="gpt-4o-mini")
    with pytest.raises(BadRequestError):
        await run(mode, stream=stream, client_kw={"max_retries": 2}, fallbacks=["llama-3.1-8b"])
    assert len(mock.requests) == 1


@MODES
async def test_should_retry_false_is_obeyed(mock, mode):
    mock.enqueue(Reply(status=500, should_retry=False))
    with pytest.raises(ServerError):
        await run(mode, stream=False, client_kw={"max_retries": 2})
    assert len(mock.requests) == 1


@MODES
@pytest.mark.parametrize("stream", [False, True])
async def test_should_retry_true_retries_a_client_error(mock, mode, stream):
    mock.enqueue(Reply(status=400, should_retry=True, retry_after_ms=10))
    result, _ = await run(mode, stream=stream, client_kw={"max_retries": 2})
    final = result[-1] if stream else result
    assert final.usage.total_cost_usd > 0
    assert len(mock.requests) == 2


@MODES
async def test_a_stream_done_without_a_finish_reason_still_ends_on_a_choice(mock, mode):
    """Some OpenAI-compatible servers end with [DONE] and never say a finish_reason: the
    answer is whole, and the last chunk still has choices[0] (the README's loop indexes it)
    with the usage."""
    event = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}],
    }
    body = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n"
    mock.enqueue(Reply(body=body, headers={"content-type": "text/event-stream"}))
    chunks, _ = await run(mode, stream=True, client_kw={"max_retries": 0})
    assert [c.choices[0].delta.content for c in chunks] == ["Hi", None]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens > 0


@MODES
async def test_connection_refused_falls_back(mock, mode, unused_port):
    client_kw = {
        "max_retries": 1,
        "providers": {"openai": {"base_url": f"http://127.0.0.1:{unused_port}/v1"}},
    }
    chunks, _ = await run(mode, stream=True, client_kw=client_kw, fallbacks=["llama-3.1-8b"])
    assert chunks[-1].provider == "groq"


@MODES
async def test_every_candidate_failing_raises_last_error_with_all_attempts(mock, mode):
    mock.enqueue(Reply(status=503), model="gpt-4o-mini")
    for model in (
        "llama-3.1-8b-instant",
        "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
        "accounts/fireworks/models/llama-v3p1-8b-instruct",
    ):
        mock.enqueue(Reply(status=429, retry_after=0), model=model)
    with pytest.raises(RateLimitError) as info:
        await run(mode, stream=True, client_kw={"max_retries": 0}, fallbacks=["llama-3.1-8b"])
    assert [(a.model, a.provider) for a in info.value.attempts] == [
        ("gpt-4o-mini", "openai"),
        ("llama-3.1-8b", "groq"),
        ("llama-3.1-8b", "together"),
        ("llama-3.1-8b", "fireworks"),
    ]


def test_cyclic_garbage_finds_a_cycle_of_lunars_own():
    """The cycle tests assert that nothing is found: the finder must find one when there
    is. An error raised in Lunar's code and made to hold itself is such a cycle, with
    the frame of Lunar's code in its traceback."""
    with cyclic_garbage() as left:
        try:
            validate_messages([])
        except LunarError as err:
            err.attempts = [Attempt("m", "p", err)]
    assert any(isinstance(o, LunarError) for o in left)
    assert any(inspect.isframe(o) and o.f_code.co_name == "validate_messages" for o in left)


@MODES
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("how", ["retry", "fallback"])
async def test_a_failure_a_retry_or_fallback_hides_leaves_no_reference_cycle(
    mock, mode, stream, how
):
    """A failed attempt is kept in the request's plan; its traceback held the engine's
    frame, which holds the plan: a cycle (with the request's body and, streamed, its
    chunks) after every retry or fallback, even one that served, that only the cyclic GC
    frees. Once an attempt serves, the failed ones' tracebacks go."""
    mock.enqueue(Reply(status=503, retry_after=0), model="gpt-4o-mini")
    kw = {"fallbacks": ["llama-3.1-8b"]} if how == "fallback" else {}
    with cyclic_garbage() as left:
        result, _ = await run(mode, stream=stream, client_kw={"max_retries": 0 if kw else 1}, **kw)
    final = result[-1] if stream else result
    assert final.provider == ("groq" if kw else "openai")
    assert left == []


@MODES
@pytest.mark.parametrize("stream", [True, False])
async def test_a_retry_inside_the_callers_except_leaves_the_callers_exception_whole(
    mock, mode, stream
):
    """Called while the caller handles an exception, the engine's errors chain to it (their
    ``__context__``). Dropping the failed attempts' tracebacks stops there: the caller's
    exception keeps its traceback, and its own context keeps theirs."""
    mock.enqueue(Reply(status=503, retry_after=0), model="gpt-4o-mini")
    context = LookupError("its context")
    try:
        raise context
    except LookupError:
        pass
    try:
        raise ValueError("the caller's own")
    except ValueError as own:
        own.__context__ = context
        result, _ = await run(mode, stream=stream, client_kw={"max_retries": 1})
        assert own.__traceback__ is not None
    assert context.__traceback__ is not None
    final = result[-1] if stream else result
    assert final.usage.total_cost_usd > 0  # served, by the retry
    assert len(mock.requests) == 2


@MODES
async def test_a_provider_without_a_key_fails_each_request_with_an_error_of_its_own(mode):
    """A provider with no key fails the request before any HTTP. That error was made once
    and kept: raised again by every request, its traceback grew by each raise (the frames
    of every request so far, and what they held), and its ``attempts`` were shared."""
    errors = []
    client = Lunar() if mode == "sync" else AsyncLunar()
    for _ in range(3):
        with pytest.raises(AuthenticationError) as info:
            done = client.chat.completions.create(model="claude-3-haiku", messages=MESSAGES)
            if mode != "sync":
                await done
        errors.append(info.value)
    assert len({id(e) for e in errors}) == 3
    assert len({len(traceback.extract_tb(e.__traceback__)) for e in errors}) == 1
    assert [[a.error for a in e.attempts] for e in errors] == [[e] for e in errors]


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_provider_that_keeps_failing_cools_down_and_traffic_moves(mock):
    """llama-3.1-8b is on Groq, Together and Fireworks: after Groq fails with 503 three
    times, the client stops asking it first (circuit breaker) and Together answers."""
    groq, together = "llama-3.1-8b-instant", "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"
    mock.enqueue(*[Reply(status=503)] * 3, model=groq)
    client = Lunar(max_retries=0)
    for _ in range(3):
        done = client.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
        assert done.provider == "together"
    mock.reset()
    done = client.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES)
    assert done.provider == "together"
    assert [r.json["model"] for r in mock.requests] == [together]  # Groq was not asked


@MODES
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_per_request_httpx_timeout_is_taken_and_its_read_field_applies(mock, mode, stream):
    """``timeout=httpx.Timeout(...)`` per request, as the openai SDK takes it, on every
    client: a generous one serves; a short ``read`` times out well before the server's delay
    (Lunar's pool maps ``read``, ``connect`` and ``pool``)."""
    kw = {"max_retries": 0}
    result, _ = await run(mode, stream=stream, client_kw=kw, timeout=httpx.Timeout(5.0))
    assert text_of(result) if stream else result.choices[0].message.content
    mock.enqueue(Reply(delay=3.0), model="gpt-4o-mini")
    with pytest.raises(APITimeoutError):
        await run(mode, stream=stream, client_kw=kw, timeout=httpx.Timeout(30.0, read=0.3))


# Answers of status 200 whose JSON is not of the wire's shape (a misbehaving upstream or a
# proxy in the way), one per wire and mode: (model, reply, stream).
_SSE = {"content-type": "text/event-stream"}
_CHUNK = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
MISSHAPEN = {
    "openai_choices_not_a_list": ("gpt-4o-mini", Reply(body={"choices": "x"}), False),
    "openai_message_not_an_object": (
        "gpt-4o-mini",
        Reply(body={"choices": [{"message": "x"}]}),
        False,
    ),
    "openai_stream_choice_not_an_object": (
        "gpt-4o-mini",
        Reply(body=f"data: {json.dumps({**_CHUNK, 'choices': [1]})}\n\n", headers=_SSE),
        True,
    ),
    "openai_stream_tool_calls_not_a_list": (
        "gpt-4o-mini",
        Reply(
            body="data: "
            + json.dumps({**_CHUNK, "choices": [{"index": 0, "delta": {"tool_calls": 5}}]})
            + "\n\n",
            headers=_SSE,
        ),
        True,
    ),
    "anthropic_content_not_a_list": (
        "claude-3-haiku",
        Reply(body={"type": "message", "content": [1]}),
        False,
    ),
    "anthropic_stream_delta_not_an_object": (
        "claude-3-haiku",
        Reply(
            body='event: content_block_delta\ndata: {"type":"content_block_delta",'
            '"index":0,"delta":"x"}\n\n',
            headers=_SSE,
        ),
        True,
    ),
    "gemini_candidates_not_a_list": ("gemini-2.0-flash", Reply(body={"candidates": "x"}), False),
    "gemini_stream_part_not_an_object": (
        "gemini-2.0-flash",
        Reply(body='data: {"candidates":[{"content":{"parts":[1]}}]}\n\n', headers=_SSE),
        True,
    ),
}


@MODES
@pytest.mark.parametrize("case", list(MISSHAPEN))
async def test_a_misshapen_answer_is_a_typed_error_that_falls_back(mock, monkeypatch, mode, case):
    """A 200 whose JSON has the wrong shape (``choices`` not a list, an event's ``delta`` a
    string …) raised the parser's AttributeError or TypeError from deep inside: no typed
    error, and no fallback although another model would have answered. It is the
    provider's fault, as invalid JSON is: a 5xx-like error, retried and fallen back from."""
    model, reply, stream = MISSHAPEN[case]
    for name in ("ANTHROPIC", "GEMINI"):
        monkeypatch.setenv(f"{name}_API_KEY", "k")
        monkeypatch.setenv(f"{name}_BASE_URL", mock.url)
    mock.enqueue(reply, reply)
    client = Lunar(max_retries=0) if mode == "sync" else AsyncLunar(max_retries=0)
    if mode == "async-httpx":
        client = AsyncLunar(max_retries=0, http_client=httpx.AsyncClient())

    async def ask(**kw):
        result = client.chat.completions.create(model=model, messages=MESSAGES, stream=stream, **kw)
        if mode != "sync":
            result = await result
        if stream:
            return [c async for c in result] if mode != "sync" else list(result)
        return result

    with pytest.raises(LunarError) as info:
        await ask()
    assert isinstance(info.value, (ServerError, StreamError))
    assert info.value.provider == case.split("_")[0]  # who misbehaved, named
    assert info.value.provider in str(info.value) and busy_connections(client) == 0
    result = await ask(fallbacks=["llama-3.1-8b"])
    assert (result[-1] if stream else result).provider == "groq"


NOT_A_STREAM = {
    "html_page": (
        Reply(
            body="<html><body>Please log in</body></html>",
            headers={"content-type": "text/html"},
        ),
        "answered a stream request with text/html, not an event stream: '<html><body>Please",
    ),
    "whole_answer": (
        Reply(body={"id": "x", "object": "chat.completion", "choices": []}),
        "answered a stream request with application/json, not an event stream: '{",
    ),
    "error_with_200": (
        Reply(body={"error": {"message": "model overloaded", "type": "server_error"}}),
        "model overloaded (provider: openai)",
    ),
}


@MODES
@pytest.mark.parametrize("case", list(NOT_A_STREAM))
async def test_a_stream_request_answered_without_a_stream_says_what_came(mock, mode, case):
    """A 200 with a web page or a JSON body answering ``stream=True`` raised "the stream
    ended before it was complete": true, but no clue. Now the error shows what came (or the
    provider's own error message), and is still a provider fault that falls back."""
    reply, said = NOT_A_STREAM[case]
    mock.enqueue(reply, model="gpt-4o-mini")
    client = Lunar(max_retries=0) if mode == "sync" else AsyncLunar(max_retries=0)
    if mode == "async-httpx":
        client = AsyncLunar(max_retries=0, http_client=httpx.AsyncClient())

    async def ask(**kw):
        result = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, **kw
        )
        if mode == "sync":
            return list(result)
        return [c async for c in await result]

    with pytest.raises(ServerError) as info:
        await ask()
    assert info.value.status_code == 502 and info.value.provider == "openai"
    assert said in info.value.message and busy_connections(client) == 0
    mock.enqueue(reply, model="gpt-4o-mini")
    chunks = await ask(fallbacks=["llama-3.1-8b"])
    assert chunks[-1].provider == "groq" and chunks[-1].choices[0].finish_reason == "stop"


@MODES
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
async def test_a_provider_is_timed_by_its_own_attempt_not_the_ones_before_it(
    mock, monkeypatch, mode, stream
):
    """Health ranks a model's providers by their p50 time to first token. The time a
    request lost before an attempt (another provider failing, a Retry-After wait) is not
    the serving provider's: counted, a fallback that answered at once looked as slow as
    the outage it covered for, and fell behind providers that are slower. The caller's
    ``ttft_ms`` still counts from the call. (A fake clock that only the waits move.)"""
    import types

    import lunar._engine as engine

    clock = [1000.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    async def asleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(engine, "_now", lambda: clock[0])
    monkeypatch.setattr(engine, "time", types.SimpleNamespace(sleep=sleep, time=engine.time.time))
    monkeypatch.setattr(engine, "asyncio", types.SimpleNamespace(sleep=asleep))
    groq, together = "llama-3.1-8b-instant", "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"
    mock.enqueue(Reply(status=429, retry_after=20), Reply(status=503, retry_after=0), model=groq)
    if mode == "sync":
        client = Lunar(max_retries=1)
    else:
        http = httpx.AsyncClient() if mode == "async-httpx" else None
        client = AsyncLunar(max_retries=1, http_client=http)
    result = client.chat.completions.create(model="llama-3.1-8b", messages=MESSAGES, stream=stream)
    if mode != "sync":
        result = await result
    if stream:
        result = list(result) if mode == "sync" else [c async for c in result]
    final = result[-1] if stream else result
    assert final.provider == "together"
    assert [r.json["model"] for r in mock.requests] == [groq, groq, together]
    assert final.usage.ttft_ms >= 20_000  # the caller waited through Groq's Retry-After
    health = client._settings.router.health
    [served] = [d for d in client.catalog.resolve("llama-3.1-8b") if d.provider == "together"]
    assert health.snapshot(served)["ttft_p50"] < 20_000  # together answered at once
