"""Anthropic Messages: OpenAI-shaped requests in, Anthropic's wire out, and back again."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from .._errors import (
    APIConnectionError,
    BadRequestError,
    error_from_stream_event,
)
from .._types import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    Function,
    ReasoningDelta,
    ToolCall,
    Usage,
    tokens,
)
from ._base import HTTPRequest, Target
from ._shared import (
    ChunkMaker,
    HTTPAdapter,
    dump_body,
    dumps,
    file_data,
    image_source,
    json_object,
    merge_extra,
    system_text,
    text_of,
    thinking_asked,
    tool_arguments_object,
)

API_VERSION = "2023-06-01"
#: ``max_tokens`` (which Anthropic requires) when the request gives none: the model's
#: maximum output up to ``DEFAULT_MAX_TOKENS_CAP`` (a larger reservation counts against the
#: account's output rate limit), or ``DEFAULT_MAX_TOKENS`` for a model the catalogue does
#: not know.
DEFAULT_MAX_TOKENS = 4096
DEFAULT_MAX_TOKENS_CAP = 8192
#: The least ``thinking.budget_tokens`` Anthropic takes.
MIN_THINKING_BUDGET = 1024

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",  # cut short, by the context window
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _content_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for part in content or ():
        kind = part.get("type")
        if kind == "text":
            if part["text"]:  # Anthropic refuses empty text blocks
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            src = image_source(part)
            source: dict[str, Any]
            if src.data is not None:
                source = {"type": "base64", "media_type": src.media_type, "data": src.data}
            else:
                source = {"type": "url", "url": src.url}
            blocks.append({"type": "image", "source": source})
        elif kind == "file":
            media_type, data = file_data(part, "anthropic")
            source = {"type": "base64", "media_type": media_type, "data": data}
            blocks.append({"type": "document", "source": source})
        elif kind == "input_audio":
            raise BadRequestError(
                "Anthropic models take no audio input: leave out the input_audio part, "
                "or choose a model that takes audio",
                param="messages.content.input_audio",
            )
        else:
            continue
        control = part.get("cache_control")
        if control is not None and blocks:  # a prompt-cache breakpoint (LiteLLM's form too)
            blocks[-1]["cache_control"] = control
    return blocks


def _cache_control(msg: Mapping[str, Any]) -> Any:
    """A breakpoint on a whole message (LiteLLM's ``{"role", "content", "cache_control"}``),
    or on its last content part: where the message's last block gets it."""
    control = msg.get("cache_control")
    if control is None:
        content = msg.get("content")
        if type(content) is list and content and isinstance(content[-1], Mapping):
            control = content[-1].get("cache_control")
    return control


def _system(messages: list[Mapping[str, Any]]) -> str | list[dict[str, Any]]:
    """The system prompt: one string, or text blocks when it holds prompt-cache
    breakpoints (each system message's parts, each with its own ``cache_control``)."""
    turns = [m for m in messages if m.get("role") in ("system", "developer")]
    if not any(_cache_control(m) is not None or _any_part_cached(m) for m in turns):
        return system_text(messages)
    blocks: list[dict[str, Any]] = []
    for msg in turns:
        made = _content_blocks(msg.get("content"))
        if made and msg.get("cache_control") is not None:
            made[-1]["cache_control"] = msg["cache_control"]
        blocks.extend(b for b in made if b["type"] == "text")
    return blocks


def _any_part_cached(msg: Mapping[str, Any]) -> bool:
    content = msg.get("content")
    return type(content) is list and any(
        isinstance(p, Mapping) and "cache_control" in p for p in content
    )


def _messages(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI turns -> Anthropic turns: tool results become user ``tool_result`` blocks,
    assistant tool calls ``tool_use`` blocks, and consecutive same-role turns are merged
    (the API requires alternation)."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        role = msg["role"]
        if role in ("system", "developer"):
            continue
        if role in ("tool", "function"):
            role = "user"
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": msg.get("tool_call_id", ""),
                "content": text_of(msg.get("content")),
            }
            if (control := _cache_control(msg)) is not None:
                block["cache_control"] = control
            blocks = [block]
        else:
            blocks = _content_blocks(msg.get("content"))
            if blocks and (control := msg.get("cache_control")) is not None:
                blocks[-1]["cache_control"] = control
            thought = msg.get("thinking_blocks") if role == "assistant" else None
            if thought:
                # Claude's signed thinking, first in its turn as it gave it: a tool-use
                # conversation with thinking needs it back on the turn of the calls.
                blocks[:0] = [_thinking_block(b) for b in thought]
            for call in msg.get("tool_calls") or ():
                fn = call.get("function", {})
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id", ""),
                        "name": fn.get("name", ""),
                        "input": tool_arguments_object(fn.get("arguments")),
                    }
                )
        if not blocks:
            continue  # an empty answer or question: Anthropic refuses a turn without content
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return out


