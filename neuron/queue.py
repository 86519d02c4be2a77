"""The message contract between producer and workers, and the Celery app both build (torch-free).

One task, ``neuron.screen_study``, carries IDs only: a ``ScreenStudy`` payload (named and versioned: the SOP Instance
UIDs of one study and route to screen), sent as the task's keyword arguments. It goes to the queue named after the
instances' route, so a host consumes only the routes whose models it holds.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from celery import Celery

from neuron.settings import Settings
from neuron.work import Route

SCREEN_STUDY = "neuron.screen_study"
MAX_INSTANCES_PER_TASK = 64


@dataclass(frozen=True)
class ScreenStudy:
    """The payload of ``neuron.screen_study``: which instances to screen (a study's, of one route; the worker reads
    everything else from the database). ``version`` says how to read it; a worker refuses a version it does not know
    rather than guess."""

    sop_instance_uids: tuple[str, ...]
    version: int = 1

    VERSIONS = (1,)

    def __post_init__(self) -> None:
        if self.version not in self.VERSIONS:
            raise ValueError(f"{SCREEN_STUDY} payload version {self.version!r} is not one this worker reads "
                             f"({', '.join(map(str, self.VERSIONS))}); upgrade the worker to the producer's release")
        if not self.sop_instance_uids or not all(isinstance(u, str) and u for u in self.sop_instance_uids):
            raise ValueError(f"{SCREEN_STUDY} payload needs a non-empty list of SOP Instance UIDs")
        if len(self.sop_instance_uids) > MAX_INSTANCES_PER_TASK:
            raise ValueError(f"{SCREEN_STUDY} payload holds {len(self.sop_instance_uids)} instances, over the "
                             f"{MAX_INSTANCES_PER_TASK} a task carries")

    def kwargs(self) -> dict:
        """The task's keyword arguments: JSON-serialisable, named."""
        return {"version": self.version, "sop_instance_uids": list(self.sop_instance_uids)}

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> ScreenStudy:
        unknown = set(kwargs) - {"version", "sop_instance_uids"}
        if unknown:
            raise ValueError(f"{SCREEN_STUDY} payload has unknown fields {sorted(unknown)}")
        return cls(tuple(kwargs.get("sop_instance_uids") or ()), kwargs.get("version", 1))

    @classmethod
    def from_body(cls, body: object) -> ScreenStudy:
        """The payload inside a message body as Celery's protocol 2 sends it: ``[args, kwargs, embed]``."""
        args, kwargs = body[0], body[1]  # type: ignore[index]
        if args:
            raise ValueError(f"{SCREEN_STUDY} takes keyword arguments only, got {len(args)} positional")
        return cls.from_kwargs(kwargs)


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
        # A dead worker's unacknowledged studies go back to the queue once they are visibility_timeout old; kombu's
        # Redis transport looks for them every unacked_restore_interval seconds but scans only on every
        # unacked_restore_throttle-th look (default 10 x 10 s: up to 100 s late). One scan (a ZRANGE) per look, at
        # most every 10 s, keeps the redelivery within a quarter of the timeout of when it is due.
        broker_transport_options={"visibility_timeout": settings.visibility_timeout, "unacked_restore_throttle": 1,
                                  "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 4))},
        broker_connection_retry_on_startup=True,
        # When the broker connection drops, studies in flight finish and commit; their acknowledgements are lost
        # with the connection, so the broker redelivers them and the claim step finds nothing left to do.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )
    return app


NEURON_INFO = "neuron_info"  # the remote-control inspect command a worker answers with its device and numbers


def mask_url(url: str) -> str:
    """A database or broker URL fit for logs and ``neuron status``: the password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def default_worker_name(device: str) -> str:
    """host + device + pid: two workers on one host never share a Celery node name or a ``worker`` value."""
    return f"{socket.gethostname()}/{device}/{os.getpid()}"


def node_name(worker_name: str) -> str:
    """The Celery node name of a worker: ``neuron-NAME@host`` (what Flower and ``celery inspect`` show)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in worker_name)
    return f"neuron-{safe}@{socket.gethostname()}"


def register_info_command() -> None:
    """Register the ``neuron_info`` inspect command (in the worker process): it answers with what the app's
    ``neuron_info`` callable returns (device, batch size, images, images/s)."""
    from celery.worker.control import inspect_command

    @inspect_command(name=NEURON_INFO)
    def neuron_info(state) -> dict:  # pragma: no cover - runs inside the worker
        provider = getattr(state.consumer.app, "neuron_info", None)
        return provider() if provider is not None else {}


@dataclass
class BrokerStatus:
    url: str  # masked
    error: str | None = None
    waiting: dict[str, int] = field(default_factory=dict)  # queue -> messages not yet delivered
    unacknowledged: int = 0  # delivered to a worker, not acknowledged (in flight, or held by a dead worker)
    oldest_unacknowledged_s: float | None = None
    workers: dict[str, dict] = field(default_factory=dict)  # node name -> neuron_info


