"""External runs over HTTP: ingest rate from one client, and the cost to a training step.

Starts the API (``batchlab api``) in its own process on a scratch PostgreSQL database
(created here, dropped at the end; ``--sqlite`` for a temporary SQLite file instead), then:

1. ingest: one ``batchlab.Client(...).start_run`` logs ``--points`` points (the trainer's
   six per-iteration keys per step) as fast as it can and ``finish()`` waits until the
   server acknowledged every one: points/s from the first ``log`` to that answer. Beside
   it, the reference: the worker's own path, ``store.metrics.MetricWriter`` writing the
   same points straight into the same database from this process. Both runs' stored
   points are counted afterwards (each exactly once).
2. overhead: the same tiny training again and again in this process, alternating
   ``NullSink``, the worker's ``DbSink`` (on the same database) and the HTTP
   ``TrackingSink`` (``batchlab train --server``'s sink), as bench/sink_overhead.py
   does. Per iteration of the training (the sink's ``start`` to its ``close``:
   iterations, validations, checkpoints): wall and CPU time, median (IQR) and the
   ratios, the training thread's time inside ``log`` and the background threads' CPU;
   then, once per run, what ``finish`` adds after the training (every point
   acknowledged, the final status stored).

    .venv/bin/python bench/tracking_ingest.py                    # PostgreSQL on 127.0.0.1
    .venv/bin/python bench/tracking_ingest.py --points 2000000 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402

from bench.scratch import scratch_pg_database  # noqa: E402

KEYS = ("loss", "train_err", "lr", "samples", "grad_norm", "step_time")


@contextmanager
def scratch_database(sqlite: bool, tmp: Path) -> Iterator[str]:
    """A new empty database URL, dropped afterwards (PostgreSQL) or a temporary file."""
    if sqlite:
        yield f"sqlite:///{tmp / 'bench.db'}"
        return
    with scratch_pg_database("batchlab_track") as url:
        yield url


@contextmanager
def api_process(database_url: str, tmp: Path) -> Iterator[str]:
    """``batchlab api`` in its own process on ``database_url``; its base URL."""
    from server.serve import free_port

    port = free_port()
    env = {
        **os.environ,
        "BATCHLAB_HOME": str(tmp / "home"),
        "BATCHLAB_DATABASE_URL": database_url,
        "BATCHLAB_BROKER_URL": f"sqla+sqlite:///{tmp / 'broker.db'}",
    }
    env.pop("BATCHLAB_TOKEN", None)
    command = [sys.executable, "-m", "batchlab.cli", "api", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def count_points(engine: Any, run_id: int) -> tuple[int, int]:
    """(rows, distinct (key, step)) stored for the run."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT count(*) FROM metric_points WHERE run_id = :r"), {"r": run_id}
        ).scalar_one()
        distinct = conn.execute(
            sa.text(
                "SELECT count(*) FROM (SELECT DISTINCT key, step FROM metric_points "
                "WHERE run_id = :r) AS t"
            ),
            {"r": run_id},
        ).scalar_one()
    return int(rows), int(distinct)


