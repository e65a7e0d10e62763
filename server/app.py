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

from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from starlette.concurrency import run_in_threadpool

from core.settings import get_settings, split_hosts
from server import (
    middleware,
    routes_external,
    routes_logs,
    routes_manage,
    routes_meta,
    routes_runs,
    routes_sweeps,
    sse,
)
from server.deps import Context
from server.errors import add_error_handlers, document_errors
from server.hub import HubRegistry
from server.readcache import PollCache
from server.static import mount_api_docs, mount_frontend
from store import db

log = logging.getLogger("batchlab.server")

# How often the API looks for runs whose worker stopped heartbeating (docs/design.md).
REAP_INTERVAL_S = 10.0

DESCRIPTION = """Queue and compare large-minibatch trainings (Goyal et al. 2017).
Writes (POST, DELETE) need `Authorization: Bearer TOKEN` when the server has
`BATCHLAB_TOKEN` set; reads and `POST /api/schedule` stay open. Requests need a known
Host (`BATCHLAB_ALLOWED_HOSTS`), browsers' writes must come from the server's own origin,
and bodies are at most `BATCHLAB_MAX_BODY_BYTES` (1 MiB). See docs/api.md."""


def create_app(
    database_url: str | None = None,
    broker_url: str | None = None,
    token: str | None = None,
    bind_host: str | None = None,
) -> FastAPI:
    """The batchlab API for one database and one broker.

    ``bind_host``: the interface the server listens on (``batchlab api --host``), accepted
    as a Host header besides ``Settings.allowed_hosts``.
    """
    from worker.celery_app import make_app

    # Explicit arguments win over the BATCHLAB_* environment (core.settings).
    settings = get_settings().override(
        database_url=database_url, broker_url=broker_url, token=token
    )
    settings = settings.override(allowed_hosts=settings.allowed_hosts + split_hosts(bind_host))
    ctx = Context(
        settings=settings,
        engine=db.get_engine(settings.database_url),
        celery=make_app(settings.broker_url),
    )
    # One poller per streamed run, shared by its streams (server.hub).
    hubs = HubRegistry(max_streams=settings.max_streams)

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
            await hubs.close()

    app = FastAPI(
        title="batchlab",
        version=routes_meta.VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        # /docs and /redoc come from server.static with their assets served locally.
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.state.hubs = hubs
    # Metric histories are long numeric arrays: gzip shrinks them ~3x. SSE is exempt
    # (Starlette's GZipMiddleware skips text/event-stream, which must not be buffered).
    # Level 1: a 3 MB metrics answer compresses in ~30 ms instead of ~300 ms at level 9,
    # for a reply about 5% larger.
    # Innermost: the runs list and run rows pollers ask for, shared for 0.5 s; writes
    # void it (server.readcache).
    app.add_middleware(PollCache)
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=1)
    # Outside gzip: unknown Hosts, cross-site writes and oversized bodies are refused
    # before any route or body parsing runs (server.middleware).
    middleware.install(app, hosts=settings.allowed_hosts, max_body_bytes=settings.max_body_bytes)
    routers = (
        routes_runs,
        routes_manage,
        routes_logs,
        sse,
        routes_sweeps,
        routes_meta,
        routes_external,
    )
    for router in (r.router for r in routers):
        app.include_router(router)
    add_error_handlers(app)
    document_errors(app, token_required=settings.token is not None)
    mount_api_docs(app)
    mount_frontend(app)
    return app


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
    """Every REAP_INTERVAL_S: finish migrating if needed, reap stale runs, re-send queued
    runs whose message was lost."""
    from worker.recovery import reap_external, reap_stale, reconcile_queued

    while True:
        if not ctx.migrated:
            await _try_migrate(ctx)
        else:
            try:
                # enqueue: re-queued runs go to this app's broker, not the environment's.
                requeued = await run_in_threadpool(reap_stale, ctx.engine, enqueue=ctx.enqueue)
                if requeued:
                    log.warning("re-queued or failed stale runs %s", requeued)
                # External runs whose client went silent: failed, never re-queued.
                await run_in_threadpool(
                    reap_external, ctx.engine, older_than_s=ctx.settings.external_silent_s
                )
                # Queued runs whose message the broker lost are sent again.
                await run_in_threadpool(
                    reconcile_queued,
                    ctx.engine,
                    after_s=ctx.settings.resend_after_s,
                    enqueue=ctx.enqueue,
                    celery_app=ctx.celery,
                )
                await run_in_threadpool(_build_missing_overviews, ctx)
            except Exception:  # the loop must survive a database hiccup
                log.exception("reaping stale runs failed")
        await asyncio.sleep(REAP_INTERVAL_S)
