"""``Lunar`` and ``AsyncLunar``: configuration, resources, and nothing else.

Everything that decides (routing, retries, fallbacks, cost) lives in the engine; everything
that validates lives in ``_request``. The two clients differ only in awaiting.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload
from urllib.parse import quote

import httpx

from . import __version__, _fork, _http
from ._catalog import Catalog, Deployment, ProviderSpec, checked_base_url
from ._engine import NETWORK_ERRORS, AsyncEngine, Router, SyncEngine, connection_error
from ._errors import APIStatusError, AuthenticationError, error_from_response
from ._request import (
    ChatParams,
    CompletionParams,
    DefaultQuery,
    Remote,
    RequestOptions,
    completion_from_chat,
    completion_from_chunk,
    parse_timeout,
    prepare,
    prompt_messages,
    validate_fallbacks,
    validate_model,
)
from ._streaming import AsyncStream, Stream
from ._types import ChatCompletion, ChatCompletionChunk, Completion, Model, SyncPage
from .providers import HTTPRequest, Target

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: 600 s for each wait, 10 s to connect. Left as it is (this very object), a caller's
#: ``http_client`` with a timeout of its own keeps it (as in the openai SDK).
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)
_HTTPX_DEFAULT_TIMEOUT = httpx.Timeout(5.0)  # what an httpx client has when not told
_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)


class _NotGiven:
    """An argument of ``with_options()`` left out: the client's own value stays."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()


def _validate_max_retries(max_retries: Any) -> int:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError("max_retries must be a non-negative integer")
    return max_retries


