"""The gang of a multi-node run: which workers hold its node slots, through the database.

A run with ``nodes = N`` needs N workers at once. Its broker messages are tokens: a worker
that takes one joins the *oldest* gang of that queue that still needs nodes (``join``),
not necessarily the run the message names. Gangs therefore fill one at a time, oldest
first, and two runs never each hold part of the workers while both wait for the rest. A
gang needing more nodes than live workers serve its queue is not joined, and one that
does not fill within the timeout is ``release``d (its claims deleted, not joined again
before ``gang_retry_at``): either way the workers go back to other runs, and the tokens
wait in the queue (``next_chance``; worker/multinode.py sends them back after a pause).

Every change is a compare-and-set on the run row plus the ``run_nodes`` rows, as in
``store.runs``:
```
queued, forming attempt a = attempts + 1:   join -> a row (run, a, slot) per worker
  all N rows --start-->                     running, attempts = a (rows: running)
  not full in time --release-->             queued, gang_retry_at set, rows deleted
running (attempt a) --fail-->               queued (next attempt) | failed (reason)
a node's row silent > node_silent_s, or failed: its peers ``fail`` the gang
```
Rank 0 of the training writes metrics and the final status as for any run
(``store.runs.mark_finished(attempt=a)``); ``fail`` loses to it (and to the reaper) by the
same compare-and-set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from core.status import RunStatus
from store.models import Run, RunNode, utcnow
from store.runs import _REQUEUED, _final_values, _transition

WAITING, RUNNING, EXITED, FAILED = "waiting", "running", "exited", "failed"
LIVE_STATES = (WAITING, RUNNING)


@dataclass(frozen=True)
class NodeClaim:
    """This worker's slot in a gang: the run, the attempt the gang will be, the slot."""

    run_id: int
    attempt: int
    slot: int
    nodes: int
    worker: str  # a slot freed by pruning may be taken again: rows match on the worker too


def members(s: Session, run_id: int, attempt: int) -> list[RunNode]:
    """The nodes of ``attempt`` by slot (slot 0 holds the rendezvous endpoint)."""
    q = sa.select(RunNode).where(RunNode.run_id == run_id, RunNode.attempt == attempt)
    return list(s.scalars(q.order_by(RunNode.slot)))


def _forming_runs(s: Session, queue: str, now: datetime) -> list[Run]:
    """Queued multi-node runs of ``queue`` that may be joined now, oldest first."""
    q = (
        sa.select(Run)
        .where(
            Run.status == RunStatus.QUEUED,
            Run.nodes > 1,
            Run.queue == queue,
            sa.or_(Run.gang_retry_at.is_(None), Run.gang_retry_at <= now),
        )
        .order_by(Run.id)
    )
    return list(s.scalars(q))


def next_chance(
    s: Session, queue: str, *, live_workers: int, now: datetime
) -> tuple[int, float] | None:
    """For a token no gang can use now: the queued multi-node run of ``queue`` that may
    need it soonest and in how many seconds (a released gang: at its retry time; one
    needing more nodes than ``live_workers``: ``None`` seconds, the caller's recheck);
    None when no gang waits."""
    q = (
        sa.select(Run.id, Run.nodes, Run.gang_retry_at)
        .where(Run.status == RunStatus.QUEUED, Run.nodes > 1, Run.queue == queue)
        .order_by(Run.id)
    )
    best: tuple[int, float] | None = None
    for run_id, nodes, retry_at in s.execute(q):
        if retry_at is not None and retry_at > now:
            wait = (retry_at - now).total_seconds()
        elif nodes > live_workers:
            wait = float("inf")  # until more workers come: the caller rechecks
        else:
            continue
        if best is None or wait < best[1]:
            best = (run_id, wait)
    return best


