"""Runs launched outside batchlab's workers (a SLURM or Kubernetes job, a notebook),
tracked live: the client registers the run, uploads its points, heartbeats and finishes it.

An external run is ``running`` from its registration and never queued: no broker message
exists for it, so the reaper never re-queues it; a client silent for
``Settings.external_silent_s`` gets its run failed "lost contact with the client", and
one that calls again revives it (``store.runs`` owns these transitions). Points go
straight into the store through the same idempotent upsert the worker's writer uses, keyed
``(run_id, key, step)``: an upload retried after a lost answer, or replayed from the
client's spool, stores each point once. Upload bodies may be gzip-compressed
(``Content-Encoding: gzip``); the body limit holds for the decompressed bytes too.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import zlib
from collections.abc import Callable, Coroutine
from operator import itemgetter
from typing import Any

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from core.status import RunStatus
from server.auth import TokenFirstRoute, require_token
from server.deps import Context, CtxDep, RunIdPath
from server.schemas import (
    ExternalBeat,
    ExternalBeatOut,
    ExternalFinish,
    ExternalFinished,
    ExternalRunCreate,
    ExternalRunRegistered,
    PointsStored,
    PointsUpload,
    RunOut,
)
from store import db
from store import runs as store_runs
from store.metrics import postgres, sqlite
from store.metrics.live import LiveOverviews
from store.metrics.rows import Row, RunGone

log = logging.getLogger("batchlab.server")

# The keys GET /api/runs/{id}/metrics can ask for (server.routes_runs).
KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
# How often a client should heartbeat (it also learns of a cancel this way).
HEARTBEAT_S = 1.0


class GzipRequest(Request):
    """A request whose ``Content-Encoding: gzip`` body reads decompressed, at most
    ``limit`` bytes of it (413 past that: a small bomb must not inflate to gigabytes)."""

    limit = 0

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            raw = await super().body()
            encoding = self.headers.get("content-encoding", "").strip().lower()
            if encoding == "gzip":
                raw = _gunzip(raw, self.limit)
            elif encoding not in ("", "identity"):
                raise HTTPException(
                    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                    f"Content-Encoding {encoding!r} is not supported (gzip or none)",
                )
            self._body = raw
        return self._body


def _gunzip(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"body: not valid gzip ({exc})") from None
    if len(out) > limit:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"request body larger than {limit} bytes once decompressed (BATCHLAB_MAX_BODY_BYTES)",
        )
    if not inflater.eof:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "body: truncated gzip stream")
    return out


class GzipTokenRoute(TokenFirstRoute):
    """``TokenFirstRoute`` (the token before the body) that also reads gzip bodies."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def gzip_aware(request: Request) -> Response:
            wrapped = GzipRequest(request.scope, request.receive)
            wrapped.limit = request.app.state.ctx.settings.max_body_bytes
            return await handler(wrapped)

        return gzip_aware


router = APIRouter(prefix="/api/external", tags=["external runs"], route_class=GzipTokenRoute)
_WRITE = [Depends(require_token)]


def _not_found(run_id: int) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"external run {run_id} not found")


@router.post(
    "/runs",
    response_model=ExternalRunRegistered,
    dependencies=_WRITE,
    summary="Register a run its own client trains (running at once, never queued)",
    responses={201: {"model": ExternalRunRegistered, "description": "Created."}},
)
def register(body: ExternalRunCreate, ctx: CtxDep, response: Response) -> Any:
    try:
        with db.session(ctx.engine) as s:
            run, created = store_runs.register_external(
                s,
                uid=body.uid or store_runs.new_uid(),
                name=body.name,
                spec=body.stored_spec(),
                host=body.host,
                device=body.device,
                tags=body.tags,
                group_id=body.group_id,
                baseline_id=body.baseline_id,
                is_baseline=body.is_baseline,
            )
            out = RunOut.model_validate(run)
    except ValueError as exc:
        raise _body_error(exc) from None
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return ExternalRunRegistered(
        run=out,
        created=created,
        max_body_bytes=ctx.settings.max_body_bytes,
        heartbeat_s=HEARTBEAT_S,
        silent_after_s=ctx.settings.external_silent_s,
    )


