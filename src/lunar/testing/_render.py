"""The wire-neutral part of the emulator: texts, pieces, token counts, tool calls, jobs, plans.

One engine decides *what* a reply says (`Job`: the pieces, the tool calls, the finish, the
token counts); each wire (`_openai`, `_anthropic`, `_gemini`) only renders a job in its own
shape, as one JSON body or as a `Plan` of SSE events around the content positions at which
`_server` applies the scripted faults.

Token accounting, the same on every wire (deterministic, so tests can compute expected usage
and costs):

* input tokens: for every message (a system prompt counts as one message, on the wires that
  take it apart), the number of whitespace-separated words of its text plus 3
  (``MESSAGE_OVERHEAD``). What counts as text: a string content; the ``text`` of text
  parts/blocks; an Anthropic ``tool_result``'s content; a Gemini ``functionResponse``'s
  ``response`` as JSON text (``json.dumps``, default separators). Images and tool calls
  count 0. Legacy completions: the words of ``prompt``, no overhead.
* output tokens: the content pieces actually produced (``Reply.chunks``, or fewer when the
  request's max tokens cut them) times the number of choices/candidates; for a tool-call
  reply, the argument pieces over all calls (3 per call, or fewer for short arguments).
* total = input + output. Cached tokens (``Reply.cached_tokens``) are part of the input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ._reply import Reply

dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_dumps = dumps

MESSAGE_OVERHEAD = 3
"""Input tokens added per message."""

STORY_TEXT = (
    "Once upon a time a small robot named Lunar woke up in a quiet workshop. "
    "It counted the stars through the window, fixed an old lamp, and dreamed of "
    "flying to the moon with its best friend, a curious cat who loved warm batteries."
)
STORY: tuple[str, ...] = tuple(STORY_TEXT.split())
"""The default content: ``chunks`` words of this story, cycled."""

_WORD = re.compile(r"\s*\S+")


def words(text: Any) -> int:
    """Whitespace-separated words of a string (0 for anything else)."""
    return len(text.split()) if isinstance(text, str) else 0


def count_words(value: Any) -> int:
    """Whitespace-separated words of a message content (string or list of parts)."""
    if isinstance(value, list):
        return sum(words(p.get("text") if isinstance(p, dict) else p) for p in value)
    return words(value)


@lru_cache(maxsize=256)
def default_pieces(chunks: int) -> tuple[str, ...]:
    """``chunks`` words of the story (cycled), the first bare, the others with a leading space."""
    return tuple(
        (STORY[i % len(STORY)] if i == 0 else " " + STORY[i % len(STORY)]) for i in range(chunks)
    )


def split_even(items: list[str], n: int) -> list[str]:
    """Group ``items`` into ``n`` contiguous concatenated groups of near-equal size."""
    size, extra = divmod(len(items), n)
    out: list[str] = []
    start = 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append("".join(items[start:end]))
        start = end
    return out


@lru_cache(maxsize=256)
def split_text(text: str, n: int) -> tuple[str, ...]:
    """Split ``text`` into ``n`` pieces whose concatenation is ``text``.

    At word boundaries when it has at least ``n`` words, else per character (then at most
    ``len(text)`` pieces). An empty text or ``n == 0`` gives no pieces.
    """
    if n <= 0 or not text:
        return ()
    found = _WORD.findall(text)
    consumed = sum(len(w) for w in found)
    if found and consumed < len(text):  # trailing whitespace goes with the last word
        found[-1] += text[consumed:]
    if len(found) >= n:
        return tuple(split_even(found, n))
    return tuple(split_even(list(text), min(n, len(text))))


def content_pieces(reply: Reply) -> tuple[str, ...]:
    if reply.text is None:
        return default_pieces(reply.chunks)
    return split_text(reply.text, reply.chunks)


def example_from_schema(schema: Any, depth: int = 0) -> Any:
    """A deterministic value for a JSON schema: strings "robot", numbers 42, booleans true.

    Type names are matched case-insensitively (Gemini writes ``OBJECT``, ``STRING`` …)."""
    if not isinstance(schema, dict) or depth > 8:
        return "robot"
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return example_from_schema(options[0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if isinstance(k, str) and k.lower() != "null"]
        kind = kinds[0] if kinds else "null"
    if isinstance(kind, str):
        kind = kind.lower()
    if kind is None and isinstance(schema.get("properties"), dict):
        kind = "object"
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {str(k): example_from_schema(v, depth + 1) for k, v in props.items()}
    if kind == "array":
        return [example_from_schema(schema.get("items"), depth + 1)]
    if kind in ("integer", "number"):
        return 42
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "robot"


# -- tool calls ---------------------------------------------------------------------------


@dataclass
class ToolCall:
    id: str
    """"" when the wire has no id for it (Gemini, unless ``Reply.tool_calls`` gives one)."""
    name: str
    arguments: str
    pieces: tuple[str, ...] = field(default=())

    def arguments_object(self) -> dict[str, Any]:
        """The arguments as the JSON object Anthropic and Gemini carry (``{}`` when the
        scripted text is not a JSON object; a stream still sends the text verbatim)."""
        try:
            value = json.loads(self.arguments)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ToolOffer:
    """What a request offers about tools, in wire-neutral terms."""

    functions: tuple[tuple[str, Any], ...]
    """``(name, JSON schema of the arguments)`` of each function tool, in order."""
    mode: str = "auto"
    """``auto`` | ``none`` | ``required`` (any tool must be called)."""
    forced: str | None = None
    """The one tool that must be called, if the request names it."""
    after_tool_result: bool = False
    """The conversation's last turn carries tool results."""


