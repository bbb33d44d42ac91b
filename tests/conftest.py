from __future__ import annotations

import contextlib
import gc
import inspect
import json
import os
import select
import signal
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import lunar
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


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockServer]:
    """The emulator behind a module's gateway process (``test_server.GatewayProcess``)."""
    with MockServer() as server:
        yield server


@pytest.fixture(scope="module")
def gw(upstream: MockServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A module's gateway process (``test_server.GatewayProcess``) in front of ``upstream``
    on every wire: OpenAI and its kin, Anthropic, Gemini. A module that needs another
    configuration defines its own."""
    from .test_server import GatewayProcess, every_wire

    proc = GatewayProcess(tmp_path_factory.mktemp("gateway"), upstream, **every_wire(upstream))
    yield proc
    proc.stop()


@pytest.fixture
def fresh_upstream(upstream: MockServer) -> None:
    """``upstream`` with no script or recorded request left by the module's tests before
    (``pytestmark = pytest.mark.usefixtures("fresh_upstream")``)."""
    upstream.reset()


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


def lunar_own(o: Any) -> bool:
    """An object of Lunar's own: one of its errors, plans, traces, watches, upstream
    connections, or a frame of its code (not the emulator's)."""
    from lunar._engine import Plan, StreamFinisher, Trace
    from lunar._errors import Attempt, LunarError
    from lunar._http import _Connection
    from lunar.server.app import _Watch

    if isinstance(o, (LunarError, Attempt, Plan, StreamFinisher, Trace, _Watch, _Connection)):
        return True
    if not inspect.isframe(o):
        return False
    name = o.f_code.co_filename
    return name.startswith(LUNAR_DIR) and not name.startswith(EMULATOR_DIR)


# Lunar's own code by where it is, whatever the checkout's directory is called.
LUNAR_DIR = os.path.dirname(lunar.__file__) + os.sep
EMULATOR_DIR = os.path.join(LUNAR_DIR, "testing") + os.sep


@contextlib.contextmanager
def cyclic_garbage(only_lunar: bool = True) -> Iterator[list[Any]]:
    """What the block leaves of Lunar's own that only the cyclic GC can free (its errors,
    plans, traces, watches, upstream connections, and frames of its code), filled in when
    the block ends.
    Reference counting frees the rest; a cycle would wait for a collection, and under
    load those pause the event loop. Async code: let callbacks run before the block ends.
    ``only_lunar=False``: all of it, the process's."""
    enabled, kept = gc.isenabled(), list(gc.garbage)
    found: list[Any] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept, to be looked at
    try:
        yield found
        gc.collect()
        # Only Lunar's own: the emulator's thread and the test's clients run meanwhile.
        found.extend(o for o in gc.garbage if lunar_own(o) or not only_lunar)
    finally:
        gc.set_debug(0)
        gc.garbage[:] = kept
        if enabled:
            gc.enable()


# The gateway's database as Lunar created it before the ledger had a cache_write_tokens
# column (its schema then, verbatim): an older gateway's file must keep working.
OLD_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL,
    rpm INTEGER,
    tpm INTEGER,
    budget_usd REAL,
    models TEXT
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT,
    served_model TEXT,
    provider TEXT,
    attempts INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    status TEXT NOT NULL,
    http_status INTEGER NOT NULL,
    error_type TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    input_cost_usd REAL NOT NULL,
    cached_input_cost_usd REAL NOT NULL,
    output_cost_usd REAL NOT NULL,
    total_cost_usd REAL NOT NULL,
    ttft_ms REAL,
    latency_ms REAL
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_id, ts);
"""

#: The row of an older gateway's ledger: a Claude request that read 300 tokens from a cache.
OLD_LEDGER_ROW = {
    "ts": 1000.0,
    "request_id": "old-1",
    "key_id": "old-key",
    "route": "chat",
    "model": "claude-3-haiku",
    "served_model": "claude-3-haiku",
    "provider": "anthropic",
    "attempts": 1,
    "stream": 0,
    "status": "ok",
    "http_status": 200,
    "error_type": None,
    "prompt_tokens": 1000,
    "completion_tokens": 10,
    "cached_tokens": 300,
    "input_cost_usd": 0.000175,
    "cached_input_cost_usd": 0.000009,
    "output_cost_usd": 0.0000125,
    "total_cost_usd": 0.0001965,
    "ttft_ms": 12.0,
    "latency_ms": 40.0,
}


def old_ledger(path: Any) -> None:
    """A ledger file as an older gateway left it: the old schema, one key, one row."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_LEDGER_SCHEMA)
        db.execute(
            "INSERT INTO keys (id, name, key_hash, hint, created_at) VALUES (?, ?, ?, ?, ?)",
            ("old-key", "old-team", "0" * 64, "lk-…old", 900.0),
        )
        columns = ", ".join(OLD_LEDGER_ROW)
        marks = ", ".join("?" for _ in OLD_LEDGER_ROW)
        db.execute(f"INSERT INTO usage ({columns}) VALUES ({marks})", list(OLD_LEDGER_ROW.values()))
        db.commit()


#: A forked child that takes longer than this is stuck: it ends, and its test fails.
CHILD_SECONDS = 30


def _hung(signum: int, frame: Any) -> None:
    raise TimeoutError(f"the forked child was stuck for {CHILD_SECONDS} s")


class Forked:
    """A forked child (``os.fork``) running ``work()``: its result (JSON) comes back
    through a pipe, and ``result()`` fails the test if the child failed or hung."""

    def __init__(self, work: Callable[[], Any]) -> None:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: whatever happens, it ends here, by os._exit
            code = 1
            try:
                signal.signal(signal.SIGALRM, _hung)  # a hang ends the child, not the suite
                signal.alarm(CHILD_SECONDS)
                os.close(read)
                try:
                    payload = {"result": work()}
                    code = 0
                except BaseException:
                    payload = {"error": traceback.format_exc()}
                os.write(write, json.dumps(payload).encode())
            finally:
                os._exit(code)
        os.close(write)
        self.pid, self._read = pid, read

    def result(self) -> Any:
        """The child's result; fails the test if it failed, or was not done in time."""
        data = b""
        deadline = time.monotonic() + CHILD_SECONDS + 5
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._read], [], [], left)[0]:
                    os.kill(self.pid, signal.SIGKILL)
                    pytest.fail("the forked child did not finish")
                more = os.read(self._read, 65536)
                if not more:
                    break
                data += more
        finally:
            os.close(self._read)
            _, status = os.waitpid(self.pid, 0)
        answer = json.loads(data) if data else {"error": f"no answer (wait status {status})"}
        assert "error" not in answer, answer["error"]
        assert os.waitstatus_to_exitcode(status) == 0
        return answer["result"]