def _thinking_block(block: Mapping[str, Any]) -> dict[str, Any]:
    """A thinking block with only Anthropic's fields: an answer's, for
    ``message.thinking_blocks`` (a field it lacks is empty), or one sent back (validated)."""
    if block.get("type") == "redacted_thinking":
        return {"type": "redacted_thinking", "data": block.get("data", "")}
    return {
        "type": "thinking",
        "thinking": block.get("thinking", ""),
        "signature": block.get("signature", ""),
    }


def _thinking(body: Mapping[str, Any], target: Target, given: Any, default: int) -> tuple[Any, int]:
    """``(thinking field or None, max_tokens)``: what the body asks of reasoning (``thinking``
    or ``reasoning_effort``), and ``max_tokens``, which must exceed the budget. Given
    (``given``), an explicit budget must fit under it; an effort's budget is lowered to
    half of it. Not given, it is raised above the budget by ``DEFAULT_MAX_TOKENS``."""
    asked = thinking_asked(body, target)
    limit = given or default
    if asked is None:
        return None, limit
    if asked.kind != "enabled":
        return {"type": asked.kind}, limit
    budget = asked.budget
    assert budget is not None
    explicit = asked.param == "thinking"
    param = "thinking.budget_tokens" if explicit else "reasoning_effort"
    if budget < MIN_THINKING_BUDGET:
        raise BadRequestError(
            f"'{param}' must be at least {MIN_THINKING_BUDGET} for Anthropic models, got "
            f"{budget} (param: {param})",
            param=param,
        )
    if not given:
        limit = max(limit, budget + DEFAULT_MAX_TOKENS)
    elif budget >= given:
        if explicit or given < 2 * MIN_THINKING_BUDGET:
            raise BadRequestError(
                f"'{param}' asks a thinking budget of {budget} tokens, which must be less than "
                f"max_tokens ({given}) for Anthropic models: raise max_tokens or lower the "
                f"budget (param: {param})",
                param=param,
            )
        budget = given // 2
    return {"type": "enabled", "budget_tokens": budget}, limit


def _tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    out = {
        "name": fn["name"],
        "description": fn.get("description", ""),
        "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
    }
    if tool.get("cache_control") is not None:  # a breakpoint after the tools up to here
        out["cache_control"] = tool["cache_control"]
    return out


def _stop_sequence(reason: Any, holder: Mapping[str, Any]) -> str | None:
    """Which of the request's stop sequences ended the answer (``stop_sequence`` beside a
    ``stop_reason`` of "stop_sequence"), else None."""
    if reason != "stop_sequence":
        return None
    stop = holder.get("stop_sequence")
    return stop if isinstance(stop, str) else None


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None and parallel is None:
        return None
    if isinstance(choice, Mapping):
        out: dict[str, Any] = {"type": "tool", "name": choice.get("function", {}).get("name")}
    else:
        out = {"type": {"required": "any", "none": "none"}.get(choice or "auto", "auto")}
    if parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _usage(u: Mapping[str, Any], output_tokens: Any = None) -> Usage:
    cached = tokens(u.get("cache_read_input_tokens"))
    created = tokens(u.get("cache_creation_input_tokens"))
    hour = 0
    # The writes by cache lifetime: those to the 1-hour cache cost more (2x input, 5m 1.25x).
    if type(ttl := u.get("cache_creation")) is dict:
        hour = tokens(ttl.get("ephemeral_1h_input_tokens"))
        if not created:  # the breakdown alone: its sum is the writes
            created = tokens(ttl.get("ephemeral_5m_input_tokens")) + hour
        hour = min(hour, created)
    return Usage(
        prompt_tokens=tokens(u.get("input_tokens")) + cached + created,
        completion_tokens=tokens(
            u.get("output_tokens") if output_tokens is None else output_tokens
        ),
        cached_tokens=cached,
        cache_write_tokens=created,
        cache_write_1h_tokens=hour,
    )


