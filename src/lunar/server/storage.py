"""Where the gateway keeps its state: virtual keys and the usage ledger.

``Storage`` is the small interface the gateway needs; ``SQLiteStorage`` is the embedded default
(stdlib ``sqlite3``, WAL mode). A PostgreSQL backend implements the same methods.

Ledger writes never block a request: ``record()`` appends the row to a deque (no lock, no
thread wake-up but the first after a quiet second) and a dedicated writer thread inserts
whatever has accumulated every ``linger`` seconds (10 ms) in one transaction, at once when
someone waits for a commit (``record(row, on_commit)``, ``flush()``) or a batch is full. After
a second with nothing to write the writer sleeps until the next row wakes it: an idle
gateway does not wake it 100 times a second. ``flush()`` waits until every row recorded
before the call is committed; ``close()`` flushes and stops the thread.
Rows that cannot be written even after retries are appended to ``<db>.unwritten.jsonl``
rather than dropped, and written to the ledger from there once it takes rows again: by the
writer after its next commit, and by ``open()`` (so a restarted gateway's spend counts them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("lunar.server")

__all__ = [
    "GROUP_BY",
    "KeyRecord",
    "SQLiteStorage",
    "Storage",
    "UsageQuery",
    "UsageRow",
    "parse_time",
]


@dataclass(slots=True)
class KeyRecord:
    """A virtual key. Only ``key_hash`` (sha256 of the key) is stored, never the key."""

    id: str
    name: str
    key_hash: str
    hint: str
    created_at: float
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    models: list[str] | None = None
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def public(self, spent_usd: float | None = None) -> dict[str, Any]:
        """The JSON the admin API shows (no hash)."""
        out = {
            "id": self.id,
            "object": "key",
            "name": self.name,
            "hint": self.hint,
            "created_at": int(self.created_at),
            "revoked_at": None if self.revoked_at is None else int(self.revoked_at),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "budget_usd": self.budget_usd,
            "models": self.models,
        }
        if spent_usd is not None:
            out["spent_usd"] = round(spent_usd, 10)
        return out


@dataclass(slots=True)
class UsageRow:
    """One ledger row: one inference request that passed authentication."""

    ts: float
    request_id: str
    key_id: str
    route: str
    model: str | None = None
    served_model: str | None = None
    provider: str | None = None
    attempts: int = 0
    stream: bool = False
    status: str = "ok"  # ok | error | rejected | cancelled
    http_status: int = 200
    error_type: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # read from a prompt cache (part of prompt_tokens)
    cache_write_tokens: int = 0  # written to one (Anthropic's; part of prompt_tokens)
    cache_write_1h_tokens: int = 0  # of them, to Anthropic's 1-hour cache
    input_cost_usd: float = 0.0
    cached_input_cost_usd: float = 0.0
    output_cost_usd: float = 0.0
    total_cost_usd: float = 0.0
    ttft_ms: float | None = None
    latency_ms: float | None = None

    @property
    def stream_column(self) -> int:
        """``stream`` as the ledger stores it: sqlite3 binds an int at once, a bool only
        after two adapter lookups that fail (~0.5 µs a row, on the gateway's core)."""
        return 1 if self.stream else 0


_ROW_FIELDS = tuple(f.name for f in fields(UsageRow))

# What ``/admin/usage`` can group by, and the SQL for each. ``+`` (a no-op on any value)
# keeps SQLite from walking the whole ``(key_id, ts)`` index to have the groups in order:
# that reads the table in index order, a row lookup per row (4x slower than a scan on 2 M
# rows in the page cache, far worse from disk), and ignores a ``since`` the ``ts`` index
# would narrow to. A key filter still uses the index.
GROUP_BY = {
    "key": "+u.key_id",
    "model": "u.model",
    "served_model": "u.served_model",
    "provider": "u.provider",
    "status": "u.status",
    "route": "u.route",
    "day": "date(u.ts, 'unixepoch')",
    "hour": "strftime('%Y-%m-%dT%H:00', u.ts, 'unixepoch')",
}


@dataclass(slots=True)
class UsageQuery:
    key: str | None = None  # a key id or a key name
    model: str | None = None  # the requested model
    since: float | None = None
    until: float | None = None
    group_by: Sequence[str] = ("key", "model")  # empty: one row per request
    limit: int = 1000


class Storage(Protocol):
    """What the gateway needs from a backend. Methods other than ``record`` and ``pending``
    may block (the gateway calls them in a thread)."""

    def open(self) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...

    def load_keys(self) -> list[KeyRecord]: ...

    def add_key(self, key: KeyRecord) -> None: ...

    def revoke_key(self, key_id: str, when: float) -> KeyRecord | None: ...

    def update_key(self, key_id: str, changes: Mapping[str, Any]) -> KeyRecord | None: ...

    def spend_by_key(self) -> dict[str, float]: ...

    def record(self, row: UsageRow, on_commit: Callable[[], None] | None = None) -> None:
        """Queue a ledger row; never blocks and never raises. ``on_commit`` is called (from
        another thread) once the row is durable."""

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every row recorded so far is durable; False on timeout."""

    @property
    def pending(self) -> int: ...

    def usage(self, query: UsageQuery) -> dict[str, Any]: ...


_SCHEMA = """
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
    latency_ms REAL,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_id, ts);
