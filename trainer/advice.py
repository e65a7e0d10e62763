"""What a sweep advises: the baseline's critical batch (its gradient noise scale), the
measured knee, and the ladder of batch sizes an ``"auto"`` sweep queues around it.

Pure and torch-free (numbers in, numbers out): the API builds ``GET /api/sweeps/{id}``'s
``advice`` from it (server/routes_sweeps.py), and ``worker.auto_sweep`` plans an auto
sweep's ladder with ``ladder``. The inputs are read by ``store.advice``.

The rules (docs/api.md repeats them):
- critical batch: the baseline runs' ``noise_scale`` (B_simple, McCandlish et al. 2018)
  over the last half of each run's training by step (points with ``2 * step >=`` the last
  iteration the run trained, its last ``loss`` step; while it trains, the last half so
  far), pooled over the baseline's seeds; median and quartiles (numpy's linear
  interpolation). Non-finite values are left out. The trainer stores no ``noise_scale``
  while either EMA'd estimate is not positive, so a run may have none there: null.
- knee: the smallest kn above the baseline's whose finished seeds (succeeded or diverged)
  put it past ``baseline_mean + max(2 * baseline_std, KNEE_MIN_MARGIN)`` in final
  ``val_err`` (each run's summary ``final_val_err``, the sweep table's column). A kn with a
  diverged seed is past the knee; otherwise its mean over its succeeded seeds is compared.
  ``baseline_std`` is the sample standard deviation over the baseline's succeeded seeds
  (0 with one seed, where the fixed margin alone applies).
- ladder: powers of two ``2**(round(log2 B) + j)`` for ``j`` in -3..3 (B/8 to 8B around the
  critical batch B), kept between ``LADDER_MIN_BATCH`` and the training set's size, plus
  the baseline's kn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from core.status import FINAL_STATUSES, RunStatus

# An error rise smaller than this (1 percentage point) is not a knee, however tight the
# baseline's seeds agree: with one seed there is no spread at all, and two or three seeds
# can agree to 0.1 point by chance.
KNEE_MIN_MARGIN = 0.01
# The ladder spans LADDER_SPAN octaves either side of the critical batch (B/8 .. 8B).
LADDER_SPAN = 3
# Fewer samples than this per minibatch make BN's batch statistics mostly noise.
LADDER_MIN_BATCH = 8

FINISHED = (RunStatus.SUCCEEDED, RunStatus.DIVERGED)


@dataclass(frozen=True)
class CriticalBatch:
    median: float
    q25: float
    q75: float
    points: int
    run_ids: list[int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Knee:
    batch_size: int | None
    baseline_mean: float
    baseline_std: float
    threshold: float
    rule: str
    metric: str = "val_err"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    """One run of a sweep as the knee sees it (a row of the sweep's summary table)."""

    total_batch: int
    status: str
    is_baseline: bool
    final_val_err: float | None


def last_half(
    steps: Sequence[int], values: Sequence[float | None], last_step: int | None = None
) -> list[float]:
    """The finite values measured in the last half of a run's training, by step:
    ``2 * step >= last_step``, the last iteration it trained (a run still training: the
    last half so far; default: the last measured step)."""
    if not steps:
        return []
    last = max(steps) if last_step is None else last_step
    return [
        float(v)
        for step, v in zip(steps, values, strict=True)
        if 2 * step >= last and v is not None and math.isfinite(v)
    ]


def critical_batch(
    series: Mapping[int, tuple[Sequence[int], Sequence[float | None]]],
    last_steps: Mapping[int, int] | None = None,
) -> CriticalBatch | None:
    """Median and quartiles of the baseline runs' noise scale (``series``: run id ->
    (steps, values)), each run's last half of training (``last_steps``: run id -> the last
    iteration it trained) pooled; None when no run has a value there (yet)."""
    pooled: list[float] = []
    run_ids: list[int] = []
    for run_id, (steps, values) in sorted(series.items()):
        kept = last_half(steps, values, (last_steps or {}).get(run_id))
        if kept:
            pooled.extend(kept)
            run_ids.append(run_id)
    if not pooled:
        return None
    q25, median, q75 = (float(q) for q in np.percentile(pooled, [25, 50, 75]))
    return CriticalBatch(median, q25, q75, len(pooled), run_ids)


def knee(outcomes: Iterable[Outcome], *, min_margin: float = KNEE_MIN_MARGIN) -> Knee | None:
    """The smallest kn past the baseline's error (the module's rule); None while a
    baseline run is still active or none succeeded with a final error. ``batch_size`` is
    None when no finished kn is past it (yet)."""
    rows = list(outcomes)
    bases = [r for r in rows if r.is_baseline]
    if not bases or any(r.status not in FINAL_STATUSES for r in bases):
        return None
    errs = _errors(r for r in bases if r.status == RunStatus.SUCCEEDED)
    if not errs:
        return None
    mean = float(np.mean(errs))
    std = float(np.std(errs, ddof=1)) if len(errs) > 1 else 0.0
    threshold = mean + max(2 * std, min_margin)
    base_kn = min(r.total_batch for r in bases)
    past = [
        kn
        for kn, runs in _by_batch(r for r in rows if not r.is_baseline and r.total_batch > base_kn)
        if _is_past(runs, threshold)
    ]
    spread = (
        f"std over {len(errs)} baseline seeds"
        if len(errs) > 1
        else "one baseline seed: no std, the fixed margin applies"
    )
    rule = (
        f"smallest kn above the baseline's {base_kn} whose mean final val_err over its "
        f"finished seeds exceeds baseline mean + max(2 std, {min_margin:g}) ({spread}); "
        "a diverged seed puts its kn past the knee"
    )
    return Knee(min(past) if past else None, mean, std, threshold, rule)


def _by_batch(rows: Iterable[Outcome]) -> list[tuple[int, list[Outcome]]]:
    out: dict[int, list[Outcome]] = {}
    for r in rows:
        if r.status in FINISHED:
            out.setdefault(r.total_batch, []).append(r)
    return sorted(out.items())


def _is_past(runs: list[Outcome], threshold: float) -> bool:
    if any(r.status == RunStatus.DIVERGED for r in runs):
        return True
    errs = _errors(runs)
    return bool(errs) and float(np.mean(errs)) > threshold


def _errors(rows: Iterable[Outcome]) -> list[float]:
    return [
        float(r.final_val_err)
        for r in rows
        if r.final_val_err is not None and math.isfinite(r.final_val_err)
    ]


def ladder(
    b_simple: float,
    baseline_kn: int,
    *,
    max_batch: int | None = None,
    span: int = LADDER_SPAN,
    min_batch: int = LADDER_MIN_BATCH,
) -> list[int]:
    """Powers of two from about B/8 to 8B around the critical batch ``b_simple`` (centred
    on the power of two nearest it), kept in [min_batch, max_batch] (max_batch: the
    training set's size), plus ``baseline_kn``; sorted."""
    if not math.isfinite(b_simple) or b_simple <= 0:
        raise ValueError(f"b_simple: must be a positive number, got {b_simple!r}")
    centre = round(math.log2(b_simple))
    sizes = {2 ** (centre + j) for j in range(-span, span + 1) if centre + j >= 0}
    sizes = {kn for kn in sizes if kn >= min_batch and (max_batch is None or kn <= max_batch)}
    return sorted(sizes | {int(baseline_kn)})
