"""The scripted reply (`Reply`) and the recorded request (`RecordedRequest`)."""

from __future__ import annotations

import dataclasses
import json as _json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

__all__ = ["RecordedRequest", "Reply"]

DEFAULT_ERROR_TYPE = "server_error"
DEFAULT_ERROR_MESSAGE = "The server had an error while processing your request."


@dataclass
class Reply:
    """One scripted response of the emulator, on any of its wires (OpenAI Chat Completions,
    Anthropic Messages, Google Gemini). Every field has a default; faults compose.

    Streamed faults are positioned by ``k``, a number of *content chunks* already sent
    (text pieces, or tool-call argument pieces; with ``n > 1`` one position covers the
    chunks of all choices). ``k = 0`` means right after the opening event(s) (OpenAI: the
    role chunk; Anthropic: ``message_start``, the first ``content_block_start`` and a
    ``ping``), before any content; a ``k`` at or beyond the number of pieces means after the
    last piece, before the finish (OpenAI: the finish chunk; Anthropic: the last
    ``content_block_stop``, ``message_delta`` and ``message_stop``; Gemini: the event with
    ``finishReason``, which then comes apart from the last piece). Gemini sends each tool
    call whole in one event, so there a position is a call. At one position the faults apply
    in this order: ``stall``, ``malformed_after``, then the first of ``error_after`` /
    ``end_after`` / ``cut_after``.

    Non-streamed requests: ``stall`` adds to ``delay``; ``cut_after`` sends the headers and
    half of the body, then aborts the connection; ``end_after`` and ``malformed_after`` send a
    truncated (invalid JSON) body with a matching ``content-length``; ``error_after`` answers
    an error JSON in the wire's shape (OpenAI: 500; Anthropic and Gemini: the status of the
    error type, e.g. 529 for ``overloaded_error``); ``pacing``, ``comments``, ``crlf``,
    ``cr`` and ``split_bytes`` are ignored.
    """

    status: int = 200
    """HTTP status. Statuses >= 400 answer the wire's error JSON (or ``body``): OpenAI
    ``{"error": {...}}``, Anthropic ``{"type": "error", "error": {...}}`` (529:
    ``overloaded_error``), Gemini ``{"error": {"code", "message", "status"}}``.
    ``error_message`` / ``error_type`` customise it when set."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers (override the emulator's own of the same name)."""
    body: bytes | str | dict[str, Any] | None = None
    """Sent verbatim (a dict as JSON) instead of the normal or error body."""
    retry_after: float | str | None = None
    """Header ``retry-after``: a number (``2``, ``1.5``) or a string sent verbatim."""
    retry_after_ms: float | None = None
    """Header ``retry-after-ms``."""
    should_retry: bool | None = None
    """Header ``x-should-retry: true|false``."""
    delay: float = 0.0
    """Seconds to wait before sending the response headers."""
    chunks: int = 8
    """Number of content pieces (each one "token")."""
    text: str | None = None
    """Full content; default: ``chunks`` words of a fixed robot story."""
    finish_reason: str | None = None
    """None = natural (``stop``; ``length`` when max_tokens cut it; ``tool_calls``).
    OpenAI names are mapped to each wire (Anthropic ``end_turn`` / ``max_tokens`` /
    ``tool_use`` / ``refusal``; Gemini ``STOP`` / ``MAX_TOKENS`` / ``SAFETY``); any other
    value (``stop_sequence``, ``RECITATION`` …) is sent verbatim."""
    stall_after: int | None = None
    stall: float = 0.0
    cut_after: int | None = None
    end_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    error_type: str | None = None
    """Of ``error_after`` and status errors. None: the wire's default (OpenAI
    ``server_error``; Anthropic ``overloaded_error`` mid-stream, ``server_error`` is sent as
    ``api_error``; Gemini ``UNAVAILABLE``; OpenAI-style names map to Gemini statuses)."""
    error_message: str | None = None
    """None: the wire's default message for the error."""
    pacing: float = 0.0
    """Seconds between two streamed events."""
    crlf: bool = False
    cr: bool = False
    comments: bool = False
    split_bytes: bool = False
    usage: bool = True
    """OpenAI: honour ``stream_options.include_usage`` (False: behave as if it was not
    asked). Anthropic: False leaves out every ``usage`` object; Gemini: ``usageMetadata``."""
    tool_calls: list[dict[str, Any]] | None = None
    """Explicit tool calls: ``{"name": ..., "arguments": "<json text>" or dict, "id"?: ...}``."""
    cached_tokens: int = 0
    """When > 0, usage reports N of the input tokens as read from a cache: OpenAI
    ``prompt_tokens_details.cached_tokens``; Anthropic ``cache_read_input_tokens`` (then
    ``input_tokens`` counts only the uncached rest, as Anthropic does); Gemini
    ``cachedContentTokenCount``."""
    cache_write_tokens: int = 0
    """Anthropic: when > 0, usage reports N of the input tokens as written to the prompt
    cache (``cache_creation_input_tokens``, and by cache lifetime in ``cache_creation``;
    ``input_tokens`` counts neither these nor the ``cached_tokens`` read, as Anthropic
    does). The other wires have no cache writes."""
    cache_write_1h_tokens: int = 0
    """Anthropic: how many of the ``cache_write_tokens`` went to the 1-hour cache
    (``cache_creation.ephemeral_1h_input_tokens``; the rest are ``ephemeral_5m``)."""
    annotations: list[dict[str, Any]] | None = None
    """OpenAI chat: the answer's citations, as a web-search model gives them (``[{"type":
    "url_citation", "url_citation": {"start_index", "end_index", "title", "url"}}]``): on
    the whole answer's message; streamed, in a delta of their own (``{"annotations": [...]}``)
    after the last piece, before the finishing chunk. The other wires ignore them."""

    reasoning: str | None = None
    """The model's reasoning, before its answer, in each wire's shape: OpenAI
    ``message.reasoning_content`` / ``delta.reasoning_content`` (``reasoning_field``);
    Anthropic a ``thinking`` block with a ``signature`` (``thinking_delta`` pieces, then a
    ``signature_delta``), when the request enables ``thinking``; Gemini parts with
    ``"thought": true``, when the request asks ``thinkingConfig.includeThoughts``. Each
    word is a reasoning token, counted in the output (OpenAI
    ``completion_tokens_details.reasoning_tokens``, Gemini ``thoughtsTokenCount``).
    Streamed, each word is a content position, before the answer's."""
    reasoning_field: str = "reasoning_content"
    """OpenAI: the field the reasoning travels in (``reasoning``: OpenRouter's, Groq's)."""

    def __post_init__(self) -> None:
        if not 100 <= int(self.status) <= 599:  # 529 (Anthropic's "overloaded") included
            raise ValueError(f"status must be an HTTP status code, got {self.status!r}")
        if self.chunks < 0:
            raise ValueError("chunks must be >= 0")
        if self.cache_write_1h_tokens > max(self.cache_write_tokens, 0):
            raise ValueError(
                "cache_write_1h_tokens are a part of cache_write_tokens: give "
                f"cache_write_tokens of at least {self.cache_write_1h_tokens}"
            )

    # -- convenience constructors ---------------------------------------------------------

    @classmethod
    def status_error(
        cls,
        status: int,
        message: str | None = None,
        *,
        type: str | None = None,
        code: str | None = None,
        **kwargs: Any,
    ) -> Reply:
        """An error status; ``message``/``type``/``code`` customise the OpenAI error JSON
        (for the other wires use ``Reply(status=..., error_message=..., error_type=...)``)."""
        if message is not None or type is not None or code is not None:
            kwargs["body"] = {
                "error": {
                    "message": message if message is not None else default_error_message(status),
                    "type": type if type is not None else error_type_for_status(status),
                    "param": None,
                    "code": code,
                }
            }
        return cls(status=status, **kwargs)

    @classmethod
    def rate_limited(cls, retry_after: float | str | None = 1, **kwargs: Any) -> Reply:
        """429 with a ``retry-after`` header."""
        return cls(status=429, retry_after=retry_after, **kwargs)

    def replace(self, **changes: Any) -> Reply:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # -- internals ------------------------------------------------------------------------

    def needs_async(self, stream: bool) -> bool:
        """Whether the response cannot be written in one go."""
        if self.delay > 0:
            return True
        if self.body is not None or self.status >= 400:
            return False
        faulted = (
            self.cut_after is not None
            or self.end_after is not None
            or self.malformed_after is not None
            or self.error_after is not None
            or (self.stall_after is not None and self.stall > 0)
        )
        if not stream:
            return faulted
        return faulted or self.pacing > 0 or self.split_bytes


