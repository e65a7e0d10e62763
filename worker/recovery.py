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

Torch-free: the API server calls this every 10 s, each worker once at start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store import db, runs
from store.models import Run, utcnow

log = logging.getLogger(__name__)

STALE_AFTER_S = 30.0
MAX_ATTEMPTS = 2

Enqueue = Callable[[int, Any], Any]


def _last_sign() -> Any:
    return sa.func.coalesce(Run.heartbeat_at, Run.started_at, Run.created_at)


def _take(s: Any, run_id: int, older_than_s: float, status: str) -> bool:
    """Move a still-stale running run to ``status``; False if someone else got there.

    A conditional UPDATE, so two reapers (the API and a starting worker) never both
    re-queue one run, and a run whose heartbeat resumed in the meantime is left alone.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    result = s.execute(
        sa.update(Run)
        .where(Run.id == run_id, Run.status == "running", _last_sign() < cutoff)
        .values(status=status)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def reap_stale(
    engine: Engine,
    *,
    older_than_s: float = STALE_AFTER_S,
    max_attempts: int = MAX_ATTEMPTS,
    enqueue: Enqueue | None = None,
    celery_app: Any = None,
) -> list[int]:
    """Re-queue (or fail, past ``max_attempts``) runs silent for ``older_than_s``.

    Returns the ids of the runs it re-queued or failed. ``enqueue(run_id, spec)`` sends
    the message; by default ``worker.celery_app.enqueue`` on ``celery_app`` (default: the
    environment's broker).
    """
    if older_than_s <= 0:
        raise ValueError(f"older_than_s: must be > 0, got {older_than_s}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts: must be >= 1, got {max_attempts}")
    from trainer.spec import RunSpec

    with db.session(engine) as s:
        stale = [
            (r.id, r.attempts or 0, r.worker, r.host, r.heartbeat_at)
            for r in runs.stale_runs(s, older_than_s)
        ]
    reaped: list[int] = []
    for run_id, attempts, worker, host, last_beat in stale:
        where = f"worker {worker or '?'} on {host or '?'}"
        if attempts >= max_attempts:
            with db.session(engine) as s:
                if not _take(s, run_id, older_than_s, "failed"):
                    continue
                runs.mark_finished(
                    s,
                    run_id,
                    "failed",
                    error=f"WorkerLost: no heartbeat for over {older_than_s:g} s from {where}; "
                    f"gave up after {attempts} attempts",
                )
            log.warning("run %s: %s went silent; failed after %s attempts", run_id, where, attempts)
            reaped.append(run_id)
            continue
        with db.session(engine) as s:
            if not _take(s, run_id, older_than_s, "queued"):
                continue
            runs.requeue(s, run_id)
            spec_dict = dict(runs.get_run(s, run_id).spec)  # type: ignore[union-attr]
        try:
            spec = RunSpec.model_validate(spec_dict)
        except ValueError as exc:
            with db.session(engine) as s:
                runs.mark_finished(s, run_id, "failed", error=f"invalid spec on retry: {exc}")
            reaped.append(run_id)
            continue
        if not _send(engine, run_id, spec, enqueue, celery_app, last_beat):
            continue
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
    try:
        if enqueue is not None:
            enqueue(run_id, spec)
        else:
            from worker.celery_app import enqueue as send

            send(run_id, spec, celery_app=celery_app, engine=engine)
        return True
    except Exception:
        log.warning("run %s: could not re-send; will retry", run_id, exc_info=True)
        with db.session(engine) as s:
            s.execute(
                sa.update(Run)
                .where(Run.id == run_id, Run.status == "queued")
                .values(status="running", heartbeat_at=last_beat)
                .execution_options(synchronize_session=False)
            )
        return False
