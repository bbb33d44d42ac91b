"""Rendering of OpenAI-shaped bodies: texts, token counts, tool calls, chunks.

Token accounting (deterministic, so tests can compute expected usage and costs):

* ``prompt_tokens`` for chat: for every message, the number of whitespace-separated words of
  its content (a string, or a list of parts of which only the ``text`` of text parts counts;
  ``None`` counts 0) plus 3. For legacy completions: the words of ``prompt`` (a list of
  strings: the sum over them; a list of token ids: its length), no per-message overhead.
* ``completion_tokens``: the number of content pieces actually produced (``Reply.chunks``, or
  fewer when ``max_tokens`` / ``max_completion_tokens`` cut it) times ``n``. For a tool-call
  reply: the number of argument pieces over all calls, times ``n``.
* ``total_tokens = prompt_tokens + completion_tokens``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ._reply import Reply

FINGERPRINT = "fp_lunar_mock"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

STORY_TEXT = (
    "Once upon a time a small robot named Lunar woke up in a quiet workshop. "
    "It counted the stars through the window, fixed an old lamp, and dreamed of "
    "flying to the moon with its best friend, a curious cat who loved warm batteries."
)
STORY: tuple[str, ...] = tuple(STORY_TEXT.split())
"""The default content: ``chunks`` words of this story, cycled."""

_WORD = re.compile(r"\s*\S+")


def count_words(value: Any) -> int:
    """Whitespace-separated words of a message content (string or list of parts)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        total = 0
        for part in value:
            if isinstance(part, str):
                total += len(part.split())
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += len(text.split())
        return total
    return 0


def prompt_tokens_chat(messages: list[Any]) -> int:
    """Σ over messages of (words of the content + 3)."""
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        total += count_words(content) + 3
    return total


def prompt_tokens_completion(prompt: Any) -> int:
    """Words of the prompt (list of strings: summed; list of token ids: its length)."""
    if isinstance(prompt, str):
        return len(prompt.split())
    if isinstance(prompt, list):
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += len(item.split())
            elif isinstance(item, int):
                total += 1
            elif isinstance(item, list):
                total += len(item)
        return total
    return 0


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
    words = _WORD.findall(text)
    consumed = sum(len(w) for w in words)
    if words and consumed < len(text):  # trailing whitespace goes with the last word
        words[-1] += text[consumed:]
    if len(words) >= n:
        return tuple(split_even(words, n))
    return tuple(split_even(list(text), min(n, len(text))))


def content_pieces(reply: Reply) -> tuple[str, ...]:
    if reply.text is None:
        return default_pieces(reply.chunks)
    return split_text(reply.text, reply.chunks)


def example_from_schema(schema: Any, depth: int = 0) -> Any:
    """A deterministic value for a JSON schema: strings "robot", numbers 42, booleans true."""
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
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if kinds else "null"
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


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str
    pieces: tuple[str, ...] = field(default=())


def _pieces_of_arguments(arguments: str) -> tuple[str, ...]:
    return split_text(arguments, 3) if arguments else ("",)


def resolve_tool_calls(request: dict[str, Any], reply: Reply, number: int) -> list[ToolCall]:
    """The tool calls to answer (empty: answer text).

    Explicit ``Reply.tool_calls`` win. Otherwise, when the request offers ``tools`` and
    ``tool_choice`` is not ``"none"``: one call to the forced tool, or to the first tool.
    Exception (so agent loops terminate): when the last message has role ``tool`` and the
    tool choice is not forced (``"required"`` or a named function), answer text.
    """
    calls: list[ToolCall] = []
    if reply.tool_calls is not None:
        for i, spec in enumerate(reply.tool_calls):
            args = spec.get("arguments", "{}")
            if not isinstance(args, str):
                args = _dumps(args)
            call_id = spec.get("id") or f"call_mock_{number}_{i}"
            calls.append(ToolCall(str(call_id), str(spec.get("name", "tool")), args))
    else:
        tools = request.get("tools")
        choice = request.get("tool_choice")
        if not isinstance(tools, list) or not tools or choice == "none":
            return []
        functions: list[dict[str, Any]] = [
            t["function"]
            for t in tools
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
        if not functions:
            return []
        forced: str | None = None
        if isinstance(choice, dict):
            fn = choice.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                forced = fn["name"]
        messages = request.get("messages")
        last_is_tool = (
            isinstance(messages, list)
            and bool(messages)
            and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "tool"
        )
        if last_is_tool and forced is None and choice != "required":
            return []
        target = functions[0]
        if forced is not None:
            target = next((f for f in functions if f.get("name") == forced), {"name": forced})
        args = _dumps(example_from_schema(target.get("parameters", {"type": "object"})))
        calls.append(ToolCall(f"call_mock_{number}_0", str(target.get("name", "tool")), args))
    for call in calls:
        call.pieces = _pieces_of_arguments(call.arguments)
    return calls


@dataclass
class Job:
    """Everything needed to render one successful completion."""

    kind: str  # "chat" | "completion"
    model: str
    stream: bool
    n: int
    include_usage: bool
    prompt_tokens: int
    pieces: tuple[str, ...]
    tool_calls: list[ToolCall]
    finish_reason: str
    cached_tokens: int

    @property
    def completion_tokens(self) -> int:
        if self.tool_calls:
            return sum(len(c.pieces) for c in self.tool_calls) * self.n
        return len(self.pieces) * self.n

    def usage(self) -> dict[str, Any]:
        completion = self.completion_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }
        if self.cached_tokens > 0:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
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
        )


