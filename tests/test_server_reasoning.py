"""Reasoning through a real gateway (the emulator as OpenAI-compatible, Anthropic and Gemini):
``/v1/messages`` with the official ``anthropic`` SDK (``thinking`` asked, thinking blocks
answered and streamed as Anthropic streams them, signed blocks sent back in a tool-use
conversation), and ``/v1/chat/completions`` with the ``openai`` SDK (``reasoning_content``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import lunar
from lunar.testing import MockServer, Reply
from lunar.testing._anthropic import thinking_signature

from .test_providers_e2e import whole
from .test_server import GatewayProcess, every_wire

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

THOUGHT = "The user wants the weather so I call the tool"  # 10 words
CLAUDE, CLAUDE_ID = "claude-3-7-sonnet", "claude-3-7-sonnet-20250219"
THINKING = {"type": "enabled", "budget_tokens": 2000}
WEATHER = [
    {
        "name": "get_weather",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])


@pytest.fixture(scope="module")
def gw(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = {
        **every_wire(upstream),
        "DEEPSEEK_API_KEY": "sk-ds",
        "DEEPSEEK_BASE_URL": upstream.base_url,
    }
    proc = GatewayProcess(tmp_path_factory.mktemp("gateway"), upstream, **env)
    yield proc
    proc.stop()


pytestmark = pytest.mark.usefixtures("fresh_upstream")


@pytest.fixture(scope="module")
def claude(gw: GatewayProcess) -> Any:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.new_key()[0], max_retries=0)


@pytest.fixture(scope="module")
def oai(gw: GatewayProcess) -> Any:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.new_key()[0], max_retries=0)


def message(client: Any, stream: bool, **kw: Any) -> Any:
    """The answer, streamed or not, as the SDK puts it together; and the stream's events."""
    kw.setdefault("max_tokens", 6000)
    kw.setdefault("messages", QUESTION)
    if not stream:
        return client.messages.create(**kw), None
    with client.messages.stream(**kw) as s:
        events = list(s)
        return s.get_final_message(), events


@STREAMS
def test_thinking_reaches_anthropic_and_comes_back_as_blocks(
    claude: Any, upstream: MockServer, stream: bool
) -> None:
    upstream.enqueue(Reply(chunks=3, reasoning=THOUGHT), model=CLAUDE_ID)
    answer, events = message(claude, stream, model=CLAUDE, thinking=THINKING)
    assert upstream.requests[-1].json["thinking"] == THINKING
    assert [b.type for b in answer.content] == ["thinking", "text"]
    assert answer.content[0].thinking == THOUGHT
    assert answer.content[0].signature == thinking_signature(THOUGHT)
    assert answer.content[1].text == "Once upon a"
    if events is not None:
        kinds = [(e.type, getattr(getattr(e, "delta", None), "type", None)) for e in events]
        assert ("content_block_delta", "thinking_delta") in kinds
        assert kinds.count(("content_block_delta", "signature_delta")) == 1


@STREAMS
def test_multi_turn_tool_use_with_thinking_keeps_the_signature(
    claude: Any, upstream: MockServer, stream: bool
) -> None:
    upstream.enqueue(Reply(reasoning=THOUGHT), model=CLAUDE_ID)
    kw: dict[str, Any] = {"model": CLAUDE, "thinking": THINKING, "tools": WEATHER}
    first, _ = message(claude, stream, **kw)
    assert [b.type for b in first.content] == ["thinking", "tool_use"]
    use = first.content[1]
    history = [
        *QUESTION,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}],
        },
    ]
    upstream.enqueue(Reply(chunks=2), model=CLAUDE_ID)
    second, _ = message(claude, stream, messages=history, **kw)
    assert second.content[-1].text == "Once upon"
    sent = upstream.requests[-1].json["messages"][1]["content"]
    assert sent[0] == {
        "type": "thinking",
        "thinking": THOUGHT,
        "signature": thinking_signature(THOUGHT),
    }
    assert sent[1]["type"] == "tool_use"


