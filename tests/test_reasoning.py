"""Reasoning ("thinking") through the SDK, against the emulator over real sockets: asked with
``reasoning_effort`` or Lunar's ``thinking``, and given back as ``message.reasoning_content``
(``delta.reasoning_content`` streamed), ``thinking_blocks`` and ``usage.reasoning_tokens``,
from Anthropic's thinking blocks, Gemini's thought parts and OpenAI-compatible servers'
``reasoning_content`` / ``reasoning``."""

from __future__ import annotations

from typing import Any

import pytest

from lunar import BadRequestError, Lunar
from lunar._catalog import Catalog
from lunar._streaming import ChatAccumulator
from lunar.testing import MockServer, Reply
from lunar.testing._anthropic import thinking_signature

FAST: dict[str, Any] = {"max_retries": 0, "timeout": 5.0}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
THOUGHT = "The user wants the weather so I call the tool"  # 10 words: 10 tokens
STREAMS = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture
def mock(mock: MockServer, monkeypatch: pytest.MonkeyPatch) -> MockServer:
    for name, key in (("ANTHROPIC", "sk-ant"), ("GEMINI", "g"), ("DEEPSEEK", "sk-ds")):
        monkeypatch.setenv(f"{name}_API_KEY", key)
        monkeypatch.setenv(f"{name}_BASE_URL", mock.base_url if name == "DEEPSEEK" else mock.url)
    return mock


def answer(stream: bool, **kw: Any) -> Any:
    """The whole answer (a stream's chunks put together), and the chunks (or None)."""
    kw.setdefault("messages", QUESTION)
    result = Lunar(**FAST).chat.completions.create(stream=stream, **kw)
    if not stream:
        return result, None
    chunks = list(result)
    acc = ChatAccumulator()
    for chunk in chunks:
        acc.add(chunk)
    return acc.completion(), chunks


# -- OpenAI-compatible servers ---------------------------------------------------------------


@STREAMS
@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_openai_compatible_reasoning(mock: MockServer, stream: bool, field: str) -> None:
    mock.enqueue(Reply(chunks=4, reasoning=THOUGHT, reasoning_field=field))
    done, chunks = answer(stream, model="deepseek-reasoner")
    message = done.choices[0].message
    assert message.reasoning_content == THOUGHT
    assert message.content == "Once upon a time"
    assert done.usage.reasoning_tokens == 10 and done.usage.completion_tokens == 14
    assert done.usage.completion_tokens_details.reasoning_tokens == 10
    assert message.to_dict()["reasoning_content"] == THOUGHT
    if chunks is not None:
        pieces = [c.choices[0].delta.reasoning_content for c in chunks if c.choices]
        assert "".join(p for p in pieces if p) == THOUGHT and len([p for p in pieces if p]) == 10
        # Reasoning first, then the answer.
        first_text = next(i for i, c in enumerate(chunks) if c.choices[0].delta.content)
        assert all(not c.choices[0].delta.reasoning_content for c in chunks[first_text:])


def test_no_reasoning_no_field(mock: MockServer) -> None:
    """Without reasoning the answer is as before: no reasoning_content key in the JSON."""
    mock.enqueue(Reply(chunks=3))
    done, _ = answer(False, model="deepseek-chat")
    assert done.choices[0].message.reasoning_content is None
    assert "reasoning_content" not in done.choices[0].message.to_dict()
    assert "thinking_blocks" not in done.choices[0].message.to_dict()


def test_reasoning_sent_back_is_left_out_for_openai_servers(mock: MockServer) -> None:
    """DeepSeek refuses its own reasoning_content in a request; OpenAI an unknown field."""
    mock.enqueue(Reply(chunks=2, reasoning=THOUGHT))
    done, _ = answer(False, model="deepseek-reasoner")
    history = [*QUESTION, done.choices[0].message, {"role": "user", "content": "Thanks"}]
    Lunar(**FAST).chat.completions.create(model="deepseek-reasoner", messages=history)
    sent = mock.requests[-1].json["messages"][1]
    assert sent == {"role": "assistant", "content": done.choices[0].message.content}


def test_thinking_to_openai_is_its_reasoning_effort(mock: MockServer) -> None:
    client = Lunar(**FAST)
    thinking = {"type": "enabled", "budget_tokens": 5000}
    client.chat.completions.create(model="o4-mini", messages=QUESTION, thinking=thinking)
    sent = mock.requests[-1].json
    assert "thinking" not in sent and sent["reasoning_effort"] == "medium"
    # Another OpenAI-compatible server gets it as given (DeepSeek, GLM and Kimi take it).
    client.chat.completions.create(model="deepseek-chat", messages=QUESTION, thinking=thinking)
    assert mock.requests[-1].json["thinking"] == thinking