def broker_status(settings: Settings, queues: list[str], timeout: float = 1.5) -> BrokerStatus:
    """Queue depths and unacknowledged messages straight from Redis, and the live workers' own numbers."""
    import redis

    out = BrokerStatus(mask_url(settings.broker_url))
    try:
        client = _redis(settings)
        for q in queues:
            out.waiting[q] = client.llen(q)
        out.unacknowledged = client.hlen("unacked")  # kombu's Redis transport keeps delivered messages here
        oldest = client.zrange("unacked_index", 0, 0, withscores=True)
        if oldest:
            out.oldest_unacknowledged_s = max(0.0, time.time() - oldest[0][1])
    except redis.RedisError as exc:
        out.error = (f"broker {out.url} is not reachable: {exc}; start Redis or set NEURON_BROKER_URL "
                     f"(redis://[:PASSWORD@]HOST:PORT/DB)")
        return out
    try:
        app = make_app(settings)
        replies = app.control.inspect(timeout=timeout)._request(NEURON_INFO) or {}
        out.workers = {node: info for node, info in sorted(replies.items()) if isinstance(info, dict)}
    except Exception as exc:  # noqa: BLE001 - status reports what it could not learn, it never stops on it
        out.error = f"could not ask the workers for their numbers: {type(exc).__name__}: {exc}"
    return out


def unacknowledged_tasks(settings: Settings) -> dict[str, tuple[int, float]] | None:
    """Every message Redis delivered and has not seen acknowledged, read from kombu's Redis transport (the
    ``unacked`` hash and its ``unacked_index`` delivery times): task id -> (instances it carries, delivered at).
    None when the broker cannot be read (``broker_status`` says why)."""
    import json

    import redis

    try:
        client = _redis(settings)
        raw = client.hgetall("unacked")
        delivered = dict(client.zrange("unacked_index", 0, -1, withscores=True))
    except redis.RedisError:
        return None
    out: dict[str, tuple[int, float]] = {}
    for tag, value in raw.items():
        try:
            message = json.loads(value)[0]
            payload = _payload(message)
            out[message["headers"]["id"]] = (len(payload.sop_instance_uids), delivered.get(tag, 0.0))
        except (ValueError, KeyError, IndexError, TypeError):  # not a Neuron task: count it, it holds no instances
            out[tag.decode(errors="replace")] = (0, delivered.get(tag, 0.0))
    return out


def _payload(message: dict) -> ScreenStudy:
    """The ``ScreenStudy`` inside one of kombu's Redis messages (its JSON envelope, the body base64-encoded)."""
    import base64
    import json

    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return ScreenStudy.from_body(json.loads(body))


# kombu's Redis transport keeps a queue's messages in a list named after the queue, or, for a message sent with a
# priority, in one list per priority step named queue + "\x06\x16" + step (kombu/transport/redis.py, ``_q_for_pri``,
# default steps 0, 3, 6, 9); Neuron sends without a priority, and a lost-message check reads them all.
_PRIORITY_SEP, _PRIORITY_STEPS = "\x06\x16", (3, 6, 9)


@dataclass
class BrokerMessages:
    """The SOP Instance UIDs that some message in the broker still carries, read in one Redis transaction: those
    waiting in the lists of ``queues``, and those delivered and not yet acknowledged (kombu's ``unacked`` hash).
    A queue longer than the reading's limit is not read, and is not in ``queues``."""

    queues: set[str]
    uids: set[str]


