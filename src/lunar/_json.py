"""Parsing JSON: orjson when it is installed (the ``fast`` and ``server`` extras), the standard
library otherwise, with the same results either way.

A streamed response is one JSON object per event, and parsing them was the largest share of
the CPU Lunar spends on a chunk (``json.loads`` is a Python wrapper around a C scanner that
builds every string twice). orjson parses the same objects in a fraction of the time. Whatever
orjson refuses (a lone surrogate escape, ``NaN``, UTF-16 bytes, nesting deeper than 1,024)
goes to ``json.loads``, which decides: the values accepted and the errors raised are the
standard library's. Two things orjson accepts where ``json.loads`` differs, so such text goes
straight to ``json.loads``:

- an integer beyond 64 bits (orjson makes it a float): text with a run of 19 digits or more,
  the shortest that can be out of range;
- nesting deeper than ``json.loads`` can go before ``RecursionError`` (the recursion limit
  less the caller's stack): text of 512 bytes or more with 256 or more ``[`` and ``{`` in
  all. Shorter text cannot nest 256 deep, which ``json.loads`` reads unless the caller is
  already ~700 frames deep. (The length test first: counting costs about as much as the
  parse on a stream event.)

Anything that is not ``str``, ``bytes`` or ``bytearray`` goes to ``json.loads`` as well, for
its ``TypeError``.

Writing is the same arrangement: ``dumps`` gives compact UTF-8 JSON, from ``orjson.dumps``
when it is installed, and whatever orjson refuses (an integer beyond 64 bits, a key that is
not a string, a lone surrogate, nesting deeper than 254, a subclass of ``str``, ``int``,
``dict`` or ``list``, which may override how it iterates, a type it does not know) is
written by the standard library, which also raises the errors. The output is strict JSON
either way: NaN and the infinities, which JSON cannot spell (the standard library's ``NaN``
is refused by strict parsers), are written as ``null`` by both. The text differs only
where JSON allows it to: orjson writes ``1e-7`` where the standard library writes
``1e-07``. One difference is left: orjson writes a UUID and an enum (as its value), which
the standard library refuses.

tests/test_json.py checks all of this.
"""

from __future__ import annotations

import json
import math
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - the core install
    orjson = None  # type: ignore[assignment]


# Digits become 0, anything else 1: a run of 19 digits is then a substring search (C speed;
# a regular expression took longer than the parse it guards).
_DIGIT_MASK = bytes(0 if 0x30 <= b <= 0x39 else 1 for b in range(256))
_LONG_RUN = bytes(19)


_DEEP = 256


def _loads_fast(text: str | bytes | bytearray) -> Any:
    data: bytes | bytearray
    if type(text) is str:
        data = text.encode("utf-8", "surrogatepass")
    elif type(text) is bytes or type(text) is bytearray:
        data = text
    else:  # subclasses, memoryview, None …: json.loads's own answer
        return json.loads(text)
    deep = len(data) >= 2 * _DEEP and data.count(b"[") + data.count(b"{") >= _DEEP
    # find(), not `in`: bytes.__contains__ first tries its argument as an int (`65 in b"A"`),
    # which fails with a formatted TypeError that it then drops, on every parse.
    if not deep and data.translate(_DIGIT_MASK).find(_LONG_RUN) < 0:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)


#: ``json.loads`` for ``str`` or UTF-8 ``bytes``; faster with orjson installed.
loads = json.loads if orjson is None else _loads_fast

# allow_nan=False: a non-finite float raises, and is then written as null (see _finite).
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def utf8(text: str) -> bytes:
    """JSON text as UTF-8. A lone surrogate (which JSON text may carry, UTF-8 cannot) is
    written as its ``\\udxxx`` escape instead of failing."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def _dumps_std(obj: Any) -> bytes:
    try:
        text = _compact(obj)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise  # a circular reference
        try:
            text = _compact(_finite(obj))
        except RecursionError:
            raise exc from None  # a cycle that also holds a NaN
    return utf8(text)


def _finite(value: Any) -> Any:
    """``value`` with NaN and the infinities as None, the way orjson writes them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# What orjson would write differently from the standard library goes to the standard
# library: dataclasses and datetimes (refused there) and subclasses of the JSON types.
_OPTIONS = (
    0
    if orjson is None
    else orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _dumps_fast(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj, option=_OPTIONS)
    except orjson.JSONEncodeError:
        return _dumps_std(obj)


#: Compact JSON as UTF-8 bytes, not ``\u``-escaped; faster with orjson installed.
dumps = _dumps_std if orjson is None else _dumps_fast

__all__ = ["dumps", "loads", "utf8"]