def _lock_run(s: Session, run_id: int) -> None:
    """Every transaction that writes ``run_nodes`` rows of other workers locks the run row
    first (PostgreSQL; SQLite serialises writers anyway): two members starting a gang at
    once then wait on one lock instead of each holding a row the other needs."""
    s.execute(sa.select(Run.id).where(Run.id == run_id).with_for_update())


def _prune(s: Session, run_id: int, attempt: int, cutoff: datetime) -> None:
    """Drop the waiting claims of workers silent since ``cutoff`` (killed while waiting)."""
    s.execute(
        sa.delete(RunNode).where(
            RunNode.run_id == run_id,
            RunNode.attempt == attempt,
            RunNode.state == WAITING,
            RunNode.beat_at < cutoff,
        )
    )


def join(
    s: Session,
    *,
    queue: str,
    worker: str,
    host: str,
    addr: str,
    rdzv_port: Callable[[], int],
    silent_s: float,
    live_workers: int | None = None,
    now: datetime | None = None,
) -> NodeClaim | None:
    """Take a slot in the oldest gang of ``queue`` that still needs nodes; None if none
    does. The first slot publishes the rendezvous endpoint ``addr:rdzv_port()``. Two
    workers racing for one slot: the primary key lets one in, the other tries again.
    A gang needing more nodes than ``live_workers`` could never fill: not joined (the
    worker stays free for other runs)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=silent_s)
    for run in _forming_runs(s, queue, now):
        if live_workers is not None and run.nodes > live_workers:
            continue
        attempt = (run.attempts or 0) + 1
        _lock_run(s, run.id)
        _prune(s, run.id, attempt, cutoff)
        rows = members(s, run.id, attempt)
        mine = next((r for r in rows if r.worker == worker), None)
        if mine is not None:  # a second token reached the same worker
            return NodeClaim(run.id, attempt, mine.slot, run.nodes, worker)
        if len(rows) >= run.nodes:
            continue
        taken = {r.slot for r in rows}
        slot = min(set(range(run.nodes)) - taken)
        row = RunNode(
            run_id=run.id,
            attempt=attempt,
            slot=slot,
            worker=worker,
            host=host,
            addr=addr,
            port=rdzv_port() if slot == 0 else None,
            state=WAITING,
            joined_at=now,
            beat_at=now,
        )
        try:
            with s.begin_nested():
                s.add(row)
        except sa.exc.IntegrityError:
            continue  # another worker took that slot in the meantime; the next token retries
        return NodeClaim(run.id, attempt, slot, run.nodes, worker)
    return None


def _this_row(claim: NodeClaim) -> Any:
    """The claim's own row (the worker too: a pruned slot may be someone else's now)."""
    return sa.and_(
        RunNode.run_id == claim.run_id,
        RunNode.attempt == claim.attempt,
        RunNode.slot == claim.slot,
        RunNode.worker == claim.worker,
    )


def beat(s: Session, claim: NodeClaim) -> bool:
    """This node is alive; False when its row is gone (released, or pruned as silent)."""
    result = s.execute(sa.update(RunNode).where(_this_row(claim)).values(beat_at=utcnow()))
    return result.rowcount == 1


def set_state(s: Session, claim: NodeClaim, state: str, error: str | None = None) -> None:
    values = {"state": state, "error": error[:2000] if error else None, "beat_at": utcnow()}
    s.execute(sa.update(RunNode).where(_this_row(claim)).values(**values))


def start(s: Session, claim: NodeClaim, *, silent_s: float, now: datetime | None = None) -> bool:
    """queued -> running once every slot of the attempt is held by a live worker; the
    attempt becomes the run's. Any member may call it; one wins. A release that came
    first (``gang_retry_at`` in the future) makes it fail."""
    now = now or utcnow()
    _lock_run(s, claim.run_id)
    _prune(s, claim.run_id, claim.attempt, now - timedelta(seconds=silent_s))
    rows = members(s, claim.run_id, claim.attempt)
    if len(rows) < claim.nodes:
        return False
    count = (
        sa.select(sa.func.count())
        .select_from(RunNode)
        .where(RunNode.run_id == claim.run_id, RunNode.attempt == claim.attempt)
        .scalar_subquery()
    )
    first = rows[0]
    applied = _transition(
        s,
        claim.run_id,
        [RunStatus.QUEUED],
        Run.attempts == claim.attempt - 1,
        count == Run.nodes,
        sa.or_(Run.gang_retry_at.is_(None), Run.gang_retry_at <= now),
        status=RunStatus.RUNNING,
        attempts=claim.attempt,
        started_at=sa.func.coalesce(Run.started_at, now),
        finished_at=None,
        heartbeat_at=now,
        host=first.host,
        worker=first.worker,
        gpus="",
        task_id=None,
        gang_retry_at=None,
    )
    if applied:
        s.execute(
            sa.update(RunNode)
            .where(RunNode.run_id == claim.run_id, RunNode.attempt == claim.attempt)
            .values(state=RUNNING, beat_at=now)
        )
    return applied


def started(s: Session, claim: NodeClaim) -> bool:
    """Whether the gang of ``claim`` is the run's running attempt."""
    row = s.execute(sa.select(Run.status, Run.attempts).where(Run.id == claim.run_id)).first()
    return row is not None and row.status == RunStatus.RUNNING and row.attempts == claim.attempt


