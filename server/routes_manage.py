"""Run management: rename, tag, annotate, archive, bulk actions, exports, checkpoint
download and "train N more epochs" (docs/api.md, "Run management").

Exports read every point (``store.export``) and stream: CSV as it is generated, Parquet
once its file is built (``server.exports``).
"""

from __future__ import annotations

import os
import shutil
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from core.errors import format_validation_error
from core.status import RunStatus
from server import exports
from server.auth import TokenFirstRoute, require_token
from server.deps import (
    ArchivedQuery,
    Context,
    CtxDep,
    GroupIdQuery,
    RunIdPath,
    SearchQuery,
    TagQuery,
)
from server.routes_runs import not_found, parse_ids
from server.schemas import BulkAction, BulkDone, ExtendBody, RunOut, RunPatch, runs_out
from server.submit import QueueUnavailable
from store import db
from store import runs as store_runs
from store.models import Run
from trainer.spec import RunSpec

router = APIRouter(prefix="/api", tags=["run management"], route_class=TokenFirstRoute)

# trainer.checkpoint.CHECKPOINT_NAME (that module imports torch; tests/test_manage.py
# holds the two together).
CHECKPOINT_FILE = "checkpoint.pt"
# A run can be extended from these statuses when its folder holds a checkpoint.
EXTENDABLE = (RunStatus.SUCCEEDED, RunStatus.CANCELLED, RunStatus.FAILED)


def checkpoint_path(run: Run) -> Any:
    return store_runs.run_dir(run.uid or str(run.id)) / CHECKPOINT_FILE


def _body_error(field: str, msg: str, value: Any) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": msg, "input": value}]
    )


@router.patch(
    "/runs/{run_id:run}",
    response_model=RunOut,
    dependencies=[Depends(require_token)],
    summary="Rename a run, set its tags or notes, archive or restore it",
)
def patch_run(run_id: RunIdPath, body: RunPatch, ctx: CtxDep) -> Any:
    with db.session(ctx.engine) as s:
        run = store_runs.update_run(s, run_id, **body.model_dump(exclude_none=True))
        return runs_out(s, [run])[0]


@router.post(
    "/runs/bulk",
    response_model=BulkDone,
    dependencies=[Depends(require_token)],
    summary="Archive, restore, delete, tag or untag several runs at once",
)
def bulk(body: BulkAction, ctx: CtxDep) -> Any:
    if body.action in ("tag", "untag") and not body.tags:
        raise _body_error("tags", f"{body.action} needs the tags", body.tags)
    ids = list(dict.fromkeys(body.ids))
    uids: list[str | None] = []
    with db.session(ctx.engine) as s:
        found = {r.id: r for r in s.query(Run).filter(Run.id.in_(ids))}
        for run_id in ids:
            run = found.get(run_id)
            if run is None:
                continue
            if body.action == "delete":
                uids.append(run.uid)
                store_runs.delete_run(s, run_id)
            elif body.action in ("archive", "unarchive"):
                store_runs.update_run(s, run_id, archived=body.action == "archive")
            else:
                given, tags = body.tags or [], list(run.tags or [])
                kept = [t for t in tags if t not in given]
                new = tags + given if body.action == "tag" else kept
                try:
                    store_runs.update_run(s, run_id, tags=new)
                except ValueError as err:  # past 32 tags: nothing of the request applies
                    raise _body_error("tags", f"run {run_id}: {err}", body.tags) from None
    for uid in uids:  # after the rows are gone for good, as DELETE /api/runs/{id}
        store_runs.remove_run_dir(uid)
    done = [i for i in ids if i in found]
    return BulkDone(done=done, missing=[i for i in ids if i not in found])


def _attachment(name: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{name}"'}


@router.get(
    "/runs.csv",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}}},
    summary="The runs table as CSV: every spec field and summary figure (filters of GET /api/runs)",
)
def runs_csv(
    ctx: CtxDep,
    status_: Annotated[RunStatus | None, Query(alias="status")] = None,
    group: GroupIdQuery = None,
    archived: ArchivedQuery = "hide",
    q: SearchQuery = None,
    tag: TagQuery = None,
) -> Any:
    with db.session(ctx.engine) as s:
        where = store_runs.run_filters(s, status_, group, archived, q, tag)
    return StreamingResponse(
        exports.runs_csv(ctx.engine, where),
        media_type="text/csv; charset=utf-8",
        headers=_attachment("runs.csv"),
    )


def _existing(ctx: Context, ids: list[int]) -> set[int]:
    with db.session(ctx.engine) as s:
        return set(s.scalars(sa.select(Run.id).where(Run.id.in_(ids))))


async def _export(ctx: Context, ids: list[int], fmt: str, name: str) -> Response:
    present = await run_in_threadpool(_existing, ctx, ids)
    if not present:
        raise not_found(ids[0]) if len(ids) == 1 else HTTPException(404, f"runs {ids} not found")
    headers = _attachment(f"{name}.{fmt}")
    # The body is a table: ids it leaves out are named in a header (the UI shows them).
    if missing := [str(i) for i in ids if i not in present]:
        headers["X-Missing-Runs"] = ",".join(missing)
    ids = [i for i in ids if i in present]
    if fmt == "csv":
        return StreamingResponse(
            exports.metrics_csv(ctx.engine, ids),
            media_type="text/csv; charset=utf-8",
            headers=headers,
        )
    fh = await run_in_threadpool(exports.metrics_parquet, ctx.engine, ids)
    return StreamingResponse(
        exports.iter_file(fh), media_type="application/vnd.apache.parquet", headers=headers
    )


