"""The client's side of the gateway's relay of plain stream events (``PlainRelay``): the
connection of the request's uvicorn cycle, written to directly.

ASGI's ``send`` costs each event a coroutine, a message dict and uvicorn's checks, and the
relay runs in the upstream's ``data_received``, where nothing can be awaited. Lunar's own
uvicorn protocol (``serving.bounded_head_protocol``) gives the app the request's cycle under
``CYCLE_EXTENSION``, by a weak reference (the cycle holds the scope). The relay writes a
body chunk as the cycle's ``send`` would (chunked, after the head that ``send`` wrote), only
while the cycle would write at once, and leaves the rest (the last events, the end of the
body) to ``send``. Under any other server there is no cycle, and every event goes through
``send``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CYCLE_EXTENSION = "lunar.uvicorn_cycle"


class ClientSink:
    """A stream's response body, written to uvicorn's transport as its cycle would."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._flow = cycle.flow
        self._transport = cycle.transport

    def offer(self, data: bytes) -> bool:
        """Write ``data`` as the cycle's ``send`` would, if it would write at once: the
        client is there, its head was sent and the body is not ended, and the transport
        is not pushing back. Whether it was written."""
        cycle = self._cycle
        if (
            cycle.disconnected
            or cycle.response_complete
            or self._flow.write_paused
            or self._transport.is_closing()
        ):
            return False
        self._transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        return True

    def paused(self) -> bool:
        """Whether the transport is pushing back: the client is not taking what it was sent,
        so the cycle's ``send`` would wait for it."""
        return self._flow.write_paused  # type: ignore[no-any-return]

    def abort(self) -> None:
        """Drop the connection of a client that stopped reading (its buffer is not sent)."""
        self._cycle.disconnected = True  # so the cycle does not log an unfinished response
        self._transport.abort()


def client_sink(scope: Mapping[str, Any]) -> ClientSink | None:
    """The sink of a streamed response whose head was sent chunked, when the server gave
    the app its cycle; else ``None``."""
    ref = scope.get("extensions", {}).get(CYCLE_EXTENSION)
    cycle = None if ref is None else ref()
    if cycle is None or cycle.chunked_encoding is not True or not cycle.response_started:
        return None
    return ClientSink(cycle)
