"""The exception hierarchy, and the one function that maps an HTTP answer to an exception."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any


class LunarError(Exception):
    """Base of every error Lunar raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        #: Every attempt made before giving up (model, provider, error); see ``Attempt``.
        self.attempts: list[Attempt] = []

    @property
    def retryable(self) -> bool:
        """Whether retrying the same request (or falling back) may succeed."""
        return False

    def __reduce__(self) -> tuple[Any, ...]:
        # For pickle and copy: rebuilt without calling __init__ with ``str(self)``, which
        # would put the ``[429] `` prefix before the one it has; the attributes follow.
        return _rebuilt, (type(self), self.args), self.__dict__


def _rebuilt(cls: type[LunarError], args: tuple[Any, ...]) -> LunarError:
    return cls.__new__(cls, *args)


class Attempt:
    """One try against one provider, kept on the error raised when all of them fail."""

    __slots__ = ("error", "model", "provider")

    def __init__(self, model: str, provider: str, error: LunarError) -> None:
        self.model = model
        self.provider = provider
        self.error = error

    def __repr__(self) -> str:
        return f"Attempt(model={self.model!r}, provider={self.provider!r}, error={self.error!s})"


class APIError(LunarError):
    """The base of the errors of a request, as in the openai SDK: an answer with an error
    status (``APIStatusError``), no answer at all (``APIConnectionError``), or a broken or
    misshapen answer (``StreamError``; ``status_code`` None unless it says one)."""

    status_code: int | None = None
    #: ``type`` when neither the answer nor the status says one.
    _default_type = "api_error"

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        response_body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        provider: str | None = None,
    ) -> None:
        if status_code is not None:
            self.status_code = status_code
        prefix = f"[{self.status_code}] " if self.status_code is not None else ""
        super().__init__(prefix + message)
        self.message = message
        self.response_body = response_body
        self.headers: Mapping[str, str] = headers or {}
        self.param = param
        self.code = code
        self.type = type or _DEFAULT_TYPES.get(self.status_code or 0, self._default_type)
        self.provider = provider

    @property
    def retryable(self) -> bool:
        override = self.headers.get("x-should-retry")
        if override == "true":
            return True
        if override == "false":
            return False
        return self.status_code in (408, 409, 429) or (self.status_code or 0) >= 500

    # As on the openai SDK's errors.
    @property
    def body(self) -> Any:
        """As the openai SDK's ``e.body``: the answer's ``error`` object when its JSON has
        one (``e.body["code"]``), else the whole body (parsed JSON when it was JSON, the text
        when not). ``response_body`` is always the whole body."""
        body = self.response_body
        return body.get("error", body) if isinstance(body, dict) else body

    @property
    def request_id(self) -> str | None:
        """The answering server's id for the request (``x-request-id``; Anthropic's
        ``request-id``), to quote to its support."""
        headers = self.headers
        return headers.get("x-request-id") or headers.get("request-id")

    def to_openai_dict(self) -> dict[str, Any]:
        """The OpenAI error JSON shape: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class APIStatusError(APIError):
    """An error answer with a status (from a provider, a gateway, or Lunar refusing a
    request before sending it), as the openai SDK's ``APIStatusError``: the base of the
    classes by status below."""

    # Its own, not APIConnectionError's: an error that is both (BadGatewayError) retries as
    # its status and ``x-should-retry`` say.
    retryable = APIError.retryable


class BadRequestError(APIStatusError):
    status_code = 400


class AuthenticationError(APIStatusError):
    status_code = 401


class PermissionDeniedError(APIStatusError):
    status_code = 403


class NotFoundError(APIStatusError):
    status_code = 404


class ConflictError(APIStatusError):
    status_code = 409


class RequestEntityTooLargeError(APIStatusError):
    status_code = 413


class UnprocessableEntityError(APIStatusError):
    status_code = 422


class RateLimitError(APIStatusError):
    """429. ``retry_after`` is the server's requested wait in seconds, when it gave one."""

    status_code = 429

    def __init__(self, message: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        self.retry_after: float | None = retry_after_seconds(self.headers)


class ServerError(APIStatusError):
    """5xx, and overloads such as Anthropic's 529 (``InternalServerError``, the openai
    SDK's name, is this class)."""

    status_code = 500


class ServiceUnavailableError(ServerError):
    status_code = 503


class StreamError(APIError):
    """The upstream sent an error event in a stream, or broke the stream's framing (an
    ``APIError``, not an ``APIStatusError``, as the openai SDK raises for an error event;
    an event that says its status raises that status's class instead)."""

    @property
    def retryable(self) -> bool:
        if self.status_code is not None:
            return super().retryable
        return True


class APIConnectionError(APIError):
    """The request never got an answer: refused, reset, cut mid-stream, DNS … An
    ``APIError`` without a status (``status_code`` None), as in the openai SDK."""

    _default_type = "api_connection_error"

    @property
    def retryable(self) -> bool:
        return True


class APITimeoutError(APIConnectionError):
    """No byte came within the timeout (before the answer, or between two stream events)."""

    _default_type = "timeout_error"


class BadGatewayError(ServerError, APIConnectionError):
    """A 502 from a gateway that could not reach the provider (``type:
    api_connection_error``, a Lunar gateway's answer or a stream's error event): what remote
    mode raises where direct mode raises ``APIConnectionError``, and an instance of both."""

    status_code = 502


class GatewayTimeoutError(ServerError, APITimeoutError):
    """A 504: the provider, or the gateway before it, timed out. Also an
    ``APITimeoutError``, as direct mode raises for the same timeout."""

    status_code = 504


class ClientClosedError(LunarError, RuntimeError):
    """The client was closed (``close()``, the end of its ``with`` block), or the
    ``http_client`` it was given was: raised at once, before any attempt, by ``Lunar`` and
    ``AsyncLunar`` alike. Also a ``RuntimeError``, as httpx raises for a closed client."""


# The names WIRE-FORMATS.md documents; they shadow the builtins only where imported.
ConnectionError = APIConnectionError
TimeoutError = APITimeoutError
# The openai SDK's name for the same class, so its users' ``except`` clauses port as they
# are: its ``InternalServerError`` is any 5xx.
InternalServerError = ServerError

_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: RequestEntityTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}

