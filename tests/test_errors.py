"""One mapping from (status, headers, body) to a typed, honest exception."""

from __future__ import annotations

import email.utils

import pytest

from lunar import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    GatewayTimeoutError,
    LunarError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from lunar import ConnectionError as LunarConnectionError
from lunar import TimeoutError as LunarTimeoutError
from lunar._errors import error_from_response, error_from_stream_event, retry_after_seconds

OPENAI_BODY = (
    b'{"error": {"message": "Rate limit exceeded", "type": "rate_limit_error", '
    b'"param": null, "code": "rate_limit_exceeded"}}'
)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, ServerError),
        (502, ServerError),
        (503, ServiceUnavailableError),
        (504, GatewayTimeoutError),
        (529, ServerError),
        (418, APIStatusError),
    ],
)
def test_status_maps_to_class(status, cls):
    err = error_from_response(status, {}, b"")
    assert type(err) is cls
    assert err.status_code == status
    assert isinstance(err, LunarError)


def test_str_reads_status_then_message():
    err = error_from_response(429, {"retry-after": "2"}, OPENAI_BODY)
    assert str(err) == "[429] Rate limit exceeded"
    assert err.type == "rate_limit_error"
    assert err.code == "rate_limit_exceeded"
    assert err.response_body["error"]["message"] == "Rate limit exceeded"


def test_service_unavailable_is_a_server_error():
    assert issubclass(ServiceUnavailableError, ServerError)
    assert issubclass(GatewayTimeoutError, ServerError)


def test_retry_after_ms_wins_over_retry_after():
    err = error_from_response(429, {"retry-after-ms": "1500", "retry-after": "9"}, OPENAI_BODY)
    assert err.retry_after == 1.5


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "inf"}, 365 * 86400.0),
        ({"retry-after": "1e999"}, 365 * 86400.0),
        ({"retry-after-ms": "inf"}, 365 * 86400.0),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "nan", "retry-after": "2"}, 2.0),
    ],
)
def test_a_retry_after_beyond_any_number_is_a_year(headers, expected):
    """Infinity made the gateway's Retry-After (a whole number of seconds) fail: a 500
    instead of the upstream's 429."""
    assert retry_after_seconds(headers) == expected


def test_retry_after_seconds_and_http_date():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 20, usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now) == pytest.approx(20, abs=1)
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_anthropic_and_gemini_error_shapes():
    anthropic = b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
    err = error_from_response(529, {}, anthropic, "anthropic")
    assert isinstance(err, ServerError)
    assert str(err) == "[529] Overloaded (provider: anthropic)"
    gemini = b'{"error": {"code": 400, "message": "Bad key", "status": "INVALID_ARGUMENT"}}'
    err = error_from_response(400, {}, gemini, "gemini")
    assert isinstance(err, BadRequestError)
    assert err.type == "INVALID_ARGUMENT"


def test_non_json_body_keeps_text():
    err = error_from_response(502, {}, b"<html>Bad Gateway</html>")
    assert "Bad Gateway" in str(err)


def test_should_retry_header_overrides():
    assert not error_from_response(500, {"x-should-retry": "false"}, b"").retryable
    assert error_from_response(400, {"x-should-retry": "true"}, b"").retryable
    assert error_from_response(503, {}, b"").retryable
    assert not error_from_response(401, {}, b"").retryable


def test_stream_error_event_is_typed():
    err = error_from_stream_event({"type": "rate_limit_error", "message": "slow down"}, "openai")
    assert isinstance(err, RateLimitError)
    err = error_from_stream_event({"type": "overloaded_error", "message": "busy"}, "anthropic")
    assert isinstance(err, ServerError)


def test_documented_connection_names():
    assert LunarConnectionError is APIConnectionError
    assert issubclass(LunarTimeoutError, APIConnectionError)
    assert APIConnectionError("x").retryable


def test_openai_error_json_shape():
    err = BadRequestError("'messages' must not be empty", param="messages")
    assert err.to_openai_dict() == {
        "error": {
            "message": "'messages' must not be empty",
            "type": "invalid_request_error",
            "param": "messages",
            "code": None,
        }
    }


def test_an_error_copied_or_pickled_reads_the_same():
    """``copy.copy`` and pickle (a worker process handing its exception back) rebuilt an
    error by calling its class with ``str(err)``, whose ``[429] `` prefix the constructor
    added again: ``[429] [429] Rate limit exceeded``."""
    import copy
    import pickle

    from lunar import APITimeoutError, BadGatewayError, StreamError

    errors = [
        error_from_response(429, {"retry-after": "2"}, OPENAI_BODY, "openai"),
        error_from_stream_event({"type": "api_connection_error", "message": "down"}),
        BadGatewayError("unreachable"),
        StreamError("malformed", provider="groq"),
        APITimeoutError("slow"),
        LunarError("plain"),
    ]
    errors[0].attempts = []
    for err in errors:
        for again in (copy.copy(err), pickle.loads(pickle.dumps(err))):
            assert type(again) is type(err)
            assert str(again) == str(err)
            assert vars(again) == vars(err)
