"""The compose / production setting: Redis as the broker, PostgreSQL as the store.

A real Celery worker consumes from Redis and writes to a fresh PostgreSQL database;
runs go through it as they do from the API. Skipped without the services, failing
instead under CI=true (tests/conftest.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_worker import (
    WorkerProcess,
    assert_complete,
    create_run,
    point_counts,
    tiny_spec,
    wait_for,
    worker_env,
)

from store import db, runs

pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_redis_broker_postgres_store(redis_url: str, pg_url: str, tmp_path: Path) -> None:
    from worker.celery_app import enqueue, inspect_workers, make_app

    engine = db.get_engine(pg_url)
    db.migrate(engine)
    app = make_app(redis_url)
    home = tmp_path / "home"
    home.mkdir()
    worker = WorkerProcess.celery(
        worker_env(home, database_url=pg_url, broker_url=redis_url), tmp_path / "worker.log"
    )
    try:
        # A run on the queue before the worker is up waits for it.
        spec = tiny_spec()
        run_id = create_run(engine, spec)
        enqueue(run_id, spec, celery_app=app, engine=engine)
        run = wait_for(engine, run_id, ("succeeded", "failed", "diverged"), 60, worker)
        assert run.status == "succeeded", run.error
        assert_complete(engine, run_id, spec)
        assert run.attempts == 1 and run.worker and run.worker.startswith("cpu@")

        # Cancel over the same path.
        long = tiny_spec(epochs=2000)
        cancel_id = create_run(engine, long)
        enqueue(cancel_id, long, celery_app=app, engine=engine)
        wait_for(engine, cancel_id, ("running",), 30, worker)
        while not point_counts(engine, cancel_id).get("loss"):
            time.sleep(0.05)
        asked = time.monotonic()
        with db.session(engine) as s:
            runs.request_cancel(s, cancel_id)
        run = wait_for(engine, cancel_id, ("cancelled", "succeeded", "failed"), 10, worker)
        assert run.status == "cancelled" and time.monotonic() - asked < 5

        # Queue lengths come from Redis: a CUDA run waits on "gpu", where nobody listens.
        gpu_spec = tiny_spec(device="cuda")
        gpu_id = create_run(engine, gpu_spec)
        enqueue(gpu_id, gpu_spec, celery_app=app, engine=engine)
        info = inspect_workers(engine, celery_app=app)
        assert info["queues"]["gpu"] == 1 and info["queues"]["cpu"] == 0
        (me,) = info["workers"]
        assert me["queues"] == ["cpu"] and me["alive"]
    finally:
        worker.stop()
