"""Crash recovery: runs whose worker went silent are re-queued or given up.

A worker that dies mid-run (kill -9, OOM, a lost machine) leaves its run ``running``
with a heartbeat that stops moving. ``reap_stale`` finds such runs, puts them back on
the queue (the trainer resumes from the last epoch checkpoint in ``runs/<id>``) and,
after ``max_attempts`` starts, marks them failed with the reason instead. Points the
dead attempt wrote after its last checkpoint are written again by the next attempt with
the same (run, key, step), and the store's writes are upserts, so nothing is lost or
duplicated.

The broker cannot be relied on for this: the SQLite transport forgets a message that a
killed worker had taken, and Redis only hands it out again after its visibility timeout.
A re-sent message for a run that has meanwhile restarted is skipped by the task.

A run can also be stranded while ``queued``: its message is lost with a broker that
keeps nothing on disk (Redis without AOF killed, its data deleted). ``reconcile_queued``
re-sends the message of a run queued longer than ``Settings.resend_after_s`` that has
none in flight (``worker.inflight``). A duplicate is harmless: ``store.runs.claim`` is a
compare-and-set queued -> running, so only one delivery of a run ever trains it.

Torch-free: the API server calls both every 10 s; each worker reaps once at start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core.settings import get_settings
from core.status import RunStatus
from store import db, runs
from store.models import Run

log = logging.getLogger(__name__)

STALE_AFTER_S = 30.0
MAX_ATTEMPTS = 2

Enqueue = Callable[[int, Any], Any]


def reap_stale(
    engine: Engine,
    *,
    older_than_s: float = STALE_AFTER_S,
    max_attempts: int = MAX_ATTEMPTS,
    enqueue: Enqueue | None = None,
    celery_app: Any = None,
    now: datetime | None = None,
) -> list[int]:
    """Re-queue (or fail, past ``max_attempts``) runs silent for ``older_than_s``.

    Returns the ids of the runs it re-queued or failed. ``enqueue(run_id, spec)`` sends
    the message; by default ``worker.celery_app.enqueue`` on ``celery_app`` (default: the
    environment's broker). ``now`` is the time silence is measured at (default: the
    current time; tests pass a later one instead of sleeping).
    """
    if older_than_s <= 0:
        raise ValueError(f"older_than_s: must be > 0, got {older_than_s}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts: must be >= 1, got {max_attempts}")
    from trainer.spec import RunSpec

    with db.session(engine) as s:
        stale = [
            (r.id, r.attempts or 0, r.worker, r.host, r.heartbeat_at)
            for r in runs.stale_runs(s, older_than_s, now=now)
            # An external run has no broker message to re-send: reap_external's.
            if r.origin != runs.ORIGIN_EXTERNAL
        ]
    reaped: list[int] = []
    for run_id, attempts, worker, host, last_beat in stale:
        where = f"worker {worker or '?'} on {host or '?'}"
        # Each store call below is a compare-and-set on a still-silent running run, so two
        # reapers (the API and a starting worker) never both act on one run, and a run
        # whose heartbeat resumed meanwhile is left alone.
        if attempts >= max_attempts:
            error = (
                f"WorkerLost: no heartbeat for over {older_than_s:g} s from {where}; "
                f"gave up after {attempts} attempts"
            )
            with db.session(engine) as s:
                if not runs.reap(s, run_id, older_than_s, fail_with=error, now=now):
                    continue
            log.warning("run %s: %s went silent; failed after %s attempts", run_id, where, attempts)
            reaped.append(run_id)
            continue
        with db.session(engine) as s:
            if not runs.reap(s, run_id, older_than_s, now=now):
                continue
            spec_dict = dict(runs.get_run(s, run_id).spec)  # type: ignore[union-attr]
        try:
            spec = RunSpec.model_validate(spec_dict)
        except ValueError as exc:
            with db.session(engine) as s:
                runs.mark_finished(
                    s, run_id, RunStatus.FAILED, error=f"invalid spec on retry: {exc}"
                )
            reaped.append(run_id)
            continue
        if not _send(engine, run_id, spec, enqueue, celery_app, last_beat):
            continue
        _note_sent(engine, run_id, now)
        log.warning("run %s: %s went silent; re-queued (attempt %s)", run_id, where, attempts + 1)
        reaped.append(run_id)
    return reaped


def _send(
    engine: Engine,
    run_id: int,
    spec: Any,
    enqueue: Enqueue | None,
    celery_app: Any,
    last_beat: datetime | None,
) -> bool:
    """Send the message only after the requeue committed, so the worker that takes it
    finds the run queued. If the broker is down, put the run back to ``running`` with
    its old heartbeat: the next reap tries again instead of leaving it queued with no
    message."""
    if publish(engine, run_id, spec, enqueue, celery_app):
        return True
    with db.session(engine) as s:
        runs.undo_requeue(s, run_id, heartbeat_at=last_beat)
    return False


def publish(
    engine: Engine, run_id: int, spec: Any, enqueue: Enqueue | None, celery_app: Any
) -> bool:
    """Send the run's message (through ``enqueue`` when given); False if the broker failed
    (the run stays queued with no message: the reconciler re-sends it)."""
    try:
        if enqueue is not None:
            enqueue(run_id, spec)
        else:
            from worker.celery_app import enqueue as send

            send(run_id, spec, celery_app=celery_app, engine=engine)
        return True
    except Exception:
        log.warning("run %s: could not send its message; will retry", run_id, exc_info=True)
        return False


def reap_external(
    engine: Engine, *, older_than_s: float | None = None, now: datetime | None = None
) -> list[int]:
    """Fail the external runs whose client has been silent for ``older_than_s`` (default
    ``Settings.external_silent_s``): "lost contact with the client". Never re-queued: the
    training lives in the client's process (a scheduler's job, a notebook), and no broker
    message exists. A client that calls again revives the run (``runs.external_beat``).
    The ids it failed."""
    older_than_s = get_settings().external_silent_s if older_than_s is None else older_than_s
    if older_than_s <= 0:
        raise ValueError(f"older_than_s: must be > 0, got {older_than_s}")
    with db.session(engine) as s:
        stale = [(r.id, r.host) for r in runs.stale_external_runs(s, older_than_s, now=now)]
    failed = []
    for run_id, host in stale:
        with db.session(engine) as s:
            if runs.reap_external(s, run_id, older_than_s, now=now):
                failed.append(run_id)
                log.warning("run %s: its client on %s went silent; failed", run_id, host or "?")
    return failed


# ---------------------------------------------------------------------------------------
# Queued runs whose message was lost

# When this process last sent each run's message (keyed by database URL and run id): a
# re-queued run's created_at is old, and a transport that cannot list its messages would
# otherwise get a new copy at every pass. Lost on restart, which costs one duplicate.
_sent_at: dict[tuple[str, int], datetime] = {}
_sent_lock = threading.Lock()
_last: dict[str, ReconcileReport] = {}


def _note_sent(engine: Engine, run_id: int, now: datetime | None) -> None:
    with _sent_lock:
        _sent_at[(str(engine.url), run_id)] = now or datetime.now(UTC)


@dataclass
class ReconcileReport:
    """One pass: the database's queued runs against the broker's messages."""

    at: datetime
    queued_runs: int
    broker_messages: int | None = None  # waiting in the run's queues; None: broker down
    exact: bool = False  # the transport listed which runs its messages are for
    missing: list[int] = field(default_factory=list)  # queued past the bound, no message
    resent: list[int] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "queued_runs": self.queued_runs,
            "broker_messages": self.broker_messages,
            "exact": self.exact,
            "missing": self.missing,
            "resent": self.resent,
            "error": self.error,
        }


def last_report(engine: Engine) -> ReconcileReport | None:
    """The latest pass of this process over ``engine``'s runs (None: none yet)."""
    return _last.get(str(engine.url))


