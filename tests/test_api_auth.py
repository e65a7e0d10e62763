"""With a token configured, writes need `Authorization: Bearer <token>`; reads stay open."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app

SPEC = {"model": "mlp", "dataset_size": 4000, "epochs": 2, "warmup_epochs": 1}
TOKEN = "s3cret-token"


@pytest.fixture()
def client(batchlab_home, sqlite_url, tmp_path) -> Iterator[TestClient]:
    app = create_app(
        database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}", token=TOKEN
    )
    with TestClient(app) as c:
        yield c
    app.state.ctx.engine.dispose()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_writes_need_the_token(client):
    writes = [
        ("POST", "/api/runs", {"spec": SPEC}),
        ("POST", "/api/sweeps", {"spec": SPEC, "batch_sizes": [64]}),
        ("POST", "/api/runs/1/cancel", None),
        ("DELETE", "/api/runs/1", None),
    ]
    for method, path, body in writes:
        for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {TOKEN}"}):
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"].startswith("Bearer")
    # nothing was created by the refused requests
    assert client.get("/api/runs").json() == []

    r = client.post("/api/runs", json={"spec": SPEC}, headers=bearer(TOKEN))
    assert r.status_code == 201
    run_id = r.json()["run"]["id"]
    assert client.post(f"/api/runs/{run_id}/cancel", headers=bearer(TOKEN)).status_code == 200
    assert client.delete(f"/api/runs/{run_id}", headers=bearer(TOKEN)).status_code == 204


def test_reads_and_schedule_stay_open(client):
    client.post("/api/runs", json={"spec": SPEC}, headers=bearer(TOKEN))
    for path in ("/api/runs", "/api/runs/1", "/api/runs/1/metrics", "/api/sweeps", "/"):
        assert client.get(path).status_code == 200, path
    assert client.post("/api/schedule", json=SPEC).status_code == 200
    health = client.get("/api/health").json()
    assert health["auth"] is True  # tells the dashboard to ask for the token


def test_token_from_environment(batchlab_home, sqlite_url, tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHLAB_TOKEN", "from-env")
    app = create_app(database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    with TestClient(app) as c:
        assert c.post("/api/runs", json={"spec": SPEC}).status_code == 401
        r = c.post("/api/runs", json={"spec": SPEC}, headers=bearer("from-env"))
        assert r.status_code == 201
    # an empty variable means no token, as unset does
    monkeypatch.setenv("BATCHLAB_TOKEN", "")
    app = create_app(database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    with TestClient(app) as c:
        assert c.post("/api/runs", json={"spec": SPEC}).status_code == 201
        assert c.get("/api/health").json()["auth"] is False
