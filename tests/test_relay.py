"""The gateway's relay of plain stream events (``PlainRelay``, ``Response.tap``,
``AsyncOpenStream.relay_to``): the events between a stream's first and its last go from the
upstream's reads to the client's connection without their chunk objects, and the client
receives exactly what the chunk objects would have been written as.

Sans-I/O first (any events, any split of the bytes: the relay and the translator give the
same bytes and the same accounting), then the gateway served as ``lunar serve`` serves it,
over real sockets, with the faults a relayed stream can meet."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunar import _engine as engine
from lunar._catalog import Catalog
from lunar._engine import StreamFinisher
from lunar._types import ChatCompletionChunk, ChunkEncoder
from lunar.providers import Target, adapter_for
from lunar.providers import openai as openai_wire
from lunar.server.dialects import ChatWriter
from lunar.testing import MockServer, Reply

from .conftest import cyclic_garbage
from .test_serving import serving_in_this_loop

CATALOG = Catalog.load()
TARGET = Target(
    CATALOG.resolve("gpt-4o-mini")[0], CATALOG.providers["openai"], "http://127.0.0.1:9/v1", "k"
)
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write."}]}


# -- sans-I/O ---------------------------------------------------------------------------------

texts = st.none() | st.text(max_size=12) | st.integers(-2, 2)
deltas = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "content": texts,
        "role": st.none() | st.sampled_from(["assistant", "user"]) | st.integers(0, 1),
        "refusal": st.none() | st.text(max_size=5),
        "tool_calls": st.none()
        | st.just([{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{"}}]),
        # A web-search model's citations: a delta the relay must not write as text alone.
        "annotations": st.none()
        | st.just([{"type": "url_citation", "url_citation": {"url": "u", "title": "t"}}]),
    },
)
choices_st = st.fixed_dictionaries(
    {"delta": deltas},
    optional={
        "index": st.sampled_from([0, 1, None, True, "0"]),
        "finish_reason": st.none() | st.sampled_from(["stop", "length"]),
        "logprobs": st.none() | st.just({"content": []}),
    },
)
events_st = st.fixed_dictionaries(
    {"choices": st.lists(choices_st, max_size=2) | st.none() | st.just("x")},
    optional={
        "id": st.sampled_from(["chatcmpl-1", "chatcmpl-2", "", None, 7]),
        "created": st.sampled_from([1700000000, 1700000001, None, True, 1.5]),
        "model": st.sampled_from(["gpt-4o-mini", "other", None]),
        "system_fingerprint": st.sampled_from(["fp_1", None, 3]),
        "usage": st.none() | st.just({"prompt_tokens": 3, "completion_tokens": 2}),
        "extra": st.integers(),
    },
)


class Sink:
    def __init__(self) -> None:
        self.out = bytearray()
        self.open = True

    def ready(self) -> bool:
        return self.open

    def write(self, data: bytes) -> None:
        self.out += data

    def offer(self, data: bytes) -> bool:
        if not self.ready():
            return False
        self.write(data)
        return True


def dumps(event: Any, compact: bool) -> bytes:
    """As OpenAI writes its events (compact, UTF-8), or as json.dumps does by default."""
    if compact:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    return json.dumps(event).encode()


# Text as most streams have it (printable ASCII, which the relay writes as it came), and any.
words = st.text(alphabet="abc XYZ.,!?'-019", max_size=8) | st.text(max_size=8)
# Events that differ only in their text, as nearly all of a stream's do.
same_but_text = st.lists(
    words | st.sampled_from(['"', "\\", "\n", "é", "\x7f", "a\x00"]), max_size=6
).map(lambda texts: [content_event(t) for t in texts])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(events_st | st.sampled_from([None, [], "x", 3]), min_size=1, max_size=3)
        | same_but_text,
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_the_relay_writes_an_event_as_its_chunk_would_be_written_or_leaves_it(groups, compact):
    finisher = StreamFinisher(TARGET, BODY, 0.0)
    relay_writer, chunk_writer = ChatWriter(), ChatWriter()  # each keeps its own envelope
    sink = Sink()
    relay = openai_wire.PlainRelay("openai", relay_writer.encoder, sink, finisher)
    chars = 0
    for event in [e for group in groups for e in group]:
        sink.out.clear()
        line = b"data: " + dumps(event, compact) + b"\n\n"
        left = relay(line)
        if left:
            assert left == line and not sink.out  # left whole, nothing written
            continue
        chunk = ChatCompletionChunk.from_dict(event, "openai")
        assert bytes(sink.out) == chunk_writer.chunks([chunk])
        chars += len(chunk.choices[0].delta.content or "")
        assert finisher.chars == chars
        # Only the events between a stream's first and last: nothing the finisher holds.
        (choice,) = chunk.choices
        assert chunk.usage is None and choice.finish_reason is None
        assert choice.delta.tool_calls is None and choice.delta.annotations is None


def test_an_event_with_annotations_is_left_to_the_translator():
    """A web-search model's citations come in a delta without text: the relay wrote such an
    event as its text fields alone, and the client never saw them. It leaves it now (after
    a plain event it took), and the chunk written for it carries them."""
    finisher = StreamFinisher(TARGET, BODY, 0.0)
    writer, sink = ChatWriter(), Sink()
    relay = openai_wire.PlainRelay("openai", writer.encoder, sink, finisher)
    assert relay(b"data: " + dumps(content_event("Hi"), True) + b"\n\n") == b""
    citation = {"end_index": 2, "start_index": 0, "title": "E", "url": "https://e.org"}
    cited = [{"type": "url_citation", "url_citation": citation}]
    event = content_event(None)
    event["choices"][0]["delta"] = {"annotations": cited}
    line = b"data: " + dumps(event, True) + b"\n\n"
    assert relay(line) == line
    chunk = ChatCompletionChunk.from_dict(event, "openai")
    assert json.loads(writer.chunk(chunk)[6:])["choices"][0]["delta"]["annotations"] == cited


def translated(wire: bytes, pieces: list[bytes]) -> tuple[bytes, StreamFinisher]:
    """The gateway's bytes for a stream read as ``pieces``, with no relay."""
    translator = adapter_for("openai").stream_translator(TARGET)
    finisher = StreamFinisher(TARGET, BODY, 0.0)
    writer = ChatWriter()
    out = bytearray()
    for piece in pieces:
        if chunks := finisher.push(translator.feed(piece)):
            out += writer.chunks(chunks)
    out += writer.chunks(finisher.push(translator.close()) + finisher.end())
    return bytes(out), finisher


