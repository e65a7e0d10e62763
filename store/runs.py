"""Run, group and worker records, and the one place where a run's status changes.

Every function takes a SQLAlchemy ``Session`` first and leaves committing to the caller
(``store.db.session`` commits on success). The lifecycle (statuses: ``core.status``)::

    queued  --claim-->          running  --mark_finished-->  succeeded | failed | diverged
    queued  --request_cancel--> cancelled   (running: only the flag; the worker finishes it)
    running, silent --reap-->   queued (re-sent; undo_requeue if the send fails), or failed
    any     --requeue-->        queued    (by hand)

Each transition is a compare-and-set: one conditional UPDATE that applies only from the
statuses it names and returns whether it did, so two processes racing for one run (two
deliveries of a message, two reapers, a cancel and a finish) never both win. Those that
stand in for a worker in tests and tools (``mark_running``, ``requeue``, progress and
heartbeats) raise ``RunNotFound`` for a missing run and ``RunStateError`` for a transition
that does not apply (``LookupError`` / ``ValueError`` subclasses naming the run).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.jsonsafe import json_safe
from core.settings import get_settings
from core.status import ACTIVE_STATUSES, FINAL_STATUSES, RunStatus
from store.logs import delete_log
from store.models import (
    GROUP_KINDS,
    Group,
    MetricPoint,
    Run,
    RunNode,
    SeriesOverview,
    WorkerBeat,
    new_uid,
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
    parent_id: int | None = None,
) -> Run:
    """A new queued run. ``spec`` is stored as given (the API validates it first);
    ``parent_id``: the run whose checkpoint it continues (``extend``)."""
    name = clean_name(name)
    if not isinstance(spec, Mapping):
        raise ValueError(f"spec: must be an object, got {type(spec).__name__}")
    # Every lookup before the new run joins a group: a lookup autoflushes, and a run
    # attached to a group but not yet added would be left out of that flush (SAWarning).
    group = s.get(Group, group_id) if group_id is not None else None
    if group_id is not None and group is None:
        raise ValueError(f"group_id: group {group_id} not found")
    if baseline_id is not None and s.get(Run, baseline_id) is None:
        raise ValueError(f"baseline_id: run {baseline_id} not found")
    if parent_id is not None and s.get(Run, parent_id) is None:
        raise ValueError(f"parent_id: run {parent_id} not found")
    run = Run(
        uid=new_uid(),
        name=name,
        spec=dict(spec),
        status=RunStatus.QUEUED,
        created_at=utcnow(),
        attempts=0,
        cancel_requested=False,
        progress=0.0,
        is_baseline=bool(is_baseline),
        tags=[],
        notes="",
        archived=False,
        nodes=_nodes_of(spec),
    )
    # Through the relationship, so group.runs is current within this session too.
    run.group = group
    run.baseline_id = baseline_id
    run.parent_id = parent_id
    s.add(run)
    s.flush()
    return run


def _nodes_of(spec: Mapping[str, Any]) -> int:
    """The spec's ``nodes`` (validated by RunSpec before a run is stored; 1 if absent)."""
    nodes = spec.get("nodes", 1)
    return nodes if isinstance(nodes, int) and nodes >= 1 else 1


def get_run(s: Session, run_id: int) -> Run | None:
    return s.get(Run, run_id)


ARCHIVED_FILTERS = ("hide", "only", "all")


