"""Anthropic Messages API on top of the engine: sans-I/O translation both ways.

* ``to_chat_body``: an Anthropic ``POST /v1/messages`` body -> an OpenAI chat body plus the
  Lunar options (``fallbacks``, ``provider``), ready for ``lunar._request.chat_body``.
* ``message_from_completion``: a ``ChatCompletion`` -> an Anthropic ``Message``.
* ``MessageStreamEncoder``: ``ChatCompletionChunk`` objects in, Anthropic's event stream out
  (``message_start``, ``content_block_start/delta/stop``, ``message_delta``,
  ``message_stop``, or ``error``), as bytes ready to write.
* ``error_body``: an ``APIError`` in Anthropic's error shape.
* ``signed_tool_id`` / ``unsigned_tool_id``: a Gemini thought signature in a ``tool_use`` id
  and back (Anthropic's block has no field for it).

No sockets and no event loop here: tests feed objects and compare what comes out.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from .._engine import TOO_MANY_STOPS
from .._errors import APIError, BadRequestError, LunarError
from .._json import dumps
from .._request import bad
from .._types import ChatCompletion, ChatCompletionChunk, ReasoningDelta, Usage, compact_json

__all__ = [
    "ERROR_TYPES",
    "STOP_REASONS",
    "MessageStreamEncoder",
    "error_body",
    "error_type",
    "message_from_completion",
    "signed_tool_id",
    "to_chat_body",
    "unsigned_tool_id",
]

# OpenAI finish_reason -> Anthropic stop_reason
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# HTTP status -> Anthropic error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}


def _int(value: Any, name: str, required: bool = False) -> int | None:
    if value is None:
        if required:
            raise bad(f"'{name}' is required", name)
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(f"'{name}' must be a positive integer, got {value!r}", name)
    return value


def _text_blocks(value: Any, where: str) -> str:
    """A string, or a list of text blocks, as one string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, block in enumerate(value):
            if not isinstance(block, Mapping) or block.get("type") != "text":
                raise bad(f"'{where}[{i}]' must be a text block", f"{where}[{i}]")
            text = block.get("text")
            if not isinstance(text, str):
                raise bad(f"'{where}[{i}].text' must be a string", f"{where}[{i}].text")
            texts.append(text)
        return "\n\n".join(texts) if where == "system" else "".join(texts)
    raise bad(f"'{where}' must be a string or a list of text blocks", where)