def relayed(pieces: list[bytes], sink: Sink) -> tuple[bytes, StreamFinisher, int]:
    """The same with the relay, as the engine runs it: offered after every read the
    translator took, handing back to it what it leaves."""
    translator = adapter_for("openai").stream_translator(TARGET)
    finisher = StreamFinisher(TARGET, BODY, 0.0)
    writer = ChatWriter()
    tap = None
    taken = 0
    for piece in pieces:
        if tap is not None:
            taken += 1
            piece = tap(piece)
            if not piece:
                continue
            tap = None
        if chunks := finisher.push(translator.feed(piece)):
            sink.write(writer.chunks(chunks))
        if finisher.relayable():
            tap = translator.relay(writer.encoder, sink, finisher)
    sink.write(writer.chunks(finisher.push(translator.close()) + finisher.end()))
    return bytes(sink.out), finisher, taken


def stream_bytes(
    events: list[Any], crlf: str, comment_at: int | None, compact: bool = False
) -> bytes:
    """The stream's bytes; ``crlf``: which events end in CRLF ("none", "last", "all")."""
    out = b""
    for i, event in enumerate(events):
        if i == comment_at:
            out += b": keep-alive\n\n"
        data = event if isinstance(event, bytes) else dumps(event, compact)
        cr = crlf == "all" or (crlf == "last" and i == len(events) - 1)
        out += b"data: " + data + (b"\r\n\r\n" if cr else b"\n\n")
    return out + (b"data: [DONE]\r\n\r\n" if crlf == "all" else b"data: [DONE]\n\n")


