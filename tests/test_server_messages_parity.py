"""What Claude-Code-like agents send to ``/v1/messages`` and read back, through a real gateway
(the emulator as OpenAI, Anthropic and Gemini) with the official ``anthropic`` SDK."""

from __future__ import annotations

from typing import Any

import pytest

from .test_server import GatewayProcess

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("uvicorn")

MODELS = ["gpt-4o-mini", "claude-3-haiku", "gemini-2.0-flash"]
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


pytestmark = pytest.mark.usefixtures("fresh_upstream")


@pytest.fixture(scope="module")
def client(gw: GatewayProcess) -> Any:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.new_key()[0], max_retries=0)


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
READ = [{"name": "Read", "input_schema": {"type": "object"}}]
SCREENSHOT = [
    {"role": "user", "content": "look at the file"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Reading."},
            {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"p": "a.png"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_1",
                "content": [{"type": "text", "text": "a.png:"}, IMAGE],
            },
            {"type": "text", "text": "what is it?"},
        ],
    },
]


def _images(request: Any) -> list[str]:
    """The base64 data of every image the upstream was sent, whatever its wire."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("data", "url") and isinstance(value, str) and PNG in value:
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(request.json)
    return found


@pytest.mark.parametrize("model", MODELS)
def test_an_image_a_tool_returned_reaches_the_model(client, upstream, model):
    """Claude Code's Read tool answers an image as a tool_result image block: the model must
    see it (it was left out, and the model answered about an image it never got)."""
    client.messages.create(model=model, max_tokens=20, messages=SCREENSHOT, tools=READ)
    [request] = upstream.requests
    assert len(_images(request)) == 1
    text = str(request.json)
    assert "a.png:" in text and "what is it?" in text


def test_a_tool_result_block_the_gateway_cannot_carry_is_refused_naming_it(client, upstream):
    doc = {"type": "search_result", "source": "s", "title": "t", "content": []}
    history = [
        *SCREENSHOT[:2],
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [doc]}],
        },
    ]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="gpt-4o-mini", max_tokens=20, messages=history, tools=READ)
    assert "(param: messages[2].content[0].content[0].type)" in info.value.body["error"]["message"]
    assert upstream.requests == []


def test_count_tokens_counts_the_tools_and_the_calls_in_the_history(client):
    """An agent's prompt is mostly its tool definitions and its calls' arguments: an estimate
    that left them out said a nearly full context was nearly empty."""
    hello = [{"role": "user", "content": "hello"}]
    bare = client.messages.count_tokens(model="gpt-4o-mini", messages=hello).input_tokens
    schema = {
        "type": "object",
        "properties": {"path": {"type": "string", "description": "x" * 400}},
    }
    tools = [{"name": "Write", "description": "Writes a file. " * 20, "input_schema": schema}]
    with_tools = client.messages.count_tokens(model="gpt-4o-mini", messages=hello, tools=tools)
    assert with_tools.input_tokens >= bare + (400 + 280) // 4
    use = {"type": "tool_use", "id": "toolu_1", "name": "Write", "input": {"text": "y" * 4000}}
    history = [
        *hello,
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]},
    ]
    counted = client.messages.count_tokens(model="claude-3-haiku", messages=history)
    assert counted.input_tokens >= bare + 1000


PDF = "JVBERi0xLjQK"  # "%PDF-1.4\n"


@pytest.mark.parametrize("model", MODELS)
def test_documents_reach_the_model_in_a_user_turn_and_a_tool_result(client, upstream, model):
    """Claude Code sends a PDF it reads as a base64 ``document`` block, and text as a text
    ``document``: both were refused (400), though every provider takes a PDF."""
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
        "title": "spec.pdf",
    }
    note = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "NB"},
    }
    history = [
        {"role": "user", "content": [pdf, {"type": "text", "text": "summarise"}]},
        SCREENSHOT[1],
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [note]}],
        },
    ]
    client.messages.create(model=model, max_tokens=20, messages=history, tools=READ)
    [request] = upstream.requests
    sent = str(request.json)
    assert PDF in sent and "NB" in sent


def test_a_document_by_url_is_refused_naming_its_source(client, upstream):
    doc = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": [doc]}]
        )
    assert "(param: messages[0].content[0].source)" in info.value.body["error"]["message"]
    assert upstream.requests == []
