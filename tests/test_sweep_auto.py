"""``"batch_sizes": "auto"`` (issue 13, part 2): the sweep starts with its baseline only,
and once the baseline has finished, ``worker.auto_sweep.advance`` queues the ladder of
powers of two around its measured noise scale, exactly once, whichever of the worker
(``after_run``, called by ``worker.tasks.execute``) and the reconciler gets there first.
No real worker trains here: baselines are finished by hand, their noise_scale points
written with ``store.metrics.write_points``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from alembic import command
from fastapi.testclient import TestClient
from support import serve_app
from test_api import SPEC as API_SPEC

import batchlab
from batchlab.cli import main
from core.status import RunStatus
from server.app import create_app
from store import db, metrics, runs
from store.db import alembic_config
from trainer.spec import RunSpec
from worker import auto_sweep, recovery, tasks
from worker.celery_app import make_app

# test_api's spec (kn = ref_batch = 32 is the baseline), measuring the noise scale.
SPEC: dict[str, Any] = {**API_SPEC, "noise_every": 10}


@pytest.fixture()
def client(batchlab_home, sqlite_url, broker_url) -> Iterator[TestClient]:
    app = create_app(database_url=sqlite_url, broker_url=broker_url)
    with TestClient(app) as c:
        yield c
    app.state.ctx.engine.dispose()


class Sent:
    """An enqueue that records (run id, total batch) instead of sending."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, run_id: int, spec: RunSpec) -> str:
        self.calls.append((run_id, spec.total_batch))
        return "task"


def create_auto(client: TestClient, **extra: Any) -> dict[str, Any]:
    r = client.post("/api/sweeps", json={"spec": SPEC, "batch_sizes": "auto", **extra})
    assert r.status_code == 201, r.text
    return r.json()


def finish_baseline(
    engine: Any, run_id: int, noise: list[float] | None, status: str, last_step: int = 40
) -> None:
    """The baseline trained to ``last_step`` (its loss), its noise_scale measured at steps
    0, 10, ..., then a final status."""
    metrics.write_points(
        engine, run_id, [(s, {"loss": 1.0}, 0.0, 0.0) for s in range(last_step + 1)]
    )
    if noise:
        points = [(10 * i, {"noise_scale": v}, 0.0, 0.0) for i, v in enumerate(noise)]
        metrics.write_points(engine, run_id, points)
    with db.session(engine) as s:
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")
        runs.mark_finished(s, run_id, status, summary={"final_val_err": 0.1})


def sweep(client: TestClient, sweep_id: int) -> dict[str, Any]:
    return client.get(f"/api/sweeps/{sweep_id}").json()


# Last half of [1000, 1000, 60, 70, 80] (steps 0..40: steps >= 20): median 70 -> 64.
NOISE = [1000.0, 1000.0, 60.0, 70.0, 80.0]
LADDER = [8, 16, 32, 64, 128, 256, 512]  # 64/8 .. 64*8, the baseline's 32 among them


def test_auto_sweep_queues_only_the_baselines_and_says_it_waits(client):
    out = create_auto(client, seeds=[0, 1])
    assert [
        (r["is_baseline"], r["derived"]["total_batch"], r["spec"]["seed"]) for r in out["runs"]
    ] == [
        (True, 32, 0),
        (True, 32, 1),
    ]
    group = out["sweep"]
    assert group["auto_state"] == "waiting"
    assert "waiting for the baseline's noise scale" in group["auto_message"]
    assert group["batch_sizes"] == [32] and group["name"].startswith("sweep kn=auto")
    detail = sweep(client, group["id"])
    assert detail["sweep"]["auto_state"] == "waiting" and detail["advice"] is None
    # a sweep of listed sizes is no auto sweep
    plain = client.post("/api/sweeps", json={"spec": SPEC, "batch_sizes": [64]}).json()
    assert plain["sweep"]["auto_state"] is None and plain["sweep"]["auto_message"] is None


def test_the_ladder_is_queued_once_around_the_measured_noise_scale(client):
    out = create_auto(client, seeds=[0, 1])
    engine, group_id = client.app.state.ctx.engine, out["sweep"]["id"]
    base = {r["spec"]["seed"]: r["id"] for r in out["runs"]}
    finish_baseline(engine, base[0], NOISE, "succeeded")
    sent = Sent()
    # one baseline still queued: nothing yet, whoever asks
    assert auto_sweep.after_run(engine, base[0], enqueue=sent) is None
    assert auto_sweep.advance(engine, group_id, enqueue=sent) is None
    assert sweep(client, group_id)["sweep"]["auto_state"] == "waiting"

    finish_baseline(engine, base[1], NOISE, "succeeded")
    settled = auto_sweep.after_run(engine, base[1], enqueue=sent)
    assert settled is not None and settled.state == "ladder_queued"
    # the trigger again, from both places: nothing more is created or sent
    assert auto_sweep.advance(engine, group_id, enqueue=sent) is None
    assert auto_sweep.after_run(engine, base[0], enqueue=sent) is None
    assert auto_sweep.advance_waiting(engine, enqueue=sent) == []

    new = [kn for kn in LADDER if kn != 32]
    assert sorted(kn for _, kn in sent.calls) == sorted(new * 2)
    assert [rid for rid, _ in sent.calls] == settled.run_ids == settled.sent
    detail = sweep(client, group_id)
    assert detail["sweep"]["auto_state"] == "ladder_queued"
    assert detail["sweep"]["batch_sizes"] == LADDER
    assert "B = 70" in detail["sweep"]["auto_message"]
    ladder_runs = [r for r in detail["runs"] if not r["is_baseline"]]
    assert len(ladder_runs) == len(new) * 2
    for r in ladder_runs:
        assert r["status"] == "queued" and r["baseline_id"] == base[r["spec"]["seed"]]
        assert r["spec"]["warmup"] == SPEC.get("warmup", "gradual")  # the sweep's spec
    assert detail["advice"]["critical_batch"]["median"] == 70.0
    assert detail["advice"]["critical_batch"]["points"] == 6