NO_TOOLS = ToolOffer(())


def _pieces_of_arguments(arguments: str) -> tuple[str, ...]:
    return split_text(arguments, 3) if arguments else ("",)


def resolve_tool_calls(offer: ToolOffer, reply: Reply, id_prefix: str | None) -> list[ToolCall]:
    """The tool calls to answer (empty: answer text).

    Explicit ``Reply.tool_calls`` win. Otherwise, when the request offers tools and the mode
    is not ``none``: one call to the forced tool, or to the first tool. Exception (so agent
    loops terminate): when the last turn carries tool results and the choice is not forced
    (``required`` or a named tool), answer text. Ids are ``{id_prefix}{i}``, or "" when
    ``id_prefix`` is None.
    """
    calls: list[ToolCall] = []
    if reply.tool_calls is not None:
        for i, spec in enumerate(reply.tool_calls):
            args = spec.get("arguments", "{}")
            if not isinstance(args, str):
                args = _dumps(args)
            call_id = spec.get("id") or (f"{id_prefix}{i}" if id_prefix is not None else "")
            calls.append(ToolCall(str(call_id), str(spec.get("name", "tool")), args))
    else:
        if not offer.functions or offer.mode == "none":
            return []
        forced = offer.forced
        if offer.after_tool_result and forced is None and offer.mode != "required":
            return []
        name, schema = offer.functions[0]
        if forced is not None:
            name, schema = next(
                ((n, s) for n, s in offer.functions if n == forced), (forced, {"type": "object"})
            )
        args = _dumps(example_from_schema(schema))
        call_id = f"{id_prefix}0" if id_prefix is not None else ""
        calls.append(ToolCall(call_id, name, args))
    for call in calls:
        call.pieces = _pieces_of_arguments(call.arguments)
    return calls


