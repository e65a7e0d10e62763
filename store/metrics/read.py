"""Reading points: downsampled series for plots (``read_series``), the points after per-key
cursors for the live stream (``read_since``). Non-finite values are stored as they are (SQLite
turns NaN into NULL, read back as NaN) and come out as ``None``, ready for JSON."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
SERIES_COLUMNS = (*X_COLUMNS, "value")


@dataclass(frozen=True)
class Compact:
    """A smaller answer for a plot that needs less than every column in full.

    ``columns``: only these of ``SERIES_COLUMNS`` (all when empty). ``digits``: floats
    rounded to this many significant digits (6 is far below a pixel on any screen; the
    hover labels show 4). ``drop_flat``: keys drawn as plain lines, whose points inside
    a stretch of equal values are left out (the same line; never for markers, nor for
    a curve that is smoothed point by point).
    """

    columns: tuple[str, ...] = ()
    digits: int | None = None
    drop_flat: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        bad = [c for c in self.columns if c not in SERIES_COLUMNS]
        if bad:
            raise ValueError(f"columns: must be among {SERIES_COLUMNS}, got {bad}")
        if self.digits is not None and not 1 <= self.digits <= 17:
            raise ValueError(f"digits: between 1 and 17, got {self.digits}")


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
    compact: Compact | None = None,
) -> dict[str, dict[str, Any]]:
    """Downsampled series of ``keys`` (all keys when None), as JSON-ready lists.

    ``x`` (step | epoch | wall_time) is the column ``x_min``/``x_max`` filter on
    (inclusive) and the axis MinMaxLTTB buckets along. ``total`` counts the points in
    the range before downsampling. Keys without points give empty lists. ``compact``
    trims the answer for a plot (see ``Compact``); None gives every column in full.
    """
    if x not in X_COLUMNS:
        raise ValueError(f"x: must be one of {X_COLUMNS}, got {x!r}")
    compact = compact or Compact()
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
                    **_downsample_view(view, x, sorted_x, max_points, None, None, compact, key),
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
        (key, _downsample_view(view, x, x_sorted, max_points, x_min, x_max, compact, key))
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
    compact: Compact,
    key: str,
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
    if key in compact.drop_flat:
        idx = idx[_bends(view["value"][idx])]
    out: dict[str, Any] = {}
    for name in compact.columns or SERIES_COLUMNS:
        col = view[name][idx]
        if name == "step":
            out[name] = col.tolist()
        else:
            out[name] = _json_floats(_round_sig(col, compact.digits))
    out["total"] = total
    return out


def _bends(values: np.ndarray) -> np.ndarray:
    """Mask of the points a line needs: the ends and every point that is not inside a
    stretch of equal values (a step schedule's 1,500 points become a dozen)."""
    keep = np.ones(len(values), dtype=bool)
    if len(values) > 2:
        flat = values[1:-1] == values[:-2]
        flat &= values[1:-1] == values[2:]
        keep[1:-1] = ~flat
    return keep


def _round_sig(values: np.ndarray, digits: int | None) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits (non-finite ones unchanged;
    None: as they are): shorter decimals halve the JSON and the time to write it."""
    if digits is None:
        return values
    finite = np.isfinite(values) & (values != 0)
    out = values.copy()
    v = values[finite]
    scale = 10.0 ** (digits - 1 - np.floor(np.log10(np.abs(v))))
    out[finite] = np.round(v * scale) / scale
    return out


def keys(engine: Engine, run_id: int, prefix: str = "") -> list[str]:
    """The metric keys a run has points for, sorted; only those starting with ``prefix``.

    The distinct keys come from a loose index scan (one primary-key seek per key, never a
    read of the points); the prefix is applied here rather than as a key range, because
    under a PostgreSQL locale collation the keys sharing a prefix need not be contiguous.
    """
    with engine.connect() as conn:
        return [k for k in run_keys(conn, run_id) if k.startswith(prefix)]


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
