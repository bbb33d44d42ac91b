"""The OpenAI Chat Completions wire protocol, spoken by OpenAI, Groq, Together, Fireworks,
DeepSeek, Mistral, OpenRouter, Ollama, vLLM and Lunar's own gateway."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

from .._errors import (
    APIConnectionError,
    APIError,
    StreamError,
    error_from_response,
    error_from_stream_event,
)
from .._types import ChatCompletion, ChatCompletionChunk, ChunkEncoder
from ._base import HTTPRequest, Target
from ._shared import HTTPAdapter, SSETranslator, dump_body, invalid_json, json_object
from ._shared import loads as _loads


class OpenAIStreamTranslator(SSETranslator):
    """OpenAI SSE bytes in, ``ChatCompletionChunk`` out. The chunks already have the shape
    callers want, so this only frames, parses and checks that the stream ended properly."""

    __slots__ = ("_done", "_finished", "_provider", "_remote")

    def __init__(self, provider: str, remote: bool = False) -> None:
        super().__init__()
        self._provider = provider
        self._remote = remote
        self._done = False
        self._finished = False

    def _translate(self, data: bytes, out: list[ChatCompletionChunk]) -> None:
        for event in self._sse.feed(data):
            text = event.data
            if self._done:
                continue
            if text == "[DONE]":
                self._done = True
                continue
            try:
                obj = _loads(text)
            except ValueError:
                raise StreamError(
                    f"Malformed event in the stream from '{self._provider}': {text[:200]!r}",
                    provider=self._provider,
                ) from None
            if not isinstance(obj, dict):
                raise StreamError(
                    f"Unexpected event in the stream from '{self._provider}': {text[:200]!r}",
                    provider=self._provider,
                )
            if "error" in obj and not obj.get("choices"):
                if self._remote:
                    raise error_from_stream_event(
                        obj["error"], self._provider, True, obj.get("status"), obj.get("attempts")
                    )
                raise error_from_stream_event(obj["error"], self._provider)
            chunk = ChatCompletionChunk.from_dict(
                obj, answered_by(obj, self._provider) if self._remote else self._provider
            )
            if not self._finished:
                for choice in chunk.choices:
                    if choice.finish_reason is not None:
                        self._finished = True
            out.append(chunk)

    def relay(self, encoder: ChunkEncoder, sink: RelaySink, seen: RelayCount) -> PlainRelay | None:
        """A ``PlainRelay`` taking this stream's next bytes, when nothing of it is pending
        here (no part of an event, no end seen) and it is no gateway's (whose chunks say
        who answered them each); else ``None``."""
        if self._remote or self._done or self._finished or not self._sse.idle():
            return None
        return PlainRelay(self._provider, encoder, sink, seen)

    def _end(self) -> list[ChatCompletionChunk]:
        if not self._done and not self._finished:
            raise APIConnectionError(
                f"The stream from '{self._provider}' ended before it was complete "
                "(no finish_reason and no [DONE])"
            )
        return []


class RelaySink(Protocol):
    """Where a ``PlainRelay`` writes: the client's connection."""

    def ready(self) -> bool:
        """Whether a write now would go out (the client is there and not pushing back)."""
        ...

    def write(self, data: bytes) -> None: ...


class RelayCount(Protocol):
    """What a ``PlainRelay`` tells of the events it took (the engine's ``StreamFinisher``)."""

    def relayed(self, event: dict[str, Any] | None, chars: int) -> None: ...


