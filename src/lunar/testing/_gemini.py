"""The Google Gemini wire: ``POST /v1beta/models/{model}:generateContent``,
``:streamGenerateContent`` (``?alt=sse``: SSE; without it: one JSON array) and ``:countTokens``.

Requests are validated as Gemini does, with its error messages: unknown field names (the API
accepts lowerCamel and snake_case), roles ``user``/``model``, non-empty ``parts`` each with
exactly one kind of data, function responses right after the function-call turn and as many
as its calls, function names, and schemas (function parameters, ``responseSchema``) limited
to the OpenAPI subset Gemini accepts: ``additionalProperties``, ``$ref``, ``const`` … are
refused, an ``object`` needs non-empty ``properties``, and ``required`` names must be among
them.

Thought signatures as Gemini 2.5 and 3 give them: the first function call of an answer from a
``gemini-2.5*`` or ``gemini-3*`` model carries a ``thoughtSignature`` (one per step, on the first
of parallel calls). A ``gemini-3*`` model checks them as Gemini 3 does: in the current turn
(the contents after the last user text), the first function call of each model step must
carry the signature given for it, or the request is refused (400).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any
from urllib.parse import parse_qs

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
from ._reply import Reply, default_error_message, gemini_model
from ._wire import Incoming, Rejection, Wire, too_many_tokens

FIELDS = frozenset(
    {
        "model",
        "contents",
        "systemInstruction",
        "generationConfig",
        "tools",
        "toolConfig",
        "safetySettings",
        "cachedContent",
        "labels",
    }
)
#: The most ``stopSequences`` Gemini takes.
MAX_STOP_SEQUENCES = 5
CONFIG_FIELDS = frozenset(
    {
        "temperature",
        "topP",
        "topK",
        "candidateCount",
        "maxOutputTokens",
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "presencePenalty",
        "frequencyPenalty",
        "seed",
        "responseLogprobs",
        "logprobs",
        "thinkingConfig",
        "responseModalities",
        "speechConfig",
        "mediaResolution",
        "enableEnhancedCivicAnswers",
        "routingConfig",
        "audioTimestamp",
    }
)
DATA_FIELDS = (
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
)
PART_FIELDS = frozenset({*DATA_FIELDS, "thought", "thoughtSignature", "videoMetadata"})
SCHEMA_FIELDS = frozenset(
    {
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "maxItems",
        "minItems",
        "properties",
        "required",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "example",
        "anyOf",
        "propertyOrdering",
        "default",
        "items",
        "minimum",
        "maximum",
    }
)
MIME_TYPES = (
    "text/plain",
    "application/json",
    "application/xml",
    "application/yaml",
    "text/x.enum",
)
FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]{0,63}$")

FINISH = {
    "stop": "STOP",
    "length": "MAX_TOKENS",
    "tool_calls": "STOP",
    "function_call": "STOP",
    "content_filter": "SAFETY",
}
"""OpenAI finish reasons -> Gemini finish reasons (other values are sent verbatim)."""

STATUS_BY_CODE = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
CODE_BY_STATUS = {v: k for k, v in STATUS_BY_CODE.items()}
CODE_BY_STATUS["FAILED_PRECONDITION"] = 400
CODE_BY_STATUS["OUT_OF_RANGE"] = 400
MESSAGES = {
    "INVALID_ARGUMENT": "Request contains an invalid argument.",
    "UNAUTHENTICATED": "Request had invalid authentication credentials.",
    "PERMISSION_DENIED": "The caller does not have permission",
    "NOT_FOUND": "Requested entity was not found.",
    "RESOURCE_EXHAUSTED": "Resource has been exhausted (e.g. check quota).",
    "INTERNAL": "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    "UNAVAILABLE": "The model is overloaded. Please try again later.",
    "DEADLINE_EXCEEDED": "The request timed out. Please try again.",
}
STATUS_BY_TYPE = {
    "server_error": "INTERNAL",
    "api_error": "INTERNAL",
    "overloaded_error": "UNAVAILABLE",
    "service_unavailable": "UNAVAILABLE",
    "rate_limit_error": "RESOURCE_EXHAUSTED",
    "invalid_request_error": "INVALID_ARGUMENT",
    "authentication_error": "UNAUTHENTICATED",
    "permission_error": "PERMISSION_DENIED",
    "not_found_error": "NOT_FOUND",
    "timeout_error": "DEADLINE_EXCEEDED",
}
"""OpenAI and Anthropic error types -> Gemini statuses (for ``Reply.error_type``)."""


def status_for_code(code: int) -> str:
    known = STATUS_BY_CODE.get(code)
    if known is not None:
        return known
    return "UNAVAILABLE" if code == 529 else "INTERNAL" if code >= 500 else "FAILED_PRECONDITION"


def error_json(code: int, message: str, status: str, **extra: Any) -> str:
    return dumps({"error": {"code": code, "message": message, "status": status, **extra}})


def invalid(message: str) -> Rejection:
    return Rejection(400, error_json(400, message, "INVALID_ARGUMENT").encode())


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(r[:1].upper() + r[1:] for r in rest)


def get(obj: Any, name: str) -> Any:
    """A field by its lowerCamel name, also accepted in snake_case (as the API does)."""
    if not isinstance(obj, dict):
        return None
    if name in obj:
        return obj[name]
    return obj.get(_snake(name))


def _unknown(obj: dict[str, Any], allowed: frozenset[str], where: str) -> str | None:
    for key in obj:
        if _camel(key) not in allowed:
            at = f" at '{where}'" if where else ""
            return f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.'
    return None


def _check_object(obj: Any, allowed: frozenset[str], where: str) -> str | None:
    """An error message unless ``obj`` is an object with only ``allowed`` fields, or None."""
    if not isinstance(obj, dict):
        return f"Invalid JSON payload received. Expected an object at '{where}'."
    return _unknown(obj, allowed, where)


def _check_schema(schema: Any, where: str) -> str | None:
    error = _check_object(schema, SCHEMA_FIELDS, where)
    if error is not None:
        return error
    kind = schema.get("type")
    if kind is not None and not isinstance(kind, str):
        return (
            f"Invalid JSON payload received. Proto field is not repeating, cannot start list "
            f"at '{where}.type'."
        )
    props = schema.get("properties")
    if isinstance(kind, str) and kind.upper() == "OBJECT" and not props:
        return f"* GenerateContentRequest.{where}.properties: should be non-empty for OBJECT type\n"
    for i, name in enumerate(schema.get("required") or ()):
        if not isinstance(props, dict) or name not in props:
            return f"* GenerateContentRequest.{where}.required[{i}]: property is not defined\n"
    if isinstance(props, dict):
        for i, (_, sub) in enumerate(props.items()):
            error = _check_schema(sub, f"{where}.properties[{i}].value")
            if error is not None:
                return error
    items = schema.get("items")
    if items is not None:
        error = _check_schema(items, f"{where}.items")
        if error is not None:
            return error
    for i, sub in enumerate(get(schema, "anyOf") or ()):
        error = _check_schema(sub, f"{where}.any_of[{i}]")
        if error is not None:
            return error
    return None


def _count_calls(content: Any, field: str) -> int:
    parts = get(content, "parts")
    if not isinstance(parts, list):
        return 0
    return sum(1 for p in parts if isinstance(p, dict) and get(p, field) is not None)


def _check_part(part: Any, where: str) -> str | None:
    error = _check_object(part, PART_FIELDS, where)
    if error is not None:
        return error
    present = [name for name in DATA_FIELDS if get(part, name) is not None]
    if not present:
        return (
            f"* GenerateContentRequest.{where}.data: required oneof field 'data' must have "
            "one initialized field\n"
        )
    if len(present) > 1:
        return (
            f"Invalid JSON payload received. Oneof field 'data' is already set. Cannot set "
            f"'{present[1]}' at '{where}'."
        )
    kind = present[0]
    value = get(part, kind)
    if kind == "text" and not isinstance(value, str):
        return f"Invalid value at '{where}.text' (TYPE_STRING)"
    if kind == "inlineData" and not (
        isinstance(get(value, "mimeType"), str) and isinstance(get(value, "data"), str)
    ):
        return f"* GenerateContentRequest.{where}.inline_data: mime_type and data are required\n"
    if kind == "fileData" and not isinstance(get(value, "fileUri"), str):
        return f"* GenerateContentRequest.{where}.file_data.file_uri: a file URI is required\n"
    if kind in ("functionCall", "functionResponse"):
        snake = _snake(kind)
        name = get(value, "name")
        if not isinstance(name, str) or not name:
            return f"* GenerateContentRequest.{where}.{snake}.name: Name cannot be empty.\n"
        if kind == "functionResponse" and not isinstance(get(value, "response"), dict):
            return f"* GenerateContentRequest.{where}.{snake}.response: must be an object\n"
        if kind == "functionCall" and not isinstance(get(value, "args") or {}, dict):
            return f"* GenerateContentRequest.{where}.{snake}.args: must be an object\n"
    return None


def validate(request: dict[str, Any]) -> str | None:
    """An error message in Gemini's words for a request it would refuse, or None."""
    error = _unknown(request, FIELDS, "")
    if error is not None:
        return error
    contents = get(request, "contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified\n"
    for i, content in enumerate(contents):
        if not isinstance(content, dict):
            return f"Invalid JSON payload received. Expected an object at 'contents[{i}]'."
        role = content.get("role")
        if role not in (None, "", "user", "model"):
            return "Please use a valid role: user, model."
        parts = get(content, "parts")
        if not isinstance(parts, list) or not parts:
            return (
                f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty.\n"
            )
        for j, part in enumerate(parts):
            error = _check_part(part, f"contents[{i}].parts[{j}]")
            if error is not None:
                return error
        responses = _count_calls(content, "functionResponse")
        if responses:
            before = contents[i - 1] if i > 0 else None
            calls = _count_calls(before, "functionCall")
            if not calls or get(before, "role") != "model":
                return (
                    "Please ensure that function response turn comes immediately after a "
                    "function call turn."
                )
            if calls != responses:
                return (
                    "Please ensure that the number of function response parts is equal to the "
                    "number of function call parts of the function call turn."
                )
    system = get(request, "systemInstruction")
    if system is not None:
        parts = get(system, "parts")
        if not isinstance(parts, list) or not all(
            isinstance(p, dict) and isinstance(get(p, "text"), str) for p in parts
        ):
            return (
                "* GenerateContentRequest.system_instruction.parts: only text parts are supported\n"
            )
    config = get(request, "generationConfig")
    if config is not None:
        error = _check_config(config)
        if error is not None:
            return error
    tools = get(request, "tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "Invalid JSON payload received. Expected a list at 'tools'."
        for i, tool in enumerate(tools):
            for j, fn in enumerate(get(tool, "functionDeclarations") or ()):
                where = f"tools[{i}].function_declarations[{j}]"
                name = get(fn, "name")
                if not isinstance(name, str) or not FUNCTION_NAME.match(name):
                    return (
                        f"* GenerateContentRequest.{where}.name: Invalid function name. Must "
                        "start with a letter or an underscore. Must be alphameric (a-z, A-Z, "
                        "0-9), underscores (_), dots (.), colons (:), or dashes (-), with a "
                        "maximum length of 64.\n"
                    )
                params = get(fn, "parameters")
                if params is not None:
                    error = _check_schema(params, f"{where}.parameters")
                    if error is not None:
                        return error
    tool_config = get(request, "toolConfig")
    if tool_config is not None:
        calling = get(tool_config, "functionCallingConfig") or {}
        mode = get(calling, "mode")
        if mode is not None and mode not in (
            "MODE_UNSPECIFIED",
            "AUTO",
            "ANY",
            "NONE",
            "VALIDATED",
        ):
            return (
                "Invalid value at 'tool_config.function_calling_config.mode' "
                f"(type.googleapis.com/google.ai.generativelanguage.v1beta.FunctionCallingConfig"
                f'.Mode), "{mode}"'
            )
        if get(calling, "allowedFunctionNames") and mode not in ("ANY", "VALIDATED"):
            return (
                "* GenerateContentRequest.tool_config.function_calling_config."
                "allowed_function_names: only allowed when mode is ANY\n"
            )
    return None


def _check_config(config: Any) -> str | None:
    error = _check_object(config, CONFIG_FIELDS, "generation_config")
    if error is not None:
        return error
    temperature = get(config, "temperature")
    if temperature is not None and not (
        isinstance(temperature, (int, float)) and 0 <= temperature <= 2
    ):
        return (
            "* GenerateContentRequest.generation_config.temperature: temperature must be in "
            "the range [0.0, 2.0]\n"
        )
    count = get(config, "candidateCount")
    if count is not None and not (isinstance(count, int) and 1 <= count <= 8):
        return (
            "* GenerateContentRequest.generation_config.candidate_count: must be between 1 and 8\n"
        )
    limit = get(config, "maxOutputTokens")
    if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool)):
        return "Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32)"
    stops = get(config, "stopSequences")
    if isinstance(stops, list) and len(stops) > MAX_STOP_SEQUENCES:
        return (
            "* GenerateContentRequest.generation_config.stop_sequences: stop_sequences must "
            f"have at most {MAX_STOP_SEQUENCES} items\n"
        )
    mime = get(config, "responseMimeType")
    if mime is not None and mime not in MIME_TYPES:
        return (
            "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes "
            "are `text/plain`, `application/json`, `application/xml`, `application/yaml` and "
            "`text/x.enum`.\n"
        )
    schema = get(config, "responseSchema")
    if schema is not None:
        if mime not in ("application/json", "text/x.enum"):
            return (
                "* GenerateContentRequest.generation_config.response_schema: response_schema "
                "requires response_mime_type to be application/json or text/x.enum\n"
            )
        return _check_schema(schema, "generation_config.response_schema")
    return None


