"""lunar._json.loads (orjson when installed) must accept, refuse and return exactly what
json.loads does: the gateway and the SDK parse every response and stream event with it."""

from __future__ import annotations

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
