"""The gateway from the side of an operator who hands virtual keys to clients it does not
trust: what a client can make the gateway do on its host, send upstream, or tell back.
A real `lunar serve` process, real HTTP, the emulator as every provider, which shows what
the upstream received."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lunar.testing import MockServer

from .test_server import CONFIG, GatewayProcess, every_wire

pytest.importorskip("uvicorn")

HI = [{"role": "user", "content": "Hi"}]

SECURITY_CONFIG = (
    CONFIG
    + """
[local.models]
house = "/nonexistent/house.gguf"
"""
)


@pytest.fixture(scope="module")
def gw(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(
        tmp_path_factory.mktemp("gateway"), upstream, SECURITY_CONFIG, **every_wire(upstream)
    )
    yield proc
    proc.stop()


@pytest.fixture(autouse=True)
def _fresh(upstream: MockServer) -> None:
    upstream.reset()


@pytest.fixture
def key(gw: GatewayProcess) -> str:
    return gw.new_key("untrusted")[0]


def chat(gw: GatewayProcess, key: str, path: str = "/v1/chat/completions", **body: Any) -> Any:
    payload = {"model": "gpt-4o-mini", "messages": HI, **body}
    return gw.http.post(path, json=payload, headers={"x-api-key": key})


def _error(r: httpx.Response) -> dict[str, Any]:
    return r.json()["error"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# Files on the gateway's host


def test_a_client_cannot_make_the_gateway_open_a_file_as_a_local_model(gw, key, tmp_path):
    """``local/<path>`` is a GGUF path in direct mode; through the gateway any client could
    have the gateway load any file on its host (into memory) and tell from the answer
    whether it exists. Both are refused alike, before anything is opened."""
    existing = tmp_path / "secret.txt"
    existing.write_text("not a model")
    answers = []
    for path in (str(existing), str(tmp_path / "missing.gguf"), "~/.bashrc"):
        r = chat(gw, key, model=f"local/{path}")
        assert r.status_code == 404, r.text
        err = _error(r)
        assert (err["code"], err["param"]) == ("model_not_found", "model")
        answers.append(err["message"].replace(path, "PATH"))
        assert "attempts" not in r.json()  # nothing was tried
    assert len(set(answers)) == 1  # an existing file and a missing one: the same answer
    # ... nor as a fallback, nor under provider= (the same name, forced).
    r = chat(gw, key, fallbacks=[f"local/{existing}"])
    assert r.status_code == 404 and _error(r)["param"] == "fallbacks[0]", r.text
    r = chat(gw, key, model=f"local/{existing}", provider="local")
    assert r.status_code == 404 and _error(r)["code"] == "model_not_found", r.text
    r = chat(gw, key, path="/v1/messages", model=f"local/{existing}", max_tokens=5)
    assert r.status_code == 404, r.text


def test_a_local_model_the_config_names_is_still_served(gw, key):
    """The names [local.models] gives (and their file's id) reach the local runtime: here
    its own 'file not found', since the configured file does not exist in the test."""
    for model in ("house", "local//nonexistent/house.gguf"):
        r = chat(gw, key, model=model)
        assert r.status_code in (404, 502), r.text
        assert "/nonexistent/house.gguf" in _error(r)["message"], r.text