def _body_error(exc: ValueError) -> RequestValidationError:
    """store.runs' "field: message" as a 422 item at ["body", field]."""
    field, _, msg = str(exc).partition(": ")
    item = {"type": "value_error", "loc": ("body", field), "msg": msg or str(exc)}
    return RequestValidationError([item])


# The upload's body is parsed by pydantic's own JSON parser straight from the bytes
# (about half the cost of json.loads and validating the objects, at 100k points/s), so
# FastAPI does not read it: the OpenAPI document gets its schema from here.
_POINTS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PointsUpload.model_json_schema()}},
    }
}


@router.post(
    "/runs/{run_id}/points",
    response_model=PointsStored,
    dependencies=_WRITE,
    summary="Store a batch of points (idempotent; gzip bodies accepted)",
    openapi_extra=_POINTS_BODY,
    responses={
        400: {"description": "A gzip body that does not decompress."},
        409: {"description": "The run is not an external run."},
        415: {"description": "A Content-Encoding other than gzip."},
    },
)
async def upload_points(run_id: RunIdPath, request: Request, ctx: CtxDep) -> Any:
    raw = await request.body()  # decompressed and bounded by GzipRequest
    return await run_in_threadpool(_store_points, request, ctx, run_id, raw)


def parse_points(raw: bytes) -> PointsUpload:
    """The upload's JSON (NaN and Infinity literals accepted); 422 naming the record."""
    try:
        return PointsUpload.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


def _store_points(request: Request, ctx: Context, run_id: int, raw: bytes) -> PointsStored:
    body = parse_points(raw)
    try:
        rows, ordered = to_rows(run_id, body.records)
    except ValueError as exc:
        item = {"type": "value_error", "loc": ("body", "records"), "msg": str(exc)}
        raise RequestValidationError([item]) from None
    with db.session(ctx.engine) as s:
        run = store_runs.get_run(s, run_id)
        if run is None:
            raise _not_found(run_id)
        if run.origin != store_runs.ORIGIN_EXTERNAL:
            raise HTTPException(status.HTTP_409_CONFLICT, f"run {run_id} is not an external run")
    if not rows:
        return PointsStored(points=0)
    backend = postgres if ctx.engine.dialect.name == "postgresql" else sqlite
    try:
        backend.write_rows(ctx.engine, run_id, rows)
    except RunGone:
        raise _not_found(run_id) from None
    _live(request, ctx, run_id).feed(rows, ordered=ordered)
    return PointsStored(points=len(rows))


def to_rows(run_id: int, records: list[Any]) -> tuple[list[Row], bool]:
    """The store's rows of ``records`` (null -> NaN), each (key, step) once (the last
    wins: PostgreSQL's ON CONFLICT cannot touch a row twice in one statement), and
    whether every key's steps grow through the batch (the live overviews' fast path).
    ValueError naming a key the API could not read back."""
    nan = math.nan
    rows: list[Row] = [
        (run_id, key, step, epoch, wall_time, nan if value is None else value)
        for step, epoch, wall_time, values in records
        for key, value in values.items()
    ]
    for key in set(map(itemgetter(1), rows)):  # a handful of distinct keys
        if not KEY_RE.match(key):
            raise ValueError(f"{key!r}: metric keys are 1-64 characters of A-Za-z0-9_.:/-")
    if _has_duplicates(records):
        return list({(r[1], r[2]): r for r in rows}.values()), False
    return rows, True


def _has_duplicates(records: list[Any]) -> bool:
    """Whether a (key, step) may repeat: a step going back, or a key logged again at the
    same step (the trainer logs an epoch's own values apart, at its last iteration)."""
    last, keys = -1, None
    for step, _, _, values in records:
        if step > last:
            last, keys, last_values = step, None, values
        elif step < last:
            return True
        else:
            keys = set(last_values) if keys is None else keys
            if not keys.isdisjoint(values):
                return True
            keys.update(values)
    return False


