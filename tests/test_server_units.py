"""The gateway's pieces without a server: limiter (fake clock), SQLite ledger, configuration,
keys, and the app called in-process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from lunar import AuthenticationError
from lunar._catalog import Catalog
from lunar.server import SQLiteStorage, UsageQuery, UsageRow, create_app, load_config, storage
from lunar.server.config import ConfigError, to_toml
from lunar.server.keys import KeyRing, hash_key, hint, key_from_request, new_key, well_formed
from lunar.server.limits import UNUSED, Estimate, InMemoryLimiter, Refusal, Ticket, needs_estimate
from lunar.server.storage import KeyRecord, parse_time, usage_row_from
from lunar.testing import MockServer, Reply

from .conftest import OLD_LEDGER_ROW, cyclic_garbage, old_ledger


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def key(**limits) -> KeyRecord:
    return KeyRecord(id="k1", name="team", key_hash="h", hint="lk-…", created_at=0, **limits)


# ---------------------------------------------------------------------------------------------
# Limits


def test_rpm_is_a_sliding_window_with_retry_after():
    clock = Clock()
    lim = InMemoryLimiter(60, clock)
    k = key(rpm=2)
    est = Estimate(10, 10, 0.0)
    assert isinstance(lim.admit(k, est), Ticket)
    clock.t += 10
    assert isinstance(lim.admit(k, est), Ticket)
    refused = lim.admit(k, est)
    assert isinstance(refused, Refusal) and refused.retry_after == 50
    clock.t += 50  # the first request leaves the window
    assert isinstance(lim.admit(k, est), Ticket)
    assert isinstance(lim.admit(k, est), Refusal)


def test_tpm_reserves_the_estimate_and_settles_the_real_count():
    clock = Clock()
    lim = InMemoryLimiter(60, clock)
    k = key(tpm=100)
    t1 = lim.admit(k, Estimate(30, 30, 0.0))
    assert isinstance(t1, Ticket)
    assert isinstance(lim.admit(k, Estimate(30, 30, 0.0)), Refusal)  # 60 + 60 > 100
    lim.settle(t1, 20, 0.0)  # it used only 20
    assert isinstance(lim.admit(k, Estimate(30, 30, 0.0)), Ticket)  # 20 + 60 <= 100
    refused = lim.admit(k, Estimate(30, 30, 0.0))
    assert isinstance(refused, Refusal) and refused.code == "tokens_rate_limit_exceeded"
    assert refused.retry_after == 60


def test_a_request_larger_than_the_tpm_runs_alone():
    lim = InMemoryLimiter(60, Clock())
    k = key(tpm=10)
    assert isinstance(lim.admit(k, Estimate(50, 50, 0.0)), Ticket)
    assert isinstance(lim.admit(k, Estimate(1, 1, 0.0)), Refusal)


def test_budget_reserves_in_flight_cost_and_counts_the_ledger():
    lim = InMemoryLimiter(60, Clock())
    k = key(budget_usd=1.0)
    lim.load_spend({"k1": 0.5})
    t1 = lim.admit(k, Estimate(0, 0, 0.3))
    assert isinstance(t1, Ticket)
    refused = lim.admit(k, Estimate(0, 0, 0.3))  # 0.5 spent + 0.3 reserved + 0.3 > 1
    assert isinstance(refused, Refusal) and refused.code == "budget_exceeded"
    assert refused.retry_after is None and "reserved by requests in flight" in refused.message
    lim.settle(t1, 10, 0.1)
    assert lim.spent("k1") == pytest.approx(0.6) and lim.reserved("k1") == 0
    assert isinstance(lim.admit(k, Estimate(0, 0, 0.3)), Ticket)
    lim.load_spend({"k1": 1.0})
    done = lim.admit(k, Estimate(0, 0, 0.0))
    assert isinstance(done, Refusal) and done.message.startswith("Budget exhausted")


def test_only_token_and_budget_limits_need_the_estimate():
    assert needs_estimate(key(tpm=100)) and needs_estimate(key(budget_usd=1.0))
    assert needs_estimate(key(tpm=0)) and needs_estimate(key(budget_usd=0.0))  # limits too
    assert not needs_estimate(key()) and not needs_estimate(key(rpm=5))
    lim = InMemoryLimiter(60, Clock())
    k = key(rpm=1)  # rpm alone admits on the count, whatever the estimate
    assert isinstance(lim.admit(k, UNUSED), Ticket)
    assert isinstance(lim.admit(k, UNUSED), Refusal)


def test_unlimited_keys_still_count_spend():
    lim = InMemoryLimiter(60, Clock())
    t = lim.admit(key(), Estimate(1, 1, 5.0))
    lim.settle(t, 2, 0.25)
    lim.settle(t, 2, 0.25)  # settling twice counts once
    assert lim.spent("k1") == 0.25


# ---------------------------------------------------------------------------------------------
# Ledger


def row(i: int, **kw) -> UsageRow:
    base = dict(
        ts=1000.0 + i,
        request_id=f"r{i}",
        key_id="k1",
        route="chat",
        model="gpt-4o-mini",
        served_model="gpt-4o-mini",
        provider="openai",
        attempts=1,
        prompt_tokens=10,
        completion_tokens=5,
        total_cost_usd=0.001,
    )
    base.update(kw)
    return UsageRow(**base)


def test_close_writes_every_queued_row_in_wal_mode(tmp_path):
    st = SQLiteStorage(tmp_path / "l.db", batch_size=100)
    st.open()
    for i in range(5000):
        st.record(row(i))
    st.close()
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 5000
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st.pending == 0


def test_rows_recorded_after_close_are_still_written(tmp_path):
    st = SQLiteStorage(tmp_path / "l.db")
    st.open()
    st.record(row(1))
    st.close()
    st.record(row(2))  # a request cancelled during shutdown, finishing late
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 2


def test_values_sqlite_refuses_never_stop_the_writer(tmp_path):
    st = SQLiteStorage(tmp_path / "l.db")
    st.open()
    st.record(row(1, model="gpt-\ud800"))  # a lone surrogate: stored as "?"
    st.record(row(2, prompt_tokens=10**30, stream=True))  # too big for SQLite: spilled
    st.record(row(3))
    assert st.flush(10)
    st.record(row(4))
    st.close()
    with sqlite3.connect(tmp_path / "l.db") as db:
        got = db.execute("SELECT request_id, model FROM usage ORDER BY id").fetchall()
    assert got == [("r1", "gpt-?"), ("r3", "gpt-4o-mini"), ("r4", "gpt-4o-mini")]
    spilled = (tmp_path / "l.db.unwritten.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in spilled] == ["r2"]
    assert json.loads(spilled[0])["stream"] is True  # as the row has it
    assert usage_row_from(json.loads(spilled[0])) == row(2, prompt_tokens=10**30, stream=True)


@pytest.mark.parametrize(
    "field", [f.name for f in dataclasses.fields(UsageRow) if "str" in str(f.type)]
)
def test_every_text_field_with_a_lone_surrogate_is_stored_with_a_replacement(tmp_path, field):
    st = SQLiteStorage(tmp_path / "l.db")
    st.open()
    st.record(dataclasses.replace(row(1), **{field: "x\udc80é"}))
    st.close()
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute(f"SELECT {field} FROM usage").fetchone() == ("x?é",)


def test_flush_and_commit_callbacks(tmp_path):
    st = SQLiteStorage(tmp_path / "l.db")
    st.open()
    committed = threading.Event()
    st.record(row(1), committed.set)
    assert committed.wait(10)
    st.record(row(2))
    assert st.flush(10)
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 2
    st.close()


def test_an_idle_ledger_writer_sleeps_until_the_next_row(tmp_path):
    st = SQLiteStorage(tmp_path / "l.db", linger=0.005)
    st.quiet_s = 0.05
    st.open()
    st.record(row(1))
    deadline = time.monotonic() + 10
    while not st.idle:  # nothing more to write for quiet_s: it goes to sleep
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ticks = st.wakeups
    time.sleep(0.2)  # forty ticks' worth of linger
    assert st.wakeups == ticks
    st.record(row(2))  # no flush: the row alone wakes the writer
    with sqlite3.connect(tmp_path / "l.db") as db:
        while db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    for wake in ("commit", "flush", "close"):  # each wakes a sleeping writer at once
        while not st.idle:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ticks = st.wakeups
        if wake == "commit":
            committed = threading.Event()
            st.record(row(3), committed.set)
            assert committed.wait(10)
        elif wake == "flush":
            assert st.flush(10)  # nothing queued: the marker alone
        else:
            writer = st._thread
            assert writer is not None
            st.close(timeout=10)
            assert not writer.is_alive()
        assert st.wakeups > ticks
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 3


def test_usage_groups_filters_and_keys(tmp_path):
    st = SQLiteStorage(tmp_path / "l.db")
    st.open()
    st.add_key(KeyRecord("k1", "team-a", "h1", "lk-…", 0.0, rpm=5, models=["gpt-4o"]))
    st.record(row(1))
    st.record(row(2, model="gpt-4o", total_cost_usd=0.01))
    st.record(
        row(3, status="error", http_status=502, error_type="server_error", total_cost_usd=0.0)
    )
    st.record(row(4, key_id="other"))
    st.flush(10)
    out = st.usage(UsageQuery(key="team-a"))
    assert out["totals"]["requests"] == 3 and out["totals"]["errors"] == 1
    assert out["data"][0] == {
        "key_id": "k1",
        "model": "gpt-4o",
        "key_name": "team-a",
        "requests": 1,
        "ok": 1,
        "errors": 0,
        "rejected": 0,
        "cancelled": 0,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "cache_write_1h_tokens": 0,
        "input_cost_usd": 0.0,
        "cached_input_cost_usd": 0.0,
        "output_cost_usd": 0.0,
        "total_cost_usd": 0.01,
    }
    raw = st.usage(UsageQuery(model="gpt-4o-mini", since=1001.5, group_by=()))
    assert [r["request_id"] for r in raw["data"]] == ["r4", "r3"]
    assert st.spend_by_key() == {"k1": pytest.approx(0.011), "other": pytest.approx(0.001)}
    [k] = st.load_keys()
    assert (k.name, k.rpm, k.models) == ("team-a", 5, ["gpt-4o"])
    assert st.revoke_key("k1", 5.0).revoked_at == 5.0
    assert st.revoke_key("nope", 5.0) is None
    st.close()


def test_an_older_ledger_is_upgraded_in_place_keeping_its_rows(tmp_path):
    """A database from before the cache-write columns: opening it adds them (0 for the
    rows there), so the gateway can write to it and report on it again; an older
    gateway's inserts (without the column) still work; opening it again changes nothing."""
    path = tmp_path / "old.db"
    old_ledger(path)
    st = SQLiteStorage(path)
    st.open()
    st.record(
        row(1, key_id="old-key", cached_tokens=2000, cache_write_tokens=1000,
            cache_write_1h_tokens=400)
    )  # fmt: skip
    assert st.flush(10)
    out = st.usage(UsageQuery(group_by=()))
    assert [
        (r["request_id"], r["cache_write_tokens"], r["cache_write_1h_tokens"]) for r in out["data"]
    ] == [("r1", 1000, 400), ("old-1", 0, 0)]
    old = out["data"][1]
    assert {k: old[k] for k in OLD_LEDGER_ROW} == {**OLD_LEDGER_ROW, "stream": False}
    totals = st.usage(UsageQuery(key="old-team"))["totals"]
    assert (totals["requests"], totals["cached_tokens"], totals["cache_write_tokens"]) == (
        2,
        2300,
        1000,
    )
    assert st.spend_by_key() == {"old-key": pytest.approx(0.0011965)}
    st.close()
    with sqlite3.connect(path) as db:  # what an older gateway inserts: no such column
        columns = ", ".join(OLD_LEDGER_ROW)
        values = {**OLD_LEDGER_ROW, "request_id": "old-2", "ts": 2000.0}
        db.execute(f"INSERT INTO usage ({columns}) VALUES ({', '.join('?' * len(values))})",
                   list(values.values()))  # fmt: skip
    again = SQLiteStorage(path)
    again.open()
    newest = again.usage(UsageQuery(group_by=()))["data"][0]
    assert (newest["request_id"], newest["cache_write_tokens"]) == ("old-2", 0)
    again.close()
    with sqlite3.connect(path) as db:
        names = [r[1] for r in db.execute("PRAGMA table_info(usage)")]
    new = SQLiteStorage(tmp_path / "new.db")
    new.open()
    new.close()
    with sqlite3.connect(tmp_path / "new.db") as db:  # the same columns as a database made new
        assert names == [r[1] for r in db.execute("PRAGMA table_info(usage)")]


