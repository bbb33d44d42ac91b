"""Incremental Server-Sent-Events decoder: bytes in, events out, for any split of the bytes.

Sans-I/O, like h11: ``feed()`` takes whatever bytes arrived and returns the events they
complete. Lines end in LF, CRLF or CR (a CR at the end of one feed may be the first half of
a CRLF, so the LF that may follow is swallowed). UTF-8 is decoded per complete line, so a
character split across feeds is never broken.
"""

from __future__ import annotations


class ServerSentEvent:
    __slots__ = ("data", "event", "id", "retry")

    def __init__(
        self, data: str, event: str | None = None, id: str | None = None, retry: int | None = None
    ) -> None:
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServerSentEvent):
            return NotImplemented
        return (self.data, self.event, self.id, self.retry) == (
            other.data,
            other.event,
            other.id,
            other.retry,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ServerSentEvent(event={self.event!r}, data={self.data!r}, id={self.id!r})"


class SSEDecoder:
    __slots__ = ("_buf", "_data", "_event", "_last_id", "_retry", "_skip_lf")

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False
        self._data: list[str] = []
        self._event: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if (
            # A paced stream's read is nearly always exactly one "data: ...\n\n" event, with
            # nothing pending: what the general path gives, without splitting lines.
            chunk[:6] == b"data: "
            and chunk[-2:] == b"\n\n"
            and chunk.count(b"\n") == 2
            and not self._buf
            and not self._skip_lf
            and not self._data
            and self._event is None
            and b"\r" not in chunk
        ):
            return [
                ServerSentEvent(
                    chunk[6:-2].decode("utf-8", "replace"), None, self._last_id, self._retry
                )
            ]
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        buf = self._buf + chunk if self._buf else chunk
        # Only complete lines are decoded; the tail after the last terminator waits.
        cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
        if cut < 0:
            self._buf = buf
            return []
        if buf[cut] == 13 and cut == len(buf) - 1:  # CR at the very end: maybe half a CRLF
            self._skip_lf = True
        self._buf = buf[cut + 1 :]
        events: list[ServerSentEvent] = []
        for line in buf[: cut + 1].splitlines():
            if line[:6] == b"data: ":  # nearly every line: what _field would do, inline
                self._data.append(line[6:].decode("utf-8", "replace"))
            elif line:
                self._field(line)
            elif self._data:
                events.append(self._dispatch())
            else:
                self._event = None  # an empty event resets the type, per the spec
        return events

    def idle(self) -> bool:
        """Whether nothing is pending: the next bytes start a new event."""
        return not self._buf and not self._skip_lf and not self._data and self._event is None

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: an unterminated last line still counts, but an event is only
        dispatched on a blank line, so a half-sent event is dropped (the spec's rule)."""
        if self._buf:
            self._field(self._buf)
            self._buf = b""
        return []

    def _field(self, line: bytes) -> None:
        colon = line.find(b":")
        if colon == 0:
            return  # comment / keep-alive
        if colon < 0:
            name, value = line, b""
        else:
            name = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self._retry = int(value)

    def _dispatch(self) -> ServerSentEvent:
        data = self._data
        event = ServerSentEvent(
            data[0] if len(data) == 1 else "\n".join(data), self._event, self._last_id, self._retry
        )
        self._data = []
        self._event = None
        return event
