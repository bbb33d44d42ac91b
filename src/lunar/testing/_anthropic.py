"""The Anthropic Messages wire: ``POST /v1/messages`` (and ``/v1/messages/count_tokens``).

Requests are validated as Anthropic does, with its error messages, so an adapter that sends
what the real API would refuse is refused here too: ``anthropic-version`` header, required
``max_tokens``, no unknown top-level fields, roles ``user``/``assistant`` only, non-empty
content and text blocks, known block types, ``temperature`` and ``top_p`` in [0, 1], and
every ``tool_result`` answering a ``tool_use`` of the previous (assistant) message, and at
most 4 ``cache_control`` breakpoints. Prompt caching is emulated: a breakpoint's prefix is
written once and read by the requests after it (``cache_read_input_tokens``,
``cache_creation_input_tokens``), unless a ``Reply`` scripts the cache usage itself.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from typing import Any

from ._render import (
    MESSAGE_OVERHEAD,
    NO_TOOLS,
    Event,
    Job,
    Plan,
    ToolOffer,
    dumps,
    make_job,
    resolve_tool_calls,
    words,
)
from ._reply import Reply, default_error_message
from ._wire import Incoming, Rejection, Wire, too_many_tokens

FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "metadata",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
    }
)
BLOCK_TYPES = (
    "text",
    "image",
    "document",
    "search_result",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "tool_result",
    "server_tool_use",
    "web_search_tool_result",
)
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

FINISH = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
"""OpenAI finish reasons -> Anthropic stop reasons (other values are sent verbatim)."""

PING: Event = ("ping", '{"type": "ping"}')

TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
STATUS_BY_TYPE = {v: k for k, v in TYPE_BY_STATUS.items()}
MESSAGES = {
    "invalid_request_error": "Invalid request.",
    "authentication_error": "invalid x-api-key",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "The requested resource could not be found.",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "Number of requests has exceeded your rate limit. Please try again later.",
    "api_error": "Internal server error",
    "overloaded_error": "Overloaded",
}


def error_type_for_status(status: int) -> str:
    known = TYPE_BY_STATUS.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def wire_error_type(type_: str | None, default: str) -> str:
    """A ``Reply.error_type`` in Anthropic's words (``server_error`` is ``api_error``)."""
    if type_ is None:
        return default
    return "api_error" if type_ == "server_error" else type_


def error_json(type_: str, message: str) -> str:
    return dumps({"type": "error", "error": {"type": type_, "message": message}})


def invalid(message: str) -> Rejection:
    return Rejection(400, error_json("invalid_request_error", message).encode())


def _text_words(content: Any) -> int:
    """Words of a content: a string, or the text (and tool results) of a list of blocks."""
    if isinstance(content, str):
        return words(content)
    total = 0
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text":
                total += words(block.get("text"))
            elif kind == "tool_result":
                total += _text_words(block.get("content"))
    return total


def prompt_tokens(request: dict[str, Any]) -> int:
    """The system prompt (as one message) and each message: words + 3."""
    total = 0
    system = request.get("system")
    if system:
        total += _text_words(system) + MESSAGE_OVERHEAD
    for message in request.get("messages") or ():
        total += _text_words(message.get("content")) + MESSAGE_OVERHEAD
    return total


#: The most ``cache_control`` breakpoints a request may hold.
MAX_BREAKPOINTS = 4


def _bare(blocks: Any) -> Any:
    """Blocks without their ``cache_control``: the prefix a cache entry is written for."""
    if not isinstance(blocks, list):
        return blocks
    return [
        {k: v for k, v in b.items() if k != "cache_control"} if isinstance(b, dict) else b
        for b in blocks
    ]


def _control(block: Any) -> Any:
    return block.get("cache_control") if isinstance(block, dict) else None


