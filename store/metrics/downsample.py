"""Pick at most ``max_points`` indices of a series so its plot keeps its shape.

MinMaxLTTB (tsdownsample) keeps each bucket's extremes, so a loss spike or an error dip
survives the reduction. Non-finite values (a diverging run's NaN/inf) cannot take part
in it: the finite points are downsampled and the first point of every non-finite
stretch is kept beside them (up to a small budget), so the plot shows where it broke.
The first and last points are always kept.
"""

from __future__ import annotations

import numpy as np
from tsdownsample import MinMaxLTTBDownsampler

MIN_POINTS = 2
_downsampler = MinMaxLTTBDownsampler()


def downsample_indices(
    x: np.ndarray, y: np.ndarray, max_points: int, *, x_sorted: bool = True
) -> np.ndarray:
    """Sorted int64 indices into ``x``/``y``, at most ``max_points`` of them.

    ``x`` must be non-decreasing for MinMaxLTTB's buckets; pass ``x_sorted=False`` when
    it may not be (the point positions are used instead).
    """
    if max_points < MIN_POINTS:
        raise ValueError(f"max_points: at least {MIN_POINTS}, got {max_points}")
    n = len(y)
    if n <= max_points:
        return np.arange(n, dtype=np.int64)
    finite = np.isfinite(y)
    if finite.all():
        picked = _minmax_lttb(x if x_sorted else None, y, max_points - 2)
        return np.union1d(picked, [0, n - 1]).astype(np.int64)

    # Starts of non-finite stretches: where a finite (or nothing) precedes a non-finite.
    bad_starts = np.flatnonzero(~finite & np.concatenate(([True], finite[:-1])))
    bad_starts = bad_starts[: min((max_points - 2) // 2, max(1, max_points // 10))]
    budget = max_points - 2 - len(bad_starts)
    good = np.flatnonzero(finite)
    if len(good) > budget:
        xs = np.ascontiguousarray(x[good]) if x_sorted else None
        good = good[_minmax_lttb(xs, np.ascontiguousarray(y[good]), budget)]
    return np.union1d(np.union1d(good, bad_starts), [0, n - 1]).astype(np.int64)


def _minmax_lttb(x: np.ndarray | None, y: np.ndarray, n_out: int) -> np.ndarray:
    if len(y) <= n_out:
        return np.arange(len(y), dtype=np.int64)
    if n_out < 3:
        # Below MinMaxLTTB's minimum: the extremes are what a tiny budget should show.
        return np.array([int(np.argmin(y)), int(np.argmax(y))][:n_out], dtype=np.int64)
    args = (y,) if x is None else (x, y)
    return _downsampler.downsample(*args, n_out=n_out).astype(np.int64)