"""

#: Columns the ledger gained after its first schema, with their definitions: ``open()`` adds
#: those an older database lacks (``ALTER TABLE ... ADD COLUMN``, its rows kept, the column 0
#: for them), so a ledger file from an older Lunar keeps working. Each is also in
#: ``_SCHEMA``, last, so that a new database and an upgraded one have the same columns.
_ADDED_COLUMNS = (
    ("cache_write_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("cache_write_1h_tokens", "INTEGER NOT NULL DEFAULT 0"),
)

_INSERT = (
    f"INSERT INTO usage ({', '.join(_ROW_FIELDS)}) VALUES ({', '.join('?' for _ in _ROW_FIELDS)})"
)
_KEY_COLUMNS = "id, name, key_hash, hint, created_at, revoked_at, rpm, tpm, budget_usd, models"
#: What an admin may change on a key (the column names).
KEY_FIELDS = ("name", "rpm", "tpm", "budget_usd", "models")

_STOP = object()


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


def _text(value: Any) -> Any:
    """Text as SQLite can store it: a lone surrogate (valid in JSON, not in UTF-8) becomes
    '?' instead of failing the whole batch."""
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


_values_of = operator.attrgetter(*("stream_column" if f == "stream" else f for f in _ROW_FIELDS))
_texts_of = operator.attrgetter(*(f.name for f in fields(UsageRow) if "str" in str(f.type)))


def _row_values(row: UsageRow) -> tuple[Any, ...]:
    """The row's values in column order. One per request on the ledger's thread, which
    shares the gateway's core: the attribute getters run in C, and only a row with
    non-ASCII text goes through ``_text`` (3.5x faster than a getattr per field)."""
    values: tuple[Any, ...] = _values_of(row)
    for text in _texts_of(row):
        if text is not None and not text.isascii():
            return tuple(_text(value) for value in values)
    return values


def _upgrade(conn: sqlite3.Connection) -> None:
    """Add the columns of ``_ADDED_COLUMNS`` an older ledger lacks. Under a write lock, so
    that two processes opening the same old file (a gateway, ``lunar usage --db``) do not
    both add a column; a database that has them all is only read."""

    def missing() -> list[tuple[str, str]]:
        have = {r[1] for r in conn.execute("PRAGMA table_info(usage)")}
        return [(name, sql) for name, sql in _ADDED_COLUMNS if name not in have]

    if not missing():
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for name, sql in missing():  # again, under the lock: another may have added them
                conn.execute(f"ALTER TABLE usage ADD COLUMN {name} {sql}")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
    except sqlite3.OperationalError as exc:
        if not _read_only(exc):
            raise
        # A file this process may not write (``lunar usage --db`` on another user's or a
        # backup's ledger): read it as upgraded, through a view of this connection's own
        # (TEMP comes before the file's tables) that gives the missing columns as 0.
        zeros = ", ".join(f"0 AS {name}" for name, _ in missing())
        conn.execute(f"CREATE TEMP VIEW usage AS SELECT *, {zeros} FROM main.usage")


#: SQLite's primary result code for a write to a database opened read-only.
_SQLITE_READONLY = 8


def _read_only(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+: the extended code
    if code is None:
        return "readonly" in str(exc)
    return bool(code & 0xFF == _SQLITE_READONLY)


def _key_from_row(r: Sequence[Any]) -> KeyRecord:
    return KeyRecord(
        id=r[0],
        name=r[1],
        key_hash=r[2],
        hint=r[3],
        created_at=r[4],
        revoked_at=r[5],
        rpm=r[6],
        tpm=r[7],
        budget_usd=r[8],
        models=json.loads(r[9]) if r[9] else None,
    )


def unusable_path(path: str) -> str | None:
    """Why ``path`` cannot hold the ledger, or None. ':memory:' and '' give each connection
    (the writer thread's, the admin one) its own, empty private database: every row would
    fail to insert and go to the spill file."""
    if path in ("", ":memory:"):
        return (
            "the ledger needs a file path (its writer thread and the admin routes each open "
            "the database; an in-memory one would be a different, empty database for each). "
            "For a throwaway gateway, use a temporary file."
        )
    return None


def unreadable_database(path: str) -> str | None:
    """Why the file at ``path`` cannot be opened as a database (SQLite's reason: 'file is
    not a database'), or None, also when there is no file (opening creates one; this does
    not). It reads the file's header and changes no data."""
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        return "is a directory, not a database file"
    try:
        conn = sqlite3.connect(path, timeout=30.0)
        try:
            conn.execute("PRAGMA schema_version")
        finally:
            conn.close()
    except sqlite3.Error as e:
        return str(e)
    return None


def not_a_gateway_database(path: str) -> str | None:
    """Why the SQLite file at ``path`` is not a Lunar gateway's (it lacks the ``keys`` and
    ``usage`` tables), or None. Read-only: another program's database is left as it is."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            names = {
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)",
                    ("keys", "usage"),
                )
            }
        finally:
            conn.close()
    except sqlite3.Error as e:
        return str(e)
    if names != {"keys", "usage"}:
        return "not a Lunar gateway's database (no keys and usage tables)"
    return None


class SQLiteStorage:
    """SQLite in WAL mode: readers never wait for the writer, and a commit survives the
    process being killed (``synchronous=NORMAL``: only an OS crash or power loss can take
    the last transactions)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int = 1000,
        linger: float = 0.01,
        recover: bool = True,
        busy_timeout: float = 30.0,
    ) -> None:
        """``recover``: write the rows of the spill file to the ledger on ``open()`` (the
        gateway's storage; ``lunar keys|usage --db`` only read it, and leave the file to the
        gateway, the one process that appends to it). ``busy_timeout``: how long a
        statement waits for another process's lock before it fails."""
        self.path = str(path)
        self.busy_timeout = busy_timeout
        self.spill_path = self.path + ".unwritten.jsonl"
        self.recover = recover
        problem = unusable_path(self.path)
        if problem:
            raise ValueError(problem)
        self.batch_size = batch_size
        self.linger = linger
        # Rows, (row, on_commit), _Flush markers and _STOP; append/popleft are atomic.
        self._rows: deque[Any] = deque()
        self._wake = threading.Event()
        self._idle = False  # the writer sleeps for want of rows; the next record() wakes it
        self.quiet_s = 1.0  # how long the writer ticks with nothing to write before sleeping
        self.wakeups = 0  # writer ticks, for tests: none while idle
        self._writing = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # serializes the admin connection
        self._admin: sqlite3.Connection | None = None
        self.write_errors = 0  # failed inserts and commits (each retry counts)
        self.rows_written = 0
        self.rows_spilled = 0  # appended to the spill file
        self.rows_recovered = 0  # written to the ledger from it
        # Rows were spilled because the database failed (busy, locked, I/O, full), not for
        # their values: the writer's next commit tries the spill file again.
        self._retry_spill = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def open(self) -> None:
        if self._thread is not None:
            return
        Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        conn.executescript(_SCHEMA)
        conn.commit()
        _upgrade(conn)
        self._admin = conn
        if self.recover and os.path.exists(self.spill_path):
            with self._lock:
                self._recover(conn)
        self._thread = threading.Thread(target=self._writer, name="lunar-ledger", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self._rows.append(_STOP)
        self._wake.set()
        thread.join(timeout)
        self._thread = None
        self._closed = True
        while self._rows:  # recorded while the writer was stopping: write them here
            conn = self._connect()
            try:
                self._drain(conn)
            finally:
                conn.close()
        with self._lock:
            if self._admin is not None:
                self._admin.close()
                self._admin = None

    # -- keys ----------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._admin is None:
            raise RuntimeError("storage is not open")
        return self._admin

    def load_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db().execute(f"SELECT {_KEY_COLUMNS} FROM keys").fetchall()
        return [_key_from_row(r) for r in rows]

    def add_key(self, key: KeyRecord) -> None:
        models = json.dumps(key.models) if key.models is not None else None
        with self._lock:
            db = self._db()
            db.execute(
                f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.id,
                    key.name,
                    key.key_hash,
                    key.hint,
                    key.created_at,
                    key.revoked_at,
                    key.rpm,
                    key.tpm,
                    key.budget_usd,
                    models,
                ),
            )
            db.commit()

    def revoke_key(self, key_id: str, when: float) -> KeyRecord | None:
        with self._lock:
            db = self._db()
            db.execute(
                "UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (when, key_id),
            )
            db.commit()
            row = db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else _key_from_row(row)

    def update_key(self, key_id: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        """Change a key's name, limits or models (the fields of ``KEY_FIELDS`` in
        ``changes``); a revoked key is left as it is. The key as stored after, or None."""
        sets = [f"{name} = ?" for name in changes]
        values = [
            json.dumps(v) if name == "models" and v is not None else v
            for name, v in changes.items()
        ]
        assert set(changes) <= set(KEY_FIELDS), changes
        with self._lock:
            db = self._db()
            if sets:
                db.execute(
                    f"UPDATE keys SET {', '.join(sets)} WHERE id = ? AND revoked_at IS NULL",
                    (*values, key_id),
                )
                db.commit()
            row = db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else _key_from_row(row)

    def spend_by_key(self) -> dict[str, float]:
        with self._lock:
            rows = (
                self._db()
                # A scan, not the (key_id, ts) index's order (see GROUP_BY): start-up reads it.
                .execute("SELECT key_id, SUM(total_cost_usd) FROM usage GROUP BY +key_id")
                .fetchall()
            )
        return {k: float(v or 0.0) for k, v in rows}

    # -- ledger --------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """The writer sleeps until the next row (after ``quiet_s`` with nothing to write)."""
        return self._idle

    @property
    def pending(self) -> int:
        """Rows recorded but not committed yet (approximately)."""
        return len(self._rows) + self._writing

    def record(self, row: UsageRow, on_commit: Callable[[], None] | None = None) -> None:
        if self._closed:
            self._write_late(row)  # after close(): straight to the file, never dropped
            if on_commit is not None:
                on_commit()
            return
        if on_commit is None:
            self._rows.append(row)
            if self._idle:  # the first row after a quiet spell: one wake-up, not one a row
                self._idle = False
                self._wake.set()
            elif len(self._rows) >= self.batch_size:
                self._wake.set()
        else:
            self._rows.append((row, on_commit))
            self._wake.set()

    def _write_late(self, row: UsageRow) -> None:
        conn = self._connect()
        try:
            self._write(conn, [_row_values(row)])
        finally:
            conn.close()

    def flush(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return not self._rows
        marker = _Flush()
        self._rows.append(marker)
        self._wake.set()
        return marker.done.wait(timeout)

    def _writer(self) -> None:
        conn = self._connect()
        quiet = 0  # ticks in a row that found nothing to write
        try:
            while True:
                if quiet * self.linger >= self.quiet_s:
                    self._idle = True
                    if not self._rows:  # (checked after the flag: record() reads it after)
                        self._wake.wait()
                    self._idle = False
                    quiet = 0
                else:
                    self._wake.wait(self.linger)
                self._wake.clear()
                self.wakeups += 1
                quiet = 0 if self._rows else quiet + 1
                try:
                    if self._drain(conn):
                        return
                except Exception:  # never let the ledger thread die; the batch was spilled
                    log.exception("ledger writer: unexpected failure")
        finally:
            conn.close()

    def _drain(self, conn: sqlite3.Connection) -> bool:
        """Write everything queued now, in transactions of up to ``batch_size`` rows, then
        release whoever waits for them. True when ``_STOP`` was among them."""
        rows = self._rows
        stop = False
        failing = False  # the database failed a batch: spill the rest queued now, untried
        while rows:
            batch: list[tuple[Any, ...]] = []
            waiting: list[_Flush | Callable[[], None]] = []
            while rows and len(batch) < self.batch_size:
                item = rows.popleft()
                if item is _STOP:
                    stop = True
                elif isinstance(item, _Flush):
                    waiting.append(item)
                elif isinstance(item, tuple):
                    batch.append(_row_values(item[0]))
                    waiting.append(item[1])
                else:
                    batch.append(_row_values(item))
            if batch:
                self._writing = len(batch)
                if failing:
                    self._spill(batch, trouble=True)
                elif self._write(conn, batch):
                    if self._retry_spill:
                        self._retry_spill = False  # the database takes rows again
                        self._recover(conn)
                else:
                    failing = self._retry_spill
                self._writing = 0
            for w in waiting:
                if isinstance(w, _Flush):
                    w.done.set()
                else:
                    try:
                        w()
                    except Exception:  # a closed event loop: nobody is waiting any more
                        pass
        return stop

    def _write(self, conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> bool:
        """Insert ``batch`` in one transaction. A busy or failing database is retried with
        backoff; values SQLite refuses are written row by row, so one bad row never takes
        the others with it. What cannot be written goes to the spill file. True when the
        whole batch was committed in one transaction."""
        self.rows_written += len(batch)
        # While the database is failing (rows spilled since its last commit), one attempt:
        # retrying every batch would hold the rows queued behind it in memory for minutes.
        attempts = 1 if self._retry_spill else 5
        for attempt in range(attempts):
            try:
                conn.executemany(_INSERT, batch)
                conn.commit()
                return True
            except sqlite3.OperationalError as exc:  # busy, locked, I/O
                self.write_errors += 1
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
                log.error("ledger write failed (attempt %d): %s", attempt + 1, exc)
                if attempt + 1 < attempts:
                    time.sleep(0.05 * 2**attempt)
            except (sqlite3.Error, ValueError, OverflowError):
                self.write_errors += 1
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
                self._write_each(conn, batch)
                return False
        self._spill(batch, trouble=True)
        return False

    def _write_each(self, conn: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
        refused = []
        for values in batch:
            try:
                conn.execute(_INSERT, values)
            except (sqlite3.Error, ValueError, OverflowError):
                refused.append(values)
        trouble = False
        try:
            conn.commit()
        except sqlite3.Error:
            self.write_errors += 1
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            refused, trouble = batch, True
        if refused:
            self._spill(refused, trouble)

    def _spill(self, batch: list[tuple[Any, ...]], trouble: bool = False) -> None:
        spill = self.spill_path
        try:
            with open(spill, "a+b") as f:
                # A write cut short (a full disk) leaves a line without its end: end it, or
                # the next row would be glued to it and both be unreadable.
                end = f.seek(0, os.SEEK_END)
                if end:
                    f.seek(end - 1)
                    if f.read(1) != b"\n":
                        f.write(b"\n")  # ("a" mode: writes go to the end wherever we read)
                for values in batch:
                    spilled = dict(zip(_ROW_FIELDS, values))
                    spilled["stream"] = bool(spilled["stream"])  # (a row's own field)
                    f.write(json.dumps(spilled).encode() + b"\n")
            self.rows_spilled += len(batch)
            if trouble:
                self._retry_spill = True
            log.error("%d ledger rows could not be written; appended to %s", len(batch), spill)
        except OSError as exc:  # pragma: no cover - disk gone
            log.critical("%d ledger rows lost: %s", len(batch), exc)

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Write the spill file's rows to the ledger, in one transaction, and keep in the
        file only what still cannot be written (a value SQLite refuses, an unreadable line).
        A row already in the ledger (same request id and time: a recovery cut short between
        its commit and the file's rewrite) is not written twice. Left as it is when the
        database still fails. Called where nothing appends to the file meanwhile: ``open()``
        before the writer starts, or the writer itself."""
        spill = self.spill_path
        try:
            with open(spill, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot read %s: %s", spill, exc)
            return
        kept: list[str] = []
        rows: list[tuple[tuple[Any, ...], str]] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                rows.append((_row_values(usage_row_from(json.loads(line))), line))
            except (ValueError, TypeError, KeyError):
                kept.append(line)
        written = 0
        try:
            if rows:
                lo = min(values[0] for values, _ in rows)
                hi = max(values[0] for values, _ in rows)
                there = set(
                    conn.execute(
                        "SELECT request_id, ts FROM usage WHERE ts BETWEEN ? AND ?", (lo, hi)
                    )
                )
            for values, line in rows:
                if (values[1], values[0]) in there:
                    continue
                try:
                    conn.execute(_INSERT, values)
                    written += 1
                except sqlite3.OperationalError:
                    raise  # the database, not the row: try it all again later
                except (sqlite3.Error, ValueError, OverflowError):
                    kept.append(line)
            conn.commit()
        except sqlite3.Error as exc:
            self.write_errors += 1
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
            self._retry_spill = True
            log.error("ledger rows in %s not written yet: %s", spill, exc)
            return
        try:
            if kept:
                tmp = spill + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write("".join(line + "\n" for line in kept))
                os.replace(tmp, spill)
            else:
                os.remove(spill)
        except OSError as exc:  # the rows are in the ledger: the next recovery skips them
            log.error("cannot rewrite %s: %s", spill, exc)
        self.rows_recovered += written
        if written:
            log.warning("%d ledger rows written from %s", written, spill)

    # -- reports -------------------------------------------------------------------------

    def usage(self, query: UsageQuery) -> dict[str, Any]:
        where: list[str] = []
        params: list[Any] = []
        if query.key:
            where.append("(u.key_id = ? OR u.key_id IN (SELECT id FROM keys WHERE name = ?))")
            params += [query.key, query.key]
        if query.model:
            where.append("u.model = ?")
            params.append(query.model)
        if query.since is not None:
            where.append("u.ts >= ?")
            params.append(query.since)
        if query.until is not None:
            where.append("u.ts < ?")
            params.append(query.until)
        cond = (" WHERE " + " AND ".join(where)) if where else ""
        sums = (
            "COUNT(*), SUM(u.status = 'ok'), SUM(u.status = 'error'), "
            "SUM(u.status = 'rejected'), SUM(u.status = 'cancelled'), "
            "SUM(u.prompt_tokens), SUM(u.completion_tokens), SUM(u.cached_tokens), "
            "SUM(u.cache_write_tokens), SUM(u.cache_write_1h_tokens), SUM(u.input_cost_usd), "
            "SUM(u.cached_input_cost_usd), SUM(u.output_cost_usd), SUM(u.total_cost_usd)"
        )
        src = "FROM usage u LEFT JOIN keys k ON k.id = u.key_id"
        with self._lock:
            db = self._db()
            # One snapshot for both statements: rows committed meanwhile would make the
            # totals disagree with the groups.
            db.execute("BEGIN")
            try:
                totals = db.execute(f"SELECT {sums} {src}{cond}", params).fetchone()
                if query.group_by:
                    cols = [GROUP_BY[g] for g in query.group_by]
                    names = list(query.group_by)
                    if "key" in names:
                        cols.append("k.name")
                    sql = (
                        f"SELECT {', '.join(cols)}, {sums} {src}{cond} GROUP BY "
                        f"{', '.join(GROUP_BY[g] for g in query.group_by)} "
                        "ORDER BY SUM(u.total_cost_usd) DESC, COUNT(*) DESC LIMIT ?"
                    )
                    rows = db.execute(sql, [*params, query.limit]).fetchall()
                    data = []
                    for r in rows:
                        item: dict[str, Any] = {}
                        for i, g in enumerate(names):
                            item["key_id" if g == "key" else g] = r[i]
                        n = len(names)
                        if "key" in names:
                            item["key_name"] = r[n]
                            n += 1
                        item.update(_sums(r[n:]))
                        data.append(item)
                else:
                    sql = (
                        f"SELECT {', '.join('u.' + f for f in _ROW_FIELDS)}, k.name {src}{cond} "
                        "ORDER BY u.ts DESC, u.id DESC LIMIT ?"
                    )
                    rows = db.execute(sql, [*params, query.limit]).fetchall()
                    data = []
                    for r in rows:
                        item = dict(zip(_ROW_FIELDS, r))
                        item["stream"] = bool(item["stream"])
                        item["key_name"] = r[-1]
                        data.append(item)
            finally:
                db.rollback()
        return {
            "object": "usage",
            "filters": {
                "key": query.key,
                "model": query.model,
                "since": query.since,
                "until": query.until,
            },
            "group_by": list(query.group_by),
            "data": data,
            "totals": _sums(totals),
        }


def _sums(r: Sequence[Any]) -> dict[str, Any]:
    names = (
        "requests",
        "ok",
        "errors",
        "rejected",
        "cancelled",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "cache_write_1h_tokens",
        "input_cost_usd",
        "cached_input_cost_usd",
        "output_cost_usd",
        "total_cost_usd",
    )
    out: dict[str, Any] = {}
    for name, value in zip(names, r):
        if name.endswith("_usd"):
            out[name] = round(float(value or 0.0), 10)
        else:
            out[name] = int(value or 0)
    return out


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str, now: float | None = None) -> float:
    """A time filter: unix seconds, ISO 8601 (UTC when no offset) or a duration ago
    (``30m``, ``24h``, ``7d``)."""
    text = value.strip()
    m = _RELATIVE.match(text)
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):  # not nan, inf: no row would match, silently
            return seconds
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"Unreadable time {value!r}: use unix seconds, ISO 8601 (2025-01-31T12:00:00Z) "
            "or a duration ago such as 30m, 24h, 7d"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def rows_as_dicts(rows: Iterable[UsageRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def usage_row_from(mapping: Mapping[str, Any]) -> UsageRow:
    return UsageRow(**{k: mapping[k] for k in _ROW_FIELDS if k in mapping})
