"""Results: a frame's numbers from the device become its rows and heatmap files; an instance's frames become its
Outcome, whatever happened to it.

    FrameInference ─► FrameResult (one LabelScore per label: probability, spread, rank, heatmap path, needs_review)
                   ─► heatmaps to write ((path, BGR uint8) pairs, written atomically by the PNG pool)
    an instance's FrameResults, or the error that stopped it ─► Outcome (done / failed / skipped / pending)

Heatmap file names never come from UIDs or paths in the file: a hash of them, fanned out over 256 folders.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import cv2
import numpy as np

from neuron.errors import DecodeError, ImageTooLarge, InputError, RejectedImage, RetryableError, SkippedInput
from neuron.settings import Settings
from neuron.work import FrameResult, LabelScore, Outcome, Status, WorkItem
from worker.device import FrameInference
from worker.models import Models


def heatmap_name(sop_uid: str, frame: int, model: str, weights: str, label: str, config_hash: str) -> str:
    """File names never come from UIDs or paths in the file: a hash of them, fanned out over 256 folders."""
    digest = hashlib.sha256("|".join([sop_uid, str(frame), model, weights, label, config_hash]).encode()).hexdigest()
    return f"{digest[:2]}/{digest[:32]}.png"


def failure_category(exc: BaseException | None) -> str:
    """A bounded name for why an instance was not screened (metrics label): never the reason text, which can quote
    a file's contents."""
    for kind, name in ((ImageTooLarge, "too-large"), (RejectedImage, "rejected"), (DecodeError, "decode"),
                       (SkippedInput, "unsupported"), (RetryableError | MemoryError | OSError, "storage")):
        if isinstance(exc, kind):
            return name
    return "other"


def failure_outcome(item: WorkItem, exc: BaseException, worker: str) -> Outcome:
    """Whatever reading one file raised, that instance gets an Outcome with a reason; the run goes on."""
    if isinstance(exc, InputError):
        return Outcome(item.sop_instance_uid, exc.status, exc.reason, worker=worker)
    if isinstance(exc, RetryableError | MemoryError):
        return Outcome(item.sop_instance_uid, Status.PENDING,
                       f"transient error, to be tried again: {type(exc).__name__}: {exc}", worker=worker)
    return Outcome(item.sop_instance_uid, Status.FAILED,
                   f"unexpected error while reading the file ({type(exc).__name__}: {exc}); the file is probably "
                   f"corrupt: re-export it from the source, and report the error if the file is valid", worker=worker)


def write_png(path: str, image: np.ndarray) -> None:
    """Write atomically: encoded in memory, written under a temporary name, renamed. A crash, a full disk or a
    read-only folder never leaves half a PNG, under the final name or the temporary one; the OSError (with its errno:
    ENOSPC, EROFS, EACCES, ...) reaches the caller. Plain ``os`` calls on strings, the folder made only when the
    first open says it is missing: this runs once per heatmap, on the process that drives the device."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"cv2 could not encode a {image.shape} {image.dtype} heatmap as PNG for {path}")
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name.rsplit('.', 1)[0]}.{os.getpid()}.{threading.get_ident()}.tmp.png")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, flags, 0o666)
    try:
        try:
            data = memoryview(encoded).cast("B")
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def prepare_database(db, models: Models, settings: Settings, heatmap_dir: Path) -> None:
    """What the database must know before results arrive: each loaded route's settings behind its results hash (now,
    and for routes loaded later), and the folder heatmaps are written into (the review page serves them from it)."""
    for lr in models.routes.values():
        db.ensure_config(lr.spec.config_hash, lr.spec.model, lr.spec.as_dict())
    models.on_load(lambda lr: db.ensure_config(lr.spec.config_hash, lr.spec.model, lr.spec.as_dict()))
    if settings.heatmap_top_k > 0:
        db.record_heatmap_folder(settings.to_shared(str(heatmap_dir)))


class Transient(InputError):
    """Marks frames the device could not take (a single image out of memory): their instance is tried again."""


class ResultShaper:
    """Rows and outcomes for one pipeline: where its heatmaps go (the shared name every host and reviewer uses) and
    when a finding needs review."""

    def __init__(self, models: Models, settings: Settings, worker_id: str):
        self.models = models
        self.settings = settings
        self.worker_id = worker_id
        self.heatmap_dir = settings.heatmap_dir.resolve()
        self._root = str(self.heatmap_dir)

    def frame_result(self, route, inf: FrameInference) -> tuple[FrameResult, list[tuple[str, np.ndarray]]]:
        """The rows of one frame and the heatmaps to write ((path, BGR uint8 image) pairs)."""
        lr = self.models.routes[route]
        names, spec = lr.model.class_names, lr.spec
        rank_of = {int(label): r + 1 for r, label in enumerate(inf.order)}
        heatmaps: dict[int, str] = {}
        writes = []
        for slot, label_idx in enumerate(inf.order[: inf.overlays.shape[0]]):
            rel = heatmap_name(inf.frame.sop_instance_uid, inf.frame.frame, spec.model, spec.weights,
                               names[label_idx], spec.config_hash)
            path = f"{self._root}/{rel}"
            heatmaps[int(label_idx)] = self.settings.to_shared(path)
            writes.append((path, inf.overlays[slot]))
        threshold = self.settings.review_threshold
        scores = []
        for idx, name in enumerate(names):
            unc = float(inf.uncertainty[idx])
            scores.append(LabelScore(name, float(inf.probabilities[idx]), unc, rank_of[idx], heatmaps.get(idx),
                                     unc > threshold))
        far = None if inf.ood_score is None else inf.ood_score > lr.reference.threshold
        return FrameResult(inf.frame.frame, spec.model, spec.weights, spec.config_hash, lr.model.untrained,
                           tuple(scores), decoder=getattr(inf.frame, "decoder", None), ood_score=inf.ood_score,
                           out_of_distribution=far), writes

    def outcome(self, item: WorkItem, frames: list[FrameResult], error: InputError | None,
                write_error: BaseException | None) -> Outcome:
        """An instance's Outcome once every frame is back and every heatmap written (or the error that stopped it)."""
        uid, worker = item.sop_instance_uid, self.worker_id
        if isinstance(error, Transient):
            return Outcome(uid, Status.PENDING, f"transient error, to be tried again: {error}", worker=worker)
        if error is not None:
            return Outcome(uid, error.status, error.reason, worker=worker)
        if write_error is not None:  # the output folder's fault, not the file's: pending, tried again
            return Outcome(uid, Status.PENDING, f"heatmap could not be written ({type(write_error).__name__}: "
                                                f"{write_error}); free space on or make writable "
                                                f"{self.heatmap_dir}, then run again: the instance is "
                                                f"screened then", worker=worker)
        return Outcome(uid, Status.DONE, None, tuple(sorted(frames, key=lambda r: r.frame)), worker=worker)
