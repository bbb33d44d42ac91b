"""The emulator's HTTP/1.1 server: asyncio Protocol + h11 for parsing, hand-written responses.

Routing, the script (queues), the render cache and the fault engine live here, shared by the
wires: ``/v1/chat/completions`` and ``/v1/completions`` (`_openai`), ``/v1/messages``
(`_anthropic`), ``/v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``
(`_gemini`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import importlib
import itertools
import json
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from email.utils import formatdate
from typing import Any, cast

import h11

from ._anthropic import ANTHROPIC
from ._gemini import GEMINI
from ._openai import CHAT, COMPLETION
from ._openai import error_body as _error_body
from ._render import Event, Job, Plan, frame
from ._reply import RecordedRequest, Reply, gemini_model
from ._wire import Incoming, Rejection, Wire

__all__ = ["DEFAULT_MODELS", "MockServer", "serve"]

log = logging.getLogger("lunar.testing")

DEFAULT_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o4-mini",
    "gpt-3.5-turbo-instruct",
)
MAX_BODY = 32 * 1024 * 1024
_CACHE_MAX = 512

# Placeholders for the per-request id and created time in cached bodies; JSON text never
# contains a raw NUL (json escapes it), so they cannot collide with content.
_ID = "\x00I"
_CREATED = "\x00C"
_ID_B = _ID.encode()
_CREATED_B = _CREATED.encode()

_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True)
    return str(_date_cache[1])


def _reason(status: int) -> str:
    if status == 529:
        return "Site Overloaded"
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _number(value: float) -> str:
    value = float(value)
    if value.is_integer():
        return str(int(value))
    return repr(value)


def _reply_headers(reply: Reply) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if reply.retry_after is not None:
        ra = reply.retry_after
        out.append(("retry-after", ra if isinstance(ra, str) else _number(ra)))
    if reply.retry_after_ms is not None:
        out.append(("retry-after-ms", _number(reply.retry_after_ms)))
    if reply.should_retry is not None:
        out.append(("x-should-retry", "true" if reply.should_retry else "false"))
    out.extend(reply.headers.items())
    return out


def _base_url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _new_loop(prefer_uvloop: bool) -> asyncio.AbstractEventLoop:
    if prefer_uvloop:
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            pass
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


class _Cached:
    """A rendered body split around the id and created placeholders."""

    __slots__ = ("by_id", "created", "parts")

    def __init__(self, parts: list[list[bytes]]) -> None:
        self.parts = parts
        self.created = ""
        self.by_id: list[bytes] = []


class _State:
    """Script, recordings and counters shared by the connections of one server."""

    def __init__(
        self,
        default: Reply,
        require_api_key: str | None,
        models: Iterable[str] | None,
        record: bool = True,
    ) -> None:
        self.lock = threading.Lock()
        #: Whether requests are kept (``MockServer.requests``): not by ``serve``, which
        #: nobody can ask, and which would keep every request until it stops.
        self.record = record
        self.default = default
        self.queue: deque[Reply] = deque()
        self.model_queues: dict[str, deque[Reply]] = {}
        self.requests: list[RecordedRequest] = []
        self.open_connections = 0
        self.total_connections = 0
        self.disconnects = 0
        self.counter = itertools.count(1)
        self.require_api_key = require_api_key
        self.models = tuple(models) if models is not None else DEFAULT_MODELS
        self.cache: dict[tuple[Any, ...], _Cached] = {}
        #: The prompt prefixes written to the (emulated) prompt cache: ``Wire.prompt_cache``.
        self.prompt_cache: set[str] = set()
        self.conns: set[_Conn] = set()

    # -- script -------------------------------------------------------------------------

    def take(self, model: str) -> Reply:
        with self.lock:
            queue = self.model_queues.get(model)
            if queue:
                return queue.popleft()
            if self.queue:
                return self.queue.popleft()
            return self.default

    def reset(self) -> None:
        with self.lock:
            self.queue.clear()
            self.model_queues.clear()
            self.requests.clear()
            self.disconnects = 0
            self.prompt_cache.clear()
            self.total_connections = self.open_connections
            self.default = Reply()

    # -- request handling -----------------------------------------------------------------

    def handle(
        self, conn: _Conn, req: h11.Request, headers: dict[str, str], body: bytes
    ) -> Coroutine[Any, Any, None] | None:
        """Answer one request: write it now (return None) or return the coroutine that will."""
        method = req.method.decode("ascii", "replace").upper()
        target = req.target.decode("latin-1")
        path, _, query = target.partition("?")
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        if self.record:
            with self.lock:
                self.requests.append(
                    RecordedRequest(method, path, headers, body, parsed, query, conn.peer)
                )
        number = next(self.counter)
        conn.request_id = f"req_mock_{number}"

        if path == "/health":
            if method != "GET":
                return self._method_not_allowed(conn, method, path)
            conn.send(200, "application/json", b'{"status":"ok"}')
            return None
        wire: Wire
        if path == "/v1/chat/completions" or path == "/v1/completions":
            wire = CHAT if path == "/v1/chat/completions" else COMPLETION
        elif path == "/v1/messages" or path == "/v1/messages/count_tokens":
            wire = ANTHROPIC
        elif gemini_model(path) is not None:
            wire = GEMINI
        elif path == "/v1/models" or path.startswith("/v1/models/"):
            if method != "GET":
                return self._method_not_allowed(conn, method, path)
            if not self._authorized(conn, CHAT, headers, query):
                return None
            if path == "/v1/models":
                data = [self._model(m) for m in self.models]
                conn.send(200, "application/json", json.dumps({"object": "list", "data": data}))
            else:
                conn.send(200, "application/json", json.dumps(self._model(path[11:])))
            return None
        else:
            conn.send(
                404,
                "application/json",
                _error_body(404, f"Invalid URL ({method} {path})", type="invalid_request_error"),
            )
            return None
        if method != "POST":
            return self._method_not_allowed(conn, method, path, wire)
        if not self._authorized(conn, wire, headers, query):
            return None
        if wire is ANTHROPIC and path.endswith("/count_tokens"):
            counted = ANTHROPIC.count_tokens(parsed, headers)
            return self._counted(conn, counted, "input_tokens")
        if wire is GEMINI:
            action = path.rpartition(":")[2]
            if action == "countTokens":
                return self._counted(conn, GEMINI.count_tokens(parsed), "totalTokens")
            if action not in ("generateContent", "streamGenerateContent"):
                message = f"Method {action} not found for this model."
                conn.send(404, "application/json", GEMINI.error_body(404, message))
                return None
        incoming = wire.parse(parsed, headers, path, query)
        if isinstance(incoming, Rejection):
            conn.send(incoming.status, "application/json", incoming.body)
            return None
        return self._generate(conn, wire, incoming, number)

    @staticmethod
    def _model(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "lunar-mock"}

    @staticmethod
    def _method_not_allowed(conn: _Conn, method: str, path: str, wire: Wire = CHAT) -> None:
        message = f"Method {method} not allowed on {path}"
        conn.send(405, "application/json", wire.error_body(405, message, "invalid_request_error"))

    def _authorized(self, conn: _Conn, wire: Wire, headers: dict[str, str], query: str) -> bool:
        key = self.require_api_key
        if key is None:
            return True
        refused = wire.authorize(headers, query, key)
        if refused is None:
            return True
        conn.send(refused.status, "application/json", refused.body)
        return False

    @staticmethod
    def _counted(conn: _Conn, counted: int | Rejection, field: str) -> None:
        if isinstance(counted, Rejection):
            conn.send(counted.status, "application/json", counted.body)
        else:
            conn.send(200, "application/json", json.dumps({field: counted}))

    def _generate(
        self, conn: _Conn, wire: Wire, incoming: Incoming, number: int
    ) -> Coroutine[Any, Any, None] | None:
        """Take the model's next scripted reply and answer it on ``wire``."""
        reply = self.take(incoming.model)
        extra = _reply_headers(reply)

        # A fixed body: an override or an error status.
        fixed: tuple[str, bytes] | None = None
        if reply.body is not None:
            raw = reply.body
            if isinstance(raw, dict):
                fixed = ("application/json", json.dumps(raw).encode())
            else:
                data = raw.encode() if isinstance(raw, str) else raw
                looks_json = data.lstrip()[:1] in (b"{", b"[")
                fixed = ("application/json" if looks_json else "text/plain; charset=utf-8", data)
        elif reply.status >= 400:
            fixed = ("application/json", wire.status_error(reply))
        if fixed is not None:
            if reply.delay > 0:
                return self._delayed_fixed(conn, reply, fixed, extra)
            conn.send(reply.status, fixed[0], fixed[1], extra)
            return None

        job = wire.job(incoming, reply, number)
        with self.lock:
            job = wire.prompt_cache(job, incoming, self.prompt_cache)
        id_ = wire.response_id(number, job)
        created = str(int(time.time()))
        sse = job.event_stream
        if reply.needs_async(sse):
            return self._run(conn, wire, reply, job, id_, created, extra)
        nl = "\r\n" if reply.crlf else "\r" if reply.cr else "\n"
        body = self._rendered(wire, job, nl, reply.comments, id_, created)
        if sse:
            conn.send_stream(reply.status, body, extra)
        else:
            conn.send(reply.status, "application/json", body, extra)
        return None

    def _rendered(
        self, wire: Wire, job: Job, nl: str, comments: bool, id_: str, created: str
    ) -> bytes:
        """The whole body (SSE text, or JSON), from the cache when possible."""
        key = job.cache_key()
        if key is None:
            return self._render_whole(wire, job, nl, comments, id_, created)
        full_key = (*key, nl, comments)
        entry = self.cache.get(full_key)
        if entry is None:
            template = self._render_whole(wire, job, nl, comments, _ID, _CREATED)
            entry = _Cached([p.split(_CREATED_B) for p in template.split(_ID_B)])
            if len(self.cache) >= _CACHE_MAX:
                self.cache.clear()
            self.cache[full_key] = entry
        if entry.created != created:  # re-fill the creation time once per second
            created_b = created.encode()
            entry.by_id = [created_b.join(p) for p in entry.parts]
            entry.created = created
        return id_.encode().join(entry.by_id)

    @staticmethod
    def _render_whole(
        wire: Wire, job: Job, nl: str, comments: bool, id_: str, created: str
    ) -> bytes:
        if not job.event_stream:
            return wire.render_json(job, id_, created).encode()
        plan = wire.render_stream(job, id_, created)
        comment = f": keep-alive{nl}{nl}" if comments else ""
        return "".join([frame(e, nl, comment) for e in plan.events()]).encode()

    # -- slow paths ---------------------------------------------------------------------

    @staticmethod
    async def _delayed_fixed(
        conn: _Conn, reply: Reply, fixed: tuple[str, bytes], extra: list[tuple[str, str]]
    ) -> None:
        await asyncio.sleep(reply.delay)
        conn.send(reply.status, fixed[0], fixed[1], extra)

    async def _run(
        self,
        conn: _Conn,
        wire: Wire,
        reply: Reply,
        job: Job,
        id_: str,
        created: str,
        extra: list[tuple[str, str]],
    ) -> None:
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        if job.event_stream:
            plan = wire.render_stream(job, id_, created)
            await self._run_stream(conn, wire, reply, plan, extra)
        else:
            body = wire.render_json(job, id_, created).encode()
            await self._run_json(conn, wire, reply, body, extra)

    @staticmethod
    async def _run_json(
        conn: _Conn, wire: Wire, reply: Reply, body: bytes, extra: list[tuple[str, str]]
    ) -> None:
        if reply.stall_after is not None and reply.stall > 0:
            await asyncio.sleep(reply.stall)
        if reply.error_after is not None:
            status, error = wire.error_response(reply)
            conn.send(status, "application/json", error, extra)
            return
        if reply.cut_after is not None:
            conn.write(conn.head(reply.status, "application/json", extra, len(body)))
            conn.write(body[: len(body) // 2])
            conn.abort()
            return
        if reply.end_after is not None or reply.malformed_after is not None:
            body = body[: len(body) // 2]
        conn.send(reply.status, "application/json", body, extra)

    @staticmethod
    async def _run_stream(
        conn: _Conn, wire: Wire, reply: Reply, plan: Plan, extra: list[tuple[str, str]]
    ) -> None:
        nl = "\r\n" if reply.crlf else "\r" if reply.cr else "\n"
        comment = f": keep-alive{nl}{nl}" if reply.comments else ""
        pacing = reply.pacing
        split = reply.split_bytes
        first = True

        async def out(data: bytes) -> None:
            if split:
                for i in range(len(data)):
                    if conn.closed:
                        return
                    conn.write_chunk(data[i : i + 1])
                    await asyncio.sleep(0)
                    await conn.drain()
            else:
                conn.write_chunk(data)
                await conn.drain()

        async def emit(event: Event) -> None:
            nonlocal first
            if not first and pacing > 0:
                await asyncio.sleep(pacing)
            first = False
            await out(frame(event, nl, comment).encode())

        conn.write(conn.head(reply.status, "text/event-stream", extra, None))
        for event in plan.pre:
            await emit(event)
        count = len(plan.positions)

        def at(k: int | None) -> int:
            return -1 if k is None else max(0, min(k, count))

        stall_at = at(reply.stall_after) if reply.stall > 0 else -1
        malformed_at = at(reply.malformed_after)
        error_at = at(reply.error_after)
        end_at = at(reply.end_after)
        cut_at = at(reply.cut_after)
        # Gemini puts the finish on the last piece, unless a fault sits between them.
        merged = (
            plan.final is not None
            and count > 0
            and count not in (stall_at, malformed_at, error_at, end_at, cut_at)
        )
        for k in range(count + 1):
            if conn.closed:
                return
            if k == stall_at:
                await asyncio.sleep(reply.stall)
            if k == malformed_at:
                await emit(wire.malformed)
            if k == error_at:
                await emit(wire.stream_error(reply))
                conn.end_chunks()
                return
            if k == end_at:
                conn.end_chunks()
                return
            if k == cut_at:
                conn.abort()
                return
            if k < count:
                if merged and k == count - 1 and plan.final is not None:
                    events = plan.final
                else:
                    events = plan.positions[k]
                for event in events:
                    await emit(event)
        if not merged:
            for event in plan.post:
                await emit(event)
        conn.end_chunks()


class _Conn(asyncio.Protocol):
    """One client connection: h11 parses requests; responses are written by hand."""

    def __init__(self, state: _State, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.SERVER)
        self.busy = False  # a request is being answered; later bytes wait in h11's buffer
        self.responding = False  # the current response is not completely written yet
        self.head_sent = False
        self.closed = False
        self.paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.request: h11.Request | None = None
        self.body: list[bytes] = []
        self.body_len = 0
        self.keep_alive = True
        self.chunked = True
        self.request_id = ""
        self.peer: tuple[str, int] | None = None

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not always an asyncio.Transport instance: cast, don't check.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self.state.open_connections += 1
        self.state.total_connections += 1
        self.state.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.open_connections -= 1
        self.state.conns.discard(self)
        self.closed = True
        if self.responding:
            self.responding = False
            self.state.disconnects += 1
        if self.task is not None:
            self.task.cancel()
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def data_received(self, data: bytes) -> None:
        try:
            self.h11.receive_data(data)
        except RuntimeError:  # data after the peer's EOF: ignore
            return
        if not self.busy:
            self._process()

    def eof_received(self) -> bool | None:
        with contextlib.suppress(RuntimeError):
            self.h11.receive_data(b"")
        if not self.busy:
            self._process()
        return None  # close our side too (a response in progress counts as abandoned)

    # -- request cycle ------------------------------------------------------------------

    def _process(self) -> None:
        while not self.busy and not self.closed:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._reject(exc.error_status_hint, str(exc) or "Bad request")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request = event
                self.body = []
                self.body_len = 0
                if self.h11.they_are_waiting_for_100_continue:
                    self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif isinstance(event, h11.Data):
                self.body_len += len(event.data)
                if self.body_len > MAX_BODY:
                    self._reject(413, "Request body too large")
                    return
                self.body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _dispatch(self) -> None:
        req = self.request
        assert req is not None
        body = b"".join(self.body)
        self.body = []
        headers: dict[str, str] = {}
        for raw_name, raw_value in req.headers.raw_items():
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.keep_alive = req.http_version == b"1.1" and "close" not in (
            headers.get("connection", "").lower()
        )
        self.chunked = req.http_version == b"1.1"
        self.busy = True
        self.responding = True
        self.head_sent = False
        try:
            coro = self.state.handle(self, req, headers, body)
        except Exception:
            log.exception("lunar mock: error while answering %r", req.target)
            self._internal_error()
            coro = None
        if coro is None:
            self._finish()
        else:
            self.task = self.loop.create_task(coro)
            self.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("lunar mock: error while answering", exc_info=task.exception())
            self._internal_error()
        self._finish()
        self._process()

    def _finish(self) -> None:
        self.responding = False
        if self.closed:
            return
        if not self.keep_alive:
            self._close()
            return
        data, eof = self.h11.trailing_data
        self.h11 = h11.Connection(h11.SERVER)
        if data:
            self.h11.receive_data(data)
        if eof:
            self.h11.receive_data(b"")
        self.request = None
        self.busy = False

    def _internal_error(self) -> None:
        if self.closed:
            return
        if self.head_sent:
            self.abort()
        else:
            self.keep_alive = False
            self.send(500, "application/json", _error_body(500, "Mock server internal error"))

    def _reject(self, status: int, message: str) -> None:
        self.keep_alive = False
        self.chunked = True
        self.send(status, "application/json", _error_body(status, message))
        self._close()

    def _close(self) -> None:
        self.closed = True
        self.responding = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (RST), not counted as a client disconnect."""
        self.responding = False
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- writing ------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None:
            self.drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        if self.paused and not self.closed:
            waiter = self.loop.create_future()
            self.drain_waiter = waiter
            await waiter

    def write(self, data: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None:
            return
        if transport.is_closing():  # the socket failed; connection_lost is on its way
            self.closed = True
            return
        transport.write(data)

    def write_chunk(self, data: bytes) -> None:
        if self.chunked:
            self.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.write(data)

    def end_chunks(self) -> None:
        if self.chunked:
            self.write(b"0\r\n\r\n")

    def head(
        self,
        status: int,
        content_type: str,
        extra: Iterable[tuple[str, str]] = (),
        length: int | None = None,
    ) -> bytes:
        headers: dict[str, tuple[str, str]] = {
            "date": ("date", _http_date()),
            "content-type": ("content-type", content_type),
        }
        if length is None:
            headers["cache-control"] = ("cache-control", "no-cache")
        if self.request_id:
            headers["x-request-id"] = ("x-request-id", self.request_id)
        for name, value in extra:
            low = name.lower()
            if low in ("content-length", "transfer-encoding"):
                continue
            if low == "connection" and "close" in value.lower():
                self.keep_alive = False
            headers[low] = (name, value)
        if length is not None:
            headers["content-length"] = ("content-length", str(length))
        elif self.chunked:
            headers["transfer-encoding"] = ("transfer-encoding", "chunked")
        else:
            self.keep_alive = False  # HTTP/1.0 stream: the end of the body is the close
        if not self.keep_alive:
            headers["connection"] = ("connection", "close")
        lines = [f"HTTP/1.1 {status} {_reason(status)}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.values())
        lines.append("\r\n")
        self.head_sent = True
        return "".join(lines).encode("latin-1", "replace")

    def send(
        self,
        status: int,
        content_type: str,
        body: bytes | str,
        extra: Iterable[tuple[str, str]] = (),
    ) -> None:
        """A complete response with a content-length, in one write."""
        data = body.encode() if isinstance(body, str) else body
        self.write(self.head(status, content_type, extra, len(data)) + data)

    def send_stream(self, status: int, body: bytes, extra: Iterable[tuple[str, str]] = ()) -> None:
        """A complete event-stream response, in one write (one HTTP chunk)."""
        head = self.head(status, "text/event-stream", extra, None)
        if self.chunked:
            self.write(b"%b%x\r\n%b\r\n0\r\n\r\n" % (head, len(body), body))
        else:
            self.write(head + body)


class MockServer:
    """An emulator of the OpenAI, Anthropic and Gemini APIs on 127.0.0.1, served by a daemon
    thread.

    ``with MockServer() as mock:`` (or ``async with``, or ``start()``/``stop()``) runs it on a
    free port; give ``mock.base_url`` (``…/v1``) to an OpenAI-compatible client and
    ``mock.url`` (the host root) to an Anthropic or Gemini one. Each generation request takes
    the next scripted `Reply`: first from the queue of its model (``enqueue(...,
    model=...)``: the body's ``model``, or Gemini's ``{model}`` path segment), then from the
    global queue, else ``mock.default``. Requests refused before that (bad JSON, missing
    fields, auth) take no reply.

    Token accounting (deterministic, the same on every wire): input tokens = Σ over messages
    (a system prompt the wire takes apart counts as one message) of (whitespace separated
    words of the text + 3) (legacy completions: the words of ``prompt``, no overhead); output
    tokens = content pieces sent (``Reply.chunks``, or the request's max tokens when smaller;
    tool calls: argument pieces) times ``n`` (Gemini: ``candidateCount``). Reported as
    OpenAI ``prompt_tokens``/``completion_tokens``, Anthropic ``input_tokens`` (minus
    ``cache_read_input_tokens``)/``output_tokens``, Gemini
    ``promptTokenCount``/``candidatesTokenCount``.

    ``requests`` keeps every request received (until ``reset()``); ``record=False`` keeps
    none, for a long run under load (``serve``, behind ``python -m lunar.testing`` and
    ``lunar mock``, keeps none).

    ``disconnects`` counts responses the client abandoned while the emulator was still
    producing them (during ``delay``, ``stall``, ``pacing``, slow reading): a small reply
    without pacing is handed to the kernel at once and cannot be abandoned.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        require_api_key: str | None = None,
        *,
        models: Iterable[str] | None = None,
        record: bool = True,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._state = _State(Reply(), require_api_key, models, record)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._port: int | None = None
        self._start_error: BaseException | None = None

    # -- addresses ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("MockServer is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://HOST:PORT``: the base URL of Anthropic and Gemini clients."""
        return _base_url(self.host, self.port)

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1``, for OpenAI-compatible clients."""
        return self.url + "/v1"

    # -- script and observations --------------------------------------------------------

    @property
    def default(self) -> Reply:
        """The reply used when nothing is queued."""
        return self._state.default

    @default.setter
    def default(self, reply: Reply) -> None:
        if not isinstance(reply, Reply):
            raise TypeError("default must be a Reply")
        self._state.default = reply

    @property
    def require_api_key(self) -> str | None:
        return self._state.require_api_key

    @require_api_key.setter
    def require_api_key(self, key: str | None) -> None:
        self._state.require_api_key = key

    def enqueue(self, *replies: Reply, model: str | None = None) -> None:
        """Queue replies (FIFO), globally or for requests whose ``model`` equals ``model``."""
        for reply in replies:
            if not isinstance(reply, Reply):
                raise TypeError(f"expected Reply, got {type(reply).__name__}")
        with self._state.lock:
            if model is None:
                self._state.queue.extend(replies)
            else:
                self._state.model_queues.setdefault(model, deque()).extend(replies)

    @property
    def pending(self) -> int:
        """Scripted replies not consumed yet (all queues)."""
        with self._state.lock:
            return len(self._state.queue) + sum(len(q) for q in self._state.model_queues.values())

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def open_connections(self) -> int:
        """TCP connections currently open on the server side."""
        return self._state.open_connections

    @property
    def open_peers(self) -> set[tuple[str, int]]:
        """The clients' addresses (host, port) of the connections open now, as
        ``RecordedRequest.peer`` has them."""
        return {c.peer for c in list(self._state.conns) if c.peer is not None}

    @property
    def total_connections(self) -> int:
        """TCP connections accepted (since start, or the connections open at ``reset()``)."""
        return self._state.total_connections

    @property
    def disconnects(self) -> int:
        """Responses the client abandoned before the emulator finished writing them."""
        return self._state.disconnects

    def reset(self) -> None:
        """Clear queues, recorded requests and ``disconnects``; default back to ``Reply()``.

        ``open_connections`` is a live gauge and is not reset; ``total_connections`` restarts
        from it.
        """
        self._state.reset()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> MockServer:
        if self._thread is not None:
            return self
        ready = threading.Event()
        self._start_error = None
        thread = threading.Thread(
            target=self._serve_in_thread, args=(ready,), name="lunar-mock", daemon=True
        )
        self._thread = thread
        thread.start()
        if not ready.wait(10):
            raise RuntimeError("MockServer did not start within 10 s")
        if self._start_error is not None:
            self._thread = None
            thread.join(5)
            raise self._start_error
        return self

    def _serve_in_thread(self, ready: threading.Event) -> None:
        loop = _new_loop(prefer_uvloop=False)
        asyncio.set_event_loop(loop)
        state = self._state
        try:
            server = loop.run_until_complete(
                loop.create_server(
                    lambda: _Conn(state, loop), self.host, self._requested_port, backlog=1024
                )
            )
        except BaseException as exc:
            self._start_error = exc
            ready.set()
            loop.close()
            return
        self._server = server
        self._port = server.sockets[0].getsockname()[1]
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._state.conns):
            conn.abort()
        for _ in range(3):  # let connection_lost callbacks run
            await asyncio.sleep(0)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            self._loop = None
            self._thread = None
            self._server = None

    def __enter__(self) -> MockServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> MockServer:
        await asyncio.get_running_loop().run_in_executor(None, self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)

    def __repr__(self) -> str:
        where = self.base_url if self._port is not None else "not started"
        return f"<MockServer {where}>"


def serve(
    host: str = "127.0.0.1",
    port: int = 4010,
    default: Reply | None = None,
    *,
    require_api_key: str | None = None,
    models: Iterable[str] | None = None,
) -> None:
    """Serve the emulator in the foreground until SIGINT/SIGTERM (uvloop when importable).

    Prints ``lunar mock listening on http://HOST:PORT/v1`` once ready.
    """
    loop = _new_loop(prefer_uvloop=True)
    asyncio.set_event_loop(loop)
    state = _State(
        default if default is not None else Reply(), require_api_key, models, record=False
    )

    async def main() -> None:
        server = await loop.create_server(lambda: _Conn(state, loop), host, port, backlog=2048)
        actual = server.sockets[0].getsockname()[1]
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        print(f"lunar mock listening on {_base_url(host, actual)}/v1", flush=True)
        async with server:
            await stop.wait()
            server.close()
            for conn in list(state.conns):
                conn.abort()

    try:
        loop.run_until_complete(main())
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