class AnthropicStreamTranslator(ChunkMaker):
    """Anthropic's event stream -> OpenAI-shaped chunks. Tool calls are numbered among tool
    calls (OpenAI's ``index``), not among all content blocks (Anthropic's)."""

    def __init__(self, target: Target) -> None:
        super().__init__(target, "")
        self._input: Mapping[str, Any] = {}
        self._tool_index: dict[int, int] = {}
        self._no_args: set[int] = set()  # tool_use blocks with no arguments yet
        self._finished = False
        self._stopped = False

    def _translate(self, data: bytes, out: list[ChatCompletionChunk]) -> None:
        for event in self._sse.feed(data):
            obj = json_object(event.data, self._provider)
            kind = obj.get("type") or event.event
            if kind == "content_block_delta":
                delta = obj.get("delta") or {}
                dtype = delta.get("type")
                if dtype == "text_delta":
                    out.append(self._chunk(ChoiceDelta(content=delta.get("text", ""))))
                elif dtype == "thinking_delta":
                    text = delta.get("thinking", "")
                    if text:
                        out.append(self._chunk(ReasoningDelta(reasoning_content=text)))
                elif dtype == "signature_delta":
                    block = {"type": "thinking", "signature": delta.get("signature", "")}
                    out.append(self._chunk(ReasoningDelta(thinking_blocks=[block])))
                elif dtype == "input_json_delta":
                    block_index = obj.get("index", 0)
                    index = self._tool_index.get(block_index)
                    partial = delta.get("partial_json", "")
                    if index is not None and partial:
                        self._no_args.discard(block_index)
                        call = ChoiceDeltaToolCall(index, function=Function(None, partial))
                        out.append(self._chunk(ChoiceDelta(tool_calls=[call])))
            elif kind == "content_block_start":
                block = obj.get("content_block") or {}
                if block.get("type") == "tool_use":
                    block_index = obj.get("index", 0)
                    index = self._tool_index[block_index] = len(self._tool_index)
                    self._no_args.add(block_index)
                    call = ChoiceDeltaToolCall(
                        index, block.get("id"), "function", Function(block.get("name"), "")
                    )
                    out.append(self._chunk(ChoiceDelta(tool_calls=[call])))
                elif block.get("type") == "text" and block.get("text"):
                    out.append(self._chunk(ChoiceDelta(content=block["text"])))
                elif block.get("type") == "thinking" and block.get("thinking"):
                    out.append(self._chunk(ReasoningDelta(reasoning_content=block["thinking"])))
                elif block.get("type") == "redacted_thinking":
                    thought = [_thinking_block(block)]
                    out.append(self._chunk(ReasoningDelta(thinking_blocks=thought)))
            elif kind == "content_block_stop":
                block_index = obj.get("index", 0)
                if block_index in self._no_args:
                    # Claude streams a call without arguments as one empty ``partial_json``;
                    # they are "{}", as unstreamed (and as OpenAI streams them).
                    self._no_args.discard(block_index)
                    call = ChoiceDeltaToolCall(
                        self._tool_index[block_index], function=Function(None, "{}")
                    )
                    out.append(self._chunk(ChoiceDelta(tool_calls=[call])))
            elif kind == "message_start":
                message = obj.get("message") or {}
                self._id = message.get("id", "")
                self._model = message.get("model") or self._model
                self._input = message.get("usage") or {}
                if self._input:
                    out.append(self._prompt_usage(_usage(self._input, 0)))
                out.append(self._chunk(ChoiceDelta(role="assistant", content="")))
            elif kind == "message_delta":
                delta = obj.get("delta") or {}
                reason = delta.get("stop_reason")
                usage = obj.get("usage") or {}
                self._finished = True
                counted = {
                    **self._input,
                    **{k: v for k, v in usage.items() if v is not None and k != "output_tokens"},
                }
                chunk = self._chunk(
                    ChoiceDelta(),
                    FINISH_REASONS.get(reason or "end_turn", "stop"),
                    # No usage on the wire at all: none here either, so that it is
                    # estimated rather than billed as zero.
                    _usage(counted, usage.get("output_tokens"))
                    if any(v is not None for v in (*self._input.values(), *usage.values()))
                    else None,
                )
                chunk.choices[0].stop_sequence = _stop_sequence(reason, delta)
                out.append(chunk)
            elif kind == "message_stop":
                self._stopped = True
            elif kind == "error":
                raise error_from_stream_event(obj.get("error") or obj, self._provider)
            # ping and unknown events carry nothing for callers

    def _end(self) -> list[ChatCompletionChunk]:
        if not (self._finished or self._stopped):
            raise APIConnectionError(
                f"The stream from '{self._provider}' ended before it was complete "
                "(no message_delta and no message_stop)"
            )
        return []