@dataclass
class Plan:
    """A streamed body as un-framed SSE payloads, around the content positions."""

    pre: list[str]
    positions: list[list[str]]
    post: list[str]


def error_payload(message: str, type_: str, code: str | None = None) -> str:
    return _dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def render_stream(job: Job, id_: str, created: str) -> Plan:
    """The events of a streamed completion (``[DONE]`` excluded). ``created`` is JSON text."""
    model = _dumps(job.model)
    n = job.n
    if job.kind == "chat":
        prefix = (
            f'{{"id":"{id_}","object":"chat.completion.chunk","created":{created},'
            f'"model":{model},"system_fingerprint":"{FINGERPRINT}","choices":['
        )
    else:
        prefix = (
            f'{{"id":"{id_}","object":"text_completion","created":{created},'
            f'"model":{model},"system_fingerprint":"{FINGERPRINT}","choices":['
        )
    suffix = '],"usage":null}' if job.include_usage else "]}"
    finish = _dumps(job.finish_reason)
    pre: list[str] = []
    positions: list[list[str]] = []
    post: list[str] = []

    if job.kind == "chat":

        def event(i: int, delta: str, finish_json: str = "null") -> str:
            return (
                f'{prefix}{{"index":{i},"delta":{delta},"logprobs":null,'
                f'"finish_reason":{finish_json}}}{suffix}'
            )

        if job.tool_calls:
            for i in range(n):
                first = job.tool_calls[0]
                header = _tool_header(0, first)
                pre.append(
                    event(i, f'{{"role":"assistant","content":null,"tool_calls":[{header}]}}')
                )
            for index, call in enumerate(job.tool_calls):
                for j, piece in enumerate(call.pieces):
                    position: list[str] = []
                    for i in range(n):
                        if j == 0 and index > 0:
                            position.append(
                                event(i, f'{{"tool_calls":[{_tool_header(index, call)}]}}')
                            )
                        position.append(
                            event(
                                i,
                                f'{{"tool_calls":[{{"index":{index},'
                                f'"function":{{"arguments":{_dumps(piece)}}}}}]}}',
                            )
                        )
                    positions.append(position)
        else:
            pre = [event(i, '{"role":"assistant","content":""}') for i in range(n)]
            for piece in job.pieces:
                delta = f'{{"content":{_dumps(piece)}}}'
                positions.append([event(i, delta) for i in range(n)])
        post = [event(i, "{}", finish) for i in range(n)]
    else:

        def tevent(i: int, text: str, finish_json: str = "null") -> str:
            return (
                f'{prefix}{{"text":{text},"index":{i},"logprobs":null,'
                f'"finish_reason":{finish_json}}}{suffix}'
            )

        for piece in job.pieces:
            text = _dumps(piece)
            positions.append([tevent(i, text) for i in range(n)])
        post = [tevent(i, '""', finish) for i in range(n)]
    if job.include_usage:
        post.append(f'{prefix}],"usage":{_dumps(job.usage())}}}')
    return Plan(pre, positions, post)


def _tool_header(index: int, call: ToolCall) -> str:
    return (
        f'{{"index":{index},"id":{_dumps(call.id)},"type":"function",'
        f'"function":{{"name":{_dumps(call.name)},"arguments":""}}}}'
    )


def render_json(job: Job, id_: str, created: str) -> str:
    """The body of a non-streamed completion. ``created`` is JSON text."""
    finish = _dumps(job.finish_reason)
    text = "".join(job.pieces)
    choices: list[str] = []
    if job.kind == "chat":
        message: dict[str, Any]
        if job.tool_calls:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                    for c in job.tool_calls
                ],
                "refusal": None,
            }
        else:
            message = {"role": "assistant", "content": text, "refusal": None}
        message_json = _dumps(message)
        for i in range(job.n):
            choices.append(
                f'{{"index":{i},"message":{message_json},"logprobs":null,"finish_reason":{finish}}}'
            )
        obj = "chat.completion"
    else:
        text_json = _dumps(text)
        for i in range(job.n):
            choices.append(
                f'{{"text":{text_json},"index":{i},"logprobs":null,"finish_reason":{finish}}}'
            )
        obj = "text_completion"
    return (
        f'{{"id":"{id_}","object":"{obj}","created":{created},"model":{_dumps(job.model)},'
        f'"system_fingerprint":"{FINGERPRINT}","choices":[{",".join(choices)}],'
        f'"usage":{_dumps(job.usage())}}}'
    )
