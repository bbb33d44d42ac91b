"""The gateway as a raw ASGI application: exact-path dispatch, no framework on the hot path.

One ``Gateway`` per process holds the catalogue, one ``AsyncEngine`` (the same engine as the
SDK's direct mode: routing, retries, fallbacks, cost and timing all happen there), the keys,
the limiter, the metrics and the ledger. A request goes:

    authenticate -> read and validate the body -> model access -> admit (limits, budget)
    -> engine -> ledger row -> response (JSON, or SSE passed through chunk by chunk)

A task watching ``receive()`` notices a client disconnect and cancels the request, which
closes the upstream connection; the ledger row then says ``cancelled`` with the usage seen.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
import traceback
import zlib
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from functools import partial
from typing import Any
from urllib.parse import parse_qs

from .. import __version__
from .._catalog import Catalog
from .._engine import AsyncEngine, Router, Trace, estimate_tokens, ms, prompt_chars
from .._errors import (
    APIError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    LunarError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestEntityTooLargeError,
    ServiceUnavailableError,
)
from .._http import AsyncPool
from .._json import dumps, loads
from .._request import (
    MAX_RETRIES_HEADER,
    TIMEOUT_HEADER,
    RequestOptions,
    bad,
    hop_policy,
    validate_fallbacks,
    validate_model,
    validate_provider,
)
from .._types import Usage
from ..providers._shared import OPENAI_FIELDS
from .config import ServerConfig
from .cors import Cors
from .dialects import (
    CHAT,
    COMPLETIONS,
    MESSAGES,
    Dialect,
    Headers,
    StreamWriter,
    error_type,
    openai_error,
    parse_request,
)
from .keys import (
    MASTER_KEY,
    KeyRing,
    changes_from_request,
    credential,
    is_master,
    key_from_request,
    update_key,
)
from .limits import UNUSED, InMemoryLimiter, Limiter, Refusal, Ticket, estimate, needs_estimate
from .metrics import Metrics, model_label
from .openapi import openapi_document
from .redact import log_detail, public_error
from .relay import ClientSink, client_sink
from .storage import GROUP_BY, KeyRecord, SQLiteStorage, Storage, UsageQuery, UsageRow, parse_time

log = logging.getLogger("lunar.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON = (b"content-type", b"application/json")
# A Lunar client's retry budget and deadline for the request (remote mode, docs/gateway.md).
_MAX_RETRIES, _TIMEOUT = MAX_RETRIES_HEADER.encode(), TIMEOUT_HEADER.encode()
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

# ---------------------------------------------------------------------------------------------
# Small HTTP helpers


#: Frames of a traceback logged, at each end: a deep recursion's would be thousands of
#: lines for one request, and a client could fill the disk with a few small bodies.
_LOGGED_FRAMES = 12


def _frames(exc: BaseException) -> str:
    """The traceback of ``exc`` for the log: its first and last ``_LOGGED_FRAMES`` frames."""
    frames = traceback.extract_tb(exc.__traceback__)
    if len(frames) > 2 * _LOGGED_FRAMES:
        skipped = len(frames) - 2 * _LOGGED_FRAMES
        lines = [
            *traceback.format_list(frames[:_LOGGED_FRAMES]),
            f"  ... {skipped} frames ...\n",
            *traceback.format_list(frames[-_LOGGED_FRAMES:]),
        ]
    else:
        lines = traceback.format_list(frames)
    return "".join(lines).rstrip()


class _ClientGone(Exception):
    """The client disconnected while its request body was being read."""


class _ClientStalled(Exception):
    """The client took none of a stream's bytes for the gateway's ``timeout_seconds``."""


async def _send_within(send: Send, message: Message, sink: ClientSink, timeout: float) -> None:
    """``send`` to a client that is not reading now: given up after ``timeout`` seconds, and
    the connection dropped, so a client that never reads cannot hold an upstream connection
    (of a pool every key shares) for ever."""
    try:
        await asyncio.wait_for(send(message), timeout)
    except TimeoutError:
        sink.abort()
        raise _ClientStalled from None


def _headers(scope: Scope) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        out[name.lower()] = value
    return out


async def _send_json(send: Send, status: int, payload: Any, headers: Headers | None = None) -> None:
    body = dumps(payload)
    h = [_JSON, (b"content-length", str(len(body)).encode())]
    if headers:
        h.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


async def _send_error(
    send: Send,
    err: LunarError,
    shape: Callable[[LunarError], tuple[int, Any, Headers]] = openai_error,
    headers: Headers | None = None,
) -> None:
    """``err`` as its API shapes errors (OpenAI's by default), with ``headers`` first."""
    status, payload, extra = shape(err)
    await _send_json(send, status, payload, [*(headers or ()), *extra])


def _error_shape(path: str) -> Callable[[LunarError], tuple[int, Any, Headers]]:
    """How errors are shaped on ``path``: Anthropic's under /v1/messages, else OpenAI's."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return MESSAGES.error
    return openai_error


def _unknown_route(method: str, path: str) -> NotFoundError:
    return NotFoundError(
        f"Unknown route {method} {path}: see GET /openapi.json",
        code="unknown_route",
        type="invalid_request_error",
    )


def _not_allowed(method: str, path: str, methods: Iterable[str]) -> tuple[APIStatusError, Headers]:
    """The 405 for ``method`` on a route taking ``methods``, and its ``Allow`` header."""
    allow = ", ".join(sorted(methods))
    refused = APIStatusError(
        f"Method {method} not allowed on {path} (allowed: {allow})",
        405,
        code="method_not_allowed",
        type="invalid_request_error",
    )
    return refused, [(b"allow", allow.encode())]


def _unpriced(key: KeyRecord, model: str, primary: str) -> PermissionDeniedError:
    """A key with a budget and a model the catalogue has no price for: what it would spend
    is unknown, so the budget could not hold it."""
    return PermissionDeniedError(
        f"Key '{key.name}' has a budget, and model '{model}' has no price, so its cost is "
        "unknown: use a priced model, or give it a price in the gateway's config "
        "([models.<name>] with input and output per 1M tokens)",
        param="model" if model == primary else "fallbacks",
        code="model_not_priced",
    )


def _file_model(name: str, param: str) -> NotFoundError:
    """``local/<path>``, a file on the gateway's host, asked by a client: never loaded (any
    file could be probed, or loaded into memory), only the local models the config names."""
    return NotFoundError(
        f"Model '{name}' is not served by this gateway: a local model file is served only "
        "when the gateway's config names it ([local.models])",
        param=param,
        code="model_not_found",
    )


def _body_fields(allowed: list[str]) -> frozenset[str] | None:
    """The fields a virtual key's chat body may have: OpenAI's and ``allowed`` (the config's
    ``extra_body_fields``); ``None`` when ``*`` allows any."""
    return None if "*" in allowed else OPENAI_FIELDS.union(allowed)


def _field_refused(name: str, allowed: list[str]) -> BadRequestError:
    """A body field a virtual key may not send: it could pick another model, route,
    endpoint or credential at the provider, which the key's limits and prices do not see."""
    extra = ", ".join(allowed) or "none"
    return BadRequestError(
        f"Field '{name}' is not accepted by this gateway: besides OpenAI's chat parameters, "
        f"it passes on only the fields its operator allows (extra_body_fields: {extra})",
        param=name,
        code="field_not_allowed",
    )


