"""Watch-folder ingestion: index files once they are complete, enqueue a study after a quiet period.

A file is taken only when its size and mtime have not changed for ``watch_stable_seconds`` and its header parses;
temporary names (dot-files, ``.part``, ``.tmp``) are ignored until renamed. A study is enqueued once no new file of it
has arrived for ``watch_quiet_seconds``; instances that arrive after their study was screened get their own task.
inotify by default; ``poll=True`` uses a polling observer for network shares, where inotify sees nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from celery import Celery
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from db.store import Database
from neuron.settings import Settings
from neuron.work import Route
from producer.enqueue import enqueue_pending
from producer.scan import index_entry, iter_files, shared_entry

log = logging.getLogger(__name__)

TEMPORARY_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower().endswith(TEMPORARY_SUFFIXES)


class _Collector(FileSystemEventHandler):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[Path, float] = {}

    def _add(self, path: str) -> None:
        p = Path(path)
        if not is_temporary(p):
            with self.lock:
                self.seen[p] = time.monotonic()

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._add(event.src_path)

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._add(event.src_path)

    def on_moved(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._add(event.dest_path)

    def take(self) -> list[Path]:
        with self.lock:
            paths, self.seen = list(self.seen), {}
        return paths


class FolderWatcher:
    def __init__(self, root: Path, db: Database, app: Celery, settings: Settings, poll: bool = False):
        self.root, self.db, self.app, self.settings = Path(root), db, app, settings
        self.collector = _Collector()
        self.route = Route(settings.route_override) if settings.route_override else None
        self.observer = PollingObserver(timeout=0.5) if poll else Observer()
        self.candidates: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, stable since)
        self.studies: dict[str, float] = {}  # study UID -> time its last file was indexed

    def start(self) -> None:
        """Watch, then take what was already there: new or changed files go through the same stability rule as
        events (a copy in progress when the watcher starts is not read half-written); unchanged ones are skipped."""
        self.observer.schedule(self.collector, str(self.root), recursive=True)
        self.observer.start()
        known, now = self.db.file_index(), time.monotonic()
        for path in iter_files(self.root, exclude=[self.settings.out_dir], follow_links=self.settings.follow_links):
            if is_temporary(path):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if known.get(self.settings.to_shared(str(path.resolve()))) != (st.st_size, st.st_mtime_ns):
                self.candidates[path] = (st.st_size, st.st_mtime_ns, now)
        enqueue_pending(self.db, self.app)  # indexed earlier but never queued (e.g. the producer was stopped)

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=10)

    def step(self, now: float | None = None) -> int:
        """One pass: promote stable files to the index, enqueue quiet studies. Returns tasks sent."""
        now = time.monotonic() if now is None else now
        for path in self.collector.take():
            self.candidates.setdefault(path, (-1, -1, now))
        indexed = []
        for path, (size, mtime, since) in list(self.candidates.items()):
            try:
                st = path.stat()
            except FileNotFoundError:
                del self.candidates[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                self.candidates[path] = (st.st_size, st.st_mtime_ns, now)
            elif now - since >= self.settings.watch_stable_seconds:
                del self.candidates[path]
                indexed.append(shared_entry(index_entry(path, self.route, self.settings.patient_key,
                                                        self.settings.population_policy), self.settings.to_shared))
        if indexed:
            self.db.add_files(indexed)
            for entry in indexed:
                if entry.instance is not None:
                    self.studies[entry.instance.header.study_instance_uid] = now
        quiet = {s for s, t in self.studies.items() if now - t >= self.settings.watch_quiet_seconds}
        if not quiet:
            return 0
        for s in quiet:
            del self.studies[s]
        return enqueue_pending(self.db, self.app, study_uids=quiet)

    def run(self, should_stop: Callable[[], bool] = lambda: False, interval: float = 0.25,
            on_ready: Callable[[], None] | None = None) -> None:
        self.start()
        if on_ready is not None:
            on_ready()
        try:
            while not should_stop():
                self.step()
                time.sleep(interval)
        finally:
            self.stop()
