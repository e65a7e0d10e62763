"""Run, group and worker records: lifecycle transitions and their API shapes.

Every function takes a SQLAlchemy ``Session`` first and leaves committing to the caller
(``store.db.session`` commits on success). Mutations of a run that does not exist raise
``RunNotFound``; impossible transitions raise ``RunStateError``. Both are ``ValueError``
/ ``LookupError`` subclasses whose message names the run and the field.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import Session

from store.models import (
    FINAL_STATUSES,
    GROUP_KINDS,
    RUN_STATUSES,
    Group,
    MetricPoint,
    Run,
    SeriesOverview,
    WorkerBeat,
    utcnow,
)


class RunNotFound(LookupError):
    """The run id names no run (it may have been deleted)."""


class RunStateError(ValueError):
    """The requested transition does not apply to the run's current status."""


# ---------------------------------------------------------------------------------------
# Runs


def _get(s: Session, run_id: int) -> Run:
    run = s.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"run {run_id} not found")
    return run


def create_run(
    s: Session,
    *,
    name: str,
    spec: Mapping[str, Any],
    group_id: int | None = None,
    baseline_id: int | None = None,
    is_baseline: bool = False,
) -> Run:
    """A new queued run. ``spec`` is stored as given (the API validates it first)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name: must be a non-empty string")
    if len(name) > 200:
        raise ValueError("name: at most 200 characters")
    if not isinstance(spec, Mapping):
        raise ValueError(f"spec: must be an object, got {type(spec).__name__}")
    run = Run(
        name=name.strip(),
        spec=dict(spec),
        status="queued",
        created_at=utcnow(),
        attempts=0,
        cancel_requested=False,
        progress=0.0,
        is_baseline=bool(is_baseline),
    )
    if group_id is not None:
        group = s.get(Group, group_id)
        if group is None:
            raise ValueError(f"group_id: group {group_id} not found")
        # Through the relationship, so group.runs is current within this session too.
        run.group = group
    else:
        run.group = None
    if baseline_id is not None:
        if s.get(Run, baseline_id) is None:
            raise ValueError(f"baseline_id: run {baseline_id} not found")
        run.baseline_id = baseline_id
    s.add(run)
    s.flush()
    return run


def get_run(s: Session, run_id: int) -> Run | None:
    return s.get(Run, run_id)


def list_runs(
    s: Session,
    *,
    status: str | Sequence[str] | None = None,
    group_id: int | None = None,
    limit: int = 500,
) -> list[Run]:
    """Runs newest first, optionally of some statuses and/or one group."""
    q = sa.select(Run).order_by(Run.id.desc()).limit(limit)
    if status is not None:
        statuses = [status] if isinstance(status, str) else list(status)
        unknown = [x for x in statuses if x not in RUN_STATUSES]
        if unknown:
            raise ValueError(f"status: unknown {unknown}, expected one of {RUN_STATUSES}")
        q = q.where(Run.status.in_(statuses))
    if group_id is not None:
        q = q.where(Run.group_id == group_id)
    return list(s.scalars(q))


def delete_run(s: Session, run_id: int) -> bool:
    """Delete a run and its metric points; False when there was no such run."""
    run = s.get(Run, run_id)
    if run is None:
        return False
    s.execute(sa.update(Run).where(Run.baseline_id == run_id).values(baseline_id=None))
    s.execute(
        sa.update(WorkerBeat).where(WorkerBeat.active_run_id == run_id).values(active_run_id=None)
    )
    # The run row first: deleting it waits for a metric batch that holds the row's lock,
    # and the points DELETE after it (a new snapshot) then sees that batch's points too.
    s.delete(run)
    s.flush()
    s.execute(sa.delete(MetricPoint).where(MetricPoint.run_id == run_id))
    s.execute(sa.delete(SeriesOverview).where(SeriesOverview.run_id == run_id))
    from store.metrics import invalidate  # late: metrics imports numpy/tsdownsample

    invalidate(run_id)
    return True


def mark_running(
    s: Session, run_id: int, *, host: str, gpus: str, worker: str, task_id: str | None = None
) -> None:
    """A worker took the run: record where, count the attempt, heartbeat now.

    Raises RunStateError when the run is already final (e.g. cancelled while queued):
    the worker must not train it.
    """
    run = _get(s, run_id)
    if run.status in FINAL_STATUSES:
        raise RunStateError(f"run {run_id} is {run.status}; requeue it before running again")
    now = utcnow()
    run.status = "running"
    run.started_at = run.started_at or now
    run.finished_at = None
    run.host, run.gpus, run.worker = host, _gpus_text(gpus), worker
    run.task_id = task_id
    run.attempts = (run.attempts or 0) + 1
    run.heartbeat_at = now
    s.flush()


def mark_finished(
    s: Session,
    run_id: int,
    status: str,
    *,
    error: str | None = None,
    diverged_step: int | None = None,
    summary: Mapping[str, Any] | None = None,
) -> None:
    """Record the final status (succeeded | failed | diverged | cancelled)."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"status: {status!r} is not a final status {FINAL_STATUSES}")
    run = _get(s, run_id)
    run.status = status
    run.finished_at = utcnow()
    run.error = error
    run.diverged_step = diverged_step
    if summary is not None:
        run.summary = _json_safe(dict(summary))
    if status == "succeeded":
        run.progress = 1.0
    run.eta_s = None
    s.flush()


