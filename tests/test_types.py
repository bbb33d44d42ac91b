"""The wire types' ``to_dict``: written out per class from its ``__slots__``."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lunar._types as types
from lunar._types import Usage, _Obj

CLASSES = [
    c for c in vars(types).values() if isinstance(c, type) and issubclass(c, _Obj) and c is not _Obj
]


def fields(obj: _Obj) -> list[str]:
    """The slots ``to_dict`` gives, in order: every slot, those of ``_omit_none`` (Lunar's
    additions to an OpenAI shape) last and only while they are set."""
    cls = type(obj)
    always = [name for name in cls.__slots__ if name not in cls._omit_none]
    return always + [name for name in cls._omit_none if getattr(obj, name) is not None]


def reference(value: Any) -> Any:
    """What ``to_dict`` must give: its ``fields`` in order, objects and lists of them turned
    into dicts, anything else (a dict, a scalar) as it is."""
    if isinstance(value, _Obj):
        return {name: reference(getattr(value, name)) for name in fields(value)}
    if isinstance(value, list):
        return [reference(v) for v in value]
    return value


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5))


def instance(cls: type[_Obj], values: st.DataObject) -> _Obj:
    obj = cls.__new__(cls)
    for name in cls.__slots__:
        kind = values.draw(st.sampled_from(["scalar", "object", "list", "dict"]), label=name)
        if kind == "scalar":
            value: Any = values.draw(scalars)
        elif kind == "object":
            value = types.Function(values.draw(st.text(max_size=3)), "{}")
        elif kind == "list":
            value = [types.Function("f", "{}"), values.draw(scalars)]
        else:
            value = {"nested": [1, {"a": None}]}
        setattr(obj, name, value)
    return obj


def test_every_wire_type_has_its_own_to_dict():
    assert len(CLASSES) >= 10
    for cls in CLASSES:
        assert "to_dict" in vars(cls), cls


def test_model_dump_takes_what_openai_users_pass():
    """`r.model_dump(exclude_none=True)` and `r.model_dump_json()`, as on the openai SDK's
    objects (pydantic's), were a TypeError and an AttributeError."""
    message = types.ChatCompletionMessage("assistant", "héllo")
    choice = types.Choice(0, message, "stop")
    done = types.ChatCompletion("c1", 1, "m", [choice], usage=Usage(3, 4))
    full = done.model_dump()
    assert full == done.to_dict() == done.model_dump(mode="json", by_alias=True)
    assert full["choices"][0]["message"]["tool_calls"] is None
    lean = done.model_dump(exclude_none=True)
    assert "tool_calls" not in lean["choices"][0]["message"]
    assert "logprobs" not in lean["choices"][0]
    assert lean["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # zeros stay
    assert json.loads(done.model_dump_json()) == full
    assert json.loads(done.model_dump_json(exclude_none=True, indent=2)) == lean
    assert "héllo" in done.model_dump_json(indent=2)  # as pydantic writes it, unescaped
    with pytest.raises(ValueError, match="mode"):
        done.model_dump(mode="yaml")


#: All but the hand-written ones (a streamed tool call's piece leaves out what it lacks;
#: usage adds OpenAI's prompt_tokens_details; a reasoning delta adds its fields to a delta's).
FROM_SLOTS = [c for c in CLASSES if getattr(c.to_dict, "_from_slots", False)]


def test_a_streamed_tool_calls_piece_leaves_out_what_it_does_not_carry():
    piece = types.ChoiceDeltaToolCall(1, function=types.Function(None, '{"a'))
    assert piece.to_dict() == {"index": 1, "function": {"arguments": '{"a'}}
    first = types.ChoiceDeltaToolCall(0, "call_1", "function", types.Function("f", ""))
    assert first.model_dump() == {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    hand_written = {types.ChoiceDeltaToolCall, types.Usage, types.ReasoningDelta}
    assert set(FROM_SLOTS) == set(CLASSES) - hand_written


def test_usage_also_puts_cached_tokens_where_openai_does():
    usage = Usage(10, 5, cached_tokens=3)
    assert usage.prompt_tokens_details.cached_tokens == 3
    out = usage.to_dict()
    assert out["prompt_tokens_details"] == {"cached_tokens": 3}
    assert list(out) == [*Usage.__slots__, "prompt_tokens_details", "completion_tokens_details"]
    assert usage.model_dump() == out


@given(st.sampled_from(FROM_SLOTS), st.data())
def test_to_dict_gives_every_slot_in_order_with_objects_as_dicts(cls, data):
    obj = instance(cls, data)
    out = obj.to_dict()
    assert out == reference(obj)
    assert list(out) == fields(obj)
    assert obj.model_dump() == out


@pytest.mark.parametrize(
    ("obj", "name", "value"),
    [
        (types.ToolCall("c", types.Function("f", "{}")), "extra_content", {"google": {}}),
        (types.Choice(0, types.ChatCompletionMessage(), "stop"), "stop_sequence", "END"),
        (types.ChunkChoice(0, types.ChoiceDelta(), "stop"), "stop_sequence", "END"),
    ],
)
def test_lunars_additions_are_in_the_json_only_when_set(obj, name, value):
    """No ``"stop_sequence": null`` on every choice, no ``"extra_content": null`` on every
    tool call: OpenAI refuses a field it does not know in a tool call sent back, and an SDK
    user sends back what ``to_dict`` gave."""
    assert name not in obj.to_dict()
    setattr(obj, name, value)
    assert obj.to_dict()[name] == value


def test_a_hand_written_to_dict_or_model_dump_is_kept_by_the_class_and_its_subclasses():
    class Custom(_Obj):
        __slots__ = ("a",)

        def to_dict(self) -> dict[str, Any]:
            return {"custom": True}

    class FromCustom(Custom):
        __slots__ = ("b",)

    class OwnDump(_Obj):
        __slots__ = ("a",)

        def model_dump(self) -> dict[str, Any]:
            return {"own": True}

    class FromGenerated(types.Function):
        __slots__ = ("extra",)

    obj = FromCustom()
    obj.a, obj.b = 1, 2
    assert obj.to_dict() == {"custom": True}
    own = OwnDump()
    own.a = 1
    assert own.to_dict() == {"a": 1} and own.model_dump() == {"own": True}
    derived = FromGenerated("f", "{}")
    derived.extra = 3
    assert derived.to_dict() == {"extra": 3}  # its own slots, as the slot walk gave
    assert FromGenerated.to_dict.__qualname__.endswith("FromGenerated.to_dict")
    assert types.Usage.to_dict.__module__ == "lunar._types"


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=4), inner, max_size=2)
    ),
    max_leaves=4,
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "cached_tokens",
                "prompt_tokens_details",
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
                "promptTokenCount",
                "candidatesTokenCount",
                "thoughtsTokenCount",
                "cachedContentTokenCount",
                "input_cost_usd",
                "cached_input_cost_usd",
                "output_cost_usd",
                "total_cost_usd",
            ]
        ),
        JSON_VALUE | st.fixed_dictionaries({"cached_tokens": JSON_VALUE}),
    )
)
def test_any_usage_json_from_any_wire_prices_to_finite_costs(d):
    """Token counts are the upstream's JSON: whatever they hold (NaN, 1e400, "3", -1, a
    list), each wire's usage is whole numbers from 0 and its cost finite."""
    from lunar._catalog import Prices, cost
    from lunar.providers import anthropic, gemini

    given = Usage.from_dict(d)  # costs too, as a Lunar gateway sends them (remote mode)
    costs = (given.input_cost_usd, given.cached_input_cost_usd, given.output_cost_usd)
    costs += (given.total_cost_usd,)
    assert all(c is None or (type(c) is float and 0 <= c < math.inf) for c in costs)
    for usage in (given, anthropic._usage(d), gemini._usage(d)):
        cost(usage, Prices(input=0.15, output=0.6, cached_input=0.075))
        counts = (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        assert all(type(n) is int and n >= 0 for n in (*counts, usage.total_tokens))
        assert all(
            math.isfinite(x) and x >= 0 for x in (usage.total_cost_usd, usage.input_cost_usd)
        )


def test_a_reasoning_delta_is_a_delta_with_its_reasoning():
    plain = types.ChoiceDelta(content="x")
    assert plain.reasoning_content is None and plain.thinking_blocks is None
    assert "reasoning_content" not in plain.to_dict()
    piece = types.ReasoningDelta(reasoning_content="hmm")
    assert isinstance(piece, types.ChoiceDelta)
    assert piece.to_dict() == {
        "content": None,
        "refusal": None,
        "role": None,
        "tool_calls": None,
        "reasoning_content": "hmm",
    }
    assert piece == types.ReasoningDelta(reasoning_content="hmm")
    assert piece != types.ReasoningDelta(reasoning_content="other")
    assert "reasoning_content='hmm'" in repr(piece)
    chunk = types.ChatCompletionChunk(
        "c", 1, "m", [types.ChunkChoice(0, piece)], provider="deepseek"
    )
    again = types.ChatCompletionChunk.from_dict(json.loads(chunk.compact_json()))
    assert again.choices[0].delta == piece
