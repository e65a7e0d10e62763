"""Queued runs whose broker message was lost are sent again (worker.recovery.reconcile_queued),
and a duplicate message never trains a run twice (store.runs.claim)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_worker import create_run, get_run, tiny_spec

from store import db, runs
from worker import inflight, recovery
from worker.celery_app import enqueue, make_app

LATER = timedelta(seconds=120)  # past the default 60 s bound


@pytest.fixture()
def engine(sqlite_url: str) -> Any:
    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    return engine


@pytest.fixture()
def broker(tmp_path: Path) -> str:
    return f"sqla+sqlite:///{tmp_path / 'broker.db'}"


def _queued(engine: Any, app: Any) -> int:
    spec = tiny_spec()
    run_id = create_run(engine, spec)
    enqueue(run_id, spec, celery_app=app, engine=engine)
    return run_id


def _lose_sqlite_messages(broker: str) -> None:
    conn = sqlite3.connect(broker.split("///", 1)[1])
    with conn:
        conn.execute("DELETE FROM kombu_message")
    conn.close()


def test_a_lost_message_is_sent_again_once(engine: Any, broker: str) -> None:
    app = make_app(broker)
    run_id = _queued(engine, app)
    assert inflight.in_flight(app, ["cpu"]).run_ids == {run_id}
    later = datetime.now(UTC) + LATER

    # Its message is in the broker: waiting long is not being lost.
    report = recovery.reconcile_queued(engine, celery_app=app, now=later)
    assert (report.queued_runs, report.broker_messages, report.resent) == (1, 1, [])
    assert report.exact

    _lose_sqlite_messages(broker)
    # Younger than the bound: a send may still be on its way.
    young = recovery.reconcile_queued(engine, celery_app=app, now=datetime.now(UTC))
    assert young.resent == [] and young.broker_messages == 0

    report = recovery.reconcile_queued(engine, celery_app=app, now=later)
    assert report.missing == report.resent == [run_id]
    assert inflight.in_flight(app, ["cpu"]).run_ids == {run_id}
    # The next pass finds the new message and sends nothing.
    assert recovery.reconcile_queued(engine, celery_app=app, now=later).resent == []
    assert recovery.last_report(engine) is not None


def test_runs_no_longer_queued_are_not_sent(engine: Any, broker: str) -> None:
    app = make_app(broker)
    cancelled, running = _queued(engine, app), _queued(engine, app)
    with db.session(engine) as s:
        runs.request_cancel(s, cancelled)
        assert runs.claim(s, running, host="h", gpus="", worker="w") is not None
    _lose_sqlite_messages(broker)
    report = recovery.reconcile_queued(engine, celery_app=app, now=datetime.now(UTC) + LATER)
    assert (report.queued_runs, report.resent) == (0, [])


def test_a_transport_that_only_counts_resends_by_count(
    engine: Any, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ cannot list its messages: two queued runs beside one message are both
    re-sent, once per bound; as many messages as runs means nothing is missing."""
    app = make_app(broker)
    ids = [_queued(engine, app), _queued(engine, app)]
    counts = {"cpu": 1, "gpu": 0}
    monkeypatch.setattr(
        inflight, "in_flight", lambda *a, **k: inflight.InFlight(dict(counts), None)
    )
    sent: list[int] = []
    later = datetime.now(UTC) + LATER

    def send(run_id: int, spec: Any) -> None:
        sent.append(run_id)

    report = recovery.reconcile_queued(engine, enqueue=send, now=later)
    assert not report.exact and report.resent == sent == ids
    assert recovery.reconcile_queued(engine, enqueue=send, now=later).resent == []
    counts["cpu"] = 2
    far = later + LATER
    assert recovery.reconcile_queued(engine, enqueue=send, now=far).resent == []


def test_a_broker_that_does_not_answer_is_reported(engine: Any) -> None:
    app = make_app("redis://127.0.0.1:1/0")
    create_run(engine, tiny_spec())
    report = recovery.reconcile_queued(engine, celery_app=app, now=datetime.now(UTC) + LATER)
    assert report.resent == [] and report.broker_messages is None
    assert report.error and report.to_dict()["queued_runs"] == 1


def test_two_deliveries_of_one_run_train_it_once(engine: Any) -> None:
    from worker.tasks import execute

    run_id = create_run(engine, tiny_spec())
    with db.session(engine) as s:
        first = runs.claim(s, run_id, host="h", gpus="", worker="w1")
        second = runs.claim(s, run_id, host="h", gpus="", worker="w2")
    assert first is not None and second is None
    # The duplicate message, as the task handles it: acknowledged, nothing trained.
    assert execute(engine, run_id, worker="w2") == "skipped"
    run = get_run(engine, run_id)
    assert (run.status, run.attempts, run.worker) == ("running", 1, "w1")


def test_message_parsing_ignores_other_tasks() -> None:
    app = make_app("memory://")
    message = app.amqp.as_task_v2("x", "batchlab.train_run", args=[42])
    payload = {
        "headers": message.headers,
        "body": __import__("json").dumps(message.body),
        "properties": {},
    }
    assert inflight.run_id_of(payload) == 42
    payload["headers"] = {**message.headers, "task": "other"}
    assert inflight.run_id_of(payload) is None
    assert inflight.run_id_of("not json") is None


def test_health_reports_queued_runs_against_broker_messages(
    batchlab_home: str, sqlite_url: str, broker: str
) -> None:
    from server.app import create_app

    app = create_app(database_url=sqlite_url, broker_url=broker)
    with TestClient(app) as c:
        ctx = app.state.ctx
        spec = tiny_spec()
        for _ in range(3):
            enqueue(create_run(ctx.engine, spec), spec, celery_app=ctx.celery, engine=ctx.engine)
        _lose_sqlite_messages(broker)
        enqueue(create_run(ctx.engine, spec), spec, celery_app=ctx.celery, engine=ctx.engine)
        body = c.get("/api/health").json()
        assert (body["queued_runs"], body["broker_messages"]) == (4, 1)
        assert body["status"] == "ok" and "reconcile" in body
    ctx.engine.dispose()


@pytest.mark.services
def test_redis_lost_messages_are_found_and_resent(redis_url: str, engine: Any) -> None:
    import redis

    app = make_app(redis_url)
    client = redis.Redis.from_url(redis_url)
    client.delete("cpu")
    ids = [_queued(engine, app), _queued(engine, app)]
    assert inflight.in_flight(app, ["cpu", "gpu"]).run_ids == set(ids)
    client.delete("cpu")  # what a Redis restart without AOF does to the queue
    view = inflight.in_flight(app, ["cpu", "gpu"])
    assert view.run_ids == set() and view.total == 0
    report = recovery.reconcile_queued(engine, celery_app=app, now=datetime.now(UTC) + LATER)
    assert report.resent == ids
    assert inflight.in_flight(app, ["cpu"]).run_ids == set(ids)
    client.delete("cpu")
