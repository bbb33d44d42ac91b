"""What every wire of the emulator provides to the server (`Wire`), and what they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ._render import Event, Job, Plan
from ._reply import Reply

#: The most output tokens a request may ask of a model (its id's start; the first match),
#: as the real APIs refuse more (Anthropic's and OpenAI's 400, Gemini's out-of-range 400).
MAX_OUTPUT_TOKENS = (
    ("claude-3-haiku", 4096),
    ("claude-3-5-haiku", 8192),
    ("claude-3-7-sonnet", 64000),
    ("claude-sonnet-4", 64000),
    ("claude-haiku-4-5", 64000),
    ("claude-opus-4", 32000),
    ("gpt-4o", 16384),
    ("gpt-4.1", 32768),
    ("gpt-3.5-turbo", 4096),
    ("o4-mini", 100000),
    ("gemini-1.5", 8192),
    ("gemini-2.0", 8192),
    ("gemini-2.5", 65536),
)


def max_output_tokens(model: str) -> int | None:
    """The most output tokens ``model`` takes, when the emulator knows its family."""
    for prefix, limit in MAX_OUTPUT_TOKENS:
        if model.startswith(prefix):
            return limit
    return None


def too_many_tokens(model: str, asked: Any) -> int | None:
    """``model``'s limit when ``asked`` (a request's output budget) is beyond it, else None."""
    limit = max_output_tokens(model)
    if limit is None or not isinstance(asked, int) or isinstance(asked, bool):
        return None
    return limit if asked > limit else None


class Rejection(NamedTuple):
    """A request refused before any scripted reply is taken: status and JSON body."""

    status: int
    body: bytes


@dataclass
class Incoming:
    """A valid generation request, in the terms the server needs."""

    model: str
    """The model whose queue serves it (the body's ``model``, or Gemini's path)."""
    stream: bool
    request: dict[str, Any]
    sse: bool = True


class Wire:
    """A wire format: validation, error shapes and rendering. Stateless; one instance each."""

    name = ""
    malformed: Event = '{"id": "broken'
    """The event sent by ``Reply.malformed_after``: truncated JSON."""

    def authorize(self, headers: dict[str, str], query: str, key: str) -> Rejection | None:
        """None when the request carries ``key`` the way this wire wants it."""
        raise NotImplementedError

    def parse(
        self, request: Any, headers: dict[str, str], path: str, query: str
    ) -> Incoming | Rejection:
        """Validate a request body (already parsed from JSON; None when it was not JSON)."""
        raise NotImplementedError

    def job(self, incoming: Incoming, reply: Reply, number: int) -> Job:
        raise NotImplementedError

    def prompt_cache(self, job: Job, incoming: Incoming, cache: set[str]) -> Job:
        """``job`` with the prompt-cache usage the request's breakpoints give, ``cache``
        holding the prefixes written so far (the server's, under its lock). Only the
        Anthropic wire has breakpoints (``cache_control``)."""
        return job

    def response_id(self, number: int, job: Job) -> str:
        raise NotImplementedError

    def error_body(
        self, status: int, message: str | None = None, type_: str | None = None
    ) -> bytes:
        """The error JSON of an HTTP error status."""
        raise NotImplementedError

    def status_error(self, reply: Reply) -> bytes:
        """The body of a scripted error status (``Reply.status >= 400``)."""
        return self.error_body(reply.status, reply.error_message, reply.error_type)

    def error_response(self, reply: Reply) -> tuple[int, bytes]:
        """The answer of a non-streamed ``error_after``: status and JSON body."""
        raise NotImplementedError

    def stream_error(self, reply: Reply) -> Event:
        """The event of a streamed ``error_after``."""
        raise NotImplementedError

    def render_json(self, job: Job, id_: str, created: str) -> str:
        """The body of a non-streamed answer. ``created`` is JSON text (unix seconds)."""
        raise NotImplementedError

    def render_stream(self, job: Job, id_: str, created: str) -> Plan:
        """The events of a streamed answer. ``created`` is JSON text (unix seconds)."""
        raise NotImplementedError