def breakpoints(request: dict[str, Any]) -> list[tuple[str, int, bool]]:
    """``(prefix, its prompt tokens, 1-hour)`` of each ``cache_control`` breakpoint, in the
    order Anthropic reads a prompt (tools, system, messages). The prefix is everything up to
    the block, without the breakpoints themselves, and with the model: what a cache entry is
    written for and found by. Tools count no tokens here (as in ``prompt_tokens``)."""
    out: list[tuple[str, int, bool]] = []
    model = request.get("model")
    given = request.get("tools")
    tools: list[Any] = given if isinstance(given, list) else []
    system = request.get("system")
    blocks = system if isinstance(system, list) else []

    def mark(control: Any, prefix: list[Any], tokens: int) -> None:
        if isinstance(control, dict):
            key = json.dumps([model, *prefix], sort_keys=True, default=str)
            out.append((key, tokens, control.get("ttl") == "1h"))

    for i, tool in enumerate(tools):
        mark(_control(tool), [_bare(tools[: i + 1])], 0)
    for i, block in enumerate(blocks):
        mark(_control(block), [_bare(tools), _bare(blocks[: i + 1])], words_of(blocks[: i + 1]))
    base = _text_words(system) + MESSAGE_OVERHEAD if system else 0
    before: list[Any] = []
    for message in request.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for j, block in enumerate(content):
                prefix = [
                    *before,
                    {"role": message.get("role"), "content": _bare(content[: j + 1])},
                ]
                tokens = base + _text_words(content[: j + 1]) + MESSAGE_OVERHEAD
                mark(_control(block), [_bare(tools), _bare(system), prefix], tokens)
        before.append({"role": message.get("role"), "content": _bare(content)})
        base += _text_words(content) + MESSAGE_OVERHEAD
    return out


def words_of(blocks: list[Any]) -> int:
    """The prompt tokens of system blocks (as ``prompt_tokens`` counts the system)."""
    return _text_words(blocks) + MESSAGE_OVERHEAD


def _check_breakpoints(request: dict[str, Any]) -> str | None:
    found = 0
    system = request.get("system")
    groups = [request.get("tools"), system if isinstance(system, list) else None]
    groups += [m.get("content") for m in request.get("messages") or () if isinstance(m, dict)]
    for group in groups:
        for block in group if isinstance(group, list) else ():
            control = _control(block)
            if control is None:
                continue
            if not isinstance(control, dict) or control.get("type") != "ephemeral":
                return "cache_control.type: Input should be 'ephemeral'"
            if control.get("ttl", "5m") not in ("5m", "1h"):
                return "cache_control.ttl: Input should be '5m' or '1h'"
            found += 1
    if found > MAX_BREAKPOINTS:
        return (
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {found}."
        )
    return None


def _tool_use_ids(message: Any) -> list[str]:
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return []
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [
        str(b.get("id")) for b in content if isinstance(b, dict) and b.get("type") == "tool_use"
    ]


def thinking_signature(thinking: str) -> str:
    """The signature the emulator gives a thinking block (base64, as Anthropic's are), and
    wants back with it: the block's text unchanged."""
    digest = hashlib.sha256(b"lunar-thinking:" + thinking.encode()).digest()
    return base64.b64encode(digest).decode()


def thinking_enabled(request: dict[str, Any]) -> bool:
    thinking = request.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")


def _check_thinking(request: dict[str, Any]) -> str | None:
    thinking = request.get("thinking")
    if thinking is None:
        return None
    if not isinstance(thinking, dict) or thinking.get("type") not in (
        "enabled",
        "disabled",
        "adaptive",
    ):
        return (
            "thinking: Input tag found using 'type' does not match any of the expected tags: "
            "'enabled', 'disabled', 'adaptive'"
        )
    if thinking["type"] != "enabled":
        return None
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool):
        return "thinking.enabled.budget_tokens: Field required"
    if budget < 1024:
        return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
    if request["max_tokens"] <= budget:
        return "`max_tokens` must be greater than `thinking.budget_tokens`"
    return None


