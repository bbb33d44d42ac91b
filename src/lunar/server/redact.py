"""What a virtual key's client is told of a failure upstream, and what the log keeps.

A provider's or the engine's error message is for the gateway's operator: it may name an
internal base URL (``Connection to provider 'x' at http://10.0.0.5:8000/v1 failed``), the
environment variable a key is read from (``No API key for provider 'x': set X_API_KEY``), or
quote a fragment of the gateway's own key (an upstream 401's ``Incorrect API key provided:
sk-abc***xyz``). A client holding a virtual key gets, for such an error, a sentence that says
what failed and where (the provider's name) and keeps the status, ``type``, ``code``,
``param`` and the attempts' list; the full text goes to the log, secrets scrubbed. The
gateway's own refusals (a bad field, a model the key may not use, a limit) are about the
client's request and are told as they are. Only error answers pay for any of this.

An upstream that refuses the gateway's own credentials (401, 403, 407), or a provider the
gateway has no key for, is not the client's key at fault: a virtual key gets a ``502`` with
``code`` ``upstream_auth_error`` (and ``x-should-retry: false``: a retry meets the same key),
never a ``401``/``403`` that its SDK would read as its own key refused.
"""

from __future__ import annotations

import copy
import re

from .._errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    Attempt,
    LunarError,
    ServerError,
)

#: Codes of the engine's errors that say how the gateway is set up, not what the request did.
_SETUP_CODES = frozenset(
    {"missing_api_key", "provider_not_configured", "local_model_missing", "local_runtime_missing"}
)
#: Codes of the engine's errors about the request itself: told as they are.
_REQUEST_CODES = frozenset({"deadline_exceeded"})
#: Upstream statuses about the client's own request: its message helps the client (scrubbed).
_REQUEST_STATUSES = frozenset({400, 404, 409, 413, 422})
#: Upstream statuses about the gateway's credentials (its key refused or forbidden).
_AUTH_STATUSES = frozenset({401, 403, 407})
#: What a virtual key is told for those: the gateway's credentials, not its own key.
UPSTREAM_AUTH_ERROR = "upstream_auth_error"

_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
# Key-like tokens: the usual prefixes, a masked fragment (`sk-abc***xyz`), a long random run.
_SECRET = re.compile(
    r"\b(?:sk|rk|pk|gsk|xai|lk|key)[-_][A-Za-z0-9*._-]{4,}"
    r"|\bAIza[A-Za-z0-9_-]{10,}"
    r"|[^\s'\"]*\*{3,}[^\s'\"]*"
    r"|\b[A-Za-z0-9_-]{32,}"
)
#: What the log keeps of one message, and of how many attempts.
_LOGGED_CHARS = 500
_LOGGED_ATTEMPTS = 10


def scrub_secrets(text: str) -> str:
    """``text`` with key-like tokens replaced by ``<redacted>``."""
    return _SECRET.sub("<redacted>", text)


def scrub(text: str) -> str:
    """``text`` with key-like tokens and URLs (hosts the client need not know) replaced."""
    return _URL.sub("<url>", scrub_secrets(text))


def public_error(err: LunarError) -> LunarError:
    """``err`` as a virtual key's client sees it: ``err`` itself when nothing in it is the
    operator's, else a copy of the same class, status, type, code, param and headers with a
    generic message (and its attempts so too)."""
    attempts = [Attempt(a.model, a.provider, _public(a.error, a.provider)) for a in err.attempts]
    provider = err.attempts[-1].provider if err.attempts else getattr(err, "provider", None)
    shown = _public(err, provider)
    changed = any(a.error is not b.error for a, b in zip(attempts, err.attempts))
    if shown is err and not changed:
        return err
    if shown is err:
        shown = copy.copy(err)
    shown.attempts = attempts
    return shown


def _public(err: LunarError, provider: str | None) -> LunarError:
    """One error (attempts aside) as a virtual key's client sees it."""
    name = f"provider '{provider}'" if provider else "the upstream"
    if not isinstance(err, APIError):
        return _told(err, f"The request to {name} failed")
    status = err.status_code
    if err.code in _REQUEST_CODES:
        return err
    if isinstance(err, APIConnectionError):
        if isinstance(err, APITimeoutError):
            return _told(err, f"Timed out waiting for {name}")
        return _told(err, f"Could not connect to {name}")
    if err.code in _SETUP_CODES:
        told = _told(err, f"{name[0].upper()}{name[1:]} is not available on this gateway")
        return _upstream_auth(told) if status in _AUTH_STATUSES else told  # no key set
    if status is None:  # a broken answer, an error event, a local model that cannot run
        return _told(err, f"{name[0].upper()}{name[1:]} failed to answer")
    if err.response_body is None and (err.provider is None or status < 500):
        return err  # the gateway's or the engine's own check of the request
    if status in _REQUEST_STATUSES:
        text = scrub(err.message)
        return err if text == err.message else _told(err, text)
    if status in _AUTH_STATUSES:
        return _upstream_auth(
            _told(err, f"{name[0].upper()}{name[1:]} refused the gateway's credentials")
        )
    if status == 429:
        return _told(err, f"{name[0].upper()}{name[1:]} is rate limiting this gateway")
    return _told(err, f"{name[0].upper()}{name[1:]} failed (HTTP {status})")


def _told(err: LunarError, sentence: str) -> LunarError:
    """A copy of ``err`` saying ``sentence`` (and that the log has the rest), without the
    upstream's body."""
    message = f"{sentence} (details are in the gateway's log)"
    out = copy.copy(err)
    out.message = message
    status = getattr(err, "status_code", None)
    out.args = (f"[{status}] {message}" if status is not None else message,)
    if isinstance(out, APIError):
        out.response_body = None
    out.attempts = []
    return out


def _upstream_auth(told: LunarError) -> ServerError:
    """``told`` (about the gateway's credentials) as a ``502 upstream_auth_error`` that
    says not to retry: a ``401``/``403`` would read as the client's own key refused."""
    return ServerError(
        told.message,
        502,
        headers={"x-should-retry": "false"},
        code=UPSTREAM_AUTH_ERROR,
        provider=getattr(told, "provider", None),
    )


def log_detail(err: LunarError) -> str:
    """``err`` and its attempts as the log keeps them: in full, secrets scrubbed, each
    message cut at ``_LOGGED_CHARS`` characters."""
    parts = [scrub_secrets(str(err)[:_LOGGED_CHARS])]
    for a in err.attempts[:_LOGGED_ATTEMPTS]:
        parts.append(f"{a.model} via {a.provider}: {scrub_secrets(str(a.error)[:_LOGGED_CHARS])}")
    if len(err.attempts) > _LOGGED_ATTEMPTS:
        parts.append(f"... {len(err.attempts) - _LOGGED_ATTEMPTS} more attempts")
    return "; ".join(parts)