_EXPORT_DOC = {200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}}


@router.get(
    "/runs/{run_id}/metrics.{fmt}",
    response_class=StreamingResponse,
    responses=_EXPORT_DOC,
    summary="Every metric point of a run (columns run_id,key,step,epoch,wall_time,value)",
)
async def run_metrics_export(run_id: RunIdPath, fmt: exports.Format, ctx: CtxDep) -> Any:
    return await _export(ctx, [run_id], fmt, f"run-{run_id}-metrics")


@router.get(
    "/metrics.{fmt}",
    response_class=StreamingResponse,
    responses=_EXPORT_DOC,
    summary="Every metric point of several runs (a comparison), one table",
)
async def batch_metrics_export(
    ctx: CtxDep,
    fmt: exports.Format,
    runs: str = Query(..., description="Comma-separated run ids, e.g. 1,2,3."),
) -> Any:
    ids = parse_ids(runs)
    return await _export(ctx, ids, fmt, "metrics-" + "-".join(map(str, ids[:8])))


@router.get(
    "/runs/{run_id}/checkpoint",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
    summary="Download the run's last checkpoint (PyTorch, torch.load(weights_only=True))",
)
def download_checkpoint(run_id: RunIdPath, ctx: CtxDep) -> Any:
    with db.session(ctx.engine) as s:
        run = store_runs.get_run(s, run_id)
        if run is None:
            raise not_found(run_id)
    path = checkpoint_path(run)
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, _no_checkpoint(run))
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"run-{run_id}-checkpoint.pt"
    )


def _no_checkpoint(run: Run) -> str:
    if not (run.spec or {}).get("checkpoint", True):
        why = "its spec has checkpoint: false"
    elif run.status == RunStatus.QUEUED:
        why = "it has not started"
    else:
        why = "no epoch has finished yet, or its folder is on another host"
    return f"run {run.id} has no checkpoint: {why}"


@router.post(
    "/runs/{run_id}/extend",
    status_code=status.HTTP_201_CREATED,
    response_model=RunOut,
    dependencies=[Depends(require_token)],
    summary="Train N more epochs: a new run resuming from this run's last checkpoint",
    responses={
        409: {"description": "The run is not finished, or has no checkpoint."},
        503: {"description": "The task queue (broker) is unreachable; nothing stored."},
    },
)
def extend_run(run_id: RunIdPath, body: ExtendBody, ctx: CtxDep) -> Any:
    with db.session(ctx.engine) as s:
        parent = store_runs.get_run(s, run_id)
        if parent is None:
            raise not_found(run_id)
    if parent.status not in EXTENDABLE:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"run {run_id} is {parent.status}: only a succeeded, cancelled or failed run "
            "can be extended",
        )
    source = checkpoint_path(parent)
    if not source.is_file():
        raise HTTPException(status.HTTP_409_CONFLICT, _no_checkpoint(parent))
    try:
        epochs = int(parent.spec["epochs"]) + body.epochs
        spec = RunSpec.model_validate({**parent.spec, "epochs": epochs})
    except (ValidationError, KeyError, TypeError, ValueError) as err:
        msg = format_validation_error(err) if isinstance(err, ValidationError) else str(err)
        raise _body_error("epochs", f"the extended spec is invalid: {msg}", body.epochs) from None
    name = f"{parent.name} +{body.epochs} ep"
    with db.session(ctx.engine) as s:
        child = store_runs.create_run(
            s,
            name=name if len(name) <= store_runs.NAME_MAX_LEN else parent.name,
            spec=spec.model_dump(mode="json"),
            baseline_id=parent.baseline_id,
            parent_id=parent.id,
        )
        child.tags = list(parent.tags or [])
        child_id, uid = child.id, child.uid
    try:
        # Seed the new run's folder before its message exists: the worker that takes it
        # resumes from this copy (copied, then renamed: never a torn checkpoint).
        target = store_runs.run_dir(uid)
        target.mkdir(parents=True, exist_ok=True)
        partial = target / (CHECKPOINT_FILE + ".part")
        shutil.copyfile(source, partial)
        os.replace(partial, target / CHECKPOINT_FILE)
        ctx.enqueue(child_id, spec)
    except Exception as err:
        with db.session(ctx.engine) as s:
            store_runs.delete_run(s, child_id)
        store_runs.remove_run_dir(uid)
        if isinstance(err, OSError):
            raise
        raise QueueUnavailable(
            f"the task queue is unavailable ({ctx.settings.broker_url_safe}): "
            f"{type(err).__name__}: {err}"
        ) from err
    with db.session(ctx.engine) as s:
        return runs_out(s, [store_runs.get_run(s, child_id)])[0]
