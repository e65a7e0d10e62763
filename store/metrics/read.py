"""Reading points: downsampled series for plots (``read_series``), the points after per-key
cursors for the live stream (``read_since``). Non-finite values are stored as they are (SQLite
turns NaN into NULL, read back as NaN) and come out as ``None``, ready for JSON."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core.jsonsafe import finite_or_none
from store.metrics import cache
from store.metrics.downsample import downsample_indices
from store.metrics.overview import OVERVIEW_POINTS, read_overviews
from store.metrics.queries import fetch_after, run_keys, run_state

X_COLUMNS = ("step", "epoch", "wall_time")


def _json_floats(values: np.ndarray) -> list[float | None]:
    out = values.tolist()
    if not np.isfinite(values).all():
        out = [v if math.isfinite(v) else None for v in out]
    return out


def _empty_series() -> dict[str, Any]:
    return {"step": [], "epoch": [], "wall_time": [], "value": [], "total": 0}


def read_series(
    engine: Engine,
    run_id: int,
    keys: Iterable[str] | None,
    *,
    x: str = "step",
    max_points: int = 2000,
    x_min: float | None = None,
    x_max: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Downsampled series of ``keys`` (all keys when None), as JSON-ready lists.

    ``x`` (step | epoch | wall_time) is the column ``x_min``/``x_max`` filter on
    (inclusive) and the axis MinMaxLTTB buckets along. ``total`` counts the points in
    the range before downsampling. Keys without points give empty lists.
    """
    if x not in X_COLUMNS:
        raise ValueError(f"x: must be one of {X_COLUMNS}, got {x!r}")
    if isinstance(keys, str):
        keys = [keys]
    with engine.connect() as conn:
        state = run_state(conn, run_id)
        if state is None:
            cache.invalidate(run_id)
            return {k: _empty_series() for k in keys or []}
        token, status = state
        wanted = list(keys) if keys is not None else run_keys(conn, run_id)
        out: dict[str, dict[str, Any]] = {}
        if x_min is None and x_max is None and max_points <= OVERVIEW_POINTS // 2:
            # A stored overview (a finished run's, or the live one its writer keeps) plus
            # the points after its last step: exact up to the newest point, whatever the
            # length of the series. Zoomed reads and cached series read the points.
            uncached = [k for k in wanted if not cache.is_cached(engine, run_id, k, token)]
            for key, (view, total) in read_overviews(conn, run_id, uncached, token).items():
                tail = fetch_after(conn, run_id, key, int(view["step"][-1]) if total else -1)
                if len(tail["step"]):
                    view = {name: np.concatenate((col, tail[name])) for name, col in view.items()}
                    total += len(tail["step"])
                sorted_x = bool(np.all(np.diff(view[x]) >= 0))
                out[key] = {
                    **_downsample_view(view, x, sorted_x, max_points, None, None),
                    "total": total,
                }
        views: dict[str, tuple[dict[str, np.ndarray], bool]] = {}
        for key in wanted:
            if key in out:
                continue
            series = cache.cached(engine, run_id, key, token)
            with series.lock:
                series.extend(fetch_after(conn, run_id, key, series.last_step))
                views[key] = (series.view(), series.sorted.get(x, True))
    cache.evict()
    out.update(
        (key, _downsample_view(view, x, x_sorted, max_points, x_min, x_max))
        for key, (view, x_sorted) in views.items()
    )
    return {key: out[key] for key in wanted}


def _downsample_view(
    view: dict[str, np.ndarray],
    x: str,
    x_sorted: bool,
    max_points: int,
    x_min: float | None,
    x_max: float | None,
) -> dict[str, Any]:
    xs = view[x]
    if x_min is not None or x_max is not None:
        if x_sorted:
            lo = 0 if x_min is None else int(np.searchsorted(xs, x_min, side="left"))
            hi = len(xs) if x_max is None else int(np.searchsorted(xs, x_max, side="right"))
            view = {name: col[lo:hi] for name, col in view.items()}
        else:
            mask = np.ones(len(xs), dtype=bool)
            if x_min is not None:
                mask &= xs >= x_min
            if x_max is not None:
                mask &= xs <= x_max
            view = {name: col[mask] for name, col in view.items()}
    total = len(view["step"])
    idx = downsample_indices(view[x], view["value"], max_points, x_sorted=x_sorted)
    floats = {name: _json_floats(view[name][idx]) for name in ("epoch", "wall_time", "value")}
    return {"step": view["step"][idx].tolist(), **floats, "total": total}


def keys(engine: Engine, run_id: int) -> list[str]:
    """The metric keys a run has points for, sorted."""
    with engine.connect() as conn:
        return run_keys(conn, run_id)


def read_since(
    engine: Engine,
    run_id: int,
    cursors: Mapping[str, int],
    *,
    limit_per_key: int | None = None,
) -> list[dict[str, Any]]:
    """Points with ``step > cursors.get(key, -1)``, ordered by (step, key).

    Cursors are per key because an epoch-level key is logged after the iteration keys
    of the same step. ``limit_per_key`` caps a catch-up (the caller advances its cursors
    to the last step it got and asks again).
    """
    q = (
        "SELECT step, epoch, wall_time, value FROM metric_points "
        "WHERE run_id = :r AND key = :k AND step > :c ORDER BY step"
    )
    if limit_per_key is not None:
        q += f" LIMIT {int(limit_per_key)}"
    stmt = sa.text(q)
    points: list[dict[str, Any]] = []
    with engine.connect() as conn:
        for key in run_keys(conn, run_id):
            cursor = int(cursors.get(key, -1))
            for step, epoch, wall_time, value in conn.execute(
                stmt, {"r": run_id, "k": key, "c": cursor}
            ):
                points.append(
                    {
                        "key": key,
                        "step": step,
                        "epoch": finite_or_none(epoch),
                        "wall_time": finite_or_none(wall_time),
                        "value": finite_or_none(value),
                    }
                )
    points.sort(key=lambda p: (p["step"], p["key"]))
    return points