def _unprivileged() -> list[str]:
    """A command prefix that runs without the power to write a file its mode forbids: none
    when not root; as root, without the capabilities that override file modes."""
    import os
    import shutil

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root without setpriv: a read-only file is writable")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_an_older_ledger_the_reader_may_not_write_is_still_reported(tmp_path):
    """`lunar usage --db` on an older ledger it may not write (another user's, a backup's):
    it read it before the cache-write columns; then it failed with 'attempt to write a
    readonly database' (the upgrade). It reports it, the new columns 0, file unchanged."""
    import os

    path = tmp_path / "old.db"
    old_ledger(path)
    with contextlib.closing(sqlite3.connect(path)) as db:  # as a gateway leaves it
        db.execute("PRAGMA journal_mode=WAL")
    path.chmod(0o444)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [*_unprivileged(), sys.executable, "-m", "lunar.cli", "usage", "--db", str(path),
         "--group-by", "none", "--json"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (item,) = json.loads(done.stdout)["data"]
    assert {k: item[k] for k in OLD_LEDGER_ROW} == {**OLD_LEDGER_ROW, "stream": False}
    assert (item["cache_write_tokens"], item["cache_write_1h_tokens"]) == (0, 0)
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        names = {r[1] for r in db.execute("PRAGMA table_info(usage)")}
    assert "cache_write_tokens" not in names


def test_the_ledger_keeps_whether_a_request_streamed(tmp_path):
    """``stream`` goes to SQLite as the integer it stores (sqlite3 binds a bool only after
    two adapter lookups that fail) and comes back a bool."""
    bound = dict(zip(storage._ROW_FIELDS, storage._row_values(row(1, stream=True))))
    assert type(bound["stream"]) is int
    st = SQLiteStorage(tmp_path / "l.db")
    st.open()
    st.record(row(1, stream=True))
    st.record(row(2, stream=False))
    st.flush(10)
    out = st.usage(UsageQuery(group_by=()))
    assert [(r["request_id"], r["stream"]) for r in out["data"]] == [("r2", False), ("r1", True)]
    with sqlite3.connect(tmp_path / "l.db") as db:
        stored = db.execute("SELECT stream, typeof(stream) FROM usage ORDER BY ts").fetchall()
    assert stored == [(1, "integer"), (0, "integer")]
    st.close()


def test_parse_time():
    assert parse_time("1700000000") == 1700000000.0
    assert parse_time("2024-01-01T00:00:00Z") == 1704067200.0
    assert parse_time("2024-01-01T00:00:00") == 1704067200.0
    assert parse_time("2h", now=10_000.0) == 10_000.0 - 7200
    with pytest.raises(ValueError, match="duration ago"):
        parse_time("soon")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "Infinity"])
