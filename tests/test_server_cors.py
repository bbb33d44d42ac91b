"""CORS on a real gateway: browsers' preflights on every route, and the headers every answer
(JSON, SSE, errors) carries for the origin it came from; off by default (test_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lunar.testing import MockServer, Reply

from .test_server import CONFIG, MESSAGES, GatewayProcess

pytest.importorskip("uvicorn")

APP = "https://app.example.com"
DEV = "http://localhost:5173"
EVIL = "https://evil.example"

# Every route, with the methods it takes (Access-Control-Allow-Methods, sorted).
ROUTES = [
    ("/v1/chat/completions", "POST"),
    ("/chat/completions", "POST"),
    ("/v1/completions", "POST"),
    ("/v1/messages", "POST"),
    ("/v1/messages/count_tokens", "POST"),
    ("/v1/models", "GET"),
    ("/v1/models/gpt-4o-mini", "GET"),
    ("/v1/pricing/models", "GET"),
    ("/health", "GET, HEAD"),
    ("/metrics", "GET"),
    ("/openapi.json", "GET"),
    ("/admin/keys", "GET, POST"),
    ("/admin/keys/key_123", "DELETE, GET, PATCH"),
    ("/admin/usage", "GET"),
]
# What the openai SDK sends from a browser (dangerouslyAllowBrowser), in part.
ASKED = "authorization, content-type, x-stainless-os, x-stainless-retry-count"


@pytest.fixture(scope="module")
def gw(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = (
        CONFIG
        + f'\n[cors]\nallow_origins = ["{APP}", "HTTP://LOCALHOST:5173"]\nmax_age_seconds = 300\n'
    )
    proc = GatewayProcess(tmp_path_factory.mktemp("gateway"), upstream, config)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw_any(
    upstream: MockServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Every origin, a list of headers: from the environment."""
    proc = GatewayProcess(
        tmp_path_factory.mktemp("gateway"),
        upstream,
        LUNAR_CORS_ALLOW_ORIGINS="*",
        LUNAR_CORS_ALLOW_HEADERS="X-Team, anthropic-version",
    )
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _fresh(upstream: MockServer) -> None:
    upstream.reset()


def preflight(
    gw: GatewayProcess, path: str, origin: str, method: str = "POST", asked: str | None = ASKED
) -> httpx.Response:
    headers = {"origin": origin, "access-control-request-method": method}
    if asked is not None:
        headers["access-control-request-headers"] = asked
    return gw.http.options(path, headers=headers)


def cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}


def allowed(r: httpx.Response, origin: str) -> None:
    """What every answer to an allowed origin carries."""
    assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["vary"] == "origin"
    exposed = r.headers["access-control-expose-headers"].split(", ")
    assert {"x-request-id", "retry-after", "x-should-retry"} <= set(exposed)


# ---------------------------------------------------------------------------------------------
# Preflights


@pytest.mark.parametrize(("path", "methods"), ROUTES)
def test_a_preflight_from_an_allowed_origin_gets_204_on_every_route(gw, path, methods):
    method = methods.split(", ")[-1]
    r = preflight(gw, path, APP, method)
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert cors_headers(r) == {
        "access-control-allow-origin": APP,
        "access-control-allow-methods": methods,
        "access-control-allow-headers": ASKED,  # what the browser asks for: Authorization too
        "access-control-max-age": "300",
    }
    assert r.headers["vary"] == "origin, access-control-request-headers"


def test_origins_are_matched_as_browsers_spell_them(gw):
    """The file's "HTTP://LOCALHOST:5173" is the origin a browser sends in lower case."""
    r = preflight(gw, "/v1/chat/completions", DEV)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == DEV
    # No key needed: browsers send none with a preflight, and none is asked for.
    r = preflight(gw, "/v1/models", DEV, "GET", asked=None)
    assert r.status_code == 204 and "access-control-allow-headers" not in r.headers


@pytest.mark.parametrize("origin", [EVIL, APP + ":8443", "http://app.example.com", "null"])
def test_a_preflight_from_another_origin_is_refused_saying_why(gw, origin):
    r = preflight(gw, "/v1/chat/completions", origin)
    assert r.status_code == 403
    assert cors_headers(r) == {}  # the browser blocks the call
    assert r.headers["vary"] == "origin"
    err = r.json()["error"]
    assert err["code"] == "cors_origin_not_allowed" and err["type"] == "permission_error"
    assert f"Origin '{origin}'" in err["message"] and "cors.allow_origins" in err["message"]
    # Under /v1/messages, in Anthropic's shape.
    r = preflight(gw, "/v1/messages", origin)
    assert r.status_code == 403
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "permission_error"


def test_a_preflight_for_a_method_the_route_does_not_take_gets_its_405(gw):
    r = preflight(gw, "/v1/models", APP, "DELETE")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json()["error"]["code"] == "method_not_allowed"
    assert "DELETE" in r.json()["error"]["message"]
    r = preflight(gw, "/v1/messages", APP, "GET")
    assert r.status_code == 405 and r.json()["type"] == "error"


def test_a_preflight_on_an_unknown_route_gets_its_404(gw):
    r = preflight(gw, "/v1/nothing", APP)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_route"


def test_options_that_is_no_preflight_is_a_405_as_without_cors(gw):
    for headers in ({"origin": APP}, {"access-control-request-method": "POST"}):
        r = gw.http.options("/v1/chat/completions", headers=headers)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["error"]["code"] == "method_not_allowed"