def test_two_triggers_at_once_queue_the_ladder_once(client):
    out = create_auto(client)
    engine, group_id = client.app.state.ctx.engine, out["sweep"]["id"]
    finish_baseline(engine, out["runs"][0]["id"], NOISE, "succeeded")
    sent = Sent()
    results: list[Any] = []
    start = threading.Barrier(2)

    def trigger() -> None:
        start.wait()
        results.append(auto_sweep.advance(engine, group_id, enqueue=sent))

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(r is not None for r in results) == 1
    assert sorted(kn for _, kn in sent.calls) == [kn for kn in LADDER if kn != 32]
    assert len(sweep(client, group_id)["runs"]) == len(LADDER)


def test_the_worker_queues_the_ladder_when_it_finishes_the_baseline(client, monkeypatch):
    """tasks.execute (the Celery task's body) with the training replaced by one that
    writes the baseline's noise scale: the ladder is queued right after mark_finished."""
    out = create_auto(client)
    engine, group_id, base_id = (
        client.app.state.ctx.engine,
        out["sweep"]["id"],
        out["runs"][0]["id"],
    )

    def train(engine: Any, run_id: int, *_: Any) -> tasks.Outcome:
        points = [(10 * i, {"noise_scale": v, "loss": 1.0}, 0.0, 0.0) for i, v in enumerate(NOISE)]
        metrics.write_points(engine, run_id, points)
        return tasks.Outcome(RunStatus.SUCCEEDED, summary={"final_val_err": 0.1})

    sent = Sent()
    monkeypatch.setattr(tasks, "_train_inline", train)
    monkeypatch.setattr("worker.celery_app.enqueue", lambda run_id, spec, **_: sent(run_id, spec))
    assert tasks.execute(engine, base_id, worker="w") == "succeeded"
    assert sorted(kn for _, kn in sent.calls) == [kn for kn in LADDER if kn != 32]
    assert sweep(client, group_id)["sweep"]["auto_state"] == "ladder_queued"


def test_the_reconciler_is_the_backstop(client, broker_url):
    """A baseline cancelled while queued has no worker to advance its sweep: the API's
    reconcile pass settles it, saying why nothing was queued."""
    out = create_auto(client)
    engine, group_id = client.app.state.ctx.engine, out["sweep"]["id"]
    with db.session(engine) as s:
        runs.request_cancel(s, out["runs"][0]["id"])
    sent = Sent()
    recovery.reconcile_queued(engine, after_s=60, enqueue=sent, celery_app=make_app(broker_url))
    group = sweep(client, group_id)["sweep"]
    assert group["auto_state"] == "no_ladder" and sent.calls == []
    assert "did not succeed" in group["auto_message"] and "cancelled" in group["auto_message"]
    assert len(sweep(client, group_id)["runs"]) == 1


def test_a_baseline_without_noise_scale_queues_nothing_and_says_why(client):
    out = create_auto(client)
    engine, group_id = client.app.state.ctx.engine, out["sweep"]["id"]
    finish_baseline(engine, out["runs"][0]["id"], None, "succeeded")
    sent = Sent()
    settled = auto_sweep.advance(engine, group_id, enqueue=sent)
    assert settled is not None and settled.state == "no_ladder" and settled.run_ids == []
    group = sweep(client, group_id)["sweep"]
    assert group["auto_state"] == "no_ladder" and "no noise_scale" in group["auto_message"]
    assert sent.calls == [] and len(sweep(client, group_id)["runs"]) == 1


def test_a_noise_scale_only_early_in_training_queues_nothing(client):
    """Measured at steps 0..40 of a baseline that trained to 200: none in its last half."""
    out = create_auto(client)
    engine, group_id, base_id = (
        client.app.state.ctx.engine,
        out["sweep"]["id"],
        out["runs"][0]["id"],
    )
    finish_baseline(engine, base_id, NOISE, "succeeded", last_step=200)
    settled = auto_sweep.advance(engine, group_id, enqueue=Sent())
    assert settled is not None and settled.state == "no_ladder" and settled.run_ids == []
    message = sweep(client, group_id)["sweep"]["auto_message"]
    assert "in the last half of its training" in message
    assert f"run {base_id}: 5 points, the last at step 40 of 200" in message


