"""Sweeps: one run per (batch size, seed) against the kn = ref_batch baseline."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from server import submit
from server.auth import require_token
from server.deps import Context, get_ctx
from server.encode import sanitize
from server.schemas import GroupOut, SweepCreate, SweepCreated, SweepDetail
from store import db
from store import runs as store_runs
from trainer.spec import RunSpec

router = APIRouter(prefix="/api", tags=["sweeps"])

# Summary keys copied from each run's summary (trainer.fit's FitResult.summary).
SUMMARY_KEYS = (
    "final_val_err",
    "best_val_err",
    "median_last5_val_err",
    "iters_to_target",
    "time_to_target_s",
    "epochs_to_target",
    "loss_oscillation",
    "samples_per_s",
    "wall_time_s",
)


@router.post(
    "/sweeps",
    status_code=status.HTTP_201_CREATED,
    response_model=SweepCreated,
    dependencies=[Depends(require_token)],
    summary="Queue one run per (batch size, seed), plus the kn = ref_batch baseline",
    responses={503: {"description": "The task queue (broker) is unreachable; nothing stored."}},
)
def create_sweep(body: SweepCreate, ctx: Context = Depends(get_ctx)) -> Any:
    try:
        out = submit.submit_sweep(
            ctx,
            body.spec,
            body.batch_sizes,
            seeds=body.seeds,
            baseline=body.baseline,
            name=body.name,
        )
    except submit.BadBatchSize as err:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", "batch_sizes", err.index),
                    "msg": str(err),
                    "input": err.total,
                }
            ]
        ) from err
    return sanitize(out)


@router.get("/sweeps", response_model=list[GroupOut], summary="Sweeps, newest first")
def list_sweeps(
    kind: Literal["sweep", "compare", "all"] = Query(
        "sweep", description="compare: the groups of POST /api/runs with baseline."
    ),
    ctx: Context = Depends(get_ctx),
) -> Any:
    with db.session(ctx.engine) as s:
        groups = store_runs.list_groups(s)
        return [store_runs.group_to_dict(g) for g in groups if kind in ("all", g.kind)]


@router.get(
    "/sweeps/{sweep_id}",
    response_model=SweepDetail,
    summary="A sweep's runs and one summary row per run (final error, time to target, ...)",
)
def get_sweep(sweep_id: int, ctx: Context = Depends(get_ctx)) -> Any:
    with db.session(ctx.engine) as s:
        group = store_runs.get_group(s, sweep_id)
        # Compare groups (POST /api/runs with baseline) are served here too: same shape.
        if group is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"sweep {sweep_id} not found")
        sweep = store_runs.group_to_dict(group)
        runs = [sanitize(store_runs.run_to_dict(r)) for r in group.runs]
    rows = [summary_row(r) for r in runs]
    rows.sort(key=lambda r: (r["total_batch"], r["seed"], r["run_id"]))
    return {"sweep": sweep, "runs": runs, "baseline_id": sweep["baseline_id"], "summary": rows}


def summary_row(run: dict[str, Any]) -> dict[str, Any]:
    """One row of the sweep table (docs/api.md "Row") from a Run dict."""
    spec = run["spec"] or {}
    derived = run.get("derived") or {}
    summary = run.get("summary") or {}
    workers = int(spec.get("workers", 1))
    n = int(spec.get("batch_per_worker", 0))
    peak_lr = derived.get("peak_lr")
    if peak_lr is None:  # a stored spec that no longer validates: best effort
        try:
            peak_lr = RunSpec.model_validate(spec).peak_lr
        except ValueError:
            peak_lr = float(spec.get("base_lr", 0.0))
    row: dict[str, Any] = {
        "run_id": run["id"],
        "total_batch": derived.get("total_batch", workers * n),
        "workers": workers,
        "batch_per_worker": n,
        "seed": int(spec.get("seed", 0)),
        "peak_lr": peak_lr,
        "status": run["status"],
        "is_baseline": bool(run.get("is_baseline")),
    }
    row.update({k: summary.get(k) for k in SUMMARY_KEYS})
    return row