_DEFAULT_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
    529: "overloaded_error",
}

# Beyond this, a server-given delay is not worth waiting for: give up (or fall back) instead.
MAX_RETRY_AFTER_SECONDS = 60.0


#: What a wait longer than any is read as ("inf", "1e999"): a year, a number all can use.
LONGEST_RETRY_AFTER = 365 * 86400.0


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a server asks for: ``retry-after-ms`` first, then ``retry-after`` (seconds or
    an HTTP date). ``None`` when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if value >= 0:  # (NaN is not)
                return min(value, LONGEST_RETRY_AFTER)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        value = float(ra)
        return min(value, LONGEST_RETRY_AFTER) if value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_class_for(status: int, etype: str | None = None) -> type[APIStatusError]:
    if etype == "api_connection_error" and status == 502:
        return BadGatewayError  # a gateway that could not reach the provider
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls
    if status >= 500:
        return ServerError
    return APIStatusError


def error_from_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes | str | Any,
    provider: str | None = None,
    relayed: bool = False,
) -> APIStatusError:
    """Map an HTTP error answer (any provider's JSON shape, or text) to the right exception.
    ``relayed``: the answer of a Lunar gateway, whose message already says which provider
    failed (or that the gateway refused): kept as it is, so it reads as in direct mode."""
    parsed: Any = body
    if isinstance(body, (bytes, str)):
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    message, etype, param, code = _describe(parsed)
    if not message:
        message = f"HTTP {status} from {provider or 'upstream'}"
    elif provider and not relayed:
        message = f"{message} (provider: {provider})"
    cls = error_class_for(status, etype)
    err = cls(
        message,
        status,
        parsed,
        headers=headers,
        param=param,
        code=None if code is None else str(code),
        type=etype,
        provider=provider,
    )
    if relayed and isinstance(parsed, dict) and "attempts" in parsed:
        err.attempts = relayed_attempts(parsed["attempts"])
    return err