def ingest(url: str, database_url: str, n_points: int) -> None:
    import batchlab
    from store import db, runs
    from store.metrics import MetricWriter

    steps = n_points // len(KEYS)
    values = [{k: 1.0 / (s + 1) + i for i, k in enumerate(KEYS)} for s in range(1000)]
    engine = db.get_engine(database_url)

    # Reference: the worker's writer straight into the database.
    with db.session(engine) as s:
        ref_id = runs.create_run(s, name="reference", spec={}).id
        runs.mark_running(s, ref_id, host="bench", gpus="", worker="bench")
    t0 = time.perf_counter()
    with MetricWriter(engine, ref_id) as writer:
        for s in range(steps):
            writer.add(s, values[s % 1000], epoch=s / 1000, wall_time=s * 0.01)
    ref_s = time.perf_counter() - t0
    with db.session(engine) as s:  # before the API's reaper takes it for a dead worker's
        runs.mark_finished(s, ref_id, "succeeded")

    # One HTTP client: register, log, finish (every point acknowledged).
    spool = Path(tempfile.mkdtemp(prefix="track-spool-"))
    client = batchlab.Client(url)
    run = client.start_run("ingest", {"bench": "tracking_ingest"}, spool_dir=spool)
    t0 = time.perf_counter()
    for s in range(steps):
        run.log_values(s, values[s % 1000], epoch=s / 1000, wall_time=s * 0.01)
    logged_s = time.perf_counter() - t0
    run.finish(timeout=600)
    http_s = time.perf_counter() - t0

    total = steps * len(KEYS)
    ref_rows, ref_distinct = count_points(engine, ref_id)
    http_rows, http_distinct = count_points(engine, run.id)
    print(f"ingest: {total:,} points ({steps:,} steps x {len(KEYS)} keys), {engine.dialect.name}")
    print()
    print("| path | seconds | points/s | stored rows (distinct) |")
    print("|---|---|---|---|")
    print(
        f"| MetricWriter, in process (the worker's path) | {ref_s:.2f} | "
        f"{total / ref_s:,.0f} | {ref_rows:,} ({ref_distinct:,}) |"
    )
    print(
        f"| HTTP: Client.start_run + log + finish (gzip JSON) | {http_s:.2f} | "
        f"{total / http_s:,.0f} | {http_rows:,} ({http_distinct:,}) |"
    )
    print()
    print(
        f"- the client's log() calls took {logged_s:.2f} s "
        f"({logged_s / steps * 1e6:.1f} µs per call of {len(KEYS)} keys); "
        f"{run.acked:,} points acknowledged"
    )
    if http_rows != total or http_distinct != total:
        raise SystemExit("HTTP ingest did not store every point exactly once")