def test_a_model_that_does_not_reason_is_sent_no_reasoning_fields(mock: MockServer) -> None:
    """A fallback to a model the catalogue does not mark ``reasoning`` (gpt-4o-mini, Claude
    3.5 Haiku, Gemini 2.0 Flash) answers without them, as it would have without the field:
    such models refuse ``reasoning_effort`` / ``thinking``. A model the catalogue does not
    know is sent them (the caller's choice)."""
    for primary, fallback, provider_model in (
        ("o4-mini", "gpt-4o-mini", "gpt-4o-mini"),
        ("claude-sonnet-4", "claude-3-5-haiku", "claude-3-5-haiku-20241022"),
        ("gemini-2.5-flash", "gemini-2.0-flash", "gemini-2.0-flash"),
    ):
        mock.reset()
        for asked in (
            {"reasoning_effort": "low"},
            {"thinking": {"type": "enabled", "budget_tokens": 2048}},
        ):
            mock.enqueue(Reply(status=503), model=mock_model(primary))
            done = Lunar(**FAST).chat.completions.create(
                model=primary, fallbacks=[fallback], messages=QUESTION, **asked
            )
            assert done.model == provider_model
            first, sent = mock.requests[-2].json, mock.requests[-1].json
            assert any(
                k in first or k in first.get("generationConfig", {})
                for k in ("reasoning_effort", "thinking", "thinkingConfig")
            )
            assert not {"reasoning_effort", "thinking"} & set(sent)
            assert "thinkingConfig" not in sent.get("generationConfig", {})
    Lunar(**FAST).chat.completions.create(
        model="anthropic/claude-next", messages=QUESTION, reasoning_effort="low"
    )
    assert mock.requests[-1].json["thinking"] == {"type": "enabled", "budget_tokens": 1024}


def mock_model(name: str) -> str:
    """The provider's id of a catalogue model, as the emulator's script keys it."""
    return Catalog.load().resolve(name)[0].provider_model


# -- Anthropic ---------------------------------------------------------------------------------


@STREAMS
def test_anthropic_thinking_from_reasoning_effort(mock: MockServer, stream: bool) -> None:
    mock.enqueue(Reply(chunks=3, reasoning=THOUGHT), model="claude-3-7-sonnet-20250219")
    done, chunks = answer(stream, model="claude-3-7-sonnet", reasoning_effort="low")
    sent = mock.requests[-1].json
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["max_tokens"] == 8192  # the model's own, over the budget
    message = done.choices[0].message
    assert message.reasoning_content == THOUGHT and message.content == "Once upon a"
    assert message.thinking_blocks == [
        {"type": "thinking", "thinking": THOUGHT, "signature": thinking_signature(THOUGHT)}
    ]
    assert done.usage.completion_tokens == 13  # Anthropic's output counts the thinking
    if chunks is not None:
        signed = [c.choices[0].delta.thinking_blocks for c in chunks if c.choices]
        assert [b for b in signed if b] == [
            [{"type": "thinking", "signature": thinking_signature(THOUGHT)}]
        ]


def test_anthropic_budget_raises_max_tokens_when_not_given(mock: MockServer) -> None:
    Lunar(**FAST).chat.completions.create(
        model="claude-3-7-sonnet", messages=QUESTION, reasoning_effort="high"
    )
    sent = mock.requests[-1].json
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 24576}
    assert sent["max_tokens"] == 24576 + 4096


def test_anthropic_effort_budget_fits_under_a_given_max_tokens(mock: MockServer) -> None:
    Lunar(**FAST).chat.completions.create(
        model="claude-3-7-sonnet", messages=QUESTION, reasoning_effort="medium", max_tokens=4000
    )
    sent = mock.requests[-1].json
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    assert sent["max_tokens"] == 4000


def test_anthropic_effort_none_disables_thinking(mock: MockServer) -> None:
    mock.enqueue(Reply(chunks=2, reasoning=THOUGHT), model="claude-3-7-sonnet-20250219")
    done, _ = answer(False, model="claude-3-7-sonnet", reasoning_effort="none")
    assert mock.requests[-1].json["thinking"] == {"type": "disabled"}
    assert done.choices[0].message.reasoning_content is None


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        (
            {"thinking": {"type": "enabled", "budget_tokens": 4000}, "max_tokens": 4000},
            "thinking.budget_tokens",
        ),
        ({"thinking": {"type": "enabled", "budget_tokens": 500}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "on"}}, "thinking.type"),
        ({"thinking": "yes"}, "thinking"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"reasoning_effort": "medium", "max_tokens": 1500}, "reasoning_effort"),
        (
            {
                "messages": [
                    *QUESTION,
                    {
                        "role": "assistant",
                        "content": "x",
                        "thinking_blocks": [{"type": "thinking", "thinking": "t"}],
                    },
                ]
            },
            "messages[1].thinking_blocks[0].signature",
        ),
    ],
)
def test_bad_reasoning_asks_name_the_field(
    mock: MockServer, kw: dict[str, Any], param: str
) -> None:
    kw.setdefault("messages", QUESTION)
    with pytest.raises(BadRequestError) as caught:
        Lunar(**FAST).chat.completions.create(model="claude-3-7-sonnet", **kw)
    assert caught.value.param == param, caught.value
    assert param in str(caught.value)
    assert not mock.requests  # refused before anything was sent