def test_a_time_filter_that_is_no_time_is_refused_naming_it(value):
    """float() reads them: `since=nan` filtered every row out (SQLite compares with NULL)
    and `lunar usage --since nan` printed an empty table with exit code 0."""
    from lunar import BadRequestError
    from lunar.server.app import usage_query

    with pytest.raises(ValueError, match="Unreadable time"):
        parse_time(value)
    for name in ("since", "until"):
        with pytest.raises(BadRequestError, match="Unreadable time") as info:
            usage_query(f"{name}={value}".encode())
        assert info.value.param == name


# ---------------------------------------------------------------------------------------------
# Keys


def test_key_hashes_are_plain_sha256_hex():
    # Storage keeps these: a change of format would lock every existing key out.
    for key in (new_key(), "lk-" + "x" * 32, "ключ-\udcff"):
        expected = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        assert hash_key(key) == expected
    assert hash_key("a") != hash_key("b") and hash_key("a") == hash_key("a")  # no state kept


def test_keys_are_random_hashed_and_checked():
    k = new_key()
    assert well_formed(k) and len(k) == 35 and k != new_key()
    assert hash_key(k) != k and len(hash_key(k)) == 64
    assert hint(k).startswith("lk-") and k not in hint(k)
    catalog = Catalog.load()
    key_text, rec = key_from_request({"name": "a", "models": "gpt-4o-mini, gpt-4o"}, catalog)
    ring = KeyRing(catalog)
    ring.put(rec)
    assert ring.authenticate(key_text, None) is rec
    assert ring.authenticate("master-secret", "master-secret").id == "master"
    assert ring.allows(rec, "openai/gpt-4o") and not ring.allows(rec, "o4-mini")
    for given, code, says in (
        (None, "missing_api_key", "Missing API key"),
        ("sk-abc", "invalid_api_key", "Malformed API key"),
        ("lk-" + "!" * 32, "invalid_api_key", "Malformed API key"),  # the right length
        ("lk-" + "a" * 4000, "invalid_api_key", "Malformed API key"),
        (new_key(), "invalid_api_key", "no such key"),
    ):
        with pytest.raises(AuthenticationError, match=says) as info:
            ring.authenticate(given, "master-secret")
        assert info.value.code == code
    rec.revoked_at = 1.0
    with pytest.raises(AuthenticationError, match="revoked"):
        ring.authenticate(key_text, None)


async def test_a_key_reload_racing_admin_calls_keeps_what_they_did(tmp_path):
    """The refresher reads every key from storage in a thread; a key created or revoked
    through the admin API meanwhile must not be undone by that older read."""
    env = {"LUNAR_MASTER_KEY": "m" * 32}
    app = create_app(load_config(None, env, db=str(tmp_path / "g.db")))
    transport = httpx.ASGITransport(app=app)
    admin = {"x-api-key": "m" * 32}
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        old = (await client.post("/admin/keys", json={"name": "old"}, headers=admin)).json()
        stale = app.storage.load_keys()  # what a reload that began now reads
        as_of = app.keys.version
        new = (await client.post("/admin/keys", json={"name": "new"}, headers=admin)).json()
        revoked = await client.delete(f"/admin/keys/{old['id']}", headers=admin)
        assert revoked.status_code == 200
        app.keys.replace_all(stale, as_of)  # ... and finishes now
        with pytest.raises(AuthenticationError, match="revoked"):
            app.keys.authenticate(old["key"], None)
        assert app.keys.authenticate(new["key"], None).name == "new"
        # The next reload reads storage as it is: same answer, and nothing pinned any more.
        await app._reload_keys()
        with pytest.raises(AuthenticationError, match="revoked"):
            app.keys.authenticate(old["key"], None)
        assert app.keys.authenticate(new["key"], None).name == "new"
        assert app.keys._recent == {}
    await app.shutdown()


