"""The stored inputs of a sweep's advice (``trainer.advice``): its runs' measured points
of one metric (``noise_scale``), all of them, not a downsampled overview: the median and
quartiles are taken over every measurement of the last half."""

from __future__ import annotations

import math
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.orm import Session

from store.models import MetricPoint

NOISE_KEY = "noise_scale"
# Logged at every iteration: its last step is how far a run has trained.
PROGRESS_KEY = "loss"


def points_of(
    s: Session, run_ids: Iterable[int], key: str = NOISE_KEY
) -> dict[int, tuple[list[int], list[float]]]:
    """run id -> (steps, values) of ``key``, in step order; runs without a point are
    absent. A NULL value (SQLite's NaN) reads as NaN."""
    ids = sorted(set(run_ids))
    if not ids:
        return {}
    rows = s.execute(
        sa.select(MetricPoint.run_id, MetricPoint.step, MetricPoint.value)
        .where(MetricPoint.run_id.in_(ids), MetricPoint.key == key)
        .order_by(MetricPoint.run_id, MetricPoint.step)
    )
    out: dict[int, tuple[list[int], list[float]]] = {}
    for run_id, step, value in rows:
        steps, values = out.setdefault(int(run_id), ([], []))
        steps.append(int(step))
        values.append(math.nan if value is None else float(value))
    return out


def last_steps(s: Session, run_ids: Iterable[int]) -> dict[int, int]:
    """run id -> the last iteration it logged (its ``loss`` key; one index seek per run)."""
    ids = sorted(set(run_ids))
    if not ids:
        return {}
    rows = s.execute(
        sa.select(MetricPoint.run_id, sa.func.max(MetricPoint.step))
        .where(MetricPoint.run_id.in_(ids), MetricPoint.key == PROGRESS_KEY)
        .group_by(MetricPoint.run_id)
    )
    return {int(run_id): int(step) for run_id, step in rows if step is not None}


def noise_inputs(
    s: Session, run_ids: Iterable[int]
) -> tuple[dict[int, tuple[list[int], list[float]]], dict[int, int]]:
    """What ``trainer.advice.critical_batch`` takes for these (baseline) runs."""
    ids = list(run_ids)
    return points_of(s, ids), last_steps(s, ids)
