"""Usage and cost as each provider bills them: tokens counted where each wire puts them,
every token priced once, at the price of what it was (input, cached input, output)."""

from __future__ import annotations

import json

import pytest

from lunar import Lunar
from lunar.testing import MockServer, Reply

MESSAGES = [{"role": "user", "content": "Hi"}]


def cost(tokens: int, price: float) -> float:
    return round(tokens * price / 1e6, 10)


@pytest.fixture
def deepseek(mock: MockServer, monkeypatch: pytest.MonkeyPatch) -> MockServer:
    monkeypatch.setenv("DEEPSEEK_API_KEY", "sk-ds")
    monkeypatch.setenv("DEEPSEEK_BASE_URL", mock.base_url)
    return mock


def _openai_body(usage: dict) -> dict:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "deepseek-chat",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }


def _openai_stream(usage: dict) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-chat"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**chunk, "choices": [], "usage": usage},
    ]
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


# DeepSeek's usage: its cache hits in its own field, not in prompt_tokens_details.
DEEPSEEK_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 10,
    "total_tokens": 1010,
    "prompt_cache_hit_tokens": 800,
    "prompt_cache_miss_tokens": 200,
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_deepseek_cache_hits_are_billed_at_the_cached_price(deepseek, stream):
    body = _openai_stream(DEEPSEEK_USAGE) if stream else _openai_body(DEEPSEEK_USAGE)
    headers = {"content-type": "text/event-stream"} if stream else {}
    deepseek.enqueue(Reply(body=body, headers=headers), model="deepseek-chat")
    with Lunar(max_retries=0) as client:
        result = client.chat.completions.create(
            model="deepseek-chat", messages=MESSAGES, stream=stream
        )
        usage = list(result)[-1].usage if stream else result.usage
    assert (usage.prompt_tokens, usage.cached_tokens, usage.total_tokens) == (1000, 800, 1010)
    assert usage.prompt_tokens_details.cached_tokens == 800
    assert usage.input_cost_usd == cost(200, 0.27)
    assert usage.cached_input_cost_usd == cost(800, 0.07)
    assert usage.output_cost_usd == cost(10, 1.10)


