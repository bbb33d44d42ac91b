"""Graceful shutdown: SIGTERM in the middle of a load. In-flight requests finish, and every
request the gateway acknowledged (a complete answer) has its row in the ledger."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sqlite3
import threading

import httpx
import pytest

from lunar.testing import MockServer, Reply

from .test_server import CONFIG, MESSAGES, GatewayProcess

pytest.importorskip("uvicorn")


@pytest.fixture
def upstream():
    with MockServer() as server:
        yield server


def test_sigterm_mid_load_loses_nothing_acknowledged(upstream, tmp_path):
    gw = GatewayProcess(tmp_path, upstream)
    key, key_id = gw.new_key()
    upstream.default = Reply(chunks=15, pacing=0.02, delay=0.05)
    in_flight = 12
    first_chunks = threading.Semaphore(0)
    stop = threading.Event()
    client = httpx.Client(base_url=gw.url, timeout=30, limits=httpx.Limits(max_connections=64))
    headers = {"x-api-key": key}

    def stream_one() -> tuple[str, str | None]:
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
        try:
            with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                rid = r.headers.get("x-request-id")
                last = None
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        if last is None:
                            first_chunks.release()
                        last = line[6:]
            return ("acked" if last == "[DONE]" else "partial"), rid
        except httpx.HTTPError:
            return "failed", None

    def complete_one() -> tuple[str, str | None]:
        try:
            r = client.post(
                "/v1/chat/completions",
                headers=headers,
                json={"model": "gpt-4o-mini", "messages": MESSAGES},
            )
        except httpx.HTTPError:
            return "failed", None
        if r.status_code == 200 and json.loads(r.content)["choices"]:
            return "acked", r.headers["x-request-id"]
        return "refused", None

    def keep_going() -> list[tuple[str, str | None]]:
        out = []
        while not stop.is_set():
            out.append(complete_one())
        return out

    with concurrent.futures.ThreadPoolExecutor(in_flight + 2) as pool:
        streams = [pool.submit(stream_one) for _ in range(in_flight)]
        loaders = [pool.submit(keep_going) for _ in range(2)]
        for _ in range(in_flight):
            assert first_chunks.acquire(timeout=30)
        gw.proc.send_signal(signal.SIGTERM)
        code = gw.proc.wait(60)
        stop.set()
        outcomes = [f.result() for f in streams]
        for f in loaders:
            outcomes += f.result()
    client.close()
    logs = gw.logs()
    gw.stop()
    assert code in (0, -signal.SIGTERM), logs

    # Every stream that was in flight when SIGTERM came was allowed to finish.
    assert [o for o, _ in outcomes[:in_flight]] == ["acked"] * in_flight
    acked = {rid for o, rid in outcomes if o == "acked"}
    with sqlite3.connect(gw.db) as db:
        rows = dict(
            db.execute(
                "SELECT request_id, status FROM usage WHERE key_id = ?", (key_id,)
            ).fetchall()
        )
    assert acked <= set(rows), f"acknowledged but missing: {acked - set(rows)}"
    assert all(rows[rid] == "ok" for rid in acked)
    assert len(rows) >= len(acked) >= in_flight


def test_requests_outliving_the_graceful_timeout_are_recorded_as_cancelled(upstream, tmp_path):
    config = CONFIG.replace("graceful_timeout_seconds = 10", "graceful_timeout_seconds = 1")
    gw = GatewayProcess(tmp_path, upstream, config)
    key, key_id = gw.new_key()
    upstream.default = Reply(chunks=2000, pacing=0.02)  # a 40-second stream
    got_first = threading.Event()

    def stream() -> int:
        seen = 0
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
        try:
            with httpx.stream(
                "POST",
                gw.url + "/v1/chat/completions",
                json=body,
                headers={"x-api-key": key},
                timeout=30,
            ) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        got_first.set()
        except httpx.HTTPError:
            pass
        return seen

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream)
        assert got_first.wait(30)
        gw.proc.send_signal(signal.SIGTERM)
        code = gw.proc.wait(60)
        seen = future.result()
    logs = gw.logs()
    gw.stop()
    assert code in (0, -signal.SIGTERM), logs
    assert 0 < seen < 2000
    with sqlite3.connect(gw.db) as db:
        [(status, error_type, tokens)] = db.execute(
            "SELECT status, error_type, completion_tokens FROM usage WHERE key_id = ?", (key_id,)
        ).fetchall()
    assert (status, error_type) == ("cancelled", "cancelled")
    assert tokens > 0
