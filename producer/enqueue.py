"""Send indexed work to the broker: one task per study and route, IDs only, after the database commit."""

from __future__ import annotations

import logging
from collections import defaultdict

from celery import Celery

from db.store import Database
from neuron.queue import MAX_INSTANCES_PER_TASK, SCREEN_STUDY, queue_for
from neuron.routes import MODEL_ROUTES

log = logging.getLogger(__name__)


def enqueue_pending(db: Database, app: Celery, study_uids: set[str] | None = None) -> int:
    """Queue every pending instance (of the given studies, or all). Returns the number of tasks sent.
    Instances are marked ``queued`` and committed first; a send that fails puts them back to ``pending``.

    First, a failed instance whose SOP Instance UID a ``duplicate`` file also holds is put back in line from that
    file, whatever its study: a corrupt copy indexed first (or a good copy that arrived after the corrupt one failed)
    must not leave the instance without findings."""
    routes = [r.value for r in MODEL_ROUTES]
    rescued = set(db.retry_failed_from_duplicates())
    if rescued:
        log.info("%d failed instances have another copy: screening them from it", len(rescued))
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for study, route, uid in db.pending_by_study(routes, study_uids):
        groups[(route, study)].append(uid)
    if rescued and study_uids is not None:
        for study, route, uid in db.pending_by_study(routes):
            if uid in rescued and uid not in groups[(route, study)]:
                groups[(route, study)].append(uid)
    sent = 0
    for (route, study), uids in sorted(groups.items()):
        for start in range(0, len(uids), MAX_INSTANCES_PER_TASK):
            chunk = uids[start:start + MAX_INSTANCES_PER_TASK]
            db.mark_queued(chunk)
            try:
                app.send_task(SCREEN_STUDY, args=[study, chunk], queue=queue_for(route))
            except Exception:
                db.mark_pending(chunk)
                raise
            sent += 1
    if sent:
        log.info("enqueued %d tasks", sent)
    return sent
