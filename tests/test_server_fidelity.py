"""What a provider says beyond OpenAI's shape reaches the gateway's clients, over real sockets
(a gateway process, the emulator as every provider): which stop sequence ended an answer, for
Anthropic clients (``stop_reason: "stop_sequence"``) and OpenAI ones (``choices[].stop_sequence``);
Gemini's thought signatures on tool calls, there and back, for Lunar's SDK in remote mode and
the openai SDK."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from lunar import Lunar
from lunar.testing import MockServer, Reply
from lunar.testing._gemini import thought_signature

from .test_server import GatewayProcess, every_wire

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

HI = [{"role": "user", "content": "Write until END."}]
STOPS = ["END", "STOP"]


@pytest.fixture(scope="module")
def gw(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(tmp_path_factory.mktemp("gateway"), upstream, **every_wire(upstream))
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _fresh(upstream: MockServer) -> None:
    upstream.reset()


@pytest.fixture(scope="module")
def key(gw: GatewayProcess) -> str:
    return gw.new_key()[0]


def anthropic_call(client: Any, stream: bool, **kw: Any) -> tuple[Any, list[Any]]:
    """(the final message, the streamed events: none when not streamed)."""
    if not stream:
        return client.messages.create(**kw), []
    with client.messages.stream(**kw) as events:
        seen = list(events)
        return events.get_final_message(), seen


def ask_anthropic(gw: GatewayProcess, key: str, model: str, stream: bool) -> tuple[Any, Any]:
    """(the final message, the streamed ``message_delta`` event or None)."""
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    message, seen = anthropic_call(
        client, stream, model=model, max_tokens=50, messages=HI, stop_sequences=STOPS
    )
    if not stream:
        return message, None
    [delta] = [e for e in seen if e.type == "message_delta"]
    return message, delta


# -- the stop sequence that matched -------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_client_is_told_which_stop_sequence_matched(gw, key, upstream, stream):
    upstream.enqueue(Reply(finish_reason="stop_sequence"))
    message, delta = ask_anthropic(gw, key, "claude-3-haiku", stream)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    if stream:
        assert (delta.delta.stop_reason, delta.delta.stop_sequence) == ("stop_sequence", "END")
    assert upstream.requests[-1].json["stop_sequences"] == STOPS


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", ["gpt-4o-mini", "gemini-2.0-flash"])
def test_a_provider_that_does_not_say_which_sequence_matched_reads_end_turn(
    gw, key, upstream, model, stream
):
    """OpenAI and Gemini answer "stop" for a stop sequence and a natural end alike: which
    one it was is unknown, so no sequence is made up."""
    message, delta = ask_anthropic(gw, key, model, stream)
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    if stream:
        assert (delta.delta.stop_reason, delta.delta.stop_sequence) == ("end_turn", None)
    sent = upstream.requests[-1].json
    assert sent.get("stop") == STOPS or sent["generationConfig"]["stopSequences"] == STOPS


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_openai_clients_get_the_stop_sequence_beside_the_finish_reason(gw, key, upstream, stream):
    """Lunar's SDK in remote mode reads it as ``choice.stop_sequence``; the openai SDK keeps
    it as an extra field of the choice."""
    upstream.enqueue(Reply(finish_reason="stop_sequence"), Reply(finish_reason="stop_sequence"))
    lunar = Lunar(base_url=gw.url, api_key=key, max_retries=0)
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    for client in (lunar, sdk):
        answer = client.chat.completions.create(
            model="claude-3-haiku", messages=HI, stop=STOPS, stream=stream
        )
        choice = list(answer)[-1].choices[0] if stream else answer.choices[0]
        assert choice.finish_reason == "stop"
        assert choice.stop_sequence == "END"
    upstream.enqueue(Reply())  # a natural end: no such field at all
    plain = sdk.chat.completions.create(model="claude-3-haiku", messages=HI, stop=STOPS)
    assert "stop_sequence" not in plain.choices[0].model_dump()


# -- Gemini's thought signatures ----------------------------------------------------------

GEMINI_3 = "gemini/gemini-3-pro-preview"  # signs its calls and checks them (the emulator)
SIGNATURE = thought_signature("get_weather")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_openai_sdk_tool_use_with_gemini_3_through_the_gateway(gw, key, upstream, stream):
    """The openai SDK keeps the call's ``extra_content`` and sends it back with the answer's
    message, as it does with Google's own OpenAI-compatible endpoint."""
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    answer = sdk.chat.completions.create(model=GEMINI_3, messages=HI, tools=TOOLS, stream=stream)
    if stream:
        pieces = [c.choices[0].delta.tool_calls for c in answer if c.choices]
        [first] = [p[0] for p in pieces if p and p[0].id]
        assert first.extra_content == {"google": {"thought_signature": SIGNATURE}}
        call_id = first.id
        message: Any = {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": first.function.arguments},
                    "extra_content": first.extra_content,
                }
            ],
        }
    else:
        message = answer.choices[0].message
        [call] = message.tool_calls
        assert call.extra_content == {"google": {"thought_signature": SIGNATURE}}
        call_id = call.id
    result = {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 21}'}
    done = sdk.chat.completions.create(model=GEMINI_3, messages=[*HI, message, result], tools=TOOLS)
    assert done.choices[0].finish_reason == "stop"
    sent = upstream.requests[-1].json["contents"][-2]["parts"][0]
    assert sent["thoughtSignature"] == SIGNATURE


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_lunar_remote_mode_carries_the_signature_both_ways(gw, key, upstream, stream):
    client = Lunar(base_url=gw.url, api_key=key, max_retries=0)
    answer = client.chat.completions.create(model=GEMINI_3, messages=HI, tools=TOOLS, stream=stream)
    if stream:
        with answer:
            for _ in answer:
                pass
            message = answer.get_final_completion().choices[0].message
    else:
        message = answer.choices[0].message
    [call] = message.tool_calls
    assert call.extra_content == {"google": {"thought_signature": SIGNATURE}}
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}
    done = client.chat.completions.create(
        model=GEMINI_3, messages=[*HI, message, result], tools=TOOLS
    )
    assert done.choices[0].finish_reason == "stop"
    assert upstream.requests[-1].json["contents"][-2]["parts"][0]["thoughtSignature"] == SIGNATURE