# ---------------------------------------------------------------------------------------------
# Answers


def post(gw: GatewayProcess, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return gw.http.post(path, json=body, headers=headers)


def test_answers_and_streams_carry_the_origin_and_expose_the_request_id(gw, upstream):
    key = gw.new_key()[0]
    upstream.default = Reply(chunks=3)
    chat = {"model": "gpt-4o-mini", "messages": MESSAGES}
    r = post(gw, "/v1/chat/completions", chat, origin=APP, authorization=f"Bearer {key}")
    assert r.status_code == 200 and r.json()["usage"]["total_cost_usd"] > 0
    allowed(r, APP)
    assert r.headers["x-request-id"]
    with gw.http.stream(
        "POST",
        "/v1/chat/completions",
        json={**chat, "stream": True},
        headers={"origin": DEV, "authorization": f"Bearer {key}"},
    ) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        allowed(s, DEV)
        assert s.read().endswith(b"data: [DONE]\n\n")
    messages = {"model": "gpt-4o-mini", "max_tokens": 20, "messages": MESSAGES}
    r = post(gw, "/v1/messages", {**messages, "stream": True}, origin=APP, **{"x-api-key": key})
    assert r.status_code == 200 and b"message_stop" in r.content
    allowed(r, APP)
    r = post(gw, "/v1/completions", {"model": "gpt-4o-mini", "prompt": "hi"}, origin=APP)
    assert r.status_code == 401
    allowed(r, APP)
    r = gw.http.get("/v1/models", headers={"origin": APP, "x-api-key": key})
    assert r.status_code == 200
    allowed(r, APP)
    for path in ("/health", "/v1/pricing/models", "/openapi.json", "/metrics"):
        allowed(gw.http.get(path, headers={"origin": APP}), APP)


def test_errors_carry_the_origin_and_expose_retry_after(gw, upstream):
    key, _ = gw.new_key(rpm=1)
    chat = {"model": "gpt-4o-mini", "messages": MESSAGES}
    cases = [
        ({"authorization": "Bearer nope"}, "/v1/chat/completions", chat, 401),
        ({"x-api-key": key}, "/v1/chat/completions", {"model": 5}, 400),
        ({"x-api-key": key}, "/v1/messages", {"model": "gpt-4o-mini"}, 400),
        ({"x-api-key": key}, "/v1/chat/completions", chat, 200),
        ({"x-api-key": key}, "/v1/chat/completions", chat, 429),  # the key's rpm
        ({}, "/admin/keys", {}, 401),
        ({}, "/v1/nothing", {}, 404),
    ]
    for headers, path, body, status in cases:
        r = post(gw, path, body, origin=APP, **headers)
        assert r.status_code == status, r.text
        allowed(r, APP)
        if status == 429:
            assert int(r.headers["retry-after"]) > 0
    # An upstream 5xx, and an upstream 429 with its wait.
    other = gw.new_key()[0]
    upstream.enqueue(Reply(status=503))
    r = post(gw, "/v1/chat/completions", chat, origin=APP, **{"x-api-key": other})
    assert r.status_code >= 500
    allowed(r, APP)
    upstream.enqueue(Reply.rate_limited(retry_after=7))
    r = post(gw, "/v1/chat/completions", chat, origin=APP, **{"x-api-key": other})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    allowed(r, APP)


def test_answers_to_other_origins_or_none_vary_by_origin_and_allow_nothing(gw):
    """Served as always (a browser then keeps the answer from the page), and never cached
    for another origin: ``Vary: Origin`` on each."""
    for headers in ({"origin": EVIL}, {}):
        r = gw.http.get("/v1/pricing/models", headers=headers)
        assert r.status_code == 200
        assert cors_headers(r) == {}
        assert r.headers["vary"] == "origin"


# ---------------------------------------------------------------------------------------------
# Every origin, a list of headers


def test_every_origin_gets_a_star_and_no_vary(gw_any):
    """A list of headers allows those, and always what the gateway reads: the key, the
    body's type, and a Lunar client's retry budget and deadline."""
    r = preflight(
        gw_any, "/v1/chat/completions", EVIL, asked="Authorization, X-Team, X-Lunar-Timeout-Ms"
    )
    assert r.status_code == 204
    assert cors_headers(r) == {
        "access-control-allow-origin": "*",
        "access-control-allow-methods": "POST",
        "access-control-allow-headers": "authorization, content-type, x-api-key, "
        "x-lunar-max-retries, x-lunar-timeout-ms, x-team, anthropic-version",
        "access-control-max-age": "600",
    }
    assert "vary" not in r.headers
    for headers in ({"origin": EVIL}, {}):
        r = gw_any.http.get("/health", headers=headers)
        assert r.headers["access-control-allow-origin"] == "*" and "vary" not in r.headers
        assert "x-request-id" in r.headers["access-control-expose-headers"]


def test_a_header_not_in_the_list_is_refused_naming_it(gw_any):
    r = preflight(gw_any, "/v1/messages", EVIL, asked="x-api-key, X-Stainless-OS")
    assert r.status_code == 403
    assert r.json()["type"] == "error"
    message = r.json()["error"]["message"]
    assert "'x-stainless-os'" in message and "cors.allow_headers" in message
    r = preflight(gw_any, "/v1/chat/completions", EVIL, asked="x-other")
    assert r.status_code == 403 and r.json()["error"]["code"] == "cors_header_not_allowed"
