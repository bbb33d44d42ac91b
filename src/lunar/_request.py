"""Normalized requests: validation at the boundary, and the legacy-completions mapping.

The normalized request *is* an OpenAI Chat Completions body (a dict); Lunar-only options
(fallbacks, provider, timeout, headers) travel beside it in ``RequestOptions``. The client
and the gateway both validate here, so bad input fails before any network call, with an
error that names the field.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict
from urllib.parse import urlencode

import httpx

from ._errors import BadRequestError
from ._types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
)

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})

# Parameters passed to the provider as they are (after validation).
CHAT_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    # The rest of OpenAI's: for OpenAI-compatible providers as given; Anthropic and Gemini
    # have no such thing (their adapters leave them out). Those whose answer Lunar's objects
    # would not carry (audio; the deprecated functions' ``message.function_call``) are
    # refused by their checks, never sent to be dropped from the answer.
    "reasoning_effort",
    "verbosity",
    "metadata",
    "store",
    "service_tier",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "functions",
    "function_call",
    # Lunar's: reasoning asked with an explicit budget, in Anthropic's shape (docs/gateway.md).
    "thinking",
)

#: Fields beyond OpenAI's that Lunar translates for each provider (sent in ``extra_body``, or
#: by ``/v1/messages``): ``top_k`` is Anthropic's ``top_k``, Gemini's
#: ``generationConfig.topK``, and the ``top_k`` of the OpenAI-compatible servers that take
#: it (vLLM, Together, Fireworks, OpenRouter, Ollama); a provider that refuses it (OpenAI's
#: own API) does not get it (the catalogue's ``drop_params``).
TRANSLATED_FIELDS = ("top_k",)


class ChatParams(TypedDict, total=False):
    """The keyword arguments of ``chat.completions.create`` besides model/messages/stream."""

    fallbacks: list[str] | None
    temperature: float | None
    top_p: float | None
    max_tokens: int | None
    max_completion_tokens: int | None
    stop: str | list[str] | None
    n: int | None
    presence_penalty: float | None
    frequency_penalty: float | None
    seed: int | None
    user: str | None
    tools: list[dict[str, Any]] | None
    tool_choice: Any
    parallel_tool_calls: bool | None
    response_format: dict[str, Any] | None
    stream_options: dict[str, Any] | None
    logprobs: bool | None
    top_logprobs: int | None
    logit_bias: dict[str, float] | None
    reasoning_effort: str | None
    verbosity: str | None
    metadata: dict[str, str] | None
    store: bool | None
    service_tier: str | None
    modalities: list[str] | None
    audio: dict[str, Any] | None
    prediction: dict[str, Any] | None
    web_search_options: dict[str, Any] | None
    safety_identifier: str | None
    prompt_cache_key: str | None
    prompt_cache_retention: str | None
    functions: list[dict[str, Any]] | None
    function_call: Any
    thinking: dict[str, Any] | None
    provider: str | None
    timeout: float | httpx.Timeout | None
    extra_headers: Mapping[str, str] | None
    extra_query: Mapping[str, object] | None
    extra_body: Mapping[str, Any] | None


class CompletionParams(TypedDict, total=False):
    """The keyword arguments of the legacy ``completions.create`` besides model/prompt."""

    fallbacks: list[str] | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    n: int | None
    stop: str | list[str] | None
    presence_penalty: float | None
    frequency_penalty: float | None
    seed: int | None
    user: str | None
    provider: str | None
    timeout: float | httpx.Timeout | None
    extra_headers: Mapping[str, str] | None
    extra_query: Mapping[str, object] | None
    extra_body: Mapping[str, Any] | None


_OPTION_NAMES = frozenset(
    {"fallbacks", "provider", "timeout", "extra_headers", "extra_query", "extra_body"}
)
_COMPLETION_PARAMS = frozenset(CompletionParams.__annotations__) - _OPTION_NAMES


@dataclass
class RequestOptions:
    """What Lunar needs beside the body: routing and transport options of one call."""

    model: str
    fallbacks: list[str] | None = None
    provider: str | None = None
    #: ``None``: the client's timeout (``httpx.Timeout(None)`` is no timeout at all).
    timeout: httpx.Timeout | None = None
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    #: ``extra_query`` encoded (``a=1&b=x``), appended to the request's URL; None: none.
    extra_query: str | None = None
    #: ``None``: the engine's. The gateway sets it from ``x-lunar-max-retries``.
    max_retries: int | None = None
    #: ``perf_counter()`` time by which the answer (a stream's first chunk) must be there:
    #: no retry, backoff or fallback starts past it, and the async engine cuts an attempt
    #: still running at it (the sync engine cannot: an httpx read in progress cannot be
    #: cut). The gateway sets it from ``x-lunar-timeout-ms``; the SDK never does.
    deadline: float | None = None


# Remote mode's hop: what the SDK tells a Lunar gateway beside the body (docs/gateway.md).
#: Retries per model the client allows (the gateway's ``max_retries`` is the most it gets).
MAX_RETRIES_HEADER = "x-lunar-max-retries"
#: Milliseconds the gateway has to answer (a stream: its first chunk), from receiving the
#: request, its retries and fallbacks included; past them, a 504 ``deadline_exceeded``.
TIMEOUT_HEADER = "x-lunar-timeout-ms"
#: The longest ``x-lunar-timeout-ms`` taken as it is (``LONGEST_TIMEOUT`` seconds).
_LONGEST_TIMEOUT_MS = 10**12


def timeout_ms(read: float | None) -> str | None:
    """The ``x-lunar-timeout-ms`` a client that waits ``read`` seconds for the gateway's
    answer sends: a tenth less, at most a second less, so the gateway's answer (its 504
    and attempts included) has time to come back before the client stops waiting. None
    (no header) for no timeout: ``None``, or a caller's ``http_client``'s infinite one,
    which Lunar does not validate; one beyond ``LONGEST_TIMEOUT`` is taken as that."""
    if read is None or not math.isfinite(read):
        return None
    read = min(read, LONGEST_TIMEOUT)
    return str(max(1, int(read * 1000.0 - min(read * 100.0, 1000.0))))


class Remote:
    """What remote mode adds to each request: the client's fallbacks (in the body) and the
    headers that give the gateway the client's retry budget and deadline."""

    __slots__ = ("_default_timeout", "_max_retries", "fallbacks")

    def __init__(
        self, fallbacks: Mapping[str, list[str]], max_retries: int, read_timeout: float | None
    ) -> None:
        self.fallbacks = fallbacks
        self._max_retries = str(max_retries)
        self._default_timeout = timeout_ms(read_timeout)

    def headers(self, timeout: httpx.Timeout | None, extra: Mapping[str, str]) -> Mapping[str, str]:
        """The request's headers for the gateway: the client's ``max_retries`` and the read
        timeout it waits with (the request's, else the client's; none: no deadline), under
        the caller's ``extra_headers``, which win whatever their case."""
        ms = self._default_timeout if timeout is None else timeout_ms(timeout.read)
        out = {MAX_RETRIES_HEADER: self._max_retries}
        if ms is not None:
            out[TIMEOUT_HEADER] = ms
        if extra:
            given = {name.lower() for name in extra}
            out = {k: v for k, v in out.items() if k not in given}
            out.update(extra)
        return out