def _validate_headers(headers: Any, name: str) -> Mapping[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValueError(f"{name} must be a mapping of header names to values (str to str)")
    return headers


def _merged(headers: Mapping[str, str], more: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with ``more`` over them, names compared without case (as HTTP does)."""
    given = {k.lower() for k in more}
    return {**{k: v for k, v in headers.items() if k.lower() not in given}, **more}


class _Settings:
    """What both clients derive from their arguments and the environment."""

    def __init__(
        self,
        api_key: str | None,
        jwt: str | None,
        base_url: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        fallbacks: Mapping[str, list[str]] | None,
        default_headers: Mapping[str, str] | None,
        providers: Mapping[str, Mapping[str, Any]] | None,
        catalog: Any,
        default_query: Mapping[str, object] | None = None,
    ) -> None:
        self.max_retries = _validate_max_retries(max_retries)
        self.catalog = Catalog.load(catalog)
        self.headers = _merged(_USER_AGENT, _validate_headers(default_headers, "default_headers"))
        # None is no timeout, as in the openai SDK; a bad one fails here, as max_retries does.
        self.timeout = parse_timeout(timeout, lambda message, param: ValueError(message))
        self.timeout_given = timeout is not DEFAULT_TIMEOUT
        self.query = DefaultQuery.of(default_query)
        self._route(api_key, jwt, base_url, providers, validate_fallback_map(fallbacks))

    def _route(
        self,
        api_key: str | None,
        jwt: str | None,
        base_url: str | None,
        providers: Mapping[str, Mapping[str, Any]] | None,
        fallbacks: dict[str, list[str]],
    ) -> None:
        """Where requests go and with which credentials: a gateway (``base_url``, else
        ``LUNAR_BASE_URL``) or the providers (direct mode). The arguments are kept, for a
        ``copy()`` that changes some of them."""
        self._given = (api_key, jwt, base_url, providers)
        base_url = _gateway_url(base_url)
        remote = None
        if base_url:
            api_key = api_key or os.environ.get("LUNAR_API_KEY")
            jwt = jwt or os.environ.get("LUNAR_JWT")
            if jwt:
                auth = {"authorization": f"Bearer {jwt}"}
            elif api_key:
                auth = {"x-api-key": api_key}
            else:
                raise AuthenticationError(
                    f"No credentials for the Lunar gateway at {base_url}: set LUNAR_API_KEY "
                    "(or LUNAR_JWT), or pass api_key=...",
                    code="missing_api_key",
                )
            spec = ProviderSpec("lunar", "openai", base_url)
            remote = Target(
                Deployment("", "lunar", "", None), spec, base_url.rstrip("/"), None, auth
            )
        else:
            providers = _direct_keys(api_key, jwt, providers)
        self.remote = remote
        self.router = Router(self.catalog, providers, fallbacks, remote)

    def derive(
        self,
        timeout: Any,
        max_retries: Any,
        default_headers: Mapping[str, str] | None,
        set_default_headers: Mapping[str, str] | None,
        fallbacks: Any,
        api_key: str | None = None,
        base_url: Any = NOT_GIVEN,
        default_query: Mapping[str, object] | None = None,
        set_default_query: Mapping[str, object] | None = None,
    ) -> _Settings:
        """The settings of a ``with_options()`` copy: these options changed (each checked as
        the constructor checks it), the catalogue the same object; the routes' health and
        the gateway too unless ``api_key`` or ``base_url`` is given: then the routes are
        made again, as the constructor makes them, with a health of their own."""
        if default_headers is not None and set_default_headers is not None:
            raise ValueError("default_headers and set_default_headers are mutually exclusive")
        if default_query is not None and set_default_query is not None:
            raise ValueError("default_query and set_default_query are mutually exclusive")
        new = copy.copy(self)
        if default_query is not None:
            more = DefaultQuery.of(default_query)
            if more is not None:
                new.query = DefaultQuery({**(self.query.pairs if self.query else {}), **more.pairs})
        elif set_default_query is not None:
            new.query = DefaultQuery.of(set_default_query, "set_default_query")
        if api_key is not None or base_url is not NOT_GIVEN:
            old_key, jwt, old_url, providers = self._given
            if base_url is NOT_GIVEN:
                base_url = old_url
            remote = _gateway_url(base_url) is not None
            if api_key is not None:
                jwt = None  # the key given replaces the credential, whichever it was
                if not remote:
                    providers = _without_openai_key(providers)
            elif remote == (self.remote is not None):
                api_key = old_key
            else:
                # Another mode: the credential was for the other side (a gateway's key is
                # no provider's, OpenAI's key no gateway's): never sent there.
                jwt = None
            new._route(api_key, jwt, base_url, providers, self.router.fallbacks)
        if max_retries is not NOT_GIVEN:
            new.max_retries = _validate_max_retries(max_retries)
        if timeout is not NOT_GIVEN:
            new.timeout = parse_timeout(timeout, lambda message, param: ValueError(message))
            new.timeout_given = timeout is not DEFAULT_TIMEOUT
        if default_headers is not None:
            given = _validate_headers(default_headers, "default_headers")
            new.headers = _merged(self.headers, given)
        elif set_default_headers is not None:
            given = _validate_headers(set_default_headers, "set_default_headers")
            new.headers = _merged(_USER_AGENT, given)
        if fallbacks is not NOT_GIVEN:
            new.router = new.router.with_fallbacks(validate_fallback_map(fallbacks))
        return new

    def models_request(self, model: str | None = None) -> HTTPRequest:
        """``GET /models``, or the gateway's ``GET /models/{model}`` (the id one path
        segment, whatever it holds)."""
        assert self.remote is not None
        url = self.remote.base_url + "/models"
        if model is not None:
            url += "/" + quote(model, safe="")
        if self.query is not None and self.query.text:
            url += "?" + self.query.text
        return HTTPRequest("GET", url, dict(self.remote.headers), b"")

    def for_http_client(
        self, http: httpx.Client | httpx.AsyncClient | None, own: _Own | None = None
    ) -> dict[str, Any]:
        """What the engine sends with every request when the HTTP client is the caller's:
        the headers and the timeout Lunar's own client would carry (the caller's client
        adds its own headers under them), so ``http_client=`` changes how requests are sent,
        not what is sent. As in the openai SDK, a timeout left out defers to the caller's
        client when that has one of its own (not httpx's 5 s default).
        ``own``: the HTTP client is Lunar's, made with these headers and timeout (by the
        client this one is a ``with_options()`` copy of): only what differs from them."""
        if own is not None:
            out: dict[str, Any] = {}
            if self.headers != own.headers:
                names = {k.lower() for k in self.headers}
                out["headers"] = self.headers
                out["dropped"] = [k.lower() for k in own.headers if k.lower() not in names]
            if self.timeout != own.timeout:
                out["timeout"] = self.timeout
            return out
        if http is None:
            return {}
        keep_theirs = not self.timeout_given and http.timeout != _HTTPX_DEFAULT_TIMEOUT
        return {"headers": self.headers, "timeout": None if keep_theirs else self.timeout}

    def for_remote(
        self, http: httpx.Client | httpx.AsyncClient | None, own: _Own | None = None
    ) -> Remote | None:
        """Remote mode's additions to each request: the client's fallbacks (in the body),
        its ``max_retries`` and the read timeout it waits with (as headers: the gateway
        retries, falls back and answers within them). The timeout is the one requests go
        with: Lunar's, or the caller's ``http_client``'s own when it keeps it."""
        if self.remote is None:
            return None
        if own is not None:
            return Remote(self.router.fallbacks, self.max_retries, self.timeout.read)
        timeout = self.for_http_client(http).get("timeout", self.timeout)
        read = (http.timeout if timeout is None and http is not None else timeout).read
        return Remote(self.router.fallbacks, self.max_retries, read)

    def engine_options(
        self, http: httpx.Client | httpx.AsyncClient | None, own: _Own | None
    ) -> dict[str, Any]:
        """The engine's arguments besides the router and the HTTP client."""
        return {
            "max_retries": self.max_retries,
            "local_wait": self.timeout.read,
            **self.for_http_client(http, own),
        }


