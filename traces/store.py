"""The trace store: SQLite in WAL mode at `<workspace>/traces.db`.

One connection per `TraceStore`; many processes may write the same file at once (eval workers):
write transactions are `BEGIN IMMEDIATE` with a busy timeout and a retry with backoff, so "database
is locked" never reaches the caller. `synchronous=NORMAL` in WAL mode survives a process crash.

A trace row is written when its episode starts (status `running`, with the writer's pid and a
process-start token) and again when it ends; spans are written as they finish. Opening the store
marks `running` traces whose writer process is gone as `failed`.

Layout (schema v1): `traces` (one row per episode, columns for what queries filter on, JSON for
tags and metadata), `trace_tags`, `spans` (columns for the tree, one JSON column `data` for the
kind-specific payload) and `grades` (primary key (trace_id, grader): re-grading replaces).
`PRAGMA application_id` marks the file as ours and `PRAGMA user_version` holds the schema version;
`_MIGRATIONS[i]` moves a file from version i to i + 1.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tools.errors import SelftuneError
from traces.schemas import SCHEMA_VERSION, Grade, Span, Trace, TraceQuery, TraceStats

APPLICATION_ID = int.from_bytes(b"stTr", "big")  # marks a SQLite file as a selftune trace store
FAILED_STATUSES = ("failed", "error", "max_steps", "timeout")
_SPAN_COLUMNS = ("id", "trace_id", "parent_id", "kind", "name", "start", "end", "status", "error")
_SPAN_PAYLOAD = {"attributes", "llm", "tool", "retrieval"}
_BUSY_DEADLINE_S = 120.0  # total time a write keeps retrying on a locked database
_SQLITE_FULL = 13
_SQLITE_IOERR = 10  # primary code; extended I/O codes keep it in their low byte
_LOW_SPACE = 1 << 20  # bytes: below this a write error is a full disk, not a damaged file


class TraceStoreError(SelftuneError, RuntimeError):
    """The store cannot be used or written; the message names the file and what to do."""


class TraceStoreFullError(TraceStoreError):
    """The disk (or the filesystem holding the store) is full."""


class TraceNotFoundError(TraceStoreError, KeyError):
    """No stored trace has this id (or id prefix)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# --- the writer's identity, so a later open can tell whether it is still alive ---------------


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):  # zombie or dead: killed, not yet reaped
        return None
    return fields[19]