def _header_int(value: bytes, name: str, lowest: int, highest: int, hint: str) -> int:
    """A header's whole number (ASCII digits), at most ``highest`` (taken as that beyond)."""
    value = value.strip()
    if value.isdigit():  # bytes: ASCII digits only
        digits = value.lstrip(b"0")
        number = highest if len(digits) > 18 else min(int(digits or b"0"), highest)
        if number >= lowest:
            return number
    shown = value[:40].decode("latin-1")
    raise BadRequestError(
        f"Invalid {name} header {shown!r}: {hint}", param=name, code="invalid_header"
    )


def hop_policy(
    max_retries: bytes | None, timeout: bytes | None, started: float, most_retries: int
) -> tuple[int | None, float | None]:
    """What a client's ``x-lunar-max-retries`` and ``x-lunar-timeout-ms`` ask of the
    gateway: retries per model (at most ``most_retries``, the gateway's own), and the
    ``perf_counter()`` deadline (from ``started``, when the request came). A value that is
    not a whole number in range is a 400 naming the header."""
    retries = deadline = None
    if max_retries is not None:
        hint = "a whole number of retries, 0 or more"
        retries = _header_int(max_retries, MAX_RETRIES_HEADER, 0, most_retries, hint)
    if timeout is not None:
        hint = "a whole number of milliseconds, 1 or more"
        ms = _header_int(timeout, TIMEOUT_HEADER, 1, _LONGEST_TIMEOUT_MS, hint)
        deadline = started + ms / 1000.0
    return retries, deadline