class AnthropicAdapter(HTTPAdapter):
    multiple_choices = False  # the Messages API has no ``n``: one message per request

    def build_request(self, body: Mapping[str, Any], target: Target, stream: bool) -> HTTPRequest:
        messages = body["messages"]
        dep = target.deployment
        thinking, max_tokens = _thinking(
            body,
            target,
            body.get("max_completion_tokens") or body.get("max_tokens"),
            min(dep.max_output_tokens or DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS_CAP),
        )
        payload: dict[str, Any] = {
            "model": dep.provider_model,
            "messages": _messages(messages),
            "max_tokens": max_tokens,
        }
        if thinking is not None:
            payload["thinking"] = thinking
        system = _system(messages)
        if system:
            payload["system"] = system
        if body.get("temperature") is not None:
            # OpenAI's range is 0-2, Anthropic's 0-1: the top of one is the top of the other.
            payload["temperature"] = min(float(body["temperature"]), 1.0)
        if body.get("top_p") is not None:
            payload["top_p"] = body["top_p"]
        if body.get("top_k") is not None:
            payload["top_k"] = body["top_k"]
        stop = body.get("stop")
        if stop:
            payload["stop_sequences"] = [stop] if isinstance(stop, str) else stop
        if body.get("user"):
            payload["metadata"] = {"user_id": body["user"]}
        tools = body.get("tools")
        if tools:
            payload["tools"] = [_tool(t) for t in tools]
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None and tools:
            payload["tool_choice"] = choice
        merge_extra(payload, body)
        if stream:
            payload["stream"] = True
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if stream else "application/json",
            "anthropic-version": API_VERSION,
        }
        if target.api_key:
            headers["x-api-key"] = target.api_key
        headers.update(target.headers)
        url = target.base_url.rstrip("/") + "/v1/messages"
        return HTTPRequest("POST", url, headers, dump_body(payload))

    def parse_response(self, content: bytes, target: Target) -> ChatCompletion:
        obj = json_object(content, target.provider)
        if obj.get("type") == "error":
            raise error_from_stream_event(obj.get("error"), target.provider)
        texts, calls = [], []
        thoughts: list[dict[str, Any]] = []
        for block in obj.get("content") or ():
            kind = block.get("type")
            if kind == "text":
                texts.append(block.get("text", ""))
            elif kind == "tool_use":
                calls.append(
                    ToolCall(
                        block.get("id", ""),
                        Function(block.get("name"), dumps(block.get("input") or {})),
                    )
                )
            elif kind in ("thinking", "redacted_thinking"):
                thoughts.append(_thinking_block(block))
        message = ChatCompletionMessage(
            content="".join(texts) if texts or not calls else None, tool_calls=calls or None
        )
        if thoughts:
            message.reasoning_content = "".join(b.get("thinking", "") for b in thoughts)
            message.thinking_blocks = thoughts
        stop_reason = obj.get("stop_reason")
        reason = FINISH_REASONS.get(stop_reason or "end_turn", "stop")
        return ChatCompletion(
            id=obj.get("id", ""),
            created=int(time.time()),
            model=obj.get("model") or target.deployment.provider_model,
            choices=[Choice(0, message, reason, None, _stop_sequence(stop_reason, obj))],
            usage=_usage(obj["usage"]) if obj.get("usage") else None,
            provider=target.provider,
        )

    def stream_translator(self, target: Target) -> AnthropicStreamTranslator:
        return AnthropicStreamTranslator(target)


ADAPTER = AnthropicAdapter()
