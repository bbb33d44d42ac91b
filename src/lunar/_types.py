"""Wire types: OpenAI-shaped objects with Lunar's cost and timing fields.

Plain classes with ``__slots__`` rather than a validation library: a streamed chunk is built
once per event on the hot path, and these cost a few attribute stores each. ``from_dict``
trusts the shape it is given (it comes from an adapter); ``to_dict`` gives the OpenAI JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from json.encoder import encode_basestring
from typing import Any, TypeVar

#: Compact JSON text, as the gateway writes it (UTF-8, not \u-escaped).
compact_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _text(value: Any) -> str | None:
    """A JSON string or null exactly as ``compact_json`` writes it; ``None`` (no fast path)
    for anything else."""
    if value is None:
        return "null"
    if type(value) is str:
        return encode_basestring(value)  # the encoder's own (C) string writer
    return None


class _Obj:
    __slots__: tuple[str, ...] = ()
    #: Slots that ``to_dict`` leaves out while they are None: Lunar's additions to an
    #: OpenAI shape that most answers do not have (OpenAI's SDK and stricter OpenAI-compatible
    #: servers never see them then, not even as null).
    _omit_none: tuple[str, ...] = ()
    #: The slots of the class and of its bases: what equality and ``repr`` go by.
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each class gets a ``to_dict`` written for its slots, unless it (or a base
        between it and ``_Obj``) has its own."""
        super().__init_subclass__(**kwargs)
        cls._fields = tuple(
            n for c in reversed(cls.__mro__) for n in c.__dict__.get("__slots__", ())
        )
        inherited = cls.to_dict
        if "to_dict" not in cls.__dict__ and (
            inherited is _Obj.to_dict or getattr(inherited, "_from_slots", False)
        ):
            cls.to_dict = _to_dict_for(cls)  # type: ignore[method-assign,assignment]

    def to_dict(self) -> dict[str, Any]:
        return {}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    # The names openai (pydantic) users reach for, with the arguments they pass most.
    def model_dump(
        self,
        *,
        mode: str = "python",
        include: Any = None,
        exclude: Any = None,
        by_alias: bool = False,
        exclude_unset: bool = False,
        exclude_defaults: bool = False,
        exclude_none: bool = False,
    ) -> dict[str, Any]:
        """``to_dict()``; ``exclude_none`` leaves out the fields that are None, at every
        depth, and so do ``exclude_unset`` and ``exclude_defaults`` (a field Lunar's objects
        leave unset, or at its default, is None). ``include`` / ``exclude``: the fields to
        keep / leave out, a set of names or pydantic's dict of them (``{"choices": {0:
        {"message"}}}``, ``...`` or True for the whole field). ``mode`` ("python" or
        "json") and ``by_alias`` change nothing: every field is JSON already, under its
        wire name."""
        if mode not in ("python", "json"):
            raise ValueError(f"mode must be 'python' or 'json', got {mode!r}")
        out = self.to_dict()
        if include is not None:
            out = _pick(out, include, keep=True)
        if exclude is not None:
            out = _pick(out, exclude, keep=False)
        if exclude_none or exclude_unset or exclude_defaults:
            out = _without_none(out)
        return out

    def model_dump_json(
        self,
        *,
        indent: int | None = None,
        include: Any = None,
        exclude: Any = None,
        by_alias: bool = False,
        exclude_unset: bool = False,
        exclude_defaults: bool = False,
        exclude_none: bool = False,
    ) -> str:
        out = self.model_dump(
            include=include,
            exclude=exclude,
            exclude_unset=exclude_unset,
            exclude_defaults=exclude_defaults,
            exclude_none=exclude_none,
        )
        if indent is None:
            return json.dumps(out, separators=(",", ":"), ensure_ascii=False)
        return json.dumps(out, indent=indent, ensure_ascii=False)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__name__}({fields})"


_T = TypeVar("_T")

_SCALARS = frozenset((str, int, float, bool, type(None)))


def _dump(value: Any) -> Any:
    if isinstance(value, _Obj):
        return value.to_dict()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _pick(value: Any, spec: Any, keep: bool) -> Any:
    """pydantic's ``include`` (``keep``) or ``exclude`` on a dumped value: ``spec`` a set
    of keys (list indexes for a list), or a dict of them to a nested spec (``...`` or True:
    all of it); ``"__all__"`` stands for every index or key."""
    if isinstance(spec, (set, frozenset, list, tuple)):
        spec = dict.fromkeys(spec, True)
    if not isinstance(spec, dict):
        raise TypeError(f"include/exclude must be a set or a dict, got {type(spec).__name__}")
    every = spec.get("__all__")

    def nested(key: Any) -> Any:
        sub = spec.get(key, every)
        return None if sub is None else (True if sub is ... else sub)

    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return value
    out = []
    for key, item in items:
        sub = nested(key)
        if keep:
            if sub is None:
                continue
            out.append((key, item if sub is True else _pick(item, sub, keep)))
        elif sub is True:
            continue
        else:
            out.append((key, item if sub is None else _pick(item, sub, keep)))
    return dict(out) if isinstance(value, dict) else [item for _, item in out]


