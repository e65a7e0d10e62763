"""The Celery app: what the API server needs to queue runs, and what workers load.

This module is torch-free and cheap to import: the API server imports it to send
``batchlab.train_run`` messages by name, never importing the task code itself. Workers
load the task through ``include`` (``worker.tasks``).

The broker comes from ``BATCHLAB_BROKER_URL`` (Redis in compose, or RabbitMQ). The
default is kombu's SQLAlchemy transport on a SQLite file next to the database, so a
single machine needs nothing installed. No result backend: a run's status lives in our
own database (``store``), which is also what ``GET /api/workers`` reads.

Delivery settings, and why:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only once
  the run has finished, so a worker process that dies mid-run gives the message back.
- ``worker_prefetch_multiplier=1`` with concurrency 1: a worker never holds a second run
  hostage while it trains the first.
- Duplicated deliveries are harmless: the task only starts a run whose status it can
  switch from ``queued`` to ``running`` (see ``worker.tasks``). Crash recovery itself is
  ``worker.recovery.reap_stale``, driven by the run's heartbeat, not by the broker.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import warnings
from collections.abc import Collection
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import Celery
from sqlalchemy.engine import make_url

from core.settings import get_settings
from core.status import RunStatus

if TYPE_CHECKING:
    from trainer.spec import RunSpec

log = logging.getLogger(__name__)

TASK_NAME = "batchlab.train_run"
CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
# A worker not heard from for this long is shown as gone in GET /api/workers.
WORKER_STALE_S = 30.0
# Redis: how long a delivered, unacknowledged message stays invisible before Redis hands
# it out again. Runs are long, and crash recovery is the heartbeat reaper's job (30 s),
# so this only bounds the rare message lost between delivery and the run's claim; a
# re-delivery of a run that is already running is skipped by the task.
REDIS_VISIBILITY_TIMEOUT_S = 3600
BROKER_TIMEOUT_S = 3.0
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")
# kombu's SQLAlchemy transport on SQLAlchemy 2.1 declares its Queue.messages relation as
# lazy="noload", which 2.1 deprecates; harmless for the transport, noisy in every log.
warnings.filterwarnings(
    "ignore", message=r".*``noload`` loader strategy is deprecated.*", category=DeprecationWarning
)


def _is_sqla(url: str) -> bool:
    return url.startswith(("sqla+", "sqlalchemy+"))


def _sqlite_path(url: str) -> str | None:
    """The database file of a ``sqla+sqlite:///...`` broker URL, else None."""
    if not _is_sqla(url):
        return None
    parsed = make_url(url.split("+", 1)[1])
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