def error_type_for_status(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    return "invalid_request_error"


_MESSAGES = {
    400: "Invalid request.",
    401: "Incorrect API key provided.",
    403: "You are not allowed to access this resource.",
    404: "The requested resource does not exist.",
    408: "Request timed out.",
    409: "Conflict.",
    422: "Unprocessable entity.",
    429: "Rate limit reached for requests. Please try again later.",
    500: DEFAULT_ERROR_MESSAGE,
    502: "Bad gateway.",
    503: "The engine is currently overloaded, please try again later.",
    504: "Gateway timeout.",
    529: "Overloaded",
}


def default_error_message(status: int) -> str:
    if status in _MESSAGES:
        return _MESSAGES[status]
    if status >= 500:
        return DEFAULT_ERROR_MESSAGE
    return f"Request failed with status {status}."


_GEMINI_PATH = re.compile(r"^/v1(?:beta)?/models/([^:]+):[A-Za-z]+$")


def gemini_model(path: str) -> str | None:
    """The ``{model}`` of a Gemini ``/v1beta/models/{model}:ACTION`` path, else None."""
    match = _GEMINI_PATH.match(path)
    return unquote(match.group(1)) if match else None


@dataclass
class RecordedRequest:
    """One request the emulator received (every path, before any auth check)."""

    method: str
    path: str
    """The path, without the query string."""
    headers: dict[str, str]
    """Lower-case names; repeated headers joined with ", "."""
    body: bytes
    json: Any
    """The parsed JSON body, or None (no body or not JSON)."""
    query: str = ""
    """The query string (without "?"), "" if none."""
    peer: tuple[str, int] | None = None
    """The client's address (host, port): the requests of one connection share it."""

    @property
    def model(self) -> str | None:
        """The ``model`` field of a JSON object body, else the ``{model}`` of a Gemini path."""
        if isinstance(self.json, dict):
            model = self.json.get("model")
            if isinstance(model, str):
                return model
        return gemini_model(self.path)

    def __repr__(self) -> str:
        body = _json.dumps(self.json)[:80] if self.json is not None else repr(self.body[:80])
        return f"RecordedRequest({self.method} {self.path} {body})"