def _to_dict_for(cls: type[_Obj]) -> Callable[[Any], dict[str, Any]]:
    """``to_dict`` for ``cls``'s ``__slots__``: one dict display, written out per class (as
    dataclasses write their ``__init__``). A loop of ``getattr`` over the slots took twice
    as long, and the gateway writes every answer through this. Most fields are scalars:
    one exact-type lookup each instead of two ``isinstance`` calls."""
    items = "".join(
        f"{name!r}: v if (v := self.{name}).__class__ in _SCALARS else _dump(v), "
        for name in cls.__slots__
        if name not in cls._omit_none
    )
    optional = "".join(
        f"    if (v := self.{name}) is not None:\n"
        f"        out[{name!r}] = v if v.__class__ in _SCALARS else _dump(v)\n"
        for name in cls._omit_none
    )
    namespace: dict[str, Any] = {"_SCALARS": _SCALARS, "_dump": _dump}
    if optional:
        source = f"def to_dict(self):\n    out = {{{items}}}\n{optional}    return out\n"
    else:
        source = f"def to_dict(self):\n    return {{{items}}}\n"
    exec(compile(source, f"<{cls.__qualname__}.to_dict from __slots__>", "exec"), namespace)
    to_dict = namespace["to_dict"]
    to_dict.__qualname__ = f"{cls.__qualname__}.to_dict"
    to_dict.__module__ = cls.__module__
    to_dict._from_slots = True
    return to_dict  # type: ignore[no-any-return]


_MAX_TOKENS = 1 << 53  # beyond, a count is no count (and its cost would overflow a float)


def tokens(n: Any) -> int:
    """A token count as an upstream's JSON gave it, made safe to add and price: a whole
    number from 0, else 0 (NaN, infinity, a string, -1 or 2.5 count as nothing rather than
    failing the answer)."""
    if type(n) is int:
        return n if 0 <= n < _MAX_TOKENS else 0
    if type(n) is float and n.is_integer() and 0 <= n < _MAX_TOKENS:
        return int(n)
    return 0


def usd(x: Any) -> float | None:
    """An amount in USD as an upstream's JSON gave it: a finite number from 0, else None
    (unknown), never a value the ledger and the limits cannot add."""
    if type(x) is float or type(x) is int:
        return float(x) if 0 <= x < math.inf else None
    return None