@dataclass
class Timed:
    """A sink's wall / CPU from start() to close() (the training: every iteration, its
    validations and checkpoints), the time close() takes (the HTTP sink's ``finish``:
    every point acknowledged, the final status stored), and time inside log()."""

    inner: Any
    finish: Any = None  # called in close(): the HTTP sink's run.finish()
    wall: float = 0.0
    cpu: float = 0.0
    cpu_main: float = 0.0
    in_log: float = 0.0
    close_wall: float = 0.0

    def start(self, meta: Mapping[str, Any]) -> None:
        self.inner.start(meta)
        self._t = (time.perf_counter(), time.process_time(), time.thread_time())

    def log(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        t0 = time.perf_counter()
        self.inner.log(step, values, epoch=epoch, wall_time=wall_time)
        self.in_log += time.perf_counter() - t0

    def close(self) -> None:
        wall0, cpu0, main0 = self._t
        t0 = time.perf_counter()
        self.wall = t0 - wall0
        self.cpu = time.process_time() - cpu0
        self.cpu_main = time.thread_time() - main0
        self.inner.close()
        if self.finish is not None:
            self.finish()
        self.close_wall = time.perf_counter() - t0


def _ms(xs: list[float]) -> str:
    if len(xs) < 2:  # --repeats 1: no quartiles to give
        return f"{xs[0] * 1e3:.3f}" if xs else "-"
    qs = statistics.quantiles(xs, n=4)
    return f"{statistics.median(xs) * 1e3:.3f} ({qs[0] * 1e3:.3f}-{qs[2] * 1e3:.3f})"


def overhead(url: str, database_url: str, args: argparse.Namespace) -> None:
    import torch

    import batchlab
    from batchlab.tracking import TrackingSink
    from store import db, runs
    from trainer import fit
    from trainer.sink import NullSink
    from trainer.spec import RunSpec
    from worker.sink import DbSink

    torch.set_num_threads(args.threads)
    spec = RunSpec(
        model="mlp",
        dataset="synthetic",
        dataset_size=args.dataset_size,
        epochs=args.epochs,
        batch_per_worker=args.batch,
        warmup="none",
        milestones=[],
        device="cpu",
    )
    client = batchlab.Client(url)
    engine = db.get_engine(database_url)
    spool = Path(tempfile.mkdtemp(prefix="track-spool-"))

    def one(arm: str, run_dir: Path) -> tuple[Timed, int]:
        if arm == "null":
            sink = Timed(NullSink())
            return sink, fit(spec, sink, run_dir=run_dir, resume=False).iterations
        if arm == "db":  # the worker's sink, on the same database (bench/sink_overhead.py)
            with db.session(engine) as s:
                run_id = runs.create_run(s, name="db", spec=spec.model_dump(mode="json")).id
                runs.mark_running(s, run_id, host="bench", gpus="", worker="bench")
            db_sink = DbSink(engine, run_id, spec)
            sink = Timed(db_sink)
            result = fit(spec, sink, run_dir=run_dir, resume=False, should_stop=db_sink.should_stop)
            with db.session(engine) as s:
                runs.mark_finished(s, run_id, result.status)
            return sink, result.iterations
        run = client.start_run("overhead", spec, spool_dir=spool)
        sink = Timed(TrackingSink(run, spec.epochs), finish=run.finish)
        result = fit(spec, sink, run_dir=run_dir, resume=False, should_stop=sink.inner.should_stop)
        return sink, result.iterations

    arms = {"null": [], "db": [], "http": []}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        for arm in arms:  # warm-up: data, allocator, code paths
            one(arm, run_dir)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            for arm, timings in arms.items():
                timed, iters = one(arm, run_dir)
                timings.append(timed)
        total = time.perf_counter() - t0
    null, dbs, http = arms["null"], arms["db"], arms["http"]

    def per_it(xs: list[Timed], attr: str) -> list[float]:
        return [getattr(x, attr) / iters for x in xs]

    print(
        f"overhead: {spec.model}, synthetic data, {spec.train_size} samples, batch "
        f"{spec.total_batch}, {spec.epochs} epochs of {spec.iters_per_epoch} iterations "
        f"({iters} in all), checkpoint each epoch; torch threads {args.threads}, "
        f"{os.cpu_count()} CPUs shared with the API and the database; {args.repeats} "
        f"interleaved repeats per sink in {total:.0f} s"
    )
    print()
    print("| per iteration, median (IQR) | NullSink | DbSink (worker) | HTTP TrackingSink |")
    print("|---|---|---|---|")
    for what, label in (("wall", "wall, ms"), ("cpu", "CPU, all threads, ms")):
        cells = " | ".join(_ms(per_it(xs, what)) for xs in (null, dbs, http))
        print(f"| {label} | {cells} |")
    print()
    for what in ("wall", "cpu"):
        n = per_it(null, what)
        for name, xs in (("DbSink", dbs), ("HTTP", http)):
            d = per_it(xs, what)
            ratio = statistics.median(d) / statistics.median(n)
            paired = statistics.median(a / b for a, b in zip(d, n, strict=True))
            print(
                f"- {what}, {name}/NullSink: ratio of medians {ratio:.3f} "
                f"({(ratio - 1) * 100:+.1f} %), median of paired ratios {paired:.3f} "
                f"({(paired - 1) * 100:+.1f} %)"
            )
    step = statistics.median(per_it(null, "wall"))
    cpu_step = statistics.median(per_it(null, "cpu"))
    bg_null = statistics.median((x.cpu - x.cpu_main) / iters for x in null)
    for name, xs in (("DbSink", dbs), ("HTTP TrackingSink", http)):
        in_log = statistics.median(per_it(xs, "in_log"))
        bg = statistics.median((x.cpu - x.cpu_main) / iters for x in xs) - bg_null
        print(
            f"- {name}: training thread inside log {in_log * 1e6:.1f} µs per iteration "
            f"({in_log / step * 100:.2f} % of the NullSink wall step); background threads' "
            f"CPU {bg * 1e6:.1f} µs per iteration ({bg / cpu_step * 100:.2f} % of the "
            "NullSink CPU step, taken from training only when no core is free)"
        )
    tail = [x.close_wall for x in http]
    print(
        f"- HTTP, after the training, once per run: finish (last upload acknowledged, final "
        f"status stored) median {statistics.median(tail) * 1e3:.0f} ms, "
        f"max {max(tail) * 1e3:.0f} ms"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sqlite", action="store_true", help="a temporary SQLite file instead")
    p.add_argument("--points", type=int, default=1_200_000, help="points of the ingest run")
    p.add_argument("--repeats", type=int, default=20, help="training runs per sink")
    p.add_argument("--dataset-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: less noise)")
    p.add_argument("--only", choices=("ingest", "overhead"), default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with scratch_database(args.sqlite, tmp) as url, api_process(url, tmp) as api:
            if args.only in (None, "ingest"):
                ingest(api, url, args.points)
                print()
            if args.only in (None, "overhead"):
                overhead(api, url, args)


if __name__ == "__main__":
    main()
