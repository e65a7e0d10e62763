"""The REST API against a real SQLite store and a real SQLite Celery broker (no worker).

Every endpoint of docs/api.md, its 404s and 422s, that a bad request stores nothing, that
messages really land on the queue, NaN -> null, and the SSE stream over a real uvicorn.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from kombu import Connection

from server import readcache
from server.app import create_app
from server.serve import serve_in_thread
from server.sse_client import iter_events
from store import db, metrics, models, runs

# 4000 MNIST-1D samples -> 3200 training samples; kn=ref_batch=32 is the baseline.
SPEC: dict[str, Any] = {
    "model": "mlp",
    "dataset": "mnist1d",
    "dataset_size": 4000,
    "epochs": 4,
    "warmup_epochs": 1,
    "batch_per_worker": 32,
    "workers": 4,
    "ref_batch": 32,
    "base_lr": 0.05,
}


@pytest.fixture()
def app(batchlab_home, sqlite_url, broker_url) -> Iterator[Any]:
    application = create_app(database_url=sqlite_url, broker_url=broker_url)
    yield application
    application.state.ctx.engine.dispose()


@pytest.fixture()
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as c:  # the context runs the lifespan: migrations
        yield c


def queued(broker_url: str, queue: str = "cpu") -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message waiting on ``queue``; consumes them."""
    out = []
    with Connection(broker_url) as conn:
        q = conn.SimpleQueue(queue)
        try:
            while True:
                try:
                    msg = q.get_nowait()
                except q.Empty:
                    break
                out.append((msg.headers["task"], msg.payload[0]))
                msg.ack()
        finally:
            q.close()
    return out


def strict_json(text: str) -> Any:
    """json.loads that rejects NaN/Infinity (which browsers' JSON.parse rejects too)."""

    def bad(token: str) -> Any:
        raise ValueError(f"invalid JSON constant {token}")

    return json.loads(text, parse_constant=bad)


