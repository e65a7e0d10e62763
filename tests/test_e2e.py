"""End to end: the real API (uvicorn) and a real Celery worker process, over HTTP.

(a) the embedded defaults: SQLite database + SQLite broker;
(b) the production pair: PostgreSQL + Redis (required under CI=true).

Each test starts the Celery worker `batchlab worker --gpus none` runs, then over HTTP: trains a
tiny MNIST-1D run and follows it over SSE to `succeeded`, reads its downsampled history,
cancels a long run while it trains, and watches a diverging run end `diverged`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.serve import serve_in_thread
from server.sse_client import iter_events
from worker.gpus import plan_workers
from worker.launch import worker_command

ROOT = Path(__file__).resolve().parent.parent
TINY: dict[str, Any] = {
    "model": "mlp",
    "dataset": "mnist1d",
    "dataset_size": 400,  # 320 training samples: 10 iterations of 32 per epoch
    "epochs": 2,
    "warmup_epochs": 1,
    "batch_per_worker": 32,
    "ref_batch": 32,
    "base_lr": 0.05,
    "device": "cpu",
    "checkpoint": False,
}
# Long enough to be caught running (thousands of iterations), cancelled within ~1 s.
LONG = {**TINY, "epochs": 2000, "warmup_epochs": 0}
# LR 1000 x 8: the loss explodes within a few iterations.
DIVERGING = {**TINY, "workers": 8, "base_lr": 1000.0, "warmup": "none", "milestones": [1]}


@contextmanager
def worker_process(home: Path, database_url: str, broker_url: str) -> Iterator[None]:
    """The CPU Celery worker exactly as `batchlab worker --gpus none` starts it.

    Started directly rather than through the `batchlab worker` supervisor so teardown
    can end it at once (test_up.py covers the supervisor's start and clean stop).
    """
    (plan,) = plan_workers([])
    env = {
        **os.environ,
        **plan.env,
        "BATCHLAB_HOME": str(home),
        "BATCHLAB_DATABASE_URL": database_url,
        "BATCHLAB_BROKER_URL": broker_url,
        "PYTHONUNBUFFERED": "1",
    }
    log = (home / "worker.log").open("wb")
    proc = subprocess.Popen(
        worker_command(plan, loglevel="warning"),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the pool child goes with it
    )
    try:
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def follow(url: str, run_id: int, timeout: float = 60) -> tuple[list[dict], list[dict]]:
    """(status events, points) of a run's SSE stream until it ends."""
    statuses, points = [], []
    with httpx.stream("GET", f"{url}/api/runs/{run_id}/stream", timeout=timeout) as r:
        assert r.status_code == 200
        for ev in iter_events(r.iter_lines()):
            if ev.event == "status":
                statuses.append(ev.json())
            elif ev.event == "points":
                points.extend(ev.json()["points"])
    return statuses, points


def wait_status(url: str, run_id: int, want: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = httpx.get(f"{url}/api/runs/{run_id}").json()
        if run["status"] == want:
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} is {run['status']}, not {want}, after {timeout} s")


def scenario(url: str, home: Path) -> None:
    # (1) a tiny run: submitted over HTTP, followed live, history downsampled
    r = httpx.post(f"{url}/api/runs", json={"spec": TINY, "name": "tiny"}, timeout=30)
    assert r.status_code == 201, r.text
    run_id = r.json()["run"]["id"]
    statuses, points = follow(url, run_id)
    assert statuses[-1]["status"] == "succeeded", statuses[-1]
    assert statuses[-1]["summary"]["final_val_err"] is not None
    loss_steps = sorted(p["step"] for p in points if p["key"] == "loss")
    assert loss_steps == list(range(20))  # 2 epochs x 10 iterations, each exactly once
    assert {p["key"] for p in points} >= {"loss", "lr", "train_err", "val_err", "val_loss"}
    hist = httpx.get(f"{url}/api/runs/{run_id}/metrics?keys=loss,val_err&max_points=5").json()
    assert hist["series"]["loss"]["total"] == 20 and len(hist["series"]["loss"]["step"]) <= 5
    assert hist["series"]["loss"]["step"][-1] == 19
    assert hist["series"]["val_err"]["step"] == [9, 19]

    # (2) cancel a run while it trains
    run_id = httpx.post(f"{url}/api/runs", json={"spec": LONG}, timeout=30).json()["run"]["id"]
    wait_status(url, run_id, "running")
    assert httpx.post(f"{url}/api/runs/{run_id}/cancel").status_code == 200
    statuses, _ = follow(url, run_id)
    assert statuses[-1]["status"] == "cancelled"
    assert statuses[-1]["progress"] < 0.5

    # (3) a diverging spec ends diverged, at the step where it happened
    run_id = httpx.post(f"{url}/api/runs", json={"spec": DIVERGING}).json()["run"]["id"]
    statuses, _ = follow(url, run_id)
    final = statuses[-1]
    assert final["status"] == "diverged", final
    assert final["diverged_step"] is not None and final["diverged_step"] < 20

    workers = httpx.get(f"{url}/api/workers").json()["workers"]
    assert workers and workers[0]["queues"] and "cpu" in workers[0]["queues"]


@pytest.mark.slow
def test_e2e_sqlite(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    database_url = f"sqlite:///{home / 'batchlab.db'}"
    broker_url = f"sqla+sqlite:///{home / 'broker.db'}"
    app = create_app(database_url=database_url, broker_url=broker_url)
    with serve_in_thread(app) as url, worker_process(home, database_url, broker_url):
        scenario(url, home)
    app.state.ctx.engine.dispose()


@pytest.mark.slow
@pytest.mark.services
def test_e2e_postgres_redis(tmp_path, pg_url, redis_url):
    home = tmp_path / "home"
    home.mkdir()
    app = create_app(database_url=pg_url, broker_url=redis_url)
    with serve_in_thread(app) as url, worker_process(home, pg_url, redis_url):
        scenario(url, home)
    app.state.ctx.engine.dispose()
