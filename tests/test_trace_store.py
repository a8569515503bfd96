"""The SQLite trace store: queries, grades, retention, migrations, and failure modes for real
(a corrupt file, a full tmpfs, a writer killed with SIGKILL, several writer processes)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from _traces_fixtures import ADD, PYTHON, make_trace, subprocess_env

from traces.schemas import SCHEMA_VERSION, Grade, TraceQuery
from traces.store import TraceNotFoundError, TraceStore, TraceStoreError, TraceStoreFullError


@pytest.fixture
def store(tmp_path: Path):
    s = TraceStore(tmp_path / "traces.db")
    yield s
    s.close()


def test_round_trip_keeps_every_field_and_uses_wal(store: TraceStore):
    t = make_trace(calls=[ADD, ADD], tags=["run:a"], metadata={"seed": 3})
    store.save(t)
    got = store.get(t.id)
    assert got.model_dump() == t.model_dump()
    assert got.spans[1].llm.tool_calls[0].raw_arguments == '{"e": "2+3"}'
    assert store.get(t.id[:8], with_spans=False).spans == []
    mode = sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert store.schema_version() == SCHEMA_VERSION


def test_queries_filter_and_order_newest_first(store: TraceStore):
    base = time.time() - 1000
    a = make_trace(env="calc", task_id="t1", adapter="v1", start=base, tags=["x"])
    b = make_trace(env="calc", task_id="t2", start=base + 10)
    c = make_trace(env="web", task_id="t1", adapter="v2", start=base + 20, tags=["x", "y"])
    c.status = "error"
    for t in (a, b, c):
        store.save(t)
    ids = lambda q=None, **kw: [t.id for t in store.query(q, **kw)]  # noqa: E731
    assert ids() == [c.id, b.id, a.id]
    assert ids(env="calc") == [b.id, a.id]
    assert ids(task_id="t1") == [c.id, a.id]
    assert ids(adapter="v1") == [a.id]
    assert ids(adapter="base") == [b.id]
    assert ids(status="error") == [c.id]
    assert ids(tag="x") == [c.id, a.id]
    assert ids(tag="y") == [c.id]
    assert ids(since=base + 5) == [c.id, b.id]
    assert ids(until=base + 5) == [a.id]
    assert ids(limit=1, offset=1) == [b.id]
    assert store.count(env="calc") == 2
    store.add_grade(Grade(trace_id=a.id, value=0.2, source="verifier", grader="numeric"))
    store.add_grade(Grade(trace_id=b.id, value=0.9, source="verifier", grader="numeric"))
    store.add_grade(Grade(trace_id=c.id, value=0.9, source="human", grader="human:al"))
    assert ids(min_grade=0.5) == [c.id, b.id]
    assert ids(min_grade=0.5, grader="numeric") == [b.id]
    assert ids(max_grade=0.5) == [a.id]
    assert ids(TraceQuery(env="calc", min_grade=0.1, max_grade=0.3)) == [a.id]


def test_regrading_replaces_per_grader_and_grading_unknown_trace_fails(store: TraceStore):
    t = make_trace()
    store.save(t)
    store.add_grade(Grade(trace_id=t.id, value=0.0, source="judge", grader="judge:x", raw="no"))
    store.add_grade(Grade(trace_id=t.id, value=1.0, source="judge", grader="judge:x", raw="yes"))
    store.add_grade(Grade(trace_id=t.id, value=1.0, source="human", grader="human:bo"))
    grades = {g.grader: g for g in store.grades(t.id)}
    assert len(grades) == 2 and grades["judge:x"].value == 1.0 and grades["judge:x"].raw == "yes"
    with pytest.raises(TraceNotFoundError, match="not in"):
        store.add_grade(Grade(trace_id="nope", value=1, source="human", grader="h"))


def test_id_prefix_must_be_unique(store: TraceStore):
    t1, t2 = make_trace(), make_trace()
    t1.id, t2.id = "abc1" + "0" * 28, "abc2" + "0" * 28
    store.save(t1)
    store.save(t2)
    assert store.get("abc1").id == t1.id
    with pytest.raises(TraceNotFoundError, match="ambiguous"):
        store.get("abc")
    with pytest.raises(TraceNotFoundError, match="no trace"):
        store.get("zzz")


def test_stats_count_success_by_env_and_adapter(store: TraceStore):
    for env, adapter, status in [
        ("calc", None, "ok"), ("calc", None, "failed"), ("calc", None, "ok"),
        ("calc", "v1", "ok"), ("web", None, "timeout"), ("web", None, "running"),
    ]:  # fmt: skip
        t = make_trace(env=env, adapter=adapter)
        t.status = status
        store.save(t)
    first = store.query(env="calc", adapter="v1")[0]
    store.add_grade(Grade(trace_id=first.id, value=0.5, source="verifier", grader="n"))
    rows = {(s.env, s.adapter): s for s in store.stats()}
    calc = rows[("calc", None)]
    assert (calc.total, calc.ok, calc.failed, calc.success_rate) == (3, 2, 1, pytest.approx(2 / 3))
    assert rows[("calc", "v1")].mean_grade == 0.5 and rows[("calc", "v1")].graded == 1
    web = rows[("web", None)]
    assert (web.running, web.success_rate) == (1, 0.0)


def test_prune_by_age_and_env_deletes_spans_and_grades(store: TraceStore):
    old = make_trace(env="calc", start=time.time() - 40 * 86400)
    new = make_trace(env="calc")
    other = make_trace(env="web")
    for t in (old, new, other):
        store.save(t)
        store.add_grade(Grade(trace_id=t.id, value=1, source="verifier", grader="n"))
    assert store.prune(older_than_s=30 * 86400) == 1
    assert {t.id for t in store.query()} == {new.id, other.id}
    assert store.spans(old.id) == [] and store.grades(old.id) == []
    assert store.prune(env="web") == 1
    assert [t.id for t in store.query()] == [new.id]
    with pytest.raises(ValueError, match="older_than_s or env"):
        store.prune()


def test_v0_layout_is_migrated_forward(tmp_path: Path):
    """The prototype stored one JSON document per trace with inline spans and 'done' status."""
    path = tmp_path / "traces.db"
    tid, sid = uuid.uuid4().hex, uuid.uuid4().hex
    doc = {
        "env": "calc", "task_id": "t9", "start_time": 100.0, "end_time": 101.0, "status": "done",
        "answer": "5",
        "spans": [{"id": sid, "kind": "tool", "name": "calculator", "start_time": 100.2,
                   "end_time": 100.3, "status": "done",
                   "tool": {"name": "calculator", "arguments": {"e": "2+3"}, "result": "5"}}],
    }  # fmt: skip
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE traces (id TEXT PRIMARY KEY, data TEXT)")
    conn.execute("INSERT INTO traces VALUES (?, ?)", (tid, json.dumps(doc)))
    conn.commit()
    conn.close()
    with TraceStore(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        t = store.get(tid)
        assert (t.status, t.start, t.end, t.answer, t.schema_version) == (
            "ok",
            100.0,
            101.0,
            "5",
            1,
        )
        assert t.spans[0].id == sid and t.spans[0].status == "ok"
        assert t.spans[0].tool.arguments == {"e": "2+3"}
        assert store.query(env="calc")[0].id == tid
    with TraceStore(path) as again:  # reopening a migrated store changes nothing
        assert again.get(tid).model_dump() == t.model_dump()


def test_corrupt_or_foreign_file_is_named_and_never_overwritten(tmp_path: Path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all " * 500)
    with pytest.raises(TraceStoreError, match=r"junk\.db is not a selftune trace store .*move it"):
        TraceStore(junk)
    assert junk.read_bytes() == b"not a database at all " * 500
    foreign = tmp_path / "app.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before = foreign.read_bytes()
    with pytest.raises(TraceStoreError, match=r"app\.db is not a selftune trace store .*users"):
        TraceStore(foreign)
    assert foreign.read_bytes() == before
    assert not Path(str(foreign) + "-wal").exists()


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs (we are root here); skipped where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_raises_a_clear_error_and_keeps_stored_traces(small_fs: Path):
    store = TraceStore(small_fs / "traces.db")
    saved = []
    with pytest.raises(TraceStoreFullError, match="is full"):
        for _ in range(10_000):
            t = make_trace()
            t.spans[1].llm.completion = os.urandom(20_000).hex()  # ~40 kB per trace
            store.save(t)
            saved.append(t)
    assert len(saved) > 3
    for t in saved:
        assert store.get(t.id).model_dump() == t.model_dump()
    store.close()
    with TraceStore(small_fs / "traces.db") as again:
        assert again.count() == len(saved)


_WRITER = r"""
import sys, time
from traces.store import TraceStore
from traces.tracer import Tracer
from traces.schemas import LlmData, ToolData
tracer = Tracer(TraceStore(sys.argv[1]))
for i in range(int(sys.argv[2])):
    with tracer.trace(env=sys.argv[3], task_id=f"t{i}") as t:
        if sys.argv[4] == "slow":
            tracer.flush()  # the running row is on disk
            print("running", t.id, flush=True)
        with tracer.span("llm", "chat", llm=LlmData(messages=[{"role": "user", "content": "q"}])):
            pass
        for _ in range(2):
            with tracer.span("tool", "calc", tool=ToolData(name="calc")):
                if sys.argv[4] == "slow":
                    time.sleep(0.02)
        t.answer = str(i)
    if sys.argv[4] == "slow":
        print("done", t.id, flush=True)