def post_run(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post("/api/runs", json={"spec": SPEC, **body})
    assert r.status_code == 201, r.text
    return r.json()


# --- runs ---------------------------------------------------------------------------------
def test_create_run_stores_and_queues(client, broker_url):
    out = post_run(client)
    run = out["run"]
    assert out["baseline"] is None and out["group_id"] is None
    assert run["status"] == "queued"
    assert run["name"] == "kn=128 k=4 n=32 gradual"
    assert run["spec"]["workers"] == 4 and run["spec"]["momentum"] == 0.9  # defaults filled
    assert run["derived"] == {
        "total_batch": 128,
        "peak_lr": pytest.approx(0.2),
        "update_batch": 128,
        "iters_per_epoch": 25,
        "total_iters": 100,
    }
    assert client.get(f"/api/runs/{run['id']}").json()["id"] == run["id"]
    assert queued(broker_url) == [("batchlab.train_run", [run["id"]])]


def test_create_run_with_baseline(client, broker_url):
    out = post_run(client, name="big", baseline=True)
    run, base = out["run"], out["baseline"]
    assert run["name"] == "big"
    assert base["is_baseline"] and not run["is_baseline"]
    assert run["baseline_id"] == base["id"]
    assert base["spec"]["workers"] * base["spec"]["batch_per_worker"] == 32
    assert base["spec"]["warmup"] == "none"
    assert run["group_id"] == base["group_id"] == out["group_id"]
    # the baseline is queued first, then the run
    assert queued(broker_url) == [
        ("batchlab.train_run", [base["id"]]),
        ("batchlab.train_run", [run["id"]]),
    ]
    group = client.get(f"/api/sweeps/{out['group_id']}").json()
    assert group["sweep"]["kind"] == "compare"
    assert group["baseline_id"] == base["id"]
    assert sorted(group["sweep"]["run_ids"]) == sorted([run["id"], base["id"]])
    assert client.get("/api/sweeps").json() == []  # sweeps only, by default
    assert [g["id"] for g in client.get("/api/sweeps?kind=compare").json()] == [out["group_id"]]


def test_run_at_ref_batch_is_its_own_baseline(client, broker_url):
    out = post_run(client, spec={**SPEC, "workers": 1}, baseline=True)
    assert out["baseline"] is None and out["run"]["is_baseline"]
    assert len(queued(broker_url)) == 1


@pytest.mark.parametrize(
    ("spec_update", "field"),
    [
        ({"batch_per_worker": 4096}, "batch_per_worker"),  # kn larger than the training set
        ({"lr": 0.1}, "lr"),  # unknown field
        ({"model": "resnet20"}, "dataset"),  # model/dataset shapes differ
        ({"warmup_epochs": 10}, "warmup_epochs"),  # longer than training
        ({"norm": "bn_ghost", "ghost_batch": 5}, "ghost_batch"),  # must divide n
        ({"nproc": 3}, "nproc"),  # must divide k
        ({"base_lr": -1}, "base_lr"),
        ({"milestones": [3, 2]}, "milestones"),
    ],
)
def test_bad_spec_answers_422_naming_the_field(client, broker_url, spec_update, field):
    r = client.post("/api/runs", json={"spec": {**SPEC, **spec_update}, "baseline": True})
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert ["body", "spec", field] in locs
    assert client.get("/api/runs").json() == []
    assert client.get("/api/sweeps").json() == []
    assert queued(broker_url) == []


def test_bad_body_fields(client):
    r = client.post("/api/runs", json={"spec": SPEC, "extra": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "extra"]
    r = client.post("/api/runs", json={"name": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "spec"]
    r = client.post("/api/runs", json={"spec": SPEC, "name": "x" * 201})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]


def test_list_filters(client):
    a = post_run(client)["run"]
    pair = post_run(client, baseline=True)
    b, base = pair["run"], pair["baseline"]
    with db.session(client.app.state.ctx.engine) as s:
        runs.mark_running(s, a["id"], host="h", gpus="", worker="w")
    ids = [r["id"] for r in client.get("/api/runs").json()]
    assert ids == sorted(ids, reverse=True) and set(ids) == {a["id"], b["id"], base["id"]}
    assert [r["id"] for r in client.get("/api/runs?status=running").json()] == [a["id"]]
    assert {r["id"] for r in client.get(f"/api/runs?group={pair['group_id']}").json()} == {
        b["id"],
        base["id"],
    }
    r = client.get("/api/runs?status=bogus")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "status"]


def test_unknown_ids_answer_404(client):
    for method, path in [
        ("GET", "/api/runs/999"),
        ("POST", "/api/runs/999/cancel"),
        ("DELETE", "/api/runs/999"),
        ("GET", "/api/runs/999/metrics"),
        ("GET", "/api/runs/999/stream"),
        ("GET", "/api/sweeps/999"),
    ]:
        r = client.request(method, path)
        assert r.status_code == 404, (method, path, r.text)
        assert "999 not found" in r.json()["detail"]


def test_cancel(client):
    queued_run = post_run(client)["run"]
    r = client.post(f"/api/runs/{queued_run['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    running = post_run(client)["run"]
    with db.session(client.app.state.ctx.engine) as s:
        runs.mark_running(s, running["id"], host="h", gpus="", worker="w")
    body = client.post(f"/api/runs/{running['id']}/cancel").json()
    # a running run stops at the worker's next poll; the flag is what the worker reads
    assert body["status"] == "running" and body["cancel_requested"] is True
    with db.session(client.app.state.ctx.engine) as s:
        assert runs.cancel_requested(s, running["id"])


def test_delete(client):
    engine = client.app.state.ctx.engine
    pair = post_run(client, baseline=True)
    run, base = pair["run"], pair["baseline"]
    with db.session(engine) as s:
        runs.mark_running(s, run["id"], host="h", gpus="", worker="w")
    metrics.write_points(engine, run["id"], [(0, {"loss": 1.0}, 0.0, 0.0)])
    assert client.delete(f"/api/runs/{run['id']}").status_code == 204
    assert client.get(f"/api/runs/{run['id']}").status_code == 404
    assert metrics.read_series(engine, run["id"], ["loss"])["loss"]["total"] == 0
    with db.session(engine) as s:  # the worker sees the run gone and stops
        assert runs.cancel_requested(s, run["id"])
    # deleting a baseline leaves the runs that pointed at it, without the pointer
    other = post_run(client)["run"]
    with db.session(engine) as s:
        runs.get_run(s, other["id"]).baseline_id = base["id"]
    assert client.delete(f"/api/runs/{base['id']}").status_code == 204
    assert client.get(f"/api/runs/{other['id']}").json()["baseline_id"] is None


# --- metrics ------------------------------------------------------------------------------
def test_metrics_downsampled_with_nan_as_null(client):
    engine = client.app.state.ctx.engine
    run_id = post_run(client)["run"]["id"]
    n = 5000
    points = []
    for i in range(n):
        loss = math.nan if i == 10 else (math.inf if i == 11 else 1.0 / (i + 1))
        points.append((i, {"loss": loss, "lr": 0.1}, i / 100, i * 0.01))
    metrics.write_points(engine, run_id, points)

    r = client.get(f"/api/runs/{run_id}/metrics?keys=loss,lr&max_points=200")
    assert r.status_code == 200
    body = strict_json(r.text)
    assert body["run_id"] == run_id and set(body["series"]) == {"loss", "lr"}
    loss = body["series"]["loss"]
    assert loss["total"] == n
    assert 2 <= len(loss["step"]) <= 200
    assert len(loss["step"]) == len(loss["value"]) == len(loss["epoch"]) == len(loss["wall_time"])
    assert loss["step"][-1] == n - 1  # the last point is always kept

    full = strict_json(client.get(f"/api/runs/{run_id}/metrics?keys=loss&max_points=100000").text)
    values = full["series"]["loss"]["value"]
    assert values[10] is None and values[11] is None and values[12] == pytest.approx(1 / 13)

    # x axis and range
    r = client.get(f"/api/runs/{run_id}/metrics?keys=lr&x=epoch&x_min=10&x_max=20")
    lr = r.json()["series"]["lr"]
    assert lr["total"] == 1001 and min(lr["epoch"]) >= 10 and max(lr["epoch"]) <= 20

    # default keys: what the run page plots
    assert set(client.get(f"/api/runs/{run_id}/metrics").json()["series"]) == {
        "loss",
        "train_err",
        "lr",
        "val_loss",
        "val_err",
    }


def test_batch_metrics(client):
    engine = client.app.state.ctx.engine
    a = post_run(client)["run"]["id"]
    b = post_run(client)["run"]["id"]
    metrics.write_points(engine, a, [(i, {"train_err": 0.5}, i / 10, float(i)) for i in range(30)])
    metrics.write_points(engine, b, [(i, {"train_err": 0.4}, i / 5, float(i)) for i in range(10)])
    r = client.get(f"/api/metrics?runs={a},{b},777&keys=train_err&x=epoch&max_points=1000")
    body = strict_json(r.text)
    assert set(body["runs"]) == {str(a), str(b)} and body["missing"] == [777]
    assert body["runs"][str(a)]["train_err"]["total"] == 30
    assert body["runs"][str(b)]["train_err"]["epoch"][-1] == pytest.approx(1.8)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("keys=loss;drop", "keys"),
        ("x=time", "x"),
        ("max_points=1", "max_points"),
    ],
)
def test_metrics_bad_query(client, query, field):
    run_id = post_run(client)["run"]["id"]
    r = client.get(f"/api/runs/{run_id}/metrics?{query}")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", field]
    r = client.get("/api/metrics?runs=1,x")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "runs"]


