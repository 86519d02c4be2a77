"""Screening what the network delivers, in this process (``neuron listen`` and ``neuron pull`` without a broker).

    producer.listen (a study complete by the quiet rules) ─┐
    producer.pull   (a study retrieved)                    ├─► release(studies) ─► queue ─► feed: the studies'
                                                           ┘    pending instances, IDLE while nothing is released
        ─► Pipeline.run (the staged engine, batching across studies) ─► db.writer.ResultWriter (group commits)
        ─► worker.outputs: BackgroundOutputs (--dicom-out / --send-to) ─► worker.send (deliveries), FhirOutputs

``screen`` is the one function that joins a feed to the pipeline and the result writer, as ``worker.embedded`` and
``worker.service`` do for theirs; everything else here is the feed. An instance a commit put back in line from a
duplicate copy (``Committed.rescued``: ``db.store`` decides that) is fed again from that copy. With
NEURON_BROKER_URL set, the same releases go to the GPU workers instead (``producer.listen.listen_for_workers``) and
none of this runs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

from db.network import backlog
from db.store import Database
from db.writer import ResultWriter
from neuron.errors import RetryableError
from neuron.routes import MODEL_ROUTES
from neuron.settings import Settings
from neuron.work import Outcome, Status, WorkItem
from producer.arrivals import CompletenessRules
from producer.listen import ListenConfig, Listener, serve
from producer.pull import PullConfig, Puller, PullQuery, PullReport
from producer.receive import Admission, open_receiver
from worker.outputs import open_outputs
from worker.pipeline import IDLE, Pipeline
from worker.results import prepare_database
from worker.send import sending

log = logging.getLogger(__name__)

POLL_S = 0.2
RETRY_S = 5.0  # a release whose instances could not be read (the database is away) is offered again after this
HANDED_MEMORY = 100_000
_CLOSE = object()


def screen(pipeline: Pipeline, db: Database, feed: Iterable[WorkItem | object],
           on_committed: Callable[[list[str]], None] | None = None,
           on_rescued: Callable[[list[str]], None] | None = None) -> None:
    """Screen every item of ``feed`` (endless until it ends; IDLE when nothing is waiting) and commit the outcomes
    through one ResultWriter. Once an outcome is committed, ``on_committed`` gets the instance if it was screened (its
    DICOM outputs), and ``on_rescued`` the instances its commit put back in line from a duplicate copy. A failed
    commit is logged: those instances stay pending and the next start screens them."""

    def committed(outcome: Outcome, future: Future) -> None:
        if future.exception() is not None:
            log.error("results of an instance were not committed (%s); it stays pending and is screened when the "
                      "listener or pull starts again", future.exception())
            return
        if on_committed is not None and outcome.status is Status.DONE and outcome.frames:
            on_committed([outcome.sop_instance_uid])
        rescued = future.result().rescued
        if rescued and on_rescued is not None:
            on_rescued(list(rescued))

    with ResultWriter(db) as writer:
        def sink(outcome: Outcome) -> None:
            writer.submit([outcome]).add_done_callback(lambda f, o=outcome: committed(o, f))

        pipeline.run(feed, sink)


class InProcessScreening:
    """Released studies, screened by ``screen`` on a thread of their own (module docstring). ``release`` never waits;
    ``close`` screens what was released, then stops."""

    def __init__(self, settings: Settings, pipeline: Pipeline, db: Database, role: str = "network"):
        self.settings, self.pipeline, self.db = settings, pipeline, db
        self.role = role  # who wrote the FHIR outputs, in the audit trail: network@host (listen, pull)
        self._released: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="screening", daemon=True)
        self.outputs = None
        self.error: BaseException | None = None

    def __enter__(self) -> InProcessScreening:
        prepare_database(self.db, self.pipeline.models, self.pipeline.settings, self.pipeline.heatmap_dir)
        self.outputs = open_outputs(self.settings, self.role, flush_after_s=1.0)  # --dicom-out, --fhir-out
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def release(self, studies: Iterable[str] | None) -> None:
        """Screen the pending instances of these studies (None: every pending instance)."""
        self._released.put(("studies", None if studies is None else list(studies)))

    def _rescued(self, sop_uids: list[str]) -> None:
        self._released.put(("instances", sop_uids))

    def close(self) -> None:
        self._released.put(_CLOSE)
        self._thread.join()
        if self.outputs is not None:
            self.outputs.close()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            screen(self.pipeline, self.db, self._feed(), self.outputs.add if self.outputs is not None else None,
                   self._rescued)
        except BaseException as exc:  # the pipeline stopped (a setup error: weights): close() reports it
            log.error("screening stopped: %s", exc)
            self.error = exc

    def _items(self, kind: str, keys: list[str] | None) -> list[WorkItem]:
        if kind == "instances":
            return self.db.work_items(sop_uids=keys)
        if keys is None:
            return self.db.work_items(routes=MODEL_ROUTES)
        uids = [uid for _, _, uid in self.db.pending_by_study(MODEL_ROUTES, set(keys))]
        return self.db.work_items(sop_uids=uids) if uids else []

    def _feed(self) -> Iterator[WorkItem | object]:
        # an instance released twice before its result is committed (its study released again) is handed on once; an
        # instance handed on before and now pending from another file (rescued from a duplicate copy) is handed on
        # again. The memory of what was handed on is bounded (the oldest are long committed).
        handed: dict[str, str] = {}
        while True:
            try:
                message = self._released.get(timeout=POLL_S)
            except queue.Empty:
                yield IDLE
                continue
            if message is _CLOSE:
                return
            try:
                items = self._items(*message)
            except RetryableError as exc:  # the instances stay pending; a long-running listener must not stop here
                log.warning("could not read the released instances (%s); trying again in %.0f s", exc, RETRY_S)
                retry = threading.Timer(RETRY_S, self._released.put, args=(message,))
                retry.daemon = True
                retry.start()
                continue
            for item in items:
                if handed.get(item.sop_instance_uid) == item.file_path:
                    continue
                handed.pop(item.sop_instance_uid, None)
                handed[item.sop_instance_uid] = item.file_path
                if len(handed) > HANDED_MEMORY:
                    del handed[next(iter(handed))]
                yield item


def _prepare(settings: Settings) -> Database:
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    db.create()
    return db


def listen_in_process(settings: Settings, config: ListenConfig, rules: CompletenessRules, admission: Admission,
                      pipeline: Pipeline, stop: threading.Event,
                      ready: Callable[[Listener], None] | None = None) -> None:
    """``neuron listen`` without a broker: receive, and screen each study once it is complete, until ``stop``."""
    db = _prepare(settings)
    try:
        with sending(settings), InProcessScreening(settings, pipeline, db) as screening:
            serve(db, settings.out_dir, config, rules, admission, screening.release, stop,
                  patient_secret=settings.patient_key, ready=ready, policy=settings.population_policy)
    finally:
        db.dispose()


def pull_in_process(settings: Settings, config: PullConfig, query: PullQuery, admission: Admission,
                    pipeline: Pipeline, stop: threading.Event) -> tuple[PullReport, int]:
    """``neuron pull`` by C-GET without a broker: retrieve, screen each study as it arrives, send the outputs; returns
    the pull's report and how many of its instances still wait to be screened (0 unless stopped)."""
    db = _prepare(settings)
    receiver = open_receiver(db, settings.out_dir, admission, patient_secret=settings.patient_key,
                             policy=settings.population_policy)
    try:
        with sending(settings), InProcessScreening(settings, pipeline, db) as screening:
            screening.release(None)  # what an interrupted pull retrieved and did not screen
            report = Puller(config, db, receiver, lambda study: screening.release([study])).run(query, stop)
        return report, backlog(db)
    finally:
        receiver.indexer.close()
        db.dispose()