@pytest.fixture
def providers(mock: MockServer, monkeypatch: pytest.MonkeyPatch) -> MockServer:
    """The emulator as OpenAI and co., Anthropic and Gemini."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", mock.url)
    monkeypatch.setenv("GEMINI_API_KEY", "g")
    monkeypatch.setenv("GEMINI_BASE_URL", mock.url)
    return mock


def _sse(events: list[tuple[str | None, dict]]) -> bytes:
    out = b""
    for name, obj in events:
        out += f"event: {name}\n".encode() if name else b""
        out += b"data: " + json.dumps(obj).encode() + b"\n\n"
    return out


def _ask(model: str, stream: bool, reply: Reply, mock: MockServer, provider_model: str):
    headers = {"content-type": "text/event-stream"} if stream else {}
    mock.enqueue(reply.replace(headers=headers), model=provider_model)
    with Lunar(max_retries=0) as client:
        result = client.chat.completions.create(model=model, messages=MESSAGES, stream=stream)
        return list(result)[-1].usage if stream else result.usage


# Gemini: thoughts and tool-use prompt tokens are counted apart from the candidates and
# the prompt, and billed as output and input; totalTokenCount adds them all.
GEMINI_USAGE = {
    "promptTokenCount": 100,
    "cachedContentTokenCount": 40,
    "candidatesTokenCount": 10,
    "thoughtsTokenCount": 30,
    "toolUsePromptTokenCount": 20,
    "totalTokenCount": 160,
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_gemini_thoughts_and_tool_use_prompt_tokens_are_counted_and_billed(providers, stream):
    candidate = {"content": {"role": "model", "parts": [{"text": "Hi"}]}, "finishReason": "STOP"}
    response = {"candidates": [candidate], "usageMetadata": GEMINI_USAGE}
    body = _sse([(None, response)]) if stream else response
    usage = _ask("gemini-2.5-flash", stream, Reply(body=body), providers, "gemini-2.5-flash")
    assert (usage.prompt_tokens, usage.completion_tokens) == (120, 40)
    assert usage.total_tokens == GEMINI_USAGE["totalTokenCount"]
    assert usage.cached_tokens == 40
    assert usage.completion_tokens_details.reasoning_tokens == 30  # the thoughts, as OpenAI says
    assert usage.input_cost_usd == cost(80, 0.30)
    assert usage.cached_input_cost_usd == cost(40, 0.075)
    assert usage.output_cost_usd == cost(40, 2.50)


# Anthropic: input_tokens counts neither cache reads nor cache writes; writes (5-minute
# cache) cost 1.25x the input price, reads 0.1x.
ANTHROPIC_USAGE = {
    "input_tokens": 50,
    "cache_creation_input_tokens": 1000,
    "cache_read_input_tokens": 2000,
    "output_tokens": 10,
}


def _anthropic(stream: bool, usage: dict, delta: dict | None = None) -> bytes | dict:
    """An answer of Claude's with ``usage``; streamed, its ``message_delta`` says ``delta``
    (default: the output tokens only)."""
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Hi"}],
        "stop_reason": "end_turn",
        "usage": usage,
    }
    if not stream:
        return message
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    return _sse(
        [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "Hi"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                               "usage": delta or {"output_tokens": usage["output_tokens"]}}),
            ("message_stop", {"type": "message_stop"}),
        ]
    )  # fmt: skip


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_cache_writes_are_counted_and_billed_at_the_cache_write_price(providers, stream):
    body = _anthropic(stream, ANTHROPIC_USAGE)
    usage = _ask("claude-sonnet-4-5", stream, Reply(body=body), providers, "claude-sonnet-4-5")
    # As OpenAI counts a prompt: every input token, read, written or neither.
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3050, 10, 3060)
    assert (usage.cached_tokens, usage.cache_write_tokens) == (2000, 1000)
    assert usage.input_cost_usd == round((50 * 3.00 + 1000 * 3.75) / 1e6, 10)
    assert usage.cached_input_cost_usd == cost(2000, 0.30)
    assert usage.output_cost_usd == cost(10, 15.00)
    assert usage.total_cost_usd == round(
        usage.input_cost_usd + usage.cached_input_cost_usd + usage.output_cost_usd, 10
    )
    assert usage.to_dict()["cache_write_tokens"] == 1000


# Anthropic's writes by cache lifetime: to the 1-hour cache at 2x the input price, to the
# 5-minute one at 1.25x. Its message_delta repeats the sums, without the breakdown.
HOUR_WRITES = {"ephemeral_5m_input_tokens": 600, "ephemeral_1h_input_tokens": 400}
HOUR_USAGE = {
    "as sent": ({**ANTHROPIC_USAGE, "cache_creation": HOUR_WRITES}, None),
    "breakdown only": (
        {k: v for k, v in ANTHROPIC_USAGE.items() if k != "cache_creation_input_tokens"}
        | {"cache_creation": HOUR_WRITES},
        None,
    ),
    "sums again at the end": (
        {**ANTHROPIC_USAGE, "cache_creation": HOUR_WRITES},
        dict(ANTHROPIC_USAGE),
    ),
}


@pytest.mark.parametrize("case", list(HOUR_USAGE))
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_1h_cache_writes_are_billed_at_the_1h_price(providers, stream, case):
    usage_sent, delta = HOUR_USAGE[case]
    body = _anthropic(stream, usage_sent, delta)
    usage = _ask("claude-sonnet-4-5", stream, Reply(body=body), providers, "claude-sonnet-4-5")
    assert (usage.prompt_tokens, usage.cached_tokens) == (3050, 2000)
    assert (usage.cache_write_tokens, usage.cache_write_1h_tokens) == (1000, 400)
    # claude-sonnet-4-5: $3 input, $3.75 5-minute write, $6 1-hour write per 1M.
    assert usage.input_cost_usd == round((50 * 3.00 + 600 * 3.75 + 400 * 6.00) / 1e6, 10)
    assert usage.total_cost_usd == round(
        usage.input_cost_usd + usage.cached_input_cost_usd + usage.output_cost_usd, 10
    )
    assert usage.to_dict()["cache_write_1h_tokens"] == 400


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_emulators_1h_cache_writes_are_billed_at_the_1h_price(providers, stream):
    reply = Reply(cached_tokens=20, cache_write_tokens=300, cache_write_1h_tokens=100)
    usage = _ask("claude-haiku-4-5", stream, reply, providers, "claude-haiku-4-5")
    assert (usage.cached_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (
        20,
        300,
        100,
    )
    plain = usage.prompt_tokens - 320
    # claude-haiku-4-5: $1 input, $1.25 5-minute write, $2 1-hour write per 1M.
    assert usage.input_cost_usd == round((plain * 1.00 + 200 * 1.25 + 100 * 2.00) / 1e6, 10)


def test_a_gateways_usage_comes_back_whole_in_remote_mode():
    """Remote mode reads the gateway's usage JSON: every count and cost as it was sent."""
    from lunar._types import Usage

    sent = Usage(3050, 10, None, 2000, 1.5e-4, 6e-4, 1.5e-4, 9e-4, 12.0, 3.0, 1000, 0, 400)
    got = Usage.from_dict(json.loads(json.dumps(sent.to_dict())))
    assert got.to_dict() == sent.to_dict()
    assert (got.cache_write_tokens, got.cache_write_1h_tokens) == (1000, 400)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_reasoning_tokens_are_where_openai_puts_them(mock, stream):
    """`usage.completion_tokens_details.reasoning_tokens`, which code written against the
    openai SDK reads for its reasoning models, was an AttributeError."""
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 50,
        "total_tokens": 60,
        "completion_tokens_details": {"reasoning_tokens": 42},
    }
    body = _openai_stream(usage) if stream else _openai_body(usage)
    headers = {"content-type": "text/event-stream"} if stream else {}
    mock.enqueue(Reply(body=body, headers=headers), model="o3-mini")
    with Lunar(max_retries=0) as client:
        result = client.chat.completions.create(
            model="openai/o3-mini", messages=MESSAGES, stream=stream
        )
        got = list(result)[-1].usage if stream else result.usage
    assert (got.completion_tokens, got.reasoning_tokens) == (50, 42)
    assert got.completion_tokens_details.reasoning_tokens == 42
    out = got.to_dict()
    assert out["completion_tokens_details"] == {"reasoning_tokens": 42}
    assert type(got).from_dict(out).reasoning_tokens == 42  # as remote mode reads it back


