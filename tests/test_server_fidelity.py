"""What a provider says beyond OpenAI's shape reaches the gateway's clients, over real sockets
(a gateway process, the emulator as every provider): which stop sequence ended an answer, for
Anthropic clients (``stop_reason: "stop_sequence"``) and OpenAI ones (``choices[].stop_sequence``);
Gemini's thought signatures on tool calls, there and back, for Lunar's SDK in remote mode and
the openai SDK."""

from __future__ import annotations

import re
from typing import Any

import pytest

from lunar import Lunar
from lunar.testing import Reply
from lunar.testing._gemini import thought_signature

from .test_server import GatewayProcess

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

HI = [{"role": "user", "content": "Write until END."}]
STOPS = ["END", "STOP"]


pytestmark = pytest.mark.usefixtures("fresh_upstream")


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


# -- usage on a stream, as OpenAI sends it when asked ---------------------------------------


def _shape(chunks: list[Any]) -> list[tuple[int, str | None, bool]]:
    """Each chunk as openai code sees it: its number of choices, the first's finish reason,
    whether it has usage."""
    return [
        (len(c.choices), c.choices[0].finish_reason if c.choices else None, c.usage is not None)
        for c in chunks
    ]


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-3-haiku", "gemini-2.0-flash"])
def test_openai_client_asking_usage_gets_it_on_a_chunk_of_its_own(gw, key, upstream, model):
    """``stream_options={"include_usage": True}``: OpenAI sends the usage on one more chunk,
    after the finishing one, with ``choices: []`` (every other chunk has ``usage: null``);
    the gateway had it on the finishing chunk. Whatever the provider behind, the openai SDK
    now sees the chunks it sees from OpenAI (here, the emulator speaking OpenAI's wire)."""
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    direct = openai.OpenAI(base_url=upstream.base_url, api_key="sk", max_retries=0)
    kw: dict[str, Any] = {"messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    got = list(sdk.chat.completions.create(model=model, **kw))
    want = list(direct.chat.completions.create(model="gpt-4o-mini", **kw))
    assert _shape(got) == _shape(want)
    assert _shape(got)[-2:] == [(1, "stop", False), (0, None, True)]
    usage = got[-1].usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens == 8
    assert usage.total_cost_usd > 0  # Lunar's fields ride along, as on the whole answer
    assert got[-1].id == got[0].id and got[-1].model == got[0].model
    # The openai SDK's stream helper gathers it; the legacy endpoint sends it so too.
    with sdk.chat.completions.stream(model=model, messages=HI) as helper:
        assert helper.get_final_completion().usage.completion_tokens == 8
    legacy = list(
        sdk.completions.create(
            model=model, prompt="Hi", stream=True, stream_options={"include_usage": True}
        )
    )
    assert [(len(c.choices), c.usage is not None) for c in legacy[-2:]] == [(1, False), (0, True)]


def test_without_include_usage_the_finishing_chunk_carries_it(gw, key):
    """Not asked: Lunar's own shape, kept (the usage on the chunk with ``finish_reason``, so
    a ``choices[0]`` loop never meets an empty list); and Lunar's SDK through the gateway,
    which asks for it, gets the same shape as in direct mode."""
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    got = list(sdk.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True))
    assert _shape(got)[-1] == (1, "stop", True)
    lunar = Lunar(base_url=gw.url, api_key=key, max_retries=0)
    chunks = list(lunar.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True))
    assert _shape(chunks)[-1] == (1, "stop", True) and all(c.choices for c in chunks)
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.total_cost_usd > 0


# -- streamed citations -----------------------------------------------------------------------

CITATIONS = [
    {
        "type": "url_citation",
        "url_citation": {
            "start_index": 0,
            "end_index": 3,
            "title": "Moon",
            "url": "https://example.org/moon",
        },
    }
]


def test_streamed_annotations_come_through_the_gateway(gw, key, upstream):
    """A web-search model's citations, streamed in a delta of their own: the gateway's relay
    of plain events wrote only the text fields of a delta, and the chunk had no place for
    them; now the openai SDK's users and Lunar's (remote mode) get them, on the delta and
    on the final message."""
    # Paced: each event its own read, as the relay takes them (it starts after the first).
    upstream.enqueue(*[Reply(annotations=CITATIONS, pacing=0.005)] * 3, model="gpt-4o-mini")
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    chunks = list(sdk.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True))
    cited = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.model_extra]
    assert [d.model_extra for d in cited] == [{"annotations": CITATIONS}]
    with sdk.chat.completions.stream(model="gpt-4o-mini", messages=HI) as helper:
        final = helper.get_final_completion()
    assert [a.model_dump() for a in final.choices[0].message.annotations] == CITATIONS
    lunar = Lunar(base_url=gw.url, api_key=key, max_retries=0)
    stream = lunar.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    message = stream.get_final_completion().choices[0].message
    assert [a.to_dict() for a in message.annotations] == CITATIONS
    assert message.content == final.choices[0].message.content