def release(s: Session, claim: NodeClaim, *, retry_at: datetime) -> int | None:
    """A gang that did not fill in time: delete its claims and keep it from being joined
    before ``retry_at``. How many claims it deleted (the tokens to send again), or None
    when it did not apply (started, or released by another member first)."""
    now = utcnow()
    if not _transition(  # the run row first, as every gang transaction (``_lock_run``)
        s,
        claim.run_id,
        [RunStatus.QUEUED],
        Run.attempts == claim.attempt - 1,
        sa.or_(Run.gang_retry_at.is_(None), Run.gang_retry_at <= now),
        gang_retry_at=retry_at,
    ):
        return None
    result = s.execute(
        sa.delete(RunNode).where(RunNode.run_id == claim.run_id, RunNode.attempt == claim.attempt)
    )
    return int(result.rowcount or 0)


def leave(s: Session, claim: NodeClaim) -> None:
    """Give a waiting claim back (the run left the queue while the gang formed)."""
    s.execute(sa.delete(RunNode).where(_this_row(claim), RunNode.state == WAITING))


def fail(s: Session, claim: NodeClaim, *, reason: str, max_attempts: int) -> str | None:
    """A node of the running gang was lost: back to queued for a new gang (from the
    checkpoint), or failed with ``reason`` once ``max_attempts`` attempts were made. The
    status it set, or None when the attempt was no longer running (finished by rank 0,
    failed by another member, reaped)."""
    if claim.attempt < max_attempts:
        values = {**_REQUEUED, "gang_retry_at": None}
        status = RunStatus.QUEUED
    else:
        values = _final_values(
            RunStatus.FAILED, f"{reason}; gave up after {claim.attempt} attempts", None, None
        )
        status = RunStatus.FAILED
    applied = _transition(
        s, claim.run_id, [RunStatus.RUNNING], Run.attempts == claim.attempt, **values
    )
    return str(status) if applied else None


def lost_peer(
    s: Session,
    claim: NodeClaim,
    *,
    silent_s: float,
    failed_for_s: float | None = None,
    now: datetime | None = None,
) -> RunNode | None:
    """A node of this gang that is lost: still ``running`` but silent for ``silent_s``
    (killed, its machine gone), or, with ``failed_for_s``, ``failed`` that long ago (its
    torchrun died while this node's ranks may wait in a collective)."""
    now = now or utcnow()
    for row in members(s, claim.run_id, claim.attempt):
        if row.slot == claim.slot:
            continue
        if row.state == RUNNING and row.beat_at < now - timedelta(seconds=silent_s):
            return row
        if (
            failed_for_s is not None
            and row.state == FAILED
            and row.beat_at < now - timedelta(seconds=failed_for_s)
        ):
            return row
    return None


