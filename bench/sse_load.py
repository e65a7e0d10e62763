"""Readers' cost to a training run: iterations/s with 0 readers, then with 50 SSE + 50
polling readers, then with 0 again, on one machine (issue 10, point 11).

Starts ``batchlab up`` (the API and one CPU worker, the API at its default lower priority)
on SQLite files or on PostgreSQL + Redis (a scratch database, dropped at the end), submits
one training run and, once it trains, measures in three phases of ``--phase`` seconds:

- idle: no readers; iterations/s from the newest stored ``loss`` step at the phase ends;
- loaded: ``--sse`` clients follow ``GET /api/runs/{id}/stream`` and ``--pollers`` clients
  poll ``GET /api/runs`` or ``GET /api/runs/{id}`` (alternately) every ``--poll-every`` s;
- idle again (the machine may be shared: a drift between the idle phases shows it).

SSE clients start after the newest stored step (``?since=``, as the run page does once
it has drawn the history). SSE latency is point-to-client: receipt time minus the point's
trainer clock (``wall_time``), aligned on the fastest point received (so it underestimates
by that point's own latency, a few ms). Only every 10th SSE client parses the points (the
clients share the machine with the training); every client counts errors: a status other
than 200, an exception, an ``error`` or ``gone`` event, a stream ending early. CPU is read
from /proc: the API, the worker, the bench's own clients and every ``postgres`` process
(other users' included). The run is cancelled and everything stopped at the end;
loopback only.

    python bench/sse_load.py                 # SQLite + SQLite broker
    python bench/sse_load.py --postgres      # PostgreSQL + Redis on 127.0.0.1
    python bench/sse_load.py --postgres --api-nice 0 --phase 20

Results: docs/benchmarks.md ("Load").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import sqlalchemy as sa  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432"
# A Redis database of its own: other workers on this Redis must not take the bench's run.
REDIS_URL = "redis://127.0.0.1:6379/13"
# The reference run of examples/specs/baseline.yaml, long enough to outlast the phases.
SPEC: dict[str, Any] = {
    "model": "mnist1d_cnn",
    "dataset": "mnist1d",
    "dataset_size": 20480,
    "epochs": 200,
    "workers": 1,
    "batch_per_worker": 32,
    "base_lr": 0.05,
    "ref_batch": 32,
    "warmup": "none",
    "seed": 0,
}


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.sse_lat: list[tuple[float, float]] = []  # (receipt time, trainer wall_time)
        self.poll_ms: list[float] = []
        self.events = 0
        # Latency is recorded during the loaded phase only: a client's catch-up of the
        # run's history at connect is not live delivery.
        self.recording = threading.Event()

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what)


def follow(url: str, run_id: int, since: int, measure: bool, stop, c: Counters) -> None:
    from server.sse_client import iter_events

    # ?since: what the run page does after loading the history from /metrics.
    stream_url = f"{url}/api/runs/{run_id}/stream?since={since}"
    try:
        with httpx.stream("GET", stream_url, timeout=30) as r:
            if r.status_code != 200:
                c.error(f"stream HTTP {r.status_code}")
                return
            for ev in iter_events(r.iter_lines()):
                if stop.is_set():
                    return
                with c.lock:
                    c.events += 1
                if ev.event in ("error", "gone"):
                    c.error(f"stream event {ev.event}: {ev.data[:200]}")
                    return
                if measure and ev.event == "points" and c.recording.is_set():
                    now = time.time()
                    got = [(now, p["wall_time"]) for p in ev.json()["points"] if p["key"] == "loss"]
                    with c.lock:
                        c.sse_lat.extend(got)
        if not stop.is_set():
            c.error("stream ended early")
    except Exception as err:  # noqa: BLE001 - every failure is a counted error
        if not stop.is_set():
            c.error(f"stream {type(err).__name__}: {err}")


def poll(url: str, path: str, every: float, offset: float, stop: threading.Event, c: Counters):
    with httpx.Client(base_url=url, timeout=30) as client:
        stop.wait(offset)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = client.get(path)
                if r.status_code != 200:
                    c.error(f"poll {path} HTTP {r.status_code}")
            except Exception as err:  # noqa: BLE001
                c.error(f"poll {path} {type(err).__name__}: {err}")
            with c.lock:
                c.poll_ms.append((time.perf_counter() - t0) * 1000)
            stop.wait(max(0.0, every - (time.perf_counter() - t0)))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes (Linux /proc), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "postgres":
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def descendants(pid: int) -> list[int]:
    from batchlab.cmd_up import _descendants

    return _descendants(pid)


class Phase:
    """Iterations/s and CPU use between start() and stop()."""

    def __init__(self, name: str, latest_step, api_pid: int, worker_pids: list[int]) -> None:
        self.name, self.latest_step = name, latest_step
        self.api_pid, self.worker_pids = api_pid, worker_pids

    def start(self) -> None:
        self.t0, self.s0 = time.time(), self.latest_step()
        self.api0, self.worker0 = cpu_seconds([self.api_pid]), cpu_seconds(self.worker_pids)
        self.bench0 = cpu_seconds([os.getpid()])
        self.pg_pids = postgres_pids()
        self.pg0 = cpu_seconds(self.pg_pids)
        self.busy0 = machine_busy()

    def stop(self) -> None:
        self.seconds = time.time() - self.t0
        self.its = (self.latest_step() - self.s0) / self.seconds
        self.api_cpu = (cpu_seconds([self.api_pid]) - self.api0) / self.seconds
        self.worker_cpu = (cpu_seconds(self.worker_pids) - self.worker0) / self.seconds
        self.bench_cpu = (cpu_seconds([os.getpid()]) - self.bench0) / self.seconds
        # Backends that exited meanwhile are missed (the API's pool keeps its connections).
        self.pg_cpu = (cpu_seconds(self.pg_pids) - self.pg0) / self.seconds
        busy, total = machine_busy()
        self.machine = (busy - self.busy0[0]) / max(1, total - self.busy0[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL + Redis")
    parser.add_argument("--sse", type=int, default=50, help="SSE clients (default 50)")
    parser.add_argument("--pollers", type=int, default=50, help="polling clients (default 50)")
    parser.add_argument("--poll-every", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--phase", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--api-nice", type=int, default=None, help="default: batchlab up's")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()

    from server.serve import free_port

    home = tempfile.mkdtemp(prefix="sse-load-")
    env = {**os.environ, "BATCHLAB_HOME": home, "BATCHLAB_DATA_CACHE": f"{home}/data"}
    env.pop("BATCHLAB_TOKEN", None)
    pg_name = None
    if args.postgres:
        pg_name = f"batchlab_load_{uuid.uuid4().hex[:8]}"
        admin = sa.create_engine(f"{PG_ADMIN}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{pg_name}"'))
        env["BATCHLAB_DATABASE_URL"] = f"{PG_ADMIN}/{pg_name}"
        env["BATCHLAB_BROKER_URL"] = REDIS_URL
    else:
        env.pop("BATCHLAB_DATABASE_URL", None)
        env.pop("BATCHLAB_BROKER_URL", None)
    database_url = env.get("BATCHLAB_DATABASE_URL") or f"sqlite:///{home}/batchlab.db"
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "batchlab.cli", "up", "--port", str(port)]
    command += ["--gpus", "none", "--log-level", "warning"]
    if args.api_nice is not None:
        command += ["--api-nice", str(args.api_nice)]
    up = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True)
    engine = sa.create_engine(database_url)
    stop = threading.Event()
    try:
        return run_bench(args, url, up, engine, stop)
    finally:
        stop.set()
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
        engine.dispose()
        if pg_name:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))
            admin.dispose()


def run_bench(args, url: str, up: subprocess.Popen, engine: sa.Engine, stop) -> int:
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if up.poll() is not None or time.time() > deadline:
            print("batchlab up did not start", file=sys.stderr)
            return 1
        time.sleep(0.3)
    r = httpx.post(f"{url}/api/runs", json={"name": "load bench", "spec": SPEC}, timeout=30)
    r.raise_for_status()
    run_id = r.json()["run"]["id"]

    query = sa.text("SELECT max(step) FROM metric_points WHERE run_id = :r AND key = 'loss'")

    def latest_step() -> int:
        with engine.connect() as conn:
            return int(conn.execute(query, {"r": run_id}).scalar() or -1)

    deadline = time.time() + 90
    while latest_step() < 0:  # data generated, model built, first points stored
        if time.time() > deadline:
            print("the run did not start training", file=sys.stderr)
            return 1
        time.sleep(0.5)
    time.sleep(5)  # past the first epoch's warm-up
    worker_pids = descendants(up.pid)
    phases = [Phase(n, latest_step, up.pid, worker_pids) for n in ("idle", "loaded", "idle")]
    c = Counters()

    def measure(phase: Phase) -> None:
        phase.start()
        time.sleep(args.phase)
        phase.stop()

    measure(phases[0])
    since = latest_step()
    threads = [
        threading.Thread(
            target=follow, args=(url, run_id, since, i % 10 == 0, stop, c), daemon=True
        )
        for i in range(args.sse)
    ]
    paths = ("/api/runs", f"/api/runs/{run_id}")
    threads += [
        threading.Thread(
            target=poll,
            args=(url, paths[i % 2], args.poll_every, i * args.poll_every / args.pollers, stop, c),
            daemon=True,
        )
        for i in range(args.pollers)
    ]
    for t in threads:
        t.start()
    time.sleep(3)  # connected and caught up
    c.recording.set()
    measure(phases[1])
    c.recording.clear()
    stop.set()
    for t in threads:
        t.join(10)
    time.sleep(2)
    measure(phases[2])
    httpx.post(f"{url}/api/runs/{run_id}/cancel", timeout=10)

    report(args, engine, phases, c)
    return 0


def report(args, engine: sa.Engine, phases: list[Phase], c: Counters) -> None:
    backend = "PostgreSQL + Redis" if args.postgres else "SQLite + SQLite broker"
    nice = "batchlab up default" if args.api_nice is None else str(args.api_nice)
    print(f"\n{backend}; API nice: {nice}; {os.cpu_count()} CPUs; phases of {args.phase:g} s")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end: {load} (the bench itself adds about 2-3)")
    print(f"readers: {args.sse} SSE + {args.pollers} pollers (every {args.poll_every:g} s)")
    loaded = f"{args.sse + args.pollers} readers"
    print(f"{'':24}{'0 readers':>12}{loaded:>14}{'0 readers':>12}")
    rows = [
        ("iterations/s", "its", "{:.1f}"),
        ("API CPU (cores)", "api_cpu", "{:.2f}"),
        ("worker CPU (cores)", "worker_cpu", "{:.2f}"),
        ("bench clients CPU", "bench_cpu", "{:.2f}"),
        ("postgres CPU (all)", "pg_cpu", "{:.2f}"),
        ("machine busy", "machine", "{:.0%}"),
    ]
    for label, attr, fmt in rows:
        cells = [fmt.format(getattr(p, attr)) for p in phases]
        print(f"{label:24}{cells[0]:>12}{cells[1]:>14}{cells[2]:>12}")
    idle = statistics.fmean([phases[0].its, phases[2].its])
    print(f"loaded / mean idle iterations/s: {phases[1].its / idle:.3f} (goal >= 0.90)")
    if c.sse_lat:
        offset = min(now - wall for now, wall in c.sse_lat)
        lat = sorted((now - wall - offset) * 1000 for now, wall in c.sse_lat)
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]  # noqa: E731
        print(
            f"SSE point-to-client ms ({len(lat)} loss points, {args.sse // 10 or 1} clients): "
            f"p50 {q(0.5):.0f}  p95 {q(0.95):.0f}  p99 {q(0.99):.0f}  max {lat[-1]:.0f}"
            "  (goal p95 <= 1000)"
        )
    else:
        print("SSE: no points received")
    if c.poll_ms:
        pm = sorted(c.poll_ms)
        print(
            f"poll answer ms ({len(pm)} requests): p50 {pm[len(pm) // 2]:.0f}  "
            f"p95 {pm[int(0.95 * len(pm))]:.0f}  max {pm[-1]:.0f}"
        )
    print(f"SSE events received: {c.events}")
    print(f"errors: {len(c.errors)} (goal 0)")
    for err in c.errors[:10]:
        print(f"  {err}")
    print(json.dumps({"its": [round(p.its, 1) for p in phases], "errors": len(c.errors)}))


if __name__ == "__main__":
    sys.exit(main())