def _refused(refusal: Refusal) -> RateLimitError:
    headers = (
        {"x-should-retry": "false"}
        if refusal.retry_after is None
        else {"retry-after": str(int(refusal.retry_after))}
    )
    return RateLimitError(refusal.message, headers=headers, code=refusal.code, type=refusal.type)


# ---------------------------------------------------------------------------------------------
# Per-request state


class _Call:
    """One inference request's bookkeeping, from authentication to its ledger row."""

    __slots__ = ("body", "label", "recorded", "row", "started", "ticket", "trace", "usage")

    def __init__(self, row: UsageRow, started: float) -> None:
        self.row = row
        self.started = started
        self.usage: Usage | None = None  # a whole answer's (a stream's is on trace.stream)
        self.body: dict[str, Any] = {}
        self.trace = Trace()
        self.ticket: Ticket | None = None
        self.label = ""  # the requested model as a metrics label, once it resolved
        self.recorded = False


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Watch:
    """Client-disconnect watch for one request: a task waiting on ``receive()``; when the
    client goes away before the response is complete, it cancels the request's task.

    The task starts only once the request has run for ``WATCH_AFTER_S``: most of a
    request's life is the upstream's answer (seconds), a request answered sooner (a cache
    hit, an error, a benchmark's emulator) costs no task, and a client gone in that first
    moment is noticed that much later. ``_Watches`` starts them."""

    __slots__ = ("disconnected", "due", "finished", "receive", "task", "watcher")

    WATCH_AFTER_S = 0.05

    def __init__(self, receive: Receive | None, task: asyncio.Task[Any] | None, due: float) -> None:
        self.disconnected = False
        self.finished = False
        self.receive = receive
        self.task = task
        self.due = due
        self.watcher: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self.watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        receive = self.receive
        if receive is None:  # stopped before it started
            return
        while True:
            try:
                message = await receive()
            except Exception:  # the server gave up on the connection: nothing to watch
                return
            if message["type"] == "http.disconnect":
                if not self.finished and self.task is not None:
                    self.disconnected = True
                    self.task.cancel()
                return

    def stop(self) -> None:
        self.finished = True
        # What it held goes now, not when ``_Watches`` next passes it in its queue.
        self.receive = self.task = None
        # Let go of the task as it is cancelled: it keeps its CancelledError, whose traceback
        # holds `_watch`'s frame and so `self`; holding the task here too made a reference
        # cycle per watched request, left to the cyclic GC (22 objects each, whose
        # collections paused a loaded gateway's loop for up to 57 ms).
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.cancel()