def bad(message: str, param: str) -> BadRequestError:
    return BadRequestError(f"{message} (param: {param})", param=param, code="invalid_value")


def _number(value: Any, name: str, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"'{name}' must be a number, got {type(value).__name__}", name)
    if math.isnan(value):
        raise bad(f"'{name}' must be a number, got NaN", name)
    if not lo <= value <= hi:
        raise bad(f"'{name}' must be between {lo:g} and {hi:g}, got {value!r}", name)


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {type(value).__name__}", name)
    if value < 1:
        raise bad(f"'{name}' must be at least 1, got {value}", name)


#: Seconds; a longer timeout is taken as this (about 31 years). httpx's sync sockets
#: overflow past about 9.2e9 s.
LONGEST_TIMEOUT = 1e9
#: A number of seconds as a timeout bounds connecting by at most this much.
CONNECT_TIMEOUT = 10.0


def _seconds(value: Any, param: str, error: Callable[[str, str], Exception]) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(
            f"'{param}' must be a number of seconds, an httpx.Timeout or None (no timeout), "
            f"got {type(value).__name__}",
            param,
        )
    if isinstance(value, int) and value > LONGEST_TIMEOUT:
        return LONGEST_TIMEOUT  # (an int too large for a float would overflow below)
    if isinstance(value, float) and not math.isfinite(value):  # (an int always is)
        raise error(
            f"'{param}' must be a finite number of seconds (None for no timeout), got {value!r}",
            param,
        )
    if value <= 0:
        raise error(f"'{param}' must be more than 0 seconds, got {value!r}", param)
    return min(float(value), LONGEST_TIMEOUT)


def parse_timeout(value: Any, error: Callable[[str, str], Exception] = bad) -> httpx.Timeout:
    """A ``timeout`` argument, per client or per request, as an ``httpx.Timeout``. A number
    of seconds bounds each wait (connecting, each read, each write, a free connection), with
    connecting capped at ``CONNECT_TIMEOUT``; an ``httpx.Timeout`` gives each of its four
    fields (each a number of seconds or ``None``); ``None`` is no timeout. Seconds must be
    finite and more than 0 (``bool`` is not a number here); beyond ``LONGEST_TIMEOUT`` they
    are taken as that. ``error(message, param)`` makes the exception for bad input."""
    if isinstance(value, httpx.Timeout):
        connect, read, write, pool = (
            _seconds(getattr(value, f), f"timeout.{f}", error)
            for f in ("connect", "read", "write", "pool")
        )
        return httpx.Timeout(connect=connect, read=read, write=write, pool=pool)
    seconds = _seconds(value, "timeout", error)
    if seconds is None:
        return httpx.Timeout(None)
    return httpx.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT))