def process_token(pid: int | None = None) -> str:
    """`host:start-time` of a process: together with the pid it survives pid reuse."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{_proc_start_time(pid) or ''}"


def _process_alive(pid: int, token: str) -> bool:
    host, _, start = token.partition(":")
    if host != socket.gethostname():
        return True  # another machine's writer: we cannot tell, so leave it alone
    if os.path.exists("/proc/self/stat"):
        return _proc_start_time(pid) == start if start else _proc_start_time(pid) is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- schema and migrations -------------------------------------------------------------------

_V1_SQL = """
CREATE TABLE traces (
    id TEXT PRIMARY KEY,
    env TEXT, task_id TEXT, model TEXT, adapter TEXT,
    start REAL NOT NULL, "end" REAL,
    status TEXT NOT NULL,
    answer TEXT, error TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}',
    schema_version INTEGER NOT NULL,
    writer_pid INTEGER, writer_token TEXT
);
CREATE INDEX traces_start ON traces(start);
CREATE INDEX traces_env ON traces(env, start);
CREATE INDEX traces_task ON traces(task_id, start);
CREATE INDEX traces_adapter ON traces(adapter, start);
CREATE INDEX traces_status ON traces(status, start);
CREATE TABLE trace_tags (
    tag TEXT NOT NULL, trace_id TEXT NOT NULL, PRIMARY KEY (tag, trace_id)
) WITHOUT ROWID;
CREATE INDEX trace_tags_trace ON trace_tags(trace_id);
CREATE TABLE spans (
    id TEXT PRIMARY KEY,
    trace_id TEXT NOT NULL, parent_id TEXT,
    kind TEXT NOT NULL, name TEXT NOT NULL,
    start REAL NOT NULL, "end" REAL,
    status TEXT NOT NULL, error TEXT,
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX spans_trace ON spans(trace_id, start);
CREATE TABLE grades (
    trace_id TEXT NOT NULL, grader TEXT NOT NULL,
    id TEXT NOT NULL, value REAL NOT NULL, source TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '', flags TEXT NOT NULL DEFAULT '[]', raw TEXT,
    metadata TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL,
    PRIMARY KEY (trace_id, grader)
);
CREATE INDEX grades_value ON grades(value);
"""

# v0: the prototype kept each trace as one JSON document with its spans inline, used
# `start_time`/`end_time` and called success "done".
_V0_STATUS = {"done": "ok"}


def _v0_span(d: dict[str, Any], trace_id: str) -> Span:
    d = dict(d)
    d["start"] = d.pop("start_time", d.get("start", 0.0))
    d["end"] = d.pop("end_time", d.get("end"))
    d["status"] = _V0_STATUS.get(d.get("status", "ok"), d.get("status", "ok"))
    d["trace_id"] = trace_id
    return Span.model_validate(d)


def _migrate_0_to_1(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE traces RENAME TO traces_v0")
    _create_v1(conn)
    for tid, data in conn.execute("SELECT id, data FROM traces_v0").fetchall():
        d = json.loads(data)
        spans = [_v0_span(s, tid) for s in d.pop("spans", [])]
        d["id"] = tid
        d["start"] = d.pop("start_time", d.get("start", 0.0))
        d["end"] = d.pop("end_time", d.get("end"))
        d["status"] = _V0_STATUS.get(d.get("status", "ok"), d.get("status", "ok"))
        d["schema_version"] = 1
        _insert_trace(conn, Trace.model_validate(d), None, None)
        _insert_spans(conn, spans)
    conn.execute("DROP TABLE traces_v0")


def _create_v1(conn: sqlite3.Connection) -> None:
    # statement by statement: executescript would commit the surrounding transaction
    for stmt in _V1_SQL.split(";"):
        if stmt.strip():
            conn.execute(stmt)


# _MIGRATIONS[i] takes a store from version i to i + 1, inside one transaction.
_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_0_to_1]
assert len(_MIGRATIONS) == SCHEMA_VERSION, "add a migration when SCHEMA_VERSION changes"


# --- row <-> schema --------------------------------------------------------------------------


def _trace_params(t: Trace, pid: int | None, token: str | None) -> tuple:
    return (
        t.id, t.env, t.task_id, t.model, t.adapter, t.start, t.end, t.status, t.answer, t.error,
        json.dumps(t.tags), json.dumps(t.metadata, default=str), t.schema_version, pid, token,
    )  # fmt: skip


def _insert_trace(conn: sqlite3.Connection, t: Trace, pid: int | None, token: str | None) -> None:
    conn.execute(
        """INSERT INTO traces (id, env, task_id, model, adapter, start, "end", status, answer,
               error, tags, metadata, schema_version, writer_pid, writer_token)
           VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
           ON CONFLICT(id) DO UPDATE SET env=excluded.env, task_id=excluded.task_id,
               model=excluded.model, adapter=excluded.adapter, start=excluded.start,
               "end"=excluded."end", status=excluded.status, answer=excluded.answer,
               error=excluded.error, tags=excluded.tags, metadata=excluded.metadata,
               schema_version=excluded.schema_version""",
        _trace_params(t, pid, token),
    )
    conn.execute("DELETE FROM trace_tags WHERE trace_id = ?", (t.id,))
    if t.tags:
        conn.executemany(
            "INSERT OR IGNORE INTO trace_tags (tag, trace_id) VALUES (?, ?)",
            [(tag, t.id) for tag in t.tags],
        )


def _insert_spans(conn: sqlite3.Connection, spans: Iterable[Span]) -> None:
    conn.executemany(
        """INSERT OR REPLACE INTO spans (id, trace_id, parent_id, kind, name, start, "end",
               status, error, data) VALUES (?,?,?,?,?,?,?,?,?,?)""",
        [
            (
                s.id,
                s.trace_id,
                s.parent_id,
                s.kind,
                s.name,
                s.start,
                s.end,
                s.status,
                s.error,
                s.model_dump_json(include=_SPAN_PAYLOAD, exclude_none=True),
            )  # fmt: skip
            for s in spans
        ],
    )


_TRACE_SELECT = """SELECT id, env, task_id, model, adapter, start, "end", status, answer, error,
    tags, metadata, schema_version FROM traces t"""


def _row_to_trace(r: sqlite3.Row | tuple) -> Trace:
    return Trace.model_construct(
        id=r[0], env=r[1], task_id=r[2], model=r[3], adapter=r[4], start=r[5], end=r[6],
        status=r[7], answer=r[8], error=r[9], tags=json.loads(r[10]),
        metadata=json.loads(r[11]), schema_version=r[12], spans=[],
    )  # fmt: skip


def _row_to_span(r: tuple) -> Span:
    d = dict(zip(_SPAN_COLUMNS, r[:9], strict=True))
    d.update(json.loads(r[9]))
    return Span.model_validate(d)


def _row_to_grade(r: tuple) -> Grade:
    return Grade(
        trace_id=r[0], grader=r[1], id=r[2], value=r[3], source=r[4], reason=r[5],
        flags=json.loads(r[6]), raw=r[7], metadata=json.loads(r[8]), created=r[9],
    )  # fmt: skip


def _where(q: TraceQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for col, val in (("env", q.env), ("task_id", q.task_id), ("status", q.status)):
        if val is not None:
            clauses.append(f"t.{col} = ?")
            params.append(val)
    if q.adapter is not None:
        if q.adapter == "base":
            clauses.append("t.adapter IS NULL")
        else:
            clauses.append("t.adapter = ?")
            params.append(q.adapter)
    if q.since is not None:
        clauses.append("t.start >= ?")
        params.append(q.since)
    if q.until is not None:
        clauses.append("t.start < ?")
        params.append(q.until)
    if q.tag is not None:
        clauses.append("t.id IN (SELECT trace_id FROM trace_tags WHERE tag = ?)")
        params.append(q.tag)
    if q.min_grade is not None or q.max_grade is not None or q.grader is not None:
        sub = ["g.trace_id = t.id"]
        for cond, val in (
            ("g.value >= ?", q.min_grade),
            ("g.value <= ?", q.max_grade),
            ("g.grader = ?", q.grader),
        ):
            if val is not None:
                sub.append(cond)
                params.append(val)
        clauses.append(f"EXISTS (SELECT 1 FROM grades g WHERE {' AND '.join(sub)})")
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


# --- the store -------------------------------------------------------------------------------


class TraceStore:
    """A SQLite trace store at `path` (created if missing, migrated if old).

    Thread-safe within a process (one connection behind a lock); safe with other processes
    writing the same file. Raises TraceStoreError if `path` is not a selftune trace store.
    """

    def __init__(self, path: str | Path, *, recover: bool = True, timeout_s: float = 10.0):
        self.path = Path(path).expanduser().resolve()
        self._lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise TraceStoreError(
                f"{self.path} is a directory, not a selftune trace store: set [traces] db to a file"
            )
        try:
            self._conn = sqlite3.connect(
                str(self.path), timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise TraceStoreError(f"cannot open trace store {self.path}: {e}") from None
        try:
            self._open(timeout_s)
            if recover:
                self.recover()
        except BaseException:
            self._conn.close()
            raise

    # -- opening -----------------------------------------------------------------------------

    def _foreign(self, why: str) -> TraceStoreError:
        return TraceStoreError(
            f"{self.path} is not a selftune trace store ({why}): move it away or set [traces] db"
        )

    def _unreadable(self, e: sqlite3.DatabaseError) -> TraceStoreError:
        """Why the file cannot be read, with an action that never destroys data."""
        msg = str(e)
        if getattr(e, "sqlite_errorcode", None) == _SQLITE_FULL or "full" in msg:
            return TraceStoreFullError(
                f"the disk holding {self.path} is full ({msg}): free space, then run again; "
                "the store itself is not damaged, so do not move or delete it"
            )
        if "malformed" in msg or "corrupt" in msg:
            return self._damaged(msg)
        code = getattr(e, "sqlite_errorcode", None)
        if (code is not None and code & 0xFF == _SQLITE_IOERR) or "disk I/O error" in msg:
            # a full disk often shows as an I/O error (the -wal/-shm files cannot be made)
            try:
                free = shutil.disk_usage(self.path.parent).free
            except OSError:
                free = None
            if free is not None and free < _LOW_SPACE:
                return TraceStoreFullError(
                    f"the disk holding {self.path} is full ({free} bytes free; {msg}): free "
                    "space, then run again; the store itself is not damaged, so do not move "
                    "or delete it"
                )
            return TraceStoreError(
                f"cannot read or write the trace store {self.path} ({msg}): check the disk "
                "(free space, permissions, `dmesg`); the file may well be intact, so do not "
                "move or delete it"
            )
        return self._foreign(msg)

    def _damaged(self, why: str) -> TraceStoreError:
        return TraceStoreError(
            f"the trace store {self.path} is damaged ({why}); selftune will not write to it. "
            f"Keep the file, and recover what it holds with `sqlite3 {self.path} .recover | "
            f"sqlite3 {self.path.with_suffix('.recovered.db')}`, then set [traces] db to the "
            "recovered file (or restore a backup)"
        )

    def _check_integrity(self) -> None:
        """PRAGMA quick_check: a damaged file is refused at open instead of written into."""
        try:
            rows = self._conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as e:
            raise self._unreadable(e) from None
        problems = [r[0] for r in rows if r[0] != "ok"]
        if problems:
            raise self._damaged("; ".join(problems[:3]))

    def _version(self) -> int | None:
        """The file's schema version, None for an empty file; raises if the file is not ours.

        Only reads: a foreign file must never be modified.
        """
        c = self._conn
        try:
            app_id = c.execute("PRAGMA application_id").fetchone()[0]
            version = c.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            raise self._unreadable(e) from None
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise TraceStoreError(
                    f"{self.path} has trace schema v{version}, newer than this selftune "
                    f"(v{SCHEMA_VERSION}): upgrade selftune or set [traces] db to another file"
                )
            return version
        if not tables:
            return None
        if app_id == 0 and version == 0 and tables == {"traces"}:
            cols = {r[1] for r in c.execute("PRAGMA table_info(traces)")}
            if cols == {"id", "data"}:
                return 0  # the v0 prototype layout
        found = ", ".join(sorted(tables)[:5])
        raise self._foreign(f"a SQLite database with tables {found}")

    def _open(self, timeout_s: float) -> None:
        c = self._conn
        c.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        version = self._version()
        if version is not None:
            self._check_integrity()
        if c.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._retry(lambda: c.execute("PRAGMA journal_mode = WAL"))
        c.execute("PRAGMA synchronous = NORMAL")  # durable to a process crash in WAL mode
        if version == SCHEMA_VERSION:
            return

        def upgrade(conn: sqlite3.Connection) -> None:
            # re-read inside the write lock: another process may have upgraded meanwhile
            current = self._version()
            if current is None:
                _create_v1(conn)
                current = 1
            for step in range(current, SCHEMA_VERSION):
                _MIGRATIONS[step](conn)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        self._write(upgrade)

    # -- writing -----------------------------------------------------------------------------

    def _retry(self, fn: Callable[[], Any]) -> Any:
        """Run `fn`, retrying with backoff while another process holds the write lock."""
        deadline = time.monotonic() + _BUSY_DEADLINE_S
        delay = 0.005
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                msg = str(e)
                if ("locked" not in msg and "busy" not in msg) or time.monotonic() > deadline:
                    raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run `fn(conn)` in one write transaction; map SQLite failures to TraceStoreError."""
        c = self._conn

        def attempt() -> Any:
            c.execute("BEGIN IMMEDIATE")
            try:
                out = fn(c)
                c.execute("COMMIT")
                return out
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

        with self._lock:
            try:
                return self._retry(attempt)
            except sqlite3.Error as e:
                code = getattr(e, "sqlite_errorcode", None)
                if code == _SQLITE_FULL or "full" in str(e):
                    raise TraceStoreFullError(
                        f"the disk holding {self.path} is full ({e}): nothing of this write "
                        "was stored (earlier traces are intact); free space or prune old "
                        "traces with `selftune traces prune`"
                    ) from None
                raise TraceStoreError(f"writing to trace store {self.path} failed: {e}") from e

    def write(self, traces: Sequence[Trace] = (), spans: Sequence[Span] = ()) -> None:
        """Write trace rows (without their spans) and spans in one transaction.

        A trace still `running` is stamped with this process's pid and start token, so a later
        open can mark it failed if this process dies first. Rows with the same id are replaced.
        """
        pid, token = os.getpid(), process_token()

        def do(conn: sqlite3.Connection) -> None:
            for t in traces:
                _insert_trace(conn, t, pid, token)
            if spans:
                _insert_spans(conn, spans)

        self._write(do)

    def save(self, trace: Trace) -> None:
        """Write one whole trace, with its spans, in one transaction."""
        self.write([trace], trace.spans)

    def add_grade(self, grade: Grade) -> Grade:
        """Store a grade; an earlier grade of the same trace by the same grader is replaced."""

        def do(conn: sqlite3.Connection) -> None:
            if (
                conn.execute("SELECT 1 FROM traces WHERE id = ?", (grade.trace_id,)).fetchone()
                is None
            ):
                raise TraceNotFoundError(
                    f"cannot grade trace {grade.trace_id}: it is not in {self.path}"
                )
            conn.execute(
                """INSERT OR REPLACE INTO grades (trace_id, grader, id, value, source, reason,
                       flags, raw, metadata, created) VALUES (?,?,?,?,?,?,?,?,?,?)""",
                (
                    grade.trace_id,
                    grade.grader,
                    grade.id,
                    grade.value,
                    grade.source,
                    grade.reason,
                    json.dumps(grade.flags),
                    grade.raw,
                    json.dumps(grade.metadata, default=str),
                    grade.created,
                ),  # fmt: skip
            )

        self._write(do)
        return grade

    def mark_session(self, trace_id: str, patch: dict[str, Any]) -> list[str]:
        """Merge `patch` into the metadata of the trace with this id (or unique prefix) and of
        every trace of its session (`metadata.session_id`), in one transaction; returns their
        ids. A trace with no session is marked alone. Raises TraceNotFoundError."""
        tid = self.resolve_id(trace_id)
        text = json.dumps(patch, default=str)

        def do(conn: sqlite3.Connection) -> list[str]:
            (session,) = conn.execute(
                "SELECT json_extract(metadata, '$.session_id') FROM traces WHERE id = ?", (tid,)
            ).fetchone()
            where, params = ("id = ?", (tid,)) if session is None else (
                "json_extract(metadata, '$.session_id') = ?", (session,)
            )  # fmt: skip
            ids = [r[0] for r in conn.execute(f"SELECT id FROM traces WHERE {where}", params)]
            conn.execute(
                f"UPDATE traces SET metadata = json_patch(metadata, ?) WHERE {where}",
                (text, *params),
            )
            return sorted(ids)

        return self._write(do)

    def recover(self) -> int:
        """Mark `running` traces whose writer process is gone as `failed`; returns how many."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, writer_pid, writer_token FROM traces WHERE status = 'running'"
            ).fetchall()
        dead = [
            (tid, pid)
            for tid, pid, token in rows
            if pid is not None and token is not None and not _process_alive(pid, token)
        ]
        if not dead:
            return 0

        def do(conn: sqlite3.Connection) -> None:
            for tid, pid in dead:
                conn.execute(
                    """UPDATE traces SET status = 'failed', error = ?,
                           "end" = COALESCE((SELECT MAX("end") FROM spans WHERE trace_id = ?), start)
                       WHERE id = ? AND status = 'running'""",
                    (f"the process that recorded it (pid {pid}) died before the episode ended",
                     tid, tid),
                )  # fmt: skip

        self._write(do)
        return len(dead)

    def prune(self, older_than_s: float | None = None, env: str | None = None) -> int:
        """Delete traces (with their spans, tags and grades) that started more than
        `older_than_s` seconds ago and/or belong to `env`, then vacuum. Returns how many.
        Traces still running (their writer is alive: `recover` marks the dead ones) are kept."""
        if older_than_s is None and env is None:
            raise ValueError("prune needs older_than_s or env (refusing to delete every trace)")
        q = TraceQuery(
            env=env, until=None if older_than_s is None else time.time() - older_than_s, limit=None
        )
        where, params = _where(q)

        def do(conn: sqlite3.Connection) -> int:
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS doomed (id TEXT PRIMARY KEY)")
            conn.execute("DELETE FROM doomed")
            # an episode still being written would come back later with half its spans
            live = "t.status = 'running'"
            keep = f"{where} AND NOT ({live})" if where else f" WHERE NOT ({live})"
            conn.execute(f"INSERT INTO doomed SELECT t.id FROM traces t{keep}", params)
            for table in ("spans", "grades", "trace_tags"):
                conn.execute(f"DELETE FROM {table} WHERE trace_id IN (SELECT id FROM doomed)")
            n = conn.execute("DELETE FROM traces WHERE id IN (SELECT id FROM doomed)").rowcount
            conn.execute("DELETE FROM doomed")
            return n

        n = self._write(do)
        self.vacuum()
        return n

    def vacuum(self) -> None:
        """Give freed pages back to the filesystem."""
        with self._lock:
            try:
                self._retry(lambda: self._conn.execute("VACUUM"))
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                raise TraceStoreError(f"vacuum of {self.path} failed: {e}") from e

    # -- reading -----------------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._retry(lambda: self._conn.execute(sql, params).fetchall())
            except sqlite3.Error as e:
                raise TraceStoreError(f"reading trace store {self.path} failed: {e}") from e

    def resolve_id(self, id_or_prefix: str) -> str:
        """The full id of the one trace whose id is or starts with `id_or_prefix`."""
        if self._read("SELECT 1 FROM traces WHERE id = ?", (id_or_prefix,)):
            return id_or_prefix
        hits = self._read(
            "SELECT id FROM traces WHERE id >= ? AND id < ? ORDER BY id LIMIT 6",
            (id_or_prefix, id_or_prefix + "\uffff"),
        )
        if not hits:
            raise TraceNotFoundError(f"no trace with id {id_or_prefix!r} in {self.path}")
        if len(hits) > 1:
            shown = ", ".join(h[0][: len(id_or_prefix) + 4] for h in hits[:5])
            raise TraceNotFoundError(
                f"trace id prefix {id_or_prefix!r} is ambiguous ({shown}, ...): give more characters"
            )
        return hits[0][0]

    def get(self, trace_id: str, with_spans: bool = True) -> Trace:
        """The trace with this id (or unique id prefix), its spans in start order if asked.
        Raises TraceNotFoundError."""
        tid = self.resolve_id(trace_id)
        rows = self._read(_TRACE_SELECT + " WHERE id = ?", (tid,))
        trace = _row_to_trace(rows[0])
        if with_spans:
            trace.spans = self.spans(tid)
        return trace

    def spans(self, trace_id: str) -> list[Span]:
        """A trace's stored spans, in start order."""
        rows = self._read(
            """SELECT id, trace_id, parent_id, kind, name, start, "end", status, error, data
               FROM spans WHERE trace_id = ? ORDER BY start, rowid""",
            (trace_id,),
        )
        return [_row_to_span(r) for r in rows]

    def query(
        self, q: TraceQuery | None = None, *, with_spans: bool = False, **filters: Any
    ) -> list[Trace]:
        """Traces matching `q` (or the same fields as keywords), newest first."""
        q = _as_query(q, filters)
        where, params = _where(q)
        sql = _TRACE_SELECT + where + " ORDER BY t.start DESC, t.id"
        if q.limit is not None or q.offset:
            sql += " LIMIT ? OFFSET ?"
            params += [-1 if q.limit is None else q.limit, q.offset]
        traces = [_row_to_trace(r) for r in self._read(sql, params)]
        if with_spans:
            for t in traces:
                t.spans = self.spans(t.id)
        return traces

    def count(self, q: TraceQuery | None = None, **filters: Any) -> int:
        """How many traces match (limit and offset ignored)."""
        where, params = _where(_as_query(q, filters))
        return self._read("SELECT COUNT(*) FROM traces t" + where, params)[0][0]

    def grades(self, trace_id: str) -> list[Grade]:
        """A trace's grades, oldest first (one per grader)."""
        rows = self._read(
            """SELECT trace_id, grader, id, value, source, reason, flags, raw, metadata, created
               FROM grades WHERE trace_id = ? ORDER BY created""",
            (trace_id,),
        )
        return [_row_to_grade(r) for r in rows]

    def stats(self, q: TraceQuery | None = None, **filters: Any) -> list[TraceStats]:
        """Counts, success rates and mean grades per (environment, adapter)."""
        where, params = _where(_as_query(q, filters).model_copy(update={"limit": None}))
        failed = ",".join(f"'{s}'" for s in FAILED_STATUSES)
        rows = self._read(
            f"""SELECT t.env, t.adapter, COUNT(*), SUM(t.status = 'ok'),
                    SUM(t.status IN ({failed})), SUM(t.status = 'running'),
                    COUNT(g.trace_id), AVG(g.v)
                FROM traces t LEFT JOIN
                    (SELECT trace_id, AVG(value) AS v FROM grades GROUP BY trace_id) g
                    ON g.trace_id = t.id
                {where}
                GROUP BY t.env, t.adapter ORDER BY t.env, t.adapter""",
            params,
        )
        return [
            TraceStats(
                env=r[0],
                adapter=r[1],
                total=r[2],
                ok=r[3],
                failed=r[4],
                running=r[5],
                graded=r[6],
                mean_grade=r[7],
            )  # fmt: skip
            for r in rows
        ]

    def schema_version(self) -> int:
        return self._read("PRAGMA user_version")[0][0]

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TraceStore({str(self.path)!r})"


def _as_query(q: TraceQuery | None, filters: dict[str, Any]) -> TraceQuery:
    if q is None:
        return TraceQuery(**filters)
    return q.model_copy(update=filters) if filters else q


def export_jsonl(
    store: TraceStore,
    path: str | Path,
    q: TraceQuery | None = None,
    extra_patterns: Sequence[str] = (),
) -> int:
    """Write matching traces, scrubbed, one JSON object per line: the trace with its spans and
    a `grades` list. Returns how many. Stored traces are not changed."""
    from traces.scrub import scrub_grade, scrub_trace

    q = (q or TraceQuery()).model_copy(update={"limit": q.limit if q else None})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for t in store.query(q, with_spans=True):
            row = scrub_trace(t, extra_patterns).model_dump(mode="json")
            row["grades"] = [  # a grade's reason quotes the answer: it leaves scrubbed too
                scrub_grade(g, extra_patterns).model_dump(mode="json") for g in store.grades(t.id)
            ]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
