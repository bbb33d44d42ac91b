"""CORS: which web pages' scripts may call the gateway from a browser (``[cors]``). Sans-I/O:
the app sends what this decides.

Off by default (``allow_origins`` empty): then nothing here runs, and ``OPTIONS`` is a 405 as
any other method a route does not take. On, every response carries either
``Access-Control-Allow-Origin: *`` (``allow_origins = ["*"]``) or ``Vary: Origin`` and, for an
allowed origin, that origin: a cache in front of the gateway then never hands one origin's
answer to another. A preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) on a route is answered here, before authentication, since
browsers send no credentials with it.

Every header list is built once, at start: a response's are one dictionary lookup away.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .._errors import PermissionDeniedError
from .._request import MAX_RETRIES_HEADER, TIMEOUT_HEADER

Headers = list[tuple[bytes, bytes]]

# The response headers a client reads besides the CORS-safelisted ones (Content-Type,
# Content-Length, Cache-Control, …): the request id, and the wait a 429 asks for. Cost and
# timing are in the answer's body (`usage`), not in headers.
EXPOSE_HEADERS = b"x-request-id, retry-after, x-should-retry"
# Always allowed in a preflight: what the gateway reads to authenticate and parse a request,
# and a Lunar client's retry budget and deadline for it (docs/gateway.md).
# The literal `*` of Access-Control-Allow-Headers never covers Authorization (Fetch standard).
BASE_HEADERS = (
    "authorization",
    "content-type",
    "x-api-key",
    MAX_RETRIES_HEADER,
    TIMEOUT_HEADER,
)

_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://([a-z0-9._~-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")

_ACAO = b"access-control-allow-origin"
_VARY = b"vary"


def origin(text: str) -> str:
    """One ``allow_origins`` entry, as a browser spells it in ``Origin`` (lower case, no
    default port), or ``*``; ``ValueError`` saying what is wrong with it."""
    if text == "*":
        return text
    low = text.strip().lower()
    m = _ORIGIN.fullmatch(low)
    if m is None:
        if "*" in low:
            raise ValueError(
                f"{text!r}: give exact origins (scheme://host[:port]) or '*' alone; "
                "wildcards within an origin are not supported"
            )
        head = re.match(r"[a-z][a-z0-9+.-]*://[^/?#]+", low)
        if head is not None and head.group() != low:
            raise ValueError(
                f"{text!r} has a path: an origin is scheme://host[:port], as a browser "
                f"sends it in its Origin header: {head.group()!r}"
            )
        raise ValueError(f"{text!r} is not an origin: write scheme://host[:port]")
    scheme, host, port = m.groups()
    if port is not None and port == _DEFAULT_PORTS.get(scheme):
        port = None
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def header_name(text: str) -> str:
    """One ``allow_headers`` entry, lower-cased, or ``*``; ``ValueError`` when it is not a
    header name."""
    low = text.strip().lower()
    if low != "*" and _TOKEN.fullmatch(low) is None:
        raise ValueError(f"{text!r} is not a header name")
    return low


def alone(values: Sequence[str]) -> None:
    """``*`` means every one: it is refused beside other entries, which it would void."""
    if "*" in values and len(values) > 1:
        raise ValueError("'*' stands for all: give it alone, or list the exact values")


class Cors:
    """The decisions for one configuration: what a response carries, what a preflight
    answers. ``origins``, ``headers``: checked entries (``origin``, ``header_name``)."""

    __slots__ = (
        "_allow_headers",
        "_allowed",
        "_any",
        "_headers",
        "_other",
        "_preflight_tail",
        "_reflect",
    )

    def __init__(self, origins: Sequence[str], headers: Sequence[str], max_age: int) -> None:
        self._any = list(origins) == ["*"]
        self._reflect = list(headers) == ["*"]
        self._headers = frozenset((*BASE_HEADERS, *headers))
        self._allow_headers = ", ".join(dict.fromkeys((*BASE_HEADERS, *headers))).encode()
        expose = (b"access-control-expose-headers", EXPOSE_HEADERS)
        vary = (_VARY, b"origin")
        # What an actual response carries, by the request's Origin.
        self._allowed: dict[bytes, Headers] = {}
        if self._any:
            self._other: Headers = [(_ACAO, b"*"), expose]
        else:
            self._other = [vary]
            for o in origins:
                self._allowed[o.encode()] = [(_ACAO, o.encode()), vary, expose]
        # What a preflight's answer carries after its origin and methods.
        tail: Headers = []
        varies = ([] if self._any else ["origin"]) + (
            ["access-control-request-headers"] if self._reflect else []
        )
        if varies:
            tail.append((_VARY, ", ".join(varies).encode()))
        tail.append((b"access-control-max-age", str(max_age).encode()))
        self._preflight_tail = tail

    def response_headers(self, origin: bytes | None) -> Headers:
        """What a response to a request from ``origin`` (``None``: no Origin header) adds."""
        if origin is None:
            return self._other
        return self._allowed.get(origin, self._other)

    def check_origin(self, origin: bytes) -> None:
        """``PermissionDeniedError`` when a preflight's ``origin`` is not allowed."""
        if not self._any and origin not in self._allowed:
            raise PermissionDeniedError(
                f"Origin '{origin.decode('latin-1')}' may not call this gateway from a "
                "browser: it is not in the gateway's cors.allow_origins",
                code="cors_origin_not_allowed",
            )

    def preflight(self, origin: bytes, methods: bytes, request_headers: bytes | None) -> Headers:
        """A preflight's 204 headers, for an allowed ``origin`` on a route taking ``methods``
        (the method asked for among them); ``PermissionDeniedError`` when a header asked
        for is not allowed."""
        out = [
            (_ACAO, b"*" if self._any else origin),
            (b"access-control-allow-methods", methods),
        ]
        if self._reflect:
            if request_headers:
                out.append((b"access-control-allow-headers", request_headers))
        else:
            asked = request_headers.decode("latin-1").lower().split(",") if request_headers else ()
            for h in asked:
                h = h.strip()
                if h and h not in self._headers:
                    raise PermissionDeniedError(
                        f"Header '{h}' may not be sent to this gateway from a browser: it is "
                        "not in the gateway's cors.allow_headers",
                        code="cors_header_not_allowed",
                    )
            out.append((b"access-control-allow-headers", self._allow_headers))
        out.extend(self._preflight_tail)
        return out
