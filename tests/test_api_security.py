"""Inputs that must not hurt the service (issue 10, points 5-9): body size, auth before
parsing, ids past the column range, NaN and broken text, SSE during a database outage,
cross-site writes and unknown Hosts, and the OpenAPI document of those answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy.exc
from fastapi.testclient import TestClient
from support import run_async

from server import sse
from server.app import create_app
from server.middleware import BodyLimit
from trainer.schedule import Schedule

SPEC = {"model": "mlp", "dataset_size": 4000, "epochs": 2, "warmup_epochs": 1}
TOKEN = "s3cret-token"


def strict_json(text: str) -> Any:
    """json.loads refusing NaN/Infinity, as browsers' JSON.parse does."""

    def bad(token: str) -> Any:
        raise ValueError(f"invalid JSON constant {token}")

    return json.loads(text, parse_constant=bad)


@pytest.fixture()
def make_client(batchlab_home, sqlite_url, tmp_path) -> Iterator[Any]:
    apps = []

    def make(**kwargs: Any) -> TestClient:
        base_url = kwargs.pop("base_url", "http://testserver")
        kwargs.setdefault("database_url", sqlite_url)
        kwargs.setdefault("broker_url", f"sqla+sqlite:///{tmp_path / 'b.db'}")
        app = create_app(**kwargs)
        client = TestClient(app, base_url=base_url)
        client.__enter__()  # the lifespan: migrations
        apps.append((app, client))
        return client

    yield make
    for app, client in apps:
        client.__exit__(None, None, None)
        app.state.ctx.engine.dispose()


@pytest.fixture()
def client(make_client) -> TestClient:
    return make_client()