_USER_AGENT = {"user-agent": f"lunar-python/{__version__}"}


def _gateway_url(base_url: str | None) -> str | None:
    """The Lunar gateway's URL (``base_url=``, else ``LUNAR_BASE_URL``; spaces around it
    dropped), or None for direct mode. One that is no URL (``127.0.0.1:4000/v1``) is a
    ``ValueError`` naming where it came from, not connection errors retried later."""
    if base_url:
        if not isinstance(base_url, str):
            raise ValueError(f"base_url must be a string, got {base_url!r}")
        return checked_base_url(base_url, "base_url")
    env = os.environ.get("LUNAR_BASE_URL", "").strip()
    return checked_base_url(env, "LUNAR_BASE_URL") if env else None


def _without_openai_key(
    providers: Mapping[str, Mapping[str, Any]] | None,
) -> Mapping[str, Mapping[str, Any]] | None:
    """``providers=`` without OpenAI's key: a ``copy(api_key=...)`` in direct mode gives
    another (the rest of OpenAI's settings, its ``base_url`` say, stay)."""
    openai = (providers or {}).get("openai")
    if not openai or "api_key" not in openai:
        return providers
    return {
        **(providers or {}),
        "openai": {k: v for k, v in openai.items() if k != "api_key"},
    }


def _direct_keys(
    api_key: str | None, jwt: str | None, providers: Mapping[str, Mapping[str, Any]] | None
) -> Mapping[str, Mapping[str, Any]] | None:
    """Direct mode's ``providers=``, with ``api_key=`` as OpenAI's key (what code written
    for the openai SDK means by it; it beats ``OPENAI_API_KEY``, as there). A gateway's
    credential given without the gateway is refused, never sent to OpenAI."""
    if jwt:
        raise ValueError(
            "jwt= is a Lunar gateway's credential: pass base_url= (or set LUNAR_BASE_URL) too"
        )
    if not api_key:
        return providers
    if not isinstance(api_key, str):
        raise ValueError(f"api_key must be a string, got {type(api_key).__name__}")
    if api_key.startswith(LUNAR_KEY_PREFIX):
        raise ValueError(
            f"api_key= is a Lunar gateway key ('{LUNAR_KEY_PREFIX}…'): pass base_url= (or set "
            "LUNAR_BASE_URL) to use the gateway. Without one Lunar calls providers directly, "
            "with keys from {PROVIDER}_API_KEY or providers="
        )
    openai = dict((providers or {}).get("openai") or {})
    if openai.get("api_key") is not None:
        raise ValueError(
            "api_key= and providers['openai']['api_key'] both give OpenAI's key: pass one"
        )
    openai["api_key"] = api_key
    return {**(providers or {}), "openai": openai}