def test_a_cut_gemini_stream_whose_first_event_counts_no_prompt_bills_what_streamed():
    """Some Gemini first events say promptTokenCount 0: the prompt's count then comes with
    a later event, after content, and was taken as the final usage of a stream cut short
    (its output count that of the event it came with: 2 tokens of ~100 streamed)."""
    from lunar._catalog import Catalog
    from lunar._engine import Router, StreamFinisher
    from lunar._request import RequestOptions
    from lunar.providers.gemini import GeminiStreamTranslator

    router = Router(Catalog.load(), environ={"GEMINI_API_KEY": "g"})
    target = router.chain(RequestOptions("gemini-2.0-flash", None, None))[0][1]

    def event(text: str, prompt: int, output: int) -> bytes:
        meta = {"promptTokenCount": prompt, "candidatesTokenCount": output}
        obj = {"candidates": [{"content": {"parts": [{"text": text}]}}], "usageMetadata": meta}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    for first_prompt in (0, 12):
        translator = GeminiStreamTranslator(target)
        finisher = StreamFinisher(target, {"messages": [{"role": "user", "content": "x"}]}, 0.0)
        finisher.push(translator.feed(event("Hello", first_prompt, 1)))
        for i in range(100):  # 400 characters more: ~100 tokens
            finisher.push(translator.feed(event(" abc", 12, 2 + i)))
        usage = finisher.seen()  # cut here
        assert usage is not None and usage.prompt_tokens == 12
        assert usage.completion_tokens >= 100, first_prompt


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("asked", "prices"),
    [("priority", (4.25, 17.0)), ("auto", (2.50, 10.0)), (None, (2.50, 10.0))],
)
def test_an_answer_is_billed_at_the_prices_of_the_service_tier_that_served_it(
    mock, stream, asked, prices
):
    """OpenAI bills a ``priority`` answer at its own prices (gpt-4o: 1.7x); the answer's
    ``service_tier`` (in a stream, on the usage chunk) says which tier served it."""
    extra = {} if asked is None else {"service_tier": asked}
    with Lunar(max_retries=0) as client:
        result = client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=stream, **extra
        )
        usage = list(result)[-1].usage if stream else result.usage
    assert mock.requests[-1].json.get("service_tier") == asked
    assert usage.prompt_tokens and usage.completion_tokens
    assert usage.input_cost_usd == cost(usage.prompt_tokens, prices[0])
    assert usage.output_cost_usd == cost(usage.completion_tokens, prices[1])