def _check_block(block: Any, where: str, role: str) -> str | None:
    """An error message for a bad content block, or None."""
    if not isinstance(block, dict):
        return f"{where}: Input should be a valid dictionary or object to extract fields from"
    kind = block.get("type")
    if kind not in BLOCK_TYPES:
        tags = ", ".join(f"'{t}'" for t in BLOCK_TYPES)
        return (
            f"{where}: Input tag '{kind}' found using 'type' does not match any of the "
            f"expected tags: {tags}"
        )
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            return f"{where}.text: Field required"
        if not text:
            return "messages: text content blocks must be non-empty"
    elif kind == "image":
        source = block.get("source")
        if not isinstance(source, dict):
            return f"{where}.image.source: Field required"
        stype = source.get("type")
        if stype == "base64":
            if source.get("media_type") not in IMAGE_TYPES:
                return (
                    f"{where}.image.source.base64.media_type: Input should be 'image/jpeg', "
                    "'image/png', 'image/gif' or 'image/webp'"
                )
            if not isinstance(source.get("data"), str) or not source["data"]:
                return f"{where}.image.source.base64.data: Field required"
        elif stype == "url":
            if not isinstance(source.get("url"), str) or not source["url"]:
                return f"{where}.image.source.url.url: Field required"
        else:
            return (
                f"{where}.image.source: Input tag '{stype}' found using 'type' does not match "
                "any of the expected tags: 'base64', 'url', 'file'"
            )
    elif kind == "tool_use":
        if role != "assistant":
            return f"{where}: tool_use blocks can only be in assistant messages"
        for name in ("id", "name"):
            if not isinstance(block.get(name), str) or not block[name]:
                return f"{where}.tool_use.{name}: Field required"
        if not isinstance(block.get("input"), dict):
            return f"{where}.tool_use.input: Input should be a valid dictionary"
    elif kind == "thinking":
        text, signature = block.get("thinking"), block.get("signature")
        if not isinstance(text, str):
            return f"{where}.thinking.thinking: Field required"
        if not isinstance(signature, str):
            return f"{where}.thinking.signature: Field required"
        if signature != thinking_signature(text):
            return f"{where}: Invalid `signature` in `thinking` block"
    elif kind == "redacted_thinking":
        if not isinstance(block.get("data"), str):
            return f"{where}.redacted_thinking.data: Field required"
    elif kind == "tool_result":
        if role != "user":
            return f"{where}: tool_result blocks can only be in user messages"
        if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
            return f"{where}.tool_result.tool_use_id: Field required"
        inner = block.get("content")
        if inner is not None and not isinstance(inner, (str, list)):
            return f"{where}.tool_result.content: Input should be a valid list"
    return None