@pytest.mark.parametrize("depth", [990, 1010, 1030, 5000])
async def test_deeply_nested_bodies_are_a_400_not_a_500(tmp_path, depth):
    env = {"LUNAR_MASTER_KEY": "m" * 32}
    app = create_app(load_config(None, env, db=str(tmp_path / "g.db")))
    schema = '{"a":' * depth + "1" + "}" * depth
    body = (
        '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], '
        '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
        + schema
        + "}}}"
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        r = await client.post(
            "/v1/chat/completions",
            content=body,
            headers={"x-api-key": "m" * 32, "content-type": "application/json"},
        )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    await app.shutdown()


def test_a_revocation_read_from_storage_wins_over_an_older_local_put():
    catalog = Catalog.load()
    key_text, rec = key_from_request({"name": "a"}, catalog)
    ring = KeyRing(catalog)
    as_of = ring.version
    ring.put(rec)  # created here; meanwhile `lunar keys revoke --db` revoked it
    ring.replace_all([dataclasses.replace(rec, revoked_at=5.0)], as_of)
    with pytest.raises(AuthenticationError, match="revoked"):
        ring.authenticate(key_text, None)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(
        '[server]\nport = 5000\nhost = "0.0.0.0"\ndb = "file.db"\n[engine]\nmax_retries = 4\n'
    )
    c = load_config(cfg, {"LUNAR_PORT": "6000", "LUNAR_DB": "env.db"}, db="flag.db")
    assert (c.host, c.port, c.db, c.max_retries) == ("0.0.0.0", 6000, "flag.db", 4)
    assert load_config(None, {}).port == 4000


def test_an_in_memory_ledger_is_refused_with_the_reason(tmp_path):
    for db in (":memory:", ""):
        with pytest.raises(ConfigError, match=f"db = '{db}': the ledger needs a file path"):
            load_config(None, {}, db=db)
        with pytest.raises(ValueError, match="needs a file path"):
            SQLiteStorage(db)
    # Not a URI (sqlite3 is not asked to read them): a file of that name, as any other.
    assert load_config(None, {}, db=str(tmp_path / "file:x.db")).db.endswith("file:x.db")


def test_unreadable_database_says_why_and_creates_nothing(tmp_path):
    missing = tmp_path / "new" / "lunar.db"
    assert storage.unreadable_database(str(missing)) is None  # the gateway creates it
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    assert storage.unreadable_database(str(empty)) is None  # SQLite's empty database
    made = SQLiteStorage(tmp_path / "made.db")
    made.open()
    made.close()
    assert storage.unreadable_database(str(tmp_path / "made.db")) is None
    garbage = tmp_path / "notes.txt"
    garbage.write_text("hello")
    assert storage.unreadable_database(str(garbage)) == "file is not a database"
    assert storage.unreadable_database(str(tmp_path)) == "is a directory, not a database file"


def test_a_setting_is_named_by_where_its_value_came_from(tmp_path):
    cfg = tmp_path / "lunar.toml"
    cfg.write_text('[server]\ndb = "file.db"\nport = 5000\n')
    c = load_config(cfg, {"LUNAR_PORT": "6000"}, host="0.0.0.0")
    assert c.setting("db") == f"{cfg}: server.db"
    assert (c.setting("port"), c.setting("host")) == ("$LUNAR_PORT", "--host")
    assert c.setting("log_level") == "server.log_level"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown setting server.prot"),
        ('[server]\nport = "x"\n', "server.port must be an integer, got 'x'"),
        ("[engine]\ntimeout_seconds = -1\n", "must be positive"),
        ('[providers.openai]\napi_key = "sk-x"\n', "api_key_env"),
        ('[providers.house]\nbase_url = "http://h"\n', "give its 'protocol'"),
        ('[aliases]\nfast = "no-such-model"\n', "Unknown model 'no-such-model'"),
        ('[fallbacks]\n"gpt-4o-mini" = ["nope"]\n', "Unknown model 'nope'"),
        ("[colors]\nred = 1\n", "unknown section [colors]"),
        ("not toml [", "invalid TOML"),
    ],
)
def test_bad_config_is_refused_with_the_setting_named(tmp_path, text, message):
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(cfg, {}).build_catalog()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LUNAR_MAX_BODY_BYTES": "8MB"}, "$LUNAR_MAX_BODY_BYTES must be an integer, got '8MB'"),
        ({"LUNAR_TIMEOUT_SECONDS": "soon"}, "$LUNAR_TIMEOUT_SECONDS must be a number, got 'soon'"),
        ({"LUNAR_METRICS_PUBLIC": "maybe"}, "$LUNAR_METRICS_PUBLIC must be true or false"),
    ],
)
def test_a_bad_environment_setting_says_what_it_takes(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, env)


@pytest.mark.parametrize("protocol", ["grpc", "_base", "Openai"])
def test_a_provider_protocol_lunar_does_not_speak_is_refused_at_start(tmp_path, protocol):
    """Not accepted, to answer every request to its models with a 500 (the adapter module
    that does not exist is imported at the first request)."""
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(
        f'[providers.house]\nprotocol = "{protocol}"\nbase_url = "http://h/v1"\n'
        '[models.house-llama]\ndeployments = [{provider = "house", id = "l"}]\n'
    )
    with pytest.raises(ConfigError, match=r"\[providers.house\] protocol must be one of openai, "):
        load_config(cfg, {}).build_catalog()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # A typo in a price: the model was silently unpriced (billed $0; budgets refused it).
        (
            '[models.m]\ndeployments = [{provider = "openai", id = "x", input = 1, ouput = 2}]\n',
            r"\[models.m\] deployments\[0\]: unknown setting 'ouput'",
        ),
        (
            '[models.m]\ndeployments = [{provider = "openai", id = "x", input = 1}]\n',
            r"\[models.m\] deployments\[0\]: give both 'input' and 'output'",
        ),
        (
            '[models.m]\ncontext = 8192\ndeployments = [{provider = "openai", id = "x"}]\n',
            r"\[models.m\]: unknown setting 'context'",
        ),
        # A string was taken letter by letter: capabilities {'t', 'o', 'l', 's'}.
        (
            '[models.m]\ncapabilities = "tools"\ndeployments = [{provider = "openai", id = "x"}]\n',
            r"\[models.m\] capabilities must be a list of tools, vision, json",
        ),
        (
            '[models.m]\ncapabilities = ["tool"]\n'
            'deployments = [{provider = "openai", id = "x"}]\n',
            r"\[models.m\] capabilities must be a list of tools, vision, json",
        ),
        (
            '[models.m]\ncontext_window = "big"\ndeployments = [{provider = "openai", id = "x"}]\n',
            r"\[models.m\] context_window must be an integer",
        ),
        (
            '[models.m]\ndeployments = [{provider = "openai", id = "x", context_window = 0}]\n',
            r"\[models.m\] deployments\[0\] context_window must be positive",
        ),
        # Not a table: an AttributeError traceback at start-up.
        ('[local]\nmodels = ["/m.gguf"]\n', r"\[local.models\] maps a name to a GGUF path"),
        ("[local]\nmodels = 3\n", r"\[local.models\] maps a name to a GGUF path"),
        (
            '[local.models]\nx = {path = "/m.gguf", context = 4096}\n',
            r"\[local.models.x\]: unknown setting 'context'",
        ),
    ],
)
def test_model_entries_with_typos_or_wrong_types_are_refused_naming_them(tmp_path, text, message):
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, {}).build_catalog()


