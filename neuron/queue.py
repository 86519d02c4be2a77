"""The message contract between producer and workers, and the Celery app both build (torch-free).

One task, ``neuron.screen_study``, carries IDs only: a study UID and the SOP Instance UIDs to screen. It goes to the
queue named after the instances' route, so a host consumes only the routes whose models it holds.
"""

from __future__ import annotations

from celery import Celery

from neuron.routes import Route
from neuron.settings import Settings

SCREEN_STUDY = "neuron.screen_study"
MAX_INSTANCES_PER_TASK = 64


def queue_for(route: Route | str) -> str:
    return Route(route).value


def make_app(settings: Settings) -> Celery:
    app = Celery("neuron", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=True,  # a study is acknowledged only after its results are committed
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue_for(Route.CHEST_XRAY),
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        worker_send_task_events=True,  # Flower shows workers and tasks
        task_send_sent_event=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        # When the broker connection drops, studies in flight finish and commit; their acknowledgements are lost
        # with the connection, so the broker redelivers them and the claim step finds nothing left to do.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )
    return app
