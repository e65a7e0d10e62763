"""What the broker holds: the runs whose ``batchlab.train_run`` message is still in flight.

Read by the reconciler (``worker.recovery.reconcile_queued``) and ``GET /api/health``.
Per transport, whatever is cheap and honest:
- Redis: LRANGE of each queue's lists (every priority step), plus the ``unacked`` hash
  entries delivered within the last ``recent_s`` (an older delivery of a still-queued run
  went to a worker that never claimed it).
- kombu's SQLAlchemy transport (SQLite by default): the visible rows of ``kombu_message``
  (a delivered row cannot be told from an acknowledged one, so it does not count).
- anything else (RabbitMQ): messages cannot be listed without consuming them, so only
  the count per queue (a passive declare); the reconciler compares counts instead.

Torch-free, like ``worker.celery_app``.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from celery import Celery

from worker.celery_app import (
    BROKER_TIMEOUT_S,
    TASK_NAME,
    _is_sqla,
    _sqlite_path,
    broker_lock,
    prepare_broker,
    queue_lengths,
)

_REDIS = ("redis://", "rediss://", "redis+socket://", "sentinel://")


@dataclass(frozen=True)
class InFlight:
    """Messages waiting per queue, and the runs they are for when the transport can say."""

    counts: dict[str, int]
    run_ids: frozenset[int] | None  # None: this transport cannot list its messages

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def in_flight(celery_app: Celery, queues: list[str], *, recent_s: float = 60.0) -> InFlight:
    """What the broker of ``celery_app`` holds in ``queues``; raises if it cannot answer."""
    url = str(celery_app.conf.broker_url)
    if url.startswith(_REDIS):
        return _redis(celery_app, queues, recent_s)
    if _is_sqla(url):
        return _sqla(url, queues)
    return InFlight(counts=queue_lengths(queues, celery_app=celery_app), run_ids=None)


def run_id_of(payload: Any) -> int | None:
    """The run id of a kombu message (a dict, or its JSON text) for our task, else None."""
    try:
        if isinstance(payload, str | bytes):
            payload = json.loads(payload)
        if payload["headers"].get("task") != TASK_NAME:
            return None
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]  # Celery protocol 2: [args, kwargs, embed]
        return int(args[0])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _ids(payloads: list[Any]) -> set[int]:
    return {i for i in map(run_id_of, payloads) if i is not None}


def _redis(celery_app: Celery, queues: list[str], recent_s: float) -> InFlight:
    counts: dict[str, int] = {}
    ids: set[int] = set()
    with broker_lock, celery_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=0, timeout=BROKER_TIMEOUT_S)
        channel = conn.default_channel
        client = channel.client
        for queue in queues:
            keys = {channel._q_for_pri(queue, pri) for pri in channel.priority_steps}
            payloads = [p for key in keys for p in client.lrange(key, 0, -1)]
            counts[queue] = len(payloads)
            ids |= _ids(payloads)
        tags = client.zrangebyscore(channel.unacked_index_key, time.time() - recent_s, "+inf")
        if tags:
            entries = client.hmget(channel.unacked_key, tags)
            # Each entry is [message, exchange, routing key].
            ids |= _ids([json.loads(e)[0] for e in entries if e])
    return InFlight(counts=counts, run_ids=frozenset(ids))


@lru_cache(maxsize=4)
def _sqla_engine(url: str) -> sa.Engine:
    inner = url.split("+", 1)[1]
    args = {"timeout": 30} if _sqlite_path(url) else {}
    return sa.create_engine(inner, connect_args=args, pool_pre_ping=True)


def _sqla(url: str, queues: list[str]) -> InFlight:
    prepare_broker(url)
    counts = dict.fromkeys(queues, 0)
    ids: set[int] = set()
    query = sa.text(
        "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
        " WHERE m.visible = :yes"
    )
    try:
        with _sqla_engine(url).connect() as conn:
            rows = conn.execute(query, {"yes": True}).all()
    except sa.exc.DBAPIError as err:  # SQLite: "no such table"; PostgreSQL: "does not exist"
        if "no such table" in str(err) or "does not exist" in str(err):  # nothing ever sent
            return InFlight(counts=counts, run_ids=frozenset())
        raise
    for name, payload in rows:
        if name in counts:
            counts[name] += 1
            ids |= _ids([payload])
    return InFlight(counts=counts, run_ids=frozenset(ids))