def new_run(client: TestClient, **headers: str) -> int:
    r = client.post("/api/runs", json={"spec": SPEC}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["run"]["id"]


# --- 7: body size, auth before parsing -----------------------------------------------------
def test_a_body_past_the_limit_answers_413(client, monkeypatch):
    big = b'{"spec": {"model": "mlp"}, "name": "' + b"x" * (1 << 20) + b'"}'
    r = client.post("/api/runs", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert "BATCHLAB_MAX_BODY_BYTES" in r.json()["detail"]
    assert client.get("/api/runs").json() == []


def test_the_limit_is_a_setting(make_client, monkeypatch):
    monkeypatch.setenv("BATCHLAB_MAX_BODY_BYTES", "100")
    client = make_client()
    assert client.post("/api/runs", json={"spec": SPEC, "name": "x" * 100}).status_code == 413
    assert client.post("/api/schedule", json={"model": "mlp"}).status_code == 200


def run_asgi(app: Any, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> list[dict]:
    """One POST through ``app`` with its body in ``chunks``; the messages sent back."""
    sent: list[dict] = []
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    run_async(app(scope, receive, send))
    return sent


def test_a_streamed_body_without_length_is_cut_at_the_limit():
    read: list[int] = []

    async def app(scope, receive, send) -> None:
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            total += len(message["body"])
            if not message.get("more_body"):
                break
        read.append(total)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = BodyLimit(app, limit=1000)
    sent = run_asgi(guarded, [b"x" * 600] * 5, [(b"transfer-encoding", b"chunked")])
    assert sent[0]["status"] == 413 and len(sent) == 2  # the app's answer was dropped
    assert read == [600]  # the app saw the chunks up to the limit only
    sent = run_asgi(guarded, [b"x" * 400] * 2, [])
    assert sent[0]["status"] == 200 and read[-1] == 800


def test_a_declared_length_past_the_limit_is_refused_before_reading():
    async def app(scope, receive, send) -> None:  # pragma: no cover - never reached
        raise AssertionError("the app must not run")

    sent = run_asgi(BodyLimit(app, limit=10), [b"x" * 11], [(b"content-length", b"11")])
    assert sent[0]["status"] == 413
    assert strict_json(sent[1]["body"].decode())["detail"].startswith("request body larger")


def test_the_token_is_checked_before_the_body_is_parsed(make_client):
    client = make_client(token=TOKEN)
    # A body that is not even JSON: without the token the answer is 401, not 422.
    for path in ("/api/runs", "/api/sweeps"):
        r = client.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/api/runs", content=b"{not json", headers={**auth, "content-type": "x"})
    assert r.status_code == 422
    assert client.post("/api/runs", json={"spec": SPEC}, headers=auth).status_code == 201


# --- 8: 500s that must be 4xx ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/runs/9223372036854775808", "run_id"),
        ("/api/runs/0", "run_id"),
        ("/api/runs/9223372036854775808/metrics", "run_id"),
        ("/api/runs/9223372036854775808/stream", "run_id"),
        ("/api/runs?group=9223372036854775808", "group"),
        ("/api/sweeps/9223372036854775808", "sweep_id"),
        ("/api/metrics?runs=1,9223372036854775808", "runs"),
        ("/api/runs/1/metrics?x_min=nan", "x_min"),
        ("/api/runs/1/metrics?x_max=inf", "x_max"),
        ("/api/runs/1/stream?since=9223372036854775808", "since"),
        ("/api/runs/1/stream?since=lo%00ss:3", "since"),
    ],
)
def test_out_of_range_ids_and_non_finite_queries_answer_422(client, path, field):
    new_run(client)
    r = client.get(path)
    assert r.status_code == 422, r.text
    assert [e["field"] for e in strict_json(r.text)["detail"]] == [field]


def test_ids_past_32_bits_are_valid_on_postgresql(make_client, pg_url, redis_url):
    """Ids are BIGINT there too (migration 0004): 2^31 is just an unknown run."""
    import sqlalchemy as sa

    client = make_client(database_url=pg_url, broker_url=redis_url)
    for big in (2**31, 2**63 - 1):
        assert client.get(f"/api/runs/{big}").status_code == 404
        assert client.get(f"/api/runs?group={big}").json() == []
    assert client.get(f"/api/runs/{2**63}").status_code == 422
    engine = client.app.state.ctx.engine
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT setval('runs_id_seq', :v)"), {"v": 2**40})
    assert new_run(client) == 2**40 + 1


def test_out_of_range_ids_on_writes_answer_422(client):
    assert client.post("/api/runs/9223372036854775808/cancel").status_code == 422
    assert client.delete("/api/runs/9223372036854775808").status_code == 422


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/schedule", '{"model": "mlp", "base_lr": NaN}', "base_lr"),
        ("/api/schedule", '{"model": "mlp", "milestones": [1, Infinity]}', "milestones[1]"),
        ("/api/runs", '{"spec": {"model": "mlp", "momentum": -Infinity}}', "momentum"),
        ("/api/plan/run", '{"spec": {"model": "mlp", "warmup_epochs": NaN}}', "warmup_epochs"),
        ("/api/runs", '{"spec": {"model": "mlp"}, "name": "a\\u0000b"}', "name"),
        ("/api/runs", '{"spec": {"model": "mlp"}, "name": "\\ud800"}', "name"),
        ("/api/sweeps", '{"spec": {"model": "mlp"}, "batch_sizes": [64], "seeds": [1e400]}', ""),
        (
            "/api/sweeps",
            '{"spec": {"model": "mlp"}, "name": "\\udfff", "batch_sizes": [64]}',
            "name",
        ),
    ],
)
def test_non_finite_numbers_and_broken_text_answer_an_encodable_422(client, path, body, field):
    r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = strict_json(r.content.decode("utf-8"))["detail"]  # valid UTF-8, no NaN
    if field:
        assert field in [e["field"] for e in detail]
    assert client.get("/api/runs").json() == []


def test_thirty_thousand_milestones_are_refused_fast(client):
    spec = {**SPEC, "epochs": 10_000, "milestones": [i / 3 for i in range(1, 30_001)]}
    start = time.perf_counter()
    r = client.post("/api/schedule", json=spec)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "milestones"
    assert time.perf_counter() - start < 1.0


def test_the_preview_is_linear_in_the_milestones():
    """Even past the spec's limit, a preview costs O(points log milestones)."""
    milestones = tuple(range(10, 300_010, 10))  # 30,000 step decays
    sched = Schedule(
        base_lr=0.1,
        peak_lr=0.1,
        warmup="none",
        warmup_iters=0,
        decay="step",
        milestone_iters=milestones,
        decay_factor=0.999,
        iters_per_epoch=100,
        total_iters=400_000,
    )
    start = time.perf_counter()
    preview = sched.preview(2000)
    assert time.perf_counter() - start < 1.0
    assert len(preview["step"]) > 60_000  # every jump kept
    assert sched.lr(25) == pytest.approx(0.1 * 0.999**2)


def read_events(client: TestClient, url: str) -> list[tuple[str, str]]:
    events, kind = [], None
    with client.stream("GET", url) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind:
                events.append((kind, line.split(":", 1)[1].strip()))
    return events