# --- sweeps -------------------------------------------------------------------------------
def test_sweep(client, broker_url):
    r = client.post("/api/sweeps", json={"spec": SPEC, "batch_sizes": [64, 128], "seeds": [0, 1]})
    assert r.status_code == 201, r.text
    out = r.json()
    sweep, created = out["sweep"], out["runs"]
    # one baseline (kn=32) per seed, then one run per (batch size, seed)
    sizes = [(r["derived"]["total_batch"], r["spec"]["seed"]) for r in created]
    assert sizes == [(32, 0), (32, 1), (64, 0), (64, 1), (128, 0), (128, 1)]
    assert sweep["kind"] == "sweep" and sweep["batch_sizes"] == [64, 128]
    assert sweep["seeds"] == [0, 1]
    bases = {r["spec"]["seed"]: r["id"] for r in created if r["is_baseline"]}
    for r in created:
        if not r["is_baseline"]:
            assert r["baseline_id"] == bases[r["spec"]["seed"]]
    assert [args[0] for _, args in queued(broker_url)] == [r["id"] for r in created]
    assert [g["id"] for g in client.get("/api/sweeps").json()] == [sweep["id"]]

    # summary rows come from each run's summary
    engine = client.app.state.ctx.engine
    with db.session(engine) as s:
        runs.mark_running(s, created[2]["id"], host="h", gpus="", worker="w")
        runs.mark_finished(
            s,
            created[2]["id"],
            "succeeded",
            summary={"final_val_err": 0.2, "iters_to_target": 40, "loss_oscillation": math.nan},
        )
    detail = strict_json(client.get(f"/api/sweeps/{sweep['id']}").text)
    assert detail["baseline_id"] == created[0]["id"]
    row = next(r for r in detail["summary"] if r["run_id"] == created[2]["id"])
    assert row["status"] == "succeeded" and row["final_val_err"] == 0.2
    assert row["iters_to_target"] == 40 and row["loss_oscillation"] is None
    assert (row["total_batch"], row["workers"], row["batch_per_worker"]) == (64, 2, 32)
    assert row["peak_lr"] == pytest.approx(0.1) and row["seed"] == 0
    assert [r["total_batch"] for r in detail["summary"]] == [32, 32, 64, 64, 128, 128]