def content_event(text: Any, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    return {"id": "chatcmpl-9", "created": 1700000000, "model": "gpt-4o-mini", "choices": [choice]}


plain_events = st.lists(
    (words | st.sampled_from(['"', "\\", "é", "\x7f"])).map(content_event),
    min_size=0,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(
    head=st.text(min_size=1, max_size=5),
    middle=st.lists(plain_events | st.lists(events_st, max_size=2), max_size=3),
    crlf=st.sampled_from(["none", "last", "all"]),
    comment_at=st.none() | st.integers(0, 20),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    broken=st.sampled_from([None, b"{not json", b'"text"', b"\xff\xfe"]),
    pushback_after=st.none() | st.integers(0, 5),
    compact=st.booleans(),
)
def test_the_relay_gives_the_bytes_and_the_count_of_the_translator(
    head, middle, crlf, comment_at, cuts, broken, pushback_after, compact
):
    events: list[Any] = [content_event(head)]
    for group in middle:
        events.extend(group)
    if broken is not None:
        events.insert(len(events) // 2 + 1, broken)
    last = content_event(None)
    last["choices"][0]["finish_reason"] = "stop"
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}}
    wire = stream_bytes([*events, last, usage], crlf, comment_at, compact)
    points = sorted({c % (len(wire) + 1) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)]) if b > a]

    def run(relay: bool) -> tuple[bytes | None, Any, StreamFinisher | None, int]:
        try:
            if not relay:
                out, fin = translated(wire, pieces)
                return out, None, fin, 0
            sink = Sink()
            if pushback_after is not None:
                writes = sink.write

                def write(data: bytes) -> None:
                    writes(data)
                    if len(sink.out) > pushback_after * 40:
                        sink.open = False  # the client pushes back: the relay stops

                sink.write = write  # type: ignore[method-assign]
            out, fin, taken = relayed(pieces, sink)
            return out, None, fin, taken
        except Exception as exc:  # the same error, at the same point
            return None, (type(exc), str(exc)), None, 0

    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "_now", lambda: 1.0)  # the same timing fields on both sides
        want, want_error, want_fin, _ = run(relay=False)
        got, got_error, got_fin, _ = run(relay=True)
    assert got_error == want_error
    if want_fin is None or got_fin is None:
        return
    assert got == want
    assert (got_fin.chars, got_fin.first_at is None) == (want_fin.chars, want_fin.first_at is None)
    assert got_fin.usage is not None and want_fin.usage is not None
    assert got_fin.usage.to_dict() == want_fin.usage.to_dict()


def test_the_relay_takes_the_plain_events_and_leaves_the_last_ones(monkeypatch):
    events = [content_event("Once"), content_event(" upon"), content_event(" a time")]
    last = content_event(None)
    last["choices"][0]["finish_reason"] = "stop"
    wire = stream_bytes([*events, last], "none", None)
    cut = wire.index(b"data: ", 1)  # the first event alone, then the rest in one read
    sink = Sink()
    monkeypatch.setattr(engine, "_now", lambda: 1.0)
    out, fin, taken = relayed([wire[:cut], wire[cut:]], sink)
    assert taken == 1 and fin.chars == len("Once upon a time")
    assert out == translated(wire, [wire[:cut], wire[cut:]])[0]
    assert out.count(b'"finish_reason":"stop"') == 1  # once, last, with the usage
    assert out.rindex(b'"finish_reason":"stop"') > out.rindex(b'"content":" a time"')


