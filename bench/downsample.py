"""Series reads: one long metric series served downsampled to 2,000 points.

Times ``store.metrics.read_series`` in-process (the server's share of a
``GET /api/runs/{id}/metrics`` request, without HTTP and JSON encoding):

- cold, running run (live overview): nothing cached; the overview the writer kept while
  the points arrived (store.metrics.live) plus the points after it answer;
- cold: the process has nothing cached and there is no overview (a run written before
  the live overviews), so the whole series comes from the database;
- warm: the series is cached, only the (empty) tail beyond it is asked for;
- warm + tail: 1,000 new points were written since the last read;
- warm, epoch range: ``x=epoch`` with ``x_min``/``x_max`` covering half the series;
- MinMaxLTTB only: ``store.metrics.downsample.downsample_indices`` on the in-memory arrays;
- cold, finished run: nothing cached, the run finished, so its stored overview (the
  series downsampled once to 8,192 points when it finished) answers.

    .venv/bin/python bench/downsample.py --points 1000000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from bench.ingest import PG_DEFAULT, new_run, temp_database  # noqa: E402
from store import metrics, runs  # noqa: E402
from store.db import session  # noqa: E402
from store.metrics import MetricWriter, read_series  # noqa: E402
from store.metrics.downsample import downsample_indices  # noqa: E402

ITERS_PER_EPOCH = 1000


def loss_curve(n: int, seed: int = 0) -> np.ndarray:
    """A noisy decaying loss with spikes, like a large-batch run without warmup."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = 2.3 * np.exp(-t / (n / 5)) + 0.1 + 0.05 * rng.standard_normal(n)
    loss[rng.integers(0, n, 20)] += 3.0
    return loss


def write_series(engine: Engine, run_id: int, values: np.ndarray, start: int = 0) -> None:
    with MetricWriter(engine, run_id, max_pending=20_000) as w:
        for i, v in enumerate(values.tolist(), start=start):
            w.add(i, {"loss": v}, epoch=i / ITERS_PER_EPOCH, wall_time=i * 0.01)


def median_ms(
    fn: Callable[[], object], repeats: int, before: Callable[[], None] | None = None
) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench_backend(backend: str, points: int, max_points: int, repeats: int, pg: str) -> list:
    rows = []
    with temp_database(backend, pg) as engine:
        run_id = new_run(engine)
        values = loss_curve(points)
        write_series(engine, run_id, values)

        def read() -> dict:
            return read_series(engine, run_id, ["loss"], max_points=max_points)

        out = read()["loss"]
        assert out["total"] == points and len(out["step"]) <= max_points
        assert out["step"][-1] == points - 1 and max(out["value"]) == float(values.max())

        live = median_ms(read, repeats, before=metrics.invalidate)
        with engine.begin() as conn:  # the points path from here on, as before them
            conn.exec_driver_sql("DELETE FROM series_overviews")
        cold = median_ms(read, max(3, repeats // 3), before=metrics.invalidate)
        read()
        warm = median_ms(read, repeats)
        tails = []
        for k in range(3):
            write_series(engine, run_id, loss_curve(1000, k + 1), start=points + 1000 * k)
            tails.append(median_ms(read, 1))
        half = points / ITERS_PER_EPOCH / 2
        ranged = median_ms(
            lambda: read_series(
                engine,
                run_id,
                ["loss"],
                x="epoch",
                x_min=half / 2,
                x_max=half * 1.5,
                max_points=max_points,
            ),  # fmt: skip
            repeats,
        )
        x = np.arange(points, dtype=np.int64)
        only = median_ms(lambda: downsample_indices(x, values, max_points), repeats)
        with session(engine) as s:
            runs.mark_running(s, run_id, host="bench", gpus="", worker="bench")
            runs.mark_finished(s, run_id, "succeeded")
        t0 = time.perf_counter()
        metrics.build_overviews(engine, run_id)
        build_ms = (time.perf_counter() - t0) * 1000
        finished = read()["loss"]
        assert finished["total"] == points + 3000 and finished["step"][-1] == points + 2999
        overview = median_ms(read, max(3, repeats // 3), before=metrics.invalidate)
        rows += [
            (backend, "cold, running run (live overview + newer points)", live),
            (backend, "cold, no overview (fetch all + downsample)", cold),
            (backend, "warm (cached)", warm),
            (backend, "warm + 1,000 new points", statistics.median(tails)),
            (backend, "warm, x=epoch, half the range", ranged),
            (backend, "MinMaxLTTB only (numpy in memory)", only),
            (backend, "cold, finished run (stored overview)", overview),
            (backend, "building the overview when the run finishes (once)", build_ms),
        ]
    metrics.invalidate()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=1_000_000, help="points in the series")
    p.add_argument("--max-points", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL server URL (no database)")
    args = p.parse_args()
    rows = []
    for backend in args.backends.split(","):
        rows += bench_backend(backend, args.points, args.max_points, args.repeats, args.pg)
    print(f"\none series of {args.points:,} points -> {args.max_points:,} points, "
          f"median ms of read_series()\n")  # fmt: skip
    print("| backend | read | ms |")
    print("|---|---|---:|")
    for backend, what, ms in rows:
        print(f"| {backend} | {what} | {ms:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