def reconcile_queued(
    engine: Engine,
    *,
    after_s: float | None = None,
    enqueue: Enqueue | None = None,
    celery_app: Any = None,
    now: datetime | None = None,
) -> ReconcileReport:
    """Re-send runs queued for ``after_s`` (default ``Settings.resend_after_s``) with no
    message in flight, nor one sent by this process within ``after_s``.

    Where the transport lists its messages (Redis, SQLite), a run is missing when no
    message names it. Where it only counts them (RabbitMQ), the runs of a queue holding
    fewer messages than queued runs are all re-sent, once per ``after_s``; claim's
    compare-and-set makes the extra copies no-ops.
    """
    from worker.celery_app import CPU_QUEUE, GPU_QUEUE
    from worker.celery_app import app as default_app
    from worker.inflight import in_flight

    after_s = get_settings().resend_after_s if after_s is None else after_s
    if after_s <= 0:
        raise ValueError(f"after_s: must be > 0, got {after_s}")
    now = now or datetime.now(UTC)
    # Auto sweeps whose baseline ended with no worker to advance them (cancelled while
    # queued, failed by the reaper, a worker lost after mark_finished): queue their ladder.
    from worker import auto_sweep

    auto_sweep.advance_waiting(engine, enqueue=enqueue, celery_app=celery_app)
    with db.session(engine) as s:
        queued = s.execute(
            sa.select(Run.id, Run.queue, Run.created_at, Run.nodes).where(
                Run.status == RunStatus.QUEUED
            )
        ).all()
    report = ReconcileReport(at=now, queued_runs=len(queued))
    _last[str(engine.url)] = report
    queues = sorted({CPU_QUEUE, GPU_QUEUE} | {q for _, q, _, _ in queued if q})
    try:
        view = in_flight(celery_app or default_app, queues, recent_s=after_s)
    except Exception as err:  # broker down: nothing can be sent now anyway
        report.error = f"{type(err).__name__}: {err}"[:300]
        log.warning("reconcile: could not read the broker: %s", report.error)
        return report
    report.broker_messages, report.exact = view.total, view.run_ids is not None

    cutoff = now - timedelta(seconds=after_s)
    with _sent_lock:
        for key in [k for k, at in _sent_at.items() if at <= cutoff]:
            del _sent_at[key]  # past the bound they no longer hold a run back
        recent = {rid for (url, rid) in _sent_at if url == str(engine.url)}
    per_queue: dict[str, int] = {}  # messages the queued runs should have (a gang: N)
    for _, queue, _, nodes in queued:
        per_queue[queue or CPU_QUEUE] = per_queue.get(queue or CPU_QUEUE, 0) + (nodes or 1)
    for run_id, queue, created_at, _ in queued:
        if created_at > cutoff or run_id in recent:
            continue
        if view.run_ids is not None:
            if run_id in view.run_ids:
                continue
        elif view.counts.get(queue or CPU_QUEUE, 0) >= per_queue[queue or CPU_QUEUE]:
            continue
        report.missing.append(run_id)
    for run_id in report.missing:
        if _resend(engine, run_id, enqueue, celery_app):
            _note_sent(engine, run_id, now)
            report.resent.append(run_id)
    if report.resent:
        log.warning("reconcile: re-sent the lost messages of queued runs %s", report.resent)
    return report


def _resend(engine: Engine, run_id: int, enqueue: Enqueue | None, celery_app: Any) -> bool:
    from trainer.spec import RunSpec

    with db.session(engine) as s:
        run = runs.get_run(s, run_id)
        if run is None or run.status != RunStatus.QUEUED:
            return False  # claimed, cancelled or deleted since the read
        spec_dict = dict(run.spec)
    try:
        spec = RunSpec.model_validate(spec_dict)
    except ValueError as exc:
        with db.session(engine) as s:
            runs.mark_finished(s, run_id, RunStatus.FAILED, error=f"invalid spec on re-send: {exc}")
        return False
    return publish(engine, run_id, spec, enqueue, celery_app)
