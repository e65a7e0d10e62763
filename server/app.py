"""The FastAPI application: REST under /api, SSE streams, the static dashboard.

``create_app()`` reads ``BATCHLAB_DATABASE_URL``, ``BATCHLAB_BROKER_URL`` and
``BATCHLAB_TOKEN`` unless given explicitly. On start it migrates the database and runs a
background loop that re-queues runs whose worker died (``worker.recovery.reap_stale``)
every 10 s. Run it with ``batchlab api`` or ``uvicorn --factory server.app:create_app``.

This process never imports torch: it validates specs with the torch-free
``trainer.spec`` and sends Celery messages by task name (tests/test_layering.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import sqlalchemy.exc
from fastapi import FastAPI, Request, status
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server import routes_meta, routes_runs, routes_sweeps, sse
from server.deps import Context, Settings
from server.static import mount_frontend
from server.submit import QueueUnavailable
from store import db
from store.runs import RunNotFound

log = logging.getLogger("batchlab.server")

# How often the API looks for runs whose worker stopped heartbeating (docs/design.md).
REAP_INTERVAL_S = 10.0

DESCRIPTION = """Queue and compare large-minibatch trainings (Goyal et al. 2017).
Writes (POST, DELETE) need `Authorization: Bearer TOKEN` when the server has
`BATCHLAB_TOKEN` set; reads and `POST /api/schedule` stay open. See docs/api.md."""


def create_app(
    database_url: str | None = None, broker_url: str | None = None, token: str | None = None
) -> FastAPI:
    """The batchlab API for one database and one broker."""
    from worker.celery_app import make_app

    settings = Settings.resolve(database_url, broker_url, token)
    ctx = Context(
        settings=settings,
        engine=db.get_engine(settings.database_url),
        celery=make_app(settings.broker_url),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await _try_migrate(ctx)
        tasks = [
            asyncio.create_task(_maintenance(ctx), name="batchlab-maintenance"),
            asyncio.create_task(_warm_series_cache(ctx), name="batchlab-warm-cache"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="batchlab",
        version=routes_meta.VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    # Metric histories are long numeric arrays: gzip shrinks them ~3x. SSE is exempt
    # (Starlette's GZipMiddleware skips text/event-stream, which must not be buffered).
    # Level 1: a 3 MB metrics answer compresses in ~30 ms instead of ~300 ms at level 9,
    # for a reply about 5% larger.
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=1)
    for router in (routes_runs.router, sse.router, routes_sweeps.router, routes_meta.router):
        app.include_router(router)
    _add_error_handlers(app)
    mount_frontend(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QueueUnavailable)
    async def _queue_down(_req: Request, exc: QueueUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.exception_handler(RunNotFound)
    async def _gone(_req: Request, exc: RunNotFound) -> JSONResponse:
        # A run deleted between a route's lookup and its update.
        return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(sqlalchemy.exc.OperationalError)
    @app.exception_handler(sqlalchemy.exc.InterfaceError)
    async def _db_down(_req: Request, exc: sqlalchemy.exc.DBAPIError) -> JSONResponse:
        log.error("database error: %s", exc)
        return JSONResponse(
            {"detail": f"database unavailable: {type(exc.orig).__name__}: {exc.orig}"[:500]},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )


async def _try_migrate(ctx: Context) -> None:
    """Upgrade the schema; on failure keep serving (health says why) and retry later."""
    try:
        await run_in_threadpool(db.migrate, ctx.engine)
        ctx.migrated = True
    except Exception:
        log.exception("database migration failed; retrying every %.0f s", REAP_INTERVAL_S)


# The curves the views open with; read once at start so the first page does not pay the
# cold read (about 1 s per million points) of the most recent runs' histories.
WARM_KEYS = ("loss", "train_err", "lr", "val_err")
WARM_RUNS = 20


async def _warm_series_cache(ctx: Context) -> None:
    from store import metrics, runs

    def warm() -> None:
        with db.session(ctx.engine) as s:
            ids = [r.id for r in runs.list_runs(s, limit=WARM_RUNS)]
        for run_id in ids:
            metrics.read_series(ctx.engine, run_id, list(WARM_KEYS), max_points=2)

    try:
        await run_in_threadpool(warm)
    except Exception:  # only a speed-up: never let it take the server down
        log.warning("warming the metric cache failed", exc_info=True)


def _build_missing_overviews(ctx: Context) -> None:
    """Finished runs whose worker did not store overviews (older runs, a crash): a few per
    cycle, so the loop stays short."""
    from store import metrics

    for run_id in metrics.runs_missing_overviews(ctx.engine, limit=5):
        metrics.build_overviews(ctx.engine, run_id)


async def _maintenance(ctx: Context) -> None:
    """Every REAP_INTERVAL_S: finish migrating if needed, then reap stale runs."""
    from worker.recovery import reap_stale

    while True:
        if not ctx.migrated:
            await _try_migrate(ctx)
        else:
            try:
                # enqueue: re-queued runs go to this app's broker, not the environment's.
                requeued = await run_in_threadpool(reap_stale, ctx.engine, enqueue=ctx.enqueue)
                if requeued:
                    log.warning("re-queued or failed stale runs %s", requeued)
                await run_in_threadpool(_build_missing_overviews, ctx)
            except Exception:  # the loop must survive a database hiccup
                log.exception("reaping stale runs failed")
        await asyncio.sleep(REAP_INTERVAL_S)
