"""Runs: submit, list, inspect, cancel, delete, and their downsampled metric histories."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from core.status import RunStatus
from server import submit
from server.auth import TokenFirstRoute, require_token
from server.deps import (
    MAX_ID,
    ArchivedQuery,
    Context,
    CtxDep,
    GroupIdQuery,
    RunIdPath,
    SearchQuery,
    TagQuery,
)
from server.encode import FastJSONResponse
from server.schemas import (
    BatchMetrics,
    RunCreate,
    RunCreated,
    RunKeys,
    RunMetrics,
    RunOut,
    XAxis,
    runs_out,
)
from store import db
from store import metrics as store_metrics
from store import runs as store_runs

router = APIRouter(prefix="/api", tags=["runs"], route_class=TokenFirstRoute)

# What the run page plots when no keys are asked for.
DEFAULT_KEYS = ("loss", "train_err", "lr", "val_loss", "val_err")
MAX_KEYS = 32
MAX_BATCH_RUNS = 64
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


def not_found(run_id: int) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id} not found")


def run_out(run: Any) -> RunOut:
    return RunOut.model_validate(run)


@router.post(
    "/runs",
    status_code=status.HTTP_201_CREATED,
    response_model=RunCreated,
    dependencies=[Depends(require_token)],
    summary="Queue a run (and optionally its kn = ref_batch baseline)",
    responses={503: {"description": "The task queue (broker) is unreachable; nothing stored."}},
)
def create_run(body: RunCreate, ctx: CtxDep) -> Any:
    return submit.submit_run(ctx, body.plan())


@router.get("/runs", response_model=list[RunOut], summary="Runs, newest first")
def list_runs(
    ctx: CtxDep,
    status_: Annotated[RunStatus | None, Query(alias="status")] = None,
    group: GroupIdQuery = None,
    limit: int = Query(500, ge=1, le=5000),
    archived: ArchivedQuery = "hide",
    q: SearchQuery = None,
    tag: TagQuery = None,
) -> Any:
    with db.session(ctx.engine) as s:
        rows = store_runs.list_runs(
            s, status=status_, group_id=group, limit=limit, archived=archived, q=q, tag=tag
        )
        return runs_out(s, rows)


@router.get("/runs/{run_id:run}", response_model=RunOut, summary="One run")
def get_run(run_id: RunIdPath, ctx: CtxDep) -> Any:
    with db.session(ctx.engine) as s:
        run = store_runs.get_run(s, run_id)
        if run is None:
            raise not_found(run_id)
        return runs_out(s, [run])[0]


@router.post(
    "/runs/{run_id}/cancel",
    response_model=RunOut,
    dependencies=[Depends(require_token)],
    summary="Cancel: a queued run at once, a running one at its next check (about 1 s)",
)
def cancel_run(run_id: RunIdPath, ctx: CtxDep) -> Any:
    with db.session(ctx.engine) as s:
        run = store_runs.request_cancel(s, run_id)
        if run is None:
            raise not_found(run_id)
        return run_out(run)


@router.delete(
    "/runs/{run_id:run}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_token)],
    summary="Delete a run and its metrics (a running run is cancelled first)",
)
def delete_run(run_id: RunIdPath, ctx: CtxDep) -> Response:
    with db.session(ctx.engine) as s:
        run = store_runs.get_run(s, run_id)
        uid = run.uid if run is not None else None
        if not store_runs.delete_run(s, run_id):
            raise not_found(run_id)
    # Its checkpoint and files go with it, once the row is gone for good (a worker still
    # training it stops at its next poll and removes what it writes meanwhile).
    store_runs.remove_run_dir(uid)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def parse_keys(keys: str | None) -> list[str]:
    """``"loss,lr"`` -> ``["loss", "lr"]``; 422 on a malformed list."""
    if keys is None or not keys.strip():
        return list(DEFAULT_KEYS)
    out = list(dict.fromkeys(k.strip() for k in keys.split(",") if k.strip()))
    bad = [k for k in out if not _KEY_RE.match(k)]
    if bad or len(out) > MAX_KEYS:
        msg = f"bad metric keys {bad}" if bad else f"at most {MAX_KEYS} keys"
        raise query_error("keys", msg, keys)
    return out


def parse_ids(runs: str) -> list[int]:
    try:
        ids = list(dict.fromkeys(int(r) for r in runs.split(",") if r.strip()))
    except ValueError:
        raise query_error("runs", "comma-separated run ids expected, e.g. 1,2,3", runs) from None
    if not ids or len(ids) > MAX_BATCH_RUNS:
        raise query_error("runs", f"between 1 and {MAX_BATCH_RUNS} run ids", runs)
    if not all(1 <= i <= MAX_ID for i in ids):
        raise query_error("runs", f"run ids are between 1 and {MAX_ID}", runs)
    return ids


def parse_compact(
    columns: str | None, digits: int | None, drop_flat: str | None
) -> store_metrics.Compact:
    """The batch read's trimming options; 422 naming the field on a bad column."""
    cols = tuple(dict.fromkeys(c.strip() for c in (columns or "").split(",") if c.strip()))
    bad = [c for c in cols if c not in store_metrics.SERIES_COLUMNS]
    if bad:
        raise query_error("columns", f"unknown columns {bad}", columns)
    flat = frozenset(k.strip() for k in (drop_flat or "").split(",") if k.strip())
    if any(not _KEY_RE.match(k) for k in flat) or len(flat) > MAX_KEYS:
        raise query_error("drop_flat", "comma-separated metric keys expected", drop_flat)
    return store_metrics.Compact(columns=cols, digits=digits, drop_flat=flat)