def _image_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise bad(f"'{where}.source' must be an object", f"{where}.source")
    kind = source.get("type")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str) or not data:
            raise bad(f"'{where}.source' needs 'media_type' and base64 'data'", f"{where}.source")
        url = f"data:{media};base64,{data}"
    elif kind == "url":
        given = source.get("url")
        if not isinstance(given, str) or not given:
            raise bad(f"'{where}.source.url' must be a URL", f"{where}.source.url")
        url = given
    else:
        raise bad(
            f"'{where}.source.type' must be 'base64' or 'url', got {kind!r}", f"{where}.source"
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _document_part(block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A ``document`` block: base64 data (a PDF) as an OpenAI ``file`` part, which every
    provider takes; plain text as a text part."""
    source = block.get("source")
    if not isinstance(source, Mapping):
        raise bad(f"'{where}.source' must be an object", f"{where}.source")
    kind, data = source.get("type"), source.get("data")
    if kind == "text" and isinstance(data, str):
        return {"type": "text", "text": data}
    if kind == "base64" and isinstance(data, str) and data:
        media = source.get("media_type")
        if not isinstance(media, str):
            raise bad(f"'{where}.source.media_type' must be a string", f"{where}.source.media_type")
        title = block.get("title")
        name = title if isinstance(title, str) and title else "document.pdf"
        return {
            "type": "file",
            "file": {"file_data": f"data:{media};base64,{data}", "filename": name},
        }
    raise bad(
        f"'{where}.source' must be base64 data or text here (a URL or content source is not "
        "supported)",
        f"{where}.source",
    )


def _media_part(block: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """An ``image`` or ``document`` block as an OpenAI part; None for another type."""
    kind = block.get("type")
    if kind == "image":
        return _image_part(block, where)
    if kind == "document":
        return _document_part(block, where)
    return None


def _tool_result_text(block: Mapping[str, Any], where: str, media: list[dict[str, Any]]) -> str:
    """A ``tool_result``'s text; its images and documents go to ``media`` (an OpenAI tool
    message holds text only: they follow the tool messages in a user message, as parts)."""
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping):
                raise bad(f"'{where}.content[{i}]' must be a block", f"{where}.content[{i}]")
            if part.get("type") == "text":
                t = part.get("text")
                if not isinstance(t, str):
                    raise bad(
                        f"'{where}.content[{i}].text' must be a string",
                        f"{where}.content[{i}].text",
                    )
                parts.append(t)
            elif (shown := _media_part(part, f"{where}.content[{i}]")) is not None:
                media.append(shown)
            else:
                raise bad(
                    f"'{where}.content[{i}].type' {part.get('type')!r} is not supported in a "
                    "tool_result here (text, image, document)",
                    f"{where}.content[{i}].type",
                )
        text = "".join(parts)
    else:
        raise bad(f"'{where}.content' must be a string or a list of blocks", f"{where}.content")
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    return text


# Gemini's thought signatures in tool-use ids. Gemini 3 refuses a function call sent back
# without the signature it gave it, and Anthropic's ``tool_use`` block has no field for one:
# the gateway writes a signed call's id as ``<call id>__lsig_<signature>`` and reads it back
# the same way (LiteLLM carries Gemini's signatures in the call id too). A signature is
# base64 text; in the id ``+`` is ``-``, ``/`` is ``_s`` and ``=`` is ``_p``, so the id keeps
# to Anthropic's alphabet (``[a-zA-Z0-9_-]``), the encoded signature never holds ``__``, and
# the last marker splits any id exactly. An id without a signature is written as it is —
# unless it holds the marker itself, when an empty signature follows it, so it reads back
# unchanged.
_SIG_MARK = "__lsig_"
_SIG_ENCODE = str.maketrans({"+": "-", "/": "_s", "=": "_p"})
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=]+")
_SIG_ENCODED = re.compile(r"(?:[A-Za-z0-9-]|_[sp])*")


def signed_tool_id(call_id: str, extra_content: Mapping[str, Any] | None) -> str:
    """The ``tool_use`` id of a call: its id, with the call's Gemini thought signature
    (``extra_content.google.thought_signature``) when it has one."""
    google = extra_content.get("google") if extra_content is not None else None
    sig = google.get("thought_signature") if isinstance(google, Mapping) else None
    if isinstance(sig, str) and _BASE64_TEXT.fullmatch(sig):
        return call_id + _SIG_MARK + sig.translate(_SIG_ENCODE)
    # Gemini's signatures are base64: anything else is not carried (as no signature).
    return call_id + _SIG_MARK if _SIG_MARK in call_id else call_id


def unsigned_tool_id(tool_id: str, where: str) -> tuple[str, str | None]:
    """``(call id, thought signature or None)`` of a ``tool_use`` id (``signed_tool_id``'s
    inverse). Raises ``BadRequestError`` naming ``where`` for a marker not followed by a
    signature Lunar wrote: the id was changed on its way back."""
    at = tool_id.rfind(_SIG_MARK)
    if at < 0:
        return tool_id, None
    encoded = tool_id[at + len(_SIG_MARK) :]
    if not _SIG_ENCODED.fullmatch(encoded):
        raise bad(
            f"'{where}' holds '{_SIG_MARK}' but no thought signature the gateway wrote after "
            "it: send the tool_use id back as the answer had it",
            where,
        )
    if not encoded:
        return tool_id[:at], None
    sig = encoded.replace("-", "+").replace("_s", "/").replace("_p", "=")
    return tool_id[:at], sig


def _thought(block: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """A ``thinking`` or ``redacted_thinking`` block of an assistant turn, for the turn's
    ``thinking_blocks``; None for one without a signature (another model's reasoning, as
    the gateway wrote it: nothing Anthropic would take back)."""
    if block.get("type") == "redacted_thinking":
        data = block.get("data")
        if not isinstance(data, str):
            raise bad(f"'{where}.data' must be a string", f"{where}.data")
        return {"type": "redacted_thinking", "data": data}
    text, signature = block.get("thinking"), block.get("signature")
    if not isinstance(text, str):
        raise bad(f"'{where}.thinking' must be a string", f"{where}.thinking")
    if signature is not None and not isinstance(signature, str):
        raise bad(f"'{where}.signature' must be a string", f"{where}.signature")
    if not signature:
        return None
    return {"type": "thinking", "thinking": text, "signature": signature}


def _cached(part: dict[str, Any], block: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``part`` with ``block``'s ``cache_control`` (a prompt-cache breakpoint), when it has
    one: it travels in Lunar's request (as LiteLLM carries it in OpenAI-shaped parts) to
    Anthropic's models, and is left out for the others."""
    control = block.get("cache_control")
    if control is not None:
        if not isinstance(control, Mapping):
            param = f"{where}.cache_control"
            raise bad(f"'{param}' must be an object such as {{'type': 'ephemeral'}}", param)
        part["cache_control"] = control
    return part


def _any_cached(blocks: list[Any]) -> bool:
    return any(isinstance(b, Mapping) and "cache_control" in b for b in blocks)


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list of {'role', 'content'} objects", "messages")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise bad(f"'{where}' must be an object", where)
        role = msg.get("role")
        if role not in ("user", "assistant"):
            raise bad(
                f"'{where}.role' must be 'user' or 'assistant' (the system prompt is the "
                f"top-level 'system' field), got {role!r}",
                f"{where}.role",
            )
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad(
                f"'{where}.content' must be a string or a list of content blocks",
                f"{where}.content",
            )
        parts: list[dict[str, Any]] = []
        tool_calls: list[dict[str, Any]] = []
        tool_results: list[dict[str, Any]] = []
        result_media: list[dict[str, Any]] = []
        thoughts: list[dict[str, Any]] = []
        for j, block in enumerate(content):
            bw = f"{where}.content[{j}]"
            if not isinstance(block, Mapping):
                raise bad(f"'{bw}' must be a content block object", bw)
            kind = block.get("type")
            if kind == "text":
                text = block.get("text")
                if not isinstance(text, str):
                    raise bad(f"'{bw}.text' must be a string", f"{bw}.text")
                parts.append(_cached({"type": "text", "text": text}, block, bw))
            elif role == "user" and (media := _media_part(block, bw)) is not None:
                parts.append(_cached(media, block, bw))
            elif kind == "tool_use" and role == "assistant":
                tid, name = block.get("id"), block.get("name")
                if not isinstance(tid, str) or not isinstance(name, str) or not name:
                    raise bad(f"'{bw}' needs string 'id' and 'name'", bw)
                tool_input = block.get("input", {})
                tid, sig = unsigned_tool_id(tid, f"{bw}.id")
                call: dict[str, Any] = {
                    "id": tid,
                    "type": "function",
                    "function": {"name": name, "arguments": compact_json(tool_input)},
                }
                if sig is not None:
                    # Where the Gemini adapter sends it from; other providers drop it.
                    call["extra_content"] = {"google": {"thought_signature": sig}}
                tool_calls.append(call)
            elif kind == "tool_result" and role == "user":
                tid = block.get("tool_use_id")
                if not isinstance(tid, str):
                    raise bad(f"'{bw}.tool_use_id' must be a string", f"{bw}.tool_use_id")
                tid = unsigned_tool_id(tid, f"{bw}.tool_use_id")[0]
                result: Any = _tool_result_text(block, bw, result_media)
                if "cache_control" in block:  # a breakpoint: on the result's one text part
                    result = [_cached({"type": "text", "text": result}, block, bw)]
                tool_results.append({"role": "tool", "tool_call_id": tid, "content": result})
            elif kind in ("thinking", "redacted_thinking"):
                if role == "assistant":
                    thought = _thought(block, bw)
                    if thought is not None:
                        thoughts.append(thought)
            else:
                raise bad(
                    f"'{bw}.type' {kind!r} is not supported here (text, image and document in "
                    "user turns, tool_use in assistant turns, tool_result in user turns)",
                    f"{bw}.type",
                )
        out.extend(tool_results)  # tool results answer the previous assistant turn first
        if result_media:
            parts[:0] = result_media  # what the tools showed, then what the user adds
        if role == "assistant":
            text = "".join(p["text"] for p in parts if p["type"] == "text")
            turn: dict[str, Any] = {"role": "assistant", "content": text or None}
            if _any_cached(parts):  # breakpoints: the text parts as they are, with theirs
                turn["content"] = parts
            if tool_calls:
                turn["tool_calls"] = tool_calls
            elif not text:
                turn["content"] = ""
            if thoughts:
                # Claude's signed thinking, back to it (other providers' adapters drop it).
                turn["thinking_blocks"] = thoughts
            out.append(turn)
        elif parts or not tool_results:
            out.append({"role": "user", "content": parts})
    return out


def _tools(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise bad("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
            raise bad(f"'{where}' must be {{'name', 'description', 'input_schema'}}", where)
        if tool.get("type") not in (None, "custom"):
            raise bad(
                f"'{where}.type' {tool.get('type')!r}: server tools are not supported, only "
                "client tools with an input_schema",
                f"{where}.type",
            )
        schema = tool.get("input_schema")
        if not isinstance(schema, Mapping):
            raise bad(
                f"'{where}.input_schema' must be a JSON schema object", f"{where}.input_schema"
            )
        fn: dict[str, Any] = {"name": tool["name"], "parameters": dict(schema)}
        description = tool.get("description")
        if isinstance(description, str):
            fn["description"] = description
        out.append(_cached({"type": "function", "function": fn}, tool, where))
    return out


def _tool_choice(raw: Any) -> tuple[Any, bool | None]:
    if not isinstance(raw, Mapping):
        raise bad("'tool_choice' must be an object with a 'type'", "tool_choice")
    kind = raw.get("type")
    parallel = False if raw.get("disable_parallel_tool_use") is True else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool":
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise bad("'tool_choice.name' must be a tool name", "tool_choice.name")
        return {"type": "function", "function": {"name": name}}, parallel
    raise bad(
        f"'tool_choice.type' must be auto, any, tool or none, got {kind!r}", "tool_choice.type"
    )


#: OpenAI's request fields that Anthropic's Messages API does not have: sent here, they are
#: refused, never dropped without a word (``seed``, ``n``, ``response_format`` …).
_OPENAI_ONLY = frozenset(
    {
        "n",
        "seed",
        "stop",
        "user",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "response_format",
        "stream_options",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "reasoning_effort",
        "modalities",
        "audio",
        "prediction",
        "store",
        "verbosity",
        "web_search_options",
        "prompt_cache_key",
        "safety_identifier",
    }
)
#: Anthropic's features that change what the answer is, which Lunar cannot serve.
_UNSERVED = frozenset({"mcp_servers", "container", "output_format"})
_LUNAR = ("model", "stream", "fallbacks", "provider")


def _check_fields(raw: Mapping[str, Any]) -> None:
    """Refuse, naming it, a field this route would otherwise drop although the answer
    depends on it. Anthropic's other fields (a top-level ``cache_control``,
    ``context_management``, ``service_tier`` and newer ones) tune how or where an answer is
    made, not what it is: accepted, and left out, since the model answering may not be
    Anthropic's (clients such as Claude Code send some of them on every request).
    ``thinking`` is honoured (``to_chat_body``)."""
    for name in raw:
        if name in _OPENAI_ONLY:
            raise bad(
                f"'{name}' is an OpenAI parameter, not a field of Anthropic's Messages API: "
                "send it to /v1/chat/completions, or leave it out",
                name,
            )
        if name in _UNSERVED:
            raise bad(f"'{name}' is not supported on Lunar's /v1/messages", name)
    top_k = raw.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise bad(f"'top_k' must be a non-negative integer, got {top_k!r}", "top_k")
    output = raw.get("output_config")
    if output is not None:
        if not isinstance(output, Mapping):
            raise bad("'output_config' must be an object", "output_config")
        if output.get("format") is not None:
            # A format the answer would not follow: refused, never ignored.
            raise bad(
                "'output_config.format' (structured output) is not supported on /v1/messages: "
                "use response_format on /v1/chat/completions",
                "output_config.format",
            )


def to_chat_body(raw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An Anthropic request -> ``(OpenAI body without model, Lunar fields)``.

    The Lunar fields are ``model``, ``stream``, ``fallbacks`` and ``provider`` as given
    (validated by the caller). Raises ``BadRequestError`` naming the Anthropic field."""
    if not isinstance(raw, Mapping):
        raise BadRequestError("The request body must be a JSON object", param=None)
    _check_fields(raw)
    body: dict[str, Any] = {}
    messages = _messages(raw.get("messages"))
    system = raw.get("system")
    if system is not None:
        text = _text_blocks(system, "system")
        if isinstance(system, list) and _any_cached(system):
            # Prompt-cache breakpoints: the blocks as text parts, each with its own.
            parts = [
                _cached({"type": "text", "text": b["text"]}, b, f"system[{i}]")
                for i, b in enumerate(system)
            ]
            messages.insert(0, {"role": "system", "content": parts})
        elif text:
            messages.insert(0, {"role": "system", "content": text})
    body["messages"] = messages
    body["max_tokens"] = _int(raw.get("max_tokens"), "max_tokens", required=True)
    if raw.get("top_k") is not None:  # (checked by _check_fields)
        body["top_k"] = raw["top_k"]
    stops = raw.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("'stop_sequences' must be a list of strings", "stop_sequences")
        # How many: the limit of the provider of each model tried (none for Anthropic's).
        if stops:
            body["stop"] = stops
    for name in ("temperature", "top_p"):
        value = raw.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(f"'{name}' must be a number", name)
            if not 0 <= value <= 1:
                raise bad(f"'{name}' must be between 0 and 1, got {value!r}", name)
            body[name] = value
    metadata = raw.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise bad("'metadata' must be an object", "metadata")
        user = metadata.get("user_id")
        if user is not None and not isinstance(user, str):
            raise bad("'metadata.user_id' must be a string", "metadata.user_id")
        if user:
            body["user"] = user
    tools = raw.get("tools")
    if tools is not None:
        converted = _tools(tools)
        if converted:
            body["tools"] = converted
    choice = raw.get("tool_choice")
    if choice is not None:
        tc, parallel = _tool_choice(choice)
        if "tools" in body:
            body["tool_choice"] = tc
            if parallel is not None:
                body["parallel_tool_calls"] = parallel
    thinking = raw.get("thinking")
    if thinking is not None:
        # Lunar's own field, in Anthropic's shape: to Anthropic as it is, to other providers
        # as their reasoning budget or effort (checked with the other parameters).
        body["thinking"] = thinking
    lunar = {name: raw.get(name) for name in _LUNAR}
    return body, lunar


# ---------------------------------------------------------------------------------------------
# Responses


def _message_id(openai_id: str | None) -> str:
    if openai_id and openai_id.startswith("msg_"):
        return openai_id
    return "msg_" + (uuid.uuid4().hex[:24] if not openai_id else openai_id.split("-")[-1])


def _usage(usage: Usage | None) -> dict[str, Any]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    # Anthropic's input_tokens counts neither the tokens read from the cache nor those
    # written to it; Lunar's prompt_tokens, as OpenAI's, counts all three.
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    written = min(usage.cache_write_tokens, usage.prompt_tokens - cached)
    hour = min(usage.cache_write_1h_tokens, written)
    out: dict[str, Any] = {
        "input_tokens": usage.prompt_tokens - cached - written,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": written,
        # The writes by cache lifetime, as Anthropic gives them beside their sum.
        "cache_creation": {
            "ephemeral_5m_input_tokens": written - hour,
            "ephemeral_1h_input_tokens": hour,
        },
    }
    for name in (
        "input_cost_usd",
        "cached_input_cost_usd",
        "output_cost_usd",
        "total_cost_usd",
        "latency_ms",
        "ttft_ms",
    ):
        value = getattr(usage, name)
        if value is not None:
            out[name] = value
    return out


def _tool_input(arguments: str) -> Any:
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        return {"_raw_arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def _stop(finish: str | None, sequence: str | None) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)`` for an OpenAI finish. "stop_sequence" only when the
    upstream named the sequence that matched (Anthropic's models do): OpenAI and Gemini say
    "stop" for a stop sequence and for a natural end alike, and which it was is not known,
    so that answer reads "end_turn" with no sequence rather than a guess."""
    if sequence is not None and finish == "stop":
        return "stop_sequence", sequence
    return STOP_REASONS.get(finish or "stop", "end_turn"), None


def message_from_completion(completion: ChatCompletion) -> dict[str, Any]:
    """A ``ChatCompletion`` as an Anthropic ``Message`` (first choice)."""
    content: list[dict[str, Any]] = []
    reason = sequence = None
    if completion.choices:
        choice = completion.choices[0]
        msg = choice.message
        if msg.thinking_blocks:
            content.extend(msg.thinking_blocks)
        elif msg.reasoning_content:
            # Another provider's reasoning: a thinking block without a signature (one sent
            # back is not passed on: no model but the one that wrote it would take it).
            content.append({"type": "thinking", "thinking": msg.reasoning_content, "signature": ""})
        if msg.content:
            content.append({"type": "text", "text": msg.content})
        elif msg.refusal:
            content.append({"type": "text", "text": msg.refusal})
        for call in msg.tool_calls or ():
            content.append(
                {
                    "type": "tool_use",
                    "id": signed_tool_id(call.id, call.extra_content),
                    "name": call.function.name or "",
                    "input": _tool_input(call.function.arguments),
                }
            )
        reason, sequence = _stop(choice.finish_reason, choice.stop_sequence)
    return {
        "id": _message_id(completion.id),
        "type": "message",
        "role": "assistant",
        "model": completion.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _usage(completion.usage),
        "provider": completion.provider,
    }


def _event(kind: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + dumps(data) + b"\n\n"


class MessageStreamEncoder:
    """OpenAI-shaped chunks -> Anthropic stream events (bytes).

    Reasoning opens a ``thinking`` block whose pieces become ``thinking_delta``, closed by
    its signature (``signature_delta``, from a ``delta.thinking_blocks``) or by the content
    after it; a ``redacted_thinking`` block comes whole. Text opens a ``text`` block; each
    tool call (by its OpenAI ``index``) opens a ``tool_use`` block whose argument pieces
    become ``input_json_delta``; a new kind of content closes the open block. ``end()``
    closes it and sends ``message_delta`` (stop reason and usage, cumulative, including
    Lunar's cost fields) and ``message_stop``."""

    def __init__(self, model: str, input_tokens_estimate: int = 0) -> None:
        self._model = model
        self._input_estimate = input_tokens_estimate
        self._started = False
        self._block = -1  # index of the open block, -1: none
        self._open: tuple[str, int] | None = None  # ("text", 0) or ("tool", openai index)
        self._tool_blocks: dict[int, int] = {}
        self._finish: str | None = None
        self._stop_sequence: str | None = None
        self._usage: Usage | None = None
        self._id = ""

    def _start(self, chunk: ChatCompletionChunk | None) -> bytes:
        self._started = True
        self._id = _message_id(chunk.id if chunk else None)
        if chunk is not None and chunk.model:
            self._model = chunk.model
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._input_estimate, "output_tokens": 0},
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self._block})

    def _open_block(self, kind: tuple[str, int], block: dict[str, Any]) -> bytes:
        out = self._close_block()
        self._block += 1
        self._open = kind
        return out + _event(
            "content_block_start",
            {"type": "content_block_start", "index": self._block, "content_block": block},
        )

    def feed(self, chunk: ChatCompletionChunk) -> bytes:
        out = b"" if self._started else self._start(chunk)
        if chunk.usage is not None:
            self._usage = chunk.usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # Anthropic messages have one choice
            delta = choice.delta
            if delta.__class__ is ReasoningDelta:
                out += self._thinking(delta.reasoning_content, delta.thinking_blocks)
            text = delta.content or delta.refusal
            if text:
                if self._open != ("text", 0):
                    out += self._open_block(("text", 0), {"type": "text", "text": ""})
                out += _event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": self._block,
                        "delta": {"type": "text_delta", "text": text},
                    },
                )
            for call in delta.tool_calls or ():
                key = ("tool", call.index)
                if call.index not in self._tool_blocks or (call.id and self._open != key):
                    fn = call.function
                    out += self._open_block(
                        key,
                        {
                            "type": "tool_use",
                            "id": signed_tool_id(
                                call.id or f"toolu_{call.index}", call.extra_content
                            ),
                            "name": (fn.name if fn else None) or "",
                            "input": {},
                        },
                    )
                    self._tool_blocks[call.index] = self._block
                elif self._open != key:
                    continue  # pieces of a call whose block is closed: cannot reopen
                args = call.function.arguments if call.function else ""
                if args:
                    out += _event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": self._block,
                            "delta": {"type": "input_json_delta", "partial_json": args},
                        },
                    )
            if choice.finish_reason is not None:
                self._finish = choice.finish_reason
                self._stop_sequence = choice.stop_sequence
        return out

    def _thinking(self, text: str | None, blocks: list[dict[str, Any]] | None) -> bytes:
        out = b""
        if text:
            out += self._in_thinking()
            out += self._block_delta({"type": "thinking_delta", "thinking": text})
        for block in blocks or ():
            if block.get("type") == "redacted_thinking":
                redacted = {"type": "redacted_thinking", "data": block.get("data", "")}
                out += self._open_block(("redacted", self._block + 1), redacted)
                continue
            signature = block.get("signature")
            if not isinstance(signature, str):
                continue
            out += self._in_thinking()  # (a block of no text: opened for its signature)
            out += self._block_delta({"type": "signature_delta", "signature": signature})
            out += self._close_block()  # signed: the next thinking is another block
        return out

    def _in_thinking(self) -> bytes:
        """A thinking block's start, unless one is open."""
        if self._open == ("thinking", 0):
            return b""
        return self._open_block(
            ("thinking", 0), {"type": "thinking", "thinking": "", "signature": ""}
        )

    def _block_delta(self, delta: dict[str, Any]) -> bytes:
        """A ``content_block_delta`` event of the open block."""
        return _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": self._block, "delta": delta},
        )

    def end(self) -> bytes:
        out = b"" if self._started else self._start(None)
        out += self._close_block()
        reason, sequence = _stop(self._finish, self._stop_sequence)
        out += _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": _usage(self._usage),
            },
        )
        return out + _event("message_stop", {"type": "message_stop"})

    def error(self, err: LunarError) -> bytes:
        """A failure after the stream began: an ``error`` event; nothing may follow it."""
        return _event("error", error_body(err))


def error_type(err: LunarError) -> str:
    status = getattr(err, "status_code", None)
    if status is None:
        return "api_error"
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(err: LunarError) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}``."""
    message = err.message if isinstance(err, APIError) else str(err)
    if getattr(err, "code", None) == TOO_MANY_STOPS:  # the engine's: named as here
        param, name = "stop", "stop_sequences"
        message = message.replace(f"'{param}'", f"'{name}'")
        message = message.replace(f"(param: {param})", f"(param: {name})")
    return {"type": "error", "error": {"type": error_type(err), "message": message}}
