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
from ._shared import (
    REASONING_FIELDS,
    HTTPAdapter,
    SSETranslator,
    dump_body,
    invalid_json,
    json_object,
    reasons,
)
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

    def offer(self, data: bytes) -> bool:
        """Write ``data`` if it would go out now (the client is there and not pushing
        back); whether it was written."""
        ...


class RelayCount(Protocol):
    """What a ``PlainRelay`` tells of the events it took (the engine's ``StreamFinisher``).
    ``chars`` and ``first_at`` are read and ``chars`` added to directly for an event like
    the last but for its text, which most are: ``relayed(None, n)`` is what that does once
    ``first_at`` is set."""

    chars: int
    first_at: float | None

    def relayed(self, event: dict[str, Any] | None, chars: int) -> None: ...


class PlainRelay:
    """The gateway's relay of a stream's plain events, from the upstream's reads straight to
    the client: called with each piece of the body as it arrives (``_http``'s tap), it
    writes each event as its chunk object would have been written (``ChunkEncoder``) and
    returns ``b""``. A plain event is one ``data:`` line of a JSON object with one choice,
    no usage, no tool call, no annotations, no logprobs and no ``finish_reason``: the events
    between a stream's first and its last. At the first other one (the last ones, usage, tool
    calls, annotations, an error, ``[DONE]``, other SSE framing, anything misshapen), at a
    piece that ends inside an event, or when the client pushes back, it returns the bytes
    from there on, for the translator (which says what is wrong, if anything), and is done.

    Nothing is built per event but its dict and its text, and no coroutine wakes: at lane
    3's load that was most of what an event cost the gateway."""

    __slots__ = (
        "_cut",
        "_frame",
        "_head",
        "_out_head",
        "_out_tail",
        "_provider",
        "_seen",
        "_sink",
        "_tail",
        "_text",
        "missed",
    )

    def __init__(
        self, provider: str, encoder: ChunkEncoder, sink: RelaySink, seen: RelayCount
    ) -> None:
        self._provider = provider
        self._text = encoder.text
        self._sink = sink
        self._seen = seen
        #: The last event (``data: ...`` and its blank line) around its text, and what it
        #: was written as around its text: an event the same but for its text (as nearly
        #: all of a stream's are) is written from these, without its JSON parsed
        #: (``_same_shape``). ``_cut`` slices the text out of such an event; ``_frame`` is
        #: how much of a line written from them is not the text. Until an event sets them,
        #: a head no event starts with.
        self._head = b"\x00"
        self._tail = b""
        self._out_head = self._out_tail = b""
        self._cut = slice(0)
        self._frame = 0
        #: It left the first event it met: no plain one came (a stream of tool calls, of
        #: several choices, or framed with CR), and another relay would most likely leave
        #: the next one too.
        self.missed = False

    def __call__(self, body: bytes) -> bytes:
        # The read most events come in: one event, the last one's but for its text (as
        # ``_same_shape``, inline: this runs for nearly every event of a relayed stream).
        if body.startswith(self._head) and body.endswith(self._tail):
            literal = body[self._cut]
            if _plain_string(literal) is not None:
                if not self._sink.offer(self._out_head + literal + self._out_tail):
                    return body
                seen = self._seen  # as ``relayed(None, n)`` does, inline
                if seen.first_at is None:
                    seen.relayed(None, len(literal) - 2)
                else:
                    seen.chars += len(literal) - 2
                return b""
        taken: list[tuple[bytes, dict[str, Any] | None, int]] = []
        start = 0
        end = body.find(b"\n\n")
        while end >= 0:
            event = self._line(body, start, end)
            if event is None:
                break
            taken.append(event)
            start = end + 2
            end = body.find(b"\n\n", start)
        if taken:
            lines = taken[0][0] if len(taken) == 1 else b"".join(t[0] for t in taken)
            if not self._sink.offer(lines):
                return body
            for _, event_dict, chars in taken:
                self._seen.relayed(event_dict, chars)
        elif b"\r" in body or end >= 0:
            self.missed = True  # not plain, or framed with CR or CRLF: never plain here
        # What is left (an event not plain, or one not whole yet) is the reader's: the relay
        # keeps no byte, so whatever way the body ends, the translator has all of it.
        return body[start:]

    def _line(
        self, data: bytes, start: int, end: int
    ) -> tuple[bytes, dict[str, Any] | None, int] | None:
        """The event at ``data[start:end]`` when it is plain: as the gateway writes it, and
        what ``relayed`` is told of it once written (its dict, or None when it is the last
        one's but for its text; its characters of text); else ``None``."""
        if not data.startswith(b"data: ", start):
            return None
        line = self._same_shape(data[start : end + 2])
        if line is not None:
            return line, None, len(line) - self._frame
        payload = data[start + 6 : end]
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
        if (
            type(delta) is not dict
            or delta.get("tool_calls") is not None
            or delta.get("annotations") is not None
        ):
            return None
        if (
            delta.get("reasoning_content") is not None
            or delta.get("reasoning") is not None
            or delta.get("thinking_blocks") is not None
        ):
            return None  # the model's reasoning: the writer's, which carries it on
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
        self._shape(payload, line, content)
        return line, event, len(content) if content else 0

    def _same_shape(self, event: bytes) -> bytes | None:
        """The event (``data: ...`` and its blank line) written from the last one's shape
        when it is that one but for its text, and that text is a JSON string of printable
        ASCII with no escape (the writer writes it as it is); else ``None``. Equal around
        the text, the event has the last one's fields and values, so it is plain and is
        written as that one was; and as the text holds no line break, it is one event. (An
        event shorter than the head and tail together slices to no string.)"""
        if event.startswith(self._head) and event.endswith(self._tail):
            literal = event[self._cut]
            if _plain_string(literal) is not None:
                return self._out_head + literal + self._out_tail
        return None

    def _shape(self, payload: bytes, line: bytes, content: Any) -> None:
        """Keep the shape of the event of ``payload`` and of the ``line`` it was written as,
        each cut around its text (``content``), for ``_same_shape``: when the text's key
        appears once in each and the text is written the same in both; else a head no event
        starts with."""
        literal = _json_text(content) if type(content) is str else b"\x00"
        at = payload.find(_CONTENT_KEY) + len(_CONTENT_KEY)
        out_at = line.find(_CONTENT_KEY) + len(_CONTENT_KEY)
        if (
            payload.count(_CONTENT_KEY) != 1
            or line.count(_CONTENT_KEY) != 1
            or not payload.startswith(literal, at)
            or not line.startswith(literal, out_at)
        ):
            self._head = b"\x00"
            return
        self._head = b"data: " + payload[:at]
        self._tail = payload[at + len(literal) :] + b"\n\n"
        self._cut = slice(len(self._head), -len(self._tail))
        self._out_head = line[:out_at]
        self._out_tail = line[out_at + len(literal) :]
        self._frame = len(line) - len(literal) + 2  # the text's quotes are not its characters


