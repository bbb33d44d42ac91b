"""The gateway's front doors: how each API reads a request into the engine's chat body, and
writes answers and errors back — OpenAI chat, OpenAI legacy completions, Anthropic messages.

A ``Dialect`` validates a request (``parse``), shapes errors (``error``), a whole answer
(``complete``) and gives a ``StreamWriter`` that turns engine chunks into SSE bytes. No I/O here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from .._engine import estimate_tokens, prompt_chars
from .._errors import (
    APIError,
    APITimeoutError,
    BadRequestError,
    LunarError,
    RateLimitError,
)
from .._json import dumps, utf8
from .._request import (
    bad,
    chat_body,
    completion_from_chat,
    completion_from_chunk,
    prompt_messages,
)
from .._types import ChatCompletion, ChatCompletionChunk, ChunkEncoder
from . import anthropic_compat as anthropic

log = logging.getLogger("lunar.server")

Headers = list[tuple[bytes, bytes]]

_DONE = b"data: [DONE]\n\n"

# The legacy completions endpoint takes these (besides model, prompt, stream and Lunar's).
_COMPLETION_PARAMS = frozenset(
    {
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "user",
        "stream_options",
    }
)
_LUNAR_FIELDS = ("model", "stream", "fallbacks", "provider")


def openai_error(err: LunarError) -> tuple[int, dict[str, Any], Headers]:
    """An engine or gateway error as (status, OpenAI error JSON, extra headers).

    An error the engine gave up with (it has ``attempts``: the gateway already retried and
    fell back as the request allowed) says ``x-should-retry: false``, so no client starts
    the whole chain again, and lists the attempts beside ``error`` (``attempts_json``)."""
    status, payload, headers = _shaped(err)
    if err.attempts:
        headers = [h for h in headers if h[0] != b"x-should-retry"]
        headers.append((b"x-should-retry", b"false"))
        payload["attempts"] = attempts_json(err)
    return status, payload, headers


def _shaped(err: LunarError) -> tuple[int, dict[str, Any], Headers]:
    headers: Headers = []
    if isinstance(err, APIError):
        # No status: no answer (a timeout is the gateway's 504), or a broken one.
        status = err.status_code or (504 if isinstance(err, APITimeoutError) else 502)
        payload = err.to_openai_dict()
        if isinstance(err, RateLimitError) and err.retry_after is not None:
            headers.append((b"retry-after", str(max(1, math.ceil(err.retry_after))).encode()))
        should = err.headers.get("x-should-retry") if err.headers else None
        if should in ("true", "false"):
            headers.append((b"x-should-retry", should.encode()))
        return status, payload, headers
    payload = {"error": {"message": err.message, "type": "api_error", "param": None, "code": None}}
    return 502, payload, headers


def attempts_json(err: LunarError) -> list[dict[str, Any]]:
    """``err.attempts`` as the gateway reports them: for each, the model and provider tried
    and its error as the gateway would have answered it alone (``status``, and ``error``'s
    ``message``, ``type``, ``param``, ``code``). Lunar's remote mode makes them
    ``e.attempts`` again."""
    out = []
    for attempt in err.attempts:
        status, payload, _ = _shaped(attempt.error)
        item = {"model": attempt.model, "provider": attempt.provider, "status": status}
        item.update(payload["error"])
        out.append(item)
    return out


def error_type(err: LunarError) -> str:
    if isinstance(err, APIError):
        if err.code in ("budget_exceeded", "model_not_found", "deadline_exceeded"):
            return err.code
        return err.type  # a connection error's: api_connection_error, timeout_error
    return "api_error"


class StreamWriter:
    last_id: str | None = None
    #: How this writer writes an OpenAI chunk's JSON, when it writes OpenAI chunks: the
    #: engine's relay of plain events then writes them so too (``AsyncOpenStream.relay_to``).
    encoder: ChunkEncoder | None = None

    def chunk(self, chunk: ChatCompletionChunk) -> bytes:
        raise NotImplementedError

    def chunks(self, chunks: list[ChatCompletionChunk]) -> bytes:
        """Several chunks' bytes, for one write."""
        if len(chunks) == 1:
            return self.chunk(chunks[0])
        return b"".join([self.chunk(chunk) for chunk in chunks])

    def done(self) -> bytes:
        return _DONE

    def error(self, err: LunarError, request_id: str) -> bytes:
        """After the first byte: an error event, then ``[DONE]`` — never a clean finish.
        ``status`` is what the gateway would have answered before the first byte: the
        error's ``type`` alone may not say it (a Gemini ``UNAVAILABLE``), and Lunar's
        remote mode raises the class of that status, as it does for an answer."""
        status, payload, _ = openai_error(err)
        e = payload["error"]
        event = {
            "id": self.last_id or request_id,
            "object": "error",
            "status": status,
            "error": {
                "message": e["message"],
                "type": e["type"],
                "code": e.get("code"),
                "param": e.get("param"),
            },
        }
        if "attempts" in payload:
            event["attempts"] = payload["attempts"]
        return b"data: " + dumps(event) + b"\n\n" + _DONE


class ChatWriter(StreamWriter):
    encoder: ChunkEncoder

    def __init__(self) -> None:
        self.encoder = ChunkEncoder()

    def chunk(self, chunk: ChatCompletionChunk) -> bytes:
        self.last_id = chunk.id
        text = self.encoder.encode(chunk)
        data = dumps(chunk.to_dict()) if text is None else utf8(text)
        return b"data: " + data + b"\n\n"


