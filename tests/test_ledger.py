"""The embedded run's ledger (worker/ledger.py): a process of its own records the index entries, in walk order, and
answers with the instances to screen, and commits the results, exactly as the run's own process would; when it
cannot answer, the run does the rest itself and the database's own error, not the ledger's, stops it."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from db.store import Database
from neuron.routes import MODEL_ROUTES
from neuron.work import Route
from producer.scan import index_entry
from worker.ledger import Ledger
from worker.readers import pack_entry, process_context

from .conftest import small_chest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def entries(tmp_path, rg1):
    """Three chest CRs and a copy of the first under another path (same SOP Instance UID: a duplicate)."""
    folder = tmp_path / "archive"
    folder.mkdir()
    paths = [small_chest(rg1, folder / f"cr{i}.dcm", step=16) for i in range(3)]
    copy = folder / "zz-copy.dcm"
    copy.write_bytes(paths[0].read_bytes())
    return [index_entry(p) for p in [*paths, copy]]


@pytest.fixture
def packed(entries):
    """The entries as the reader processes send them: the driving process never unpacks them."""
    return [pack_entry(e) for e in entries]


def fresh_db(tmp_path: Path, name: str) -> Database:
    db = Database(f"sqlite:///{tmp_path / name}")
    db.create()
    return db


def table(db: Database, query: str) -> list[tuple]:
    with sqlite3.connect(db.engine.url.database) as conn:
        return sorted(conn.execute(query).fetchall())


def test_the_ledger_records_what_the_runs_own_process_would_and_answers_the_same_work(tmp_path, entries, packed):
    routes = list(MODEL_ROUTES)
    here, there = fresh_db(tmp_path, "here.db"), fresh_db(tmp_path, "there.db")
    ledger = Ledger(str(there.engine.url), routes, process_context())
    try:
        answered = [ledger.admit(packed[:2]), ledger.admit(packed[2:])]
    finally:
        ledger.close()
    expected = []
    for batch in (entries[:2], entries[2:]):
        here.add_files(batch)
        found = {w.file_path: w for w in here.work_items(routes=routes, paths=[e.path for e in batch])}
        expected.append([found.get(e.path) for e in batch])
    assert answered == expected and None not in answered[0]
    assert [w.file_path if w else None for w in answered[1]] == [entries[2].path, None]  # the copy: a duplicate
    query = "select path, status, reason, sop_instance_uid from files"
    assert table(there, query) == table(here, query)
    assert ("duplicate" in {r[1] for r in table(there, query)}) and ledger.stopped is None
    assert table(there, "select sop_instance_uid, route, status from instances") == table(
        here, "select sop_instance_uid, route, status from instances")


def test_a_ledger_that_dies_or_is_refused_answers_none_and_says_why_without_the_rows_values(tmp_path, entries,
                                                                                             packed, caplog):
    """A killed ledger answers None from then on (the caller does the rest); a refused request is answered None and
    the ledger stays for the next one; neither says a path or a UID."""
    db = fresh_db(tmp_path, "neuron.db")
    ledger = Ledger(str(db.engine.url), [Route.CHEST_XRAY], process_context())
    assert ledger.admit(packed[:1]) is not None
    ledger._process.kill()
    ledger._process.join(10)
    with caplog.at_level(logging.INFO, logger="worker.ledger"):
        assert ledger.admit(packed[1:2]) is None and "its process ended" in ledger.stopped
        assert ledger.admit(packed[2:]) is None  # and stays stopped: the caller indexes the rest

        read_only = f"sqlite:///file:{tmp_path / 'neuron.db'}?mode=ro&uri=true"  # the tests run as root: no chmod
        refused = Ledger(read_only, [Route.CHEST_XRAY], process_context())
        try:
            assert refused.admit(packed[1:2]) is None and refused.admit(packed[2:3]) is None
            assert refused.stopped is None and refused.refused == 2  # it goes on: each request is tried there
            assert refused.admit([]) == []  # and still answers
        finally:
            refused.close()
    assert "refused a batch of the index (RetryableError)" in caplog.text
    said = caplog.text + ledger.stopped
    assert entries[1].path not in said and entries[1].sop_instance_uid not in said
    assert table(db, "select count(*) from files") == [(1,)]  # the refused batch is not half recorded


def test_a_walk_whose_ledger_stopped_indexes_in_its_own_process(tmp_path, entries, packed):
    """``neuron run``'s admission with a ledger that died: the same decisions, recorded by the run's own process."""
    from neuron.settings import Settings
    from worker.embedded import ProgressHooks, _Walk
    from worker.readers import IndexItem

    db = fresh_db(tmp_path, "neuron.db")
    ledger = Ledger(str(db.engine.url), [Route.CHEST_XRAY], process_context())
    ledger._process.kill()
    ledger._process.join(10)
    walk = _Walk(tmp_path, db, Settings(out_dir=tmp_path / "out"), [Route.CHEST_XRAY], ProgressHooks(), ledger=ledger)
    decisions = walk.admit([(IndexItem(i, e.path), p) for i, (e, p) in enumerate(zip(entries, packed, strict=True))])
    assert [d.file_path if d else None for d in decisions] == [e.path for e in entries[:3]] + [None]
    assert ledger.stopped is not None and len(table(db, "select path from files")) == 4


def test_the_ledger_commits_the_results_and_once_it_dies_this_process_commits_the_rest(tmp_path):
    """A result writer (``neuron run``'s, a worker's) commits through the ledger (this process runs no SQL for them)
    and, after the ledger is killed, in this process: the same rows and statuses as commits made here, each instance
    once."""
    from sqlalchemy import event

    from db.writer import ResultWriter
    from worker.ledger import committed_by

    from .test_writer import CONFIG_HASH, done, index, rows

    here, there = fresh_db(tmp_path, "here.db"), fresh_db(tmp_path, "there.db")
    for db in (here, there):
        db.ensure_config(CONFIG_HASH, "xrv-densenet121-res224-all", {"test": True})
    uids = index(here, 4)
    index(there, 4)
    written_here = []
    event.listen(there.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: written_here.append(statement)
                 if "INSERT INTO predictions" in statement else None)
    ledger = Ledger(str(there.engine.url), [Route.CHEST_XRAY], process_context())
    try:
        with ResultWriter(there, record=committed_by(ledger, there)) as writer:
            assert writer.submit([done(u) for u in uids[:2]]).result(timeout=30).written == 2
            assert ledger.stopped is None and not written_here  # the ledger's commit: no SQL here
            assert len(rows(there, "select * from predictions")) == 6
            ledger._process.kill()
            ledger._process.join(10)
            assert writer.submit([done(u) for u in uids[2:]]).result(timeout=30).written == 2
    finally:
        ledger.close()
    assert "its process ended" in ledger.stopped and written_here  # the rest committed here
    here.record_outcomes([done(u) for u in uids])
    for query in ("select sop_instance_uid, label, probability, uncertainty, rank, heatmap_path, needs_review "
                  "from predictions order by 1, 2", "select sop_instance_uid, status from instances order by 1"):
        assert rows(there, query) == rows(here, query)
    assert len(rows(there, "select * from predictions")) == 12


def test_a_workers_claims_through_the_ledger_are_the_claims_this_process_would_make(tmp_path):
    """A worker claims in its ledger: the same WorkItems and attempts counted as ``Database.claim`` here, finished
    instances skipped; once the ledger is gone, this process claims."""
    from worker.ledger import claimed_by

    from .test_writer import CONFIG_HASH, done, index, rows

    here, there = fresh_db(tmp_path, "here.db"), fresh_db(tmp_path, "there.db")
    for db in (here, there):
        db.ensure_config(CONFIG_HASH, "xrv-densenet121-res224-all", {"test": True})
        index(db, 3)
        db.record_outcomes([done("1.2.3.0")])  # finished: not claimed again
    from sqlalchemy import event

    claimed_here = []
    event.listen(there.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: claimed_here.append(statement)
                 if statement.startswith("UPDATE instances") else None)
    ledger = Ledger(str(there.engine.url), (), process_context())
    claim, uids = claimed_by(ledger, there), ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    attempts = "select sop_instance_uid, status, attempts from instances order by 1"
    try:
        first = claim(uids, 3)
        assert first == here.claim(uids, 3) and [w.sop_instance_uid for w in first] == uids[1:]
        assert rows(there, attempts) == rows(here, attempts) and ledger.stopped is None and not claimed_here
        ledger._process.kill()
        ledger._process.join(10)
        assert claim(uids, 3) == here.claim(uids, 3) == first  # claimed here now
        assert "its process ended" in ledger.stopped and rows(there, attempts) == rows(here, attempts)
        assert claimed_here  # the attempts counted by this process's own statement
    finally:
        ledger.close()