class Usage(_Obj):
    """Token counts, their cost in USD and the request's timing.

    ``prompt_tokens`` counts every input token, as OpenAI does: ``cached_tokens`` of them
    were read from a prompt cache (billed at the cached price), ``cache_write_tokens``
    written to one (Anthropic; billed at the cache-write price, in ``input_cost_usd``), of
    which ``cache_write_1h_tokens`` to its 1-hour cache (billed at the 1-hour write price).
    ``completion_tokens`` counts every output token: ``reasoning_tokens`` of them were a
    reasoning model's thinking (OpenAI's and Gemini's count; billed as output).
    Costs are ``None`` only when the catalogue has no price for the model that answered.
    """

    __slots__ = (
        "cache_write_1h_tokens",
        "cache_write_tokens",
        "cached_input_cost_usd",
        "cached_tokens",
        "completion_tokens",
        "input_cost_usd",
        "latency_ms",
        "output_cost_usd",
        "prompt_tokens",
        "reasoning_tokens",
        "total_cost_usd",
        "total_tokens",
        "ttft_ms",
    )

    def __init__(
        self,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        total_tokens: int | None = None,
        cached_tokens: int = 0,
        input_cost_usd: float | None = None,
        cached_input_cost_usd: float | None = None,
        output_cost_usd: float | None = None,
        total_cost_usd: float | None = None,
        latency_ms: float | None = None,
        ttft_ms: float | None = None,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
        cache_write_1h_tokens: int = 0,
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.total_tokens = (
            prompt_tokens + completion_tokens if total_tokens is None else total_tokens
        )
        self.cached_tokens = cached_tokens
        self.cache_write_tokens = cache_write_tokens
        self.cache_write_1h_tokens = cache_write_1h_tokens
        self.reasoning_tokens = reasoning_tokens
        self.input_cost_usd = input_cost_usd
        self.cached_input_cost_usd = cached_input_cost_usd
        self.output_cost_usd = output_cost_usd
        self.total_cost_usd = total_cost_usd
        self.latency_ms = latency_ms
        self.ttft_ms = ttft_ms

    @property
    def prompt_tokens_details(self) -> PromptTokensDetails:
        """``cached_tokens`` where OpenAI puts it, for code written against its SDK."""
        return PromptTokensDetails(self.cached_tokens)

    @property
    def completion_tokens_details(self) -> CompletionTokensDetails:
        """``reasoning_tokens`` where OpenAI puts it, for code written against its SDK."""
        return CompletionTokensDetails(self.reasoning_tokens)

    def to_dict(self) -> dict[str, Any]:
        out = _usage_fields(self)
        # OpenAI's places for the cached and reasoning tokens too: its SDK reads them there.
        out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Usage:
        get: Callable[[str], Any] = d.get  # the upstream's JSON: anything
        prompt, completion = get("prompt_tokens"), get("completion_tokens")
        cached = get("cached_tokens")
        if not cached:
            details = get("prompt_tokens_details")
            cached = details.get("cached_tokens") if type(details) is dict else 0
            if not cached:  # DeepSeek's name for them: its cache hits are billed as cached
                cached = get("prompt_cache_hit_tokens") or 0
        total = get("total_tokens")
        # Whole numbers in range, as nearly every answer has them, skip the calls. The OR of
        # ints is negative if one is, reaches 2**53 if one does, and fails on anything else
        # but a bool, which the type test leaves out.
        try:
            whole = (
                type(prompt) is type(completion) is type(cached) is type(total) is int
                and 0 <= (prompt | completion | cached) < _MAX_TOKENS
                and 0 < total < _MAX_TOKENS
            )
        except TypeError:
            whole = False
        if not whole:
            prompt, completion, cached = tokens(prompt), tokens(completion), tokens(cached)
            total = tokens(total) or None
        # Costs come from a Lunar gateway (remote mode); from another upstream, seldom.
        cost_in, cost_cached = get("input_cost_usd"), get("cached_input_cost_usd")
        cost_out, cost_total = get("output_cost_usd"), get("total_cost_usd")
        if not (cost_in is cost_cached is cost_out is cost_total is None):
            cost_in, cost_cached = usd(cost_in), usd(cost_cached)
            cost_out, cost_total = usd(cost_out), usd(cost_total)
        return cls(  # positional, in __init__'s order: keywords cost more, on every answer
            prompt,
            completion,
            total,
            cached,
            cost_in,
            cost_cached,
            cost_out,
            cost_total,
            get("latency_ms"),
            get("ttft_ms"),
            # Anthropic's cache writes, as a Lunar gateway passes them on (remote mode).
            0 if (written := get("cache_write_tokens")) is None else tokens(written),
            # A reasoning model's thinking, where OpenAI (and a Lunar gateway) put it.
            tokens(done.get("reasoning_tokens"))
            if type(done := get("completion_tokens_details")) is dict
            else 0,
            # Of the cache writes, those to Anthropic's 1-hour cache (looked for only then).
            tokens(get("cache_write_1h_tokens")) if written else 0,
        )


_usage_fields = _to_dict_for(Usage)


class PromptTokensDetails(_Obj):
    """OpenAI's ``usage.prompt_tokens_details``: where its SDK users read ``cached_tokens``."""

    __slots__ = ("cached_tokens",)

    def __init__(self, cached_tokens: int = 0) -> None:
        self.cached_tokens = cached_tokens


class CompletionTokensDetails(_Obj):
    """OpenAI's ``usage.completion_tokens_details``: where its SDK users read
    ``reasoning_tokens``."""

    __slots__ = ("reasoning_tokens",)

    def __init__(self, reasoning_tokens: int = 0) -> None:
        self.reasoning_tokens = reasoning_tokens


class Function(_Obj):
    __slots__ = ("arguments", "name")

    def __init__(self, name: str | None = None, arguments: str = "") -> None:
        self.name = name
        self.arguments = arguments


def _extra_content(d: dict[str, Any]) -> dict[str, Any] | None:
    extra = d.get("extra_content")
    return extra if type(extra) is dict else None


class ToolCall(_Obj):
    """A tool call in a whole message: ``function.arguments`` is the complete JSON text.

    ``extra_content`` is the provider's state that must travel back with the call, where
    Google's OpenAI-compatible endpoint puts it: ``{"google": {"thought_signature": ...}}``
    for a Gemini call. Send the call back as it came (the message object, or its dict) and
    the Gemini adapter returns the signature to Gemini; it is None (and not in the JSON) for
    every other provider."""

    __slots__ = ("extra_content", "function", "id", "type")
    _omit_none = ("extra_content",)

    def __init__(
        self,
        id: str,
        function: Function,
        type: str = "function",
        extra_content: dict[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.type = type
        self.function = function
        self.extra_content = extra_content

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToolCall:
        f = d.get("function") or {}
        return cls(
            id=d.get("id") or "",
            type=d.get("type") or "function",
            function=Function(f.get("name"), f.get("arguments") or ""),
            extra_content=_extra_content(d),
        )


class TopLogprob(_Obj):
    """One of the likeliest tokens at a position (``top_logprobs``)."""

    __slots__ = ("bytes", "logprob", "token")

    def __init__(self, token: str, logprob: float, bytes: list[int] | None = None) -> None:
        self.token = token
        self.bytes = bytes
        self.logprob = logprob


class ChatCompletionTokenLogprob(_Obj):
    """A token of the answer with its log probability, and the likeliest alternatives."""

    __slots__ = ("bytes", "logprob", "token", "top_logprobs")

    def __init__(
        self,
        token: str,
        logprob: float,
        bytes: list[int] | None = None,
        top_logprobs: list[TopLogprob] | None = None,
    ) -> None:
        self.token = token
        self.bytes = bytes
        self.logprob = logprob
        self.top_logprobs = [] if top_logprobs is None else top_logprobs

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        if type(d) is not dict:
            return d  # not OpenAI's shape: as it came
        top = d.get("top_logprobs")
        return cls(
            d.get("token", ""),
            d.get("logprob", 0.0),
            d.get("bytes"),
            [
                TopLogprob(t.get("token", ""), t.get("logprob", 0.0), t.get("bytes"))
                if type(t) is dict
                else t
                for t in top
            ]
            if type(top) is list
            else [],
        )


class ChoiceLogprobs(_Obj):
    """``choice.logprobs`` (asked with ``logprobs=True``): the answer's tokens (``content``)
    or its refusal's, each a ``ChatCompletionTokenLogprob``, as the openai SDK reads them
    (``choice.logprobs.content[0].logprob``)."""

    __slots__ = ("content", "refusal")

    def __init__(
        self,
        content: list[ChatCompletionTokenLogprob] | None = None,
        refusal: list[ChatCompletionTokenLogprob] | None = None,
    ) -> None:
        self.content = content
        self.refusal = refusal

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        """Called only for a choice that has logprobs; a value not of OpenAI's shape is
        kept as it came."""
        if type(d) is not dict:
            return d
        content, refusal = d.get("content"), d.get("refusal")
        return cls(
            [ChatCompletionTokenLogprob.from_dict(t) for t in content]
            if type(content) is list
            else None,
            [ChatCompletionTokenLogprob.from_dict(t) for t in refusal]
            if type(refusal) is list
            else None,
        )


class ChoiceDeltaToolCall(_Obj):
    """A piece of a streamed tool call: ``id`` and ``name`` arrive once, ``arguments`` in
    pieces to concatenate by ``index``; ``extra_content`` (see ``ToolCall``) with the
    piece that has the ``id``."""

    __slots__ = ("extra_content", "function", "id", "index", "type")

    def __init__(
        self,
        index: int,
        id: str | None = None,
        type: str | None = None,
        function: Function | None = None,
        extra_content: dict[str, Any] | None = None,
    ) -> None:
        self.index = index
        self.id = id
        self.type = type
        self.function = function
        self.extra_content = extra_content

    def to_dict(self) -> dict[str, Any]:
        """Without the fields a piece does not carry, as OpenAI streams them: the openai
        SDK's ``chat.completions.stream()`` copies a continuation's ``"type": null`` over
        the call's ``"function"`` and fails."""
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
        if self.type is not None:
            out["type"] = self.type
        f = self.function
        if f is not None:
            out["function"] = (
                {"arguments": f.arguments}
                if f.name is None
                else {"name": f.name, "arguments": f.arguments}
            )
        if self.extra_content is not None:
            out["extra_content"] = self.extra_content
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChoiceDeltaToolCall:
        f = d.get("function")
        return cls(
            index=d.get("index", 0),
            id=d.get("id"),
            type=d.get("type"),
            function=None if f is None else Function(f.get("name"), f.get("arguments") or ""),
            extra_content=_extra_content(d),
        )


class ChoiceDelta(_Obj):
    """A piece of a streamed message. ``annotations``: citations the provider streams
    (OpenAI's web search sends them in a delta of their own, near the end), as
    ``Annotation`` objects; else None (and not in the JSON). ``reasoning_content`` and
    ``thinking_blocks`` are None here: a piece of the model's reasoning is a
    ``ReasoningDelta``, which carries them (a delta of text stores and writes nothing more
    for them)."""

    __slots__ = ("annotations", "content", "refusal", "role", "tool_calls")
    _omit_none = ("annotations",)
    #: As on the openai SDK's deltas; None always (Lunar refuses ``functions``).
    function_call: None = None
    reasoning_content: str | None = None
    thinking_blocks: list[dict[str, Any]] | None = None

    def __init__(
        self,
        role: str | None = None,
        content: str | None = None,
        tool_calls: list[ChoiceDeltaToolCall] | None = None,
        refusal: str | None = None,
        annotations: list[Annotation] | None = None,
    ) -> None:
        self.role = role
        self.content = content
        self.tool_calls = tool_calls
        self.refusal = refusal
        self.annotations = annotations


_delta_fields = _to_dict_for(ChoiceDelta)


class ReasoningDelta(ChoiceDelta):
    """A ``ChoiceDelta`` with the model's reasoning. ``reasoning_content``: a piece of it
    (Anthropic's thinking, Gemini's thoughts, an OpenAI-compatible server's
    ``reasoning_content`` / ``reasoning``), as DeepSeek streams it. ``thinking_blocks``: an
    Anthropic thinking block's end, ``[{"type": "thinking", "signature": ...}]`` (its text
    came in the ``reasoning_content`` pieces before), or a whole ``redacted_thinking``
    block. Each is left out of the JSON while None."""

    __slots__ = ("reasoning_content", "thinking_blocks")

    def __init__(
        self,
        role: str | None = None,
        content: str | None = None,
        tool_calls: list[ChoiceDeltaToolCall] | None = None,
        refusal: str | None = None,
        reasoning_content: str | None = None,
        thinking_blocks: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(role, content, tool_calls, refusal)
        self.reasoning_content = reasoning_content
        self.thinking_blocks = thinking_blocks

    def to_dict(self) -> dict[str, Any]:
        out = _delta_fields(self)
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.thinking_blocks is not None:
            out["thinking_blocks"] = self.thinking_blocks
        return out


#: The fields that make a message or a delta one with reasoning (``_reasoning``).
_REASONING_KEYS = frozenset(("reasoning_content", "reasoning", "thinking_blocks"))


class ChunkChoice(_Obj):
    """A choice of a streamed chunk; ``stop_sequence`` as on ``Choice``, with the finish."""

    __slots__ = ("delta", "finish_reason", "index", "logprobs", "stop_sequence")
    _omit_none = ("stop_sequence",)

    def __init__(
        self,
        index: int = 0,
        delta: ChoiceDelta | None = None,
        finish_reason: str | None = None,
        logprobs: ChoiceLogprobs | None = None,
        stop_sequence: str | None = None,
    ) -> None:
        self.index = index
        self.delta = ChoiceDelta() if delta is None else delta
        self.finish_reason = finish_reason
        self.logprobs = logprobs
        self.stop_sequence = stop_sequence


def _reasoning(d: dict[str, Any], into: ReasoningDelta | ChatCompletionMessage) -> None:
    """A message's or a delta's reasoning, as OpenAI-compatible servers give it, onto
    ``into``: its text under ``reasoning_content`` (DeepSeek, vLLM, Lunar) or ``reasoning``
    (OpenRouter, Groq, Ollama), and a Lunar gateway's ``thinking_blocks`` (Anthropic's
    signed blocks, for the next turn)."""
    text = d.get("reasoning_content")
    if type(text) is not str:
        text = d.get("reasoning")
    if type(text) is str:
        into.reasoning_content = text
    blocks = d.get("thinking_blocks")
    if type(blocks) is list:
        into.thinking_blocks = [b for b in blocks if type(b) is dict]


def _stop_sequence(c: dict[str, Any]) -> str | None:
    """The matched stop sequence of a finished choice, as a Lunar gateway passes it on
    (called for the finishing chunk only: the others skip the call)."""
    stop = c.get("stop_sequence")
    return stop if type(stop) is str else None


def _envelope(
    cls: Callable[..., _T], d: dict[str, Any], choices: list[Any], provider: str | None
) -> _T:
    """A completion or a chunk: ``choices`` in the fields both carry, read from ``d``."""
    get = d.get
    usage = get("usage")
    return cls(  # positional: once per streamed event, and keywords cost more
        get("id") or "",
        get("created") or 0,
        get("model") or "",
        choices,
        Usage.from_dict(usage) if type(usage) is dict else None,  # (not an object: unknown)
        get("system_fingerprint"),
        get("provider") if provider is None else provider,
    )


class ChatCompletionChunk(_Obj):
    """One streamed event, as the OpenAI API shapes it, plus ``provider`` (who answered).
    ``service_tier`` is read only on the chunk with usage (the tier the answer is billed
    at): not per event."""

    __slots__ = (
        "choices",
        "created",
        "id",
        "model",
        "object",
        "provider",
        "service_tier",
        "system_fingerprint",
        "usage",
    )
    _omit_none = ("service_tier",)

    def __init__(
        self,
        id: str,
        created: int,
        model: str,
        choices: list[ChunkChoice],
        usage: Usage | None = None,
        system_fingerprint: str | None = None,
        provider: str | None = None,
        object: str = "chat.completion.chunk",
    ) -> None:
        self.id = id
        self.object = object
        self.created = created
        self.model = model
        self.system_fingerprint = system_fingerprint
        self.choices = choices
        self.usage = usage
        self.provider = provider
        self.service_tier: str | None = None

    def compact_json(self) -> str:
        """``compact_json(self.to_dict())``."""
        text = self.common_json()
        return compact_json(self.to_dict()) if text is None else text

    def common_json(self) -> str | None:
        """``compact_json(self.to_dict())`` for the common shape, else ``None``: see
        ``ChunkEncoder`` (which a stream's writer keeps for all its chunks)."""
        return ChunkEncoder().encode(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], provider: str | None = None) -> ChatCompletionChunk:
        choices = []
        for c in d.get("choices") or ():
            delta = c.get("delta") or {}
            tcs = delta.get("tool_calls")
            finish = c.get("finish_reason")
            logprobs = c.get("logprobs")
            piece = ChoiceDelta(
                delta.get("role"),
                delta.get("content"),
                None if tcs is None else [ChoiceDeltaToolCall.from_dict(t) for t in tcs],
                delta.get("refusal"),
                # (``in``: no call, for the deltas, nearly all, that have none)
                _annotations(delta["annotations"]) if "annotations" in delta else None,
            )
            if not _REASONING_KEYS.isdisjoint(delta):  # (one C call for a delta without)
                reasoning = ReasoningDelta(
                    piece.role, piece.content, piece.tool_calls, piece.refusal
                )
                reasoning.annotations = piece.annotations
                _reasoning(delta, reasoning)
                piece = reasoning
            choices.append(
                ChunkChoice(
                    c.get("index", 0),
                    piece,
                    finish,
                    None if logprobs is None else ChoiceLogprobs.from_dict(logprobs),
                    None if finish is None else _stop_sequence(c),
                )
            )
        out = _envelope(cls, d, choices, provider)
        if out.usage is not None:
            tier = d.get("service_tier")
            if type(tier) is str:
                out.service_tier = tier
        return out


class ChunkEncoder:
    """``compact_json(chunk.to_dict())``, written directly for the shape nearly every
    streamed chunk has (one choice, a text delta, no tool calls, no usage): the gateway
    writes one per event, and building the dict and walking it was a fifth of its CPU at
    250 streams. ``encode`` gives ``None`` for any other shape.

    One encoder serves one stream's chunks in turn. The fields they all repeat (id,
    created, model, object, provider, fingerprint) are written once and kept while they
    stay equal: a chunk then costs its own delta's few fields."""

    __slots__ = ("_envelope", "_tail")

    def __init__(self) -> None:
        self._envelope: tuple[Any, ...] | None = None
        self._tail = ""

    def encode(self, chunk: ChatCompletionChunk) -> str | None:
        choices = chunk.choices
        if chunk.usage is not None or len(choices) != 1:
            return None
        choice = choices[0]
        delta = choice.delta
        if (
            delta.tool_calls is not None
            or choice.logprobs is not None
            or choice.stop_sequence is not None
            or delta.annotations is not None
            or delta.__class__ is ReasoningDelta
        ):
            return None
        return self.text(
            chunk.id,
            chunk.created,
            chunk.model,
            chunk.object,
            chunk.provider,
            chunk.system_fingerprint,
            choice.index,
            delta.content,
            delta.refusal,
            delta.role,
            choice.finish_reason,
        )

    def text(
        self,
        id: Any,
        created: Any,
        model: Any,
        obj: Any,
        provider: Any,
        fingerprint: Any,
        index: Any,
        c: Any,
        r: Any,
        ro: Any,
        f: Any,
    ) -> str | None:
        """The JSON text of a chunk with one choice, no usage, no tool calls and no logprobs,
        from its fields (``c``, ``r``, ``ro``, ``f``: the delta's content, refusal and role,
        and the finish reason); ``None`` when a field has no fast path (not a string, an int,
        or None where it should be). ``encode`` gives a chunk's fields; the gateway's relay
        (``providers.openai.PlainRelay``) gives an event's, read from its JSON."""
        # Checked each time: True == 1 in the envelope tuple below.
        if type(index) is not int or type(created) is not int:
            return None
        envelope = (id, created, model, obj, provider, fingerprint)
        if envelope != self._envelope:
            parts = [_text(v) for v in envelope[2:]]
            text_id = _text(id)
            if text_id is None or None in parts:
                return None
            model_t, obj_t, provider_t, fp_t = parts
            self._tail = (
                f'"created":{created},"id":{text_id},"model":{model_t},"object":{obj_t},'
                f'"provider":{provider_t},"system_fingerprint":{fp_t},"usage":null}}'
            )
            self._envelope = envelope
        # None is most of these: "null" without a call.
        content = "null" if c is None else _text(c)
        refusal = "null" if r is None else _text(r)
        role = "null" if ro is None else _text(ro)
        finish = "null" if f is None else _text(f)
        if content is None or refusal is None or role is None or finish is None:
            return None
        return (
            f'{{"choices":[{{"delta":{{"content":{content},"refusal":{refusal},'
            f'"role":{role},"tool_calls":null}},"finish_reason":{finish},'
            f'"index":{index},"logprobs":null}}],{self._tail}'
        )


class URLCitation(_Obj):
    """Where a web-search answer's text cites a page: its characters ``start_index`` to
    ``end_index`` of the message's content, and the page's ``url`` and ``title``."""

    __slots__ = ("end_index", "start_index", "title", "url")

    def __init__(self, end_index: Any, start_index: Any, title: Any, url: Any) -> None:
        self.end_index = end_index
        self.start_index = start_index
        self.title = title
        self.url = url


class Annotation(_Obj):
    """One of a message's ``annotations`` (OpenAI's web search): ``type`` is
    ``"url_citation"``, ``url_citation`` its ``URLCitation``."""

    __slots__ = ("type", "url_citation")

    def __init__(self, type: str, url_citation: URLCitation | None = None) -> None:
        self.type = type
        self.url_citation = url_citation

    @classmethod
    def from_dict(cls, d: Any) -> Annotation:
        if not isinstance(d, dict):
            return cls("")
        c = d.get("url_citation")
        citation = None
        if isinstance(c, dict):
            get = c.get
            citation = URLCitation(get("end_index"), get("start_index"), get("title"), get("url"))
        kind = d.get("type")
        return cls(kind if isinstance(kind, str) else "", citation)


def _annotations(value: Any) -> list[Annotation] | None:
    return [Annotation.from_dict(a) for a in value] if type(value) is list else None


class ChatCompletionMessage(_Obj):
    """A whole answer's message. ``annotations``: the provider's citations (OpenAI's web
    search), else None (and not in the JSON). ``reasoning_content``: the model's reasoning
    (Anthropic's thinking, Gemini's thoughts, an OpenAI-compatible server's
    ``reasoning_content`` or ``reasoning``), where DeepSeek puts it; ``thinking_blocks``:
    Anthropic's thinking blocks with their signatures (``{"type": "thinking", "thinking",
    "signature"}``, ``{"type": "redacted_thinking", "data"}``), which must go back with the
    message in a tool-use conversation (send the message back as it came). Both None (and
    not in the JSON) when the answer has none. ``audio`` and ``function_call`` are None
    always, as the openai SDK's are for what Lunar asks (it refuses audio output and the
    deprecated ``functions``): there for code that reads them."""

    __slots__ = (
        "annotations",
        "content",
        "reasoning_content",
        "refusal",
        "role",
        "thinking_blocks",
        "tool_calls",
    )
    _omit_none = ("annotations", "reasoning_content", "thinking_blocks")
    audio: None = None
    function_call: None = None

    def __init__(
        self,
        role: str = "assistant",
        content: str | None = None,
        tool_calls: list[ToolCall] | None = None,
        refusal: str | None = None,
        annotations: list[Annotation] | None = None,
        reasoning_content: str | None = None,
        thinking_blocks: list[dict[str, Any]] | None = None,
    ) -> None:
        self.role = role
        self.content = content
        self.tool_calls = tool_calls
        self.refusal = refusal
        self.annotations = annotations
        self.reasoning_content = reasoning_content
        self.thinking_blocks = thinking_blocks


class Choice(_Obj):
    """A choice of a whole answer. ``stop_sequence`` (Lunar's, not OpenAI's) is the stop
    sequence that ended it (``finish_reason`` "stop"), when the provider says which: an
    Anthropic model does; OpenAI and Gemini say only "stop", so it is None there (and not
    in the JSON) -- as it is for an answer that stopped for any other reason."""

    __slots__ = ("finish_reason", "index", "logprobs", "message", "stop_sequence")
    _omit_none = ("stop_sequence",)

    def __init__(
        self,
        index: int,
        message: ChatCompletionMessage,
        finish_reason: str | None,
        logprobs: ChoiceLogprobs | None = None,
        stop_sequence: str | None = None,
    ) -> None:
        self.index = index
        self.message = message
        self.finish_reason = finish_reason
        self.logprobs = logprobs
        self.stop_sequence = stop_sequence


class ChatCompletion(_Obj):
    """A whole answer. ``service_tier``: the tier that served it, when the provider says
    (OpenAI does), else None (and not in the JSON)."""

    __slots__ = (
        "choices",
        "created",
        "id",
        "model",
        "object",
        "provider",
        "service_tier",
        "system_fingerprint",
        "usage",
    )
    _omit_none = ("service_tier",)

    def __init__(
        self,
        id: str,
        created: int,
        model: str,
        choices: list[Choice],
        usage: Usage | None = None,
        system_fingerprint: str | None = None,
        provider: str | None = None,
        object: str = "chat.completion",
        service_tier: str | None = None,
    ) -> None:
        self.id = id
        self.object = object
        self.created = created
        self.model = model
        self.system_fingerprint = system_fingerprint
        self.choices = choices
        self.usage = usage
        self.provider = provider
        self.service_tier = service_tier

    @classmethod
    def from_dict(cls, d: dict[str, Any], provider: str | None = None) -> ChatCompletion:
        choices = []
        for c in d.get("choices") or ():
            m = c.get("message") or {}
            tcs = m.get("tool_calls")
            finish = c.get("finish_reason")
            logprobs = c.get("logprobs")
            message = ChatCompletionMessage(
                m.get("role") or "assistant",
                m.get("content"),
                [ToolCall.from_dict(t) for t in tcs] if tcs else None,
                m.get("refusal"),
                _annotations(m.get("annotations")),
            )
            if not _REASONING_KEYS.isdisjoint(m):
                _reasoning(m, message)
            choices.append(
                Choice(
                    c.get("index", 0),
                    message,
                    finish,
                    None if logprobs is None else ChoiceLogprobs.from_dict(logprobs),
                    None if finish is None else _stop_sequence(c),
                )
            )
        out = _envelope(cls, d, choices, provider)
        tier = d.get("service_tier")
        if type(tier) is str:
            out.service_tier = tier
        return out


class CompletionChoice(_Obj):
    __slots__ = ("finish_reason", "index", "logprobs", "text")

    def __init__(
        self, index: int, text: str, finish_reason: str | None, logprobs: Any = None
    ) -> None:
        self.index = index
        self.text = text
        self.finish_reason = finish_reason
        self.logprobs = logprobs


class Completion(_Obj):
    """A legacy text completion (``object == "text_completion"``), whole or one streamed piece."""

    __slots__ = ("choices", "created", "id", "model", "object", "provider", "usage")

    def __init__(
        self,
        id: str,
        created: int,
        model: str,
        choices: list[CompletionChoice],
        usage: Usage | None = None,
        provider: str | None = None,
        object: str = "text_completion",
    ) -> None:
        self.id = id
        self.object = object
        self.created = created
        self.model = model
        self.choices = choices
        self.usage = usage
        self.provider = provider

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Completion:
        usage = d.get("usage")
        return cls(
            id=d.get("id") or "",
            created=d.get("created") or 0,
            model=d.get("model") or "",
            choices=[
                CompletionChoice(
                    c.get("index", 0),
                    c.get("text") or "",
                    c.get("finish_reason"),
                    c.get("logprobs"),
                )
                for c in d.get("choices") or ()
            ],
            usage=Usage.from_dict(usage) if type(usage) is dict else None,
            provider=d.get("provider"),
        )


class Model(_Obj):
    """A catalogue entry as ``/v1/models`` shows it, with Lunar's price and capability fields."""

    __slots__ = (
        "capabilities",
        "context_window",
        "created",
        "id",
        "input_price_per_1m",
        "object",
        "output_price_per_1m",
        "owned_by",
        "providers",
    )

    def __init__(
        self,
        id: str,
        owned_by: str,
        providers: list[str] | None = None,
        context_window: int | None = None,
        input_price_per_1m: float | None = None,
        output_price_per_1m: float | None = None,
        capabilities: list[str] | None = None,
        created: int = 0,
        object: str = "model",
    ) -> None:
        self.id = id
        self.object = object
        self.created = created
        self.owned_by = owned_by
        self.providers = providers or [owned_by]
        self.context_window = context_window
        self.input_price_per_1m = input_price_per_1m
        self.output_price_per_1m = output_price_per_1m
        self.capabilities = capabilities or []

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Model:
        return cls(
            id=d["id"],
            owned_by=d.get("owned_by") or "",
            providers=d.get("providers"),
            context_window=d.get("context_window"),
            input_price_per_1m=d.get("input_price_per_1m"),
            output_price_per_1m=d.get("output_price_per_1m"),
            capabilities=d.get("capabilities"),
            created=d.get("created") or 0,
        )


class SyncPage(_Obj):
    """A list endpoint's answer: iterate it, or read ``data``."""

    __slots__ = ("data", "object")

    def __init__(self, data: list[Model]) -> None:
        self.object = "list"
        self.data = data

    def __iter__(self) -> Iterator[Model]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)
