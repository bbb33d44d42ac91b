"""What several adapters need: JSON codecs, message text, images, tool arguments."""

from __future__ import annotations

import json
import mimetypes
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from .. import _json
from .._errors import (
    APIError,
    BadRequestError,
    LunarError,
    StreamError,
    error_class_for,
    error_from_response,
)
from .._request import CHAT_PARAMS, TRANSLATED_FIELDS
from .._sse import SSEDecoder
from .._types import ChatCompletionChunk, ChoiceDelta, ChunkChoice, Usage, compact_json
from ._base import Target

dumps = compact_json  # text, for a tool call's arguments
dump_body = _json.dumps  # bytes, for a request body
loads = _json.loads


def bad_answer(provider: str, what: str, content: bytes | str) -> APIError:
    """A 2xx answer the provider got wrong (``what``: how): its fault, a 502 quoting the
    start of the body, retried and fallen back from."""
    text = content[:200] if isinstance(content, str) else content[:200].decode("utf-8", "replace")
    return error_class_for(502)(f"{what}: {text!r}", 502, text, provider=provider)


def invalid_json(provider: str, content: bytes | str) -> APIError:
    """A 2xx answer whose body is not the JSON it should be: the provider misbehaved (502)."""
    return bad_answer(provider, f"Invalid JSON from provider '{provider}'", content)


#: What reading an upstream's JSON of the wrong shape raises (``choices`` a string, an
#: event's ``delta`` a number …): the parsers trust the wire's shape, the upstream broke it.
MISSHAPEN = (AttributeError, TypeError, KeyError, IndexError, ValueError)


def misshapen(provider: str, exc: Exception, content: bytes | str | None = None) -> APIError:
    """An answer (``content``) or a stream event of the wrong shape: the provider misbehaved,
    as with invalid JSON (502; a stream's: a ``StreamError``), so it is retried and fallen
    back from."""
    what = f"{type(exc).__name__}: {exc}"
    if content is None:
        return StreamError(
            f"Unexpected event in the stream from '{provider}' ({what})", provider=provider
        )
    return bad_answer(provider, f"Unexpected answer from provider '{provider}' ({what})", content)


def text_of(content: Any) -> str:
    """The text of a message's content, whether a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def system_text(messages: list[Mapping[str, Any]]) -> str:
    """All system (and developer) turns, joined: providers that take the system prompt as a
    separate field get it whole, wherever it stood."""
    return "\n\n".join(
        text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")
    )


class ImageSource(NamedTuple):
    url: str | None
    media_type: str
    data: str | None  # base64, for data URLs


def image_source(part: Mapping[str, Any]) -> ImageSource:
    """An OpenAI ``image_url`` part: a ``data:`` URL (base64) or a plain URL."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, Mapping) else image
    assert isinstance(url, str)
    if url.startswith("data:"):
        header, _, data = url[5:].partition(",")
        media_type = header.split(";")[0] or "image/png"
        if ";base64" not in header:
            raise BadRequestError(
                "Image data URLs must be base64: 'data:image/png;base64,...'",
                param="messages.content.image_url",
            )
        return ImageSource(None, media_type, data)
    media_type = mimetypes.guess_type(url.split("?")[0])[0] or "image/jpeg"
    return ImageSource(url, media_type, None)


def file_data(part: Mapping[str, Any], provider: str) -> tuple[str, str]:
    """An OpenAI ``file`` part's (media type, base64 data). Only data travels to other
    providers: a ``file_id`` names a file uploaded to OpenAI."""
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, Mapping) else None
    if not (isinstance(data, str) and data.startswith("data:") and ";base64," in data):
        raise BadRequestError(
            f"Provider '{provider}' takes a file part only with its data: pass "
            "'file': {'file_data': 'data:application/pdf;base64,...'} (a 'file_id' is OpenAI's)",
            param="messages.content.file",
        )
    header, _, b64 = data[5:].partition(",")
    return header.split(";")[0], b64


def audio_data(part: Mapping[str, Any]) -> tuple[str, str]:
    """An OpenAI ``input_audio`` part's (media type, base64 data)."""
    audio = part.get("input_audio")
    data = audio.get("data") if isinstance(audio, Mapping) else None
    fmt = audio.get("format") if isinstance(audio, Mapping) else None
    if not isinstance(data, str) or not isinstance(fmt, str):
        raise BadRequestError(
            "Audio parts must be {'type': 'input_audio', 'input_audio': {'data': <base64>, "
            "'format': 'wav' | 'mp3'}}",
            param="messages.content.input_audio",
        )
    return f"audio/{fmt}", data


def tool_arguments_object(arguments: Any) -> dict[str, Any]:
    """An assistant tool call's JSON arguments as the object providers other than OpenAI
    want back in the conversation."""
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not arguments:
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        raise BadRequestError(
            f"Tool call arguments must be JSON, got {str(arguments)[:100]!r}",
            param="messages.tool_calls.function.arguments",
        ) from None
    return value if isinstance(value, dict) else {"value": value}


#: The fields of an OpenAI Chat Completions request, and Lunar's own few beyond them
#: (``top_k``): what adapters of other wires translate (or leave out, when the wire has no
#: such thing).
OPENAI_FIELDS = frozenset({"model", "messages", "stream", *CHAT_PARAMS, *TRANSLATED_FIELDS})


def merge_extra(payload: dict[str, Any], body: Mapping[str, Any]) -> None:
    """The body's fields that are not OpenAI's (``extra_body``) are the provider's own: into
    ``payload`` as given, an object merged into the one the adapter built (``generationConfig``)."""
    for key, value in body.items():
        if key in OPENAI_FIELDS:
            continue
        built = payload.get(key)
        if isinstance(built, Mapping) and isinstance(value, Mapping):
            payload[key] = {**built, **value}
        else:
            payload[key] = value


