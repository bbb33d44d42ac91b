"""Google Gemini ``generateContent``: OpenAI-shaped requests in, Gemini's wire out, and back."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from .._errors import (
    APIConnectionError,
    APIError,
    BadRequestError,
    error_from_response,
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
    audio_data,
    dump_body,
    dumps,
    file_data,
    image_source,
    json_object,
    loads,
    merge_extra,
    system_text,
    text_of,
    thinking_asked,
    tool_arguments_object,
)

FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}

# JSON-Schema keywords Gemini's responseSchema / function parameters do not accept.
_UNSUPPORTED_SCHEMA_KEYS = frozenset({"additionalProperties", "$schema", "strict", "$defs"})


def _schema(schema: Any) -> Any:
    if isinstance(schema, Mapping):
        return {
            # The keys of `properties` are the user's field names, not keywords: keep them all.
            k: {n: _schema(p) for n, p in v.items()}
            if k == "properties" and isinstance(v, Mapping)
            else _schema(v)
            for k, v in schema.items()
            if k not in _UNSUPPORTED_SCHEMA_KEYS
        }
    if isinstance(schema, list):
        return [_schema(v) for v in schema]
    return schema


def _parameters(schema: Any) -> Any:
    """A tool's parameters; Gemini refuses an object schema with no properties, so a tool
    without arguments is declared without ``parameters``."""
    if not schema or (schema.get("type") == "object" and not schema.get("properties")):
        return None
    return _schema(schema)


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[dict[str, Any]] = []
    for part in content or ():
        if part.get("type") == "text":
            if part["text"]:  # Gemini refuses empty text parts
                parts.append({"text": part["text"]})
        elif part.get("type") == "image_url":
            src = image_source(part)
            if src.data is not None:
                parts.append({"inlineData": {"mimeType": src.media_type, "data": src.data}})
            else:
                parts.append({"fileData": {"mimeType": src.media_type, "fileUri": src.url}})
        elif part.get("type") in ("file", "input_audio"):
            media_type, data = (
                file_data(part, "gemini") if part["type"] == "file" else audio_data(part)
            )
            parts.append({"inlineData": {"mimeType": media_type, "data": data}})
    return parts


def _signature(call: Mapping[str, Any]) -> str | None:
    """The thought signature an assistant tool call carries back to Gemini, where Lunar
    (and Google's OpenAI-compatible endpoint) put it: ``extra_content.google``."""
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, Mapping) else None
    sig = google.get("thought_signature") if isinstance(google, Mapping) else None
    if sig is None or isinstance(sig, str):
        return sig
    raise BadRequestError(
        "A tool call's thought signature must be the string Gemini gave: send the call "
        f"back as the answer had it, got {type(sig).__name__}",
        param="messages.tool_calls.extra_content.google.thought_signature",
    )


def _extra_content(part: Mapping[str, Any]) -> dict[str, Any] | None:
    """A part's ``thoughtSignature`` where the call returned to the caller keeps it."""
    sig = part.get("thoughtSignature")
    return {"google": {"thought_signature": sig}} if isinstance(sig, str) and sig else None