class UsageChunkChatWriter(ChatWriter):
    """A ``ChatWriter`` for a client that asked ``stream_options.include_usage``: the usage
    goes in one more chunk after the finishing one, with ``choices: []``, as OpenAI sends
    it (the finishing chunk has ``usage: null``, as every other does)."""

    def chunk(self, chunk: ChatCompletionChunk) -> bytes:
        if chunk.usage is None:
            return ChatWriter.chunk(self, chunk)
        self.last_id = chunk.id
        return usage_apart(chunk.to_dict())


def usage_apart(chunk: dict[str, Any]) -> bytes:
    """The events of a chunk (its dict) that carries the stream's usage, as OpenAI sends
    them when asked for usage: the chunk with ``usage: null`` (unless it has no choices),
    then the usage on a chunk of its own with ``choices: []``."""
    usage = chunk["usage"]
    chunk["usage"] = None
    out = b"data: " + dumps(chunk) + b"\n\n" if chunk["choices"] else b""
    chunk["choices"] = []
    chunk["usage"] = usage
    return out + b"data: " + dumps(chunk) + b"\n\n"


def asks_usage(body: Mapping[str, Any]) -> bool:
    """Whether the client asked for usage as a chunk of its own (OpenAI's
    ``stream_options: {"include_usage": true}``)."""
    options = body.get("stream_options")
    return type(options) is dict and options.get("include_usage") is True


class CompletionWriter(StreamWriter):
    def __init__(self, usage_apart: bool = False) -> None:
        self._usage_apart = usage_apart

    def chunk(self, chunk: ChatCompletionChunk) -> bytes:
        piece = completion_from_chunk(chunk)
        self.last_id = piece.id
        if self._usage_apart and piece.usage is not None:
            return usage_apart(piece.to_dict())
        return b"data: " + dumps(piece.to_dict()) + b"\n\n"


class AnthropicWriter(StreamWriter):
    def __init__(self, model: str, body: Mapping[str, Any]) -> None:
        self._enc = anthropic.MessageStreamEncoder(model, estimate_tokens(prompt_chars(body)))

    def chunk(self, chunk: ChatCompletionChunk) -> bytes:
        return self._enc.feed(chunk)

    def done(self) -> bytes:
        return self._enc.end()

    def error(self, err: LunarError, request_id: str) -> bytes:
        return self._enc.error(err)


class Dialect:
    route = ""

    def parse(self, raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The JSON body -> (validated chat body, Lunar fields)."""
        raise NotImplementedError

    def error(self, err: LunarError) -> tuple[int, dict[str, Any], Headers]:
        return openai_error(err)

    def complete(self, completion: ChatCompletion) -> dict[str, Any]:
        raise NotImplementedError

    def stream(self, model: str, body: Mapping[str, Any]) -> StreamWriter:
        raise NotImplementedError


def lunar_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {name: raw.get(name) for name in _LUNAR_FIELDS}


def json_object(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise BadRequestError("The request body must be a JSON object", param=None)
    return raw


class Chat(Dialect):
    route = "chat"

    def parse(self, raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        raw = json_object(raw)
        params = {k: v for k, v in raw.items() if k not in _LUNAR_FIELDS and k != "messages"}
        return chat_body(raw.get("messages"), params), lunar_fields(raw)

    def complete(self, completion: ChatCompletion) -> dict[str, Any]:
        return completion.to_dict()

    def stream(self, model: str, body: Mapping[str, Any]) -> StreamWriter:
        return UsageChunkChatWriter() if asks_usage(body) else ChatWriter()


class Completions(Dialect):
    route = "completions"

    def parse(self, raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        raw = json_object(raw)
        params = {}
        for k, v in raw.items():
            if k in _LUNAR_FIELDS or k == "prompt":
                continue
            if k not in _COMPLETION_PARAMS:
                raise bad(f"'{k}' is not supported by /v1/completions on Lunar", k)
            params[k] = v
        return chat_body(prompt_messages(raw.get("prompt")), params), lunar_fields(raw)

    def complete(self, completion: ChatCompletion) -> dict[str, Any]:
        return completion_from_chat(completion).to_dict()

    def stream(self, model: str, body: Mapping[str, Any]) -> StreamWriter:
        return CompletionWriter(asks_usage(body))


class Messages(Dialect):
    route = "messages"

    def parse(self, raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        body, lunar = anthropic.to_chat_body(raw)
        messages = body.pop("messages")
        return chat_body(messages, body), lunar

    def error(self, err: LunarError) -> tuple[int, dict[str, Any], Headers]:
        status, payload, headers = openai_error(err)
        body = anthropic.error_body(err)
        if "attempts" in payload:
            body["attempts"] = payload["attempts"]
        return status, body, headers

    def complete(self, completion: ChatCompletion) -> dict[str, Any]:
        return anthropic.message_from_completion(completion)

    def stream(self, model: str, body: Mapping[str, Any]) -> StreamWriter:
        return AnthropicWriter(model, body)


CHAT, COMPLETIONS, MESSAGES = Chat(), Completions(), Messages()


def parse_request(dialect: Dialect, raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validation is about the client's input only, so anything it trips on (a dict where a
    string belongs, say) is the client's 400, never the gateway's 500."""
    try:
        return dialect.parse(raw)
    except LunarError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        log.debug("unexpected request shape: %s", type(exc).__name__)
        raise BadRequestError(
            "The request body has an unexpected shape: a field has the wrong type "
            "(see GET /openapi.json for the accepted request)",
            param=None,
            code="invalid_request",
        ) from None
