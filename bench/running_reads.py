"""Reads of *running* runs: the points path against the live series overviews.

A running run has no finished-run overview, so before the live overviews
(``store.metrics.live``) its first read in an API process fetched every point. Each
figure is measured twice on the same database, side by side:

- before: the live overview rows deleted, so ``read_series`` takes the points path
  (fetch every point into the series cache, then MinMaxLTTB) -- what a running run cost
  before the writer kept overviews;
- after: the overviews the writer stored while the points arrived, plus the points
  written after the last one was stored (``--tail`` of them, about a second of a fast
  run's points, written behind the writer's back so they are not in the overview).

Rows: a cold read of one running run's ``--points``-point series to 2,000 points; the
compare view's read of ``--runs`` running runs of ``--run-points`` iterations each
(train_err and lr per iteration, val_err per epoch; keys train_err,lr, x=epoch,
1,500 points: what ``GET /api/metrics`` does, without HTTP); the writer's cost of
storing the overviews (how many stores, ms each). "Cold": the series cache is emptied
before each read, as in a freshly started API process. Medians of ``--repeats``.

``--ingest N``: instead, bench/ingest.py's writer run (N points, 8 keys per ``add()``)
with the live overviews switched off and on, alternately, ``--repeats`` times each on
the same database, so both see the same load.

    .venv/bin/python bench/running_reads.py
    .venv/bin/python bench/running_reads.py --backends sqlite --points 200000 --runs 5
    .venv/bin/python bench/running_reads.py --ingest 300000 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from bench.downsample import ITERS_PER_EPOCH, loss_curve  # noqa: E402
from bench.ingest import PG_DEFAULT, temp_database, writer_rate  # noqa: E402
from store import metrics, runs  # noqa: E402
from store.db import session  # noqa: E402
from store.metrics import MetricWriter, live, postgres, read_series, sqlite  # noqa: E402

PUBLISHES: list[float] = []


def _timed_publish() -> None:
    """Record how long each store of the live overviews takes (ms)."""
    original = live.LiveOverviews.publish

    def publish(self: live.LiveOverviews) -> int:
        t0 = time.perf_counter()
        n = original(self)
        if n:
            PUBLISHES.append((time.perf_counter() - t0) * 1000)
        return n

    live.LiveOverviews.publish = publish  # type: ignore[method-assign]


def running_run(engine: Engine, name: str = "bench") -> int:
    with session(engine) as s:
        run_id = runs.create_run(s, name=name, spec={}).id
        runs.mark_running(s, run_id, host="bench", gpus="", worker="bench")
    return run_id


def write_behind(engine: Engine, run_id: int, key: str, start: int, n: int) -> None:
    """``n`` points straight into the table: newer than the stored overview."""
    backend = postgres if engine.dialect.name == "postgresql" else sqlite
    rows = [(run_id, key, s, s / ITERS_PER_EPOCH, s * 0.01, 1.0) for s in range(start, start + n)]
    backend.write_rows(engine, run_id, rows)


def seed_compare(engine: Engine, n_runs: int, points: int) -> list[int]:
    """Running runs as bench/browser_perf.py writes them (finished there)."""
    ids = []
    per_epoch = max(1, points // 90)
    for i in range(n_runs):
        run_id = running_run(engine, f"compare #{i}")
        rng = random.Random(i)
        with MetricWriter(engine, run_id, max_pending=20_000) as w:
            for step in range(points):
                epoch = (step + 1) / per_epoch
                err = 0.25 + 0.7 * math.exp(-epoch / 20) + rng.gauss(0, 0.02)
                values = {"train_err": err, "lr": 0.1 * 0.1 ** sum(epoch >= m for m in (30, 60))}
                if (step + 1) % per_epoch == 0:
                    values["val_err"] = err + 0.02
                w.add(step, values, epoch=epoch, wall_time=0.05 * step)
        ids.append(run_id)
    return ids


def cold_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        metrics.invalidate()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def without_overviews(engine: Engine, fn: Callable[[], float]) -> float:
    """``fn`` measured with the overview rows gone (the points path), then put back."""
    with engine.begin() as conn:
        saved = conn.execute(sa.text("SELECT * FROM series_overviews")).mappings().all()
        conn.execute(sa.text("DELETE FROM series_overviews"))
    try:
        return fn()
    finally:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO series_overviews (run_id, key, attempts, total, data) "
                    "VALUES (:run_id, :key, :attempts, :total, :data)"
                ),
                [dict(r) for r in saved],
            )


def bench_backend(backend: str, args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    rows = []
    with temp_database(backend, args.pg) as engine:
        PUBLISHES.clear()
        run_id = running_run(engine)
        values = loss_curve(args.points)
        t0 = time.perf_counter()
        with MetricWriter(engine, run_id, max_pending=20_000) as w:
            for i, v in enumerate(values.tolist()):
                w.add(i, {"loss": v}, epoch=i / ITERS_PER_EPOCH, wall_time=i * 0.01)
        write_s = time.perf_counter() - t0
        stores = list(PUBLISHES)
        write_behind(engine, run_id, "loss", args.points, args.tail)

        def one() -> dict:
            out = read_series(engine, run_id, ["loss"], max_points=2000)["loss"]
            assert out["total"] == args.points + args.tail and max(out["value"]) == values.max()
            return out

        before = without_overviews(engine, lambda: cold_ms(one, max(3, args.repeats // 3)))
        after = cold_ms(one, args.repeats)
        rows.append(
            (backend, f"cold read, running run, {args.points:,} points", f"{before:,.1f}",
             f"{after:,.1f}")
        )  # fmt: skip

        ids = seed_compare(engine, args.runs, args.run_points)
        for rid in ids:
            write_behind(engine, rid, "train_err", args.run_points, args.tail)

        def compare() -> None:
            for rid in ids:
                s = read_series(engine, rid, ["train_err", "lr"], x="epoch", max_points=1500)
                assert s["train_err"]["total"] == args.run_points + args.tail

        before = without_overviews(engine, lambda: cold_ms(compare, 3))
        after = cold_ms(compare, args.repeats)
        rows.append(
            (backend, f"compare {args.runs} running runs x {args.run_points:,} points, cold",
             f"{before:,.1f}", f"{after:,.1f}")
        )  # fmt: skip
        rows.append(
            (backend, f"writer: overview stores while writing {args.points:,} points in "
             f"{write_s:.1f} s (count, median ms)", "-",
             f"{len(stores)}, {statistics.median(stores):.1f}" if stores else "0")
        )  # fmt: skip
    metrics.invalidate()
    return rows


def ingest_side_by_side(backend: str, args: argparse.Namespace) -> list[tuple[str, ...]]:
    """Committed points/s of the writer without and with the live overviews, alternated."""
    feed, due = live.LiveOverviews.feed, live.LiveOverviews.due
    rates: dict[bool, list[float]] = {False: [], True: []}
    with temp_database(backend, args.pg) as engine:
        for _ in range(args.repeats):
            for on in (False, True):
                live.LiveOverviews.feed = feed if on else lambda self, rows, **kw: None
                live.LiveOverviews.due = due if on else lambda self: False
                rates[on].append(writer_rate(engine, args.ingest)[0])
    live.LiveOverviews.feed, live.LiveOverviews.due = feed, due
    off, on = (statistics.median(rates[k]) for k in (False, True))
    spread = ", ".join(f"{a:,.0f}/{b:,.0f}" for a, b in zip(rates[False], rates[True], strict=True))
    return [(backend, f"{off:,.0f}", f"{on:,.0f}", f"{on / off - 1:+.1%}", spread)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=1_000_000, help="points of the one series")
    p.add_argument("--runs", type=int, default=20, help="runs in the compare read")
    p.add_argument("--run-points", type=int, default=100_000, help="iterations per run")
    p.add_argument("--tail", type=int, default=1000, help="points newer than the overview")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL server URL (no database)")
    p.add_argument("--ingest", type=int, default=0, help="measure ingest of N points instead")
    args = p.parse_args()
    if args.ingest:
        print(f"\nwriter ingest, {args.ingest:,} points, committed points/s (medians)\n")
        print("| backend | live overviews off | on | change | each pair (off/on) |")
        print("|---|---:|---:|---:|---|")
        for backend in args.backends.split(","):
            for row in ingest_side_by_side(backend, args):
                print("| " + " | ".join(row) + " |")
        return 0
    _timed_publish()
    rows = []
    for backend in args.backends.split(","):
        rows += bench_backend(backend, args)
    print("\nmedian ms of read_series(), cold (series cache emptied before each read)\n")
    print("| backend | read | before: points path | after: live overview |")
    print("|---|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