def test_a_port_or_retry_count_out_of_range_is_refused_naming_where_it_came_from(tmp_path):
    """As every other setting: "port must be between 0 and 65535" did not say whether the
    file, $LUNAR_PORT or --port gave it."""
    with pytest.raises(ConfigError, match=r"^\$LUNAR_PORT must be between 0 and 65535, got "):
        load_config(None, {"LUNAR_PORT": "99999"})
    with pytest.raises(ConfigError, match=r"^--port must be between 0 and 65535, got -1"):
        load_config(None, {}, port=-1)
    cfg = tmp_path / "lunar.toml"
    cfg.write_text("[server]\nport = 70000\n[engine]\nmax_retries = -1\n")
    with pytest.raises(ConfigError, match=f"^{cfg}: server.port must be between 0 and 65535"):
        load_config(cfg, {"LUNAR_MAX_RETRIES": "1"})
    with pytest.raises(ConfigError, match=r"^\$LUNAR_MAX_RETRIES must be >= 0, got -2"):
        load_config(None, {"LUNAR_MAX_RETRIES": "-2"})
    with pytest.raises(ConfigError, match=f"^{cfg}: engine.max_retries must be >= 0, got -1"):
        load_config(cfg, {"LUNAR_PORT": "1"})


def test_a_bad_log_level_is_refused_naming_the_setting_and_where_it_came_from(tmp_path):
    """Not at `logging.basicConfig` once the gateway is starting, as `ValueError: Unknown
    level: 'LOUD'`: in the loader, as every other setting, and `--print-config` refuses it."""
    with pytest.raises(ConfigError, match=r"^\$LUNAR_LOG_LEVEL must be one of critical, "):
        load_config(None, {"LUNAR_LOG_LEVEL": "loud"})
    cfg = tmp_path / "lunar.toml"
    cfg.write_text('[server]\nlog_level = "verbose"\n')
    with pytest.raises(ConfigError, match=f"^{cfg}: server.log_level must be one of .*'verbose'"):
        load_config(cfg, {})
    with pytest.raises(ConfigError, match=r"^--log-level must be one of"):
        load_config(None, {}, log_level="loud")
    # The environment's usual spelling is accepted, and used as the flag's.
    assert load_config(None, {"LUNAR_LOG_LEVEL": "INFO"}).log_level == "info"
    cfg.write_text('[server]\nlog_level = "Debug"\n')
    assert load_config(cfg, {}).log_level == "debug"


def test_cors_is_off_by_default_and_read_from_the_file_or_the_environment(tmp_path):
    c = load_config(None, {})
    assert (c.allow_origins, c.allow_headers, c.max_age_seconds) == ([], ["*"], 600)
    assert "_http_request" not in vars(create_app(c))  # off: the plain request path
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(
        '[cors]\nallow_origins = ["HTTPS://App.Example.com:443", "http://localhost:5173", '
        '"https://app.example.com", "http://[::1]:80"]\n'
        'allow_headers = ["X-Team"]\nmax_age_seconds = 0\n'
    )
    c = load_config(cfg, {})
    # As browsers spell them in Origin (no default port), once each.
    assert c.allow_origins == ["https://app.example.com", "http://localhost:5173", "http://[::1]"]
    assert (c.allow_headers, c.max_age_seconds) == (["x-team"], 0)
    assert '"https://app.example.com", "http://localhost:5173"' in c.render()
    env = {"LUNAR_CORS_ALLOW_ORIGINS": " https://a.example , https://b.example:8443,"}
    env["LUNAR_CORS_ALLOW_HEADERS"] = "*"
    c = load_config(cfg, env)
    assert c.allow_origins == ["https://a.example", "https://b.example:8443"]
    assert c.allow_headers == ["*"]
    assert load_config(None, {"LUNAR_CORS_ALLOW_ORIGINS": "*"}).allow_origins == ["*"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[cors]\nallowed_origins = []\n",
            "unknown setting cors.allowed_origins (known: "
            "allow_headers, allow_origins, max_age_seconds)",
        ),
        (
            '[cors]\nallow_origins = "https://a.example"\n',
            "cors.allow_origins must be a list of strings, got 'https://a.example'",
        ),
        (
            '[cors]\nallow_origins = ["https://a.example/"]\n',
            "cors.allow_origins: "
            "'https://a.example/' has a path: an origin is scheme://host[:port], as a browser "
            "sends it in its Origin header: 'https://a.example'",
        ),
        ('[cors]\nallow_origins = ["https://*.a.example"]\n', "give exact origins"),
        ('[cors]\nallow_origins = ["a.example"]\n', "'a.example' is not an origin"),
        ('[cors]\nallow_origins = ["null"]\n', "'null' is not an origin"),
        (
            '[cors]\nallow_origins = ["*", "https://a.example"]\n',
            "'*' stands for all: give it alone",
        ),
        (
            '[cors]\nallow_headers = ["x team"]\n',
            "cors.allow_headers: 'x team' is not a header name",
        ),
        ("[cors]\nmax_age_seconds = -1\n", "cors.max_age_seconds must be >= 0, got -1"),
        ("[cors]\nmax_age_seconds = 1.5\n", "cors.max_age_seconds must be an integer"),
    ],
)
def test_bad_cors_settings_are_refused_naming_them(tmp_path, text, message):
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(cfg))}: .*{re.escape(message)}"):
        load_config(cfg, {})


def test_a_bad_cors_environment_variable_is_named():
    with pytest.raises(ConfigError, match=r"^\$LUNAR_CORS_ALLOW_ORIGINS: 'https://a/x' has a path"):
        load_config(None, {"LUNAR_CORS_ALLOW_ORIGINS": "https://a/x"})
    with pytest.raises(ConfigError, match=r"^\$LUNAR_CORS_MAX_AGE_SECONDS must be an integer"):
        load_config(None, {"LUNAR_CORS_MAX_AGE_SECONDS": "10m"})


def test_an_unreadable_lunar_catalog_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNAR_CATALOG", str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"LUNAR_CATALOG=.*nope\.json"):
        load_config(None, {}).build_catalog()


