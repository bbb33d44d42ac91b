"""Property-based fuzzing of the gateway from its own OpenAPI document: whatever schemathesis
sends (valid, invalid, wrong types, huge numbers, odd unicode), no answer is a 5xx."""

from __future__ import annotations

import os
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("uvicorn")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from lunar import __version__  # noqa: E402
from lunar.server.openapi import openapi_document  # noqa: E402

from .test_server import MASTER, gw  # noqa: E402, F401  (a module fixture; upstream: conftest)

schema = schemathesis.openapi.from_dict(openapi_document(__version__))


@pytest.fixture(scope="module")
def api_key(gw: Any) -> str:  # noqa: F811
    return str(gw.new_key(name="fuzz")[0])


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """``not_a_server_error``, but for the 504 a request asked for: the deadline it gave in
    ``x-lunar-timeout-ms`` (the fuzz sends 1 ms) ran out."""
    if response.status_code == 504 and "x-lunar-timeout-ms" in (case.headers or {}):
        error = response.json()["error"]  # OpenAI's shape has its code, Anthropic's not
        assert error.get("code", "deadline_exceeded") == "deadline_exceeded"
        assert "deadline" in error["message"]
        return None
    return not_a_server_error(ctx, response, case)


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("LUNAR_FUZZ_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=os.environ.get("LUNAR_FUZZ_RANDOM") is None,
)
def test_no_input_makes_the_gateway_fail(case: Any, gw: Any, api_key: str) -> None:  # noqa: F811
    token = MASTER if case.path.startswith("/admin") else api_key
    case.call_and_validate(
        base_url=gw.url,
        headers={"authorization": f"Bearer {token}"},
        checks=[no_server_error],
        timeout=30,
    )
