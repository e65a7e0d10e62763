"""Latency from a trainer's ``log`` to an SSE client: MetricWriter -> DB -> API -> browser.

A ``MetricWriter`` (the worker's path into the store) logs the trainer's per-iteration
keys at a steady pace while one or more clients follow ``GET /api/runs/{id}/stream``
on a real uvicorn server. For every point, latency = time the client parsed it minus the
time ``add`` was called (same machine, same clock). Prints p50/p95/p99/max.

    python bench/sse_latency.py                      # SQLite, 20 s, 1 client
    python bench/sse_latency.py --clients 10 --duration 30
    python bench/sse_latency.py --database-url postgresql+psycopg://postgres@127.0.0.1/x

Results: docs/benchmarks/service.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

# The trainer's per-iteration keys (docs/design.md).
KEYS = ("loss", "train_err", "lr", "samples", "grad_norm", "step_time")


def follow(url: str, run_id: int, sent: dict[int, float], got: list[float], ready: threading.Event):
    from server.sse_client import iter_events

    with httpx.stream("GET", f"{url}/api/runs/{run_id}/stream", timeout=60) as r:
        for ev in iter_events(r.iter_lines()):
            now = time.time()
            ready.set()
            if ev.event == "points":
                for p in ev.json()["points"]:
                    got.append(now - sent[p["step"]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of logging")
    parser.add_argument("--rate", type=float, default=50.0, help="iterations logged per second")
    parser.add_argument("--clients", type=int, default=1, help="concurrent SSE clients")
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="sse-bench-")
    os.environ["BATCHLAB_HOME"] = tmp
    from server.app import create_app
    from server.serve import serve_in_thread
    from store import db, runs
    from store.metrics import MetricWriter

    database_url = args.database_url or f"sqlite:///{tmp}/batchlab.db"
    app = create_app(database_url=database_url, broker_url=f"sqla+sqlite:///{tmp}/broker.db")
    engine = app.state.ctx.engine
    db.migrate(engine)
    with db.session(engine) as s:
        run_id = runs.create_run(s, name="sse bench", spec={"model": "mlp"}).id
        runs.mark_running(s, run_id, host="bench", gpus="", worker="bench")

    sent: dict[int, float] = {}
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    with serve_in_thread(app) as url:
        ready = [threading.Event() for _ in range(args.clients)]
        threads = [
            threading.Thread(target=follow, args=(url, run_id, sent, latencies[i], ready[i]))
            for i in range(args.clients)
        ]
        for t in threads:
            t.start()
        for e in ready:
            e.wait(30)
        writer = MetricWriter(engine, run_id)  # flushes every 250 ms, as in the worker
        period = 1.0 / args.rate
        start = time.time()
        step = 0
        while time.time() - start < args.duration:
            sent[step] = time.time()
            writer.add(step, dict.fromkeys(KEYS, 0.5), epoch=step / 100, wall_time=step * period)
            step += 1
            time.sleep(max(0.0, start + step * period - time.time()))
        writer.close()
        time.sleep(1.0)  # let the last poll deliver
        with db.session(engine) as s:
            runs.mark_finished(s, run_id, "succeeded")
        for t in threads:
            t.join(30)

    all_lat = sorted(x for lat in latencies for x in lat)
    expected = step * len(KEYS) * args.clients
    if not all_lat:
        print("no points received")
        return 1

    def q(p: float) -> float:
        return all_lat[min(len(all_lat) - 1, int(p * len(all_lat)))] * 1000

    print(
        f"{step} iterations x {len(KEYS)} keys at {args.rate:g}/s for {args.duration:g} s, "
        f"{args.clients} client(s), {engine.dialect.name}"
    )
    print(f"points received: {len(all_lat)} of {expected}")
    print(
        f"latency log->client ms: p50 {q(0.50):.0f}  p95 {q(0.95):.0f}  p99 {q(0.99):.0f}  "
        f"max {all_lat[-1] * 1000:.0f}  mean {statistics.fmean(all_lat) * 1000:.0f}"
    )
    return 0 if len(all_lat) == expected else 1


if __name__ == "__main__":
    sys.exit(main())
