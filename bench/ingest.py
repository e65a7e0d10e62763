"""Metric ingest: points per second through store.metrics.MetricWriter.

The real sink path: one ``add()`` per training iteration carrying 8 keys (as the
trainer logs them), background flushes, ``close()`` at the end; the clock stops once
every point is committed ("add() points/s" is the training loop's side alone). Each
backend gets a fresh database. The reference is the naive way: one ORM object and one
commit per point.

    .venv/bin/python bench/ingest.py --points 1000000 --compare-fk
    .venv/bin/python bench/ingest.py --points 200000 --backends sqlite

PostgreSQL: ``--pg`` (default ``postgresql://postgres@127.0.0.1:5432``, or
``$BATCHLAB_BENCH_PG``) names a server where a scratch database may be created.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from core.settings import normalize_database_url  # noqa: E402
from store import runs  # noqa: E402
from store.db import dispose_engines, get_engine, migrate, session  # noqa: E402
from store.metrics import MetricWriter, postgres  # noqa: E402
from store.metrics.rows import COLUMNS, ON_CONFLICT, Row  # noqa: E402
from store.models import MetricPoint  # noqa: E402

KEYS = ("loss", "train_err", "lr", "samples", "grad_norm", "step_time", "data_time", "mem")
PG_DEFAULT = os.environ.get("BATCHLAB_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


@contextmanager
def temp_database(backend: str, pg_server: str = PG_DEFAULT) -> Iterator[Engine]:
    """A migrated, empty database of ``backend`` that is removed afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            engine = get_engine(f"sqlite:///{tmp}/bench.db")
            migrate(engine)
            try:
                yield engine
            finally:
                dispose_engines()
        return
    server = normalize_database_url(pg_server).rstrip("/")
    name = f"batchlab_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        engine = get_engine(f"{server}/{name}")
        migrate(engine)
        yield engine
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


# PostgreSQL write paths measured against the one in use ("copy": COPY + optimistic INSERT).
def _copy_upsert(engine: Engine, run_id: int, rows: list[Row]) -> None:
    """COPY, then always ON CONFLICT (no optimistic plain INSERT)."""
    with postgres.locked_run(engine, run_id) as (_, cur):
        postgres.stage(cur, rows)
        cur.execute(postgres.MERGE_STAGED)


_UPSERT = f"INSERT INTO metric_points ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) {ON_CONFLICT}"


def _executemany(engine: Engine, run_id: int, rows: list[Row]) -> None:
    """Upserts by executemany, which psycopg 3 runs in pipeline mode."""
    with postgres.locked_run(engine, run_id) as (_, cur):
        cur.executemany(_UPSERT, rows)


PG_VARIANTS: dict[str, Callable[[Engine, int, list[Row]], None]] = {
    "copy_upsert": _copy_upsert,
    "executemany": _executemany,
}


class VariantWriter(MetricWriter):
    """The production writer with its batches written by one of PG_VARIANTS instead."""

    def __init__(self, engine: Engine, run_id: int, method: str) -> None:
        self._variant = PG_VARIANTS[method]
        super().__init__(engine, run_id)

    def _write_rows(self, rows: list[Row]) -> None:
        self._variant(self.engine, self.run_id, rows)


def new_run(engine: Engine) -> int:
    with session(engine) as s:
        return runs.create_run(s, name="bench", spec={}).id


def writer_rate(engine: Engine, points: int, method: str = "copy") -> tuple[float, float]:
    """(points/s until all committed, points/s of the add() calls alone); ``method``
    "copy" is the production writer, else one of PG_VARIANTS."""
    run_id = new_run(engine)
    iters = points // len(KEYS)
    t0 = time.perf_counter()
    if method == "copy":
        writer = MetricWriter(engine, run_id)
    else:
        writer = VariantWriter(engine, run_id, method)
    for it in range(iters):
        # Values computed per iteration like a training loop hands them over.
        writer.add(
            it,
            {k: (it % 997) * 0.001 + j for j, k in enumerate(KEYS)},
            epoch=it / 1000,
            wall_time=it * 0.01,
        )
    t_added = time.perf_counter()
    writer.close()
    t_done = time.perf_counter()
    n = iters * len(KEYS)
    with engine.connect() as conn:
        stored = conn.execute(
            sa.select(sa.func.count()).where(MetricPoint.run_id == run_id)
        ).scalar()
    assert stored == n, f"{stored} of {n} points stored"
    return n / (t_done - t0), n / (t_added - t0)


def naive_rate(engine: Engine, points: int) -> float:
    """One ORM object and one commit per point."""
    run_id = new_run(engine)
    t0 = time.perf_counter()
    for i in range(points):
        with session(engine) as s:
            s.add(
                MetricPoint(
                    run_id=run_id,
                    key=KEYS[i % len(KEYS)],
                    step=i // len(KEYS),
                    epoch=i / 8000,
                    wall_time=i * 0.01,
                    value=float(i),
                )  # fmt: skip
            )
    return points / (time.perf_counter() - t0)


def repeat(fn: Callable[[], tuple[float, float]], repeats: int) -> tuple[float, float, float]:
    """(best committed rate, median committed rate, median add() rate)."""
    results = [fn() for _ in range(repeats)]
    committed = [r[0] for r in results]
    return max(committed), statistics.median(committed), statistics.median(r[1] for r in results)


def add_run_foreign_key(engine: Engine) -> None:
    """What the schema deliberately leaves out (store.models.MetricPoint), to measure it."""
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "ALTER TABLE metric_points ADD CONSTRAINT bench_fk FOREIGN KEY (run_id) "
            "REFERENCES runs (id) ON DELETE CASCADE"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=1_000_000, help="points per writer run")
    p.add_argument("--naive-points", type=int, default=5_000, help="points for the ORM row")
    p.add_argument("--repeats", type=int, default=3, help="writer runs per row")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL server URL (no database)")
    p.add_argument(
        "--compare-fk", action="store_true", help="PostgreSQL: also measure with a run_id FK"
    )
    args = p.parse_args()

    rows = []
    for backend in args.backends.split(","):
        pg = backend == "postgresql"
        methods = ["copy", *PG_VARIANTS] if pg else ["copy"]
        with temp_database(backend, args.pg) as engine:
            naive = naive_rate(engine, args.naive_points)
            for method in methods:
                best, median, add_only = repeat(
                    lambda m=method, e=engine: writer_rate(e, args.points, m), args.repeats
                )
                path = method if pg else "executemany"
                rows.append((backend, f"MetricWriter ({path})", best, median, add_only, naive))
            if pg and args.compare_fk:
                add_run_foreign_key(engine)
                best, median, add_only = repeat(
                    lambda e=engine: writer_rate(e, args.points, "copy"), args.repeats
                )
                rows.append(
                    (backend, "MetricWriter (copy) + run_id FK", best, median, add_only, naive)
                )
            rows.append((backend, "ORM, commit per point", naive, naive, None, naive))

    print(f"\n{args.points:,} points per writer run, {len(KEYS)} keys per add(), "
          f"{args.repeats} runs each; naive ORM: {args.naive_points:,} points\n")  # fmt: skip
    print("| backend | path | best points/s | median points/s | add() points/s | vs naive |")
    print("|---|---|---:|---:|---:|---:|")
    for backend, path, best, median, add_only, naive in rows:
        add_txt = f"{add_only:,.0f}" if add_only else "-"
        print(f"| {backend} | {path} | {best:,.0f} | {median:,.0f} | {add_txt} | "
              f"{median / naive:,.0f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
