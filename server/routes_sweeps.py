"""Sweeps: one run per (batch size, seed) against the kn = ref_batch baseline."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from server import submit
from server.auth import TokenFirstRoute, require_token
from server.deps import CtxDep, SweepIdPath
from server.schemas import (
    GroupOut,
    PlanOut,
    SummaryRow,
    SweepAdvice,
    SweepCreate,
    SweepCreated,
    SweepDetail,
    runs_out,
)
from store import advice as store_advice
from store import db
from store import runs as store_runs
from trainer import advice

router = APIRouter(prefix="/api", tags=["sweeps"], route_class=TokenFirstRoute)


@router.post(
    "/sweeps",
    status_code=status.HTTP_201_CREATED,
    response_model=SweepCreated,
    dependencies=[Depends(require_token)],
    summary="Queue one run per (batch size, seed), plus the kn = ref_batch baseline",
    responses={503: {"description": "The task queue (broker) is unreachable; nothing stored."}},
)
def create_sweep(body: SweepCreate, ctx: CtxDep) -> Any:
    plan = body.plan()
    if plan.errors:
        raise RequestValidationError(PlanOut.of(plan).errors)  # the preview's errors
    group, runs = submit.submit(ctx, plan)
    return SweepCreated(sweep=group, runs=runs)


@router.get("/sweeps", response_model=list[GroupOut], summary="Sweeps, newest first")
def list_sweeps(
    ctx: CtxDep,
    kind: Literal["sweep", "compare", "all"] = Query(
        "sweep", description="compare: the groups of POST /api/runs with baseline."
    ),
) -> Any:
    with db.session(ctx.engine) as s:
        groups = store_runs.list_groups(s)
        return [GroupOut.model_validate(g) for g in groups if kind in ("all", g.kind)]


@router.get(
    "/sweeps/{sweep_id}",
    response_model=SweepDetail,
    summary="A sweep's runs and one summary row per run (final error, time to target, ...)",
)
def get_sweep(sweep_id: SweepIdPath, ctx: CtxDep) -> Any:
    with db.session(ctx.engine) as s:
        group = store_runs.get_group(s, sweep_id)
        # Compare groups (POST /api/runs with baseline) are served here too: same shape.
        if group is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"sweep {sweep_id} not found")
        sweep = GroupOut.model_validate(group)
        runs = runs_out(s, group.runs)
        noise = store_advice.noise_inputs(s, [r.id for r in runs if r.is_baseline])
    rows = sorted(map(SummaryRow.of, runs), key=lambda r: (r.total_batch, r.seed, r.run_id))
    return SweepDetail(
        sweep=sweep,
        runs=runs,
        baseline_id=sweep.baseline_id,
        summary=rows,
        advice=sweep_advice(noise, rows),
    )


def sweep_advice(
    noise: tuple[dict[int, tuple[list[int], list[float]]], dict[int, int]],
    rows: list[SummaryRow],
) -> SweepAdvice | None:
    """The critical batch from the baseline runs' noise_scale points (and how far each
    trained) and the knee from the summary rows (the table's final_val_err), by
    ``trainer.advice``'s rules."""
    critical = advice.critical_batch(*noise)
    knee = advice.knee(
        advice.Outcome(r.total_batch, r.status, r.is_baseline, r.final_val_err) for r in rows
    )
    if critical is None and knee is None:
        return None
    return SweepAdvice.model_validate(
        {
            "critical_batch": None if critical is None else critical.to_dict(),
            "knee": None if knee is None else knee.to_dict(),
        }
    )
