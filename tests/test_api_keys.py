"""GET /api/runs/{id}/keys: a run's distinct metric keys (optionally under a prefix), read
by a loose index scan whose cost does not grow with the number of points."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from server.app import create_app
from store import metrics, runs
from store.db import dispose_engines, get_engine, migrate, session
from store.metrics.queries import run_keys
from store.models import MetricPoint

HEALTH = [
    f"health/{layer}/{stat}" for layer in ("conv1", "conv2", "fc") for stat in ("dead", "w_norm")
]
KEYS = sorted(["loss", "lr", "noise_scale", "val_err", *HEALTH])


@pytest.fixture()
def app(batchlab_home, sqlite_url, tmp_path) -> Iterator[Any]:
    application = create_app(
        database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    )
    yield application
    application.state.ctx.engine.dispose()


@pytest.fixture()
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    eng = get_engine(url)
    migrate(eng)
    yield eng
    metrics.invalidate()
    dispose_engines()


def new_run(engine: Engine) -> int:
    with session(engine) as s:
        return runs.create_run(s, name="r", spec={"epochs": 1}).id


def bulk_points(engine: Engine, run_id: int, keys: list[str], steps: int) -> None:
    """``steps`` points of every key, inserted directly (the writer's speed is not tested)."""
    rows = [
        {"run_id": run_id, "key": k, "step": i, "epoch": i / 100, "wall_time": i, "value": 1.0}
        for k in keys
        for i in range(steps)
    ]
    with engine.begin() as conn:
        conn.execute(sa.insert(MetricPoint), rows)


def test_keys_endpoint(client, app) -> None:
    engine = app.state.ctx.engine
    run_id = new_run(engine)
    empty = new_run(engine)
    metrics.write_points(engine, run_id, [(s, {k: 0.5 for k in KEYS}, s / 10, s) for s in range(3)])

    r = client.get(f"/api/runs/{run_id}/keys")
    assert r.status_code == 200
    assert r.json() == {"run_id": run_id, "keys": KEYS}
    r = client.get(f"/api/runs/{run_id}/keys", params={"prefix": "health/"})
    assert r.json()["keys"] == sorted(HEALTH)
    r = client.get(f"/api/runs/{run_id}/keys", params={"prefix": "health/conv2/"})
    assert r.json()["keys"] == ["health/conv2/dead", "health/conv2/w_norm"]
    assert client.get(f"/api/runs/{run_id}/keys?prefix=nothing").json()["keys"] == []
    assert client.get(f"/api/runs/{empty}/keys").json() == {"run_id": empty, "keys": []}

    assert client.get("/api/runs/9999/keys").status_code == 404
    bad = client.get(f"/api/runs/{run_id}/keys", params={"prefix": "a b"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["query", "prefix"]
    assert client.get(f"/api/runs/{run_id}/keys", params={"prefix": "x" * 65}).status_code == 422


def test_keys_prefix_on_both_backends(engine) -> None:
    run_id = new_run(engine)
    other = new_run(engine)
    # Keys around the prefix's edges: "health" itself, "health0", "healthy" and "Health/"
    # sort next to "health/..." but are not under it.
    around = ["health", "health0", "healthy/x", "Health/a", "gealth/z", "health/a.b/dead"]
    metrics.write_points(engine, run_id, [(0, {k: 1.0 for k in around}, 0.0, 0.0)])
    metrics.write_points(engine, other, [(0, {"health/zz/dead": 1.0}, 0.0, 0.0)])
    assert metrics.keys(engine, run_id, "health/") == ["health/a.b/dead"]
    assert metrics.keys(engine, run_id) == sorted(around)
    assert metrics.keys(engine, other, "health/") == ["health/zz/dead"]


def vm_steps(engine: Engine, run_id: int, prefix: str) -> tuple[list[str], int]:
    """The keys and the SQLite virtual-machine instructions spent reading them."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    metrics.invalidate()
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        raw.set_progress_handler(tick, 1)
        try:
            got = [k for k in run_keys(conn, run_id) if k.startswith(prefix)]
        finally:
            raw.set_progress_handler(None, 1)
    return got, count[0]


def test_keys_cost_does_not_grow_with_points(sqlite_url) -> None:
    engine = get_engine(sqlite_url)
    migrate(engine)
    try:
        small, big = new_run(engine), new_run(engine)
        bulk_points(engine, small, KEYS, 10)
        bulk_points(engine, big, KEYS, 10_000)  # 110k points
        keys_small, cost_small = vm_steps(engine, small, "health/")
        keys_big, cost_big = vm_steps(engine, big, "health/")
        assert keys_small == keys_big == sorted(HEALTH)
        # A scan of the points would cost ~1000x more on the big run; the index scan costs
        # about the same (a B-tree a level or two deeper).
        assert cost_big < 2 * cost_small, (cost_small, cost_big)
        print(f"VM instructions for the keys: {cost_small} (110 points), {cost_big} (110k points)")
    finally:
        dispose_engines()