def test_a_send_that_fails_leaves_the_runs_queued_for_the_reconciler(client):
    out = create_auto(client)
    engine, group_id = client.app.state.ctx.engine, out["sweep"]["id"]
    finish_baseline(engine, out["runs"][0]["id"], NOISE, "succeeded")

    def broken(run_id: int, spec: RunSpec) -> str:
        raise ConnectionError("broker down")

    settled = auto_sweep.advance(engine, group_id, enqueue=broken)
    assert settled is not None and settled.sent == [] and len(settled.run_ids) == 6
    statuses = [r["status"] for r in sweep(client, group_id)["runs"] if not r["is_baseline"]]
    assert statuses == ["queued"] * 6  # reconcile_queued re-sends them after its bound


# --- the request and its preview ------------------------------------------------------------


def test_preview_of_auto_says_what_will_happen(client):
    body = {"spec": SPEC, "batch_sizes": "auto", "seeds": [3]}
    plan = client.post("/api/plan/sweep", json=body).json()
    assert [
        (r["is_baseline"], r["derived"]["total_batch"], r["spec"]["seed"]) for r in plan["runs"]
    ] == [(True, 32, 3)]
    assert plan["errors"] == []
    note = next(w for w in plan["warnings"] if w.startswith("batch sizes auto"))
    assert "B/8 to 8B" in note and "at most 3200" in note
    assert client.get("/api/sweeps").json() == []  # a preview stores nothing


@pytest.mark.parametrize(
    ("update", "loc", "words"),
    [
        ({"spec": {**SPEC, "noise_every": 0}}, ["body", "batch_sizes"], "noise_every"),
        ({"baseline": False}, ["body", "baseline"], "baseline"),
        ({"batch_sizes": "many"}, ["body", "batch_sizes"], "list"),
    ],
)
def test_auto_that_cannot_work_answers_422(client, update, loc, words):
    body = {"spec": SPEC, "batch_sizes": "auto", **update}
    for path in ("/api/sweeps", "/api/plan/sweep"):
        r = client.post(path, json=body)
        assert r.status_code == 422, r.text
        detail = next(e for e in r.json()["detail"] if e["loc"] == loc)
        assert words in detail["msg"]
    assert client.get("/api/sweeps").json() == []


def test_listed_sizes_keep_their_error_locations(client):
    r = client.post("/api/sweeps", json={"spec": SPEC, "batch_sizes": [64, 0]})
    assert r.status_code == 422
    assert ["body", "batch_sizes", 1] in [e["loc"] for e in r.json()["detail"]]


def test_openapi_documents_auto(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["SweepCreate"]
    forms = schema["properties"]["batch_sizes"]["anyOf"]
    assert {"type": "string", "enum": ["auto"]} in forms


# --- the migration ------------------------------------------------------------------------


def test_0008_leaves_existing_groups_plain_sweeps(sqlite_url):
    """Groups from before 0008 read as no auto sweep; the downgrade keeps them."""
    engine = db.get_engine(sqlite_url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0007")
        conn.execute(
            sa.text(
                "INSERT INTO groups (name, kind, batch_sizes, created_at)"
                " VALUES ('old', 'sweep', '[64]', CURRENT_TIMESTAMP)"
            )
        )
    db.migrate(engine)
    with db.session(engine) as s:
        (group,) = runs.list_groups(s)
        assert (group.name, group.auto_state, group.auto_message) == ("old", None, None)
        assert runs.waiting_auto_groups(s) == []
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0007")
        assert "auto_state" not in {c["name"] for c in sa.inspect(conn).get_columns("groups")}
        assert conn.execute(sa.text("SELECT name FROM groups")).scalar() == "old"
    db.dispose_engines()


# --- the notebook client and the CLI ----------------------------------------------------------


def test_client_and_cli_submit_an_auto_sweep(batchlab_home, tmp_path, capsys):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    for server in serve_app():
        out = batchlab.Client(server.url).sweep(SPEC, "auto", seeds=[0, 1])
        assert out["sweep"]["auto_state"] == "waiting" and len(out["runs"]) == 2

        code = main(
            ["submit", str(spec_file), "--sweep", "auto", "--seeds", "4", "--url", server.url]
        )
        printed = capsys.readouterr().out.splitlines()
        assert code == 0
        assert printed[0].startswith("sweep ") and "kn=auto" in printed[0]
        assert printed[1].startswith("baseline run ") and "kn=32 (1 x 32)" in printed[1]
        assert printed[2].startswith("waiting for the baseline's noise scale")

        code = main(["submit", str(spec_file), "--sweep", "64,128", "--url", server.url])
        printed = capsys.readouterr().out.splitlines()
        assert code == 0 and len(printed) == 4  # the sweep, its baseline, kn=64, kn=128