def validate(request: dict[str, Any]) -> str | None:
    """An error message in Anthropic's words for a request it would refuse, or None."""
    for key in request:
        if key not in FIELDS:
            return f"{key}: Extra inputs are not permitted"
    for name in ("model", "messages", "max_tokens"):
        if name not in request:
            return f"{name}: Field required"
    if not isinstance(request["model"], str) or not request["model"]:
        return "model: Input should be a valid string"
    limit = request["max_tokens"]
    if not isinstance(limit, int) or isinstance(limit, bool):
        return "max_tokens: Input should be a valid integer"
    if limit < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    error = _check_thinking(request)
    if error is not None:
        return error
    for name in ("temperature", "top_p"):
        value = request.get(name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}: Input should be a valid number"
        if not 0 <= value <= 1:
            return f"{name}: Input should be less than or equal to 1"
    system = request.get("system")
    if system is not None and not isinstance(system, str):
        if not isinstance(system, list):
            return "system: Input should be a valid string"
        for i, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                return f"system.{i}.type: Input should be 'text'"
            if not isinstance(block.get("text"), str) or not block["text"]:
                return "system: text content blocks must be non-empty"
    stops = request.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        return "stop_sequences: Input should be a valid list of strings"
    if "stream" in request and not isinstance(request["stream"], bool):
        return "stream: Input should be a valid boolean"
    messages = request["messages"]
    if not isinstance(messages, list):
        return "messages: Input should be a valid list"
    if not messages:
        return "messages: at least one message is required"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{i}: Input should be a valid dictionary"
        role = message.get("role")
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if not isinstance(content, (str, list)):
            return f"messages.{i}.content: Input should be a valid list"
        last_assistant = i == len(messages) - 1 and role == "assistant"
        if not content and not last_assistant:
            return (
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        if isinstance(content, list):
            for j, block in enumerate(content):
                error = _check_block(block, f"messages.{i}.content.{j}", str(role))
                if error is not None:
                    return error
        # Tool results answer the tool uses of the message right before, all of them.
        asked = _tool_use_ids(messages[i - 1]) if i > 0 else []
        answered = [
            str(b.get("tool_use_id"))
            for b in (content if isinstance(content, list) else ())
            if b.get("type") == "tool_result"
        ]
        for j, tool_use_id in enumerate(answered):
            if tool_use_id not in asked:
                return (
                    f"messages.{i}.content.{j}: unexpected `tool_use_id` found in "
                    f"`tool_result` blocks: {tool_use_id}. Each `tool_result` block must have "
                    "a corresponding `tool_use` block in the previous message."
                )
        if asked and role == "user" and i == len(messages) - 1 and thinking_enabled(request):
            # The turn of the calls this one answers must give its thinking back, first.
            first = messages[i - 1]["content"][0]
            if first.get("type") not in ("thinking", "redacted_thinking"):
                return (
                    f"messages.{i - 1}.content.0.type: Expected `thinking` or "
                    f"`redacted_thinking`, but found `{first.get('type')}`. When `thinking` is "
                    "enabled, a final `assistant` message must start with a thinking block."
                )
        if asked and role == "user":
            missing = [t for t in asked if t not in answered]
            if missing:
                return (
                    f"messages.{i - 1}: `tool_use` ids were found without `tool_result` blocks "
                    f"immediately after: {', '.join(missing)}. Each `tool_use` block must have "
                    "a corresponding `tool_result` block in the next message."
                )
    tools = request.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                return f"tools.{i}: Input should be a valid dictionary"
            if tool.get("type") not in (None, "custom"):
                continue  # a server tool (web search, bash …): not checked
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                return f"tools.{i}.custom.name: Field required"
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                return f"tools.{i}.custom.input_schema: Field required"
            if schema.get("type") != "object":
                return f"tools.{i}.custom.input_schema.type: Input should be 'object'"
    choice = request.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in (
            "auto",
            "any",
            "tool",
            "none",
        ):
            return (
                "tool_choice: Input tag found using 'type' does not match any of the expected "
                "tags: 'auto', 'any', 'tool', 'none'"
            )
        if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
            return "tool_choice.tool.name: Field required"
    return _check_breakpoints(request)


def tool_offer(request: dict[str, Any]) -> ToolOffer:
    tools = request.get("tools")
    if not isinstance(tools, list) or not tools:
        return NO_TOOLS
    functions = tuple(
        (str(t["name"]), t.get("input_schema") or {"type": "object"})
        for t in tools
        if isinstance(t, dict) and t.get("type") in (None, "custom") and "name" in t
    )
    choice = request.get("tool_choice")
    mode, forced = "auto", None
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "none":
            mode = "none"
        elif kind == "any":
            mode = "required"
        elif kind == "tool":
            forced = str(choice.get("name"))
    messages = request["messages"]
    last = messages[-1] if messages else {}
    content = last.get("content")
    after_result = (
        last.get("role") == "user"
        and isinstance(content, list)
        and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)
    )
    return ToolOffer(functions, mode, forced, after_result)


def _with_id(id_: str, obj: dict[str, Any]) -> str:
    """``obj`` as JSON with ``"id"`` first, inserted verbatim (it may be a cache placeholder,
    which ``dumps`` would escape)."""
    return f'{{"id":"{id_}",{dumps(obj)[1:]}'