#: ``reasoning_effort`` as a thinking budget in tokens, for the wires that take a budget
#: (Anthropic's ``thinking.budget_tokens``, Gemini's ``thinkingBudget``): Google's mapping
#: for its own OpenAI-compatible endpoint (low 1024, medium 8192, high 24576); "minimal" is
#: Anthropic's least budget, "xhigh" Gemini Pro's most. "none" asks for no thinking.
EFFORT_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 8192, "high": 24576, "xhigh": 32768}


class ThinkingAsked(NamedTuple):
    """What a body asks of the model's reasoning: ``kind`` "enabled", "disabled" or
    "adaptive" (the model chooses), ``budget`` in tokens (for "enabled"), and ``param``,
    the field that asked it (for errors)."""

    kind: str
    budget: int | None
    param: str


def reasons(target: Target) -> bool:
    """Whether ``target`` is sent reasoning controls (``reasoning_effort``, ``thinking``): a
    model the catalogue marks ``reasoning``, or one it does not know (the caller's choice).
    Others would refuse them (OpenAI's gpt-4o, Claude 3.5 Haiku): a fallback to one answers
    without reasoning, as it would have without the field."""
    dep = target.deployment
    return not dep.catalogued or "reasoning" in dep.capabilities


#: The fields that ask for reasoning, left out for a model that does not reason.
REASONING_FIELDS = frozenset(("reasoning_effort", "thinking"))


def thinking_asked(body: Mapping[str, Any], target: Target) -> ThinkingAsked | None:
    """Lunar's ``thinking`` (Anthropic's shape, validated), else ``reasoning_effort`` mapped
    by ``EFFORT_BUDGETS``; None when the body asks neither (the model's own default) or
    ``target`` does not reason (``reasons``)."""
    if not reasons(target):
        return None
    thinking = body.get("thinking")
    if thinking is not None:
        return ThinkingAsked(thinking["type"], thinking.get("budget_tokens"), "thinking")
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort == "none":
        return ThinkingAsked("disabled", None, "reasoning_effort")
    budget = EFFORT_BUDGETS.get(effort)
    if budget is None:
        raise BadRequestError(
            f"'reasoning_effort' must be one of none, {', '.join(EFFORT_BUDGETS)}, "
            f"got {effort!r} (param: reasoning_effort)",
            param="reasoning_effort",
        )
    return ThinkingAsked("enabled", budget, "reasoning_effort")


def json_object(content: bytes | str, provider: str) -> dict[str, Any]:
    """A response body or event that must be a JSON object, or the provider misbehaved."""
    try:
        obj = loads(content)
    except ValueError:
        raise invalid_json(provider, content) from None
    if not isinstance(obj, dict):
        raise invalid_json(provider, content)
    return obj


class HTTPAdapter:
    """What every HTTP adapter does the same way: errors come from one mapping."""

    multiple_choices = True

    def parse_error(
        self, status: int, headers: Mapping[str, str], content: bytes, target: Target
    ) -> APIError:
        return error_from_response(status, headers, content, target.provider)


class PromptCount(ChatCompletionChunk):
    """The chunk of ``ChunkMaker._prompt_usage``: its usage's output count is not final."""

    __slots__ = ()
    to_dict = ChatCompletionChunk.to_dict  # a chunk's fields (the slot walk would give none)


class SSETranslator:
    """The frame of every stream translator: SSE bytes in, chunks out. ``_translate``
    appends the chunks that ``data`` completes and raises on an error event; the error
    reaches the caller only after the chunks before it in the same bytes (one read can
    carry several events, and those came first)."""

    __slots__ = ("_error", "_sse")
    _provider: str  # set by each translator

    def __init__(self) -> None:
        self._sse = SSEDecoder()
        self._error: LunarError | None = None

    def feed(self, data: bytes) -> list[ChatCompletionChunk]:
        if self._error is not None:
            raise self._error
        out: list[ChatCompletionChunk] = []
        try:
            self._translate(data, out)
        except LunarError as err:
            if not out:
                raise
            self._error = err
        except MISSHAPEN as exc:
            bad = misshapen(self._provider, exc)
            if not out:
                raise bad from exc
            self._error = bad
        return out

    def close(self) -> list[ChatCompletionChunk]:
        if self._error is not None:
            raise self._error
        self._sse.flush()
        return self._end()

    def _translate(self, data: bytes, out: list[ChatCompletionChunk]) -> None:
        raise NotImplementedError

    def _end(self) -> list[ChatCompletionChunk]:
        """End of the bytes: the last chunks, or an error when the stream was incomplete."""
        raise NotImplementedError


class ChunkMaker(SSETranslator):
    """For translators that build OpenAI chunks themselves, one choice a chunk."""

    def __init__(self, target: Target, id: str) -> None:
        super().__init__()
        self._provider = target.provider
        self._model = target.deployment.provider_model
        self._id = id
        self._created = int(time.time())

    def _prompt_usage(self, usage: Usage) -> ChatCompletionChunk:
        """A chunk with no choice, only the usage the provider told before its output (its
        prompt's exact count): the engine keeps it for a stream cut short, which it would
        otherwise bill from an estimate, and hands no such chunk to callers."""
        return PromptCount(self._id, self._created, self._model, [], usage, provider=self._provider)

    def _chunk(
        self,
        delta: ChoiceDelta,
        finish: str | None = None,
        usage: Usage | None = None,
        index: int = 0,
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            self._id,
            self._created,
            self._model,
            [ChunkChoice(index, delta, finish)],
            usage,
            provider=self._provider,
        )