def describe(row: RunNode) -> str:
    """``node 1 (host-b)`` for messages."""
    return f"node {row.slot} ({row.host})"


# --- read side: the API's run and worker views ------------------------------------------


def nodes_of(s: Session, run_ids: Iterable[int]) -> dict[int, list[RunNode]]:
    """Each run's nodes of its latest attempt with any (the forming gang of a queued run)."""
    ids = list(run_ids)
    if not ids:
        return {}
    latest = (
        sa.select(RunNode.run_id, sa.func.max(RunNode.attempt).label("attempt"))
        .where(RunNode.run_id.in_(ids))
        .group_by(RunNode.run_id)
        .subquery()
    )
    q = (
        sa.select(RunNode)
        .join(
            latest,
            sa.and_(RunNode.run_id == latest.c.run_id, RunNode.attempt == latest.c.attempt),
        )
        .order_by(RunNode.run_id, RunNode.slot)
    )
    out: dict[int, list[RunNode]] = {}
    for row in s.scalars(q):
        out.setdefault(row.run_id, []).append(row)
    return out


def held(s: Session, *, silent_s: float, now: datetime | None = None) -> dict[str, RunNode]:
    """The slot each worker holds now (waiting or running, beaten within ``silent_s``),
    by worker name."""
    cutoff = (now or utcnow()) - timedelta(seconds=silent_s)
    q = (
        sa.select(RunNode)
        .where(RunNode.state.in_(LIVE_STATES), RunNode.beat_at >= cutoff)
        .order_by(RunNode.joined_at)
    )
    return {row.worker: row for row in s.scalars(q)}


def training_run_of(s: Session, worker: str) -> int | None:
    """The multi-node run ``worker`` trains as one of its nodes now, if any."""
    q = (
        sa.select(RunNode.run_id)
        .join(Run, Run.id == RunNode.run_id)
        .where(
            RunNode.worker == worker,
            RunNode.state == RUNNING,
            Run.status == RunStatus.RUNNING,
            Run.attempts == RunNode.attempt,
        )
        .order_by(RunNode.run_id.desc())
        .limit(1)
    )
    return s.scalar(q)


def waiting_reason(
    run: Run,
    rows: Sequence[RunNode],
    *,
    live_workers: int | None = None,
    now: datetime | None = None,
) -> str | None:
    """``waiting for 2 of 4 nodes`` for a queued multi-node run (None otherwise), with why
    when known: fewer live workers serve its queue than it needs, or it was released."""
    if run.status != RunStatus.QUEUED or (run.nodes or 1) <= 1:
        return None
    attempt = (run.attempts or 0) + 1
    claimed = sum(1 for r in rows if r.attempt == attempt)
    text = f"waiting for {run.nodes - claimed} of {run.nodes} nodes"
    now = now or utcnow()
    retry = run.gang_retry_at
    if live_workers is not None and live_workers < run.nodes:
        serve = "worker serves" if live_workers == 1 else "workers serve"
        text += f" (only {live_workers} live {serve} queue {run.queue})"
    elif retry is not None and retry > now:
        seconds = max(1, round((retry - now).total_seconds()))
        text += f" (the gang did not fill in time; trying again in {seconds} s)"
    return text


def node_to_dict(row: RunNode) -> dict[str, Any]:
    """A node of ``GET /api/runs/{id}`` (``nodes``) and of ``GET /api/workers``."""
    from store.runs import iso

    return {
        "run_id": row.run_id,
        "attempt": row.attempt,
        "slot": row.slot,
        "worker": row.worker,
        "host": row.host,
        "addr": row.addr,
        "endpoint": f"{row.addr}:{row.port}" if row.port else None,
        "state": row.state,
        "joined_at": iso(row.joined_at),
        "beat_at": iso(row.beat_at),
        "error": row.error,
    }
