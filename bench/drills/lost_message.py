"""Drill: the broker loses the messages of queued runs; they are re-sent and finish.

Starts an API server (no worker yet), submits runs, deletes their messages from the
broker (Redis: DEL of the queue key, as a restart without AOF does; SQLite: the
``kombu_message`` rows; RabbitMQ: a queue purge), shows GET /api/health reporting the
mismatch, then starts a worker. Before issue 10 the runs stayed ``queued`` for ever; now
the API's reconciler (``worker.recovery.reconcile_queued``) re-sends them once they have
been queued for ``BATCHLAB_RESEND_AFTER_S`` (5 s here) and every run succeeds.

    .venv/bin/python bench/drills/lost_message.py --broker redis|sqlite|rabbitmq [--runs 3]

Exit code 0 when every run succeeded, 1 otherwise. Everything runs on 127.0.0.1 and
in a temporary BATCHLAB_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from core.status import FINAL_STATUSES

ROOT = Path(__file__).resolve().parents[2]
BROKERS = {
    "redis": "redis://127.0.0.1:6379/8",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}
SPEC = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": 500,
    "epochs": 3,
    "batch_per_worker": 20,
    "warmup": "none",
    "milestones": [],
    "device": "cpu",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        base + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def lose_messages(kind: str, url: str) -> None:
    if kind == "redis":
        import redis

        redis.Redis.from_url(url).delete("cpu")
    elif kind == "sqlite":
        with sqlite3.connect(url.split("///", 1)[1]) as conn:
            conn.execute("DELETE FROM kombu_message")
    else:
        from kombu import Connection

        with Connection(url) as conn:
            conn.default_channel.queue_purge("cpu")


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "batchlab.cli", *args]
    out = log.open("ab")
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=["redis", "sqlite", "rabbitmq"], default="redis")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    opts = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="drill-lost-"))
    broker = BROKERS.get(opts.broker, f"sqla+sqlite:///{home / 'broker.db'}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env |= {
        "BATCHLAB_HOME": str(home),
        "BATCHLAB_BROKER_URL": broker,
        "BATCHLAB_RESEND_AFTER_S": "5",
        "OMP_NUM_THREADS": "1",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ok = False
    procs = [start(["api", "--port", str(port)], env, home / "api.log")]
    try:
        for _ in range(100):
            try:
                call(base, "/api/health")
                break
            except OSError:
                time.sleep(0.2)
        lose_messages(opts.broker, broker)  # nothing left over from an earlier drill
        ids = [call(base, "/api/runs", {"spec": SPEC})["run"]["id"] for _ in range(opts.runs)]
        lose_messages(opts.broker, broker)
        health = call(base, "/api/health")
        print(
            f"lost the messages of runs {ids}; health: queued_runs={health.get('queued_runs')} "
            f"broker_messages={health.get('broker_messages')}"
        )
        procs.append(start(["worker", "--gpus", "none"], env, home / "worker.log"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < opts.timeout:
            statuses = [call(base, f"/api/runs/{i}")["status"] for i in ids]
            if all(s in FINAL_STATUSES for s in statuses):
                break
            time.sleep(1)
        health = call(base, "/api/health")
        print(f"after {time.monotonic() - t0:.0f} s: {dict(zip(ids, statuses, strict=True))}")
        print(
            f"health: queued_runs={health.get('queued_runs')} "
            f"broker_messages={health.get('broker_messages')} reconcile={health.get('reconcile')}"
        )
        ok = all(s == "succeeded" for s in statuses)
        print("PASS: every lost run was re-sent and succeeded" if ok else f"FAIL (logs in {home})")
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        if ok:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
