"""Run management over HTTP: rename, tags, notes, archive, bulk actions, search, exports
(CSV and Parquet at full resolution, streamed), checkpoint download, "train N more
epochs", and the worker's removal of orphan run folders."""

from __future__ import annotations

import io
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from server import exports
from server.app import create_app
from store import db, runs
from store.metrics import write_points
from store.models import MetricPoint

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
# 400 samples -> 320 training samples -> 10 iterations of 32 per epoch.
TINY: dict[str, Any] = {
    "model": "mlp",
    "dataset": "mnist1d",
    "dataset_size": 400,
    "epochs": 2,
    "warmup_epochs": 0.5,
    "milestones": [1.5],
    "batch_per_worker": 32,
    "ref_batch": 32,
    "base_lr": 0.05,
    "device": "cpu",
}


@pytest.fixture()
def app(batchlab_home: str, sqlite_url: str, tmp_path: Path) -> Iterator[Any]:
    application = create_app(
        database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    )
    yield application
    application.state.ctx.engine.dispose()


@pytest.fixture()
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def add_run(client: TestClient, name: str = "r", **columns: Any) -> int:
    engine = client.app.state.ctx.engine
    with db.session(engine) as s:
        run = runs.create_run(s, name=name, spec=TINY)
        for field, value in columns.items():
            setattr(run, field, value)
        return run.id


def uid_of(engine: sa.Engine, run_id: int) -> str:
    with db.session(engine) as s:
        return runs.get_run(s, run_id).uid


def ids_of(client: TestClient, **params: Any) -> list[int]:
    r = client.get("/api/runs", params=params)
    assert r.status_code == 200, r.text
    return [run["id"] for run in r.json()]


# --- store rules, on both databases ---------------------------------------------------
@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    engine = db.get_engine(url)
    db.migrate(engine)
    yield engine
    db.dispose_engines()


def test_update_run_validates_every_field_and_changes_nothing_on_error(
    engine: sa.Engine,
) -> None:
    with db.session(engine) as s:
        run_id = runs.create_run(s, name="a", spec={}).id
    bad: list[tuple[dict[str, Any], str]] = [
        ({"tags": [""]}, "tags: each tag must be a non-empty string"),
        ({"tags": ["x" * 65]}, "longer than 64"),
        ({"tags": [f"t{i}" for i in range(33)]}, "at most 32"),
        ({"tags": ["a\x00b"]}, "NUL"),
        ({"tags": ["\ud800"]}, "lone surrogate"),
        ({"tags": "abc"}, "must be a list"),
        ({"notes": "n" * 10_001}, "at most 10000"),
        ({"name": "  "}, "name: must be a non-empty string"),
        ({"name": "x" * 201}, "at most 200"),
        ({"name": "ok", "archived": "yes"}, "archived"),
    ]
    for fields, message in bad:
        with db.session(engine) as s, pytest.raises(ValueError, match=message):
            runs.update_run(s, run_id, **fields)
    with db.session(engine) as s:
        run = runs.update_run(s, run_id, name=" b ", tags=[" x ", "y", "x"], notes="é" * 10_000)
        assert (run.name, run.tags) == ("b", ["x", "y"])
        with pytest.raises(runs.RunNotFound):
            runs.update_run(s, 999, notes="")
    with db.session(engine) as s:
        run = runs.get_run(s, run_id)
        assert (run.name, run.tags, len(run.notes), run.archived) == (
            "b",
            ["x", "y"],
            10_000,
            False,
        )