#: A JSON string of printable ASCII without quote or backslash: its text as it is.
_PLAIN_STRING = re.compile(rb'"[ !#-\[\]-~]*"')
_plain_string = _PLAIN_STRING.fullmatch
_CONTENT_KEY = b'"content":'


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
        spec = target.spec
        # (Asked as set tests: one C call each for the bodies, nearly all, with none.)
        if not spec.drop_params.isdisjoint(payload):  # what it refuses (OpenAI: top_k)
            for name in spec.drop_params:
                payload.pop(name, None)
        if not REASONING_FIELDS.isdisjoint(payload) and not reasons(target):
            for name in REASONING_FIELDS:
                payload.pop(name, None)
        if spec.name != REMOTE:
            keep = spec.cache_control
            payload["messages"] = without_extra_content(body["messages"], keep)
            tools = payload.get("tools")
            if tools and not keep and any("cache_control" in t for t in tools):
                payload["tools"] = [_uncached(t) for t in tools]
            if spec.name == OPENAI and "thinking" in payload:
                _effort_for_openai(payload)
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


#: OpenAI's own API, which takes ``reasoning_effort`` and refuses Lunar's ``thinking``.
OPENAI = "openai"


def _effort_for_openai(payload: dict[str, Any]) -> None:
    """Lunar's ``thinking`` as OpenAI's ``reasoning_effort`` (unless one is given): a budget
    up to 1024 tokens is "low", up to 8192 "medium", more "high"; "disabled" is "minimal"
    and "adaptive" the model's default. Other OpenAI-compatible servers get ``thinking`` as
    given (DeepSeek, GLM and Kimi take it)."""
    thinking = payload.pop("thinking")
    if payload.get("reasoning_effort") is not None:
        return
    kind = thinking.get("type")
    if kind == "disabled":
        payload["reasoning_effort"] = "minimal"
    elif kind == "enabled":
        budget = thinking.get("budget_tokens") or 0
        payload["reasoning_effort"] = (
            "low" if budget <= 1024 else "medium" if budget <= 8192 else "high"
        )


