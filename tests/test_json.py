"""lunar._json.loads (orjson when installed) must accept, refuse and return exactly what
json.loads does: the gateway and the SDK parse every response and stream event with it.
lunar._json.dumps must write what the standard library writes, read back as the same value,
and refuse what it refuses: the gateway writes every response with it."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunar import _json

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # beyond 64 bits too
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def outcome(loads: Callable[[Any], Any], text: str | bytes) -> tuple[str, Any]:
    """What parsing gives, comparable across NaN (NaN != NaN) and -0.0."""
    try:
        value = loads(text)
    except (ValueError, RecursionError, TypeError) as exc:
        return ("error", type(exc).__name__)
    return ("value", _canonical(value))


def same(text: Any) -> bool:
    # json.loads behind one more frame, as in _json.loads: how deep JSON may nest before
    # RecursionError depends on the caller's stack.
    return outcome(_json.loads, text) == outcome(lambda t: json.loads(t), text)


def _canonical(value: Any) -> Any:
    if isinstance(value, float):
        return ("float", "nan" if math.isnan(value) else value.hex())
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return [(k, _canonical(v)) for k, v in value.items()]  # key order matters too
    return (type(value).__name__, value)


@settings(max_examples=400, deadline=None)
@given(values, st.booleans())
def test_same_values_as_json_loads(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert same(text)
    try:
        data = text.encode()
    except UnicodeEncodeError:  # a lone surrogate: only the \\u escape form exists as bytes
        return
    assert same(data)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet='{}[]":,.-+eE0123456789 \\ntrufalsNIy\ud800', max_size=40))
def test_same_verdict_on_near_json(text: str) -> None:
    assert same(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_same_verdict_on_any_bytes(data: bytes) -> None:
    assert same(data)


@pytest.mark.parametrize(
    "text",
    [
        '"\\ud800"',  # a lone surrogate escape: JSON allows it, orjson does not
        "18446744073709551616",  # 2**64
        "-9223372036854775809",  # below int64
        "NaN",
        "[Infinity, -Infinity]",
        '{"a": 1, "a": 2}',  # the last duplicate wins
        "1e400",
        "-0.0",
        '\ufeff{"a": 1}',  # a BOM in text is an error for both
        "[" * 2000 + "]" * 2000,  # nested deeper than orjson goes
        "",
        "{",
        "[1,]",
    ],
)
def test_edge_cases_match(text: str) -> None:
    assert same(text)
    assert same(text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("depth", range(980, 1031))
def test_nesting_near_the_recursion_limit_is_json_loads_verdict(depth: int) -> None:
    """orjson nests to 1,024; json.loads gives up sooner, by how deep the stack already is.
    A body between the two must still be refused (the gateway answers 400, not 500)."""
    for text in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        assert same(text) and same(text.encode())


@pytest.mark.parametrize("value", [memoryview(b"{}"), None, 12, bytearray(b"[1]")])
def test_other_types_get_json_loads_answer(value: Any) -> None:
    assert same(value)


def test_utf16_bytes_are_read_like_json_loads() -> None:
    data = json.dumps({"k": "v"}).encode("utf-16")
    assert _json.loads(data) == json.loads(data) == {"k": "v"}


def std_dumps(value: Any) -> bytes:
    return _json._dumps_std(value)


def written(dumps: Callable[[Any], bytes], value: Any) -> tuple[str, Any]:
    try:
        return ("text", _canonical(json.loads(dumps(value))))
    except (ValueError, TypeError, RecursionError) as exc:
        return ("error", type(exc).__name__)


@settings(max_examples=400, deadline=None)
@given(values)
def test_dumps_writes_what_the_standard_library_writes(value: Any) -> None:
    fast = _json.dumps(value)
    assert type(fast) is bytes
    # Both read back as the value, with NaN and the infinities as null.
    expected = ("text", _canonical(finite(value)))
    assert written(_json.dumps, value) == written(std_dumps, value) == expected
    # Compact and not \\u-escaped: the same bytes, but for the exponent's spelling.
    if not any(isinstance(v, float) for v in _leaves(value)):
        assert fast == std_dumps(value)


def finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [finite(v) for v in value]
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return value


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def test_dumps_is_compact_utf8() -> None:
    value = {"a": [1, 2.5, None, True], "é": 'snow ☃ \n " \\'}
    std = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    assert _json.dumps(value) == std.encode()


@pytest.mark.parametrize(
    "value",
    [
        2**64,  # beyond 64 bits: orjson refuses, the standard library writes it
        -(2**63) - 1,
        {"a": [2**100]},
        {1: "int key", None: "null key", 2.5: "float key", False: "bool key"},
        "lone \ud800 surrogate",
        {"k\udfff": "v"},
        json.loads("[" * 300 + "]" * 300),  # deeper than orjson writes (254)
    ],
)
def test_dumps_falls_back_to_the_standard_library(value: Any) -> None:
    assert _json.dumps(value) == std_dumps(value)
    assert _json.loads(_json.dumps(value)) == json.loads(std_dumps(value))


def test_a_lone_surrogate_is_written_as_its_escape() -> None:
    assert _json.dumps("a\ud800b") == b'"a\\ud800b"'
    assert json.loads(_json.dumps("a\ud800b")) == "a\ud800b"


@pytest.mark.parametrize("value", [object(), {"a": {1, 2}}, b"bytes", complex(1, 2)])
def test_dumps_refuses_what_the_standard_library_refuses(value: Any) -> None:
    with pytest.raises(TypeError):
        std_dumps(value)
    with pytest.raises(TypeError):
        _json.dumps(value)


def test_dumps_refuses_a_cycle_like_the_standard_library() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="Circular"):
        _json.dumps(cycle)


@pytest.mark.parametrize(
    "value",
    [
        {"a": float("nan"), "b": [float("inf"), -float("inf")]},
        {"a": float("nan"), "text": "half a pair \ud83d"},  # the fallback writes this one
        [float("inf"), 2**64],  # so does it this one
    ],
)
def test_non_json_floats_are_written_as_null_by_both_writers(value: Any) -> None:
    """NaN and the infinities are not JSON: strict parsers (JavaScript's, Go's) refuse the
    ``NaN`` the standard library writes by default. Both writers write null."""
    for dumps in (_json.dumps, std_dumps):
        out = dumps(value)
        assert b"NaN" not in out and b"Infinity" not in out
        assert json.loads(out) == finite(value)


class _Items(dict):
    def items(self):  # type: ignore[override]
        return [("x", 1)]


class _Iter(list):
    def __iter__(self):  # type: ignore[override]
        return iter([42])


@pytest.mark.parametrize("value", [_Items(a=1), _Iter([1, 2]), {"k": _Items(a=1)}])
def test_subclasses_are_written_as_the_standard_library_writes_them(value: Any) -> None:
    assert _json.dumps(value) == std_dumps(value)


@pytest.mark.parametrize(
    "value", [dataclasses.make_dataclass("Point", ["x"])(1), datetime.date(2020, 1, 1)]
)
def test_types_the_standard_library_refuses_are_refused(value: Any) -> None:
    with pytest.raises(TypeError):
        _json.dumps(value)