#: How the gateway's virtual keys begin (``lunar.server.keys`` mints them).
LUNAR_KEY_PREFIX = "lk-"


class _Own:
    """The headers and timeout Lunar's own HTTP client (its pool) was made with."""

    __slots__ = ("headers", "timeout")

    def __init__(self, settings: _Settings) -> None:
        self.headers = settings.headers
        self.timeout = settings.timeout


def validate_fallback_map(fallbacks: Mapping[str, Any] | None) -> dict[str, list[str]]:
    if fallbacks is None:
        return {}
    if not isinstance(fallbacks, Mapping):
        raise ValueError("fallbacks must map a model name to a list of fallback models")
    return {model: validate_fallbacks(chain) or [] for model, chain in fallbacks.items()}


def _models_page(response: Any) -> SyncPage:
    data = _gateway_json(response).get("data")
    if not isinstance(data, list) or not all(
        isinstance(m, dict) and isinstance(m.get("id"), str) for m in data
    ):
        raise _not_a_gateway(response)
    return SyncPage([Model.from_dict(m) for m in data])


def _model(response: Any) -> Model:
    """The gateway's answer to ``GET /models/{model}``: the model, or its error (a 404 says
    whether the model is unknown or only not for this key)."""
    obj = _gateway_json(response)
    if not isinstance(obj.get("id"), str):
        raise _not_a_gateway(response)
    return Model.from_dict(obj)


def _gateway_json(response: Any) -> dict[str, Any]:
    """A Lunar gateway's JSON object, or its error; anything else (a web page from a wrong
    ``base_url``) is an APIStatusError that says so, not a parser's exception."""
    if response.status_code >= 400:
        raise error_from_response(response.status_code, response.headers, response.content)
    try:
        obj = json.loads(response.content)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise _not_a_gateway(response)
    return obj


def _not_a_gateway(response: Any) -> APIStatusError:
    return APIStatusError(
        f"The answer is not a Lunar gateway's JSON ({bytes(response.content[:80])!r}): "
        "check base_url",
        response.status_code,
        response.content,
    )


def _catalog_model(settings: _Settings, model: str) -> Model:
    for m in settings.catalog.list_models():
        if m.id == model:
            return m
    raise settings.catalog.unknown(model)


_PROXY_VARIABLES = ("https_proxy", "http_proxy", "all_proxy")


def _async_http(settings: _Settings) -> _http.AsyncPool | httpx.AsyncClient:
    """Lunar's own pool (about 3x less CPU per request than httpx, docs/benchmarks.md) when
    httptools is installed and no proxy is configured; httpx, which speaks proxies,
    otherwise."""
    proxied = any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARIABLES)
    if _http.available() and not proxied:
        t = settings.timeout
        return _http.AsyncPool(
            timeout=t.read,
            connect_timeout=t.connect,
            pool_timeout=t.pool,
            max_connections=_LIMITS.max_connections or 1000,
            max_idle_per_origin=_LIMITS.max_keepalive_connections or 100,
            headers=settings.headers,
        )
    return _fork.track(
        httpx.AsyncClient(timeout=settings.timeout, limits=_LIMITS, headers=settings.headers),
        _fork.reset_httpx,
    )


# --------------------------------------------------------------------------------------------

_C = TypeVar("_C", bound="_Client")