class _Watches:
    """Starts each request's ``_Watch`` once it is due, with one timer for them all: a
    timer armed and cancelled per request cost more than the rest of the watch. Watches
    are due in the order they were made, so a queue holds them, and the timer is armed for
    the first one whenever there is any."""

    _SLACK_S = 0.001  # a timer may fire up to a millisecond early (libuv's resolution)

    def __init__(self) -> None:
        self._queue: collections.deque[_Watch] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, receive: Receive) -> _Watch:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (in-process use): the old one is gone
            self._queue.clear()
            self._timer = None
            self._loop = loop
        watch = _Watch(receive, asyncio.current_task(), loop.time() + _Watch.WATCH_AFTER_S)
        self._queue.append(watch)
        if self._timer is None:
            self._timer = loop.call_at(watch.due, self._start_due, loop)
        return watch

    def _start_due(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:  # armed on a loop this gateway has since left
            return
        self._timer = None
        queue = self._queue
        now = loop.time() + self._SLACK_S
        while queue:
            watch = queue[0]
            if not watch.finished and watch.due > now:
                self._timer = loop.call_at(watch.due, self._start_due, loop)
                return
            queue.popleft()
            if not watch.finished:
                watch._start()


# ---------------------------------------------------------------------------------------------
# The application

#: The ledger writer's trouble, as counters: ``(metric, the storage's attribute, help)``.
_LEDGER_COUNTERS = (
    (
        "lunar_ledger_write_errors_total",
        "write_errors",
        "Failed ledger inserts and commits (a busy, locked or failing database; each retry).",
    ),
    (
        "lunar_ledger_spilled_rows_total",
        "rows_spilled",
        "Ledger rows that could not be written, appended to <db>.unwritten.jsonl.",
    ),
    (
        "lunar_ledger_recovered_rows_total",
        "rows_recovered",
        "Ledger rows written from <db>.unwritten.jsonl once the database took rows again.",
    ),
)


def _count(storage: Storage, attr: str) -> float:
    return float(getattr(storage, attr, 0))  # a backend without the counter: 0


class Gateway:
    """The ASGI application (``create_app(config)`` builds one)."""

    def __init__(
        self,
        config: ServerConfig,
        storage: Storage | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.config = config
        self.catalog: Catalog = config.build_catalog()
        config.check_base_urls(self.catalog)
        overrides = config.provider_overrides(self.catalog)
        for name, why in config.unset_providers(self.catalog).items():
            overrides[name] = {**overrides.get(name, {}), "unset": why}
        self.router = Router(
            self.catalog,
            providers=overrides,
            fallbacks=config.fallbacks,
            environ=config.environ,
        )
        self.storage: Storage = storage or SQLiteStorage(
            config.db, batch_size=config.batch_size, linger=config.flush_interval_ms / 1000
        )
        self.limiter: Limiter = limiter or InMemoryLimiter(config.window_seconds)
        self.keys = KeyRing(self.catalog)
        self.metrics = Metrics()
        self.metrics.gauge(
            "lunar_ledger_pending_rows",
            "Ledger rows recorded but not yet committed.",
            lambda: float(self.storage.pending),
        )
        self.metrics.gauge(
            "lunar_keys", "Virtual keys known (active or revoked).", lambda: float(len(self.keys))
        )
        for name, attr, help in _LEDGER_COUNTERS:
            self.metrics.gauge(name, help, partial(_count, self.storage, attr), "counter")
        self.engine: AsyncEngine | None = None
        self._http: AsyncPool | None = None
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._closed = False
        self._watches = _Watches()
        self._counter = 0
        self._prefix = os.urandom(4).hex()
        self._models_all = [m.to_dict() for m in self.catalog.list_models()]
        # Providers whose model id is a file on this host (the embedded llama.cpp runtime):
        # a client may use only the models the catalogue or the config names on them.
        self._file_providers = frozenset(
            name for name, spec in self.catalog.providers.items() if spec.protocol == "local"
        )
        # A virtual key's chat body may carry these fields only (None: any).
        self._body_fields = _body_fields(config.extra_body_fields)
        self._pricing = dumps(self._pricing_document())
        self._openapi = dumps(openapi_document(__version__))
        self._routes: dict[str, dict[str, Callable[..., Awaitable[None]]]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/messages": {"POST": self._messages},
            "/v1/messages/count_tokens": {"POST": self._count_tokens},
            "/v1/models": {"GET": self._models},
            "/v1/pricing/models": {"GET": self._pricing_route},
            "/health": {"GET": self._health, "HEAD": self._health},
            "/metrics": {"GET": self._metrics},
            "/openapi.json": {"GET": self._openapi_route},
            "/admin/keys": {"GET": self._list_keys, "POST": self._create_key},
            "/admin/usage": {"GET": self._usage},
        }
        # Routes with an id after their prefix.
        self._prefixed: tuple[tuple[str, dict[str, Callable[..., Awaitable[None]]]], ...] = (
            ("/v1/models/", {"GET": self._model}),
            (
                "/admin/keys/",
                {"GET": self._get_key, "PATCH": self._update_key, "DELETE": self._revoke_key},
            ),
        )
        self._cors: Cors | None = None
        if config.allow_origins:
            self._cors = Cors(config.allow_origins, config.allow_headers, config.max_age_seconds)
            # Each request goes through `_cors_request` first. Off, the class's own method
            # runs as before: CORS costs a request nothing, not even a test.
            self._http_request = self._cors_request  # type: ignore[method-assign]

    # -- lifecycle ------------------------------------------------------------------------

    async def startup(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            await asyncio.to_thread(self.storage.open)
            await self._reload_keys()
            self.limiter.load_spend(await asyncio.to_thread(self.storage.spend_by_key))
            c = self.config
            self._http = AsyncPool(
                timeout=c.timeout_seconds,
                connect_timeout=c.connect_timeout_seconds,
                max_connections=c.max_connections,
                # Any connection may be idle between two requests: they expire after 5 s.
                max_idle_per_origin=c.max_connections,
                headers={"user-agent": f"lunar-gateway/{__version__}"},
            )
            self.engine = AsyncEngine(
                self.router, self._http, c.max_retries, local_wait=c.timeout_seconds
            )
            self._refresher = asyncio.create_task(self._refresh_keys())
            self._started = True

    async def shutdown(self) -> None:
        """Stop taking work and make the ledger durable (flushes every queued row)."""
        # uvicorn cancels requests still running after its graceful timeout just before this:
        # let them write their rows first.
        deadline = time.monotonic() + 5.0
        while self.metrics.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Flush and close the ledger (blocking; safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        self.storage.close(timeout=max(30.0, self.config.graceful_timeout_seconds))

    async def _reload_keys(self) -> None:
        as_of = self.keys.version  # admin calls may put keys while storage is read
        self.keys.replace_all(await asyncio.to_thread(self.storage.load_keys), as_of)

    async def _refresh_keys(self) -> None:
        """Keys created or revoked by ``lunar keys --db`` straight in the database."""
        while True:
            await asyncio.sleep(self.config.keys_refresh_seconds)
            try:
                await self._reload_keys()
            except Exception as exc:
                log.warning("reloading keys failed: %s", exc)

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http_request(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.error("gateway failed to start: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._started:
            await self.startup()
        path: str = scope["path"]
        method: str = scope["method"]
        methods = self._routes.get(path)
        args: tuple[Any, ...] = ()
        if methods is None:
            methods, args = self._route_with_id(path)
            if methods is None:
                await _send_error(send, _unknown_route(method, path), _error_shape(path))
                return
        handler = methods.get(method)
        if handler is None:
            refused, allow = _not_allowed(method, path, methods)
            await _send_error(send, refused, _error_shape(path), allow)
            return
        try:
            await handler(scope, receive, send, *args)
        except _ClientGone:
            return
        except Exception as exc:  # last resort: JSON, and a log line without any content
            log.error(
                "internal error in %s: %s\n%s",
                path,
                type(exc).__name__,
                _frames(exc),
            )
            error = {
                "message": "Internal error in the gateway",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            }
            with contextlib.suppress(Exception):
                await _send_json(send, 500, {"error": error})

    def _route_with_id(
        self, path: str
    ) -> tuple[dict[str, Callable[..., Awaitable[None]]] | None, tuple[Any, ...]]:
        """A route of ``_prefixed`` and the id after its prefix; ``None`` when none is."""
        for prefix, methods in self._prefixed:
            if path.startswith(prefix) and len(path) > len(prefix):
                return methods, (path[len(prefix) :],)
        return None, ()

    async def _cors_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request with CORS on: a preflight is answered here; any other response gets
        the headers its Origin calls for (precomputed lists) in its start message."""
        cors = self._cors
        assert cors is not None
        origin: bytes | None = None
        for name, value in scope["headers"]:  # ASGI servers give names in lower case
            if name == b"origin":
                origin = value
                break
        if origin is not None and scope["method"] == "OPTIONS":
            headers = _headers(scope)
            requested = headers.get(b"access-control-request-method")
            if requested is not None:
                await self._preflight(scope, send, cors, origin, requested, headers)
                return
        extra = cors.response_headers(origin)

        def cors_send(message: Message) -> Awaitable[None]:
            # A plain function: no coroutine of its own for each body message of a stream.
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], *extra]
            return send(message)

        await Gateway._http_request(self, scope, receive, cors_send)

    async def _preflight(
        self,
        scope: Scope,
        send: Send,
        cors: Cors,
        origin: bytes,
        requested: bytes,
        headers: dict[bytes, bytes],
    ) -> None:
        """``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``: 204 with what
        the origin may send to the route, else a refusal in the route's error shape that
        says why (an unknown route: its 404)."""
        path: str = scope["path"]
        methods = self._routes.get(path) or self._route_with_id(path)[0]
        shape = _error_shape(path)
        extra = cors.response_headers(origin)
        method = requested.decode("latin-1")
        if methods is None:
            await _send_error(send, _unknown_route(method, path), shape, extra)
            return
        try:
            cors.check_origin(origin)
            if method not in methods:
                refused, allow = _not_allowed(method, path, methods)
                await _send_error(send, refused, shape, [*extra, *allow])
                return
            allowed = ", ".join(sorted(methods)).encode()
            out = cors.preflight(origin, allowed, headers.get(b"access-control-request-headers"))
        except APIError as err:
            await _send_error(send, err, shape, extra)
            return
        await send({"type": "http.response.start", "status": 204, "headers": out})
        await send({"type": "http.response.body", "body": b""})

    def _request_id(self) -> str:
        self._counter += 1
        return f"req_{self._prefix}{self._counter:x}"

    async def _read_body(
        self, scope: Scope, receive: Receive, headers: dict[bytes, bytes]
    ) -> bytes:
        limit = self.config.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise BadRequestError("Invalid Content-Length header", param=None) from None
            if size > limit:
                raise self._too_large(limit)
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise self._too_large(limit)
                parts.append(chunk)
            if not message.get("more_body", False):
                break
        data = b"".join(parts)
        encoding = headers.get(b"content-encoding")
        if encoding is not None:  # seldom: one lookup is all a plain body costs
            encoding = encoding.strip().lower()
            if encoding and encoding != b"identity":
                data = self._decoded(encoding, data, limit)
        return data

    @classmethod
    def _decoded(cls, encoding: bytes, data: bytes, limit: int) -> bytes:
        """A gzip- or deflate-encoded body, decoded up to ``limit`` bytes (413 past it)."""
        name = encoding.decode("latin-1")
        if encoding not in (b"gzip", b"x-gzip", b"deflate"):
            raise APIStatusError(
                f"Content-Encoding '{name}' is not supported: send the body uncompressed, "
                "or gzip- or deflate-encoded",
                415,
                code="unsupported_content_encoding",
                type="invalid_request_error",
            )
        decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # a gzip or a zlib header
        try:
            out = decoder.decompress(data, limit + 1)
        except zlib.error:
            out = b""
        if len(out) > limit:
            raise cls._too_large(limit)
        if not decoder.eof:
            raise BadRequestError(
                f"The request body is not complete {name}-encoded data, as its "
                "Content-Encoding header says",
                param=None,
                code="invalid_body_encoding",
            )
        return out

    @staticmethod
    def _too_large(limit: int) -> RequestEntityTooLargeError:
        return RequestEntityTooLargeError(
            f"Request body larger than {limit} bytes (the gateway's max_body_bytes; "
            "LUNAR_MAX_BODY_BYTES raises it)",
            param=None,
            code="request_too_large",
        )

    @staticmethod
    def _parse_json(data: bytes) -> Any:
        if not data:
            raise BadRequestError(
                "Empty request body: send a JSON object", param=None, code="invalid_json"
            )
        try:
            return loads(data)
        except UnicodeDecodeError:
            raise BadRequestError(
                "The request body is not UTF-8", param=None, code="invalid_json"
            ) from None
        except ValueError as e:
            raise BadRequestError(
                f"Invalid JSON in the request body: {e}", param=None, code="invalid_json"
            ) from None
        except RecursionError:
            raise BadRequestError(
                "The JSON body is nested too deeply", param=None, code="invalid_json"
            ) from None

    # -- inference ------------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inference(CHAT, scope, receive, send)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inference(COMPLETIONS, scope, receive, send)

    async def _messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._inference(MESSAGES, scope, receive, send)

    def _authenticate(self, headers: dict[bytes, bytes]) -> KeyRecord:
        try:
            return self.keys.authenticate(credential(headers), self.config.master_key)
        except AuthenticationError as err:
            self.metrics.auth_failures.inc((err.code or "invalid_api_key",))
            raise

    async def _inference(
        self, dialect: Dialect, scope: Scope, receive: Receive, send: Send
    ) -> None:
        started = time.perf_counter()
        request_id = self._request_id()
        rid = (b"x-request-id", request_id.encode())
        headers = _headers(scope)
        try:
            key = self._authenticate(headers)
        except AuthenticationError as err:
            await _send_error(send, err, dialect.error, [rid])
            return

        call = _Call(
            UsageRow(ts=time.time(), request_id=request_id, key_id=key.id, route=dialect.route),
            started,
        )
        row = call.row
        watch: _Watch | None = None
        response_started = False
        writer: StreamWriter | None = None
        self.metrics.in_flight += 1
        try:
            try:
                raw = self._parse_json(await self._read_body(scope, receive, headers))
                if isinstance(raw, dict) and isinstance(raw.get("model"), str):
                    row.model = raw["model"][:200]
                body, lunar = parse_request(dialect, raw)
                call.body = body
                allowed = self._body_fields
                if allowed is not None and key is not MASTER_KEY and not allowed.issuperset(body):
                    refused = next(name for name in body if name not in allowed)
                    raise _field_refused(refused, self.config.extra_body_fields)
                model = validate_model(lunar["model"])
                stream = lunar["stream"]
                if stream is not None and not isinstance(stream, bool):
                    raise bad("'stream' must be a boolean", "stream")
                row.stream = bool(stream)
                fallbacks = validate_fallbacks(lunar["fallbacks"])
                provider = validate_provider(lunar["provider"])
                opts = RequestOptions(model, fallbacks, provider)
                asked_retries = headers.get(_MAX_RETRIES)
                asked_timeout = headers.get(_TIMEOUT)
                if asked_retries is not None or asked_timeout is not None:
                    opts.max_retries, opts.deadline = hop_policy(
                        asked_retries, asked_timeout, started, self.config.max_retries
                    )
                candidates, call.label = self._check_access(key, opts)
                est = (
                    estimate(body, candidates, self.catalog, self.config.output_tokens_estimate)
                    if needs_estimate(key)
                    else UNUSED
                )
                if est.unpriced is not None and key.budget_usd is not None:
                    raise _unpriced(key, est.unpriced, opts.model)
                admitted = self.limiter.admit(key, est)
                if isinstance(admitted, Refusal):
                    row.status = "rejected"
                    raise _refused(admitted)
                call.ticket = admitted
                assert self.engine is not None
                watch = self._watches.watch(receive)
                if stream:
                    it = await self.engine.stream(body, opts, call.trace)
                else:
                    completion = await self.engine.complete(body, opts, call.trace)
            except LunarError as err:
                if row.status != "rejected":
                    row.status = "rejected" if isinstance(err, PermissionDeniedError) else "error"
                shown = err if key is MASTER_KEY else self._public(err, request_id)
                status, payload, extra = dialect.error(shown)
                row.http_status = status
                row.error_type = error_type(err)
                row.attempts = len(err.attempts)
                if err.attempts:
                    row.provider = err.attempts[-1].provider
                if watch is not None:
                    watch.stop()
                failure = partial(_send_json, send, status, payload, [rid, *extra])
                await self._conclude(call, failure)
                return

            if not stream:
                call.usage = completion.usage
                self._served(row, call.trace)
                answer = dialect.complete(completion)
                watch.stop()
                await self._conclude(call, partial(_send_json, send, 200, answer, [rid]))
                return

            response_started = True
            writer = dialect.stream(model, body)
            self._served(row, call.trace)
            try:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": [*_SSE_HEADERS, rid]}
                )
                sink = client_sink(scope)
                if writer.encoder is not None and sink is not None:
                    it.relay_to(writer.encoder, sink)
                async for batch in it.batches():
                    data = writer.chunks(batch)  # what one upstream read brought: one write
                    if data:
                        message = {"type": "http.response.body", "body": data, "more_body": True}
                        if sink is not None and sink.paused():
                            await _send_within(send, message, sink, self.config.timeout_seconds)
                        else:
                            await send(message)
                tail = writer.done()
            except LunarError as err:
                # After the first byte: an error event, then the end — never a clean finish.
                row.status = "error"
                row.error_type = error_type(err)
                row.attempts = len(err.attempts)
                shown = err if key is MASTER_KEY else self._public(err, request_id)
                tail = writer.error(shown, request_id)
            finally:
                await it.aclose()
            watch.stop()
            last = {"type": "http.response.body", "body": tail, "more_body": False}
            await self._conclude(call, partial(send, last))
        except _ClientGone:  # gone while sending its body
            row.status = "cancelled"
            row.http_status = 499
            row.error_type = "client_disconnected"
        except _ClientStalled:  # stopped reading the stream (its connection is dropped)
            row.status = "cancelled"
            row.error_type = "client_stalled"
        except asyncio.CancelledError:
            disconnected = watch is not None and watch.disconnected
            if not call.recorded:
                row.status = "cancelled"
                row.http_status = 499
                row.error_type = "client_disconnected" if disconnected else "cancelled"
            if not disconnected:
                # The server is shutting down (its graceful timeout ran out). The client
                # still gets an answer that says so, and the row says what it got; then the
                # cancel goes on (the row is still recorded below).
                if not call.recorded:
                    with contextlib.suppress(Exception):
                        await self._stopping(dialect, send, row, rid, request_id, writer)
                raise
            uncancel = getattr(asyncio.current_task(), "uncancel", None)
            if uncancel is not None:
                uncancel()
        except Exception as exc:
            # Frames and the exception type only: its message could quote the request.
            log.error(
                "internal error in %s (request %s): %s\n%s",
                dialect.route,
                request_id,
                type(exc).__name__,
                _frames(exc),
            )
            if not call.recorded:
                row.status = "error"
                row.error_type = "internal_error"
                row.http_status = 500
            internal = APIStatusError(
                f"Internal error in the gateway (request {request_id})", 500, code="internal_error"
            )
            with contextlib.suppress(Exception):
                if call.recorded:
                    pass  # it failed sending the answer its row records: nothing to add
                elif not response_started:
                    await _send_error(send, internal, dialect.error, [rid])
                else:
                    tail = dialect.stream("", {}).error(internal, request_id)
                    await send({"type": "http.response.body", "body": tail, "more_body": False})
        finally:
            self.metrics.in_flight -= 1
            if watch is not None:
                watch.stop()
            if not call.recorded:
                self._record(call)
            plan = call.trace.plan
            if plan is not None and plan.attempts:  # a failed attempt's error, recorded
                plan.release()

    @staticmethod
    def _public(err: LunarError, request_id: str) -> LunarError:
        """``err`` as a virtual key's client is told it (see ``redact``); when that leaves
        something out, the whole of it goes to the log under the request's id."""
        shown = public_error(err)
        if shown is not err:
            log.warning("request %s failed: %s", request_id, log_detail(err))
        return shown

    async def _stopping(
        self,
        dialect: Dialect,
        send: Send,
        row: UsageRow,
        rid: tuple[bytes, bytes],
        request_id: str,
        writer: StreamWriter | None,
    ) -> None:
        """A request cut short by the server's shutdown: a 503 if nothing was sent yet, else
        a stream's error event and its end (never a silent cut)."""
        err = ServiceUnavailableError(
            "The gateway is shutting down: retry the request", code="shutting_down"
        )
        row.status = "error"
        row.error_type = "shutting_down"
        if writer is None:
            row.http_status = 503
            await _send_error(send, err, dialect.error, [rid])
        else:
            row.http_status = 200  # the stream's own status, sent with its head
            tail = writer.error(err, request_id)
            await send({"type": "http.response.body", "body": tail, "more_body": False})

    def _check_access(
        self, key: KeyRecord, opts: RequestOptions
    ) -> tuple[list[tuple[str, str | None]], str]:
        """Resolve the model (404 when unknown) and check the key may use it and its
        fallbacks (403). Returns the ``(model, provider)`` candidates for the estimate and
        the model's metrics label."""
        deps = self.catalog.resolve(opts.model, opts.provider)
        if deps and not deps[0].catalogued and deps[0].provider in self._file_providers:
            raise _file_model(opts.model, "model")
        label = model_label(deps[0]) if deps else ""
        if label == deps[0].model and label != opts.model:
            label = opts.model  # an alias keeps its own name
        fallbacks = opts.fallbacks
        if fallbacks is None:
            fallbacks = self.router.fallbacks.get(opts.model, [])
            explicit: list[str] = []
        else:
            explicit = fallbacks
        for i, name in enumerate(explicit):
            if name.partition("/")[0] in self._file_providers and self._file_model(name):
                raise _file_model(name, f"fallbacks[{i}]")
        for name in [opts.model, *explicit]:
            if not self.keys.allows(key, name):
                raise PermissionDeniedError(
                    f"Key '{key.name}' may not use model '{name}' (allowed: "
                    f"{', '.join(key.models or [])})",
                    param="model" if name == opts.model else "fallbacks",
                    code="model_not_allowed",
                )
        return [(opts.model, opts.provider), *((f, None) for f in fallbacks)], label

    def _file_model(self, name: str) -> bool:
        """Whether ``name`` is a ``local/<path>`` the catalogue does not name: a file path."""
        try:
            deps = self.catalog.resolve(name)
        except NotFoundError:
            return False  # the router says so, as for any unknown fallback
        return bool(deps) and not deps[0].catalogued

    @staticmethod
    def _served(row: UsageRow, trace: Trace) -> None:
        if trace.plan is not None:
            row.attempts = len(trace.plan.attempts) + 1
        if trace.target is not None:
            row.served_model = trace.target.deployment.model
            row.provider = trace.target.provider

    def _close(self, call: _Call) -> None:
        """Usage, settlement, metrics: once for every authenticated inference request,
        however it ended. Nothing touches the row after this."""
        call.recorded = True
        row, target, stream = call.row, call.trace.target, call.trace.stream
        # A stream cut short (failure or cancel after the first chunk) bills what was seen.
        try:
            usage = call.usage if stream is None else stream.seen()
        except Exception as exc:  # never at the cost of the row or the key's reservation
            log.error("request %s: its usage failed (%s)", row.request_id, type(exc).__name__)
            usage = None
        if usage is not None:
            row.prompt_tokens = usage.prompt_tokens
            row.completion_tokens = usage.completion_tokens
            row.cached_tokens = usage.cached_tokens
            row.cache_write_tokens = usage.cache_write_tokens
            row.cache_write_1h_tokens = usage.cache_write_1h_tokens
            row.input_cost_usd = usage.input_cost_usd or 0.0
            row.cached_input_cost_usd = usage.cached_input_cost_usd or 0.0
            row.output_cost_usd = usage.output_cost_usd or 0.0
            row.total_cost_usd = usage.total_cost_usd or 0.0
            row.ttft_ms = usage.ttft_ms
        row.latency_ms = ms(time.perf_counter() - call.started)
        if call.ticket is not None:
            self.limiter.settle(
                call.ticket, row.prompt_tokens + row.completion_tokens, row.total_cost_usd
            )
        served = model_label(target.deployment) if target is not None else ""
        self.metrics.observe(row, call.label, served)

    async def _conclude(self, call: _Call, send_last: Callable[[], Awaitable[None]]) -> None:
        """Send the response's last bytes and record the request's row.

        With ``durable_ack`` the row's commit comes first: an answer is never sent for a
        request the ledger could lose. Without it the bytes go first, and the row is closed
        (usage, limits, metrics) and queued right after, before this task yields to the
        loop: the bookkeeping is off the answer's path, and done before the gateway reads
        anything else (the client's next request included)."""
        if not self.config.durable_ack:
            try:
                await send_last()
            finally:  # also when the send fails or is cancelled: the row says what was answered
                self._record(call)
            return
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[None] = loop.create_future()

        def done() -> None:
            loop.call_soon_threadsafe(_resolve, committed)

        self._record(call, done)
        try:
            await committed
        except asyncio.CancelledError:
            # Cancelled (shutdown) while the commit was pending: the row is queued, and the
            # shutdown flushes it, so the answer it records still goes out.
            with contextlib.suppress(Exception):
                await send_last()
            raise
        await send_last()

    def _record(self, call: _Call, on_commit: Callable[[], None] | None = None) -> None:
        """Close the row and queue it: queued even if closing it fails, which would lose
        the row, and leave the key's reservation unsettled."""
        try:
            self._close(call)
        finally:
            self.storage.record(call.row, on_commit)

    async def _count_tokens(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anthropic's ``/v1/messages/count_tokens``: an estimate (~4 characters a token),
        since the model that will answer may not be Anthropic's."""
        try:
            headers = _headers(scope)
            self._authenticate(headers)
            raw = self._parse_json(await self._read_body(scope, receive, headers))
            if isinstance(raw, dict) and raw.get("max_tokens") is None:
                raw = {**raw, "max_tokens": 1}
            body, lunar = parse_request(MESSAGES, raw)
            validate_model(lunar["model"])
        except LunarError as err:
            await _send_error(send, err, MESSAGES.error)
            return
        chars = prompt_chars(body)
        if body.get("tools"):  # the tools' definitions are part of the prompt too
            chars += len(dumps(body["tools"]))
        await _send_json(send, 200, {"input_tokens": estimate_tokens(chars)})

    # -- models and pricing ---------------------------------------------------------------

    def _pricing_document(self) -> dict[str, Any]:
        data = []
        for name, deps in self.catalog.models.items():
            if not deps:
                continue
            first = deps[0]
            data.append(
                {
                    "id": name,
                    "object": "model.pricing",
                    "context_window": first.context_window,
                    "capabilities": sorted(first.capabilities),
                    "deployments": [
                        {
                            "provider": d.provider,
                            "id": d.provider_model,
                            "input_price_per_1m": d.prices.input if d.prices else None,
                            "output_price_per_1m": d.prices.output if d.prices else None,
                            "cached_input_price_per_1m": (
                                d.prices.cached_input if d.prices else None
                            ),
                            "cache_write_price_per_1m": (
                                d.prices.cache_write if d.prices else None
                            ),
                            "cache_write_1h_price_per_1m": (
                                d.prices.cache_write_1h if d.prices else None
                            ),
                        }
                        for d in deps
                    ],
                }
            )
        return {"object": "list", "currency": "USD", "unit": "1M tokens", "data": data}

    async def _pricing_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self._pricing
        headers = [
            _JSON,
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"public, max-age=300"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _visible_models(self, key: KeyRecord) -> list[dict[str, Any]]:
        if self.keys.allowed_names(key) is None:
            return self._models_all
        # The same test as a request's: an alias of an allowed model is allowed.
        return [m for m in self._models_all if self.keys.allows(key, m["id"])]

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            key = self._authenticate(_headers(scope))
        except AuthenticationError as err:
            await _send_error(send, err)
            return
        await _send_json(send, 200, {"object": "list", "data": self._visible_models(key)})

    async def _model(self, scope: Scope, receive: Receive, send: Send, model_id: str) -> None:
        try:
            key = self._authenticate(_headers(scope))
            for m in self._visible_models(key):
                if m["id"] == model_id:
                    await _send_json(send, 200, m)
                    return
            raise NotFoundError(
                f"Model '{model_id}' is not available to this key",
                param="model",
                code="model_not_found",
            )
        except APIError as err:
            await _send_error(send, err)

    # -- operations -----------------------------------------------------------------------

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, {"status": "ok", "version": __version__})

    async def _openapi_route(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self._openapi
        headers = [_JSON, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.config.metrics_public:
            try:
                self._admin(_headers(scope))
            except APIError as err:
                await _send_error(send, err)
                return
        body = self.metrics.render()
        headers = [
            (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- admin ----------------------------------------------------------------------------

    def _admin(self, headers: dict[bytes, bytes]) -> None:
        given = credential(headers)
        if given is None or not is_master(given, self.config.master_key):
            raise AuthenticationError(
                "Admin routes need the master key (LUNAR_MASTER_KEY) as "
                "'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                code="invalid_master_key",
            )

    async def _admin_call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        work: Callable[[], Awaitable[tuple[int, Any]]],
    ) -> None:
        try:
            self._admin(_headers(scope))
            status, payload = await work()
        except APIError as err:
            await _send_error(send, err)
            return
        except _ClientGone:
            raise
        except Exception as exc:
            log.error("internal error in %s: %s", scope["path"], type(exc).__name__)
            error = {
                "message": "Internal error in the gateway",
                "type": "server_error",
                "param": None,
                "code": "internal_error",
            }
            await _send_json(send, 500, {"error": error})
            return
        if isinstance(payload, bytes):  # encoded already (off the event loop)
            h = [_JSON, (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": h})
            await send({"type": "http.response.body", "body": payload})
            return
        await _send_json(send, status, payload)

    async def _create_key(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def work() -> tuple[int, Any]:
            raw = self._parse_json(await self._read_body(scope, receive, _headers(scope)))
            key, rec = key_from_request(raw, self.catalog)
            await asyncio.to_thread(self.storage.add_key, rec)
            self.keys.put(rec)
            out = rec.public(0.0)
            out["key"] = key
            return 201, out

        await self._admin_call(scope, receive, send, work)

    async def _list_keys(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def work() -> tuple[int, Any]:
            data = [r.public(self.limiter.spent(r.id)) for r in self.keys.all()]
            return 200, {"object": "list", "data": data}

        await self._admin_call(scope, receive, send, work)

    async def _get_key(self, scope: Scope, receive: Receive, send: Send, key_id: str) -> None:
        async def work() -> tuple[int, Any]:
            rec = self.keys.get(key_id)
            if rec is None or rec is MASTER_KEY:
                raise NotFoundError(f"No key with id '{key_id}'", param="key_id")
            return 200, rec.public(self.limiter.spent(rec.id))

        await self._admin_call(scope, receive, send, work)

    async def _update_key(self, scope: Scope, receive: Receive, send: Send, key_id: str) -> None:
        async def work() -> tuple[int, Any]:
            raw = self._parse_json(await self._read_body(scope, receive, _headers(scope)))
            changes = changes_from_request(raw, self.catalog)
            rec = await asyncio.to_thread(update_key, self.storage, key_id, changes)
            self.keys.put(rec)
            return 200, rec.public(self.limiter.spent(rec.id))

        await self._admin_call(scope, receive, send, work)

    async def _revoke_key(self, scope: Scope, receive: Receive, send: Send, key_id: str) -> None:
        async def work() -> tuple[int, Any]:
            rec = await asyncio.to_thread(self.storage.revoke_key, key_id, time.time())
            if rec is None:
                raise NotFoundError(f"No key with id '{key_id}'", param="key_id")
            self.keys.put(rec)
            out = rec.public(self.limiter.spent(rec.id))
            out["revoked"] = True
            return 200, out

        await self._admin_call(scope, receive, send, work)

    async def _usage(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def work() -> tuple[int, Any]:
            query = usage_query(scope.get("query_string", b""))
            await asyncio.to_thread(self.storage.flush, 10.0)
            # Read and encoded in a thread: up to 100,000 rows are ~50 MB of JSON, whose
            # encoding on the event loop stalled every request in flight (~0.2-0.35 s).
            return 200, await asyncio.to_thread(self._usage_report, query)

        await self._admin_call(scope, receive, send, work)

    def _usage_report(self, query: UsageQuery) -> bytes:
        return encode_report(self.storage.usage(query))


#: Rows of a usage report encoded at a time: each is one call that holds the GIL
#: (~1-2 ms), so the event loop's thread gets it between them.
REPORT_SLICE = 1000


def encode_report(report: dict[str, Any]) -> bytes:
    """A usage report as JSON, its ``data`` encoded ``REPORT_SLICE`` rows at a time: the same
    bytes as ``dumps(report)``, without holding the GIL for the whole of a large one."""
    parts = []
    for name, value in report.items():
        if name == "data":
            rows = value
            pieces = (
                dumps(rows[i : i + REPORT_SLICE])[1:-1] for i in range(0, len(rows), REPORT_SLICE)
            )
            encoded = b"[" + b",".join(pieces) + b"]"
        else:
            encoded = dumps(value)
        parts.append(dumps(name) + b":" + encoded)
    return b"{" + b",".join(parts) + b"}"


def usage_query(raw: bytes) -> UsageQuery:
    """``/admin/usage``'s query string -> ``UsageQuery`` (400 naming a bad parameter)."""
    try:
        params = parse_qs(raw.decode("latin-1"), keep_blank_values=True)
    except ValueError:
        raise BadRequestError("Unreadable query string", param=None) from None
    allowed = {"key", "model", "since", "until", "group_by", "limit"}
    for name in params:
        if name not in allowed:
            raise bad(f"Unknown parameter '{name}' (known: {', '.join(sorted(allowed))})", name)

    def one(name: str) -> str | None:
        values = params.get(name)
        return values[-1] if values else None

    q = UsageQuery(key=one("key") or None, model=one("model") or None)
    for name in ("since", "until"):
        value = one(name)
        if value:
            try:
                setattr(q, name, parse_time(value))
            except ValueError as e:
                raise bad(str(e), name) from None
    group = one("group_by")
    if group is not None:
        names = [g.strip() for g in group.split(",") if g.strip()]
        if names == ["none"]:
            names = []
        for g in names:
            if g not in GROUP_BY:
                raise bad(
                    f"'group_by' takes none or a list of {', '.join(GROUP_BY)}; got {g!r}",
                    "group_by",
                )
        q.group_by = tuple(dict.fromkeys(names))
    limit = one("limit")
    if limit is not None:
        try:
            q.limit = int(limit)
        except ValueError:
            raise bad("'limit' must be an integer", "limit") from None
        if not 1 <= q.limit <= 100_000:
            raise bad("'limit' must be between 1 and 100000", "limit")
    return q


def create_app(
    config: ServerConfig,
    storage: Storage | None = None,
    limiter: Limiter | None = None,
) -> Gateway:
    """The gateway ASGI app for ``config``. Serve it with uvicorn (``lunar serve`` does), or
    call it in-process (it starts itself on the first request when no lifespan is run)."""
    return Gateway(config, storage, limiter)


__all__ = ["Gateway", "create_app", "usage_query"]