@pytest.mark.parametrize("crlf", ["none", "last", "all"])
@pytest.mark.parametrize("per_read", [1, 2, 7])
def test_a_stream_read_event_by_event_or_in_pieces_gives_the_translators_bytes(
    crlf, per_read, monkeypatch
):
    monkeypatch.setattr(engine, "_now", lambda: 1.0)
    events = [content_event(w) for w in ["Once", " upon", " a", " time", ",", " é", ' "x"']]
    last = content_event(None)
    last["choices"][0]["finish_reason"] = "stop"
    wire = stream_bytes([*events, last], crlf, None, compact=True)
    reads = wire.split(b"data: ")[1:]
    pieces = [b"data: " + r for r in reads]  # one read per event
    if per_read > 1:  # several events a read, and reads that end inside an event
        pieces = [wire[i : i + 37 * per_read] for i in range(0, len(wire), 37 * per_read)]
    out, fin, _ = relayed(pieces, Sink())
    want, want_fin = translated(wire, pieces)
    assert out == want and fin.chars == want_fin.chars


def test_no_relay_for_a_gateway_upstream_or_a_stream_checked_as_json():
    remote = Target(
        CATALOG.resolve("gpt-4o-mini")[0], CATALOG.providers["openai"], "http://x/v1", "k"
    )
    lunar = openai_wire.OpenAIStreamTranslator("lunar", remote=True)
    assert lunar.relay(ChunkEncoder(), Sink(), StreamFinisher(remote, BODY, 0.0)) is None
    assert not StreamFinisher(TARGET, BODY, 0.0, json_check=True).relayable()


# -- the gateway, over real sockets ----------------------------------------------------------

uvicorn = pytest.importorskip("uvicorn")

MASTER = "relay-test-master-key-0123456789"


@contextlib.asynccontextmanager
async def gateway(mock: MockServer, **env: str) -> AsyncIterator[tuple[str, Path, Any]]:
    """The gateway app served as ``lunar serve`` serves it (its accept and uvicorn protocol),
    in this event loop: its base URL, its ledger and its server."""
    from lunar.server import serving
    from lunar.server.app import create_app
    from lunar.server.config import load_config

    work = Path(tempfile.mkdtemp(prefix="lunar-relay-"))
    environ = {
        "LUNAR_MASTER_KEY": MASTER,
        "OPENAI_API_KEY": "sk-x",
        "OPENAI_BASE_URL": mock.base_url,
        **env,
    }
    app = create_app(load_config(environ=environ, db=str(work / "ledger.db")))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=2)
    async with serving_in_this_loop(serving.GatewayServer(config, sock)) as server:
        yield f"http://127.0.0.1:{port}", work / "ledger.db", server


@pytest.fixture
def relay_count(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many body pieces the relay was given (``[n]``)."""
    count = [0]
    call = openai_wire.PlainRelay.__call__

    def counted(self: openai_wire.PlainRelay, body: bytes) -> bytes:
        count[0] += 1
        return call(self, body)

    monkeypatch.setattr(openai_wire.PlainRelay, "__call__", counted)
    return count


async def stream(base: str, model: str = "gpt-4o-mini") -> list[Any]:
    """The events of one streamed chat, parsed (``[DONE]`` as the string)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"authorization": f"Bearer {MASTER}"}
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        raw = b"".join([b async for b in r.aiter_bytes()])
    assert raw.endswith(b"\n\n")
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        assert block.startswith("data: ")
        data = block[6:]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def comparable(events: list[Any]) -> list[Any]:
    for e in events:
        if isinstance(e, dict) and isinstance(e.get("usage"), dict):
            for k in ("latency_ms", "ttft_ms"):
                e["usage"].pop(k)
        if isinstance(e, dict):  # the emulator's per-answer fields
            e.pop("created", None)
            e.pop("id", None)
            for choice in e.get("choices") or ():
                for call in choice["delta"].get("tool_calls") or ():
                    call.pop("id", None)
    return events