class _Client:
    """What ``Lunar`` and ``AsyncLunar`` share: their settings, HTTP client and engine, and
    ``with_options()``."""

    _settings: _Settings
    _http: Any
    _engine: SyncEngine | AsyncEngine
    _engine_class: type[SyncEngine] | type[AsyncEngine]

    def _start(
        self, settings: _Settings, http: Any, own: _Own | None, owns: bool, borrowed: bool
    ) -> None:
        """``own``: the HTTP client is Lunar's, made with these headers and timeout.
        ``owns``: this client closes it. ``borrowed``: another client does (this one is its
        ``with_options()`` copy)."""
        self._settings = settings
        self._http = http
        self._own = own
        self._owns_http = owns
        self._remote = settings.for_remote(http, own)
        self._query = settings.query
        self._engine = self._engine_class(
            settings.router, http, **settings.engine_options(http, own)
        )
        self._engine.borrowed = borrowed
        self._resources()

    def _resources(self) -> None:
        raise NotImplementedError

    def _prepare(
        self, model: Any, messages: Any, kwargs: Mapping[str, Any], legacy: bool = False
    ) -> tuple[dict[str, Any], RequestOptions]:
        """``create()``'s arguments -> (validated body, options), with what this client adds
        (in remote mode, for the gateway; its ``default_query``)."""
        return prepare(
            "create", model, messages, kwargs, legacy, remote=self._remote, query=self._query
        )

    @property
    def catalog(self) -> Catalog:
        return self._settings.catalog

    @property
    def max_retries(self) -> int:
        return self._settings.max_retries

    @property
    def timeout(self) -> httpx.Timeout:
        return self._settings.timeout

    def copy(
        self: _C,
        *,
        api_key: str | None = None,
        base_url: str | None = NOT_GIVEN,
        timeout: float | httpx.Timeout | None = NOT_GIVEN,
        http_client: httpx.Client | httpx.AsyncClient | None = None,
        max_retries: int = NOT_GIVEN,
        default_headers: Mapping[str, str] | None = None,
        set_default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, object] | None = None,
        set_default_query: Mapping[str, object] | None = None,
        fallbacks: Mapping[str, list[str]] | None = NOT_GIVEN,
    ) -> _C:
        """A client with these options changed (as the openai SDK's ``copy()``, also
        ``with_options()``): ``default_headers`` / ``default_query`` are added to this
        client's, ``set_default_headers`` / ``set_default_query`` replace them;
        ``fallbacks`` replace the client's map. ``api_key`` and ``base_url`` mean what
        they mean to the constructor (``base_url=None``: ``LUNAR_BASE_URL``, else direct
        mode); the copy's routes are then its own (their health too), its connections
        still this client's pool (which keeps them per host: another ``base_url`` opens
        its own). ``http_client``: the copy sends with it, as a client given one does. It
        shares this client's connections, catalogue and routes' health otherwise, and checks
        its options as the constructor does. Closing it (or dropping it) ends its own use
        and streams, never the connections it shares; closing this client closes them for
        both. Remote mode: its ``max_retries`` and timeout go to the gateway as its hop
        headers."""
        settings = self._settings.derive(
            timeout,
            max_retries,
            default_headers,
            set_default_headers,
            fallbacks,
            api_key,
            base_url,
            default_query,
            set_default_query,
        )
        client = object.__new__(type(self))
        if http_client is not None:
            client._start(settings, http_client, None, owns=False, borrowed=False)
            return client
        borrowed = self._owns_http or self._engine.borrowed
        client._start(settings, self._http, self._own, owns=False, borrowed=borrowed)
        return client

    #: ``client.with_options(timeout=5).chat.completions.create(...)``, as in the openai SDK.
    with_options = copy


class Lunar(_Client):
    """The synchronous client. With no ``base_url`` (and no ``LUNAR_BASE_URL``) it routes
    in-process to providers (direct mode), where ``api_key`` is OpenAI's key (as in the
    openai SDK); with one it talks to a Lunar gateway, and ``api_key`` is the gateway's."""

    _engine: SyncEngine
    _engine_class = SyncEngine

    def __init__(
        self,
        api_key: str | None = None,
        *,
        jwt: str | None = None,
        base_url: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        fallbacks: Mapping[str, list[str]] | None = None,
        default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, object] | None = None,
        http_client: httpx.Client | None = None,
        providers: Mapping[str, Mapping[str, Any]] | None = None,
        catalog: Any = None,
    ) -> None:
        settings = _Settings(
            api_key,
            jwt,
            base_url,
            timeout,
            max_retries,
            fallbacks,
            default_headers,
            providers,
            catalog,
            default_query,
        )
        if http_client is not None:
            self._start(settings, http_client, None, owns=False, borrowed=False)
            return
        http = httpx.Client(timeout=settings.timeout, limits=_LIMITS, headers=settings.headers)
        _fork.track(http, _fork.reset_httpx)  # a forked child opens connections of its own
        self._start(settings, http, _Own(settings), owns=True, borrowed=False)

    def _resources(self) -> None:
        self.chat = Chat(self)
        self.completions = Completions(self)
        self.models = Models(self)

    def close(self) -> None:
        """Releases the connections (those of an ``http_client`` you gave stay yours to
        close). A closed client raises ``ClientClosedError`` for every request after."""
        self._engine.closed = True
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Lunar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Chat:
    def __init__(self, client: Lunar) -> None:
        self.completions = ChatCompletions(client)


