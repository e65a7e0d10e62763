"""Runs: submit, list, inspect, cancel, delete, and their downsampled metric histories."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from server import submit
from server.auth import require_token
from server.deps import Context, get_ctx
from server.encode import FastJSONResponse, sanitize
from server.schemas import (
    BatchMetrics,
    RunCreate,
    RunCreated,
    RunMetrics,
    RunOut,
    RunStatus,
    XAxis,
)
from store import db
from store import metrics as store_metrics
from store import runs as store_runs

router = APIRouter(prefix="/api", tags=["runs"])

# What the run page plots when no keys are asked for.
DEFAULT_KEYS = ("loss", "train_err", "lr", "val_loss", "val_err")
MAX_KEYS = 32
MAX_BATCH_RUNS = 64
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


def not_found(run_id: int) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id} not found")


def run_dict(run: Any) -> dict[str, Any]:
    return sanitize(store_runs.run_to_dict(run))


@router.post(
    "/runs",
    status_code=status.HTTP_201_CREATED,
    response_model=RunCreated,
    dependencies=[Depends(require_token)],
    summary="Queue a run (and optionally its kn = ref_batch baseline)",
    responses={503: {"description": "The task queue (broker) is unreachable; nothing stored."}},
)
def create_run(body: RunCreate, ctx: Context = Depends(get_ctx)) -> Any:
    return sanitize(submit.submit_run(ctx, body.spec, name=body.name, baseline=body.baseline))


@router.get("/runs", response_model=list[RunOut], summary="Runs, newest first")
def list_runs(
    status_: RunStatus | None = Query(None, alias="status"),
    group: int | None = Query(None, description="Only runs of this sweep/compare group."),
    limit: int = Query(500, ge=1, le=5000),
    ctx: Context = Depends(get_ctx),
) -> Any:
    with db.session(ctx.engine) as s:
        rows = store_runs.list_runs(s, status=status_, group_id=group, limit=limit)
        return [run_dict(r) for r in rows]


@router.get("/runs/{run_id}", response_model=RunOut, summary="One run")
def get_run(run_id: int, ctx: Context = Depends(get_ctx)) -> Any:
    with db.session(ctx.engine) as s:
        run = store_runs.get_run(s, run_id)
        if run is None:
            raise not_found(run_id)
        return run_dict(run)


@router.post(
    "/runs/{run_id}/cancel",
    response_model=RunOut,
    dependencies=[Depends(require_token)],
    summary="Cancel: a queued run at once, a running one at its next check (about 1 s)",
)
def cancel_run(run_id: int, ctx: Context = Depends(get_ctx)) -> Any:
    with db.session(ctx.engine) as s:
        run = store_runs.request_cancel(s, run_id)
        if run is None:
            raise not_found(run_id)
        return run_dict(run)


@router.delete(
    "/runs/{run_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_token)],
    summary="Delete a run and its metrics (a running run is cancelled first)",
)
def delete_run(run_id: int, ctx: Context = Depends(get_ctx)) -> Response:
    with db.session(ctx.engine) as s:
        run = store_runs.get_run(s, run_id)
        if run is None:
            raise not_found(run_id)
        if run.status in ("queued", "running"):
            # The worker polls the cancel flag; it then finds the run gone and stops.
            store_runs.request_cancel(s, run_id)
        store_runs.delete_run(s, run_id)
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
    return ids


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
    run_id: int,
    keys: str | None = Query(None, description=f"Comma-separated; default {DEFAULT_KEYS}."),
    x: XAxis = "step",
    max_points: int = Query(2000, ge=2, le=100_000),
    x_min: float | None = None,
    x_max: float | None = None,
    ctx: Context = Depends(get_ctx),
) -> Any:
    key_list = parse_keys(keys)
    with db.session(ctx.engine) as s:
        if store_runs.get_run(s, run_id) is None:
            raise not_found(run_id)
    series = read_run_series(ctx, run_id, key_list, x, max_points, x_min, x_max)
    return FastJSONResponse({"run_id": run_id, "series": series})


@router.get(
    "/metrics",
    response_class=FastJSONResponse,
    responses={200: {"model": BatchMetrics}},
    summary="Downsampled histories of several runs at once (the compare view)",
)
async def batch_metrics(
    runs: str = Query(..., description="Comma-separated run ids, e.g. 1,2,3."),
    keys: str | None = Query(None, description=f"Comma-separated; default {DEFAULT_KEYS}."),
    x: XAxis = "step",
    max_points: int = Query(2000, ge=2, le=100_000),
    ctx: Context = Depends(get_ctx),
) -> Any:
    ids = parse_ids(runs)
    key_list = parse_keys(keys)

    def read_all() -> dict[str, Any]:
        with db.session(ctx.engine) as s:
            present = [i for i in ids if store_runs.get_run(s, i) is not None]
        out = {str(i): read_run_series(ctx, i, key_list, x, max_points) for i in present}
        return {"runs": out, "missing": [i for i in ids if i not in present]}

    # One worker thread for the whole batch: 20 runs x 3 keys are ~60 small queries.
    return FastJSONResponse(await run_in_threadpool(read_all))