def test_sse_ends_with_an_error_event_when_the_database_goes_away(client, monkeypatch):
    run_id = new_run(client)
    real = sse.RunStream.load_run
    calls = []

    def flaky(self: sse.RunStream) -> Any:
        calls.append(1)
        if len(calls) > 1:  # the first read (before the answer starts) works
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database is gone"))
        return real(self)

    monkeypatch.setattr(sse.RunStream, "load_run", flaky)
    events = read_events(client, f"/api/runs/{run_id}/stream")
    assert [k for k, _ in events] == ["status", "error"]
    assert "database unavailable" in strict_json(events[-1][1])["detail"]


# --- 9: unknown Hosts, cross-site writes -------------------------------------------------
def test_unknown_hosts_are_refused_by_default(make_client, monkeypatch):
    monkeypatch.delenv("BATCHLAB_ALLOWED_HOSTS")
    client = make_client(base_url="http://localhost:8000")
    assert client.get("/api/health").status_code == 200
    for host in ("127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert client.get("/api/runs", headers={"host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", ""):
        r = client.get("/api/runs", headers={"host": host})
        assert r.status_code == 400, host
        assert "BATCHLAB_ALLOWED_HOSTS" in r.json()["detail"]
    # A rebound name cannot write either.
    r = client.post("/api/runs", json={"spec": SPEC}, headers={"host": "evil.example"})
    assert r.status_code == 400


def test_allowed_hosts_setting_and_bind_host(make_client, monkeypatch):
    monkeypatch.setenv("BATCHLAB_ALLOWED_HOSTS", "lab.example.org, gpu-box:8000")
    client = make_client(bind_host="10.0.0.5")
    for host in ("lab.example.org", "gpu-box:8000", "10.0.0.5:8000", "localhost"):
        assert client.get("/api/runs", headers={"host": host}).status_code == 200, host
    assert client.get("/api/runs", headers={"host": "other.example"}).status_code == 400
    monkeypatch.setenv("BATCHLAB_ALLOWED_HOSTS", "*")
    anything = make_client()
    assert anything.get("/api/runs", headers={"host": "other.example"}).status_code == 200


def test_cross_origin_writes_are_refused(client):
    run_id = new_run(client)
    refused = [
        {"origin": "http://evil.example"},
        {"origin": "http://testserver:9999"},  # another port is another origin
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ]
    for headers in refused:
        r = client.post(f"/api/runs/{run_id}/cancel", headers=headers)
        assert r.status_code == 403, headers
        assert client.delete(f"/api/runs/{run_id}", headers=headers).status_code == 403
    assert client.get(f"/api/runs/{run_id}").json()["status"] == "queued"
    # A form post from another site (a "simple" request) changes nothing either.
    r = client.post(
        "/api/runs",
        content=json.dumps({"spec": SPEC}),
        headers={"origin": "https://evil.example", "content-type": "text/plain"},
    )
    assert r.status_code == 403
    # Reads stay open to any page; the dashboard's own writes and non-browsers pass.
    assert client.get("/api/runs", headers={"origin": "http://evil.example"}).status_code == 200
    same = {"origin": "http://testserver", "sec-fetch-site": "same-origin"}
    assert client.post(f"/api/runs/{run_id}/cancel", headers=same).status_code == 200
    assert new_run(client) > run_id  # no Origin: the CLI and the notebook client


# --- the OpenAPI document matches the answers --------------------------------------------
def test_openapi_documents_the_error_answers(make_client):
    client = make_client(token=TOKEN)
    paths = client.get("/openapi.json").json()["paths"]
    create = paths["/api/runs"]["post"]["responses"]
    assert {"400", "401", "403", "413", "422", "201"} <= set(create)
    one = paths["/api/runs/{run_id}"]
    assert {"400", "404", "422"} <= set(one["get"]["responses"])
    assert {"401", "404"} <= set(one["delete"]["responses"])
    assert "401" not in paths["/api/schedule"]["post"]["responses"]  # open
    assert "413" in paths["/api/schedule"]["post"]["responses"]
    metrics = paths["/api/runs/{run_id}/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["application/json"]
    stream = paths["/api/runs/{run_id}/stream"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream


def test_405_names_every_method_of_the_path(client):
    run_id = new_run(client)
    r = client.put(f"/api/runs/{run_id}")
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "DELETE"}