SIGNING_MODELS = ("gemini-2.5", "gemini-3")
CHECKING_MODELS = ("gemini-3",)
_SIGNATURE_PREFIX = "mock-thought:"


def thought_signature(name: str) -> str:
    """The signature the emulator gives a call of function ``name`` (base64, as Gemini's)."""
    return base64.b64encode((_SIGNATURE_PREFIX + name).encode()).decode()


def _signed_for(signature: Any) -> str | None:
    """The function name a signature was given for, or None for a signature not this
    emulator's."""
    if not isinstance(signature, str):
        return None
    try:
        text = base64.b64decode(signature, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return text[len(_SIGNATURE_PREFIX) :] if text.startswith(_SIGNATURE_PREFIX) else None


def check_signatures(contents: list[Any]) -> str | None:
    """Gemini 3's check, in its words: each model step of the current turn (after the last
    user content with text) opens its function calls with the signature given for it."""
    start = 0
    for i, content in enumerate(contents):
        if get(content, "role") != "model" and any(
            isinstance(get(p, "text"), str) for p in get(content, "parts") or ()
        ):
            start = i + 1
    for i in range(start, len(contents)):
        content = contents[i]
        if get(content, "role") != "model":
            continue
        calls = [p for p in get(content, "parts") or () if get(p, "functionCall") is not None]
        if not calls:
            continue
        first = calls[0]
        name = get(get(first, "functionCall"), "name")
        signature = get(first, "thoughtSignature")
        if signature is None:
            return (
                "Function call is missing a thought_signature in functionCall parts. This is "
                "required for tools to work correctly, and missing thought_signature may lead "
                f"to degraded model performance. Additional data, function call `{name}` , "
                f"position {i + 1}. Please refer to "
                "https://ai.google.dev/gemini-api/docs/thought-signatures for more details."
            )
        if _signed_for(signature) != name:
            return "Corrupted thought signature."
    return None


def _part_words(part: dict[str, Any]) -> int:
    if isinstance(part.get("text"), str):
        return words(part["text"])
    response = get(get(part, "functionResponse"), "response")
    if response is not None:
        return words(json.dumps(response))
    return 0


def prompt_tokens(request: dict[str, Any]) -> int:
    """The system instruction (as one message) and each content: words + 3."""
    total = 0
    system = get(request, "systemInstruction")
    if system:
        total += sum(_part_words(p) for p in get(system, "parts") or ()) + MESSAGE_OVERHEAD
    for content in get(request, "contents") or ():
        total += sum(_part_words(p) for p in get(content, "parts") or ()) + MESSAGE_OVERHEAD
    return total


def tool_offer(request: dict[str, Any]) -> ToolOffer:
    functions = tuple(
        (str(get(fn, "name")), get(fn, "parameters") or {"type": "object"})
        for tool in get(request, "tools") or ()
        for fn in get(tool, "functionDeclarations") or ()
    )
    if not functions:
        return NO_TOOLS
    calling = get(get(request, "toolConfig"), "functionCallingConfig") or {}
    mode, forced = "auto", None
    declared = get(calling, "mode")
    if declared == "NONE":
        mode = "none"
    elif declared in ("ANY", "VALIDATED"):
        mode = "required"
        allowed = get(calling, "allowedFunctionNames")
        if isinstance(allowed, list) and allowed:
            forced = str(allowed[0])
    contents = get(request, "contents")
    after_result = _count_calls(contents[-1], "functionResponse") > 0
    return ToolOffer(functions, mode, forced, after_result)


class GeminiWire(Wire):
    name = "gemini"
    malformed: Event = '{"candidates": [{"broken'

    def authorize(self, headers: dict[str, str], query: str, key: str) -> Rejection | None:
        given = headers.get("x-goog-api-key")
        if given is None and query:
            keys = parse_qs(query).get("key")
            given = keys[0] if keys else None
        if given == key:
            return None
        if not given:
            return Rejection(
                403,
                error_json(
                    403,
                    "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to "
                    "call this API.",
                    "PERMISSION_DENIED",
                ).encode(),
            )
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        ]
        return Rejection(
            400,
            error_json(
                400,
                "API key not valid. Please pass a valid API key.",
                "INVALID_ARGUMENT",
                details=details,
            ).encode(),
        )

    def parse(
        self, request: Any, headers: dict[str, str], path: str, query: str
    ) -> Incoming | Rejection:
        if not isinstance(request, dict):
            return invalid("Invalid JSON payload received. Expected an object.")
        error = validate(request)
        if error is not None:
            return invalid(error)
        model, _, action = path.rpartition("/")[2].partition(":")
        model = gemini_model(path) or model
        asked = get(get(request, "generationConfig") or {}, "maxOutputTokens")
        if (limit := too_many_tokens(model, asked)) is not None:
            return invalid(
                f"Unable to submit request because it has a maxOutputTokens value of {asked} "
                f"but the supported range is from 1 (inclusive) to {limit + 1} (exclusive). "
                "Update the value and try again."
            )
        if model.startswith(CHECKING_MODELS):
            error = check_signatures(get(request, "contents"))
            if error is not None:
                return invalid(error)
        stream = action == "streamGenerateContent"
        sse = "sse" in (parse_qs(query).get("alt") or ())
        return Incoming(model, stream, request, sse)

    def count_tokens(self, request: Any) -> int | Rejection:
        """``:countTokens``: ``contents`` or a whole ``generateContentRequest``."""
        if not isinstance(request, dict):
            return invalid("Invalid JSON payload received. Expected an object.")
        inner = get(request, "generateContentRequest")
        if isinstance(inner, dict):
            request = {k: v for k, v in inner.items() if k != "model"}
        error = validate(request)
        if error is not None:
            return invalid(error)
        return prompt_tokens(request)

    def job(self, incoming: Incoming, reply: Reply, number: int) -> Job:
        request = incoming.request
        config = get(request, "generationConfig") or {}
        count = get(config, "candidateCount")
        thinking = get(config, "thinkingConfig") or {}
        return make_job(
            "gemini",
            incoming.model,
            reply,
            stream=incoming.stream,
            prompt_tokens=prompt_tokens(request),
            calls=resolve_tool_calls(tool_offer(request), reply, None),
            limit=get(config, "maxOutputTokens"),
            n=count if isinstance(count, int) and count >= 1 else 1,
            include_usage=reply.usage,
            sse=incoming.sse,
            # Thoughts' summaries come only when asked (the model thinks either way).
            reasoning=isinstance(thinking, dict)
            and get(thinking, "includeThoughts") is True
            and get(thinking, "thinkingBudget") != 0,
        )

    def response_id(self, number: int, job: Job) -> str:
        return f"resp_mock_{number}"

    def error_body(
        self, status: int, message: str | None = None, type_: str | None = None
    ) -> bytes:
        kind = status_for_code(status)
        if type_ is not None:
            kind = STATUS_BY_TYPE.get(type_, type_)
        if message is None:
            message = MESSAGES.get(kind) or default_error_message(status)
        return error_json(status, message, kind).encode()

    def status_error(self, reply: Reply) -> bytes:
        """Gemini's error JSON; a numeric ``retry_after`` also becomes the ``RetryInfo``
        detail Gemini sends with 429 (``"retryDelay": "2s"``)."""
        body = self.error_body(reply.status, reply.error_message, reply.error_type)
        delay = reply.retry_after
        if isinstance(delay, (int, float)) and not isinstance(delay, bool):
            obj = json.loads(body)
            seconds = f"{float(delay):g}s"
            obj["error"]["details"] = [
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": seconds}
            ]
            body = dumps(obj).encode()
        return body

    def _error(self, reply: Reply) -> tuple[int, str]:
        kind = "UNAVAILABLE"
        if reply.error_type is not None:
            kind = STATUS_BY_TYPE.get(reply.error_type, reply.error_type)
        message = reply.error_message
        if message is None:
            message = MESSAGES.get(kind, MESSAGES["INTERNAL"])
        code = CODE_BY_STATUS.get(kind, 500)
        return code, error_json(code, message, kind)

    def error_response(self, reply: Reply) -> tuple[int, bytes]:
        code, body = self._error(reply)
        return code, body.encode()

    def stream_error(self, reply: Reply) -> Event:
        return self._error(reply)[1]

    # -- rendering --------------------------------------------------------------------------

    @staticmethod
    def _usage(job: Job, output: bool = True) -> str:
        """``usageMetadata``: with the output's count (the last event), or the prompt's
        only (every event before it)."""
        usage: dict[str, Any] = {"promptTokenCount": job.prompt_tokens}
        if job.cached_tokens > 0:
            usage["cachedContentTokenCount"] = job.cached_tokens
        completion = job.completion_tokens if output else 0
        if output:
            # Gemini counts the thoughts apart from the candidates' tokens.
            usage["candidatesTokenCount"] = job.answer_tokens
            if job.reasoning:
                usage["thoughtsTokenCount"] = job.reasoning_tokens
        usage["totalTokenCount"] = job.prompt_tokens + completion
        return dumps(usage)

    @staticmethod
    def _calls(job: Job) -> list[str]:
        """Each call as a part; the first signed, from a model that thinks (2.5, 3)."""
        out = []
        for i, call in enumerate(job.tool_calls):
            body: dict[str, Any] = {"name": call.name, "args": call.arguments_object()}
            if call.id:
                body["id"] = call.id
            part: dict[str, Any] = {"functionCall": body}
            if i == 0 and job.model.startswith(SIGNING_MODELS):
                part["thoughtSignature"] = thought_signature(call.name)
            out.append(dumps(part))
        return out

    def _response(self, job: Job, id_: str, parts: str, finished: bool) -> str:
        """One ``GenerateContentResponse`` with ``parts`` (JSON text) in every candidate."""
        finish = (
            f',"finishReason":{dumps(FINISH.get(job.finish_reason, job.finish_reason))}'
            if finished
            else ""
        )
        candidates = ",".join(
            f'{{"content":{{"parts":[{parts}],"role":"model"}}{finish},"index":{i}}}'
            for i in range(job.n)
        )
        if not job.include_usage:
            usage = ""
        elif finished:
            usage = f',"usageMetadata":{self._usage(job)}'
        else:  # as Gemini streams: the prompt's count on every event, the output's at the end
            usage = f',"usageMetadata":{self._usage(job, output=False)}'
        return (
            f'{{"candidates":[{candidates}]{usage},"modelVersion":{dumps(job.model)},'
            f'"responseId":"{id_}"}}'
        )

    def render_json(self, job: Job, id_: str, created: str) -> str:
        if job.stream:  # streamGenerateContent without alt=sse: the events as a JSON array
            plan = self.render_stream(job, id_, created)
            return "[" + ",\r\n".join(str(e) for e in plan.events()) + "]"
        if job.tool_calls:
            parts = ",".join(self._calls(job))
        else:
            parts = dumps({"text": "".join(job.pieces)})
        if job.reasoning:
            parts = dumps({"text": job.reasoning_text, "thought": True}) + "," + parts
        return self._response(job, id_, parts, True)

    def render_stream(self, job: Job, id_: str, created: str) -> Plan:
        items = [dumps({"text": piece, "thought": True}) for piece in job.reasoning]
        if job.tool_calls:
            items += self._calls(job)
        else:
            items += [dumps({"text": piece}) for piece in job.pieces]
        positions: list[list[Event]] = [[self._response(job, id_, p, False)] for p in items]
        post: list[Event] = [self._response(job, id_, '{"text":""}', True)]
        final: list[Event] | None = [self._response(job, id_, items[-1], True)] if items else None
        return Plan([], positions, post, final)


GEMINI = GeminiWire()