def _validate_content(content: Any, where: str, role: str, allow_none: bool) -> None:
    if isinstance(content, str):
        return
    if content is None:
        if allow_none:
            return
        raise bad(f"'{where}' is required for role '{role}'", where)
    if isinstance(content, list):
        for i, part in enumerate(content):
            p = f"{where}[{i}]"
            if not isinstance(part, Mapping):
                raise bad(f"'{p}' must be an object with a 'type', got {type(part).__name__}", p)
            ptype = part.get("type")
            if not isinstance(ptype, str) or ptype not in _PART_TYPES:
                raise bad(f"'{p}.type' must be one of {sorted(_PART_TYPES)}, got {ptype!r}", p)
            if ptype == "text" and not isinstance(part.get("text"), str):
                raise bad(f"'{p}.text' must be a string", f"{p}.text")
            if ptype == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, Mapping) else image
                if not isinstance(url, str) or not url:
                    raise bad(f"'{p}.image_url.url' must be a URL or data URL", f"{p}.image_url")
        return
    raise bad(
        f"'{where}' must be a string or a list of content parts, got {type(content).__name__}",
        where,
    )


def _validate_tool_calls(calls: Any, where: str) -> None:
    # Every adapter reads each call's function name: checked here, the same for all of them.
    if not isinstance(calls, list):
        raise bad(f"'{where}' must be a list of tool calls", where)
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            param = f"{where}[{j}].function"
            raise bad(f"'{param}' must be an object {{'name', 'arguments'}}", param)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            param = f"{where}[{j}].function.name"
            raise bad(f"'{param}' must be the name of a tool", param)


def validate_messages(messages: Any) -> None:
    # `type(...) is` first: what JSON gives (list, dict, str) skips the ABC checks, which
    # run Python code on every call.
    if type(messages) is not list and (
        isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence)
    ):
        raise bad("'messages' must be a list of {'role', 'content'} objects", "messages")
    if not messages:
        raise bad("'messages' must not be empty", "messages")
    for i, msg in enumerate(messages):
        if type(msg) is not dict and not isinstance(msg, Mapping):
            where = f"messages[{i}]"
            raise bad(f"'{where}' must be an object, got {type(msg).__name__}", where)
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(
                f"'messages[{i}].role' must be one of {', '.join(sorted(ROLES))}, got {role!r}",
                f"messages[{i}].role",
            )
        content = msg.get("content")
        calls = msg.get("tool_calls")
        if role == "assistant":
            if calls is not None:
                _validate_tool_calls(calls, f"messages[{i}].tool_calls")
            blocks = msg.get("thinking_blocks")
            if blocks is not None:
                _thinking_blocks(blocks, f"messages[{i}].thinking_blocks")
        if type(content) is not str:
            has_tool_calls = role == "assistant" and bool(calls)
            _validate_content(content, f"messages[{i}].content", role, has_tool_calls)
        if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
            param = f"messages[{i}].tool_call_id"
            raise bad(f"'{param}' is required for role 'tool'", param)


def _stop(stop: Any, name: str) -> None:
    if isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("'stop' must be a string or a list of strings", "stop")
    # How many: each provider's own limit, where the model is known (``too_many_stops``).