def test_sweep_with_ref_batch_in_list_adds_no_extra_baseline(client, broker_url):
    out = client.post("/api/sweeps", json={"spec": SPEC, "batch_sizes": [32, 256]}).json()
    assert [(r["derived"]["total_batch"], r["is_baseline"]) for r in out["runs"]] == [
        (32, True),
        (256, False),
    ]
    assert out["runs"][1]["baseline_id"] == out["runs"][0]["id"]
    assert len(queued(broker_url)) == 2


@pytest.mark.parametrize(
    ("body_update", "loc"),
    [
        ({"batch_sizes": [64, 8192]}, ["body", "batch_sizes", 1]),  # kn > training set
        ({"batch_sizes": [64, 0]}, ["body", "batch_sizes", 1]),
        ({"batch_sizes": []}, ["body", "batch_sizes"]),
        ({"batch_sizes": [64, 64]}, ["body", "batch_sizes"]),
        ({"seeds": [-1]}, ["body", "seeds", 0]),
        ({"spec": {**SPEC, "epochs": 0}}, ["body", "spec", "epochs"]),
    ],
)
def test_bad_sweep_answers_422_and_stores_nothing(client, broker_url, body_update, loc):
    body = {"spec": SPEC, "batch_sizes": [64, 128], **body_update}
    r = client.post("/api/sweeps", json=body)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["detail"]]
    if loc == ["body", "batch_sizes", 1] and body["batch_sizes"][1] == 8192:
        assert "8192" in r.json()["detail"][0]["msg"]
    assert client.get("/api/runs").json() == []
    assert client.get("/api/sweeps").json() == []
    assert queued(broker_url) == []


