from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from lunar._http import AsyncPool
from lunar.testing import MockServer

PROVIDER_ENV = [
    f"{p}_{suffix}"
    for p in (
        "OPENAI",
        "ANTHROPIC",
        "GEMINI",
        "GOOGLE",
        "GROQ",
        "TOGETHER",
        "FIREWORKS",
        "DEEPSEEK",
        "MISTRAL",
        "OPENROUTER",
        "OLLAMA",
        "VLLM",
    )
    for suffix in ("API_KEY", "BASE_URL")
] + ["LUNAR_API_KEY", "LUNAR_JWT", "LUNAR_BASE_URL", "LUNAR_CATALOG", "LUNAR_DEFAULT_MODEL"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's real keys, and none can reach a real provider."""
    for name in PROVIDER_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def _server() -> Iterator[MockServer]:
    with MockServer() as server:
        yield server


@pytest.fixture
def mock(_server: MockServer, monkeypatch: pytest.MonkeyPatch) -> MockServer:
    """The OpenAI-wire emulator on 127.0.0.1, standing in for OpenAI, Groq, Together and
    Fireworks at once (faults are scripted per model id)."""
    _server.reset()
    for p in ("OPENAI", "GROQ", "TOGETHER", "FIREWORKS"):
        monkeypatch.setenv(f"{p}_API_KEY", f"sk-{p.lower()}")
        monkeypatch.setenv(f"{p}_BASE_URL", _server.base_url)
    return _server


def busy_connections(client: object) -> int:
    """Connections of the client's pool still busy with a request (not idle, not closed):
    Lunar's own pool (AsyncLunar's default) or httpx's."""
    http = client._http  # type: ignore[attr-defined]
    if isinstance(http, AsyncPool):
        return http.busy_connections
    pool = http._transport._pool
    return sum(1 for c in pool.connections if not (c.is_idle() or c.is_closed()))


os.environ.setdefault("LUNAR_TEST", "1")