def _contents(messages: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI turns -> Gemini ``contents``: assistant is ``model``; tool results are
    ``functionResponse`` parts named after the call they answer; a call's thought signature
    goes back on its ``functionCall`` part (Gemini 3 refuses a call of the current turn
    without the one it gave)."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for msg in messages:
        role = msg["role"]
        if role in ("system", "developer"):
            continue
        if role in ("tool", "function"):
            name = names.get(msg.get("tool_call_id", ""), msg.get("name", ""))
            text = text_of(msg.get("content"))
            try:
                response = loads(text)
            except ValueError:
                response = None
            if not isinstance(response, dict):
                response = {"content": text if response is None else response}
            parts = [{"functionResponse": {"name": name, "response": response}}]
            role = "user"
        else:
            parts = _parts(msg.get("content"))
            for call in msg.get("tool_calls") or ():
                fn = call.get("function", {})
                names[call.get("id", "")] = fn.get("name", "")
                part: dict[str, Any] = {
                    "functionCall": {
                        "name": fn.get("name", ""),
                        "args": tool_arguments_object(fn.get("arguments")),
                    }
                }
                sig = _signature(call)
                if sig:
                    part["thoughtSignature"] = sig
                parts.append(part)
            role = "model" if role == "assistant" else "user"
        if not parts:
            continue  # an empty answer or question: Gemini refuses a turn without parts
        if out and out[-1]["role"] == role:
            out[-1]["parts"].extend(parts)
        else:
            out.append({"role": role, "parts": parts})
    return out


def new_call_id() -> str:
    """An id for a call Gemini sent without one, unique across answers as OpenAI's are
    (``call_0`` in every answer mixed up the calls of a conversation kept by id)."""
    return "call_" + secrets.token_hex(12)


def _tool_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, Mapping):
        name = choice.get("function", {}).get("name")
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    mode = {"auto": "AUTO", "required": "ANY", "none": "NONE"}.get(choice, "AUTO")
    return {"functionCallingConfig": {"mode": mode}}


def _usage(meta: Mapping[str, Any]) -> Usage:
    # Thoughts are billed as output and the prompts of tool use as input, but neither is
    # in the candidates' or the prompt's count (totalTokenCount adds all four).
    return Usage(
        prompt_tokens=tokens(meta.get("promptTokenCount"))
        + tokens(meta.get("toolUsePromptTokenCount")),
        completion_tokens=tokens(meta.get("candidatesTokenCount"))
        + tokens(meta.get("thoughtsTokenCount")),
        cached_tokens=tokens(meta.get("cachedContentTokenCount")),
        reasoning_tokens=tokens(meta.get("thoughtsTokenCount")),
    )


def _thinking_config(body: Mapping[str, Any], target: Target) -> dict[str, Any] | None:
    """``generationConfig.thinkingConfig`` for what the body asks (``thinking`` or
    ``reasoning_effort``): a budget of 0 for none, -1 (the model chooses) for "adaptive",
    and the thoughts' summaries in the answer whenever the model thinks."""
    asked = thinking_asked(body, target)
    if asked is None:
        return None
    if asked.kind == "disabled":
        return {"thinkingBudget": 0}
    budget = -1 if asked.kind == "adaptive" else asked.budget
    return {"thinkingBudget": budget, "includeThoughts": True}


def _finish(reason: str | None, made_calls: bool) -> str:
    mapped = FINISH_REASONS.get(reason or "STOP", "stop")
    return "tool_calls" if mapped == "stop" and made_calls else mapped