def test_list_filters_archive_search_and_tag(engine: sa.Engine) -> None:
    with db.session(engine) as s:
        a = runs.create_run(s, name="Warmup study", spec={}).id
        b = runs.create_run(s, name="beta", spec={}).id
        c = runs.create_run(s, name="gamma", spec={}).id
        runs.update_run(s, a, tags=["Café", "lr_50%"])
        runs.update_run(s, b, notes="Diverged at KN=8k", tags=["x"])
        runs.update_run(s, c, archived=True, tags=["x"])

    def ids(**kw: Any) -> list[int]:
        with db.session(engine) as s:
            return [r.id for r in runs.list_runs(s, **kw)]

    assert ids() == [b, a]
    assert ids(archived="only") == [c] and ids(archived="all") == [c, b, a]
    assert ids(q="WARMUP") == [a] and ids(q="kn=8") == [b]  # name, notes: any case
    assert ids(q="café") == [a] and ids(q="50%") == [a]  # inside a tag, non-ASCII too
    assert ids(q="_") == [a] and ids(q="%") == [a]  # LIKE wildcards are literal
    assert ids(tag="x") == [b] and ids(tag="x", archived="all") == [c, b]
    assert ids(tag="caf") == [] and ids(tag="Café") == [a]  # tags match whole
    with pytest.raises(ValueError, match="archived"):
        ids(archived="yes")


