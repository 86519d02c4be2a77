"""``neuron reference``: a route's out-of-distribution reference from a site's own films.

    folder ─► header pass (producer.scan.index_entry, gated with the skip policy: only films inside the route's trained
              population) ─► decode (worker.decode) ─► the device job (the same preprocessing and model as screening)
              ─► pooled features of the identity view ─► neuron_models.ood.Reference.build ─► <reference dir>/<route>.*

The features are exactly those screening scores (``DeviceJob.model_job``'s ``pooled``), so a film of the reference
screened later scores what it scored here. Nothing is written to the results database.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neuron.errors import InputError, RetryableError
from neuron.routes import PopulationPolicy
from neuron.settings import Settings
from neuron.work import Route, Status
from neuron_models import ood
from producer.scan import index_entry, iter_files
from worker.decode import decode_instance
from worker.device import DeviceJob
from worker.models import Models, default_batch_size

log = logging.getLogger(__name__)


@dataclass
class ReferenceReport:
    route: Route
    films: int  # frames whose features the reference holds
    left_out: Counter = field(default_factory=Counter)  # why other files were not used, by reason's first clause
    reference: ood.Reference | None = None
    path: Path | None = None


def _why(reason: str | None) -> str:
    return (reason or "not used").split(";")[0].split(":")[0][:80]


def build_reference(folder: Path, route: Route, settings: Settings, models: Models,
                    min_images: int = ood.MIN_IMAGES, say: Callable[[str], None] | None = None) -> ReferenceReport:
    """Features of every film under ``folder`` that the route would screen and that is inside its trained population,
    fitted into a reference saved in ``settings.resolved_reference_dir``. Raises ValueError when fewer than
    ``min_images`` films could be used (the message says how many and why the others were left out)."""
    route = Route(route)
    lr = models.routes[route]
    report = ReferenceReport(route, 0)
    seen: set[str] = set()
    items: list[tuple[str, Path]] = []
    for path in iter_files(Path(folder), follow_links=settings.follow_links):
        entry = index_entry(path, policy=PopulationPolicy.SKIP)
        inst = entry.instance
        if inst is None or inst.route is not route or inst.status is not Status.PENDING:
            report.left_out[_why(entry.reason or (f"route {inst.route.value}" if inst and inst.route else None))] += 1
            continue
        if inst.header.sop_instance_uid in seen:
            report.left_out["the same SOP Instance UID twice"] += 1
            continue
        seen.add(inst.header.sop_instance_uid)
        items.append((inst.header.sop_instance_uid, path))
    job = DeviceJob(models, top_k=0)
    batch = settings.batch_size or default_batch_size(models.device)
    features: list[np.ndarray] = []
    frames: list = []

    def run() -> None:
        for chunk, prepared, output in job.run(route, frames):
            limit = lr.preprocess.grayscale_max_saturation
            rejected = prepared.rejections(prepared.rejected.cpu().numpy(), prepared.saturation.cpu().numpy(), limit)
            pooled = output.pooled.cpu().numpy()
            for i in range(len(chunk)):
                if i in rejected:
                    report.left_out[_why(rejected[i].reason)] += 1
                else:
                    features.append(pooled[i])
        frames.clear()

    for n, (uid, path) in enumerate(items, 1):
        try:
            frames.extend(decode_instance(path, uid, settings.max_frames, settings.max_pixels))
        except InputError as exc:
            report.left_out[_why(exc.reason)] += 1
            continue
        except RetryableError as exc:  # the storage failed for now: the film is left out, and said so
            report.left_out[_why(f"could not be read for now ({exc})")] += 1
            continue
        if len(frames) >= batch:
            run()
        if say is not None and n % 100 == 0:
            say(f"{n} of {len(items)} films read")
    if frames:
        run()
    report.films = len(features)
    if not features:
        raise ValueError(f"no film under {folder} could be used for the {route.value} reference (left out: "
                         f"{dict(report.left_out) or 'no files'}); point --data at the site's own in-population films")
    stacked = np.stack(features)
    try:
        ref = ood.Reference.build(route, lr.spec.model, lr.model.weights_id, lr.preprocess.as_dict(), stacked,
                                  min_images=min_images)
    except ValueError as exc:
        raise ValueError(f"{exc} (left out: {dict(report.left_out) or 'none'})") from None
    report.reference = ref
    report.path = ref.save(settings.resolved_reference_dir)
    log.info("reference for %s: %d films, threshold %.3f, %s", route.value, ref.images, ref.threshold, report.path)
    return report