# --- schedule, workers, health --------------------------------------------------------------
def test_schedule_preview(client):
    r = client.post("/api/schedule", json={**SPEC, "warmup": "gradual"})
    assert r.status_code == 200
    body = r.json()
    assert (body["iters_per_epoch"], body["total_iters"], body["warmup_iters"]) == (25, 100, 25)
    assert body["total_batch"] == 128 and body["peak_lr"] == pytest.approx(0.2)
    assert body["lr"][0] == pytest.approx(0.05)  # gradual warmup starts at base_lr
    assert body["lr"][25] == pytest.approx(0.2)
    assert len(body["step"]) == len(body["epoch"]) == len(body["lr"]) == 100

    r = client.post("/api/schedule", json={**SPEC, "epochs": 100000})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "epochs"]
    r = client.post("/api/schedule", json={**SPEC, "epochs": 1000}, params={"max_points": 50})
    assert r.status_code == 200 and len(r.json()["step"]) < 60


def test_plan_preview_is_what_a_submit_creates(client, broker_url):
    """POST /api/plan/{run,sweep} take the submit's body and store nothing."""
    beat(client, "cpu-1@box", ["cpu"])  # a live worker serves the runs' queue: no warning
    body = {"spec": SPEC, "name": "big", "baseline": True}
    plan = client.post("/api/plan/run", json=body).json()
    base, run = plan["runs"]
    assert (base["is_baseline"], run["is_baseline"], run["baseline_index"]) == (True, False, 0)
    assert base["derived"] == {
        "total_batch": 32,
        "peak_lr": pytest.approx(0.05),
        "update_batch": 32,
        "iters_per_epoch": 100,
        "total_iters": 400,
    }
    assert base["spec"]["warmup"] == "none" and run["derived"]["peak_lr"] == pytest.approx(0.2)
    assert plan["errors"] == [] and plan["warnings"] == []
    assert client.get("/api/runs").json() == [] and queued(broker_url) == []
    created = post_run(client, name="big", baseline=True)
    assert [(r["name"], r["spec"]) for r in plan["runs"]] == [
        (created[k]["name"], created[k]["spec"]) for k in ("baseline", "run")
    ]
    own = client.post("/api/plan/run", json={"spec": {**SPEC, "workers": 1}, "baseline": True})
    assert own.json()["warnings"] == ["kn = ref_batch: this run is its own baseline"]

    # A sweep: the sizes that cannot run are listed as 422 items, the others planned.
    body = {"spec": SPEC, "batch_sizes": [64, 8192], "seeds": [0, 1]}
    plan = client.post("/api/plan/sweep", json=body).json()
    got = [
        (r["derived"]["total_batch"], r["spec"]["seed"], r["baseline_index"]) for r in plan["runs"]
    ]
    assert got == [(32, 0, None), (32, 1, None), (64, 0, 0), (64, 1, 1)]
    (error,) = plan["errors"]
    refused = client.post("/api/sweeps", json=body)
    assert refused.status_code == 422 and len(refused.json()["detail"]) == 1
    assert refused.json()["detail"][0].items() >= error.items()
    assert error["loc"] == ["body", "batch_sizes", 1] and error["input"] == 8192

    # The body is validated as the submit's: 422 naming the field.
    r = client.post("/api/plan/sweep", json={**body, "spec": {**SPEC, "epochs": 0}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "spec", "epochs"]
    r = client.post("/api/plan/run", json={"spec": SPEC, "batch_sizes": [64]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "batch_sizes"]


def beat(client: TestClient, name: str, queues: list[str], *, age_s: float = 0) -> None:
    """A worker's heartbeat row, ``age_s`` seconds old."""
    with db.session(client.app.state.ctx.engine) as s:
        gpus = "" if queues == ["cpu"] else "0"
        runs.record_worker(s, name=name, host="box", gpus=gpus, queues=queues)
        s.get(models.WorkerBeat, name).last_seen -= timedelta(seconds=age_s)


def test_a_queued_run_says_why_it_waits(client, broker_url):
    gpu = post_run(client, spec={**SPEC, "device": "cuda"})["run"]
    pair = post_run(client, spec={**SPEC, "device": "cuda", "nproc": 4})["run"]
    cpu = post_run(client, spec={**SPEC, "device": "cpu"})["run"]
    assert (gpu["queue"], pair["queue"], cpu["queue"]) == ("gpu", "gpu4", "cpu")
    assert gpu["waiting_for"] == "no live worker serves queue gpu"  # the submit's answer too

    def reasons() -> dict[int, str | None]:
        listed = {r["id"]: r["waiting_for"] for r in client.get("/api/runs").json()}
        for run_id, why in listed.items():  # one run and the list agree
            assert client.get(f"/api/runs/{run_id}").json()["waiting_for"] == why
        return listed

    assert reasons() == {
        gpu["id"]: "no live worker serves queue gpu",
        pair["id"]: "no live worker serves queue gpu4",
        cpu["id"]: "no live worker serves queue cpu",
    }
    # A CPU worker alive, a GPU worker silent for longer than WORKER_STALE_S (30 s).
    beat(client, "cpu-1@box", ["cpu"])
    beat(client, "gpu0@box", ["gpu"], age_s=60)
    assert reasons() == {
        gpu["id"]: "no live worker serves queue gpu",
        pair["id"]: "no live worker serves queue gpu4",
        cpu["id"]: None,
    }
    beat(client, "gpu0@box", ["gpu"])  # a fresh beat
    assert reasons()[gpu["id"]] is None
    # Not queued: no reason, whatever the workers.
    with db.session(client.app.state.ctx.engine) as s:
        runs.request_cancel(s, pair["id"])
    assert reasons()[pair["id"]] is None
    # A run that trained says on what (the worker records it when the run starts).
    with db.session(client.app.state.ctx.engine) as s:
        runs.mark_running(s, cpu["id"], host="box", gpus="", worker="cpu-1@box")
        assert runs.record_device(s, cpu["id"], "cpu (2 cores), torch 2.13.0+cpu", attempt=1)
        assert not runs.record_device(s, gpu["id"], "cpu", attempt=1)  # not running
    # A worker's change shows within the poll cache's lifetime (server/readcache.py):
    # this test asked often enough for its answers to be shared.
    time.sleep(readcache.TTL_S)
    got = client.get(f"/api/runs/{cpu['id']}").json()
    assert got["device"] == "cpu (2 cores), torch 2.13.0+cpu" and got["waiting_for"] is None


def test_plan_preview_names_the_queue_and_warns_when_nobody_serves_it(client):
    def plan(device: str, **spec: Any) -> dict[str, Any]:
        body = {"spec": {**SPEC, "device": device, **spec}}
        return client.post("/api/plan/run", json=body).json()

    none = plan("cuda")
    assert [r["queue"] for r in none["runs"]] == ["gpu"]
    assert none["warnings"] == [
        "no live worker serves queue gpu: the run waits until one starts "
        "(batchlab worker --gpus all)"
    ]
    assert plan("cuda", nproc=2, workers=2)["warnings"][0].endswith(
        "(batchlab worker --gpus 0,1 --group)"
    )
    # Only a CPU worker: auto goes to cpu and is served; cuda still waits on gpu.
    beat(client, "cpu-1@box", ["cpu"])
    auto = plan("auto")
    assert ([r["queue"] for r in auto["runs"]], auto["warnings"]) == (["cpu"], [])
    assert [r["queue"] for r in plan("cuda")["runs"]] == ["gpu"] and plan("cuda")["warnings"]
    # A GPU worker alive: auto goes there.
    beat(client, "gpu0@box", ["gpu"])
    auto = plan("auto")
    assert ([r["queue"] for r in auto["runs"]], auto["warnings"]) == (["gpu"], [])
    # A 2-node run with one live worker on its queue would wait: the preview says so.
    two = plan("cpu", nodes=2, workers=2)
    assert two["warnings"] == [
        "nodes=2: only 1 live worker serves queue cpu; the run waits until 2 do "
        "(start `batchlab worker --gpus none` on more machines, docs/deploy.md)"
    ]
    beat(client, "cpu-2@other", ["cpu"])
    assert plan("cpu", nodes=2, workers=2)["warnings"] == []


def test_workers(client, broker_url):
    post_run(client)
    with db.session(client.app.state.ctx.engine) as s:
        runs.record_worker(s, name="celery@box-cpu", host="box", gpus="", queues=["cpu"])
    body = client.get("/api/workers").json()
    assert [w["name"] for w in body["workers"]] == ["celery@box-cpu"]
    assert body["workers"][0]["alive"] is True and body["workers"][0]["host"] == "box"
    assert body["queues"]["cpu"] == 1


def test_health(client):
    r = client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["database"] == "ok" and body["broker"] == "ok"
    assert body["auth"] is False and body["version"]


def test_health_database_down(batchlab_home, broker_url):
    # Nothing listens on port 1: migrations fail at start, the app still answers.
    app = create_app(
        database_url="postgresql+psycopg://postgres@127.0.0.1:1/batchlab", broker_url=broker_url
    )
    with TestClient(app) as c:
        r = c.get("/api/health")
        assert r.status_code == 503
        assert r.json()["status"] == "error" and r.json()["database"].startswith("error")
        r = c.get("/api/runs")
        assert r.status_code == 503 and "database unavailable" in r.json()["detail"]


def test_broker_down_answers_503_and_stores_nothing(batchlab_home, sqlite_url):
    app = create_app(database_url=sqlite_url, broker_url="redis://127.0.0.1:1/0")
    with TestClient(app) as c:
        r = c.post("/api/runs", json={"spec": SPEC, "baseline": True})
        assert r.status_code == 503
        assert "task queue is unavailable" in r.json()["detail"]
        r = c.post("/api/sweeps", json={"spec": SPEC, "batch_sizes": [64]})
        assert r.status_code == 503
        assert c.get("/api/runs").json() == [] and c.get("/api/sweeps").json() == []
        health = c.get("/api/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
    app.state.ctx.engine.dispose()


# --- static files -------------------------------------------------------------------------
def test_frontend_and_plotly_are_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<html" in r.text.lower()
    r = client.get("/static/vendor/plotly.min.js")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/javascript")
    assert "max-age=86400" in r.headers["cache-control"] and r.headers["etag"]
    assert "plotly" in r.text[:2000].lower()
    again = client.get("/static/vendor/plotly.min.js", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    assert client.get("/static/index.html").status_code == 200
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/runs", "/api/runs/{run_id}/stream", "/api/sweeps", "/api/schedule"} <= set(paths)
    assert {"/api/plan/run", "/api/plan/sweep"} <= set(paths)


# --- SSE ----------------------------------------------------------------------------------
def _read_stream(url: str, **kwargs: Any) -> list[tuple[str, Any, str | None]]:
    events = []
    with httpx.stream("GET", url, timeout=20, **kwargs) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for ev in iter_events(r.iter_lines()):
            events.append((ev.event, ev.json(), ev.id))
    return events


@pytest.mark.slow
def test_sse_stream_delivers_points_written_by_a_metric_writer(app):
    engine = app.state.ctx.engine
    with serve_in_thread(app) as url:
        run_id = httpx.post(f"{url}/api/runs", json={"spec": SPEC}).json()["run"]["id"]
        with db.session(engine) as s:
            runs.mark_running(s, run_id, host="h", gpus="", worker="w")
        started = threading.Event()

        def train() -> None:
            started.wait(10)
            with metrics.MetricWriter(engine, run_id) as writer:
                for step in range(40):
                    loss = math.nan if step == 7 else 2.0 / (step + 1)
                    writer.add(step, {"loss": loss, "lr": 0.1}, epoch=step / 10, wall_time=step)
                    if step % 10 == 9:
                        writer.add(step, {"val_err": 0.5}, epoch=step / 10, wall_time=step)
                        with db.session(engine) as s:
                            runs.set_progress(s, run_id, (step + 1) / 40, 1.0)
                    time.sleep(0.05)  # 2 s in all: progress-only events go once a second
            with db.session(engine) as s:
                runs.mark_finished(s, run_id, "succeeded", summary={"final_val_err": 0.5})

        thread = threading.Thread(target=train)
        thread.start()
        events = []
        with httpx.stream("GET", f"{url}/api/runs/{run_id}/stream", timeout=20) as r:
            for ev in iter_events(r.iter_lines()):
                events.append((ev.event, strict_json(ev.data), ev.id))
                started.set()
        thread.join()

        kinds = [e[0] for e in events]
        assert kinds[0] == "status" and events[0][1]["status"] == "running"
        assert kinds[-1] == "status" and events[-1][1]["status"] == "succeeded"
        assert "points" in kinds
        points = [p for kind, data, _ in events if kind == "points" for p in data["points"]]
        loss = {p["step"]: p["value"] for p in points if p["key"] == "loss"}
        assert sorted(loss) == list(range(40))  # every point exactly once
        assert len([p for p in points if p["key"] == "loss"]) == 40
        assert loss[7] is None and loss[3] == pytest.approx(0.5)
        assert [p["step"] for p in points if p["key"] == "val_err"] == [9, 19, 29, 39]
        progress = [d["progress"] for k, d, _ in events if k == "status"]
        # connect, at least one progress change (throttled to 1/s), the final status
        assert progress == sorted(progress) and len(progress) >= 3
        last_id = events[-1][2]
        assert last_id == "loss:39,lr:39,val_err:39"

        # A reconnect with Last-Event-ID (what EventSource sends) resends nothing old.
        again = _read_stream(
            f"{url}/api/runs/{run_id}/stream", headers={"Last-Event-ID": "loss:35,lr:39,val_err:9"}
        )
        resent = [p for k, d, _ in again if k == "points" for p in d["points"]]
        assert sorted((p["key"], p["step"]) for p in resent) == [
            ("loss", 36),
            ("loss", 37),
            ("loss", 38),
            ("loss", 39),
            ("val_err", 19),
            ("val_err", 29),
            ("val_err", 39),
        ]
        # ?since=N: after step N for every key (a page that loaded /metrics first)
        since = _read_stream(f"{url}/api/runs/{run_id}/stream?since=37")
        resent = [p for k, d, _ in since if k == "points" for p in d["points"]]
        assert sorted((p["key"], p["step"]) for p in resent) == [
            ("loss", 38),
            ("loss", 39),
            ("lr", 38),
            ("lr", 39),
            ("val_err", 39),
        ]
        r = httpx.get(f"{url}/api/runs/{run_id}/stream?since=abc")
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "since"]


@pytest.mark.slow
def test_sse_stream_ends_when_the_run_is_deleted(app):
    with serve_in_thread(app) as url:
        run_id = httpx.post(f"{url}/api/runs", json={"spec": SPEC}).json()["run"]["id"]
        kinds: list[str] = []
        with httpx.stream("GET", f"{url}/api/runs/{run_id}/stream", timeout=20) as r:
            for ev in iter_events(r.iter_lines()):
                kinds.append(ev.event)
                if len(kinds) == 1:
                    assert httpx.delete(f"{url}/api/runs/{run_id}").status_code == 204
        assert kinds == ["status", "gone"]


def test_start_warms_the_metric_cache_of_recent_runs(batchlab_home, sqlite_url, broker_url):
    """The first compare view after a restart should not pay the cold read."""
    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    with db.session(engine) as s:
        run_id = runs.create_run(s, name="old", spec={"dataset_size": 400}).id
    points = [(step, {"loss": 1.0 / (1 + step)}, step / 10, step / 100) for step in range(50)]
    metrics.write_points(engine, run_id, points)
    # A run written before live overviews (store.metrics.live) has none: it is the one the
    # warming is for (a run with one is read from it, cold or not).
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM series_overviews")
    metrics.invalidate()
    app = create_app(database_url=sqlite_url, broker_url=broker_url)
    with TestClient(app):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cached = metrics.cache._cache.get((str(engine.url), run_id, "loss"))
            if cached is not None and cached.n == 50:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the recent run's loss series was not cached after start")