# --- HTTP -----------------------------------------------------------------------------
def test_patch_renames_tags_annotates_and_archives(client: TestClient) -> None:
    run_id = add_run(client, "old name")
    r = client.patch(f"/api/runs/{run_id}", json={"name": "new", "tags": ["a", "b"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["name"], out["tags"], out["notes"], out["archived"]) == (
        "new",
        ["a", "b"],
        "",
        False,
    )
    assert out["parent_id"] is None
    r = client.patch(f"/api/runs/{run_id}", json={"notes": "lr too high", "archived": True})
    assert r.json()["name"] == "new" and r.json()["tags"] == ["a", "b"]
    assert ids_of(client) == [] and ids_of(client, archived="only") == [run_id]
    assert client.get(f"/api/runs/{run_id}").json()["notes"] == "lr too high"
    assert client.patch("/api/runs/99999", json={"notes": ""}).status_code == 404
    # Rules answer 422 naming the field; unknown fields too.
    for body, loc in [
        ({"tags": ["x" * 65]}, ["body", "tags"]),
        ({"notes": "n" * 10_001}, ["body", "notes"]),
        ({"name": ""}, ["body", "name"]),
        ({"archived": "maybe"}, ["body", "archived"]),
        ({"status": "succeeded"}, ["body", "status"]),
    ]:
        r = client.patch(f"/api/runs/{run_id}", json=body)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, (body, r.text)
    assert client.get(f"/api/runs/{run_id}").json()["tags"] == ["a", "b"]


def test_list_runs_search_and_tag_over_http(client: TestClient) -> None:
    a = add_run(client, "alpha", tags=["sweep-1"])
    b = add_run(client, "beta", notes="Warmup helps")
    assert ids_of(client, q="WARMUP") == [b] and ids_of(client, q="sweep") == [a]
    assert ids_of(client, tag="sweep-1") == [a] and ids_of(client) == [b, a]
    assert client.get("/api/runs", params={"archived": "maybe"}).status_code == 422


def test_writes_need_the_token(batchlab_home: str, sqlite_url: str, tmp_path: Path) -> None:
    app = create_app(sqlite_url, f"sqla+sqlite:///{tmp_path / 'b.db'}", token="s3cret")
    with TestClient(app) as c:
        run_id = add_run(c)
        calls = [
            ("PATCH", f"/api/runs/{run_id}", {"notes": "x"}),
            ("POST", "/api/runs/bulk", {"ids": [run_id], "action": "archive"}),
            ("POST", f"/api/runs/{run_id}/extend", {"epochs": 1}),
        ]
        for method, path, body in calls:
            r = c.request(method, path, json=body)
            assert r.status_code == 401, (path, r.text)
        auth = {"Authorization": "Bearer s3cret"}
        r = c.patch(f"/api/runs/{run_id}", json={"notes": "x"}, headers=auth)
        assert r.status_code == 200
        # Reads stay open.
        assert c.get("/api/runs.csv").status_code == 200
        assert c.get(f"/api/runs/{run_id}/metrics.csv").status_code == 200
    app.state.ctx.engine.dispose()


def test_bulk_actions_report_done_and_missing(client: TestClient) -> None:
    a, b, c = (add_run(client, n, tags=["keep"]) for n in "abc")
    runs.run_dir(uid_of(client.app.state.ctx.engine, c)).mkdir(parents=True)

    def bulk(**body: Any) -> dict[str, Any]:
        r = client.post("/api/runs/bulk", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    assert bulk(ids=[a, b, 999], action="archive") == {"done": [a, b], "missing": [999]}
    assert ids_of(client) == [c]
    assert bulk(ids=[b], action="unarchive")["done"] == [b] and ids_of(client) == [c, b]
    assert bulk(ids=[a, b], action="tag", tags=["best", "keep"])["done"] == [a, b]
    got = {r["id"]: r["tags"] for r in client.get("/api/runs?archived=all").json()}
    assert got == {a: ["keep", "best"], b: ["keep", "best"], c: ["keep"]}
    bulk(ids=[a, c], action="untag", tags=["keep"])
    got = {r["id"]: r["tags"] for r in client.get("/api/runs?archived=all").json()}
    assert got == {a: ["best"], b: ["keep", "best"], c: []}
    uid = uid_of(client.app.state.ctx.engine, c)
    assert bulk(ids=[c, a], action="delete") == {"done": [c, a], "missing": []}
    assert ids_of(client, archived="all") == [b]
    assert not runs.run_dir(uid).exists()  # its folder goes with it
    r = client.post("/api/runs/bulk", json={"ids": [b], "action": "tag"})
    assert r.status_code == 422 and "tags" in r.text
    r = client.post("/api/runs/bulk", json={"ids": [b], "action": "explode"})
    assert r.status_code == 422
    many = [f"t{i}" for i in range(31)]
    r = client.post("/api/runs/bulk", json={"ids": [b], "action": "tag", "tags": many})
    assert r.status_code == 422 and "at most 32" in r.text
    assert client.get(f"/api/runs/{b}").json()["tags"] == ["keep", "best"]


def test_runs_csv_has_spec_and_summary_columns_and_the_list_filters(
    client: TestClient,
) -> None:
    a = add_run(client, "alpha, with comma", tags=["x", "y"], summary={"final_val_err": 0.25})
    add_run(client, "hidden", archived=True)
    r = client.get("/api/runs.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'filename="runs.csv"' in r.headers["content-disposition"]
    frame = pd.read_csv(io.StringIO(r.text))
    assert list(frame["id"]) == [a]
    row = frame.iloc[0]
    assert row["name"] == "alpha, with comma" and row["tags"] == '["x", "y"]'
    assert row["batch_per_worker"] == 32 and row["milestones"] == "[1.5]"
    assert row["final_val_err"] == 0.25 and pd.isna(row["best_val_err"])
    assert set(exports.SPEC_FIELDS) <= set(frame.columns)
    assert len(pd.read_csv(io.StringIO(client.get("/api/runs.csv?archived=all").text))) == 2
    assert len(pd.read_csv(io.StringIO(client.get("/api/runs.csv?q=nothing").text))) == 0


# --- metric exports -------------------------------------------------------------------
def write_series(engine: sa.Engine, run_id: int, steps: int, keys: int = 4) -> None:
    points = [
        (step, {f"k{j}": step * 0.5 + j for j in range(keys)}, step / 100, 1000.0 + step)
        for step in range(steps)
    ]
    write_points(engine, run_id, points)


def test_metric_exports_round_trip_csv_and_parquet(client: TestClient, tmp_path: Path) -> None:
    engine = client.app.state.ctx.engine
    a, b = add_run(client, "a"), add_run(client, "b")
    write_points(engine, a, [(0, {"loss": float("nan"), "lr": 0.1}, 0.0, 1.5)])
    write_points(engine, a, [(1, {"loss": 2.0, "lr": float("inf")}, 0.1, 2.25)])
    write_series(engine, b, 50, keys=1)
    r = client.get(f"/api/runs/{a}/metrics.csv")
    assert r.status_code == 200 and f'run-{a}-metrics.csv"' in r.headers["content-disposition"]
    frame = pd.read_csv(io.StringIO(r.text))
    assert list(frame.columns) == ["run_id", "key", "step", "epoch", "wall_time", "value"]
    assert list(zip(frame.key, frame.step, strict=True)) == [
        ("loss", 0), ("loss", 1), ("lr", 0), ("lr", 1)
    ]  # fmt: skip
    assert frame.value.isna().tolist() == [True, False, False, False]
    assert frame.value.tolist()[1:] == [2.0, 0.1, float("inf")]
    assert frame.wall_time.tolist() == [1.5, 2.25, 1.5, 2.25]

    r = client.get(f"/api/metrics.parquet?runs={a},{b},4242")
    assert r.status_code == 200 and r.headers["x-missing-runs"] == "4242"
    frame = pd.read_parquet(io.BytesIO(r.content))
    assert frame.groupby("run_id").size().to_dict() == {a: 4, b: 50}
    assert str(frame.step.dtype) == "int64" and frame.value.isna().sum() == 1
    csv_frame = pd.read_csv(io.StringIO(client.get(f"/api/metrics.csv?runs={a},{b}").text))
    pd.testing.assert_frame_equal(csv_frame, frame.reset_index(drop=True), check_dtype=False)

    assert client.get("/api/runs/4242/metrics.csv").status_code == 404
    assert client.get(f"/api/runs/{a}/metrics.xlsx").status_code == 422
    assert client.get("/api/metrics.csv?runs=abc").status_code == 422

    # The client writes the same table to disk.
    from batchlab.client import Client

    c = Client("http://testserver")
    c._http = client  # the TestClient is an httpx.Client
    path = c.export([a, b], tmp_path / "m.parquet", format="parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(path), frame)
    path = c.export(a, tmp_path / "m.csv")
    assert len(pd.read_csv(path)) == 4


def test_a_200k_point_export_streams_in_bounded_memory(client: TestClient) -> None:
    engine = client.app.state.ctx.engine
    run_id = add_run(client)
    write_series(engine, run_id, 50_000)  # 4 keys: 200,000 points
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(MetricPoint)).scalar()
    assert total == 200_000

    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        size = pieces = 0
        for piece in exports.metrics_csv(engine, [run_id]):
            size, pieces = size + len(piece), pieces + 1
        csv_s = time.perf_counter() - t0
        _, csv_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        fh = exports.metrics_parquet(engine, [run_id])
        parquet_bytes = sum(len(p) for p in exports.iter_file(fh))
        parquet_s = time.perf_counter() - t0
        _, parquet_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Generated chunk by chunk: the peak is a fraction of the whole CSV, never all of it.
    assert size > 5_000_000 and pieces >= 10
    # One or two chunks of 5,000 rows (about 1.6 MB each) at a time, whatever the size.
    assert csv_peak < 5 * 2**20 < size, (csv_peak, size)
    assert parquet_peak < 40 * 2**20 and parquet_bytes > 100_000
    assert csv_s < 20 and parquet_s < 20, (csv_s, parquet_s)

    r = client.get(f"/api/runs/{run_id}/metrics.parquet")
    frame = pd.read_parquet(io.BytesIO(r.content))
    assert len(frame) == 200_000 and frame.step.max() == 49_999
    assert frame[frame.key == "k3"].value.tolist()[:2] == [3.0, 3.5]


# --- checkpoint download and extend ---------------------------------------------------
def test_checkpoint_name_matches_the_trainer() -> None:
    from server.routes_manage import CHECKPOINT_FILE
    from trainer.checkpoint import CHECKPOINT_NAME

    assert CHECKPOINT_FILE == CHECKPOINT_NAME


def test_checkpoint_download_and_its_404_reasons(client: TestClient) -> None:
    engine = client.app.state.ctx.engine
    queued = add_run(client)
    r = client.get(f"/api/runs/{queued}/checkpoint")
    assert r.status_code == 404 and "has no checkpoint: it has not started" in r.text
    assert client.get("/api/runs/4242/checkpoint").status_code == 404
    done = add_run(client, status="succeeded")
    folder = runs.run_dir(uid_of(engine, done))
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"\x00weights" * 1000)
    r = client.get(f"/api/runs/{done}/checkpoint")
    assert r.status_code == 200 and r.content == b"\x00weights" * 1000
    assert f'run-{done}-checkpoint.pt"' in r.headers["content-disposition"]


def test_extend_refuses_runs_it_cannot_continue(client: TestClient) -> None:
    engine = client.app.state.ctx.engine
    running = add_run(client, status="running")
    r = client.post(f"/api/runs/{running}/extend", json={"epochs": 1})
    assert r.status_code == 409 and "is running" in r.text
    bare = add_run(client, status="succeeded", spec={**TINY, "checkpoint": False})
    r = client.post(f"/api/runs/{bare}/extend", json={"epochs": 1})
    assert r.status_code == 409 and "checkpoint: false" in r.text
    assert client.post("/api/runs/4242/extend", json={"epochs": 1}).status_code == 404
    assert client.post(f"/api/runs/{bare}/extend", json={"epochs": 0}).status_code == 422
    huge = add_run(client, status="succeeded")
    folder = runs.run_dir(uid_of(engine, huge))
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"x")
    r = client.post(f"/api/runs/{huge}/extend", json={"epochs": 10**6})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "epochs"]
    assert len(ids_of(client)) == 3  # nothing was created


@pytest.mark.slow
def test_extend_continues_the_parents_trajectory_on_a_real_worker(
    client: TestClient,
) -> None:
    """A 2-epoch run extended by 1 epoch: the child resumes at epoch 2 from the parent's
    checkpoint, its steps start after the parent's last one, and its losses are those of
    a straight 3-epoch run (the same trajectory)."""
    from trainer import fit
    from trainer.sink import MemorySink
    from trainer.spec import RunSpec
    from worker.tasks import execute

    engine = client.app.state.ctx.engine
    r = client.post("/api/runs", json={"spec": TINY, "name": "two"})
    assert r.status_code == 201, r.text
    parent = r.json()["run"]["id"]
    assert execute(engine, parent, worker="w") == "succeeded"
    client.patch(f"/api/runs/{parent}", json={"tags": ["study"]})

    r = client.post(f"/api/runs/{parent}/extend", json={"epochs": 1})
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["parent_id"] == parent and child["spec"]["epochs"] == 3
    assert child["spec"]["milestones"] == [1.5] and child["status"] == "queued"
    assert child["name"] == "two +1 ep" and child["tags"] == ["study"]
    assert execute(engine, child["id"], worker="w") == "succeeded"
    done = client.get(f"/api/runs/{child['id']}").json()
    assert done["status"] == "succeeded" and done["error"] is None

    def losses(run_id: int) -> dict[int, float]:
        frame = pd.read_csv(io.StringIO(client.get(f"/api/runs/{run_id}/metrics.csv").text))
        loss = frame[frame.key == "loss"]
        return dict(zip(loss.step.tolist(), loss.value.tolist(), strict=True))

    before, after = losses(parent), losses(child["id"])
    assert sorted(before) == list(range(20)) and sorted(after) == list(range(20, 30))
    straight = MemorySink()
    fit(RunSpec.model_validate({**TINY, "epochs": 3}), straight, resume=False)
    expected = dict(zip(straight.steps("loss"), straight.series("loss"), strict=True))
    assert after == pytest.approx({s: expected[s] for s in range(20, 30)}, rel=1e-4)
    assert before == pytest.approx({s: expected[s] for s in range(20)}, rel=1e-4)
    # The child's checkpoint is its own now (3 epochs); the parent's is untouched.
    r = client.get(f"/api/runs/{child['id']}/checkpoint")
    assert r.status_code == 200 and len(r.content) > 1000


@pytest.mark.slow
def test_extend_on_a_celery_worker_process(batchlab_home: str) -> None:
    """The deployment's path: the API seeds the child's folder, a `batchlab worker`
    process takes the message and resumes; that worker also removed, at its start, the
    folder of a run the database no longer has."""
    import httpx
    from test_worker import WorkerProcess, worker_env

    from server.serve import serve_in_thread

    home = Path(batchlab_home)
    orphan = home / "runs" / "a-run-deleted-elsewhere"
    orphan.mkdir(parents=True)
    app = create_app(f"sqlite:///{home / 'batchlab.db'}", f"sqla+sqlite:///{home / 'broker.db'}")
    worker = WorkerProcess.launcher(worker_env(home), home / "worker.log", "--loglevel", "info")

    def wait_final(url: str, run_id: int) -> dict[str, Any]:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            run = httpx.get(f"{url}/api/runs/{run_id}").json()
            if run["status"] not in ("queued", "running"):
                return run
            time.sleep(0.2)
        pytest.fail(f"run {run_id} still {run['status']}\n{worker.log_tail()}")

    try:
        with serve_in_thread(app) as url:
            r = httpx.post(f"{url}/api/runs", json={"spec": TINY}, timeout=30)
            parent = r.json()["run"]["id"]
            assert wait_final(url, parent)["status"] == "succeeded"
            r = httpx.post(f"{url}/api/runs/{parent}/extend", json={"epochs": 1}, timeout=30)
            assert r.status_code == 201, r.text
            child = wait_final(url, r.json()["id"])
            assert child["status"] == "succeeded" and child["parent_id"] == parent
            text = httpx.get(f"{url}/api/runs/{child['id']}/metrics.csv").text
            frame = pd.read_csv(io.StringIO(text))
            assert sorted(frame[frame.key == "loss"].step) == list(range(20, 30))
            assert not orphan.exists()
    finally:
        worker.stop()
        app.state.ctx.engine.dispose()


def test_a_checkpoint_resumes_with_more_epochs_but_not_fewer(tmp_path: Path) -> None:
    from trainer import RunConfigError
    from trainer.checkpoint import check_compatible
    from trainer.spec import RunSpec

    saved = RunSpec.model_validate(TINY).model_dump(mode="json")
    check_compatible(saved, RunSpec.model_validate({**TINY, "epochs": 5}), tmp_path)
    with pytest.raises(RunConfigError, match="epochs: 2 -> 1"):
        check_compatible(saved, RunSpec.model_validate({**TINY, "epochs": 1, "milestones": []}),
                         tmp_path)  # fmt: skip
    with pytest.raises(RunConfigError, match="base_lr"):
        check_compatible(saved, RunSpec.model_validate({**TINY, "epochs": 5, "base_lr": 0.1}),
                         tmp_path)  # fmt: skip


# --- orphan folders -------------------------------------------------------------------
def test_worker_start_removes_folders_of_runs_that_are_gone(
    batchlab_home: str, sqlite_url: str
) -> None:
    from worker.registry import prune_orphans

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    assert prune_orphans(engine) == []  # no runs/ folder yet
    with db.session(engine) as s:
        kept = runs.create_run(s, name="kept", spec={}).uid
        gone = runs.create_run(s, name="gone", spec={})
        gone_id, gone_uid = gone.id, gone.uid
    for uid in (kept, gone_uid, "old-database-run"):
        (runs.run_dir(uid)).mkdir(parents=True)
        (runs.run_dir(uid) / "checkpoint.pt").write_bytes(b"x")
    with db.session(engine) as s:
        runs.delete_run(s, gone_id)  # as another host's API would: the folder stays
    assert sorted(prune_orphans(engine)) == sorted([gone_uid, "old-database-run"])
    assert (runs.run_dir(kept) / "checkpoint.pt").exists()
    assert not runs.run_dir(gone_uid).exists()
    assert prune_orphans(engine) == []
    db.dispose_engines()