# -- jobs -----------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything needed to render one successful completion, on any wire."""

    kind: str  # "chat" | "completion" (OpenAI) | "anthropic" | "gemini"
    model: str
    stream: bool
    n: int
    include_usage: bool
    """Whether usage is reported (OpenAI streams: when asked; non-streamed OpenAI bodies
    always carry it). Anthropic and Gemini: ``Reply.usage``."""
    prompt_tokens: int
    pieces: tuple[str, ...]
    tool_calls: list[ToolCall]
    finish_reason: str
    """In OpenAI's words (``stop`` …) or a verbatim override; each wire maps it."""
    cached_tokens: int
    cache_write_tokens: int = 0
    """Anthropic: the input tokens written to the prompt cache (``Reply.cache_write_tokens``)."""
    cache_write_1h_tokens: int = 0
    """Anthropic: of them, those to the 1-hour cache (``Reply.cache_write_1h_tokens``)."""
    stop_sequence: str | None = None
    """Anthropic: the ``stop_sequence`` reported with a ``stop_sequence`` finish."""
    sse: bool = True
    """Gemini: False for ``streamGenerateContent`` without ``alt=sse`` (a JSON array)."""
    top_logprobs: int | None = None
    """OpenAI chat: when the request asked ``logprobs``, how many alternatives each token
    lists (its ``top_logprobs``, 0 when not given); None: no logprobs."""
    service_tier: str | None = None
    """The tier that answered (OpenAI's ``service_tier``, in the answer and every chunk):
    what the request asked, ``auto`` answered as ``default``; None: not in the answer."""
    annotations: str | None = None
    """OpenAI chat: the JSON text of the answer's ``annotations`` (``Reply.annotations``)."""
    reasoning: tuple[str, ...] = ()
    """The reasoning's pieces (``Reply.reasoning``, when the wire sends it), one a token."""
    reasoning_field: str = "reasoning_content"

    @property
    def completion_tokens(self) -> int:
        """Every output token: the reasoning's and the answer's."""
        return self.reasoning_tokens + self.answer_tokens

    @property
    def reasoning_tokens(self) -> int:
        return len(self.reasoning) * self.n

    @property
    def answer_tokens(self) -> int:
        if self.tool_calls:
            return sum(len(c.pieces) for c in self.tool_calls) * self.n
        return len(self.pieces) * self.n

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    @property
    def event_stream(self) -> bool:
        """Whether the answer is an SSE stream (the streamed faults apply)."""
        return self.stream and self.sse

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage object."""
        completion = self.completion_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }
        if self.cached_tokens > 0:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        if self.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return usage

    def cache_key(self) -> tuple[Any, ...] | None:
        if self.tool_calls:
            return None
        return (
            self.kind,
            self.model,
            self.stream,
            self.n,
            self.include_usage,
            self.prompt_tokens,
            self.pieces,
            self.finish_reason,
            self.cached_tokens,
            self.cache_write_tokens,
            self.cache_write_1h_tokens,
            self.stop_sequence,
            self.sse,
            self.top_logprobs,
            self.service_tier,
            self.annotations,
            self.reasoning,
            self.reasoning_field,
        )


def make_job(
    kind: str,
    model: str,
    reply: Reply,
    *,
    stream: bool,
    prompt_tokens: int,
    calls: list[ToolCall],
    limit: Any = None,
    n: int = 1,
    include_usage: bool = True,
    stop_sequence: str | None = None,
    sse: bool = True,
    reasoning: bool = True,
) -> Job:
    """The pieces and the natural finish: tool calls (no text), or the reply's pieces cut to
    ``limit`` (then ``length``); ``Reply.finish_reason`` overrides the finish."""
    pieces = content_pieces(reply)
    finish = "stop"
    if calls:
        finish = "tool_calls"
        pieces = ()
    elif isinstance(limit, int) and not isinstance(limit, bool) and limit < len(pieces):
        pieces = pieces[: max(limit, 0)]
        finish = "length"
    if reply.finish_reason is not None:
        finish = reply.finish_reason
    return Job(
        kind=kind,
        model=model,
        stream=stream,
        n=n,
        include_usage=include_usage,
        prompt_tokens=prompt_tokens,
        pieces=pieces,
        tool_calls=calls,
        finish_reason=finish,
        cached_tokens=reply.cached_tokens,
        cache_write_tokens=reply.cache_write_tokens,
        cache_write_1h_tokens=reply.cache_write_1h_tokens,
        stop_sequence=stop_sequence,
        sse=sse,
        reasoning=split_text(reply.reasoning, len(reply.reasoning.split()))
        if reasoning and reply.reasoning
        else (),
        reasoning_field=reply.reasoning_field,
    )


# -- streamed bodies ------------------------------------------------------------------------

Event = str | tuple[str, str]
"""One SSE event: its data, or ``(event name, data)``."""


def frame(event: Event, nl: str, comment: str = "") -> str:
    """The SSE text of one event (``comment`` is a whole comment event to put before it)."""
    if isinstance(event, str):
        return f"{comment}data: {event}{nl}{nl}"
    return f"{comment}event: {event[0]}{nl}data: {event[1]}{nl}{nl}"


@dataclass
class Plan:
    """A streamed body as un-framed SSE events, around the content positions.

    ``pre`` opens the stream, ``positions[k]`` carries the k-th content piece, ``post``
    closes it. ``final``, when set, stands for ``positions[-1] + post`` when no fault sits
    at the end (Gemini puts the finish on the last piece's event)."""

    pre: list[Event]
    positions: list[list[Event]]
    post: list[Event]
    final: list[Event] | None = None

    def events(self) -> Iterator[Event]:
        """Every event of a stream without faults."""
        yield from self.pre
        if self.final is not None and self.positions:
            for position in self.positions[:-1]:
                yield from position
            yield from self.final
            return
        for position in self.positions:
            yield from position
        yield from self.post