def messages_in_broker(settings: Settings, queues: list[str], limit: int) -> BrokerMessages:
    """Read every message of the queues holding at most ``limit`` messages, and every unacknowledged one, in one
    MULTI/EXEC, so a message that kombu moves between a list and the unacknowledged hash (a redelivery, all in one
    transaction) is seen in one of the two. Raises redis.RedisError when the broker cannot be read."""
    import json

    client = _redis(settings)
    try:
        keys = {q: [q] + [f"{q}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS] for q in queues}
        with client.pipeline(transaction=False) as pipe:
            for q in queues:
                for key in keys[q]:
                    pipe.llen(key)
            lengths = iter(pipe.execute())
        short = [q for q in queues if sum(next(lengths) for _ in keys[q]) <= limit]
        with client.pipeline(transaction=True) as pipe:
            for q in short:
                for key in keys[q]:
                    pipe.lrange(key, 0, -1)
            pipe.hvals("unacked")
            replies = pipe.execute()
    finally:
        client.close()
    uids: set[str] = set()
    # a waiting message is kombu's envelope; an unacknowledged one is [envelope, exchange, routing key]
    raws = [(m, False) for reply in replies[:-1] for m in reply] + [(v, True) for v in replies[-1]]
    for raw, delivered in raws:
        try:
            message = json.loads(raw)
            uids.update(_payload(message[0] if delivered else message).sop_instance_uids)
        except (ValueError, KeyError, IndexError, TypeError):  # another application's message: no instance of ours
            continue
    return BrokerMessages(set(short), uids)


def tasks_held_by_live_workers(settings: Settings, timeout: float) -> set[str] | None:
    """The ids of the tasks the live workers hold (running, received, or waiting out a retry countdown), asked in
    parallel so ``neuron status`` waits one inspect timeout. None when the workers could not be asked."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(method: str) -> dict:
        return make_app(settings).control.inspect(timeout=timeout)._request(method) or {}

    try:
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(ask, ("active", "reserved", "scheduled")))
    except Exception:  # noqa: BLE001 - status reports what it could not learn, it never stops on it
        return None
    held: set[str] = set()
    for per_node in replies:
        for tasks in per_node.values():
            for t in tasks if isinstance(tasks, list) else ():
                held.add((t.get("request") or t).get("id"))  # scheduled entries wrap the task in "request"
    return held


def held_by_no_live_worker(before, after, held, visibility_timeout: int) -> dict | None:
    """Messages unacknowledged throughout the workers' answers and held by none of them: a dead worker's studies,
    which Redis redelivers only once they are ``visibility_timeout`` seconds old. Reading the unacknowledged
    messages before and after the answers leaves out a message delivered or acknowledged meanwhile."""
    if before is None or after is None or held is None:
        return None
    orphans = [after[t] for t in before.keys() & after.keys() if t not in held]
    oldest = max((time.time() - at for _, at in orphans), default=None)
    return {"studies": len(orphans), "instances": sum(n for n, _ in orphans),
            "oldest_s": None if oldest is None else round(oldest, 1),
            "redelivered_in_s": None if oldest is None else round(max(0.0, visibility_timeout - oldest), 1)}


def take_turn(settings: Settings, job: str, holder: str, seconds: float) -> bool:
    """True for one caller per ``seconds`` across the cluster (a Redis key set only if absent, expiring after
    ``seconds``): the workers share a periodic job instead of each doing it. Raises redis.RedisError."""
    client = _redis(settings)
    try:
        return bool(client.set(f"neuron:turn:{job}", holder, nx=True, px=max(1, int(seconds * 1000))))
    finally:
        client.close()


# -- heartbeats: who is consuming, seen by `neuron status` even when a worker cannot answer -----------------------
WORKERS_KEY = "neuron:workers"  # a Redis hash: worker name -> its last heartbeat (JSON)
HEARTBEAT_S = 5.0
STOPPED_AFTER_S = 3 * HEARTBEAT_S  # three missed beats: the worker is dead, or cut off from the broker
FORGET_AFTER_S = 24 * 3600.0  # a stopped worker's record is dropped by the next worker that starts after this


def _redis(settings: Settings):
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_connect_timeout=3, socket_timeout=5)


class Heartbeat:
    """A worker's record in the broker's Redis, written every ``HEARTBEAT_S``: its host, node, device, queues and the
    task ids of the studies it holds. Celery's own heartbeats are events that only a listener at that moment sees;
    this record stays, so ``neuron status`` can name a worker that stopped beating (killed, or partitioned from the
    broker) and the studies it held, which Redis delivers again once they are ``visibility_timeout`` old. A clean
    stop removes the record."""

    def __init__(self, settings: Settings, name: str, describe, every: float = HEARTBEAT_S):
        import threading

        self.settings, self.name, self.describe, self.every = settings, name, describe, every
        self._client = _redis(settings)  # connects on first use, and again after the broker was away
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._forget_old()
        self._thread.start()
        return self

    def beat(self) -> None:
        import json

        record = {**self.describe(), "host": socket.gethostname(), "pid": os.getpid(), "seen": time.time()}
        self._client.hset(WORKERS_KEY, self.name, json.dumps(record))

    def _loop(self) -> None:
        import redis

        while not self._stop.is_set():
            try:
                self.beat()
            except redis.RedisError:  # the broker is away: the missed beats are what status reports
                pass
            self._stop.wait(self.every)

    def _forget_old(self) -> None:
        import json

        import redis

        try:
            for name, raw in self._client.hgetall(WORKERS_KEY).items():
                if time.time() - json.loads(raw).get("seen", 0) > FORGET_AFTER_S:
                    self._client.hdel(WORKERS_KEY, name)
        except (redis.RedisError, ValueError):
            pass

    def stop(self) -> None:
        import redis

        self._stop.set()
        self._thread.join(timeout=self.every + 5)
        try:
            self._client.hdel(WORKERS_KEY, self.name)
        except redis.RedisError:
            pass
        self._client.close()


def worker_records(settings: Settings, now: float | None = None) -> dict[str, dict] | None:
    """Every worker's last heartbeat, with ``stopped`` (no beat for ``STOPPED_AFTER_S``) and ``silent_s``; None when
    the broker cannot be read."""
    import json

    import redis

    try:
        raw = _redis(settings).hgetall(WORKERS_KEY)
    except redis.RedisError:
        return None
    now = time.time() if now is None else now
    out = {}
    for name, value in sorted(raw.items()):
        try:
            record = json.loads(value)
        except ValueError:
            continue
        silent = max(0.0, now - float(record.get("seen", 0)))
        out[name.decode(errors="replace")] = {**record, "silent_s": round(silent, 1),
                                              "stopped": silent > STOPPED_AFTER_S}
    return out