def _transport_options(url: str) -> dict[str, Any]:
    if _is_sqla(url):
        # The SQLAlchemy transport passes its options to create_engine(), so only engine
        # arguments fit here (its 1 s polling interval cannot be set this way). SQLite
        # writers wait on each other instead of failing with "database is locked".
        if _sqlite_path(url):
            return {"connect_args": {"timeout": 30}}
        return {"pool_pre_ping": True}
    if url.startswith(("redis://", "rediss://", "redis+socket://", "sentinel://")):
        return {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    if url.startswith(AMQP_SCHEMES):
        # Publisher confirms: a send returns only once RabbitMQ has the message (queues
        # and messages are durable by default), so a run is never queued with no message.
        return {"confirm_publish": True}
    return {}


def make_app(url: str | None = None) -> Celery:
    """A configured Celery app for ``url`` (default: ``BATCHLAB_BROKER_URL``)."""
    url = url or get_settings().broker_url
    app = Celery("batchlab", broker=url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=CPU_QUEUE,
        task_create_missing_queues=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=_transport_options(url),
        broker_connection_retry_on_startup=True,
        # The SQLAlchemy transport has no fanout exchange, so remote control (pidbox)
        # cannot reach workers on it; it would only add a queue to poll.
        worker_enable_remote_control=not _is_sqla(url),
        worker_send_task_events=False,
        worker_hijack_root_logger=True,
    )
    return app


app = make_app()

_prepared: set[str] = set()
_prepared_lock = threading.Lock()
# kombu's virtual transports (the SQLAlchemy one above all) are not safe when one
# process's threads share the connection pool: a connection released by a health check
# can lose its client under a concurrent send_task ("'NoneType' object has no attribute
# 'client'", seen once in the tests). The API serves requests from a thread pool, so every
# broker call here goes through this lock; they are short.
broker_lock = threading.RLock()


def prepare_broker(url: str) -> None:
    """Make a SQLite broker file usable by several processes (once per process).

    kombu opens the file with its own engine, so our store's WAL pragma does not reach
    it; WAL is a property of the file, set once here, and lets the API count queued
    messages while workers poll. Other brokers need nothing.
    """
    path = _sqlite_path(url)
    if path is None or path in _prepared:
        return
    with _prepared_lock:
        if path in _prepared:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        conn = sqlite3.connect(path, timeout=30)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
        _prepared.add(path)


def prune_delivered(url: str) -> int:
    """Delete the SQLite broker's delivered messages; how many went.

    kombu's SQLAlchemy transport marks a delivered message invisible and never deletes
    it, so the table grows by one row per run forever. Deleting them is safe at any
    time: a worker keeps the message it holds in memory, and a rejected or unacked
    message is put back as a new row. Other brokers: nothing to do.
    """
    path = _sqlite_path(url)
    if path is None or not os.path.exists(path):
        return 0
    conn = sqlite3.connect(path, timeout=30)
    try:
        with conn:
            cur = conn.execute("DELETE FROM kombu_message WHERE visible = 0")
        return cur.rowcount
    except sqlite3.OperationalError:  # no such table yet: nothing was ever sent
        return 0
    finally:
        conn.close()


def queue_for(spec: RunSpec, *, have_gpus: bool = False) -> str:
    """The queue a run belongs on: ``cpu``, ``gpu``, or ``gpuN`` for N real GPUs.

    ``device="auto"`` means a GPU when one is there to be had; the caller says whether
    any GPU worker exists (``have_gpus``), since this function cannot see the workers.
    """
    on_gpu = spec.device == "cuda" or (spec.device == "auto" and have_gpus)
    if not on_gpu:
        return CPU_QUEUE
    return GPU_QUEUE if spec.nproc == 1 else f"{GPU_QUEUE}{spec.nproc}"


def gpu_workers_seen(engine: Any = None, *, within_s: float = WORKER_STALE_S) -> bool:
    """Whether any worker consuming a GPU queue was alive recently (workers table)."""
    from store import db, runs

    engine = engine or db.get_engine()
    with db.session(engine) as s:
        return has_gpu_queue(runs.live_queues(s, seen_within_s=within_s))


def has_gpu_queue(queues: Collection[str]) -> bool:
    return any(q.startswith(GPU_QUEUE) for q in queues)


def waiting_reason(status: str, queue: str | None, live: Collection[str]) -> str | None:
    """Why a queued run is not taken: no live worker consumes its queue (``live``: the
    queues of live workers). None when one does, the run is not queued, or its queue is
    unknown (runs queued before queues were recorded)."""
    if status != RunStatus.QUEUED or queue is None or queue in live:
        return None
    return f"no live worker serves queue {queue}"


def enqueue(
    run_id: int,
    spec: RunSpec,
    *,
    celery_app: Celery | None = None,
    queue: str | None = None,
    engine: Any = None,
) -> str:
    """Send ``batchlab.train_run(run_id)`` to the queue that fits ``spec``; the task id
    (of the first message).

    ``device="auto"`` goes to ``gpu`` only while a GPU worker is registered, otherwise it
    would wait forever on a machine without one. With ``engine``, the queue is also noted
    on the run (``waiting_for`` of the API names it while no live worker serves it).
    A multi-node run gets ``spec.nodes`` messages: one token per node its gang needs
    (store/gang.py).
    """
    if queue is None:
        have_gpus = False
        if spec.device == "auto":
            try:
                have_gpus = gpu_workers_seen(engine)
            except Exception:  # the workers table is a hint; never fail a submit on it
                log.warning("could not read the workers table; sending to cpu", exc_info=True)
        queue = queue_for(spec, have_gpus=have_gpus)
    if engine is not None:
        _record_queue(engine, run_id, queue)
    return send_tokens(run_id, queue, copies=spec.nodes, celery_app=celery_app)[0]


def send_tokens(
    run_id: int,
    queue: str,
    *,
    copies: int = 1,
    celery_app: Celery | None = None,
) -> list[str]:
    """Send ``copies`` messages ``batchlab.train_run(run_id)`` to ``queue``; their task
    ids. A multi-node run's messages are tokens for its gang's nodes (worker/multinode.py)."""
    celery_app = celery_app or app
    prepare_broker(str(celery_app.conf.broker_url))
    ids = []
    with broker_lock:
        for _ in range(copies):
            result = celery_app.send_task(TASK_NAME, args=[run_id], queue=queue)
            ids.append(str(result.id))
    return ids


def _record_queue(engine: Any, run_id: int, queue: str) -> None:
    from store import db, runs

    try:  # a hint for the UI, like the workers table: never fail a send on it
        with db.session(engine) as s:
            runs.record_queue(s, run_id, queue)
    except Exception:
        log.warning("run %s: could not record its queue %s", run_id, queue, exc_info=True)


def queue_lengths(queues: list[str], *, celery_app: Celery | None = None) -> dict[str, int]:
    """Messages waiting in each queue, asked of the broker (passive declare)."""
    celery_app = celery_app or app
    prepare_broker(str(celery_app.conf.broker_url))
    out: dict[str, int] = {}
    with broker_lock, celery_app.connection_for_write() as conn:
        # No retry: a broker that is down must not hold GET /api/workers for minutes.
        conn.ensure_connection(max_retries=0, timeout=BROKER_TIMEOUT_S)
        channel = conn.default_channel
        for name in queues:
            try:
                out[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except Exception:  # a queue nobody declared yet holds nothing
                out[name] = 0
                if not getattr(channel, "is_open", True):  # AMQP closes it on a 404
                    channel = conn.channel()
    return out


def inspect_workers(
    engine: Any = None, *, celery_app: Celery | None = None, stale_after_s: float = WORKER_STALE_S
) -> dict[str, Any]:
    """``GET /api/workers``: workers from our own table, queue lengths from the broker.

    Celery's remote inspection does not work over the SQLite transport, so each worker
    records itself in the ``workers`` table every few seconds (``worker.registry``).
    Workers silent for longer than ``stale_after_s`` are listed with ``alive: false``.
    """
    from core.settings import get_settings
    from store import db, gang, runs

    engine = engine or db.get_engine()
    now = datetime.now(UTC)
    workers: list[dict[str, Any]] = []
    queues: set[str] = {CPU_QUEUE, GPU_QUEUE}
    with db.session(engine) as s:
        held = gang.held(s, silent_s=get_settings().node_silent_s)
        for w in runs.list_workers(s):
            queues.update(str(q) for q in w.queues or [])
            entry = runs.worker_to_dict(w)
            entry["alive"] = (now - w.last_seen).total_seconds() <= stale_after_s
            node = held.get(w.name)
            entry["node"] = gang.node_to_dict(node) if node is not None else None
            workers.append(entry)
    try:
        lengths: dict[str, int] = queue_lengths(sorted(queues), celery_app=celery_app)
    except Exception:  # broker down: the workers list is still worth answering
        log.warning("could not read queue lengths from the broker", exc_info=True)
        lengths = {}
    return {"workers": workers, "queues": lengths}