class ChatCompletions:
    def __init__(self, client: Lunar) -> None:
        self._client = client

    @overload
    def create(
        self,
        *,
        model: str,
        messages: Iterable[Any],
        stream: Literal[False] = False,
        **kwargs: Unpack[ChatParams],
    ) -> ChatCompletion: ...
    @overload
    def create(
        self,
        *,
        model: str,
        messages: Iterable[Any],
        stream: Literal[True],
        **kwargs: Unpack[ChatParams],
    ) -> Stream[ChatCompletionChunk]: ...
    @overload
    def create(
        self, *, model: str, messages: Iterable[Any], stream: bool, **kwargs: Unpack[ChatParams]
    ) -> ChatCompletion | Stream[ChatCompletionChunk]: ...

    def create(
        self,
        *,
        model: str,
        messages: Iterable[Any],
        stream: bool = False,
        **kwargs: Unpack[ChatParams],
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """A chat completion; ``stream=True`` gives a ``Stream`` of chunks. Arguments as in
        the OpenAI API, plus ``fallbacks`` (models to try in order) and ``provider``."""
        client = self._client
        body, opts = client._prepare(model, messages, kwargs)
        if stream:
            return Stream(client._engine.stream(body, opts))
        return client._engine.complete(body, opts)


class Completions:
    """Legacy text completions, served through chat: the prompt is the user's turn."""

    def __init__(self, client: Lunar) -> None:
        self._client = client

    @overload
    def create(
        self,
        *,
        model: str,
        prompt: str | list[str],
        stream: Literal[False] = False,
        **kwargs: Unpack[CompletionParams],
    ) -> Completion: ...
    @overload
    def create(
        self,
        *,
        model: str,
        prompt: str | list[str],
        stream: Literal[True],
        **kwargs: Unpack[CompletionParams],
    ) -> Stream[Completion]: ...

    def create(
        self,
        *,
        model: str,
        prompt: str | list[str],
        stream: bool = False,
        **kwargs: Unpack[CompletionParams],
    ) -> Completion | Stream[Completion]:
        client = self._client
        body, opts = client._prepare(model, prompt_messages(prompt), kwargs, legacy=True)
        if stream:
            return Stream(
                client._engine.stream(body, opts), completion_from_chunk, completion_from_chat
            )
        return completion_from_chat(client._engine.complete(body, opts))


class Models:
    def __init__(self, client: Lunar) -> None:
        self._client = client

    def list(self) -> SyncPage:
        settings = self._client._settings
        if settings.remote is None:
            return SyncPage(settings.catalog.list_models())
        return _models_page(self._get(settings.models_request()))

    def retrieve(self, model: str) -> Model:
        """The catalogue's entry (direct mode), or the gateway's answer for this key."""
        settings = self._client._settings
        model = validate_model(model)
        if settings.remote is None:
            return _catalog_model(settings, model)
        return _model(self._get(settings.models_request(model)))

    def _get(self, request: HTTPRequest) -> Any:
        remote = self._client._settings.remote
        assert remote is not None
        try:
            return self._client._engine.send(request, RequestOptions(""), stream=False)
        except NETWORK_ERRORS as exc:
            raise connection_error(exc, remote) from exc


# --------------------------------------------------------------------------------------------


class AsyncLunar(_Client):
    """The asynchronous client: the same arguments and objects as ``Lunar``, awaited."""

    _engine: AsyncEngine
    _engine_class = AsyncEngine

    def __init__(
        self,
        api_key: str | None = None,
        *,
        jwt: str | None = None,
        base_url: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        fallbacks: Mapping[str, list[str]] | None = None,
        default_headers: Mapping[str, str] | None = None,
        default_query: Mapping[str, object] | None = None,
        http_client: httpx.AsyncClient | None = None,
        providers: Mapping[str, Mapping[str, Any]] | None = None,
        catalog: Any = None,
    ) -> None:
        settings = _Settings(
            api_key,
            jwt,
            base_url,
            timeout,
            max_retries,
            fallbacks,
            default_headers,
            providers,
            catalog,
            default_query,
        )
        if http_client is not None:
            self._start(settings, http_client, None, owns=False, borrowed=False)
            return
        self._start(settings, _async_http(settings), _Own(settings), owns=True, borrowed=False)

    def _resources(self) -> None:
        self.chat = AsyncChat(self)
        self.completions = AsyncCompletions(self)
        self.models = AsyncModels(self)

    async def close(self) -> None:
        """As ``Lunar.close()``."""
        self._engine.closed = True
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncLunar:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncChat:
    def __init__(self, client: AsyncLunar) -> None:
        self.completions = AsyncChatCompletions(client)


class AsyncChatCompletions:
    def __init__(self, client: AsyncLunar) -> None:
        self._client = client

    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Any],
        stream: Literal[False] = False,
        **kwargs: Unpack[ChatParams],
    ) -> ChatCompletion: ...
    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Any],
        stream: Literal[True],
        **kwargs: Unpack[ChatParams],
    ) -> AsyncStream[ChatCompletionChunk]: ...
    @overload
    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Any],
        stream: bool,
        **kwargs: Unpack[ChatParams],
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]: ...

    async def create(
        self,
        *,
        model: str,
        messages: Iterable[Any],
        stream: bool = False,
        **kwargs: Unpack[ChatParams],
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        client = self._client
        body, opts = client._prepare(model, messages, kwargs)
        if stream:
            return AsyncStream(await client._engine.stream(body, opts))
        return await client._engine.complete(body, opts)


class AsyncCompletions:
    def __init__(self, client: AsyncLunar) -> None:
        self._client = client

    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: str | list[str],
        stream: Literal[False] = False,
        **kwargs: Unpack[CompletionParams],
    ) -> Completion: ...
    @overload
    async def create(
        self,
        *,
        model: str,
        prompt: str | list[str],
        stream: Literal[True],
        **kwargs: Unpack[CompletionParams],
    ) -> AsyncStream[Completion]: ...

    async def create(
        self,
        *,
        model: str,
        prompt: str | list[str],
        stream: bool = False,
        **kwargs: Unpack[CompletionParams],
    ) -> Completion | AsyncStream[Completion]:
        client = self._client
        body, opts = client._prepare(model, prompt_messages(prompt), kwargs, legacy=True)
        if stream:
            return AsyncStream(
                await client._engine.stream(body, opts), completion_from_chunk, completion_from_chat
            )
        return completion_from_chat(await client._engine.complete(body, opts))


class AsyncModels:
    def __init__(self, client: AsyncLunar) -> None:
        self._client = client

    async def list(self) -> SyncPage:
        settings = self._client._settings
        if settings.remote is None:
            return SyncPage(settings.catalog.list_models())
        return _models_page(await self._get(settings.models_request()))

    async def retrieve(self, model: str) -> Model:
        settings = self._client._settings
        model = validate_model(model)
        if settings.remote is None:
            return _catalog_model(settings, model)
        return _model(await self._get(settings.models_request(model)))

    async def _get(self, request: HTTPRequest) -> Any:
        remote = self._client._settings.remote
        assert remote is not None
        try:
            return await self._client._engine.send(request, RequestOptions(""), stream=False)
        except NETWORK_ERRORS as exc:
            raise connection_error(exc, remote) from exc