# -- … and for Anthropic clients, in the tool_use id --------------------------------------

CLAUDE_TOOLS = [
    {
        "name": "get_weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]+")


def anthropic_turn(client: Any, model: str, messages: list[Any], stream: bool) -> Any:
    return anthropic_call(
        client, stream, model=model, max_tokens=50, messages=messages, tools=CLAUDE_TOOLS
    )[0]


def gemini_3_tool_use(gw: GatewayProcess, key: str, stream: bool) -> tuple[Any, list[Any]]:
    """(the Anthropic client, the conversation after Gemini 3's call and its result)."""
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    message = anthropic_turn(client, GEMINI_3, HI, stream)
    assert message.stop_reason == "tool_use"
    [use] = [b for b in message.content if b.type == "tool_use"]
    assert ANTHROPIC_ID.fullmatch(use.id)  # the SDK and Anthropic's API take it back
    result = {"type": "tool_result", "tool_use_id": use.id, "content": '{"temp_c": 21}'}
    messages = [
        *HI,
        {"role": "assistant", "content": message.content},
        {"role": "user", "content": [result]},
    ]
    return client, messages


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_sdk_tool_use_with_gemini_3_through_the_gateway(gw, key, upstream, stream):
    """Anthropic's tool_use block has no field for the signature: the gateway carries it in
    the block's id and puts it back on the call's functionCall part when the id returns."""
    client, messages = gemini_3_tool_use(gw, key, stream)
    done = anthropic_turn(client, GEMINI_3, messages, stream)
    assert done.stop_reason == "end_turn"
    call, response = upstream.requests[-1].json["contents"][-2:]
    assert call["parts"][0]["thoughtSignature"] == SIGNATURE
    assert call["parts"][0]["functionCall"]["name"] == "get_weather"
    # The result's id paired with the call's: Gemini names a response after its call.
    assert response["parts"][0]["functionResponse"]["name"] == "get_weather"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-haiku"])
def test_other_upstreams_get_the_call_id_without_the_signature(gw, key, upstream, model, stream):
    """The same conversation continued with another provider (a fallback, or the client's
    choice): the call's own id, paired with its result, and no trace of the signature."""
    client, messages = gemini_3_tool_use(gw, key, stream)
    signed = messages[-1]["content"][0]["tool_use_id"]
    done = anthropic_turn(client, model, messages, stream)
    assert done.stop_reason == "end_turn"
    raw = upstream.requests[-1].body
    sent = upstream.requests[-1].json["messages"]
    if model.startswith("gpt"):
        call_id, result_id = sent[1]["tool_calls"][0]["id"], sent[2]["tool_call_id"]
        assert "extra_content" not in sent[1]["tool_calls"][0]
    else:
        call_id, result_id = sent[1]["content"][0]["id"], sent[2]["content"][0]["tool_use_id"]
    assert call_id == result_id
    assert signed.startswith(call_id) and len(signed) > len(call_id)
    assert b"__lsig_" not in raw and b"thought_signature" not in raw
    assert SIGNATURE.encode() not in raw