def set_progress(s: Session, run_id: int, progress: float, eta_s: float | None) -> None:
    """Fraction done (clamped to [0, 1]) and seconds left; also a heartbeat."""
    if not isinstance(progress, int | float) or math.isnan(progress):
        raise ValueError(f"progress: must be a number in [0, 1], got {progress!r}")
    run = _get(s, run_id)
    run.progress = min(1.0, max(0.0, float(progress)))
    run.eta_s = float(eta_s) if eta_s is not None and math.isfinite(eta_s) else None
    run.heartbeat_at = utcnow()
    s.flush()


def heartbeat(s: Session, run_id: int) -> None:
    _get(s, run_id).heartbeat_at = utcnow()
    s.flush()


def request_cancel(s: Session, run_id: int) -> Run | None:
    """Queued: cancelled at once. Running: flag set, the worker stops at its next poll.

    Final runs are left as they are. None when the run does not exist.
    """
    run = s.get(Run, run_id)
    if run is None:
        return None
    if run.status == "queued":
        run.status = "cancelled"
        run.finished_at = utcnow()
        run.cancel_requested = True
        run.eta_s = None
    elif run.status == "running":
        run.cancel_requested = True
    s.flush()
    return run


def cancel_requested(s: Session, run_id: int) -> bool:
    """Should the worker stop? Also True for a deleted or already-cancelled run."""
    row = s.execute(sa.select(Run.cancel_requested, Run.status).where(Run.id == run_id)).first()
    if row is None:
        return True
    return bool(row.cancel_requested) or row.status == "cancelled"


def stale_runs(s: Session, older_than_s: float) -> list[Run]:
    """Running runs whose last heartbeat (or start) is older than ``older_than_s``."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    last_sign = sa.func.coalesce(Run.heartbeat_at, Run.started_at, Run.created_at)
    q = sa.select(Run).where(Run.status == "running", last_sign < cutoff).order_by(Run.id)
    return list(s.scalars(q))


def requeue(s: Session, run_id: int) -> None:
    """Back to queued (recovery re-sends it; the trainer resumes from its checkpoint)."""
    run = _get(s, run_id)
    run.status = "queued"
    run.finished_at = None
    run.heartbeat_at = None
    run.eta_s = None
    run.error = None
    s.flush()


# ---------------------------------------------------------------------------------------
# Groups


def create_group(
    s: Session,
    *,
    name: str,
    kind: str,
    spec: Mapping[str, Any] | None = None,
    batch_sizes: Iterable[int] | None = None,
    seeds: Iterable[int] | None = None,
) -> Group:
    if kind not in GROUP_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {GROUP_KINDS}")
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name: must be a non-empty string")
    group = Group(
        name=name.strip(),
        kind=kind,
        spec=dict(spec) if spec is not None else None,
        batch_sizes=list(batch_sizes) if batch_sizes is not None else None,
        seeds=list(seeds) if seeds is not None else None,
        created_at=utcnow(),
        runs=[],
    )
    s.add(group)
    s.flush()
    return group


def get_group(s: Session, group_id: int) -> Group | None:
    return s.get(Group, group_id)


def list_groups(s: Session) -> list[Group]:
    """Groups newest first."""
    return list(s.scalars(sa.select(Group).order_by(Group.id.desc())))


# ---------------------------------------------------------------------------------------
# Workers


def record_worker(
    s: Session,
    *,
    name: str,
    host: str,
    gpus: str | Sequence[int | str],
    queues: Sequence[str],
    active_run_id: int | None = None,
) -> None:
    """Insert or refresh a worker's heartbeat row."""
    beat = s.get(WorkerBeat, name)
    if beat is None:
        beat = WorkerBeat(name=name)
        s.add(beat)
    beat.host = host
    beat.gpus = _gpus_text(gpus)
    beat.queues = list(queues)
    beat.active_run_id = active_run_id
    beat.last_seen = utcnow()
    s.flush()