tracer.close()
"""


def test_sigkill_mid_stream_keeps_completed_traces_and_fails_the_interrupted(tmp_path: Path):
    db = tmp_path / "traces.db"
    TraceStore(db).close()
    p = subprocess.Popen(
        [PYTHON, "-c", _WRITER, str(db), "100000", "calc", "slow"],
        stdout=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    done: list[str] = []
    running = None
    assert p.stdout is not None
    for line in p.stdout:
        kind, tid = line.split()
        if kind == "done":
            done.append(tid)
        elif len(done) >= 5:
            running = tid
            time.sleep(0.01)  # inside its first tool span
            os.kill(p.pid, signal.SIGKILL)
            break
    p.wait()
    assert running is not None and p.returncode == -signal.SIGKILL
    with TraceStore(db) as store:
        for tid in done:
            t = store.get(tid)
            assert t.status == "ok" and len(t.spans) == 3, t
        lost = store.get(running)
        assert lost.status == "failed"
        assert f"pid {p.pid}" in lost.error and "died" in lost.error
        assert store.count(status="running") == 0


def test_four_processes_write_at_once_without_errors(tmp_path: Path):
    db = tmp_path / "traces.db"
    TraceStore(db).close()
    procs = [
        subprocess.Popen(
            [PYTHON, "-c", _WRITER, str(db), "200", f"env{i}", "fast"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )  # fmt: skip
        for i in range(4)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "locked" not in err and "Error" not in err
    with TraceStore(db) as store:
        assert store.count(limit=None) == 800
        for i in range(4):
            assert store.count(env=f"env{i}", status="ok") == 200
        n_spans = sqlite3.connect(db).execute("SELECT COUNT(*) FROM spans").fetchone()[0]
        assert n_spans == 800 * 3


def test_a_damaged_store_is_refused_at_open_with_a_safe_action(tmp_path: Path):
    path = tmp_path / "traces.db"
    with TraceStore(path) as store:
        for i in range(300):
            store.save(make_trace(calls=[ADD], task_id=f"t{i}"))
    with TraceStore(path):  # checkpoints the WAL into the file
        pass
    size = path.stat().st_size
    with open(path, "r+b") as f:  # scribble over pages in the middle of the file
        f.seek(size // 2)
        f.write(os.urandom(8192))
    before = path.read_bytes()
    with pytest.raises(TraceStoreError, match="is damaged") as err:
        TraceStore(path)
    assert ".recover" in str(err.value) and "move it away" not in str(err.value)
    assert path.read_bytes() == before  # refused without writing a byte


def test_a_full_disk_is_never_reported_as_a_foreign_file(tmp_path: Path):
    store = TraceStore(tmp_path / "traces.db")
    err = store._unreadable(sqlite3.OperationalError("database or disk is full"))
    assert isinstance(err, TraceStoreFullError)
    assert "do not move or delete" in str(err) and "move it away" not in str(err)


def test_prune_keeps_the_traces_still_being_written(tmp_path: Path):
    store = TraceStore(tmp_path / "traces.db")
    done = make_trace(start=time.time() - 3600)
    live = make_trace(start=time.time() - 3600)
    live.status, live.end = "running", None
    store.save(done)
    store.write([live])  # recorded by this (alive) process, not finished yet
    assert store.prune(older_than_s=60) == 1
    assert store.get(live.id).status == "running"
    with pytest.raises(TraceNotFoundError):
        store.get(done.id)
