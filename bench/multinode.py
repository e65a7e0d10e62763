"""Multi-node runs (issue 14 part 1) on one machine: speed, gang formation, node loss.

Starts real batchlab node workers (Celery workers, each with a ``BATCHLAB_HOME`` of its
own, as on separate machines) on a scratch PostgreSQL database (created here, dropped at
the end) and a SQLite broker in a temporary folder; the nodes reach each other on
loopback (``BATCHLAB_NODE_ADDR=127.0.0.1``), gloo carries the gradients. Every run is
submitted as the API does (``worker.celery_app.enqueue``) and followed in the database
(status polled every 50 ms).

1. speed: one spec (mlp, synthetic, k virtual workers) as (a) k workers inline in one
   process (nodes=1, nproc=1), (b) nproc=2 on one worker (torchrun --standalone),
   (c) nodes=2 x nproc=1 on two node workers: wall from ``running`` to ``succeeded``,
   iterations/s from the median ``step_time`` and from that wall, ratios against (a);
   and the largest relative difference of (c)'s (and (b)'s) loss series from (a)'s.
2. gang formation: two idle workers, a small nodes=2 run: enqueue -> ``running`` (the
   gang started) and enqueue -> the first ``loss`` point stored (torchrun, c10d
   rendezvous, data, first step, the sink's flush); median of the repeats.
3. node loss: a third idle worker; kill -9 (the process group) of one node of a running
   2-node gang: seconds until the run is re-queued, until it runs again (attempt 2, the
   new gang) and its outcome; which path found the loss (the run log's "stopping: node N
   ... went silent" of the watch, or a node's "failed: ..." when its torchrun died, and
   the reason the failing node logged).

    .venv/bin/python bench/multinode.py                      # about 3 minutes
    .venv/bin/python bench/multinode.py --only speed --epochs 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from bench.scratch import scratch_pg_database  # noqa: E402
from core.status import FINAL_STATUSES  # noqa: E402
from store import db, gang, runs  # noqa: E402
from store.logs import read_log  # noqa: E402
from trainer.spec import RunSpec  # noqa: E402
from worker.celery_app import enqueue, make_app  # noqa: E402

POLL_S = 0.05
TERMINAL = tuple(str(status) for status in FINAL_STATUSES)


class Cluster:
    """Node workers on one database and one broker, each in its own process group."""

    def __init__(self, tmp: Path, database_url: str) -> None:
        self.tmp, self.database_url = tmp, database_url
        self.broker_url = f"sqla+sqlite:///{tmp / 'broker.db'}"
        self.engine = db.get_engine(database_url)
        db.migrate(self.engine)
        self.celery = make_app(self.broker_url)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        """``celery worker`` as tests/test_worker.py's ``WorkerProcess.celery`` starts it."""
        home = self.tmp / name
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env.update(
            BATCHLAB_HOME=str(home),
            BATCHLAB_DATABASE_URL=self.database_url,
            BATCHLAB_BROKER_URL=self.broker_url,
            BATCHLAB_NODE_ADDR="127.0.0.1",  # every other BATCHLAB_* at its default
            PYTHONUNBUFFERED="1",
        )
        command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
                   "-Q", "cpu", "-n", f"{name}@%h", "--pool", "prefork", "-c", "1",
                   "--without-gossip", "--without-mingle", "-l", "info"]  # fmt: skip
        with (self.tmp / f"{name}.log").open("ab") as out:
            self.procs[name] = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def kill(self, name: str) -> None:
        """kill -9 the worker and everything in its process group, like a lost machine."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def submit(self, spec: RunSpec, name: str) -> tuple[int, float]:
        """A queued run and its messages, as the API sends them; (id, monotonic send time)."""
        with db.session(self.engine) as s:
            run_id = runs.create_run(s, name=name, spec=spec.model_dump(mode="json")).id
        sent = time.monotonic()
        enqueue(run_id, spec, celery_app=self.celery, engine=self.engine)
        return run_id, sent

    def ended_reason(self, run_id: int, attempt: int) -> str:
        """The reason the node that failed the gang logged (its worker's log)."""
        mark = f"run {run_id}: attempt {attempt} of the gang ended ("
        for log in sorted(self.tmp.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if mark in line:
                    return line.split(mark, 1)[1][:150]
        return "?"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name in list(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.procs[name].wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.procs[name].pid, signal.SIGKILL)  # leftovers (torchrun)
        self.procs.clear()


@dataclass
class Timeline:
    """When each (status, attempts) of one run and its first loss point were first seen."""

    engine: sa.Engine
    run_id: int
    seen: dict[Any, float] = field(default_factory=dict)

    def poll(self) -> Any:
        with db.session(self.engine) as s:
            run = runs.get_run(s, self.run_id)
            assert run is not None
            s.expunge(run)
        now = time.monotonic()
        self.seen.setdefault((run.status, run.attempts), now)
        if "loss" not in self.seen and has_loss(self.engine, self.run_id):
            self.seen["loss"] = now
        return run

    def until(self, done: Any, timeout: float) -> Any:
        """Poll until ``done(run)``; the run row."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.poll()
            if done(run):
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {self.run_id}: {run.status} after {timeout} s")
            time.sleep(POLL_S)

    def at(self, status: str, attempts: int) -> float:
        return self.seen[(status, attempts)]

    def finished(self) -> float:
        return min(t for k, t in self.seen.items() if isinstance(k, tuple) and k[0] in TERMINAL)


def has_loss(engine: sa.Engine, run_id: int) -> bool:
    q = "SELECT 1 FROM metric_points WHERE run_id = :r AND key = 'loss' LIMIT 1"
    with engine.connect() as conn:
        return conn.execute(sa.text(q), {"r": run_id}).first() is not None


def series(engine: sa.Engine, run_id: int, key: str, column: str = "value") -> list[float]:
    q = f"SELECT {column} FROM metric_points WHERE run_id = :r AND key = :k ORDER BY step"
    with engine.connect() as conn:
        return [float(v) for v in conn.scalars(sa.text(q), {"r": run_id, "k": key})]


def rel_diffs(a: list[float], b: list[float]) -> list[float]:
    """|a - b| / |b| step by step (inf for series of different lengths)."""
    if len(a) != len(b):
        return [float("inf")]
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True)]


def describe_diff(a: list[float], b: list[float], per_epoch: int) -> str:
    """The largest relative difference, where it first passes 1e-5 and how it grows."""
    diffs = rel_diffs(a, b)
    first = next((i for i, d in enumerate(diffs) if d > 1e-5), None)
    verdict = "equal to 1e-5" if first is None else f"first > 1e-5 at iteration {first}"
    growth = ", ".join(
        f"ep {e + 1} {max(diffs[e * per_epoch : (e + 1) * per_epoch]):.0e}"
        for e in range(len(diffs) // per_epoch)
    )
    return (
        f"{len(a)} points, max relative difference {max(diffs):.2e} ({verdict}; first 10 "
        f"{max(diffs[:10]):.0e}, {growth})"
    )


def base_spec(args: argparse.Namespace, **changes: Any) -> RunSpec:
    fields: dict[str, Any] = dict(
        model="mlp",
        dataset="synthetic",
        dataset_size=args.dataset_size,
        epochs=args.epochs,
        workers=args.k,
        batch_per_worker=args.batch,
        warmup="none",
        milestones=[],
        device="cpu",
    )
    return RunSpec.model_validate({**fields, **changes})


def done(run: Any) -> bool:
    return run.status in TERMINAL


# ---------------------------------------------------------------------------------------
# 1. speed


def speed(cluster: Cluster, args: argparse.Namespace) -> None:
    layouts = [
        ("(a) inline, k virtual workers", dict(nodes=1, nproc=1), 1),
        ("(b) nproc=2, one worker", dict(nodes=1, nproc=2), 2),
        ("(c) nodes=2 x nproc=1", dict(nodes=2, nproc=1), 2),
    ]
    rows, losses = [], {}
    for label, layout, procs in layouts:
        spec = base_spec(args, **layout)
        run_id, _ = cluster.submit(spec, label[:3])
        line = Timeline(cluster.engine, run_id)
        run = line.until(done, args.timeout)
        if run.status != "succeeded":
            raise SystemExit(f"{label}: {run.status}: {run.error}")
        wall = line.finished() - line.at("running", run.attempts)
        step = statistics.median(series(cluster.engine, run_id, "step_time"))
        loop = series(cluster.engine, run_id, "loss", "wall_time")[-1]
        losses[label[:3]] = series(cluster.engine, run_id, "loss")
        rows.append((label, procs, wall, loop, 1 / step, spec.total_iters / wall))
        print(f"  {label}: run {run_id}, {spec.total_iters} iterations, {wall:.1f} s, "
              f"{run.attempts} attempt(s)", flush=True)  # fmt: skip
    ref = rows[0]
    print(f"\n1. speed: mlp, synthetic, k={args.k}, n={args.batch} (kn={args.k * args.batch}), "
          f"{args.dataset_size} samples x {args.epochs} epochs = "
          f"{base_spec(args).total_iters} iterations, gloo on loopback")  # fmt: skip
    print(
        "| layout | processes | wall running->succeeded, s | loop wall (last loss), s "
        "| it/s, median step_time | it/s, total wall | vs (a), step_time | vs (a), wall |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, procs, wall, loop, by_step, by_wall in rows:
        print(f"| {label} | {procs} | {wall:.1f} | {loop:.1f} | {by_step:.0f} | {by_wall:.0f} "
              f"| {by_step / ref[4]:.2f}x | {by_wall / ref[5]:.2f}x |")  # fmt: skip
    ipe = base_spec(args).iters_per_epoch
    for key, ref_key in (("(b)", "(a)"), ("(c)", "(a)"), ("(c)", "(b)")):
        print(f"{key} loss vs {ref_key}: {describe_diff(losses[key], losses[ref_key], ipe)}")


# ---------------------------------------------------------------------------------------
# 2. gang formation


def formation(cluster: Cluster, args: argparse.Namespace) -> None:
    spec = base_spec(args, nodes=2, dataset_size=4000, epochs=1)
    to_running, to_loss = [], []
    for i in range(args.gang_repeats):
        time.sleep(2)  # both workers back at their broker poll, idle
        run_id, sent = cluster.submit(spec, f"gang-{i}")
        line = Timeline(cluster.engine, run_id)
        run = line.until(done, args.timeout)
        if run.status != "succeeded" or "loss" not in line.seen:
            raise SystemExit(f"gang run {run_id}: {run.status}: {run.error}")
        to_running.append(line.at("running", run.attempts) - sent)
        to_loss.append(line.seen["loss"] - sent)
        print(f"  run {run_id}: running after {to_running[-1]:.2f} s, first loss after "
              f"{to_loss[-1]:.2f} s, {run.attempts} attempt(s)", flush=True)  # fmt: skip
        if run.attempts > 1:  # the first gang did not train: say why
            for text in detection(cluster.engine, run_id):
                print(f"    log: {text[:160]}")
    print(f"\n2. gang formation, nodes=2 on two idle workers, {args.gang_repeats} runs")
    print("| from enqueue to | median, s | min-max, s |")
    print("|---|---:|---:|")
    for label, values in (("running (gang started)", to_running),
                          ("first loss point stored", to_loss)):  # fmt: skip
        print(f"| {label} | {statistics.median(values):.2f} | "
              f"{min(values):.2f}-{max(values):.2f} |")  # fmt: skip
    gaps = [b - a for a, b in zip(to_running, to_loss, strict=True)]
    print(f"running -> first loss (torchrun, rendezvous, data, first step): median "
          f"{statistics.median(gaps):.2f} s")  # fmt: skip


# ---------------------------------------------------------------------------------------
# 3. node loss


def detection(engine: sa.Engine, run_id: int) -> list[str]:
    """The run log's lines that say how attempt 1 ended."""
    with db.session(engine) as s:
        lines = read_log(s, run_id)
    keys = ("stopping:", "failed:", "went silent")
    return [ln["text"] for ln in lines if any(k in ln["text"] for k in keys)]


def node_loss(cluster: Cluster, args: argparse.Namespace, spare: list[str]) -> None:
    spec = base_spec(args, nodes=2, epochs=args.kill_epochs)
    rows = []
    for i, slot in enumerate(args.kill_slots[: args.kill_repeats]):
        run_id, _ = cluster.submit(spec, f"kill-{i}")
        line = Timeline(cluster.engine, run_id)
        line.until(lambda r: done(r) or (r.status == "running" and r.progress >= 0.35),
                   args.timeout)  # fmt: skip
        run = line.poll()
        attempt = run.attempts  # a gang may have needed more than one attempt to start
        with db.session(cluster.engine) as s:
            victim = next(n for n in gang.members(s, run_id, attempt) if n.slot == slot).worker
        name = victim.split("@")[0]
        early = series(cluster.engine, run_id, "loss", "wall_time")[:20]
        progress = run.progress
        cluster.kill(name)
        killed = time.monotonic()
        run = line.until(done, args.timeout)
        requeued = line.seen.get(("queued", attempt), float("nan"))
        if requeued < killed:
            requeued = float("nan")  # not seen after the kill (polled too slowly)
        again = line.seen.get(("running", attempt + 1), float("nan"))
        how = detection(cluster.engine, run_id)
        why = cluster.ended_reason(run_id, attempt)
        # Resumed from a checkpoint: the first points are still attempt 1's rows.
        resumed = series(cluster.engine, run_id, "loss", "wall_time")[:20] == early
        rows.append((slot, requeued - killed, again - killed, run.status, run.attempts, how,
                     why, resumed))  # fmt: skip
        print(f"  run {run_id}: killed node {slot} ({name}) of attempt {attempt} at progress "
              f"{progress:.2f}; "
              f"{run.status} after {run.attempts} attempts", flush=True)  # fmt: skip
        for text in how:
            print(f"    run log: {text[:160]}")
        print(f"    gang ended: {why}")
        cluster.start(spare.pop(0))  # three workers again for the next repeat
    print(f"\n3. node loss: kill -9 of one node of a running 2-node gang, a third worker idle, "
          f"BATCHLAB_NODE_SILENT_S default ({spec.epochs} epochs of the speed spec)")  # fmt: skip
    print(
        "| killed | kill -> re-queued, s | kill -> running again (attempt 2), s "
        "| outcome | detected by | attempt 2 |"
    )
    print("|---|---:|---:|---|---|---|")
    for slot, requeued, again, status, attempts, how, why, resumed in rows:
        if any("stopping:" in t for t in how):
            path = "the survivor's watch (peer silent); its torchrun stopped"
        elif "; " in why:  # rank 0 (on either node: c10d assigns ranks) ended with an error
            path = "the survivor's rank 0 failed (gloo reset), then peer silent"
        else:
            path = "the survivor's torchrun failed (gloo reset), then peer silent"
        role = "slot 0 (rendezvous host)" if slot == 0 else f"slot {slot}"
        start = "resumed from a checkpoint" if resumed else "started over"
        print(f"| {role} | {requeued:.1f} | {again:.1f} | {status}, {attempts} attempts "
              f"| {path} | {start} |")  # fmt: skip


# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="virtual workers of the spec")
    parser.add_argument("--batch", type=int, default=64, help="batch per worker n")
    parser.add_argument("--dataset-size", type=int, default=64000)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of the speed runs")
    parser.add_argument("--kill-epochs", type=int, default=6, help="epochs of the kill runs")
    parser.add_argument("--gang-repeats", type=int, default=3)
    parser.add_argument("--kill-repeats", type=int, default=2)
    parser.add_argument("--kill-slots", type=int, nargs="+", default=[1, 0],
                        help="which node each kill repeat kills")  # fmt: skip
    parser.add_argument("--only", choices=("speed", "gang", "kill"), nargs="+")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run at most")
    parser.add_argument("--keep-logs", type=Path, help="copy the workers' logs here")
    args = parser.parse_args()
    parts = set(args.only or ("speed", "gang", "kill"))
    start = time.monotonic()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp_name:
        tmp = Path(tmp_name)
        with scratch_pg_database("batchlab_multinode") as url:
            cluster = Cluster(tmp, url)
            try:
                cluster.start("a")
                cluster.start("b")
                if "speed" in parts:
                    speed(cluster, args)
                if "gang" in parts:
                    formation(cluster, args)
                if "kill" in parts:
                    cluster.start("c")
                    node_loss(cluster, args, spare=["d", "e", "f", "g"])
            finally:
                cluster.stop()
                cluster.engine.dispose()
                if args.keep_logs:
                    args.keep_logs.mkdir(parents=True, exist_ok=True)
                    for log in tmp.glob("*.log"):
                        (args.keep_logs / log.name).write_bytes(log.read_bytes())
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"bench took {time.monotonic() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
