"""Screening what the network delivers, in this process (``neuron listen`` and ``neuron pull`` without a broker).

    producer.listen (a study complete by the quiet rules) ─┐
    producer.pull   (a study retrieved)                    ├─► release(studies) ─► queue ─► feed: the studies'
                                                           ┘    pending instances, IDLE while nothing is released
        ─► Engine.run (the staged engine, batching across studies) ─► db.writer.ResultWriter (group commits)
        ─► worker.dicom_out.BackgroundOutputs (--dicom-out / --send-to) ─► worker.send (deliveries)

``screen`` is the one function that joins a feed to the engine and the result writer, the way ``worker.embedded``
and ``worker.service`` drive it; everything else here is the feed. With NEURON_BROKER_URL set, the same releases go
to the GPU workers instead (``producer.listen.enqueue_released``) and none of this runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from db.network import backlog
from db.schema import Status
from db.store import Database, Outcome, WorkItem
from db.writer import ResultWriter
from neuron.routes import MODEL_ROUTES
from neuron.settings import Settings
from producer.arrivals import CompletenessRules
from producer.listen import ListenConfig, serve
from producer.pull import PullConfig, Puller, PullQuery, PullReport
from producer.receive import Admission, open_receiver
from worker.engine import IDLE, Engine
from worker.send import sending

log = logging.getLogger(__name__)

POLL_S = 0.2
RESCUE_EVERY_S = 5.0
HANDED_MEMORY = 100_000
_CLOSE = object()


def screen(engine: Engine, db: Database, feed: Iterable[WorkItem | object],
           on_committed: Callable[[list[str]], None] | None = None) -> None:
    """Screen every item of ``feed`` (endless until it ends; IDLE when nothing is waiting) and commit the outcomes
    through one ResultWriter; ``on_committed`` gets the SOP Instance UIDs of screened instances once committed (the
    DICOM outputs). A failed commit is logged: those instances stay pending and the next start screens them."""

    def committed(uid: str, future) -> None:
        if future.exception() is not None:
            log.error("results of an instance were not committed (%s); it stays pending and is screened when the "
                      "listener or pull starts again", future.exception())
        elif on_committed is not None:
            on_committed([uid])

    with ResultWriter(db) as writer:
        def sink(outcome: Outcome) -> None:
            future = writer.submit([outcome])
            if outcome.status is Status.DONE and outcome.frames:
                future.add_done_callback(lambda f, uid=outcome.sop_instance_uid: committed(uid, f))
            else:
                future.add_done_callback(lambda f, uid=outcome.sop_instance_uid: f.exception() and committed(uid, f))

        engine.run(feed, sink)


class InProcessScreening:
    """Released studies, screened by ``screen`` on a thread of their own (module docstring). ``release`` never waits;
    ``close`` screens what was released, then stops."""

    def __init__(self, settings: Settings, engine: Engine, db: Database):
        self.settings, self.engine, self.db = settings, engine, db
        self.routes = [r.value for r in MODEL_ROUTES]
        self._released: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="screening", daemon=True)
        self.outputs = None
        self.error: BaseException | None = None

    def __enter__(self) -> InProcessScreening:
        for lr in self.engine.routes.values():
            self.db.ensure_config(lr.spec.config_hash, lr.spec.model, lr.spec.as_dict())
        self.engine.on_load = lambda lr: self.db.ensure_config(lr.spec.config_hash, lr.spec.model, lr.spec.as_dict())
        if self.settings.dicom_out is not None:  # highdicom is only imported when DICOM outputs are asked for
            from worker.dicom_out import BackgroundOutputs

            self.outputs = BackgroundOutputs(self.settings, flush_after_s=1.0)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def release(self, studies: Iterable[str] | None) -> None:
        """Screen the pending instances of these studies (None: every pending instance)."""
        self._released.put(None if studies is None else list(studies))

    def close(self) -> None:
        self._released.put(_CLOSE)
        self._thread.join()
        if self.outputs is not None:
            self.outputs.close()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            screen(self.engine, self.db, self._feed(),
                   self.outputs.add if self.outputs is not None else None)
        except BaseException as exc:  # the engine stopped (a setup error: weights): close() reports it
            log.error("screening stopped: %s", exc)
            self.error = exc

    def _items(self, studies: list[str] | None) -> list[WorkItem]:
        if studies is None:
            return self.db.pending(routes=self.routes)
        uids = [uid for _, _, uid in self.db.pending_by_study(self.routes, set(studies))]
        return self.db.pending(sop_uids=uids) if uids else []

    def _feed(self) -> Iterator[WorkItem | object]:
        # an instance released twice before its result is committed (its study released again) is handed on once;
        # the memory of what was handed on is bounded (the oldest are long committed)
        handed: dict[str, None] = {}
        last_rescue = time.monotonic()
        while True:
            try:
                studies = self._released.get(timeout=POLL_S)
            except queue.Empty:
                if time.monotonic() - last_rescue >= RESCUE_EVERY_S:
                    last_rescue = time.monotonic()
                    # a corrupt copy failed and a good one arrived later (a duplicate): screen it from the good one
                    moved = self.db.retry_failed_from_duplicates()
                    for uid in moved:
                        handed.pop(uid, None)
                    if moved:
                        yield from self._fresh(self.db.pending(sop_uids=moved), handed)
                        continue
                yield IDLE
                continue
            if studies is _CLOSE:
                return
            yield from self._fresh(self._items(studies), handed)

    @staticmethod
    def _fresh(items: list[WorkItem], handed: dict[str, None]) -> Iterator[WorkItem]:
        for item in items:
            if item.sop_instance_uid not in handed:
                handed[item.sop_instance_uid] = None
                if len(handed) > HANDED_MEMORY:
                    del handed[next(iter(handed))]
                yield item


def _prepare(settings: Settings) -> Database:
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    db.create()
    return db


def listen_in_process(settings: Settings, config: ListenConfig, rules: CompletenessRules, admission: Admission,
                      engine: Engine, stop: threading.Event, ready: Callable | None = None) -> None:
    """``neuron listen`` without a broker: receive, and screen each study once it is complete, until ``stop``."""
    db = _prepare(settings)
    try:
        with sending(settings), InProcessScreening(settings, engine, db) as screening:
            serve(db, settings.out_dir, config, rules, admission, screening.release, stop,
                  patient_secret=settings.patient_key, ready=ready)
    finally:
        db.dispose()


def pull_in_process(settings: Settings, config: PullConfig, query: PullQuery, admission: Admission, engine: Engine,
                    stop: threading.Event) -> tuple[PullReport, int]:
    """``neuron pull`` by C-GET without a broker: retrieve, screen each study as it arrives, send the outputs; returns
    the pull's report and how many of its instances still wait to be screened (0 unless stopped)."""
    db = _prepare(settings)
    receiver = open_receiver(db, settings.out_dir, admission, patient_secret=settings.patient_key)
    try:
        with sending(settings), InProcessScreening(settings, engine, db) as screening:
            screening.release(None)  # what an interrupted pull retrieved and did not screen
            report = Puller(config, db, receiver, lambda study: screening.release([study])).run(query, stop)
        return report, backlog(db)
    finally:
        receiver.indexer.close()
        db.dispose()
