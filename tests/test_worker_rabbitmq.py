"""RabbitMQ as the broker: durable queues, publisher confirms, a real worker end to end.

Skipped without RabbitMQ on 127.0.0.1:5672, failing instead under CI=true
(tests/conftest.py). Uses the default vhost; the test purges its queues before and after.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_worker import (
    WorkerProcess,
    assert_complete,
    create_run,
    get_run,
    tiny_spec,
    wait_for,
    worker_env,
)

from store import db

pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_rabbitmq_broker_end_to_end(rabbitmq_url: str, sqlite_url: str, tmp_path: Path) -> None:
    from worker import recovery
    from worker.celery_app import enqueue, inspect_workers, make_app

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    app = make_app(rabbitmq_url)
    assert app.conf.broker_transport_options["confirm_publish"] is True
    home = tmp_path / "home"
    home.mkdir()
    env = worker_env(home, database_url=sqlite_url, broker_url=rabbitmq_url)
    worker = WorkerProcess.celery(env, tmp_path / "worker.log")
    try:
        spec = tiny_spec()
        run_id = create_run(engine, spec)
        enqueue(run_id, spec, celery_app=app, engine=engine)
        run = wait_for(engine, run_id, ("succeeded", "failed", "diverged"), 90, worker)
        assert run.status == "succeeded", run.error
        assert_complete(engine, run_id, spec)
        assert run.attempts == 1

        # A second delivery of a finished run is acknowledged without training it.
        enqueue(run_id, spec, celery_app=app, queue="cpu")
        last = create_run(engine, spec)
        enqueue(last, spec, celery_app=app, engine=engine)
        assert wait_for(engine, last, ("succeeded", "failed"), 60, worker).status == "succeeded"
        assert get_run(engine, run_id).attempts == 1

        # The queue is durable: redeclaring it transient is refused (406).
        with app.connection_for_write() as conn, pytest.raises(Exception, match="PRECONDITION"):
            conn.channel().queue_declare("cpu", durable=False)

        # A message lost while no worker serves its queue: RabbitMQ only counts messages,
        # so the reconciler compares counts and sends it again, once.
        gpu_spec = tiny_spec(device="cuda")
        gpu_id = create_run(engine, gpu_spec)
        enqueue(gpu_id, gpu_spec, celery_app=app, engine=engine)
        assert inspect_workers(engine, celery_app=app)["queues"]["gpu"] == 1
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge("gpu")
        later = datetime.now(UTC) + timedelta(seconds=120)
        report = recovery.reconcile_queued(engine, celery_app=app, now=later)
        assert (report.exact, report.broker_messages, report.resent) == (False, 0, [gpu_id])
        assert recovery.reconcile_queued(engine, celery_app=app, now=later).resent == []
        info = inspect_workers(engine, celery_app=app)
        assert info["queues"]["gpu"] == 1 and info["queues"]["cpu"] == 0
    finally:
        worker.stop()
