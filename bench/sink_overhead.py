"""What the worker's DbSink costs a training step, against NullSink.

Trains the same tiny run again and again in this process, alternating the two sinks
(NullSink, DbSink, NullSink, ...) so that drift in machine load hits both alike. Each
run is timed from the sink's ``start`` (after setup) to the end of its ``close`` (after
the last flush); validation and the epoch-end checkpoints (the default; nothing is
resumed) are inside, so both sinks see exactly the same work. Reported per iteration:

- wall and CPU time (CPU of all threads: the sink's writer and heartbeat count),
  median and interquartile range over the repeats, and their DbSink/NullSink ratios;
- what the training thread spends inside ``DbSink.log`` (the only time the loop waits
  for the sink), split into the per-iteration calls and the epoch-end call that stores
  the epoch synchronously before the trainer checkpoints;
- the CPU the sink's background threads take (process CPU minus the training thread's).

The last two are measured inside the run, so they are much less noisy on a shared
machine than the end-to-end ratio.

DbSink writes to a fresh SQLite database (WAL) in a temporary folder, or to
``--database-url`` (an empty PostgreSQL database, say).

    .venv/bin/python bench/sink_overhead.py --repeats 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from store import db, runs  # noqa: E402
from trainer import fit  # noqa: E402
from trainer.sink import NullSink  # noqa: E402
from trainer.spec import RunSpec  # noqa: E402
from worker.sink import DbSink  # noqa: E402


def make_spec(args: argparse.Namespace) -> RunSpec:
    return RunSpec(
        model=args.model,
        dataset="synthetic",
        dataset_size=args.dataset_size,
        epochs=args.epochs,
        batch_per_worker=args.batch,
        warmup="none",
        milestones=[],
        device="cpu",
    )


@dataclass
class Timed:
    """Wraps a sink: wall / CPU from start() to the end of close(), time inside log()."""

    inner: Any
    wall: float = 0.0
    cpu: float = 0.0
    cpu_main: float = 0.0  # the training thread's own CPU
    in_log: float = 0.0  # per-iteration log() calls
    in_epoch_log: list[float] = field(default_factory=list)  # epoch-end log() calls

    def start(self, meta: Mapping[str, Any]) -> None:
        self.inner.start(meta)
        self._t = (time.perf_counter(), time.process_time(), time.thread_time())

    def log(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        t0 = time.perf_counter()
        self.inner.log(step, values, epoch=epoch, wall_time=wall_time)
        spent = time.perf_counter() - t0
        if "loss" in values:
            self.in_log += spent
        else:
            self.in_epoch_log.append(spent)

    def close(self) -> None:
        self.inner.close()
        wall0, cpu0, main0 = self._t
        self.wall = time.perf_counter() - wall0
        self.cpu = time.process_time() - cpu0
        self.cpu_main = time.thread_time() - main0


def one_run(spec: RunSpec, engine: Any | None, run_dir: Path) -> tuple[Timed, int, int]:
    """One fit() into NullSink (engine None) or DbSink: its timings, iterations, points."""
    if engine is None:
        sink = Timed(NullSink())
        result = fit(spec, sink, run_dir=run_dir, resume=False)
        return sink, result.iterations, 0
    with db.session(engine) as s:
        run_id = runs.create_run(s, name="bench", spec=spec.model_dump(mode="json")).id
        runs.mark_running(s, run_id, host="bench", gpus="", worker="bench")
    db_sink = DbSink(engine, run_id, spec)
    sink = Timed(db_sink)
    result = fit(spec, sink, run_dir=run_dir, resume=False, should_stop=db_sink.should_stop)
    return sink, result.iterations, db_sink.writer.written


def _ms(xs: list[float]) -> str:
    qs = statistics.quantiles(xs, n=4)
    return f"{statistics.median(xs) * 1e3:.3f} ({qs[0] * 1e3:.3f}-{qs[2] * 1e3:.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30, help="runs per sink (interleaved)")
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: less noise)")
    p.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = make_spec(args)

    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        engine = db.get_engine(url)
        db.migrate(engine)
        run_dir = Path(tmp) / "run"
        one_run(spec, None, run_dir)  # warm-up: data generation, allocator, code paths
        one_run(spec, engine, run_dir)
        null: list[Timed] = []
        dbs: list[Timed] = []
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            null.append(one_run(spec, None, run_dir)[0])
            timed, iters, stored = one_run(spec, engine, run_dir)
            dbs.append(timed)
        total = time.perf_counter() - t0
        dialect = engine.dialect.name

    def per_it(xs: list[Timed], attr: str) -> list[float]:
        return [getattr(x, attr) / iters for x in xs]

    print(
        f"run: {spec.model}, synthetic data, {spec.train_size} training samples, batch "
        f"{spec.total_batch}, {spec.epochs} epochs of {spec.iters_per_epoch} iterations "
        f"({iters} in all), checkpoint each epoch; torch threads {args.threads}, "
        f"{os.cpu_count()} CPUs; {args.repeats} interleaved repeats per sink in {total:.0f} s; "
        f"DbSink stored {stored} points per run ({dialect})"
    )
    print()
    print("| per iteration, median (IQR) | NullSink | DbSink |")
    print("|---|---|---|")
    print(f"| wall, ms | {_ms(per_it(null, 'wall'))} | {_ms(per_it(dbs, 'wall'))} |")
    print(f"| CPU, all threads, ms | {_ms(per_it(null, 'cpu'))} | {_ms(per_it(dbs, 'cpu'))} |")
    print()
    for what in ("wall", "cpu"):
        n, d = per_it(null, what), per_it(dbs, what)
        ratio = statistics.median(d) / statistics.median(n)
        paired = statistics.median(a / b for a, b in zip(d, n, strict=True))
        print(
            f"- {what}: DbSink/NullSink ratio of medians {ratio:.3f} ({(ratio - 1) * 100:+.1f} %),"
            f" median of paired ratios {paired:.3f} ({(paired - 1) * 100:+.1f} %)"
        )
    step = statistics.median(per_it(null, "wall"))
    in_log = statistics.median(per_it(dbs, "in_log"))
    epoch_logs = [t for x in dbs for t in x.in_epoch_log]
    in_epoch = statistics.median(sum(x.in_epoch_log) / iters for x in dbs)
    bg = statistics.median((x.cpu - x.cpu_main) / iters for x in dbs)
    bg_null = statistics.median((x.cpu - x.cpu_main) / iters for x in null)
    print(
        f"- training thread inside DbSink.log: {in_log * 1e6:.1f} µs per iteration "
        f"({in_log / step * 100:.2f} % of the NullSink step)"
    )
    print(
        f"- epoch-end store (synchronous, before the checkpoint): median "
        f"{statistics.median(epoch_logs) * 1e3:.2f} ms per epoch, max "
        f"{max(epoch_logs) * 1e3:.2f} ms = {in_epoch * 1e6:.1f} µs per iteration "
        f"({in_epoch / step * 100:.2f} %)"
    )
    print(
        f"- background threads' CPU: {bg * 1e6:.1f} µs per iteration with DbSink, "
        f"{bg_null * 1e6:.1f} µs with NullSink ({(bg - bg_null) / step * 100:.2f} % of "
        "the step, taken from training only when no core is free)"
    )


if __name__ == "__main__":
    main()