@STREAMS
def test_anthropic_tool_use_with_thinking_round_trips_the_signature(
    mock: MockServer, stream: bool
) -> None:
    """Claude wants its signed thinking back on the turn of its calls: the answer's message,
    sent back as it came, carries it (the emulator checks the signature and the order)."""
    model = "claude-3-7-sonnet-20250219"
    mock.enqueue(Reply(reasoning=THOUGHT), model=model)
    kw: dict[str, Any] = {
        "model": "claude-3-7-sonnet",
        "tools": TOOLS,
        "thinking": {"type": "enabled", "budget_tokens": 2000},
        "max_tokens": 6000,
    }
    done, _ = answer(stream, **kw)
    message = done.choices[0].message
    assert message.tool_calls and message.thinking_blocks
    call = message.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    mock.enqueue(Reply(chunks=2, reasoning="It is sunny"), model=model)
    done2, _ = answer(stream, messages=[*QUESTION, message, result], **kw)
    assert done2.choices[0].message.content == "Once upon"
    sent = mock.requests[-1].json["messages"][1]["content"]
    assert sent[0] == {
        "type": "thinking",
        "thinking": THOUGHT,
        "signature": thinking_signature(THOUGHT),
    }
    assert sent[1]["type"] == "tool_use"
    # Without its thinking the same turn is refused, as Anthropic refuses it.
    bare = {"role": "assistant", "content": None, "tool_calls": [call.to_dict()]}
    with pytest.raises(BadRequestError, match="must start with a thinking block"):
        answer(stream, messages=[*QUESTION, bare, result], **kw)


def test_anthropic_redacted_thinking_round_trips(mock: MockServer) -> None:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-7-sonnet-20250219",
        "content": [
            {"type": "redacted_thinking", "data": "ENCRYPTED"},
            {"type": "text", "text": "Hi"},
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 5},
    }
    mock.enqueue(Reply(body=body), model="claude-3-7-sonnet-20250219")
    done, _ = answer(False, model="claude-3-7-sonnet", reasoning_effort="low")
    message = done.choices[0].message
    assert message.thinking_blocks == [{"type": "redacted_thinking", "data": "ENCRYPTED"}]
    assert message.reasoning_content == "" and message.content == "Hi"
    history = [*QUESTION, message, {"role": "user", "content": "More"}]
    Lunar(**FAST).chat.completions.create(model="claude-3-7-sonnet", messages=history)
    assert mock.requests[-1].json["messages"][1]["content"][0] == {
        "type": "redacted_thinking",
        "data": "ENCRYPTED",
    }


# -- Gemini ------------------------------------------------------------------------------------


@STREAMS
def test_gemini_thoughts(mock: MockServer, stream: bool) -> None:
    mock.enqueue(Reply(chunks=3, reasoning=THOUGHT), model="gemini-2.5-flash")
    done, chunks = answer(stream, model="gemini-2.5-flash", reasoning_effort="medium")
    config = mock.requests[-1].json["generationConfig"]
    assert config["thinkingConfig"] == {"thinkingBudget": 8192, "includeThoughts": True}
    message = done.choices[0].message
    assert message.reasoning_content == THOUGHT and message.content == "Once upon a"
    assert message.thinking_blocks is None
    assert done.usage.reasoning_tokens == 10 and done.usage.completion_tokens == 13
    if chunks is not None:
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.reasoning_content) == 10


def test_gemini_thinking_budget_and_none(mock: MockServer) -> None:
    client = Lunar(**FAST)
    thinking = {"type": "enabled", "budget_tokens": 3000}
    client.chat.completions.create(model="gemini-2.5-flash", messages=QUESTION, thinking=thinking)
    config = mock.requests[-1].json["generationConfig"]
    assert config["thinkingConfig"] == {"thinkingBudget": 3000, "includeThoughts": True}
    mock.enqueue(Reply(chunks=2, reasoning=THOUGHT), model="gemini-2.5-flash")
    done = client.chat.completions.create(
        model="gemini-2.5-flash", messages=QUESTION, reasoning_effort="none"
    )
    config = mock.requests[-1].json["generationConfig"]
    assert config["thinkingConfig"] == {"thinkingBudget": 0}
    assert done.choices[0].message.reasoning_content is None
    # Nothing asked: no thinkingConfig (the model's default), no thoughts.
    client.chat.completions.create(model="gemini-2.5-flash", messages=QUESTION)
    assert "thinkingConfig" not in mock.requests[-1].json.get("generationConfig", {})


@STREAMS
def test_reasoning_counts_in_an_estimated_output(mock: MockServer, stream: bool) -> None:
    """No usage on the wire: the estimate counts the reasoning too (it is billed output)."""
    mock.enqueue(Reply(chunks=3, reasoning=THOUGHT, usage=False), model="gemini-2.5-flash")
    done, _ = answer(stream, model="gemini-2.5-flash", reasoning_effort="low")
    text = done.choices[0].message.content
    assert done.choices[0].message.reasoning_content == THOUGHT
    assert done.usage.completion_tokens == (len(THOUGHT) + len(text) + 3) // 4