class PlainRelay:
    """The gateway's relay of a stream's plain events, from the upstream's reads straight to
    the client: called with each piece of the body as it arrives (``_http``'s tap), it
    writes each event as its chunk object would have been written (``ChunkEncoder``) and
    returns ``b""``. A plain event is one ``data:`` line of a JSON object with one choice,
    no usage, no tool call, no logprobs and no ``finish_reason``: the events between a
    stream's first and its last. At the first other one (the last ones, usage, tool calls,
    an error, ``[DONE]``, other SSE framing, anything misshapen), at a piece that ends
    inside an event, or when the client pushes back, it returns the bytes from there on,
    for the translator (which says what is wrong, if anything), and is done.

    Nothing is built per event but its dict and its text, and no coroutine wakes: at lane
    3's load that was most of what an event cost the gateway."""

    __slots__ = ("_provider", "_seen", "_shape", "_sink", "_text", "missed")

    def __init__(
        self, provider: str, encoder: ChunkEncoder, sink: RelaySink, seen: RelayCount
    ) -> None:
        self._provider = provider
        self._text = encoder.text
        self._sink = sink
        self._seen = seen
        #: The last event around its text, and what it was written as around its text: an
        #: event the same but for its text (as nearly all of a stream's are) is written from
        #: these, without its JSON parsed (``_same_shape``).
        self._shape: tuple[bytes, bytes, bytes, bytes] | None = None
        #: It left the first event it met: no plain one came (a stream of tool calls, of
        #: several choices, or framed with CR), and another relay would most likely leave
        #: the next one too.
        self.missed = False

    def __call__(self, body: bytes) -> bytes:
        sink = self._sink
        if not sink.ready():
            return body
        end = body.find(b"\n\n")
        if end == len(body) - 2 and end >= 0:  # one whole event: a paced stream's read
            line = self._line(body, 0, end)
            if line is None:
                self.missed = True
                return body
            sink.write(line)
            return b""
        out: list[bytes] = []
        start = 0
        while end >= 0:
            line = self._line(body, start, end)
            if line is None:
                break
            out.append(line)
            start = end + 2
            end = body.find(b"\n\n", start)
        if out:
            sink.write(out[0] if len(out) == 1 else b"".join(out))
        elif b"\r" in body or end >= 0:
            self.missed = True  # not plain, or framed with CR or CRLF: never plain here
        # What is left (an event not plain, or one not whole yet) is the reader's: the relay
        # keeps no byte, so whatever way the body ends, the translator has all of it.
        return body[start:]

    def _line(self, data: bytes, start: int, end: int) -> bytes | None:
        """The event at ``data[start:end]`` as the gateway writes it, counted as seen, when
        it is plain; else ``None``."""
        if not data.startswith(b"data: ", start):
            return None
        payload = data[start + 6 : end]
        if self._shape is not None and (line := self._same_shape(payload)) is not None:
            return line
        # One line, nothing else: what the SSE decoder would give as it is ([DONE] and
        # anything else that is not a JSON object fail below).
        if b"\n" in payload or b"\r" in payload:
            return None
        try:
            event = _relay_loads(payload)
        except ValueError:
            return None
        if type(event) is not dict:
            return None
        get = event.get
        choices = get("choices")
        if type(choices) is not list or len(choices) != 1 or get("usage") is not None:
            return None
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason") is not None:
            return None
        delta = choice.get("delta") or {}
        if type(delta) is not dict or delta.get("tool_calls") is not None:
            return None
        if choice.get("logprobs") is not None:
            return None
        content = delta.get("content")
        # As ChatCompletionChunk.from_dict reads the fields, and ChatWriter writes them.
        text = self._text(
            get("id") or "",
            get("created") or 0,
            get("model") or "",
            "chat.completion.chunk",
            self._provider,
            get("system_fingerprint"),
            choice.get("index", 0),
            content,
            delta.get("refusal"),
            delta.get("role"),
            None,
        )
        if text is None:
            return None
        try:
            line = ("data: " + text + "\n\n").encode()
        except UnicodeEncodeError:  # a lone surrogate: the writer's own escape for it
            return None
        self._seen.relayed(event, len(content) if content else 0)
        self._shape = _shape(payload, line, content) if type(content) is str else None
        return line

    def _same_shape(self, payload: bytes) -> bytes | None:
        """The event written from ``_shape`` when it is the last one but for its text, and
        that text is a JSON string of printable ASCII with no escape (the writer writes it
        as it is); else ``None``. Equal around the text, the event has the last one's fields
        and values, so it is plain and is written as that one was."""
        head, tail, out_head, out_tail = self._shape  # type: ignore[misc]
        if not (payload.startswith(head) and payload.endswith(tail)):
            return None
        literal = payload[len(head) : len(payload) - len(tail)]
        if len(head) + len(tail) > len(payload) or _PLAIN_STRING.fullmatch(literal) is None:
            return None
        self._seen.relayed(None, len(literal) - 2)
        return out_head + literal + out_tail


#: A JSON string of printable ASCII without quote or backslash: its text as it is.
_PLAIN_STRING = re.compile(rb'"[ !#-\[\]-~]*"')
_CONTENT_KEY = b'"content":'