@STREAMS
def test_thinking_to_gemini_is_its_thinking_budget(
    claude: Any, upstream: MockServer, stream: bool
) -> None:
    upstream.enqueue(Reply(chunks=2, reasoning=THOUGHT), model="gemini-2.5-flash")
    answer, _ = message(claude, stream, model="gemini-2.5-flash", thinking=THINKING)
    config = upstream.requests[-1].json["generationConfig"]
    assert config["thinkingConfig"] == {"thinkingBudget": 2000, "includeThoughts": True}
    assert [b.type for b in answer.content] == ["thinking", "text"]
    assert answer.content[0].thinking == THOUGHT and answer.content[0].signature == ""
    # Sent back, an unsigned block (another model's) is left out, for any provider.
    history = [
        *QUESTION,
        {"role": "assistant", "content": [b.model_dump() for b in answer.content]},
        {"role": "user", "content": "And tomorrow?"},
    ]
    message(claude, False, model=CLAUDE, messages=history, thinking=THINKING)
    sent = upstream.requests[-1].json["messages"][1]["content"]
    assert [b["type"] for b in sent] == ["text"]


def test_a_budget_over_max_tokens_is_refused_naming_the_field(
    claude: Any, upstream: MockServer
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model=CLAUDE,
            max_tokens=1500,
            messages=QUESTION,
            thinking={"type": "enabled", "budget_tokens": 2000},
        )
    assert "thinking.budget_tokens" in str(caught.value)
    assert not upstream.requests


@STREAMS
def test_chat_completions_carries_reasoning_content(
    oai: Any, upstream: MockServer, stream: bool
) -> None:
    """As DeepSeek and OpenRouter answer: message.reasoning_content, delta.reasoning_content;
    from an OpenAI-compatible upstream (the relay) and from Anthropic (thinking blocks)."""
    for model, upstream_model, extra in (
        ("deepseek-reasoner", "deepseek-reasoner", {}),
        (CLAUDE, CLAUDE_ID, {"reasoning_effort": "low"}),
    ):
        upstream.enqueue(Reply(chunks=4, reasoning=THOUGHT), model=upstream_model)
        kw: dict[str, Any] = {"model": model, "messages": QUESTION, **extra}
        if not stream:
            done = oai.chat.completions.create(**kw)
            msg = done.choices[0].message
            assert msg.model_extra["reasoning_content"] == THOUGHT
            assert msg.content == "Once upon a time"
            continue
        pieces, text = [], []
        for chunk in oai.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                delta = chunk.choices[0].delta
                pieces.append((delta.model_extra or {}).get("reasoning_content") or "")
                text.append(delta.content or "")
        assert "".join(pieces) == THOUGHT, model
        assert "".join(text) == "Once upon a time"


def test_chat_completions_reasoning_tokens(oai: Any, upstream: MockServer) -> None:
    upstream.enqueue(Reply(chunks=4, reasoning=THOUGHT), model="deepseek-reasoner")
    done = oai.chat.completions.create(model="deepseek-reasoner", messages=QUESTION)
    assert done.usage.completion_tokens_details.reasoning_tokens == 10
    assert done.usage.completion_tokens == 14


@STREAMS
def test_remote_mode_tool_use_with_thinking_round_trips(
    gw: GatewayProcess, upstream: MockServer, stream: bool
) -> None:
    """The SDK through the gateway: the answer's thinking_blocks come back from the gateway,
    and the message sent back as it came reaches Claude with its signed thinking first."""
    client = lunar.Lunar(base_url=gw.url + "/v1", api_key=gw.new_key()[0], max_retries=0)
    tools = [
        {"type": "function", "function": {"name": w["name"], "parameters": w["input_schema"]}}
        for w in WEATHER
    ]
    kw: dict[str, Any] = {"model": CLAUDE, "tools": tools, "thinking": THINKING, "max_tokens": 6000}

    def ask(messages: list[Any]) -> Any:
        return whole(client.chat.completions.create(messages=messages, stream=stream, **kw), stream)

    upstream.enqueue(Reply(reasoning=THOUGHT), model=CLAUDE_ID)
    first = ask(QUESTION).choices[0].message
    assert first.reasoning_content == THOUGHT and first.tool_calls
    assert first.thinking_blocks == [
        {"type": "thinking", "thinking": THOUGHT, "signature": thinking_signature(THOUGHT)}
    ]
    result = {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny"}
    upstream.enqueue(Reply(chunks=2), model=CLAUDE_ID)
    second = ask([*QUESTION, first, result])
    assert second.choices[0].message.content == "Once upon"
    sent = upstream.requests[-1].json["messages"][1]["content"]
    assert sent[0]["signature"] == thinking_signature(THOUGHT) and sent[1]["type"] == "tool_use"
