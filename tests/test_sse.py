"""The SSE decoder gives the same events for every split of the bytes and every line ending."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lunar._sse import ServerSentEvent, SSEDecoder


def decode(chunks: list[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.flush())
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


# Values without line breaks; any text, including multi-byte UTF-8.
values = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=20,
)
events_st = st.lists(
    st.tuples(
        st.none() | st.text(alphabet="abcdefgh_", min_size=1, max_size=8),  # event type
        st.lists(values, min_size=1, max_size=3),  # data lines
        st.booleans(),  # a comment line before it
    ),
    min_size=1,
    max_size=6,
)


def render(events: list[tuple[str | None, list[str], bool]], eol: str) -> bytes:
    out = []
    for etype, lines, comment in events:
        if comment:
            out.append(": keep-alive" + eol)
        if etype is not None:
            out.append(f"event: {etype}{eol}")
        for line in lines:
            out.append(f"data: {line}{eol}")
        out.append(eol)
    return "".join(out).encode()


def expected(events: list[tuple[str | None, list[str], bool]]) -> list[ServerSentEvent]:
    return [ServerSentEvent("\n".join(lines), etype) for etype, lines, _ in events]


@settings(max_examples=300)
@given(events_st, st.sampled_from(["\n", "\r\n", "\r"]), st.lists(st.integers(0, 10_000)))
def test_any_split_and_line_ending_gives_the_same_events(events, eol, cuts):
    data = render(events, eol)
    assert decode(split_at(data, cuts)) == expected(events)


@settings(max_examples=100)
@given(events_st, st.sampled_from(["\n", "\r\n", "\r"]))
def test_one_byte_at_a_time(events, eol):
    data = render(events, eol)
    assert decode([data[i : i + 1] for i in range(len(data))]) == expected(events)


def test_split_inside_a_multibyte_character():
    data = "data: héllo ☃\n\n".encode()
    cut = data.index("☃".encode()) + 1
    assert decode([data[:cut], data[cut:]]) == [ServerSentEvent("héllo ☃")]


def test_crlf_split_between_cr_and_lf():
    assert decode([b"data: a\r", b"\n\r", b"\n"]) == [ServerSentEvent("a")]


def test_fields_comments_and_unknown_fields():
    data = b": ping\nevent: message_start\nid: 7\nretry: 100\nfoo: bar\ndata:x\ndata:  y\n\n"
    [event] = decode([data])
    assert (event.event, event.data, event.id, event.retry) == ("message_start", "x\n y", "7", 100)


def test_comment_only_blocks_and_blank_lines_dispatch_nothing():
    assert decode([b": keep-alive\n\n\n\n: another\n\n"]) == []


def test_half_sent_event_at_end_is_dropped():
    assert decode([b"data: complete\n\ndata: partial"]) == [ServerSentEvent("complete")]


def test_event_type_does_not_leak_into_the_next_event():
    events = decode([b"event: a\ndata: 1\n\ndata: 2\n\n"])
    assert [(e.event, e.data) for e in events] == [("a", "1"), (None, "2")]


@settings(max_examples=200)
@given(events_st, st.sampled_from(["\n", "\r\n", "\r"]))
def test_one_read_per_event_as_a_paced_stream_sends_them(events, eol):
    """The decoder's fast path (a read that is exactly one ``data:`` event) gives what the
    general path gives."""
    pieces = [render([event], eol) for event in events]
    assert decode(pieces) == expected(events)


def test_a_whole_event_read_after_pending_state_keeps_that_state():
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 7\nretry: 30\ndata: a\n\n") == [ServerSentEvent("a", None, "7", 30)]
    # Fast-path-shaped reads, each after something the decoder still holds:
    assert decoder.feed(b"data: b\n\n") == [ServerSentEvent("b", None, "7", 30)]
    assert decoder.feed(b"data: c\n") == []  # a data line, its event not yet ended
    assert decoder.feed(b"data: d\n\n") == [ServerSentEvent("c\nd", None, "7", 30)]
    assert decoder.feed(b"event: x\n") == []
    assert decoder.feed(b"data: e\n\n") == [ServerSentEvent("e", "x", "7", 30)]
    assert decoder.feed(b"data: f") == []  # half a line
    assert decoder.feed(b"data: g\n\n") == [ServerSentEvent("fdata: g", None, "7", 30)]
    assert decoder.feed(b"data: h\r") == []  # a CR that may be half a CRLF
    assert decoder.feed(b"\ndata: i\n\n") == [ServerSentEvent("h\ni", None, "7", 30)]
    assert decoder.feed(b"data: j\r\r") == [ServerSentEvent("j", None, "7", 30)]
    assert decoder.feed(b"data: k\n\n") == [ServerSentEvent("k", None, "7", 30)]