def ledger(path: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(
            "SELECT status, completion_tokens, error_type FROM usage ORDER BY ts"
        ).fetchall()


async def test_a_gateway_stream_is_relayed_and_reads_as_without_the_relay(relay_count, monkeypatch):
    from lunar.server import app as app_module

    with MockServer() as mock:
        async with gateway(mock) as (base, _, _):
            mock.enqueue(Reply(chunks=24, pacing=0.005))
            relayed_events = await stream(base)
            assert relay_count[0] >= 10  # most of the 24 reads went past the reader
            monkeypatch.setattr(app_module, "client_sink", lambda scope: None)
            before = relay_count[0]
            mock.enqueue(Reply(chunks=24, pacing=0.005))
            plain_events = await stream(base)
            assert relay_count[0] == before
    assert comparable(relayed_events) == comparable(plain_events)
    assert relayed_events[-1] == "[DONE]" and relayed_events[-2]["usage"]["completion_tokens"]


async def test_a_relayed_stream_longer_than_the_read_timeout_is_no_timeout(relay_count):
    # 30 events 0.05 s apart: 1.5 s, five times the gateway's 0.3 s read timeout.
    with MockServer() as mock:
        async with gateway(mock, LUNAR_TIMEOUT_SECONDS="0.3") as (base, db, _):
            mock.enqueue(Reply(chunks=30, pacing=0.05))
            events = await stream(base)
            assert relay_count[0] >= 20
            assert events[-2]["choices"][0]["finish_reason"] == "stop"
            mock.enqueue(Reply(chunks=30, pacing=0.05, stall_after=15, stall=2.0))
            stalled = await stream(base)
            await asyncio.sleep(0.2)  # the ledger's writer
            rows = ledger(db)
    assert stalled[-2]["object"] == "error" and stalled[-1] == "[DONE]"
    assert (
        "No data" in stalled[-2]["error"]["message"]
        or "Timed out" in stalled[-2]["error"]["message"]
    )
    text = "".join(e["choices"][0]["delta"]["content"] or "" for e in stalled[:-2])
    assert len(text.split()) == 15  # what came before the stall, every piece of it
    assert rows[-1][0] == "error" and rows[-1][1] > 0  # billed for what streamed


async def test_a_stream_cut_while_relayed_ends_with_an_error_event_and_bills_what_came(
    relay_count,
):
    with MockServer() as mock:
        async with gateway(mock) as (base, db, _):
            mock.enqueue(Reply(chunks=24, pacing=0.005, cut_after=12))
            events = await stream(base)
            await asyncio.sleep(0.2)
            rows = ledger(db)
    assert relay_count[0] >= 5
    assert events[-2]["object"] == "error" and events[-1] == "[DONE]"
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-2] if isinstance(e, dict))
    assert rows[-1][0] == "error" and rows[-1][1] >= 8


async def test_a_client_gone_while_relayed_ends_the_upstream_stream(relay_count):
    with MockServer() as mock:
        async with gateway(mock) as (base, db, _):
            mock.enqueue(Reply(chunks=400, pacing=0.01))
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            body["stream"] = True
            headers = {"authorization": f"Bearer {MASTER}"}
            async with (
                httpx.AsyncClient(timeout=10) as client,
                client.stream(
                    "POST", f"{base}/v1/chat/completions", json=body, headers=headers
                ) as r,
            ):
                got = b""
                async for b in r.aiter_bytes():
                    got += b
                    if got.count(b"\n\n") >= 10:
                        break  # leaves the stream: the connection is closed
            for _ in range(300):
                if mock.disconnects:
                    break
                await asyncio.sleep(0.01)
            assert mock.disconnects == 1  # the gateway hung up on the upstream too
            await asyncio.sleep(0.2)
            rows = ledger(db)
    assert relay_count[0] >= 5
    assert rows[-1][0] == "cancelled" and rows[-1][2] == "client_disconnected"