#: What an assistant turn may carry that only Lunar reads: Gemini's thought signatures on
#: tool calls (``extra_content``), and the reasoning of an answer sent back with it.
_REASONING_KEYS = ("reasoning_content", "thinking_blocks")


def _uncached(obj: Any) -> Any:
    """``obj`` (a message, part or tool) without its ``cache_control``."""
    if isinstance(obj, Mapping) and "cache_control" in obj:
        return {k: v for k, v in obj.items() if k != "cache_control"}
    return obj


def _cached(parts: list[Any]) -> bool:
    """Whether a message's content parts hold Anthropic's ``cache_control``."""
    return any(isinstance(p, Mapping) and "cache_control" in p for p in parts)


def without_extra_content(messages: list[Any], keep_cache: bool = True) -> list[Any]:
    """``messages`` without the ``extra_content`` of assistant tool calls, nor the
    ``reasoning_content`` and ``thinking_blocks`` of an answer sent back: Gemini's thought
    signatures (``ToolCall.extra_content``) and Anthropic's signed thinking mean nothing to
    another provider, and OpenAI and other strict servers refuse a field they do not know
    (DeepSeek refuses its own ``reasoning_content`` in a request). Only a Lunar gateway takes
    them, for the model behind it. Unless ``keep_cache``, without Anthropic's
    ``cache_control`` (prompt-cache breakpoints) either, on messages and content parts. The
    caller's list and dicts stay as they were; without any such field, the same list."""
    out: list[Any] | None = None
    for i, msg in enumerate(messages):
        if not keep_cache and (
            "cache_control" in msg or (type(parts := msg.get("content")) is list and _cached(parts))
        ):
            if out is None:
                out = list(messages)
            bare = {k: v for k, v in msg.items() if k != "cache_control"}  # (a copy)
            if type(bare.get("content")) is list:
                bare["content"] = [_uncached(p) for p in bare["content"]]
            msg = out[i] = bare
        calls = msg.get("tool_calls")
        signed = type(calls) is list and any(
            isinstance(c, Mapping) and "extra_content" in c for c in calls
        )
        reasoned = "reasoning_content" in msg or "thinking_blocks" in msg
        if signed or reasoned:
            if out is None:
                out = list(messages)
            turn = {k: v for k, v in msg.items() if k not in _REASONING_KEYS}
            if signed:
                turn["tool_calls"] = [
                    {k: v for k, v in c.items() if k != "extra_content"}
                    if isinstance(c, Mapping)
                    else c
                    for c in calls
                ]
            out[i] = turn
    return messages if out is None else out


#: The provider name of a Lunar gateway (remote mode), whose answers say who served them.
REMOTE = "lunar"


def answered_by(obj: Mapping[str, Any], fallback: str) -> str:
    """Who answered, as a Lunar gateway reports it; any other upstream's ``provider`` field
    (OpenRouter sends one) is its own business, not Lunar's provider name."""
    provider = obj.get("provider")
    return provider if isinstance(provider, str) and provider else fallback


ADAPTER = OpenAIAdapter()