def test_providers_models_aliases_and_env_reference_keys(tmp_path):
    cfg = tmp_path / "lunar.toml"
    cfg.write_text(
        '[providers.house]\nprotocol = "openai"\nbase_url = "http://10.0.0.5/v1"\n'
        'api_key_env = "HOUSE_KEY"\n'
        '[providers.openai]\nbase_url = "http://file/v1"\napi_key_env = "TEAM_OPENAI"\n'
        '[models.house-llama]\ndeployments = [{provider = "house", id = "llama-3", '
        "input = 0.1, output = 0.2}]\n"
        '[aliases]\nfast = "house-llama"\n'
    )
    env = {"HOUSE_KEY": "sk-h", "TEAM_OPENAI": "sk-team"}
    c = load_config(cfg, env)
    catalog = c.build_catalog()
    assert catalog.resolve("fast")[0].provider_model == "llama-3"
    assert catalog.providers["house"].api_key_env == "HOUSE_KEY"
    assert c.provider_overrides(catalog) == {
        "openai": {"base_url": "http://file/v1", "api_key": "sk-team"}
    }
    # The usual variables win over the file.
    env2 = {**env, "OPENAI_BASE_URL": "http://env/v1", "OPENAI_API_KEY": "sk-env"}
    assert load_config(cfg, env2).provider_overrides(catalog) == {}
    text = load_config(cfg, env2).render()
    assert "sk-env" not in text and "sk-team" not in text and "sk-h" not in text
    assert 'base_url = "http://env/v1"' in text


def test_to_toml_writes_nested_tables():
    text = to_toml(
        {
            "server": {"port": 1, "ok": True},
            "providers": {"openai": {"base_url": "u"}},
            "fallbacks": {"gpt-4.1": ["a", "b"]},
        }
    )
    if __import__("sys").version_info >= (3, 11):
        import tomllib

        assert tomllib.loads(text) == {
            "server": {"port": 1, "ok": True},
            "providers": {"openai": {"base_url": "u"}},
            "fallbacks": {"gpt-4.1": ["a", "b"]},
        }


# ---------------------------------------------------------------------------------------------
# The app in-process (no lifespan: it starts itself on the first request)