def _shape(payload: bytes, line: bytes, content: str) -> tuple[bytes, bytes, bytes, bytes] | None:
    """``payload`` and the ``line`` it was written as, each cut around its text
    (``content``): where the text's key appears once in each, and the text is written the
    same in both (``PlainRelay._same_shape``); else ``None``."""
    literal = _json_text(content)
    if payload.count(_CONTENT_KEY) != 1 or line.count(_CONTENT_KEY) != 1:
        return None
    at = payload.index(_CONTENT_KEY) + len(_CONTENT_KEY)
    out_at = line.index(_CONTENT_KEY) + len(_CONTENT_KEY)
    if not (payload.startswith(literal, at) and line.startswith(literal, out_at)):
        return None
    return (
        payload[:at],
        payload[at + len(literal) :],
        line[:out_at],
        line[out_at + len(literal) :],
    )


def _json_text(content: str) -> bytes:
    """``content`` as a JSON string, or as nothing any JSON matches when it would need an
    escape (the fast path is for text that needs none)."""
    literal = b'"' + content.encode("utf-8", "replace") + b'"'
    return literal if _PLAIN_STRING.fullmatch(literal) else b"\x00"


class OpenAIAdapter(HTTPAdapter):
    def parse_error(
        self, status: int, headers: Mapping[str, str], content: bytes, target: Target
    ) -> APIError:
        remote = target.spec.name == REMOTE
        return error_from_response(status, headers, content, target.provider, remote)

    def build_request(self, body: Mapping[str, Any], target: Target, stream: bool) -> HTTPRequest:
        payload = dict(body)
        payload["model"] = target.deployment.provider_model
        if target.spec.name != REMOTE:
            payload["messages"] = without_extra_content(body["messages"])
        if stream:
            payload["stream"] = True
            options = dict(payload.get("stream_options") or {})
            options["include_usage"] = True
            payload["stream_options"] = options
        else:
            payload.pop("stream", None)
            payload.pop("stream_options", None)
        headers = {"content-type": "application/json", "accept": "application/json"}
        if stream:
            headers["accept"] = "text/event-stream"
        if target.api_key:
            headers["authorization"] = f"Bearer {target.api_key}"
        headers.update(target.headers)
        url = target.base_url.rstrip("/") + "/chat/completions"
        return HTTPRequest("POST", url, headers, dump_body(payload))

    def parse_response(self, content: bytes, target: Target) -> ChatCompletion:
        obj = json_object(content, target.provider)
        if "choices" not in obj:
            if "error" in obj:
                remote = target.spec.name == REMOTE
                raise error_from_stream_event(obj["error"], target.provider, remote)
            raise invalid_json(target.provider, content)
        remote = target.spec.name == REMOTE
        provider = answered_by(obj, target.provider) if remote else target.provider
        return ChatCompletion.from_dict(obj, provider)

    def stream_translator(self, target: Target) -> OpenAIStreamTranslator:
        return OpenAIStreamTranslator(target.provider, remote=target.spec.name == REMOTE)


#: JSON for the relay: orjson's own, when installed. The relay reads only strings and
#: ints (``created``, ``index``), which orjson gives exactly or refuses (an int past 64 bits,
#: nesting past its limit): a refused event goes to the translator, which parses it as
#: ``_json.loads`` does.
try:
    from orjson import loads as _relay_loads
except ImportError:  # pragma: no cover - the core install (which has no relay: no pool)
    _relay_loads = _loads  # type: ignore[assignment]


def without_extra_content(messages: list[Any]) -> list[Any]:
    """``messages`` without the ``extra_content`` of assistant tool calls: Gemini's thought
    signatures (``ToolCall.extra_content``) mean nothing to another provider, and OpenAI and
    other strict servers refuse a call with a field they do not know. Only a Lunar gateway
    takes them, for the Gemini model behind it. The caller's list and dicts stay as they were;
    without any such call, the same list."""
    out: list[Any] | None = None
    for i, msg in enumerate(messages):
        calls = msg.get("tool_calls")
        if type(calls) is list and any(
            isinstance(c, Mapping) and "extra_content" in c for c in calls
        ):
            if out is None:
                out = list(messages)
            out[i] = {
                **msg,
                "tool_calls": [
                    {k: v for k, v in c.items() if k != "extra_content"}
                    if isinstance(c, Mapping)
                    else c
                    for c in calls
                ],
            }
    return messages if out is None else out


#: The provider name of a Lunar gateway (remote mode), whose answers say who served them.
REMOTE = "lunar"


def answered_by(obj: Mapping[str, Any], fallback: str) -> str:
    """Who answered, as a Lunar gateway reports it; any other upstream's ``provider`` field
    (OpenRouter sends one) is its own business, not Lunar's provider name."""
    provider = obj.get("provider")
    return provider if isinstance(provider, str) and provider else fallback


ADAPTER = OpenAIAdapter()
