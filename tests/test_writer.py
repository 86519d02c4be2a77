"""Result writes on a real SQLite database, and the upserts on a real PostgreSQL too: ``Database.record_outcomes``
and the group-committing ``ResultWriter``."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import event, text

from db.store import Database
from db.writer import CommitPolicy, ResultWriter
from neuron.errors import RetryableError
from neuron.work import FileEntry, FrameResult, InstanceEntry, InstanceHeader, LabelScore, Outcome, Requeue, Status

from .conftest import empty_database_url

pytestmark = pytest.mark.timeout(60)
CONFIG_HASH = "c" * 64
LABELS = ("Atelectasis", "Effusion", "Nodule")


def header(uid: str) -> InstanceHeader:
    return InstanceHeader(uid, "1.2.3.study", "1.2.3.series", None, "CR", "CHEST", "MONOCHROME1", None, 64, 64, 1)


@pytest.fixture
def db(tmp_path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
    database.create()
    database.ensure_config(CONFIG_HASH, "xrv-densenet121-res224-all", {"test": True})
    yield database
    database.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path) -> Database:
    """The same tests on both databases: PostgreSQL writes the findings with COPY, and upserts where a row exists."""
    database = Database(empty_database_url(request, tmp_path, request.param))
    database.create()
    database.ensure_config(CONFIG_HASH, "xrv-densenet121-res224-all", {"test": True})
    yield database
    database.dispose()


def index(db: Database, n: int, prefix: str = "1.2.3.") -> list[str]:
    uids = [f"{prefix}{i}" for i in range(n)]
    db.add_files([FileEntry(f"/archive/{uid}.dcm", 10, 1, Status.QUEUED, None, uid,
                            InstanceEntry(header(uid), "chest-xray", Status.QUEUED)) for uid in uids])
    return uids


def done(uid: str, probability: float = 0.25, frames: int = 1, worker: str = "host/cpu") -> Outcome:
    results = tuple(FrameResult(f, "xrv-densenet121-res224-all", "untrained", CONFIG_HASH, True, tuple(
        LabelScore(label, probability + 0.1 * k, 0.01, k + 1, f"/heat/{k}.png" if k == 0 else None, k == 2)
        for k, label in enumerate(LABELS))) for f in range(frames))
    return Outcome(uid, Status.DONE, None, results, worker=worker)


def rows(db: Database, query: str) -> list[tuple]:
    """What a separate connection reads: committed rows only."""
    if db.engine.dialect.name == "sqlite":
        with sqlite3.connect(db.engine.url.database) as conn:
            return conn.execute(query).fetchall()
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(query))]


def test_a_late_commit_for_an_instance_already_done_changes_nothing_and_a_replace_does(any_db):
    """A worker cut off past the visibility timeout commits after another worker redid its study
    (tests/test_multihost.py): the findings already reported stay, row for row; a rescreen's ``replace`` still
    writes; outcomes of one instance twice in one commit (a redelivery in the same group) keep the last; a late
    failure does not undo a done instance."""
    db = any_db
    (a, b) = index(db, 2)
    db.record_outcomes([done(a, 0.2), done(b, 0.1), done(b, 0.3)])
    before = rows(db, "select * from predictions order by sop_instance_uid, label")
    assert rows(db, f"select probability from predictions where sop_instance_uid = '{b}' and rank = 1") == [(0.3,)]
    db.record_outcomes([done(a, 0.5, worker="late/cpu"), Outcome(b, Status.FAILED, "late")])
    assert rows(db, "select * from predictions order by sop_instance_uid, label") == before
    assert dict(rows(db, "select sop_instance_uid, status from instances")) == {a: "done", b: "done"}
    db.record_outcomes([done(a, 0.6, worker="rescreen/cpu")], replace=[a])
    assert rows(db, f"select probability, worker from predictions where sop_instance_uid = '{a}' and rank = 1") == [
        (0.6, "rescreen/cpu")]
    assert rows(db, "select count(*) from predictions") == [(2 * len(LABELS),)]


def test_record_outcomes_upserts_on_the_natural_key_and_sets_both_statuses(any_db):
    db = any_db
    a, b, c = index(db, 3)
    db.record_outcomes([done(a, 0.2, frames=2), done(b, 0.3), Outcome(c, Status.FAILED, "decode failed")])
    assert rows(db, "select count(*) from predictions") == [(3 * len(LABELS),)]
    got = rows(db, "select frame, label, probability, rank, heatmap_path, needs_review, worker from predictions "
                   f"where sop_instance_uid = '{a}' order by frame, label")
    assert len(got) == 2 * len(LABELS)
    assert got[0] == (0, "Atelectasis", 0.2, 1, "/heat/0.png", 0, "host/cpu")
    assert got[1][2] == pytest.approx(0.3) and got[2][5] == 1
    assert dict(rows(db, "select sop_instance_uid, status from instances")) == {a: "done", b: "done", c: "failed"}
    assert rows(db, f"select status, reason from files where sop_instance_uid = '{c}'") == [("failed",
                                                                                              "decode failed")]


def test_a_rescreen_committed_without_replace_overwrites_the_rows_it_finds(any_db):
    """A study screened again through the queue (``neuron rescreen --enqueue``) keeps its findings until the new ones
    are committed, and its worker commits without ``replace``: its rows' keys exist, so PostgreSQL's COPY is refused
    and the upsert writes them, as on SQLite; a commit of fresh instances beside it goes in whole either way."""
    db = any_db
    a, b = index(db, 2)
    db.record_outcomes([done(a, 0.2)])
    assert db.requeue(Requeue.RESCREEN, sop_uids=[a]) == [a]
    db.record_outcomes([done(a, 0.7, worker="again/cpu"), done(b, 0.4)])
    got = rows(db, "select sop_instance_uid, probability, worker, heatmap_path from predictions where rank = 1 "
                   "order by sop_instance_uid")
    assert got == [(a, 0.7, "again/cpu", "/heat/0.png"), (b, 0.4, "host/cpu", "/heat/0.png")]
    assert rows(db, "select count(*), count(heatmap_path) from predictions") == [(2 * len(LABELS), 2)]
    assert dict(rows(db, "select sop_instance_uid, status from instances")) == {a: "done", b: "done"}


def test_findings_read_back_exactly_what_was_committed(any_db):
    """Every value of a predictions row as committed: doubles to the last bit (COPY's CSV carries ``repr``), NULLs as
    NULL, and an empty worker name as an empty string, not NULL (the upsert writes a batch holding one)."""
    db = any_db
    a, b = index(db, 2)
    tricky = 0.1 + 0.2  # 0.30000000000000004: a double whose shortest decimal form is long
    db.record_outcomes([done(a, tricky, worker='host, "quoted"/cpu')])
    db.record_outcomes([done(b, 1 / 3, worker="")])
    got = dict(rows(db, "select sop_instance_uid || ':' || label, probability from predictions"))
    assert got[f"{a}:Atelectasis"] == tricky and got[f"{b}:Effusion"] == 1 / 3 + 0.1
    assert dict(rows(db, "select sop_instance_uid, worker from predictions where rank = 1")) == {
        a: 'host, "quoted"/cpu', b: ""}
    assert rows(db, "select count(*) from predictions where heatmap_path is null") == [(2 * (len(LABELS) - 1),)]


def test_record_outcomes_leaves_duplicate_copies_of_a_file_alone(db):
    (a,) = index(db, 1)
    db.add_files([FileEntry("/archive/copy.dcm", 10, 1, Status.QUEUED, None, a,
                            InstanceEntry(header(a), "chest-xray", Status.QUEUED))])
    db.record_outcomes([done(a)])
    assert dict(rows(db, "select path, status from files")) == {f"/archive/{a}.dcm": "done",
                                                                "/archive/copy.dcm": "duplicate"}


def test_record_outcomes_keeps_the_last_of_repeated_keys_in_one_call(any_db):
    db = any_db
    (a,) = index(db, 1)
    db.record_outcomes([done(a, 0.1), done(a, 0.4)])
    assert rows(db, "select probability from predictions where label = 'Atelectasis'") == [(0.4,)]


def test_record_outcomes_compiles_each_statement_once(db):
    uids = index(db, 31)
    compiled = set()

    def seen(conn, cursor, statement, parameters, context, executemany):
        if context is not None and context.compiled is not None:
            compiled.add(id(context.compiled))

    event.listen(db.engine, "before_cursor_execute", seen)
    db.record_outcomes([done(u) for u in uids[:5]])
    first = len(compiled)
    db.record_outcomes([done(u, frames=2) for u in uids[5:20]])
    db.record_outcomes([done(u) for u in uids[20:30]] + [Outcome(uids[30], Status.FAILED, "x")])
    # the look-up that locks the outcomes' instances (db.store._finished_elsewhere), two status updates and the
    # studies summary's three (db.studies.refresh_studies: the commit's studies, their aggregate, the update), each
    # compiled once (the findings upsert is a plain DBAPI statement: never compiled); a failure adds the look-up of a
    # duplicate copy to screen it from (db.store._rescue_from_copies), compiled once too
    assert first == 6 and len(compiled) == first + 1
    db.record_outcomes([Outcome(uids[1], Status.FAILED, "y"), Outcome(uids[2], Status.FAILED, "z")])
    assert len(compiled) == first + 1


def test_commit_policy_commits_by_size_or_by_age_of_the_first_waiting_outcome():
    policy = CommitPolicy(max_outcomes=4, max_delay=0.2)
    assert policy.wait_for(now=10.0) is None and not policy.due(now=10.0)
    policy.add(1, now=10.0)
    policy.add(2, now=10.15)
    assert not policy.due(now=10.19) and policy.wait_for(now=10.15) == pytest.approx(0.05)
    assert policy.due(now=10.21)
    policy.reset()
    policy.add(4, now=11.0)
    assert policy.due(now=11.0)


def test_futures_resolve_after_the_commit_that_contains_them(db):
    uids = index(db, 6)
    seen_at_resolution = []
    with ResultWriter(db, max_outcomes=100, max_delay=0.05) as writer:
        futures = [writer.submit([done(u) for u in uids[i:i + 2]]) for i in range(0, 6, 2)]
        for f in futures:
            f.add_done_callback(lambda _f: seen_at_resolution.append(rows(db, "select count(*) from predictions")))
        assert [f.result(timeout=10).written for f in futures] == [2, 2, 2]
    assert all(n[0][0] == 6 * len(LABELS) for n in seen_at_resolution)
    assert writer.commits == 1  # one group commit for all three studies


def test_a_commit_happens_by_time_with_no_more_input(db):
    (a,) = index(db, 1)
    with ResultWriter(db, max_outcomes=1000, max_delay=0.15) as writer:
        t0 = time.monotonic()
        fut = writer.submit([done(a)])
        assert fut.result(timeout=10).written == 1
        assert time.monotonic() - t0 >= 0.14
    assert rows(db, "select status from instances") == [("done",)]


def test_a_commit_happens_by_size_before_the_time_limit(db):
    uids = index(db, 4)
    with ResultWriter(db, max_outcomes=4, max_delay=60) as writer:
        futures = [writer.submit([done(u)]) for u in uids]
        assert [f.result(timeout=10).written for f in futures] == [1, 1, 1, 1]


def test_flush_and_close_commit_what_is_waiting(db):
    uids = index(db, 5)
    writer = ResultWriter(db, max_outcomes=1000, max_delay=60)
    first = writer.submit([done(uids[0])])
    writer.flush(timeout=10)
    assert first.done() and rows(db, "select count(*) from instances where status = 'done'") == [(1,)]
    rest = [writer.submit([done(u)]) for u in uids[1:]]
    writer.close()
    assert all(f.done() and f.result().written == 1 for f in rest)
    assert rows(db, "select count(*) from instances where status = 'done'") == [(5,)]
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit([done(uids[0])])


def test_submit_blocks_while_the_queue_is_full(db):
    uids = index(db, 3)
    gate = threading.Event()
    original = db.record_outcomes

    def slow(outcomes, replace=()):
        gate.wait(10)
        return original(outcomes, replace)

    db.record_outcomes = slow  # the database is slow: the writer thread is stuck in a commit
    writer = ResultWriter(db, max_outcomes=1, max_delay=0, max_queue=1)
    writer.submit([done(uids[0])])  # taken by the thread, committing
    time.sleep(0.1)
    writer.submit([done(uids[1])])  # fills the queue
    third = threading.Thread(target=writer.submit, args=([done(uids[2])],))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a full queue must make submit wait"
    gate.set()
    third.join(10)
    writer.close()
    assert rows(db, "select count(*) from instances where status = 'done'") == [(3,)]


def test_an_unreachable_database_fails_the_batch_with_a_retryable_error(db):
    (a,) = index(db, 1)
    with sqlite3.connect(db.engine.url.database) as conn:
        conn.execute("drop view findings")
        conn.execute("alter table predictions rename to gone")
    with ResultWriter(db, max_outcomes=1, max_delay=0) as writer:
        fut = writer.submit([done(a)])
        with pytest.raises(RetryableError, match="could not be committed"):
            fut.result(timeout=10)
    assert rows(db, "select status from instances") == [("queued",)]  # nothing half-written


def test_one_bad_study_does_not_fail_the_studies_it_shares_a_commit_with(db):
    good = index(db, 2)
    with ResultWriter(db, max_outcomes=3, max_delay=60) as writer:
        futures = [writer.submit([done(good[0])]), writer.submit([done("1.9.unknown")]),
                   writer.submit([done(good[1])])]
        assert futures[0].result(timeout=10).written == 1 and futures[2].result(timeout=10).written == 1
        with pytest.raises(Exception, match="FOREIGN KEY"):
            futures[1].result(timeout=10)
    assert rows(db, "select count(*) from instances where status = 'done'") == [(2,)]


def test_the_database_file_is_in_wal_mode_with_normal_sync(db):
    with db.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw.execute("pragma journal_mode").fetchone() == ("wal",)
        assert raw.execute("pragma synchronous").fetchone() == (1,)  # NORMAL
        assert raw.execute("pragma busy_timeout").fetchone()[0] >= 1000
    assert Path(db.engine.url.database).is_file()