def _integer(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {value!r}", name)


def _seed(seed: Any, name: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad("'seed' must be an integer", "seed")


def _tools(tools: Any, name: str) -> None:
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise bad(
                f"'tools[{i}]' must be {{'type': 'function', 'function': {{'name', …}}}}",
                f"tools[{i}]",
            )
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            param = f"tools[{i}].function.parameters"
            raise bad(f"'{param}' must be a JSON Schema object", param)


_TOOL_CHOICES = ("none", "auto", "required")


def _tool_choice(choice: Any, name: str) -> None:
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICES:
            raise bad(
                f"'tool_choice' must be one of {', '.join(_TOOL_CHOICES)} or "
                f"{{'type': 'function', 'function': {{'name'}}}}, got {choice!r}",
                "tool_choice",
            )
        return
    if not isinstance(choice, Mapping) or not isinstance(choice.get("type"), str):
        raise bad("'tool_choice' must be a string or an object with a 'type'", "tool_choice")
    if choice["type"] == "function":
        fn = choice.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            param = "tool_choice.function.name"
            raise bad(f"'{param}' must name the tool to call", param)


def _bool(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {type(value).__name__}", name)


def _top_logprobs(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise bad(f"'{name}' must be an integer from 0 to 20, got {value!r}", name)


def _response_format(rf: Any, name: str) -> None:
    if not (isinstance(rf, Mapping) and isinstance(rf.get("type"), str)):
        raise bad("'response_format' must be an object with a 'type'", "response_format")
    # The engine (JSON mode by instruction) and the adapters read the schema from these.
    js = rf.get("json_schema")
    if js is None:
        return
    if not isinstance(js, Mapping):
        param = "response_format.json_schema"
        raise bad(f"'{param}' must be an object ({{'name', 'schema'}})", param)
    schema = js.get("schema")
    if schema is not None and not isinstance(schema, Mapping):
        param = "response_format.json_schema.schema"
        raise bad(f"'{param}' must be a JSON Schema object", param)


def _object(value: Any, name: str) -> None:
    if not isinstance(value, Mapping):
        raise bad(f"'{name}' must be an object, got {type(value).__name__}", name)


def _string(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a string, got {type(value).__name__}", name)


def _strings(value: Any, name: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(f"'{name}' must be a list of strings", name)


def _modalities(value: Any, name: str) -> None:
    _strings(value, name)
    if "audio" in value:
        raise bad(
            "'modalities' may not ask for 'audio': Lunar's answers carry text, not audio "
            "(leave it out, or ask ['text'])",
            name,
        )


def _refused(hint: str) -> Callable[[Any, str], None]:
    """A check for a parameter whose answer Lunar would not carry: refused, saying why."""

    def check(value: Any, name: str) -> None:
        raise bad(f"'{name}' is not supported: {hint}", name)

    return check


#: ``thinking``'s types: Anthropic's (``adaptive``: the model chooses how much).
THINKING_TYPES = ("enabled", "disabled", "adaptive")


def _thinking(value: Any, name: str) -> None:
    """``{"type": "enabled", "budget_tokens": N}``, ``{"type": "disabled"}`` or
    ``{"type": "adaptive"}``: Anthropic's ``thinking``, which Lunar takes for every provider."""
    if not isinstance(value, Mapping):
        raise bad(f"'{name}' must be an object with a 'type', got {type(value).__name__}", name)
    kind = value.get("type")
    if kind not in THINKING_TYPES:
        raise bad(
            f"'{name}.type' must be one of {', '.join(THINKING_TYPES)}, got {kind!r}",
            f"{name}.type",
        )
    budget = value.get("budget_tokens")
    if kind == "enabled" or budget is not None:
        _positive_int(budget, f"{name}.budget_tokens")


def _thinking_blocks(blocks: Any, where: str) -> None:
    """An assistant turn's ``thinking_blocks``, as answers carry them (Anthropic's signed
    thinking, sent back to it unchanged)."""
    if not isinstance(blocks, list):
        raise bad(f"'{where}' must be a list of thinking blocks", where)
    for j, block in enumerate(blocks):
        p = f"{where}[{j}]"
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "thinking":
            for key in ("thinking", "signature"):
                if not isinstance(block.get(key), str):
                    raise bad(f"'{p}.{key}' must be a string, as the answer gave it", f"{p}.{key}")
        elif kind == "redacted_thinking":
            if not isinstance(block.get("data"), str):
                raise bad(f"'{p}.data' must be a string, as the answer gave it", f"{p}.data")
        else:
            raise bad(
                f"'{p}' must be a 'thinking' or 'redacted_thinking' block, as the answer gave it",
                p,
            )


def _metadata(value: Any, name: str) -> None:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise bad(f"'{name}' must be an object of string keys and string values", name)


def _range(lo: float, hi: float) -> Callable[[Any, str], None]:
    return lambda value, name: _number(value, name, lo, hi)


#: The checked sampling and tool parameters, each with its check (None means not given).
_PARAM_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "temperature": _range(0.0, 2.0),
    "top_p": _range(0.0, 1.0),
    "presence_penalty": _range(-2.0, 2.0),
    "frequency_penalty": _range(-2.0, 2.0),
    "n": _positive_int,
    "max_tokens": _positive_int,
    "max_completion_tokens": _positive_int,
    "seed": _seed,
    "top_k": _integer,  # (vLLM takes -1 for "no limit": the range is the provider's)
    "stop": _stop,
    "tools": _tools,
    "tool_choice": _tool_choice,
    "parallel_tool_calls": _bool,
    "logprobs": _bool,
    "top_logprobs": _top_logprobs,
    "response_format": _response_format,
    "stream_options": _object,
    "reasoning_effort": _string,
    "verbosity": _string,
    "metadata": _metadata,
    "store": _bool,
    "service_tier": _string,
    "modalities": _modalities,
    "audio": _refused("Lunar's answers carry text, not audio"),
    "functions": _refused("use 'tools' (OpenAI's replacement for 'functions')"),
    "function_call": _refused("use 'tool_choice' (OpenAI's replacement for 'function_call')"),
    "prediction": _object,
    "web_search_options": _object,
    "safety_identifier": _string,
    "prompt_cache_key": _string,
    "prompt_cache_retention": _string,
    "thinking": _thinking,
}


def validate_params(body: Mapping[str, Any]) -> None:
    """Check the sampling and tool parameters of an OpenAI-shaped body, in the body's own
    order (the first bad one is reported). A loop over what the body has, not over every
    parameter Lunar checks: a request usually sets a few."""
    checks = _PARAM_CHECKS
    for name, value in body.items():
        if value is not None and name in checks:
            checks[name](value, name)


def validate_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip():
        raise bad("'model' must be a non-empty string", "model")
    return model


def validate_fallbacks(fallbacks: Any) -> list[str] | None:
    if fallbacks is None:
        return None
    if isinstance(fallbacks, str) or not isinstance(fallbacks, Iterable):
        raise bad("'fallbacks' must be a list of model names", "fallbacks")
    out = list(fallbacks)
    for i, name in enumerate(out):
        if not isinstance(name, str) or not name:
            raise bad(f"'fallbacks[{i}]' must be a model name", f"fallbacks[{i}]")
    return out


def validate_provider(provider: Any) -> str | None:
    if provider is not None and (not isinstance(provider, str) or not provider):
        raise bad("'provider' must be a provider name", "provider")
    return provider


def validate_extra_headers(headers: Any) -> Mapping[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise bad(
            "'extra_headers' must be a mapping of header names to values (str to str), "
            f"got {type(headers).__name__}",
            "extra_headers",
        )
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise bad(
                f"'extra_headers' must map str to str, got {name!r}: {type(value).__name__}",
                "extra_headers",
            )
    return headers


def validate_extra_query(query: Any, default: DefaultQuery | None = None) -> str | None:
    """``extra_query``: query parameters appended to the provider's URL (the gateway's, in
    remote mode), as the openai SDK appends them (Azure's ``api-version``). A mapping of
    names to strings, numbers or booleans (``true``/``false``, as the openai SDK writes
    them); a ``None`` value is left out. Over the client's ``default_query`` (``default``),
    name by name, as in the openai SDK (a ``None`` leaves a default out). Encoded once,
    here: the engine only appends it."""
    if query is None:
        return None if default is None else default.text
    pairs = query_pairs(query, "extra_query", bad)
    if default is not None:
        pairs = {**default.pairs, **pairs}
    return urlencode([(k, v) for k, v in pairs.items() if v is not None]) or None


def query_pairs(
    query: Any, name: str, error: Callable[[str, str], Exception]
) -> dict[str, str | None]:
    """A mapping of query parameters checked (``error(message, param)`` for what is wrong)
    and written as the openai SDK writes them; None values kept as None."""
    if not isinstance(query, Mapping):
        raise error(
            f"'{name}' must be a mapping of query parameter names to values, "
            f"got {type(query).__name__}",
            name,
        )
    pairs: dict[str, str | None] = {}
    for key, value in query.items():
        if not isinstance(key, str) or not key:
            raise error(f"'{name}' names must be non-empty strings, got {key!r}", name)
        if value is None:
            pairs[key] = None
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, float) and not math.isfinite(value):
            param = f"{name}.{key}"
            raise error(f"'{param}' must be a finite number, got {value!r}", param)
        elif not isinstance(value, (str, int, float)):
            param = f"{name}.{key}"
            raise error(
                f"'{param}' must be a string, a number or a boolean, got {type(value).__name__}",
                param,
            )
        pairs[key] = str(value)
    return pairs


class DefaultQuery:
    """A client's ``default_query``: query parameters every request's URL carries, under
    its ``extra_query`` (checked as ``extra_query`` is; a ``ValueError`` naming
    ``default_query`` for what is wrong). ``text``: them encoded, for requests without
    ``extra_query`` (most: nothing is done per request)."""

    __slots__ = ("pairs", "text")

    def __init__(self, pairs: Mapping[str, str | None]) -> None:
        self.pairs = {k: v for k, v in pairs.items() if v is not None}
        self.text = urlencode(list(self.pairs.items())) or None

    @classmethod
    def of(cls, query: Any, name: str = "default_query") -> DefaultQuery | None:
        """``default_query=`` (or the argument ``name``) checked; None for none (or an
        empty mapping)."""
        if query is None:
            return None
        out = cls(query_pairs(query, name, _value_error))
        return out if out.pairs else None


def _value_error(message: str, param: str) -> ValueError:
    return ValueError(message)


#: Keys ``extra_body`` may not set: ``create()``'s own arguments. Merged in, they would be
#: overwritten (``model``), skip validation (``messages``), or mean one thing in direct mode
#: and another through a gateway (``stream``, ``fallbacks``, ``provider``).
_OWN_ARGUMENTS = {
    "model": "model=",
    "messages": "messages=",
    "stream": "stream=",
    "fallbacks": "fallbacks=",
    "provider": "provider=",
}


def validate_extra_body(extra: Any, legacy: bool = False) -> Mapping[str, Any] | None:
    """``extra_body``: more fields for the provider's body, merged over the parameters (and
    validated with them where Lunar checks a field). Not a way around ``create()``'s own
    arguments: those keys are refused, naming the argument to use."""
    if extra is None:
        return None
    if not isinstance(extra, Mapping):
        raise bad(
            f"'extra_body' must be a mapping of field names to values, got {type(extra).__name__}",
            "extra_body",
        )
    for key in extra:
        if not isinstance(key, str):
            raise bad(f"'extra_body' keys must be strings, got {key!r}", "extra_body")
        argument = _OWN_ARGUMENTS.get(key)
        if argument is not None:
            if legacy and key == "messages":
                argument = "prompt="
            param = f"extra_body.{key}"
            raise bad(f"'{param}' is create()'s own argument: pass {argument}... instead", param)
    return extra


def chat_body(
    messages: Any,
    params: Mapping[str, Any],
    extra_body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate and assemble a chat body from ``create()`` arguments (``None`` = not given)."""
    validate_messages(messages)
    body: dict[str, Any] = {"messages": list(messages)}
    for name, value in params.items():
        if value is not None:
            body[name] = value
    if extra_body:
        body.update(extra_body)
    validate_params(body)
    return body


def sdk_messages(messages: Any) -> Any:
    """What ``create()`` takes as ``messages`` beyond a list of dicts, as the openai SDK does:
    any iterable (a generator), and the message objects answers carry (``choices[0].message``,
    Lunar's or the openai SDK's) as their dicts without the fields left unset (``None``),
    and so the call objects of an answer (``message.tool_calls``) in a dict turn.
    Anything else goes on to the validation, which names it."""
    if type(messages) is not list:
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
            return messages
        messages = list(messages)
    for i, msg in enumerate(messages):
        if (type(msg) is not dict and not isinstance(msg, Mapping)) or _call_objects(msg):
            messages = [*messages[:i], *map(_as_message, messages[i:])]
            break
    return messages


def _call_objects(msg: Mapping[str, Any]) -> bool:
    """A dict turn holding an answer's call objects: ``{"role": "assistant", "tool_calls":
    message.tool_calls}``, which the openai SDK takes too."""
    calls = msg.get("tool_calls")
    return type(calls) is list and any(not isinstance(c, Mapping) for c in calls)


def _as_dict(obj: Any) -> Any:
    dump = None if isinstance(obj, Mapping) else getattr(obj, "model_dump", None)
    out = dump() if callable(dump) else None
    if not isinstance(out, Mapping):
        return obj
    return {k: v for k, v in out.items() if v is not None}


def _as_message(msg: Any) -> Any:
    if isinstance(msg, Mapping):
        if _call_objects(msg):  # a copy: the caller's dict stays as it was
            return {**msg, "tool_calls": [_as_dict(c) for c in msg["tool_calls"]]}
        return msg
    return _as_dict(msg)


def prepare(
    method: str,
    model: Any,
    messages: Any,
    kwargs: Mapping[str, Any],
    legacy: bool = False,
    remote: Remote | None = None,
    query: DefaultQuery | None = None,
) -> tuple[dict[str, Any], RequestOptions]:
    """``create()``'s arguments -> (validated body, options). Unknown keywords are a
    ``TypeError``, as for any Python function. ``remote``: in remote mode, what the client
    adds for the gateway (its fallbacks, its retry budget and deadline). ``query``: the
    client's ``default_query``."""
    allowed = _COMPLETION_PARAMS if legacy else CHAT_PARAMS
    params: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in allowed:
            params[name] = value
        elif name not in _OPTION_NAMES:
            raise TypeError(f"{method}() got an unexpected keyword argument '{name}'")
    model = validate_model(model)
    extra_body = validate_extra_body(kwargs.get("extra_body"), legacy)
    body = chat_body(sdk_messages(messages), params, extra_body)
    fallbacks = validate_fallbacks(kwargs.get("fallbacks"))
    provider = validate_provider(kwargs.get("provider"))
    extra_headers = validate_extra_headers(kwargs.get("extra_headers"))
    extra_query = validate_extra_query(kwargs.get("extra_query"), query)
    # Absent: the client's timeout. Given, even as None (no timeout, as in the openai SDK).
    timeout = parse_timeout(kwargs["timeout"]) if "timeout" in kwargs else None
    if remote is not None:
        # The gateway routes: Lunar's options travel in the body, the client's fallbacks
        # for the model too (per-request ones replace them, as in direct mode).
        body["model"] = model
        chain = fallbacks if fallbacks is not None else remote.fallbacks.get(model)
        if chain is not None:
            body["fallbacks"] = chain
        if provider is not None:
            body["provider"] = provider
        extra_headers = remote.headers(timeout, extra_headers)
    opts = RequestOptions(model, fallbacks, provider, timeout, extra_headers, extra_query)
    return body, opts


def prompt_messages(prompt: Any) -> list[dict[str, Any]]:
    """A legacy ``prompt`` as chat messages (the prompt becomes the user's turn)."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (one prompt per request)", "prompt")
    if not prompt:
        raise bad("'prompt' must not be empty", "prompt")
    return [{"role": "user", "content": prompt}]


def completion_from_chat(chat: ChatCompletion) -> Completion:
    return Completion(
        id=chat.id.replace("chatcmpl", "cmpl", 1),
        created=chat.created or int(time.time()),
        model=chat.model,
        choices=[
            CompletionChoice(c.index, c.message.content or "", c.finish_reason)
            for c in chat.choices
        ],
        usage=chat.usage,
        provider=chat.provider,
    )


def completion_from_chunk(chunk: ChatCompletionChunk) -> Completion:
    return Completion(
        id=chunk.id.replace("chatcmpl", "cmpl", 1),
        created=chunk.created,
        model=chunk.model,
        choices=[
            CompletionChoice(c.index, c.delta.content or "", c.finish_reason) for c in chunk.choices
        ],
        usage=chunk.usage,
        provider=chunk.provider,
    )
