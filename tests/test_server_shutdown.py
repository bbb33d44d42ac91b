"""Graceful shutdown: SIGTERM in the middle of a load. In-flight requests finish, and every
request the gateway acknowledged (a complete answer) has its row in the ledger."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sqlite3
import threading
import time

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


def test_requests_outliving_the_graceful_timeout_are_told_so_and_recorded_as_told(
    upstream, tmp_path
):
    """Past the graceful timeout the server cancels what still runs. A whole answer not sent
    yet is a 503 (JSON, with its request id), a stream ends on an error event and its end,
    and each row says what its client got."""
    config = CONFIG.replace("graceful_timeout_seconds = 10", "graceful_timeout_seconds = 1")
    gw = GatewayProcess(tmp_path, upstream, config)
    key, key_id = gw.new_key()
    upstream.enqueue(Reply(chunks=2000, pacing=0.02), model="gpt-4o-mini")  # a 40-second stream
    upstream.enqueue(Reply(delay=40), model="gpt-4o")
    got_first = threading.Event()
    headers = {"x-api-key": key}

    def stream() -> list[str]:
        events = []
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    got_first.set()
        return events

    def whole() -> httpx.Response:
        body = {"model": "gpt-4o", "messages": MESSAGES}
        return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streamed, answered = pool.submit(stream), pool.submit(whole)
        assert got_first.wait(30)
        while len(upstream.requests) < 2:
            time.sleep(0.01)
        gw.proc.send_signal(signal.SIGTERM)
        code = gw.proc.wait(60)
        events, r = streamed.result(), answered.result()
    logs = gw.logs()
    gw.stop()
    assert code in (0, -signal.SIGTERM), logs
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "shutting_down" and r.headers["x-request-id"]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert 2 < len(events) < 2000
    with sqlite3.connect(gw.db) as db:
        rows = db.execute(
            "SELECT model, status, error_type, http_status, completion_tokens FROM usage"
            " WHERE key_id = ? ORDER BY model",
            (key_id,),
        ).fetchall()
    assert [row[:4] for row in rows] == [
        ("gpt-4o", "error", "shutting_down", 503),
        ("gpt-4o-mini", "error", "shutting_down", 200),
    ]
    assert rows[1][4] > 0  # the stream's tokens so far are billed