class GeminiStreamTranslator(ChunkMaker):
    """Each event is a whole ``GenerateContentResponse``; the stream simply ends (no
    ``[DONE]``), so a ``finishReason`` is what tells a complete stream from a cut one.

    With ``candidateCount`` > 1 an event carries the candidates that have something new,
    each with its ``index``: each candidate is the choice of that index, with its own role
    chunk, tool-call numbering and finish reason. Every choice must finish; the finishes
    come last, in index order, the usage (all candidates') on the very last."""

    def __init__(self, target: Target) -> None:
        super().__init__(target, f"chatcmpl-gemini-{time.time_ns():x}")
        self._started = False
        self._calls: dict[int, int] = {}  # choice index -> its tool calls so far
        self._finish: dict[int, str] = {}  # choice index -> Gemini's finishReason
        self._meta: Mapping[str, Any] | None = None  # the last usageMetadata
        self._told = False  # the prompt's count has been handed on

    def _begin(self, index: int, out: list[ChatCompletionChunk]) -> None:
        self._calls[index] = 0
        out.append(self._chunk(ChoiceDelta(role="assistant", content=""), index=index))

    def _translate(self, data: bytes, out: list[ChatCompletionChunk]) -> None:
        for event in self._sse.feed(data):
            obj = json_object(event.data, self._provider)
            if "error" in obj:
                raise error_from_stream_event(obj["error"], self._provider)
            if not self._started:
                self._started = True
                self._model = obj.get("modelVersion") or self._model
                self._begin(0, out)
            meta = obj.get("usageMetadata")
            if meta:
                self._meta = meta  # on every event: only the last one's is read, at the end
                if not self._told and meta.get("promptTokenCount"):
                    # The first count of the prompt (some first events say 0), before this
                    # event's content, for a stream cut short.
                    self._told = True
                    out.append(self._prompt_usage(_usage(meta)))
            candidates = obj.get("candidates") or ()
            if not candidates and (obj.get("promptFeedback") or {}).get("blockReason"):
                self._finish[0] = "SAFETY"
            for position, cand in enumerate(candidates):
                index = cand.get("index")
                if not isinstance(index, int) or isinstance(index, bool):
                    index = position  # proto3 JSON may leave out a 0
                if index not in self._calls:
                    self._begin(index, out)
                for part in (cand.get("content") or {}).get("parts") or ():
                    if "text" in part:
                        text = part["text"]
                        if part.get("thought"):  # a summary of the model's thoughts
                            if text:
                                delta = ReasoningDelta(reasoning_content=text)
                                out.append(self._chunk(delta, index=index))
                            continue
                        out.append(self._chunk(ChoiceDelta(content=text), index=index))
                    elif "functionCall" in part:
                        call = part["functionCall"]
                        number = self._calls[index]
                        self._calls[index] = number + 1
                        tool_call = ChoiceDeltaToolCall(
                            number,
                            call.get("id") or new_call_id(),
                            "function",
                            Function(call.get("name"), dumps(call.get("args") or {})),
                            _extra_content(part),
                        )
                        out.append(self._chunk(ChoiceDelta(tool_calls=[tool_call]), index=index))
                if cand.get("finishReason"):
                    self._finish[index] = cand["finishReason"]

    def _end(self) -> list[ChatCompletionChunk]:
        unfinished = [i for i in self._calls if i not in self._finish]
        if not self._finish or unfinished:
            which = f" (candidate {unfinished[0]})" if len(self._calls) > 1 and unfinished else ""
            raise APIConnectionError(
                f"The stream from '{self._provider}' ended before it was complete "
                f"(no finishReason{which})"
            )
        last = max(self._finish)
        usage = _usage(self._meta) if self._meta is not None else None
        return [
            self._chunk(
                ChoiceDelta(),
                _finish(reason, self._calls.get(i, 0) > 0),
                usage if i == last else None,
                index=i,
            )
            for i, reason in sorted(self._finish.items())
        ]