def relayed_attempts(items: Any) -> list[Attempt]:
    """The attempts a Lunar gateway reports beside its error (``"attempts"``: model,
    provider, ``status`` and the error's fields, for each upstream try, retries and
    fallbacks included) as ``Attempt``s holding the error each would have raised alone:
    what ``e.attempts`` shows in direct mode. Entries of another shape are left out."""
    out: list[Attempt] = []
    if not isinstance(items, list):
        return out
    for item in items:
        if not isinstance(item, dict):
            continue
        model, provider, status = item.get("model"), item.get("provider"), item.get("status")
        if not (isinstance(model, str) and isinstance(provider, str)):
            continue
        message, etype, param, code = _describe(item)
        if not (isinstance(status, int) and 400 <= status < 600):
            status = _STATUS_BY_TYPE.get(etype or "", 502)
        error = error_class_for(status, etype)(
            message or f"HTTP {status} from {provider}",
            status,
            item,
            param=param if isinstance(param, str) else None,
            code=None if code is None else str(code),
            type=etype if isinstance(etype, str) else None,
            provider=provider,
        )
        out.append(Attempt(model, provider, error))
    return out


def _describe(parsed: Any) -> tuple[str, str | None, str | None, Any]:
    """message, type, param, code from the common error shapes:
    OpenAI ``{"error": {...}}``, Anthropic ``{"type": "error", "error": {...}}``,
    Gemini ``{"error": {"code", "message", "status"}}``, or ``{"detail": ...}``."""
    if isinstance(parsed, str):
        return parsed.strip()[:500], None, None, None
    if not isinstance(parsed, dict):
        return "", None, None, None
    err = parsed.get("error", parsed)
    if isinstance(err, str):
        return err, None, None, None
    if not isinstance(err, dict):
        return "", None, None, None
    message = err.get("message") or err.get("detail") or ""
    if not isinstance(message, str):
        message = json.dumps(message)
    etype = err.get("type") or err.get("status")
    if not isinstance(etype, str):  # a type of another shape: none (it is a lookup key)
        etype = None
    return message, etype, err.get("param"), err.get("code")


# Error ``type`` strings seen in streamed error events, mapped to the status they stand for.
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "api_connection_error": 502,
    "api_error": 500,
    "server_error": 500,
    "service_unavailable": 503,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def error_from_stream_event(
    err: Any,
    provider: str | None = None,
    relayed: bool = False,
    status: Any = None,
    attempts: Any = None,
) -> APIError:
    """An error that arrived as a stream event instead of a chunk. Its ``type`` (or numeric
    ``code``) picks the class, so ``except RateLimitError`` works mid-stream too.
    ``relayed``: a Lunar gateway's event, whose message is already the whole story, whose
    ``status`` (the answer the gateway would have given) picks the class first, and whose
    ``attempts`` (the upstream tries it made) become the error's."""
    message, etype, param, code = _describe({"error": err} if not isinstance(err, dict) else err)
    if not (isinstance(status, int) and 400 <= status < 600):
        status = _STATUS_BY_TYPE.get(etype or "")
    if status is None and isinstance(code, int) and 400 <= code < 600:
        status = code
    if relayed and message:
        text = message
    else:
        text = f"Error event in the stream: {message or 'no message'}"
        if provider:
            text += f" (provider: {provider})"
    cls: type[APIError] = error_class_for(status, etype) if status else StreamError
    error = cls(
        text,
        status,
        err,
        param=param,
        code=None if code is None else str(code),
        type=etype,
        provider=provider,
    )
    if relayed and attempts is not None:
        error.attempts = relayed_attempts(attempts)
    return error