async def test_a_client_reading_slowly_gets_every_byte_in_order_and_is_not_buffered_for(
    relay_count,
):
    # 200 events of ~30 KB (6 MB) to a client that waits before reading: its connection
    # pushes back, the relay stops and hands over to ASGI's send, which waits; the gateway
    # then stops reading the upstream. What it holds for the client stays bounded.
    big = " ".join(["word"] * 6000)
    with MockServer() as mock:
        async with gateway(mock) as (base, _, server):
            mock.enqueue(Reply(chunks=200, text=" ".join([big] * 200), pacing=0.0005))
            host, port = base.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            body = json.dumps(
                {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                    "stream": True,
                }
            ).encode()
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                b"application/json\r\nauthorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s"
                % (MASTER.encode(), len(body), body)
            )
            await writer.drain()
            most = 0
            for _ in range(40):  # 2 s without reading
                await asyncio.sleep(0.05)
                for conn in server.server_state.connections:
                    most = max(most, conn.transport.get_write_buffer_size())
            raw = b""
            while not raw.endswith(b"0\r\n\r\n"):
                data = await asyncio.wait_for(reader.read(1 << 16), 10)
                assert data
                raw += data
            writer.close()
    assert most < 1 << 20  # of 6 MB
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    body_bytes = b""
    while True:
        size_line, _, chunked = chunked.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body_bytes += chunked[:size]
        chunked = chunked[size + 2 :]
    events = [json.loads(b[6:]) for b in body_bytes.split(b"\n\n")[:-2]]
    text = "".join(e["choices"][0]["delta"]["content"] or "" for e in events)
    assert text == " ".join([big] * 200)
    assert relay_count[0] >= 1


async def test_a_stream_of_tool_calls_is_offered_to_the_relay_once(relay_count, monkeypatch):
    from lunar.server import app as app_module

    call = {"name": "lookup", "arguments": json.dumps({"q": "x" * 200, "n": list(range(30))})}
    with MockServer() as mock:
        async with gateway(mock) as (base, _, _):
            mock.enqueue(Reply(tool_calls=[call], pacing=0.005, chunks=16))
            relayed_events = await stream(base)
            # The first tool-call event was left: no relay was offered after it.
            assert relay_count[0] == 1
            monkeypatch.setattr(app_module, "client_sink", lambda scope: None)
            mock.enqueue(Reply(tool_calls=[call], pacing=0.005, chunks=16))
            plain_events = await stream(base)
    assert len(relayed_events) > 5
    assert comparable(relayed_events) == comparable(plain_events)


async def test_the_served_requests_leave_no_reference_cycle_of_their_uvicorn_cycle():
    # The scope reaches its cycle weakly: a strong reference (the cycle holds the scope)
    # made every request a cycle for the cyclic GC, whose collections paused the gateway
    # (lane 1's p99.9 went from ~2 ms to ~8 ms).
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    with MockServer() as mock:
        async with gateway(mock) as (base, _, _):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            headers = {"authorization": f"Bearer {MASTER}"}
            async with httpx.AsyncClient(timeout=10) as client:
                await client.post(f"{base}/v1/chat/completions", json=body, headers=headers)
                with cyclic_garbage(only_lunar=False) as left:
                    for _ in range(5):
                        r = await client.post(
                            f"{base}/v1/chat/completions", json=body, headers=headers
                        )
                        assert r.status_code == 200
                    mock.enqueue(Reply(chunks=8, pacing=0.002))
                    await stream(base)
                    await asyncio.sleep(0.05)
    assert not [o for o in left if isinstance(o, RequestResponseCycle)]


async def test_a_stream_framed_with_crlf_reads_whole_through_the_relay(relay_count, monkeypatch):
    # No "\n\n" ends its events: the relay takes none, and keeps none of its bytes.
    from lunar.server import app as app_module

    with MockServer() as mock:
        async with gateway(mock) as (base, _, _):
            mock.enqueue(Reply(chunks=12, pacing=0.005, crlf=True))
            relayed_events = await stream(base)
            assert relay_count[0] >= 1
            monkeypatch.setattr(app_module, "client_sink", lambda scope: None)
            mock.enqueue(Reply(chunks=12, pacing=0.005, crlf=True))
            plain_events = await stream(base)
    assert relayed_events[-2]["choices"][0]["finish_reason"] == "stop"
    assert comparable(relayed_events) == comparable(plain_events)