class _LiveRun:
    """One run's live overviews in this process, fed by its uploads one at a time."""

    def __init__(self, engine: Any, run_id: int) -> None:
        self.live = LiveOverviews(engine, run_id)
        self.lock = threading.Lock()
        self.last_step = -1

    def feed(self, rows: list[Row], *, ordered: bool) -> None:
        with self.lock:
            first = min(r[2] for r in rows)
            self.live.feed(rows, ordered=ordered and first > self.last_step)
            self.last_step = max(self.last_step, max(r[2] for r in rows))
            if self.live.due():
                self._publish()

    def close(self) -> None:
        with self.lock:
            self._publish()

    def _publish(self) -> None:
        try:
            self.live.publish()
        except Exception:  # only a speed-up for readers: they read the points instead
            log.warning("run %s: storing live overviews failed", self.live.run_id, exc_info=True)


_live_lock = threading.Lock()


def _registry(request: Request) -> dict[int, _LiveRun]:
    state = request.app.state
    with _live_lock:
        if not hasattr(state, "external_live"):
            state.external_live = {}
        return state.external_live  # type: ignore[no-any-return]


def _live(request: Request, ctx: Context, run_id: int) -> _LiveRun:
    registry = _registry(request)
    with _live_lock:
        live = registry.get(run_id)
        if live is None:
            live = registry[run_id] = _LiveRun(ctx.engine, run_id)
        return live


@router.post(
    "/runs/{run_id}/heartbeat",
    response_model=ExternalBeatOut,
    dependencies=_WRITE,
    summary="The client is alive (progress, ETA, device); answers whether to stop",
)
def heartbeat(run_id: RunIdPath, body: ExternalBeat, ctx: CtxDep) -> Any:
    with db.session(ctx.engine) as s:
        try:
            run = store_runs.external_beat(
                s, run_id, progress=body.progress, eta_s=body.eta_s, device=body.device
            )
        except store_runs.RunNotFound:
            raise _not_found(run_id) from None
        final = run.status != RunStatus.RUNNING
        cancel = bool(run.cancel_requested) or run.status == RunStatus.CANCELLED
        return ExternalBeatOut(status=run.status, cancel_requested=cancel, stop=cancel or final)


@router.post(
    "/runs/{run_id}/finish",
    response_model=ExternalFinished,
    dependencies=_WRITE,
    summary="Set the final status, summary and error (after every point is stored)",
)
async def finish(
    run_id: RunIdPath,
    body: ExternalFinish,
    request: Request,
    ctx: CtxDep,
    background: BackgroundTasks,
) -> Any:
    def apply() -> tuple[bool, RunOut]:
        with db.session(ctx.engine) as s:
            applied = store_runs.finish_external(
                s,
                run_id,
                body.status,
                error=body.error,
                summary=body.summary,
                diverged_step=body.diverged_step,
            )
            run = store_runs.get_run(s, run_id)
            if run is None or run.origin != store_runs.ORIGIN_EXTERNAL:
                raise _not_found(run_id)
            return applied, RunOut.model_validate(run)

    applied, out = await run_in_threadpool(apply)
    live = _registry(request).pop(run_id, None)
    background.add_task(_finished, ctx, run_id, live)
    return ExternalFinished(run=out, applied=applied)


def _finished(ctx: Context, run_id: int, live: _LiveRun | None) -> None:
    """After the answer: the finished run's MinMaxLTTB overviews, as a worker stores them
    (the API's maintenance loop builds any this misses)."""
    from store import metrics

    if live is not None:
        live.close()
    try:
        metrics.build_overviews(ctx.engine, run_id)
    except Exception:  # the maintenance loop builds it later
        log.warning("run %s: building its overviews failed", run_id, exc_info=True)