class AnthropicWire(Wire):
    name = "anthropic"
    malformed: Event = ("content_block_delta", '{"type": "broken')

    def authorize(self, headers: dict[str, str], query: str, key: str) -> Rejection | None:
        given = headers.get("x-api-key")
        if given == key:
            return None
        message = "x-api-key header is required" if not given else "invalid x-api-key"
        return Rejection(401, error_json("authentication_error", message).encode())

    def parse(
        self, request: Any, headers: dict[str, str], path: str, query: str
    ) -> Incoming | Rejection:
        if not headers.get("anthropic-version"):
            return invalid("anthropic-version: header is required")
        if not isinstance(request, dict):
            return invalid(
                "There was an error parsing the body of your request: the body must be a "
                "JSON object"
            )
        error = validate(request)
        if error is not None:
            return invalid(error)
        model, asked = request["model"], request["max_tokens"]
        if (limit := too_many_tokens(model, asked)) is not None:
            return invalid(
                f"max_tokens: {asked} > {limit}, which is the maximum allowed number of output "
                f"tokens for {model}"
            )
        return Incoming(model, request.get("stream") is True, request)

    def count_tokens(self, request: Any, headers: dict[str, str]) -> int | Rejection:
        """``/v1/messages/count_tokens``: the request of a message, without ``max_tokens``."""
        if not isinstance(request, dict):
            return invalid("There was an error parsing the body of your request")
        full = {"max_tokens": 1 << 30, **request}  # (over any thinking budget)
        full.pop("stream", None)
        checked = self.parse(full, headers, "/v1/messages", "")
        if isinstance(checked, Rejection):
            return checked
        return prompt_tokens(request)

    def job(self, incoming: Incoming, reply: Reply, number: int) -> Job:
        request = incoming.request
        calls = resolve_tool_calls(tool_offer(request), reply, f"toolu_mock_{number}_")
        job = make_job(
            "anthropic",
            incoming.model,
            reply,
            stream=incoming.stream,
            prompt_tokens=prompt_tokens(request),
            calls=calls,
            limit=request["max_tokens"],
            include_usage=reply.usage,
            reasoning=thinking_enabled(request),
        )
        if job.finish_reason == "stop_sequence":
            stops = request.get("stop_sequences")
            job.stop_sequence = stops[0] if stops else None
        return job

    def prompt_cache(self, job: Job, incoming: Incoming, cache: set[str]) -> Job:
        """Prompt caching as Anthropic does it, when the reply scripts no cache usage: the
        longest prefix up to a breakpoint written before is read from the cache, the rest up
        to the last breakpoint is written (any length here; Anthropic caches 1024 tokens and
        more), and every breakpoint's prefix is in the cache from then on."""
        if job.cached_tokens or job.cache_write_tokens:
            return job
        marks = breakpoints(incoming.request)
        if not marks:
            return job
        read = max((tokens for key, tokens, _ in marks if key in cache), default=0)
        last_key, last_tokens, hour = marks[-1]
        written = 0 if last_key in cache else max(last_tokens - read, 0)
        cache.update(key for key, _, _ in marks)
        return dataclasses.replace(
            job,
            cached_tokens=read,
            cache_write_tokens=written,
            cache_write_1h_tokens=written if hour else 0,
        )

    def response_id(self, number: int, job: Job) -> str:
        return f"msg_mock_{number}"

    def error_body(
        self, status: int, message: str | None = None, type_: str | None = None
    ) -> bytes:
        kind = wire_error_type(type_, error_type_for_status(status))
        if message is None:
            message = MESSAGES.get(kind) or default_error_message(status)
        return error_json(kind, message).encode()

    def _error(self, reply: Reply) -> tuple[str, str]:
        kind = wire_error_type(reply.error_type, "overloaded_error")
        message = reply.error_message
        if message is None:
            message = MESSAGES.get(kind, "Internal server error")
        return kind, message

    def error_response(self, reply: Reply) -> tuple[int, bytes]:
        kind, message = self._error(reply)
        return STATUS_BY_TYPE.get(kind, 500), error_json(kind, message).encode()

    def stream_error(self, reply: Reply) -> Event:
        return ("error", error_json(*self._error(reply)))

    # -- rendering --------------------------------------------------------------------------

    @staticmethod
    def _usage(job: Job, output_tokens: int) -> dict[str, Any]:
        # input_tokens counts neither the tokens read from the cache nor those written.
        cached, written = job.cached_tokens, job.cache_write_tokens
        usage: dict[str, Any] = {
            "input_tokens": max(job.prompt_tokens - max(cached, 0) - max(written, 0), 0),
            "output_tokens": output_tokens,
        }
        if cached > 0:
            usage["cache_read_input_tokens"] = cached
        if written > 0:
            usage["cache_creation_input_tokens"] = written
            hour = job.cache_write_1h_tokens
            usage["cache_creation"] = {  # the same writes by cache lifetime
                "ephemeral_5m_input_tokens": written - hour,
                "ephemeral_1h_input_tokens": hour,
            }
        return usage

    @staticmethod
    def _text_block(job: Job) -> bool:
        return bool(job.pieces) or not job.tool_calls

    def render_json(self, job: Job, id_: str, created: str) -> str:
        content: list[dict[str, Any]] = []
        if job.reasoning:
            text = job.reasoning_text
            content.append(
                {"type": "thinking", "thinking": text, "signature": thinking_signature(text)}
            )
        if self._text_block(job):
            content.append({"type": "text", "text": "".join(job.pieces)})
        for call in job.tool_calls:
            content.append(
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    "input": call.arguments_object(),
                }
            )
        message: dict[str, Any] = {
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": content,
            "stop_reason": FINISH.get(job.finish_reason, job.finish_reason),
            "stop_sequence": job.stop_sequence,
        }
        if job.include_usage:
            message["usage"] = self._usage(job, job.completion_tokens)
        return _with_id(id_, message)

    def render_stream(self, job: Job, id_: str, created: str) -> Plan:
        start: dict[str, Any] = {
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if job.include_usage:
            start["usage"] = self._usage(job, 1)
        pre: list[Event] = [
            ("message_start", f'{{"type":"message_start","message":{_with_id(id_, start)}}}')
        ]
        positions: list[list[Event]] = []

        def block_start(index: int, block: str) -> Event:
            return (
                "content_block_start",
                f'{{"type":"content_block_start","index":{index},"content_block":{block}}}',
            )

        def block_stop(index: int) -> Event:
            return ("content_block_stop", f'{{"type":"content_block_stop","index":{index}}}')

        def delta(index: int, body: str) -> Event:
            return (
                "content_block_delta",
                f'{{"type":"content_block_delta","index":{index},"delta":{body}}}',
            )

        index = -1  # of the block open
        open_kind = ""
        carry: list[Event] = []  # what opens the block whose first position comes next

        def close() -> list[Event]:
            if open_kind != "thinking":
                return [block_stop(index)]
            signature = dumps(thinking_signature(job.reasoning_text))
            return [
                delta(index, f'{{"type":"signature_delta","signature":{signature}}}'),
                block_stop(index),
            ]

        def open_block(header: str, kind: str) -> None:
            nonlocal index, open_kind
            if index < 0:  # the first block
                pre.extend([block_start(0, header), PING])
            else:
                carry.extend([*close(), block_start(index + 1, header)])
            index += 1
            open_kind = kind

        def position(event: Event) -> None:
            positions.append([*carry, event])
            carry.clear()

        if job.reasoning:
            open_block('{"type":"thinking","thinking":""}', "thinking")
            for piece in job.reasoning:
                position(delta(index, f'{{"type":"thinking_delta","thinking":{dumps(piece)}}}'))
        if self._text_block(job):
            open_block('{"type":"text","text":""}', "text")
            for piece in job.pieces:
                position(delta(index, f'{{"type":"text_delta","text":{dumps(piece)}}}'))
        for call in job.tool_calls:
            header = (
                f'{{"type":"tool_use","id":{dumps(call.id)},"name":{dumps(call.name)},'
                '"input":{}}'
            )
            open_block(header, "tool")
            # Claude streams a call without arguments as one empty piece, not as "{}".
            no_args = call.arguments.replace(" ", "") == "{}"
            for piece in ("",) if no_args else call.pieces:
                json_delta = f'{{"type":"input_json_delta","partial_json":{dumps(piece)}}}'
                position(delta(index, json_delta))
        closing: dict[str, Any] = {
            "type": "message_delta",
            "delta": {
                "stop_reason": FINISH.get(job.finish_reason, job.finish_reason),
                "stop_sequence": job.stop_sequence,
            },
        }
        if job.include_usage:
            closing["usage"] = {"output_tokens": job.completion_tokens}
        post: list[Event] = [
            *carry,
            *close(),
            ("message_delta", dumps(closing)),
            ("message_stop", '{"type":"message_stop"}'),
        ]
        return Plan(pre, positions, post)


ANTHROPIC = AnthropicWire()
