"""Series overviews: a finished run's every series downsampled once and stored
(store.models.SeriesOverview), so its usual views never read the points. While a run
trains, its writer keeps the same rows up to date (store.metrics.live); the finished
run's overview replaces them."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from core.status import FINAL_STATUSES
from store.metrics.downsample import downsample_indices
from store.metrics.queries import fetch_after, run_keys, run_state
from store.metrics.rows import COLUMN_DTYPES

# Points kept per series: views asking for at most half of it (a compare view asks for
# ~1500) are drawn from the overview, which MinMaxLTTB made min/max-preserving.
OVERVIEW_POINTS = 8192


def pack(view: Mapping[str, np.ndarray]) -> bytes:
    return b"".join(
        np.ascontiguousarray(view[name], dtype="<" + dtype).tobytes()
        for name, dtype in COLUMN_DTYPES.items()
    )


def unpack(data: bytes) -> dict[str, np.ndarray]:
    n = len(data) // (8 * len(COLUMN_DTYPES))
    return {
        name: np.frombuffer(data, dtype="<" + dtype, count=n, offset=8 * n * i).astype(dtype)
        for i, (name, dtype) in enumerate(COLUMN_DTYPES.items())
    }


def build_overviews(engine: Engine, run_id: int) -> int:
    """Store the run's every series downsampled to OVERVIEW_POINTS; returns how many.

    Called when a run finishes (the worker) and for finished runs still lacking them (the
    API's maintenance loop). Reads the points directly, not through the cache, so a
    worker process does not keep a finished run's series in memory.
    """
    with engine.connect() as conn:
        state = run_state(conn, run_id)
        if state is None:
            return 0
        token, _ = state
        rows = []
        for key in run_keys(conn, run_id):
            view = fetch_after(conn, run_id, key, -1)
            idx = downsample_indices(view["step"], view["value"], OVERVIEW_POINTS, x_sorted=True)
            small = {name: col[idx] for name, col in view.items()}
            rows.append(
                {"r": run_id, "k": key, "a": token, "t": len(view["step"]), "d": pack(small)}
            )
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM series_overviews WHERE run_id = :r"), {"r": run_id})
        if rows:
            conn.execute(
                sa.text(
                    "INSERT INTO series_overviews (run_id, key, attempts, total, data) "
                    "VALUES (:r, :k, :a, :t, :d)"
                ),
                rows,
            )
    return len(rows)


def runs_missing_overviews(engine: Engine, limit: int = 5) -> list[int]:
    """Finished runs with points but no overview (older runs, a worker that died after
    finishing), oldest first."""
    q = sa.text(
        "SELECT id FROM runs WHERE status IN ("
        + ", ".join(f"'{s}'" for s in FINAL_STATUSES)
        + ") AND NOT EXISTS (SELECT 1 FROM series_overviews o WHERE o.run_id = runs.id)"
        " AND EXISTS (SELECT 1 FROM metric_points m WHERE m.run_id = runs.id)"
        " ORDER BY id LIMIT :n"
    )
    with engine.connect() as conn:
        return [int(r[0]) for r in conn.execute(q, {"n": limit})]


def read_overviews(
    conn: sa.Connection, run_id: int, keys: list[str], token: int
) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    """key -> (overview columns, points in the series) of the keys stored for ``token``."""
    if not keys:
        return {}
    q = sa.text(
        "SELECT key, total, data FROM series_overviews "
        "WHERE run_id = :r AND attempts = :a AND key IN :keys"
    ).bindparams(sa.bindparam("keys", expanding=True))
    rows = conn.execute(q, {"r": run_id, "a": token, "keys": keys})
    return {key: (unpack(bytes(data)), int(total)) for key, total, data in rows}
