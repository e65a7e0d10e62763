"""Previews that store nothing (the planned runs, the LR schedule), the workers, and the
service's health."""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from core.status import RunStatus
from server.deps import Context, CtxDep
from server.encode import FastJSONResponse
from server.schemas import HealthOut, PlanOut, RunCreate, SchedulePreview, SweepCreate, WorkersOut
from store import db
from store import runs as store_runs
from trainer.schedule import schedule_preview
from trainer.spec import RunSpec
from worker.celery_app import WORKER_STALE_S, broker_lock

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api", tags=["meta"])

# A health check must answer even when a dependency hangs (a firewalled Redis).
CHECK_TIMEOUT_S = 3.0


def _version() -> str:
    try:
        return metadata.version("batchlab")
    except metadata.PackageNotFoundError:
        return "0+unknown"


VERSION = _version()


@router.post(
    "/schedule",
    response_model=SchedulePreview,
    summary="The planned LR curve of a spec, without training (stores nothing, no token)",
)
def schedule(spec: RunSpec, max_points: int = Query(2000, ge=2, le=100_000)) -> dict[str, Any]:
    # The body *is* the spec, so a bad field answers 422 with loc ["body", "<field>"].
    return schedule_preview(spec, max_points=max_points)


# The runs a submit would create with the same body (stores nothing, no token).
@router.post("/plan/run", response_model=PlanOut, summary="What POST /api/runs would create")
def preview_run(body: RunCreate, ctx: CtxDep) -> PlanOut:
    return PlanOut.of(body.plan(), _live_queues(ctx))


@router.post("/plan/sweep", response_model=PlanOut, summary="What POST /api/sweeps would create")
def preview_sweep(body: SweepCreate, ctx: CtxDep) -> PlanOut:
    return PlanOut.of(body.plan(), _live_queues(ctx))


def _live_queues(ctx: Context) -> dict[str, int] | None:
    """How many live workers consume each queue, for the plan's queue warnings; None (no
    queue shown) when the database cannot say: a preview must not fail on it."""
    try:
        with db.session(ctx.engine) as s:
            return store_runs.live_workers_per_queue(s, seen_within_s=WORKER_STALE_S)
    except sa.exc.SQLAlchemyError:
        log.warning("plan preview: could not read the workers table", exc_info=True)
        return None


@router.get("/workers", response_model=WorkersOut, summary="Workers and queued messages")
async def workers(ctx: CtxDep) -> Any:
    from worker.celery_app import inspect_workers

    return await run_in_threadpool(inspect_workers, ctx.engine, celery_app=ctx.celery)


def check_database(ctx: Context) -> str:
    with ctx.engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    return "ok" if ctx.migrated else "not migrated"


def check_broker(ctx: Context) -> str:
    with broker_lock, ctx.celery.connection_for_write() as conn:
        # One attempt, no back-off sleep: a health check reports, it does not wait.
        conn.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0, timeout=CHECK_TIMEOUT_S
        )
        conn.default_channel  # noqa: B018 - opening a channel is the real check on SQLAlchemy
    return "ok"


def check_queues(ctx: Context) -> dict[str, Any]:
    """Queued runs in the database against messages waiting in the broker; more runs than
    messages (for longer than a delivery takes) means lost messages (worker.recovery)."""
    from store.models import Run
    from worker.celery_app import CPU_QUEUE, GPU_QUEUE, queue_lengths
    from worker.recovery import last_report

    with ctx.engine.connect() as conn:
        rows = conn.execute(
            sa.select(Run.queue, sa.func.count())
            .where(Run.status == RunStatus.QUEUED)
            .group_by(Run.queue)
        ).all()
    queues = sorted({CPU_QUEUE, GPU_QUEUE} | {q for q, _ in rows if q})
    last = last_report(ctx.engine)
    return {
        "queued_runs": sum(int(n) for _, n in rows),
        "broker_messages": sum(queue_lengths(queues, celery_app=ctx.celery).values()),
        "reconcile": last.to_dict() if last else None,
    }


async def _timed(check: Any, ctx: Context) -> Any:
    try:
        with anyio.fail_after(CHECK_TIMEOUT_S):
            # abandon_on_cancel: stop waiting for a hung connect; the thread ends later.
            return await anyio.to_thread.run_sync(check, ctx, abandon_on_cancel=True)
    except TimeoutError:
        return f"error: no answer within {CHECK_TIMEOUT_S:.0f} s"
    except Exception as err:  # any failure is the answer here, not a 500
        return f"error: {type(err).__name__}: {err}"[:300]


@router.get(
    "/health",
    response_model=HealthOut,
    summary="Database and broker reachability (503 when the database is down)",
    responses={503: {"model": HealthOut, "description": "The database does not answer."}},
)
async def health(ctx: CtxDep) -> Any:
    database = await _timed(check_database, ctx)
    broker = await _timed(check_broker, ctx)
    db_ok = database == "ok"
    body = {
        "status": "ok" if db_ok and broker == "ok" else ("degraded" if db_ok else "error"),
        "database": database,
        "broker": broker,
        "version": VERSION,
        "auth": ctx.settings.token is not None,
    }
    if db_ok and broker == "ok":
        queues = await _timed(check_queues, ctx)
        if isinstance(queues, dict):  # else an error text: the counts stay unknown
            body.update(queues)
    return FastJSONResponse(body, status_code=200 if db_ok else 503)