async def post_chat(
    app: Any, master: str, body: dict, leave_after: int | None = None
) -> tuple[int, list[bytes]]:
    """POST /v1/chat/completions to the ASGI app in-process, as a client that stays
    connected until the answer ends (or leaves after ``leave_after`` body writes): its
    status and body writes."""
    request = json.dumps(body).encode()
    delivered = False
    status = 0
    writes: list[bytes] = []
    gone = asyncio.Event()

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request, "more_body": False}
        await gone.wait()  # until then the client stays, as a server's receive waits
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            writes.append(message["body"])
            if len(writes) == leave_after:
                gone.set()

    headers = [(b"authorization", f"Bearer {master}".encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
    await app({**scope, "headers": headers}, receive, send)
    return status, writes


MASTER = "m" * 32


@contextlib.asynccontextmanager
async def gateway_before(upstream: MockServer, tmp_path: Any) -> AsyncIterator[Any]:
    """The gateway's app, in-process, master key ``MASTER``, in front of ``upstream``
    (as OpenAI); shut down when the block ends."""
    env = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": upstream.base_url}
    env["LUNAR_MASTER_KEY"] = MASTER
    app = create_app(load_config(None, env, db=str(tmp_path / "g.db")))
    try:
        yield app
    finally:
        await app.shutdown()


async def test_create_app_serves_in_process(tmp_path):
    with MockServer() as upstream:
        upstream.default = Reply(chunks=3)
        env = {
            "OPENAI_API_KEY": "sk-x",
            "OPENAI_BASE_URL": upstream.base_url,
            "LUNAR_MASTER_KEY": "m" * 32,
        }
        app = create_app(load_config(None, env, db=str(tmp_path / "g.db")))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            made = await client.post(
                "/admin/keys", json={"name": "x"}, headers={"authorization": "Bearer " + "m" * 32}
            )
            k = made.json()["key"]
            r = await client.post(
                "/v1/chat/completions",
                headers={"x-api-key": k},
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            r = await client.post(
                "/v1/messages",
                headers={"x-api-key": k},
                json={
                    "model": "gpt-4o-mini",
                    "max_tokens": 5,
                    "stream": True,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            assert r.text.startswith("event: message_start")
            assert r.text.rstrip().endswith('data: {"type":"message_stop"}')
        await app.shutdown()
    with sqlite3.connect(tmp_path / "g.db") as db:
        assert db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 2
    assert time.time() > 0


async def test_n_above_one_to_a_claude_model_is_a_400_naming_n(tmp_path):
    with MockServer() as upstream:
        env = {
            "OPENAI_API_KEY": "sk-x",
            "OPENAI_BASE_URL": upstream.base_url,
            "ANTHROPIC_API_KEY": "sk-ant",
            "ANTHROPIC_BASE_URL": upstream.url,
            "LUNAR_MASTER_KEY": MASTER,
            "LUNAR_MAX_RETRIES": "0",
        }
        app = create_app(load_config(None, env, db=str(tmp_path / "g.db")))
        transport = httpx.ASGITransport(app=app)
        auth = {"authorization": f"Bearer {MASTER}"}
        ask = {"messages": [{"role": "user", "content": "hi"}], "n": 2}
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            for stream in (False, True):
                r = await client.post(
                    "/v1/chat/completions",
                    headers=auth,
                    json={"model": "claude-3-haiku", "stream": stream, **ask},
                )
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["param"] == "n" and "n=2" in error["message"]
                assert error["type"] == "invalid_request_error"
            assert upstream.requests == []
            # As a fallback it is skipped: never asked, so the primary's failure is the answer.
            upstream.enqueue(Reply(status=503), model="gpt-4o-mini")
            r = await client.post(
                "/v1/chat/completions",
                headers=auth,
                json={"model": "gpt-4o-mini", "fallbacks": ["claude-3-haiku"], **ask},
            )
            assert r.status_code == 503, r.text
            assert [q.path for q in upstream.requests] == ["/v1/chat/completions"]
        await app.shutdown()


async def test_events_that_arrive_in_one_read_leave_in_one_write(tmp_path):
    """A stream the upstream sends in one write (as a fast upstream, or one the gateway fell
    behind on, does) is relayed in a few body messages, not one per event: every ``send``
    is a socket write, the largest cost per event on a loaded gateway."""
    events = [{"role": "assistant", "content": ""}] + [{"content": f"w{i} "} for i in range(20)]
    body = b"".join(
        b"data: "
        + json.dumps(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": d, "finish_reason": None}],
            }
        ).encode()
        + b"\n\n"
        for d in events
    )
    body += (
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":20,"total_tokens":23}}\n\n'
        b"data: [DONE]\n\n"
    )

    async def one_write(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(one_write, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    master = "m" * 32
    env = {
        "OPENAI_API_KEY": "sk-x",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
        "LUNAR_MASTER_KEY": master,
    }
    app = create_app(load_config(None, env, db=str(tmp_path / "g.db")))
    request = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with server:
        _, writes = await post_chat(app, master, request)
    await app.shutdown()
    text = b"".join(writes).decode()
    contents = [
        json.loads(e[6:])["choices"][0]["delta"]["content"]
        for e in text.split("\n\n")
        if e.startswith("data: {") and json.loads(e[6:])["choices"]
    ]
    assert "".join(c or "" for c in contents) == "".join(d["content"] for d in events)
    assert text.endswith("data: [DONE]\n\n")
    assert len(writes) <= 4  # 24 events: all in one batch, the held last chunk, [DONE]


async def test_a_watched_request_leaves_no_garbage_cycle(tmp_path, monkeypatch):
    """Every request that outlives WATCH_AFTER_S (every real stream) runs a disconnect
    watch. Stopping it must leave nothing that only the cyclic GC can free: under load those
    cycles were 22 objects a request, and the collections they called for paused the loop."""
    from lunar.server import app as gateway

    started = 0
    start = gateway._Watch._start

    def counted_start(self: gateway._Watch) -> None:
        nonlocal started
        started += 1  # (a count: a list of them would keep them alive)
        start(self)

    monkeypatch.setattr(gateway._Watch, "WATCH_AFTER_S", 0.0)
    monkeypatch.setattr(gateway._Watch, "_start", counted_start)
    with MockServer() as upstream:
        upstream.default = Reply(chunks=4, pacing=0.01)
        async with gateway_before(upstream, tmp_path) as app:

            async def one(stream: bool) -> int:
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
                status, _ = await post_chat(app, MASTER, {**body, "stream": stream})
                return status

            assert await one(stream=True) == 200  # started, and warm
            with cyclic_garbage() as left:
                statuses = [await one(stream=s) for s in (True, False, True, False)]
                for _ in range(3):
                    await asyncio.sleep(0)  # the stopped watchers run their cancellation
    assert statuses == [200] * 4
    assert started == 5  # every request's watch ran
    assert left == []


# Failures of every kind the gateway answers: what the upstream does, stream, fallbacks;
# the status the client gets and the upstream requests made.
E500 = Reply(status=500, retry_after=0)
FAILING = {
    "a 400, not retried": ([Reply(status=400)], False, [], 400, 1),
    "500s until the retries are spent": ([E500] * 3, False, [], 500, 3),
    "500s until the retries are spent, streamed": ([E500] * 3, True, [], 500, 3),
    "a 500, then a retry that serves": ([E500], False, [], 200, 2),
    "a 500, then a retry that serves, streamed": ([E500], True, [], 200, 2),
    "500s, then a fallback that serves": ([E500] * 3, False, ["gpt-4o"], 200, 4),
    "500s, then a fallback that serves, streamed": ([E500] * 3, True, ["gpt-4o"], 200, 4),
    "cut after the first chunks": ([Reply(chunks=6, cut_after=2)], True, [], 200, 1),
    "an error event after the first chunks": ([Reply(chunks=6, error_after=2)], True, [], 200, 1),
    "a fallback that does not resolve, the model serving": ([Reply()], False, ["typo"], 200, 1),
}


@pytest.mark.parametrize("case", list(FAILING))
async def test_a_failed_attempt_leaves_no_reference_cycle(tmp_path, case):
    """A failure, whether the client sees it or a retry or a fallback hides it, leaves
    nothing of Lunar's that only the cyclic GC can free. Before, a failed attempt's
    traceback held the engine's frames, which hold the request's plan, which holds the
    error: 32 to 105 objects a failed request (the request's body and chunks among them),
    kept until a collection; during a provider's outage, that is every request."""
    replies, stream, fallbacks, status, sent = FAILING[case]
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        "fallbacks": fallbacks,
    }
    with MockServer() as upstream:
        upstream.enqueue(*replies, model="gpt-4o-mini")
        async with gateway_before(upstream, tmp_path) as app:
            with cyclic_garbage() as left:
                got, _ = await post_chat(app, MASTER, body)
                for _ in range(3):
                    await asyncio.sleep(0)
    assert (got, len(upstream.requests)) == (status, sent)
    assert left == []


async def test_a_client_gone_mid_stream_leaves_no_reference_cycle(tmp_path, monkeypatch):
    """A client that leaves mid-stream (a user's "stop") ends the request and closes its
    upstream connection, which leaves nothing for the cyclic GC either: the connection's
    HTTP parser held its callbacks, a cycle that kept a closed connection, with its buffers
    and error, until a collection."""
    from lunar.server import app as gateway

    monkeypatch.setattr(gateway._Watch, "WATCH_AFTER_S", 0.0)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with MockServer() as upstream:
        upstream.default = Reply(chunks=40, pacing=0.01)
        async with gateway_before(upstream, tmp_path) as app:
            with cyclic_garbage() as left:
                _, writes = await post_chat(app, MASTER, body, leave_after=2)
                for _ in range(5):
                    await asyncio.sleep(0.01)  # the closed connection is told it is lost
        deadline = time.monotonic() + 5
        while upstream.disconnects == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the emulator's thread sees the connection go
        assert upstream.disconnects == 1  # the upstream connection was closed
    assert len(writes) == 2  # the client left before the end
    assert left == []


def test_disconnect_watches_start_when_due_from_one_timer(monkeypatch):
    """The gateway's watches share one timer: each unfinished one starts once due, a
    finished one never does, one made after the timer fired still starts, and what a
    finished watch held is let go at once. The same ``_Watches`` works on a new loop."""
    from lunar.server import app as gateway

    started: list[gateway._Watch] = []
    monkeypatch.setattr(gateway._Watch, "WATCH_AFTER_S", 0.01)
    monkeypatch.setattr(gateway._Watch, "_start", lambda self: started.append(self))
    watches = gateway._Watches()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def until_started(watch: gateway._Watch) -> None:
        for _ in range(500):
            if watch in started:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the watch never started")

    async def scenario() -> None:
        started.clear()
        first, second = watches.watch(receive), watches.watch(receive)
        assert second.task is asyncio.current_task()
        first.stop()
        assert first.receive is None and first.task is None  # let go now, not when swept
        await until_started(second)
        late = watches.watch(receive)  # the timer has fired: this one arms it again
        await until_started(late)
        assert first not in started
        assert started == [second, late]
        assert not watches._queue

    async def leave_a_timer_armed() -> None:
        watches.watch(receive).stop()  # queued, with the timer armed for it

    asyncio.run(scenario())
    asyncio.run(leave_a_timer_armed())  # that loop closes with its timer pending
    asyncio.run(scenario())  # a new loop: its watches still start

    async def make_watch() -> gateway._Watch:
        return watches.watch(receive)

    # Two loops alive at once: a timer armed on the loop the watches have left does
    # nothing when it fires; the new loop's own timer starts its watch.
    old_loop, new_loop = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        old_loop.run_until_complete(leave_a_timer_armed())
        pending = new_loop.run_until_complete(make_watch())
        started.clear()
        old_loop.run_until_complete(asyncio.sleep(0.05))  # the old timer fires
        assert started == []
        new_loop.run_until_complete(until_started(pending))
    finally:
        old_loop.close()
        new_loop.close()


def test_serve_collects_less_often_and_freezes_its_start_up_heap():
    """What `lunar serve` does to its process before serving (here in a child process, so
    the test run's own GC is left alone)."""
    code = (
        "import gc, json; from lunar.server import cli; before = gc.get_threshold(); "
        "cli.tune_gc(); print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after, frozen = json.loads(out.stdout)
    assert after[0] == 20_000 > before[0]  # the young generation's threshold
    assert frozen > 10_000  # modules, the catalogue: out of every collection from now on


async def test_private_metrics_need_the_master_key(tmp_path):
    env = {"LUNAR_MASTER_KEY": "m" * 32, "LUNAR_METRICS_PUBLIC": "false"}
    app = create_app(load_config(None, env, db=str(tmp_path / "g.db")))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        assert (await client.get("/metrics")).status_code == 401
        ok = await client.get("/metrics", headers={"x-api-key": "m" * 32})
        assert ok.status_code == 200 and "lunar_requests_total" in ok.text
    await app.shutdown()


async def test_metrics_still_render_once_a_counter_overflows_to_infinity(tmp_path):
    """An unpriced model keeps the cost its upstream states; two finite but huge ones sum to
    infinity, which `/metrics` could not write (an OverflowError: a 500 at every scrape
    from then on). The text format spells it +Inf."""
    head = '{"id":"x","created":1,"model":"m","choices":[{"index":0,"message":{"role":'
    head += '"assistant","content":"hi"},"finish_reason":"stop"}],"usage":'
    usage = '{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4,"total_cost_usd":1e308}'
    with MockServer() as upstream:
        async with gateway_before(upstream, tmp_path) as app:
            transport = httpx.ASGITransport(app=app)
            auth = {"authorization": f"Bearer {MASTER}"}
            chat = {"model": "openai/costly", "messages": [{"role": "user", "content": "hi"}]}
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                for _ in range(2):
                    upstream.enqueue(Reply(body=head + usage + "}"))
                    r = await client.post("/v1/chat/completions", json=chat, headers=auth)
                    assert r.status_code == 200, r.text
                r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert 'lunar_cost_usd_total{model="openai/other",provider="openai"} +Inf' in r.text


def test_local_models_section_names_gguf_files(tmp_path):
    from lunar.server.config import ConfigError, load_config

    path = tmp_path / "lunar.toml"
    path.write_text(
        '[local.models]\nhouse = "/models/house.gguf"\n'
        'big = {path = "/models/big.gguf", context_window = 8192}\n'
    )
    catalog = load_config(path, environ={"LUNAR_MASTER_KEY": "m"}).build_catalog()
    [house] = catalog.resolve("house")
    assert (house.provider, house.provider_model, house.context_window) == (
        "local",
        "/models/house.gguf",
        2048,
    )
    assert house.prices is not None and house.prices.input == 0
    assert catalog.resolve("big")[0].context_window == 8192
    path.write_text("[local.models]\nbad = 5\n")
    with pytest.raises(ConfigError, match=r"\[local.models\]"):
        load_config(path, environ={"LUNAR_MASTER_KEY": "m"})


def test_every_route_is_in_the_openapi_document(tmp_path):
    """``/openapi.json`` is what clients and the schema fuzzing (test_server_schema.py)
    know of the gateway: a route missing from it is never fuzzed."""
    from lunar.server.openapi import openapi_document

    app = create_app(load_config(None, {"LUNAR_MASTER_KEY": MASTER}, db=str(tmp_path / "g.db")))
    paths = openapi_document("0")["paths"]
    aliases = {"/chat/completions", "/openapi.json"}  # the same route; the document itself
    for route, methods in app._routes.items():
        if route not in aliases:
            assert {m.lower() for m in methods} - {"head"} <= set(paths.get(route, {})), route


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("durable", [False, True])
async def test_a_shutdown_cancel_while_the_answer_ends_keeps_the_answer_and_its_row(
    tmp_path, durable, stream
):
    """The server's shutdown cancels a request as its answer ends: with ``durable_ack``,
    while its row's commit is pending; without, while its last bytes wait for the socket (a
    slow reader). The answer still ends as its row records it (ok, 200), with one head and
    no 503 written after it."""
    with MockServer() as upstream:
        upstream.default = Reply(chunks=3)
        env = {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": upstream.base_url}
        env["LUNAR_MASTER_KEY"] = MASTER
        env["LUNAR_LEDGER_DURABLE_ACK"] = "true" if durable else "false"
        app = create_app(load_config(None, env, db=str(tmp_path / "g.db")))
        await app.startup()
        ending = asyncio.Event()
        if durable:  # the commit never comes
            queue = app.storage.record
            app.storage.record = lambda row, done=None: (ending.set(), queue(row))[1]
        chat = {
            "model": "gpt-4o-mini",
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }
        body = json.dumps(chat).encode()
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
        scope["headers"] = [(b"authorization", b"Bearer " + MASTER.encode())]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if not sent:
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            last = message["type"] == "http.response.body" and not message.get("more_body")
            if last and not durable and not ending.is_set():
                ending.set()
                await asyncio.sleep(3600)  # the socket's buffer is full
            sent.append(message)

        task = asyncio.create_task(app(scope, receive, send))
        await asyncio.wait_for(ending.wait(), 10)
        task.cancel("shutdown")
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.shutdown()
    heads = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert heads == [200]
    if durable:
        assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")
    with sqlite3.connect(tmp_path / "g.db") as db:
        rows = db.execute("SELECT status, http_status FROM usage").fetchall()
    assert rows == [("ok", 200)]
