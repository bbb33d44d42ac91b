"""The gateway's ledger and accounting in trouble and at scale: a database another process
locks, rows spilled and recovered, large ledgers, reports taken while rows are written."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lunar.server import SQLiteStorage, UsageQuery, UsageRow, create_app, load_config
from lunar.testing import MockServer

from .test_server_units import row as units_row


def row(i: int, **kw: Any) -> UsageRow:
    """``test_server_units``' ledger row, costing 0.25 unless told."""
    return units_row(i, **{"total_cost_usd": 0.25, **kw})


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another process's write transaction on the ledger (``BEGIN IMMEDIATE``: what any
    writer holds while it writes), held for the block."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
        other.execute("ROLLBACK")
    finally:
        other.close()


def ledger_ids(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [r[0] for r in db.execute("SELECT request_id FROM usage ORDER BY ts")]


def spilled_ids(path: Path) -> list[str]:
    spill = Path(str(path) + ".unwritten.jsonl")
    if not spill.exists():
        return []
    return [json.loads(line)["request_id"] for line in spill.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Spilled rows come back


def test_rows_spilled_while_the_database_was_locked_are_written_once_it_is_free(tmp_path):
    db = tmp_path / "l.db"
    st = SQLiteStorage(db, busy_timeout=0.01)
    st.open()
    try:
        with write_locked(db):
            st.record(row(1))
            st.record(row(2))
            assert st.flush(30)
            assert spilled_ids(db) == ["r1", "r2"]  # kept, not dropped
            assert st.rows_spilled == 2 and st.write_errors >= 5
        st.record(row(3))  # the next commit takes the spilled rows along
        assert st.flush(30)
        assert sorted(ledger_ids(db)) == ["r1", "r2", "r3"]
        assert spilled_ids(db) == []
        assert st.rows_recovered == 2
    finally:
        st.close()


def test_a_reopened_ledger_writes_the_rows_spilled_before_and_counts_their_spend(tmp_path):
    db = tmp_path / "l.db"
    st = SQLiteStorage(db, busy_timeout=0.01)
    st.open()
    st.record(row(1))
    assert st.flush(30)
    with write_locked(db):
        st.record(row(2))
        st.record(row(3))
        assert st.flush(30)
    st.close()  # stopped before another row came: the two are only in the spill file
    assert spilled_ids(db) == ["r2", "r3"]
    spill = Path(str(db) + ".unwritten.jsonl")
    with spill.open("a") as f:
        f.write(json.dumps({"request_id": "cut sho"}) + "\n")  # not a row: kept as it is
        f.write('{"ts": 1001.0, "request_id": "r1", "key_id": "k1", "route": "ch')

    # `lunar keys|usage --db` read the ledger as it is and leave the file to the gateway.
    reader = SQLiteStorage(db, recover=False)
    reader.open()
    assert reader.spend_by_key() == {"k1": 0.25}
    reader.close()
    assert len(spill.read_text().splitlines()) == 4

    again = SQLiteStorage(db)
    again.open()
    try:
        assert again.spend_by_key() == {"k1": 0.75}  # what a restarted gateway's budgets see
        assert ledger_ids(db) == ["r1", "r2", "r3"]
        assert again.rows_recovered == 2
        left = spill.read_text().splitlines()
        assert len(left) == 2 and "cut sho" in left[0] and left[1].endswith('"ch')
    finally:
        again.close()


def test_a_row_spilled_after_a_line_cut_short_is_not_glued_to_it(tmp_path):
    """A spill write cut short (a full disk) leaves a line without its end; the next row
    spilled starts a line of its own, so it is written back and not lost with the cut one."""
    db = tmp_path / "l.db"
    spill = Path(str(db) + ".unwritten.jsonl")
    st = SQLiteStorage(db, busy_timeout=0.01)
    st.open()
    try:
        spill.write_text('{"ts": 1001.0, "request_id": "r0", "key_id": "k1", "route": "ch')
        with write_locked(db):
            st.record(row(1))
            assert st.flush(30)
        st.record(row(2))
        assert st.flush(30)
        assert sorted(ledger_ids(db)) == ["r1", "r2"]
        assert (
            spill.read_text() == '{"ts": 1001.0, "request_id": "r0", "key_id": "k1", "route": "ch\n'
        )
    finally:
        st.close()


def test_a_recovery_cut_short_after_its_commit_writes_no_row_twice(tmp_path):
    db = tmp_path / "l.db"
    st = SQLiteStorage(db)
    st.open()
    st.record(row(1))
    st.close()
    spill = Path(str(db) + ".unwritten.jsonl")
    # r1 is in the ledger and still in the file (the file was not rewritten), r2 only there.
    lines = []
    for r in (row(1), row(2)):
        d = {f: getattr(r, f) for f in r.__slots__}
        lines.append(json.dumps(d))
    spill.write_text("\n".join(lines) + "\n")
    again = SQLiteStorage(db)
    again.open()
    again.close()
    assert ledger_ids(db) == ["r1", "r2"]
    assert not spill.exists()


MASTER = "m" * 32


def metric(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_a_gateway_keeps_serving_while_its_ledger_is_locked_and_catches_up(tmp_path):
    db = tmp_path / "g.db"
    with MockServer() as upstream:
        env = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": upstream.base_url}
        env["LUNAR_MASTER_KEY"] = MASTER
        storage = SQLiteStorage(db, busy_timeout=0.01)
        app = create_app(load_config(None, env, db=str(db)), storage=storage)
        auth = {"authorization": f"Bearer {MASTER}"}
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:

                async def chat() -> None:
                    r = await client.post("/v1/chat/completions", json=body, headers=auth)
                    assert r.status_code == 200, r.text

                await chat()
                assert await asyncio.to_thread(storage.flush, 30)
                with write_locked(db):  # `sqlite3 lunar.db` left in a write, say
                    await chat()
                    await chat()
                    assert await asyncio.to_thread(storage.flush, 30)
                    text = (await client.get("/metrics")).text
                    assert metric(text, "lunar_ledger_spilled_rows_total") == 2
                    assert metric(text, "lunar_ledger_write_errors_total") >= 5
                    assert "# TYPE lunar_ledger_spilled_rows_total counter" in text
                await chat()
                usage = await client.get("/admin/usage", headers=auth)
                assert usage.json()["totals"]["requests"] == 4  # none lost
                text = (await client.get("/metrics")).text
                assert metric(text, "lunar_ledger_recovered_rows_total") == 2
        finally:
            await app.shutdown()
    assert len(ledger_ids(db)) == 4 and spilled_ids(db) == []


# ---------------------------------------------------------------------------------------------
# Reports on a large ledger: how SQLite reads it


def query_plans(st: SQLiteStorage, call: Callable[[], Any]) -> list[str]:
    """The plan (EXPLAIN QUERY PLAN, one line per step) of each SELECT ``call`` runs on the
    storage's connection, as SQLite would run it (parameters in)."""
    statements: list[str] = []
    conn = st._admin
    assert conn is not None
    conn.set_trace_callback(statements.append)
    try:
        call()
    finally:
        conn.set_trace_callback(None)
    plans = []
    with contextlib.closing(sqlite3.connect(st.path)) as db:
        for sql in statements:
            if sql.lstrip().upper().startswith("SELECT"):
                steps = db.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
                plans.append("\n".join(step[3] for step in steps))
    return plans


def test_reports_and_start_up_spend_scan_the_ledger_rather_than_walk_the_key_index(tmp_path):
    """Walking the (key_id, ts) index to have groups in key order reads the table a row
    lookup at a time: on 2 M rows `lunar usage` took 7.6 s and a gateway's start-up spend
    3.1 s instead of 4.2 s and 0.9 s, and `--since 1h` scanned every key's entries."""
    st = SQLiteStorage(tmp_path / "l.db")
    st.open()
    try:
        for i in range(50):
            st.record(row(i, key_id=f"k{i % 5}", ts=1000.0 + i * 3600))
        assert st.flush(10)
        whole_index = "SCAN u USING INDEX usage_key_ts"

        (spend,) = query_plans(st, st.spend_by_key)
        assert "usage_key_ts" not in spend, spend

        totals, groups = query_plans(st, lambda: st.usage(UsageQuery()))
        assert whole_index not in totals and whole_index not in groups, groups

        recent = UsageQuery(since=1000.0 + 48 * 3600)
        for plan in query_plans(st, lambda: st.usage(recent)):
            assert "SEARCH u USING INDEX usage_ts (ts>?)" in plan, plan

        one_key = UsageQuery(key="k1")
        for plan in query_plans(st, lambda: st.usage(one_key)):
            assert "SEARCH u USING INDEX usage_key_ts (key_id=?)" in plan, plan

        report = st.usage(UsageQuery(group_by=("key",)))
        assert sorted((g["key_id"], g["requests"]) for g in report["data"]) == [
            (f"k{i}", 10) for i in range(5)
        ]
        assert report["totals"]["requests"] == 50
        assert st.spend_by_key() == {f"k{i}": 2.5 for i in range(5)}
    finally:
        st.close()


@pytest.mark.parametrize("group_by", [("key",), ()])
def test_a_reports_totals_and_rows_are_of_one_moment_while_rows_keep_coming(tmp_path, group_by):
    """Rows committed between the report's two statements (the totals, then the groups or
    rows) made the totals disagree with what the report listed."""
    st = SQLiteStorage(tmp_path / "l.db")
    st.open()
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    try:
        for i in range(5):
            st.record(row(i))
        assert st.flush(10)
        late = iter(range(100, 103))

        def meanwhile(sql: str) -> None:  # the gateway's writer commits as the report runs
            if sql.lstrip().startswith("SELECT") and "ORDER BY" in sql:
                values = dataclasses.astuple(row(next(late)))
                marks = ", ".join("?" for _ in values)
                names = ", ".join(f.name for f in dataclasses.fields(UsageRow))
                other.execute(f"INSERT INTO usage ({names}) VALUES ({marks})", values)

        assert st._admin is not None
        st._admin.set_trace_callback(meanwhile)
        report = st.usage(UsageQuery(group_by=group_by))
        st._admin.set_trace_callback(None)
        listed = sum(g["requests"] for g in report["data"]) if group_by else len(report["data"])
        assert listed == report["totals"]["requests"] == 5
        assert st.usage(UsageQuery())["totals"]["requests"] == 6  # the next report has it
    finally:
        other.close()
        st.close()


async def test_a_large_usage_report_is_encoded_off_the_event_loop(tmp_path, monkeypatch):
    """100,000 raw rows are ~50 MB of JSON: encoded on the event loop they stalled every
    request in flight. Here the encoding of the report's rows waits until a /health sent
    meanwhile has been answered, which only a loop left free can do."""
    from lunar.server import app as app_module

    db = tmp_path / "g.db"
    st = SQLiteStorage(db)
    st.open()
    for i in range(2500):
        st.record(row(i, key_id="master"))
    st.close()
    encoding, health_answered = threading.Event(), threading.Event()
    real_dumps = app_module.dumps

    def gated_dumps(obj: Any) -> bytes:
        if isinstance(obj, list) and obj and isinstance(obj[0], dict) and "request_id" in obj[0]:
            encoding.set()  # the report's rows
            if not health_answered.wait(10):
                raise RuntimeError("the event loop was blocked while the report was encoded")
        return real_dumps(obj)

    monkeypatch.setattr(app_module, "dumps", gated_dumps)
    env = {"LUNAR_MASTER_KEY": MASTER}
    app = create_app(load_config(None, env, db=str(db)))
    auth = {"authorization": f"Bearer {MASTER}"}
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            params = {"group_by": "none", "limit": "100000"}
            report = asyncio.ensure_future(client.get("/admin/usage", params=params, headers=auth))
            assert await asyncio.to_thread(encoding.wait, 10)
            assert (await client.get("/health")).status_code == 200
            health_answered.set()
            r = await report
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["data"]) == 2500 and body["totals"]["requests"] == 2500
        assert [d["request_id"] for d in body["data"][:2]] == ["r2499", "r2498"]
        assert r.content == real_dumps(body)  # the same bytes, encoded in slices
    finally:
        health_answered.set()
        await app.shutdown()


def test_a_ledger_locked_for_long_spills_what_is_queued_instead_of_retrying_each_batch(tmp_path):
    """Each batch got five tries of ``busy_timeout`` (30 s) each: with another process holding
    the lock, the writer spilled 1,000 rows every ~2.5 minutes while every request kept
    adding its row to memory (and ``durable_ack`` answers waited all that time)."""
    db = tmp_path / "l.db"
    st = SQLiteStorage(db, batch_size=100, busy_timeout=0.01)
    st.open()
    try:
        with write_locked(db):
            for i in range(2500):
                st.record(row(i))
            assert st.flush(60)
            assert st.rows_spilled == 2500 and st.pending == 0
            # One batch's tries (a drain or two: rows may arrive as it starts); without the fix
            # each of the 25 batches got five.
            errors = st.write_errors
            assert errors < 15
            for i in range(2500, 2600):  # still locked: one try, then spilled
                st.record(row(i))
            assert st.flush(60)
            assert st.rows_spilled == 2600 and st.write_errors - errors < 5
        st.record(row(9999))
        assert st.flush(60)
        assert len(ledger_ids(db)) == 2601 and spilled_ids(db) == []
    finally:
        st.close()