def list_runs(
    s: Session,
    *,
    status: str | Sequence[str] | None = None,
    group_id: int | None = None,
    limit: int | None = 500,
    archived: str = "hide",
    q: str | None = None,
    tag: str | None = None,
) -> list[Run]:
    """Runs newest first, optionally of some statuses and/or one group.

    ``archived``: ``hide`` (default: archived runs left out), ``only`` or ``all``. ``q``:
    case-insensitive substring of the name, the notes or any tag. ``tag``: runs carrying
    exactly that tag. ``limit=None``: every match (the CSV export).
    """
    stmt = sa.select(Run).where(*run_filters(s, status, group_id, archived, q, tag))
    stmt = stmt.order_by(Run.id.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(s.scalars(stmt))


def run_filters(
    s: Session,
    status: str | Sequence[str] | None = None,
    group_id: int | None = None,
    archived: str = "hide",
    q: str | None = None,
    tag: str | None = None,
) -> list[Any]:
    """The WHERE clauses of ``list_runs`` (the runs CSV streams with the same ones)."""
    where: list[Any] = []
    if status is not None:
        statuses = [status] if isinstance(status, str) else list(status)
        unknown = [x for x in statuses if x not in set(RunStatus)]
        if unknown:
            raise ValueError(f"status: unknown {unknown}, expected one of {', '.join(RunStatus)}")
        where.append(Run.status.in_(statuses))
    if group_id is not None:
        where.append(Run.group_id == group_id)
    if archived not in ARCHIVED_FILTERS:
        raise ValueError(f"archived: {archived!r} is not one of {', '.join(ARCHIVED_FILTERS)}")
    if archived != "all":
        where.append(Run.archived == (archived == "only"))
    dialect = s.get_bind().dialect.name
    if q is not None and q.strip():
        pattern = "%" + _like_escape(q.strip().lower()) + "%"
        tags = _tag_values(dialect)
        tag_hit = sa.exists().select_from(tags).where(tags.c.value.ilike(pattern, escape="\\"))
        where.append(
            sa.or_(
                Run.name.ilike(pattern, escape="\\"),
                Run.notes.ilike(pattern, escape="\\"),
                tag_hit,
            )
        )
    if tag is not None and tag != "":
        tags = _tag_values(dialect)
        where.append(sa.exists().select_from(tags).where(tags.c.value == tag))
    return where


def _tag_values(dialect: str) -> Any:
    """The elements of ``runs.tags`` as a table with one ``value`` column, correlated to
    the run (JSON functions differ: SQLite's json_each, PostgreSQL's
    json_array_elements_text)."""
    fn = sa.func.json_each if dialect == "sqlite" else sa.func.json_array_elements_text
    return fn(Run.tags).table_valued("value")


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# --- run management: rename, tags, notes, archive (PATCH /api/runs/{id}, bulk actions)
NAME_MAX_LEN = 200
TAG_MAX_LEN = 64
MAX_TAGS = 32
NOTES_MAX_LEN = 10_000


def _plain(text: str, field: str) -> None:
    """No NUL (PostgreSQL text refuses it) and no lone surrogate (not encodable)."""
    if "\x00" in text:
        raise ValueError(f"{field}: must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{field}: must be valid Unicode (a lone surrogate?)") from None


def clean_name(name: Any) -> str:
    """A run name: a non-empty string of at most 200 characters, stripped."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("name: must be a non-empty string")
    if len(name) > NAME_MAX_LEN:
        raise ValueError(f"name: at most {NAME_MAX_LEN} characters")
    _plain(name, "name")
    return name.strip()


def clean_tags(tags: Any) -> list[str]:
    """Tags: stripped, non-empty strings of at most 64 characters, at most 32 per run,
    duplicates dropped (first kept)."""
    if not isinstance(tags, list | tuple):
        raise ValueError(f"tags: must be a list of strings, got {type(tags).__name__}")
    out: list[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip():
            raise ValueError(f"tags: each tag must be a non-empty string, got {tag!r}")
        tag = tag.strip()
        if len(tag) > TAG_MAX_LEN:
            raise ValueError(f"tags: {tag[:20]!r}... is longer than {TAG_MAX_LEN} characters")
        _plain(tag, "tags")
        if tag not in out:
            out.append(tag)
    if len(out) > MAX_TAGS:
        raise ValueError(f"tags: at most {MAX_TAGS} per run, got {len(out)}")
    return out


def clean_notes(notes: Any) -> str:
    if not isinstance(notes, str):
        raise ValueError(f"notes: must be a string, got {type(notes).__name__}")
    if len(notes) > NOTES_MAX_LEN:
        raise ValueError(f"notes: at most {NOTES_MAX_LEN} characters, got {len(notes)}")
    _plain(notes, "notes")
    return notes


def update_run(
    s: Session,
    run_id: int,
    *,
    name: str | None = None,
    tags: Sequence[str] | None = None,
    notes: str | None = None,
    archived: bool | None = None,
) -> Run:
    """Rename, retag, annotate or (un)archive a run; None leaves a field as it is. Raises
    RunNotFound, or ValueError naming the field (nothing changed then)."""
    values: dict[str, Any] = {}
    if name is not None:
        values["name"] = clean_name(name)
    if tags is not None:
        values["tags"] = clean_tags(tags)
    if notes is not None:
        values["notes"] = clean_notes(notes)
    if archived is not None:
        if not isinstance(archived, bool):
            raise ValueError(f"archived: must be true or false, got {archived!r}")
        values["archived"] = archived
    run = _get(s, run_id)
    for field, value in values.items():
        setattr(run, field, value)
    s.flush()
    return run


def run_dir(uid: str) -> Path:
    """A run's folder, ``$BATCHLAB_HOME/runs/<uid>`` (checkpoint, metric spool, logs),
    shared by its attempts. Named by the uid, never the id: ids repeat after a database
    reset, and a new run must not resume an old run's checkpoint."""
    return get_settings().home / "runs" / uid


def remove_run_dir(uid: str | None) -> None:
    """Delete a run's folder, if it has one (after its row is gone)."""
    if uid:
        shutil.rmtree(run_dir(uid), ignore_errors=True)


def prune_orphan_run_dirs(s: Session) -> list[str]:
    """Remove the folders under ``$BATCHLAB_HOME/runs`` whose uid names no run (deleted
    while this host was away, or left from an older database); the names removed.

    Each worker calls it at start: on a multi-host deployment the API cannot reach a
    worker's disk when a run is deleted. A run's row is committed before its folder is
    made (by the worker, or by ``extend`` seeding a checkpoint), so a live run's folder
    always has its row.
    """
    root = get_settings().home / "runs"
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    known: set[str] = set()
    for i in range(0, len(names), 500):  # bounded IN lists
        chunk = names[i : i + 500]
        known.update(s.scalars(sa.select(Run.uid).where(Run.uid.in_(chunk))))
    orphans = [n for n in names if n not in known]
    for name in orphans:
        shutil.rmtree(root / name, ignore_errors=True)
    return orphans


def delete_run(s: Session, run_id: int) -> bool:
    """Delete a run and its metric points; False when there was no such run.

    A worker training it finds the row gone at its next poll and stops (``cancel_requested``
    is True for a deleted run), so a running run needs no cancel first.
    """
    run = s.get(Run, run_id)
    if run is None:
        return False
    s.execute(sa.update(Run).where(Run.baseline_id == run_id).values(baseline_id=None))
    s.execute(sa.update(Run).where(Run.parent_id == run_id).values(parent_id=None))
    s.execute(
        sa.update(WorkerBeat).where(WorkerBeat.active_run_id == run_id).values(active_run_id=None)
    )
    # The run row first: deleting it waits for a metric batch that holds the row's lock,
    # and the points DELETE after it (a new snapshot) then sees that batch's points too.
    s.delete(run)
    s.flush()
    s.execute(sa.delete(MetricPoint).where(MetricPoint.run_id == run_id))
    s.execute(sa.delete(SeriesOverview).where(SeriesOverview.run_id == run_id))
    delete_log(s, run_id)
    s.execute(sa.delete(RunNode).where(RunNode.run_id == run_id))
    from store.metrics import invalidate  # late: metrics imports numpy/tsdownsample

    invalidate(run_id)
    return True


def _transition(s: Session, run_id: int, from_: Iterable[str], *where: Any, **values: Any) -> bool:
    """The compare-and-set under every status change: set ``values`` on the run if its
    status is in ``from_`` (and ``where`` holds); whether it did."""
    result = s.execute(
        sa.update(Run)
        .where(Run.id == run_id, Run.status.in_([str(x) for x in from_]), *where)
        .values(**values)
        # Objects of this session see the new values; "fetch" asks the database which
        # rows matched instead of trusting their possibly older in-memory status.
        .execution_options(synchronize_session="fetch")
    )
    return result.rowcount == 1


def claim(
    s: Session, run_id: int, *, host: str, gpus: str, worker: str, task_id: str | None = None
) -> Run | None:
    """queued -> running for a new attempt on this worker; None when the run is not queued
    (a duplicate or obsolete message, cancelled while queued, deleted): do not train it."""
    if not _transition(s, run_id, [RunStatus.QUEUED], status=RunStatus.RUNNING):
        return None
    return _start_attempt(s, run_id, host=host, gpus=gpus, worker=worker, task_id=task_id)


def mark_running(
    s: Session, run_id: int, *, host: str, gpus: str, worker: str, task_id: str | None = None
) -> Run:
    """A worker took the run (queued or running): record where, count the attempt.

    Stands in for ``claim`` in tests and tools. Raises RunStateError when the run is
    already final (e.g. cancelled while queued): the worker must not train it.
    """
    if not _transition(s, run_id, ACTIVE_STATUSES, status=RunStatus.RUNNING):
        run = _get(s, run_id)
        raise RunStateError(f"run {run_id} is {run.status}; requeue it before running again")
    return _start_attempt(s, run_id, host=host, gpus=gpus, worker=worker, task_id=task_id)


def _start_attempt(
    s: Session, run_id: int, *, host: str, gpus: str, worker: str, task_id: str | None
) -> Run:
    # The row is ours: the UPDATE that made it running holds its lock until commit.
    run = _get(s, run_id)
    now = utcnow()
    run.started_at = run.started_at or now
    run.finished_at = None
    run.host, run.gpus, run.worker = host, _gpus_text(gpus), worker
    run.task_id = task_id
    run.attempts = (run.attempts or 0) + 1
    run.heartbeat_at = now
    s.flush()
    return run


def _final_values(
    status: str,
    error: str | None,
    diverged_step: int | None,
    summary: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The columns a run's final status sets (worker runs and external runs alike)."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"status: {status!r} is not one of {', '.join(sorted(FINAL_STATUSES))}")
    values: dict[str, Any] = {
        "status": status,
        "finished_at": utcnow(),
        "error": error,
        "diverged_step": diverged_step,
        "eta_s": None,
    }
    if summary is not None:
        values["summary"] = json_safe(dict(summary))
    if status == RunStatus.SUCCEEDED:
        values["progress"] = 1.0
    return values


def mark_finished(
    s: Session,
    run_id: int,
    status: str,
    *,
    attempt: int | None = None,
    error: str | None = None,
    diverged_step: int | None = None,
    summary: Mapping[str, Any] | None = None,
) -> bool:
    """queued or running -> a final status (succeeded | failed | diverged | cancelled).

    With ``attempt``, only while that attempt is the one running: a worker whose run was
    re-queued and started elsewhere must not overwrite it. False when it did not apply
    (already final, another attempt's, deleted).
    """
    values = _final_values(status, error, diverged_step, summary)
    if attempt is None:
        return _transition(s, run_id, ACTIVE_STATUSES, **values)
    return _transition(s, run_id, [RunStatus.RUNNING], Run.attempts == attempt, **values)


def record_queue(s: Session, run_id: int, queue: str) -> bool:
    """Note the queue a queued run's message went to; False if the run is not queued."""
    return _transition(s, run_id, [RunStatus.QUEUED], queue=queue)


DEVICE_MAX_LEN = 300


def record_device(s: Session, run_id: int, device: str, *, attempt: int | None = None) -> bool:
    """Note the device a running run trains on (cut to the column's length). With
    ``attempt``, only while that attempt is the one running; False when it did not apply."""
    where = [] if attempt is None else [Run.attempts == attempt]
    return _transition(s, run_id, [RunStatus.RUNNING], *where, device=device[:DEVICE_MAX_LEN])


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
    """Queued: cancelled at once. Running: flag set, the worker stops at its next poll
    and finishes the run as cancelled.

    Final runs are left as they are. None when the run does not exist.
    """
    values = {"status": RunStatus.CANCELLED, "finished_at": utcnow(), "eta_s": None}
    if not _transition(s, run_id, [RunStatus.QUEUED], cancel_requested=True, **values):
        _transition(s, run_id, [RunStatus.RUNNING], cancel_requested=True)
    return s.get(Run, run_id)


def cancel_requested(s: Session, run_id: int) -> bool:
    """Should the worker stop? Also True for a deleted or already-cancelled run."""
    row = s.execute(sa.select(Run.cancel_requested, Run.status).where(Run.id == run_id)).first()
    if row is None:
        return True
    return bool(row.cancel_requested) or row.status == RunStatus.CANCELLED


def running_run_of(s: Session, worker: str) -> int | None:
    """The run that worker ``worker`` (its Celery name) is training, if any."""
    q = (
        sa.select(Run.id)
        .where(Run.status == RunStatus.RUNNING, Run.worker == worker)
        .order_by(Run.id.desc())
        .limit(1)
    )
    return s.scalar(q)


def _silent(older_than_s: float, now: datetime | None) -> Any:
    """Running with no heartbeat (or start) for ``older_than_s`` before ``now``."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
    last_sign = sa.func.coalesce(Run.heartbeat_at, Run.started_at, Run.created_at)
    return sa.and_(Run.status == RunStatus.RUNNING, last_sign < cutoff)


def stale_runs(s: Session, older_than_s: float, *, now: datetime | None = None) -> list[Run]:
    """Running runs whose last heartbeat (or start) is older than ``older_than_s`` at
    ``now`` (default: the current time; tests pass a later one instead of sleeping)."""
    q = sa.select(Run).where(_silent(older_than_s, now)).order_by(Run.id)
    return list(s.scalars(q))


# Back to queued: the trainer of the next attempt resumes from the run's checkpoint.
_REQUEUED = {
    "status": RunStatus.QUEUED,
    "finished_at": None,
    "heartbeat_at": None,
    "eta_s": None,
    "error": None,
}


def requeue(s: Session, run_id: int) -> None:
    """Back to queued from any status, by hand (recovery uses ``reap``)."""
    if not _transition(s, run_id, RunStatus, **_REQUEUED):
        raise RunNotFound(f"run {run_id} not found")


def reap(
    s: Session,
    run_id: int,
    older_than_s: float,
    *,
    fail_with: str | None = None,
    now: datetime | None = None,
) -> bool:
    """A running run still silent for ``older_than_s``: back to queued for a re-send, or
    failed with the error ``fail_with`` (no attempts left). False if its heartbeat resumed
    or another reaper got there first."""
    values = _REQUEUED
    if fail_with is not None:
        values = {"status": RunStatus.FAILED, "finished_at": utcnow(), "error": fail_with}
        values |= {"diverged_step": None, "eta_s": None}  # as mark_finished leaves them
    return _transition(s, run_id, [RunStatus.RUNNING], _silent(older_than_s, now), **values)


def undo_requeue(s: Session, run_id: int, *, heartbeat_at: datetime | None) -> bool:
    """queued -> running with its old heartbeat, after the re-send failed: the next reap
    tries again rather than leave the run queued with no message."""
    return _transition(
        s, run_id, [RunStatus.QUEUED], status=RunStatus.RUNNING, heartbeat_at=heartbeat_at
    )


# ---------------------------------------------------------------------------------------
# External runs: launched by their own client (a scheduler's job, a notebook), not queued
#
#   (register)              running   (origin external: no broker message, never re-queued)
#   running, silent --reap_external-->  failed "lost contact with the client ..."
#   failed (lost contact) --external_beat-->  running  (the client was only cut off)
#   running | failed (lost contact) --finish_external-->  succeeded | failed | cancelled | ...

ORIGIN_WORKER, ORIGIN_EXTERNAL = "worker", "external"
LOST_CONTACT = "lost contact with the client"
EXTERNAL_WORKER = "external"  # Run.worker of an external run: what the workers view shows


def _lost_contact() -> Any:
    """Failed by reap_external (and nothing else): the client may still come back."""
    return sa.and_(
        Run.status == RunStatus.FAILED,
        Run.origin == ORIGIN_EXTERNAL,
        Run.error.like(LOST_CONTACT + "%"),
    )


def register_external(
    s: Session,
    *,
    uid: str,
    name: str,
    spec: Mapping[str, Any],
    host: str = "",
    device: str | None = None,
    tags: Sequence[str] = (),
    group_id: int | None = None,
    baseline_id: int | None = None,
    is_baseline: bool = False,
) -> tuple[Run, bool]:
    """A run its own client trains: running from the start, ``origin`` external; (run,
    created). Registering the same ``uid`` again (a retried request whose answer was lost)
    answers the run already made, so a client never creates two runs."""
    if not isinstance(uid, str) or len(uid) != 32 or any(c not in "0123456789abcdef" for c in uid):
        raise ValueError("uid: must be 32 lowercase hex digits (uuid4().hex)")
    found = s.scalar(sa.select(Run).where(Run.uid == uid))
    if found is not None:
        if found.origin != ORIGIN_EXTERNAL:
            raise ValueError(f"uid: names run {found.id}, which is not an external run")
        return found, False
    run = create_run(
        s,
        name=name,
        spec=spec,
        group_id=group_id,
        baseline_id=baseline_id,
        is_baseline=is_baseline,
    )
    run.uid, run.origin, run.tags = uid, ORIGIN_EXTERNAL, clean_tags(list(tags))
    if device:
        run.device = device[:DEVICE_MAX_LEN]
    s.flush()
    # queued -> running in the same transaction: nobody ever sees it queued.
    _transition(s, run.id, [RunStatus.QUEUED], status=RunStatus.RUNNING)
    run = _start_attempt(s, run.id, host=host, gpus="", worker=EXTERNAL_WORKER, task_id=None)
    return run, True


def _external(run_id: int) -> Any:
    return sa.and_(Run.id == run_id, Run.origin == ORIGIN_EXTERNAL)


def external_beat(
    s: Session,
    run_id: int,
    *,
    progress: float | None = None,
    eta_s: float | None = None,
    device: str | None = None,
) -> Run:
    """An external run's client is alive: heartbeat (with progress, ETA, device when
    given). A run failed for lost contact is running again (its client was only cut
    off, e.g. by an API restart longer than the bound). RunNotFound when the id names no
    external run; a final run is left as it is (the answer tells the client its status)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        if not isinstance(progress, int | float) or not math.isfinite(progress):
            raise ValueError(f"progress: must be a number in [0, 1], got {progress!r}")
        values["progress"] = min(1.0, max(0.0, float(progress)))
    if eta_s is not None:
        values["eta_s"] = float(eta_s) if math.isfinite(eta_s) else None
    if device:
        values["device"] = device[:DEVICE_MAX_LEN]
    if not _transition(s, run_id, [RunStatus.RUNNING], _external(run_id), **values):
        revived = {"status": RunStatus.RUNNING, "finished_at": None, "error": None}
        _transition(
            s, run_id, [RunStatus.FAILED], _external(run_id), _lost_contact(), **values, **revived
        )
    run = s.get(Run, run_id)
    if run is None or run.origin != ORIGIN_EXTERNAL:
        raise RunNotFound(f"run {run_id} not found (or not an external run)")
    return run


def finish_external(
    s: Session,
    run_id: int,
    status: str,
    *,
    error: str | None = None,
    summary: Mapping[str, Any] | None = None,
    diverged_step: int | None = None,
) -> bool:
    """running (or failed for lost contact: the client's word wins) -> a final status, as
    its client reports it; False when the run is already final otherwise (finished
    before, cancelled, deleted)."""
    values = _final_values(status, error, diverged_step, summary)
    if _transition(s, run_id, [RunStatus.RUNNING], _external(run_id), **values):
        return True
    return _transition(s, run_id, [RunStatus.FAILED], _external(run_id), _lost_contact(), **values)


def stale_external_runs(
    s: Session, older_than_s: float, *, now: datetime | None = None
) -> list[Run]:
    """External runs whose client has been silent for ``older_than_s`` at ``now``."""
    q = sa.select(Run).where(_silent(older_than_s, now), Run.origin == ORIGIN_EXTERNAL)
    return list(s.scalars(q.order_by(Run.id)))


def reap_external(
    s: Session, run_id: int, older_than_s: float, *, now: datetime | None = None
) -> bool:
    """running, external and still silent for ``older_than_s`` -> failed "lost contact
    with the client ..." (never queued: there is no message to re-send, and the client's
    own process holds the training). False if its client spoke up meanwhile."""
    error = f"{LOST_CONTACT}: no heartbeat for over {older_than_s:g} s"
    values = {"status": RunStatus.FAILED, "finished_at": utcnow(), "error": error, "eta_s": None}
    return _transition(
        s, run_id, [RunStatus.RUNNING], _external(run_id), _silent(older_than_s, now), **values
    )


# ---------------------------------------------------------------------------------------
# Groups


# An auto sweep's states (Group.auto_state): waiting for its baseline, then settled once.
# (Not run statuses: a sweep's ladder is queued or not planned at all.)
AUTO_WAITING, AUTO_QUEUED, AUTO_FAILED = "waiting", "ladder_queued", "no_ladder"
AutoState = Literal["waiting", "ladder_queued", "no_ladder"]
AUTO_WAITING_MESSAGE = (
    "waiting for the baseline's noise scale: the ladder of batch sizes is queued when the "
    "baseline has finished"
)


def create_group(
    s: Session,
    *,
    name: str,
    kind: str,
    spec: Mapping[str, Any] | None = None,
    batch_sizes: Iterable[int] | None = None,
    seeds: Iterable[int] | None = None,
    auto_state: str | None = None,
    auto_message: str | None = None,
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
        auto_state=auto_state,
        auto_message=auto_message or (AUTO_WAITING_MESSAGE if auto_state == AUTO_WAITING else None),
        runs=[],
    )
    s.add(group)
    s.flush()
    return group


def get_group(s: Session, group_id: int) -> Group | None:
    return s.get(Group, group_id)


def settle_auto(
    s: Session,
    group_id: int,
    state: str,
    *,
    message: str,
    batch_sizes: Iterable[int] | None = None,
) -> bool:
    """waiting -> queued | failed, as one conditional UPDATE: of two processes settling
    one sweep (the worker that finished its baseline, the API's reconciler) exactly one
    gets True, and only it may create the ladder's runs, in the same transaction."""
    if state not in (AUTO_QUEUED, AUTO_FAILED):
        raise ValueError(f"state: {state!r} is not one of {AUTO_QUEUED!r}, {AUTO_FAILED!r}")
    values: dict[str, Any] = {"auto_state": state, "auto_message": message}
    if batch_sizes is not None:
        values["batch_sizes"] = list(batch_sizes)
    result = s.execute(
        sa.update(Group)
        .where(Group.id == group_id, Group.auto_state == AUTO_WAITING)
        .values(**values)
        .execution_options(synchronize_session="fetch")
    )
    return result.rowcount == 1


def waiting_auto_groups(s: Session) -> list[int]:
    """Auto sweeps still waiting for their baseline, oldest first."""
    q = sa.select(Group.id).where(Group.auto_state == AUTO_WAITING).order_by(Group.id)
    return list(s.scalars(q))


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


def live_queues(s: Session, *, seen_within_s: float, now: datetime | None = None) -> set[str]:
    """The queues consumed by workers heard from within ``seen_within_s`` (one query)."""
    return set(live_workers_per_queue(s, seen_within_s=seen_within_s, now=now))


def live_workers_per_queue(
    s: Session, *, seen_within_s: float, now: datetime | None = None
) -> dict[str, int]:
    """How many workers heard from within ``seen_within_s`` consume each queue."""
    cutoff = (now or utcnow()) - timedelta(seconds=seen_within_s)
    rows = s.scalars(sa.select(WorkerBeat.queues).where(WorkerBeat.last_seen >= cutoff))
    counts: dict[str, int] = {}
    for queues in rows:
        for q in set(queues or []):
            counts[str(q)] = counts.get(str(q), 0) + 1
    return counts


# ---------------------------------------------------------------------------------------
# Worker rows of GET /api/workers (runs and groups: the models of server/schemas.py)


def iso(dt: datetime | None) -> str | None:
    """UTC ISO 8601 with a Z suffix, millisecond precision."""
    if dt is None:
        return None
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return dt.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


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