def list_workers(s: Session) -> list[WorkerBeat]:
    return list(s.scalars(sa.select(WorkerBeat).order_by(WorkerBeat.name)))


# ---------------------------------------------------------------------------------------
# API shapes (docs/api.md)


def iso(dt: datetime | None) -> str | None:
    """UTC ISO 8601 with a Z suffix, millisecond precision."""
    if dt is None:
        return None
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return dt.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def derived(spec: Mapping[str, Any]) -> dict[str, Any]:
    """RunSpec.summary_dict() of a stored spec; {} when it no longer validates."""
    from trainer.spec import RunSpec

    try:
        return RunSpec.model_validate(dict(spec)).summary_dict()
    except (ValidationError, ValueError, TypeError):
        # Specs written by an older version may not validate today; the run must still list.
        return {}


def run_to_dict(run: Run) -> dict[str, Any]:
    """The Run object of docs/api.md (plus attempts, cancel_requested, heartbeat_at)."""
    return {
        "id": run.id,
        "name": run.name,
        "status": run.status,
        "spec": run.spec,
        "derived": derived(run.spec or {}),
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "heartbeat_at": iso(run.heartbeat_at),
        "progress": run.progress,
        "eta_s": run.eta_s,
        "host": run.host,
        "gpus": run.gpus,
        "worker": run.worker,
        "attempts": run.attempts,
        "cancel_requested": run.cancel_requested,
        "error": run.error,
        "diverged_step": run.diverged_step,
        "summary": run.summary,
        "group_id": run.group_id,
        "baseline_id": run.baseline_id,
        "is_baseline": run.is_baseline,
    }


def group_to_dict(group: Group) -> dict[str, Any]:
    """The Group object of docs/api.md. baseline_id: the group's baseline run, if any."""
    runs = list(group.runs)
    baseline = next((r.id for r in runs if r.is_baseline), None)
    if baseline is None:
        baseline = next((r.baseline_id for r in runs if r.baseline_id is not None), None)
    return {
        "id": group.id,
        "name": group.name,
        "kind": group.kind,
        "created_at": iso(group.created_at),
        "spec": group.spec,
        "batch_sizes": group.batch_sizes,
        "seeds": group.seeds,
        "baseline_id": baseline,
        "run_ids": [r.id for r in runs],
    }


def worker_to_dict(beat: WorkerBeat) -> dict[str, Any]:
    """A worker of GET /api/workers (``active``: the run it is training, or None)."""
    return {
        "name": beat.name,
        "host": beat.host,
        "gpus": beat.gpus,
        "queues": beat.queues,
        "active": beat.active_run_id,
        "last_seen": iso(beat.last_seen),
    }


# ---------------------------------------------------------------------------------------


def _gpus_text(gpus: str | Sequence[int | str] | None) -> str:
    if gpus is None:
        return ""
    if isinstance(gpus, str):
        return gpus
    return ",".join(str(g) for g in gpus)


def _json_safe(value: Any) -> Any:
    """Non-finite floats become None: JSON (and PostgreSQL's json type) has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