class GeminiAdapter(HTTPAdapter):
    def build_request(self, body: Mapping[str, Any], target: Target, stream: bool) -> HTTPRequest:
        messages = body["messages"]
        payload: dict[str, Any] = {"contents": _contents(messages)}
        system = system_text(messages)
        if system:
            payload["systemInstruction"] = {"parts": [{"text": system}]}
        config: dict[str, Any] = {}
        for src, dst in (
            ("temperature", "temperature"),
            ("top_p", "topP"),
            ("top_k", "topK"),
            ("n", "candidateCount"),
            ("seed", "seed"),
            ("presence_penalty", "presencePenalty"),
            ("frequency_penalty", "frequencyPenalty"),
        ):
            if body.get(src) is not None:
                config[dst] = body[src]
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens:
            config["maxOutputTokens"] = max_tokens
        stop = body.get("stop")
        if stop:
            config["stopSequences"] = [stop] if isinstance(stop, str) else stop
        fmt = body.get("response_format") or {}
        if fmt.get("type") in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
            schema = (fmt.get("json_schema") or {}).get("schema")
            if schema:
                config["responseSchema"] = _schema(schema)
        thinking = _thinking_config(body, target)
        if thinking is not None:
            config["thinkingConfig"] = thinking
        if config:
            payload["generationConfig"] = config
        tools = body.get("tools")
        if tools:
            payload["tools"] = [
                {
                    "functionDeclarations": [
                        {
                            k: v
                            for k, v in {
                                "name": t["function"]["name"],
                                "description": t["function"].get("description"),
                                "parameters": _parameters(t["function"].get("parameters")),
                            }.items()
                            if v
                        }
                        for t in tools
                    ]
                }
            ]
            config_tools = _tool_config(body.get("tool_choice"))
            if config_tools:
                payload["toolConfig"] = config_tools
        merge_extra(payload, body)
        headers = {"content-type": "application/json"}
        if target.api_key:
            headers["x-goog-api-key"] = target.api_key
        headers.update(target.headers)
        model = quote(target.deployment.provider_model, safe="")
        action = "streamGenerateContent?alt=sse" if stream else "generateContent"
        url = f"{target.base_url.rstrip('/')}/v1beta/models/{model}:{action}"
        return HTTPRequest("POST", url, headers, dump_body(payload))

    def parse_response(self, content: bytes, target: Target) -> ChatCompletion:
        obj = json_object(content, target.provider)
        if "error" in obj:
            raise error_from_stream_event(obj["error"], target.provider)
        choices = []
        for i, cand in enumerate(obj.get("candidates") or ()):
            texts: list[str] = []
            thoughts: list[str] = []
            calls: list[ToolCall] = []
            for part in (cand.get("content") or {}).get("parts") or ():
                if part.get("thought"):
                    if isinstance(part.get("text"), str):
                        thoughts.append(part["text"])
                    continue
                if "text" in part:
                    texts.append(part["text"])
                elif "functionCall" in part:
                    call = part["functionCall"]
                    calls.append(
                        ToolCall(
                            call.get("id") or new_call_id(),
                            Function(call.get("name"), dumps(call.get("args") or {})),
                            extra_content=_extra_content(part),
                        )
                    )
            message = ChatCompletionMessage(
                content="".join(texts) if texts or not calls else None,
                tool_calls=calls or None,
                reasoning_content="".join(thoughts) if thoughts else None,
            )
            choices.append(Choice(i, message, _finish(cand.get("finishReason"), bool(calls))))
        if not choices:  # the prompt itself was blocked
            choices.append(Choice(0, ChatCompletionMessage(content=""), "content_filter"))
        return ChatCompletion(
            id=obj.get("responseId") or f"chatcmpl-gemini-{time.time_ns():x}",
            created=int(time.time()),
            model=obj.get("modelVersion") or target.deployment.provider_model,
            choices=choices,
            usage=_usage(obj["usageMetadata"]) if obj.get("usageMetadata") else None,
            provider=target.provider,
        )

    def stream_translator(self, target: Target) -> GeminiStreamTranslator:
        return GeminiStreamTranslator(target)

    def parse_error(
        self, status: int, headers: Mapping[str, str], content: bytes, target: Target
    ) -> APIError:
        """Gemini says how long to wait in the body (``RetryInfo.retryDelay``) and reports a
        bad key as 400 ``API_KEY_INVALID``: both become what the rest of Lunar expects."""
        details: list[Any] = []
        try:
            details = json_object(content, target.provider)["error"].get("details") or []
        except (APIError, KeyError, AttributeError):
            pass
        extra: dict[str, str] = {}
        for d in details:
            if not isinstance(d, dict):
                continue
            delay = d.get("retryDelay")
            if isinstance(delay, str) and delay.endswith("s") and "retry-after" not in headers:
                extra["retry-after"] = delay[:-1]
            if d.get("reason") == "API_KEY_INVALID":
                status = 401
        if extra:
            headers = {**headers, **extra}
        return error_from_response(status, headers, content, target.provider)


ADAPTER = GeminiAdapter()