def query_error(field: str, msg: str, value: Any) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", field), "msg": msg, "input": value}]
    )


def read_run_series(
    ctx: Context,
    run_id: int,
    keys: list[str],
    x: str,
    max_points: int,
    x_min: float | None = None,
    x_max: float | None = None,
) -> dict[str, Any]:
    # JSON-ready lists, None for non-finite values (store.metrics' contract).
    return store_metrics.read_series(
        ctx.engine, run_id, keys, x=x, max_points=max_points, x_min=x_min, x_max=x_max
    )


@router.get(
    "/runs/{run_id}/metrics",
    response_class=FastJSONResponse,
    responses={200: {"model": RunMetrics}},
    summary="Downsampled metric histories of one run (MinMaxLTTB, last point kept)",
)
def run_metrics(
    ctx: CtxDep,
    run_id: RunIdPath,
    keys: str | None = Query(None, description=f"Comma-separated; default {DEFAULT_KEYS}."),
    x: XAxis = "step",
    max_points: int = Query(2000, ge=2, le=100_000),
    x_min: float | None = Query(None, allow_inf_nan=False),
    x_max: float | None = Query(None, allow_inf_nan=False),
) -> Any:
    key_list = parse_keys(keys)
    with db.session(ctx.engine) as s:
        if store_runs.get_run(s, run_id) is None:
            raise not_found(run_id)
    series = read_run_series(ctx, run_id, key_list, x, max_points, x_min, x_max)
    return FastJSONResponse({"run_id": run_id, "series": series})


@router.get(
    "/runs/{run_id}/keys",
    response_model=RunKeys,
    summary="The metric keys a run has points for (optionally those with a prefix)",
)
def run_keys(
    ctx: CtxDep,
    run_id: RunIdPath,
    prefix: str = Query(
        "",
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:/-]*$",
        description="Only keys starting with this, e.g. health/.",
    ),
) -> Any:
    with db.session(ctx.engine) as s:
        if store_runs.get_run(s, run_id) is None:
            raise not_found(run_id)
    return {"run_id": run_id, "keys": store_metrics.keys(ctx.engine, run_id, prefix)}


@router.get(
    "/metrics",
    response_class=FastJSONResponse,
    responses={200: {"model": BatchMetrics}},
    summary="Downsampled histories of several runs at once (the compare view)",
)
async def batch_metrics(
    ctx: CtxDep,
    runs: str = Query(..., description="Comma-separated run ids, e.g. 1,2,3."),
    keys: str | None = Query(None, description=f"Comma-separated; default {DEFAULT_KEYS}."),
    x: XAxis = "step",
    max_points: int = Query(2000, ge=2, le=100_000),
    columns: str | None = Query(
        None,
        description="Comma-separated columns of each series among step, epoch, wall_time, "
        "value (default all), e.g. epoch,value for a plot against epochs.",
    ),
    digits: int | None = Query(
        None, ge=1, le=17, description="Round floats to this many significant digits."
    ),
    drop_flat: str | None = Query(
        None,
        description="Comma-separated keys drawn as lines: points inside a stretch of equal "
        "values are left out (a step LR schedule keeps its corners).",
    ),
) -> Any:
    ids = parse_ids(runs)
    key_list = parse_keys(keys)
    # The compare view's first paint: the x column and the value, 6 digits, the LR's
    # corners: a sixth of the JSON to write, gzip, send and parse (docs/benchmarks.md).
    compact = parse_compact(columns, digits, drop_flat)

    def read_all() -> dict[str, Any]:
        with db.session(ctx.engine) as s:
            present = [i for i in ids if store_runs.get_run(s, i) is not None]
        out = {
            str(i): store_metrics.read_series(
                ctx.engine, i, key_list, x=x, max_points=max_points, compact=compact
            )
            for i in present
        }
        return {"runs": out, "missing": [i for i in ids if i not in present]}

    # One worker thread for the whole batch: 20 runs x 3 keys are ~60 small queries.
    return FastJSONResponse(await run_in_threadpool(read_all))
