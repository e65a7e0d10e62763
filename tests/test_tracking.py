"""Runs launched by any scheduler, tracked live (issue 14, part 2): the external-run API
(server/routes_external.py), the tracking client (batchlab/tracking.py) and
``batchlab train --server``, through a real server."""

from __future__ import annotations

import gzip
import json
import math
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

import batchlab
from batchlab.cli import build_parser, main
from batchlab.tracking import FinishTimeout, RunCancelled
from server.app import create_app
from server.serve import free_port, serve_in_thread
from server.sse_client import iter_events
from store import db, runs
from store.models import MetricPoint, utcnow
from worker.recovery import reap_external, reap_stale

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": 200,
    "epochs": 2,
    "workers": 4,
    "batch_per_worker": 8,
    "ref_batch": 8,
    "base_lr": 0.05,
    "warmup_epochs": 1,
    "milestones": [1.5],
    "device": "cpu",
}


def make_app(tmp_path: Path, token: str | None = None) -> Any:
    app = create_app(
        database_url=f"sqlite:///{tmp_path / 'track.db'}",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        token=token,
    )
    db.migrate(app.state.ctx.engine)
    return app


@pytest.fixture()
def app(batchlab_home: str, tmp_path: Path) -> Iterator[Any]:
    application = make_app(tmp_path)
    yield application
    application.state.ctx.engine.dispose()


@pytest.fixture()
def server(app: Any) -> Iterator[str]:
    with serve_in_thread(app) as url:
        yield url


def points(app: Any, run_id: int) -> list[tuple[str, int, float]]:
    """Every stored (key, step, value) of the run, in order."""
    with db.session(app.state.ctx.engine) as s:
        rows = s.execute(
            sa.select(MetricPoint.key, MetricPoint.step, MetricPoint.value)
            .where(MetricPoint.run_id == run_id)
            .order_by(MetricPoint.key, MetricPoint.step)
        ).all()
    return [(k, st, v) for k, st, v in rows]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_register_log_and_finish_through_a_real_server(
    app: Any, server: str, tmp_path: Path
) -> None:
    client = batchlab.Client(server)
    run = client.start_run("notebook", {"lr": 0.1, "note": "free-form"}, tags=["nb"])
    run.set_device("cpu (test)")
    for step in range(300):
        run.log(step, loss=1.0 / (step + 1), lr=0.1, epoch=step / 100)
    run.log(299, epoch=3.0, val_err=0.25)  # the epoch's own values, same step
    wait_for(lambda: client.run(run.id)["device"] == "cpu (test)")
    live = client.run(run.id)
    assert live["status"] == "running" and live["origin"] == "external"
    assert live["worker"] == "external" and live["attempts"] == 1

    done = run.finish(summary={"final_val_err": 0.25, "best": math.inf})
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    assert done["summary"] == {"final_val_err": 0.25, "best": None}
    assert done["spec"] == {"lr": 0.1, "note": "free-form"} and done["tags"] == ["nb"]
    stored = points(app, run.id)
    assert [(k, s) for k, s, _ in stored if k == "loss"] == [("loss", s) for s in range(300)]
    assert [v for k, _, v in stored if k == "loss"] == [1.0 / (s + 1) for s in range(300)]
    assert [(k, s) for k, s, _ in stored if k == "val_err"] == [("val_err", 299)]
    assert run.acked == 601 and run.pending == 0 and not run.spool_path.exists()
    # It reads like any run: the list, the curves, the compare endpoint.
    assert run.id in [r["id"] for r in client.list_runs()]
    frame = client.metrics([run.id], keys=["loss"])
    assert len(frame) == 300


def test_the_live_stream_follows_an_external_run_to_its_end(server: str) -> None:
    client = batchlab.Client(server)
    run = client.start_run("live", {"a": 1})
    seen: list[tuple[str, Any]] = []

    def follow() -> None:
        url = f"{server}/api/runs/{run.id}/stream"
        with httpx.stream("GET", url, timeout=30) as r:
            seen.extend((ev.event, ev.json()) for ev in iter_events(r.iter_lines()))

    reader = threading.Thread(target=follow)
    reader.start()
    for step in range(50):
        run.log(step, loss=float(step))
        time.sleep(0.01)
    run.finish()
    reader.join(20)
    steps = [p["step"] for e, d in seen if e == "points" for p in d["points"]]
    assert steps == list(range(50))  # every point once, in order, live
    assert [d["status"] for e, d in seen if e == "status"][-1] == "succeeded"


def test_a_runspec_run_is_stored_as_its_spec_and_derived(server: str) -> None:
    client = batchlab.Client(server)
    with client.start_run("spec run", TINY) as run:
        run.log(0, loss=1.0)
    out = client.run(run.id)
    assert out["spec"]["batch_per_worker"] == 8 and out["spec"]["nproc"] == 1  # defaults
    assert out["derived"]["total_batch"] == 32


def test_the_same_batch_twice_is_stored_once_and_gzip_is_accepted(app: Any, server: str) -> None:
    http = httpx.Client(base_url=server)
    reg = http.post("/api/external/runs", json={"name": "raw", "uid": "a" * 32})
    assert reg.status_code == 201
    run_id = reg.json()["run"]["id"]
    # Registering the same uid again (a lost answer, retried) makes no second run.
    again = http.post("/api/external/runs", json={"name": "raw", "uid": "a" * 32})
    assert again.status_code == 200 and again.json()["run"]["id"] == run_id
    assert not again.json()["created"]

    records = [[s, s / 10, s * 0.5, {"loss": 1.0 / (s + 1), "acc": None}] for s in range(50)]
    body = json.dumps({"records": records}).encode()
    first = http.post(
        f"/api/external/runs/{run_id}/points",
        content=body,
        headers={"Content-Type": "application/json"},
    )
    assert first.status_code == 200 and first.json() == {"points": 100}
    zipped = gzip.compress(json.dumps({"records": records[:20]}).encode())
    second = http.post(
        f"/api/external/runs/{run_id}/points",
        content=zipped,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert second.status_code == 200 and second.json() == {"points": 40}
    # A (key, step) twice in one batch: the last value wins.
    dup = [[7, 0.7, 3.5, {"loss": 5.0}], [7, 0.7, 3.5, {"loss": 6.0}]]
    assert http.post(f"/api/external/runs/{run_id}/points", json={"records": dup}).is_success
    stored = points(app, run_id)
    assert len(stored) == 100
    loss = {s: v for k, s, v in stored if k == "loss"}
    assert loss[7] == 6.0 and loss[8] == 1.0 / 9
    assert all(v is None or math.isnan(v) for k, _, v in stored if k == "acc")  # null: NaN

    limit = app.state.ctx.settings.max_body_bytes
    bomb = gzip.compress(b'{"records": [' + b" " * (limit + 10) + b"]}")
    big = http.post(
        f"/api/external/runs/{run_id}/points",
        content=bomb,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert big.status_code == 413 and "decompressed" in big.json()["detail"]
    bad = http.post(
        f"/api/external/runs/{run_id}/points",
        content=b"not gzip",
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert bad.status_code == 400
    bad_key = http.post(
        f"/api/external/runs/{run_id}/points", json={"records": [[1, 0.0, 0.0, {"a b": 1.0}]]}
    )
    assert bad_key.status_code == 422
    # A queued run's points are its worker's: the external endpoint refuses them.
    with db.session(app.state.ctx.engine) as s:
        queued = runs.create_run(s, name="q", spec={"model": "mlp"}).id
    refused = http.post(f"/api/external/runs/{queued}/points", json={"records": records[:1]})
    assert refused.status_code == 409
    assert http.post("/api/external/runs/999/points", json={"records": []}).status_code == 404


def test_writes_need_the_token(batchlab_home: str, tmp_path: Path) -> None:
    app = make_app(tmp_path, token="s3cret")
    with serve_in_thread(app) as url:
        anonymous = httpx.post(f"{url}/api/external/runs", json={"name": "x"})
        assert anonymous.status_code == 401
        with pytest.raises(batchlab.Unauthorized):
            batchlab.Client(url, token="wrong").start_run("x")
        run = batchlab.Client(url, token="s3cret").start_run("tok", {"a": 1})
        run.log(0, loss=1.0)
        up = httpx.post(
            f"{url}/api/external/runs/{run.id}/points",
            json={"records": [[1, 0.0, 0.0, {"loss": 2.0}]]},
        )
        assert up.status_code == 401
        assert run.finish()["status"] == "succeeded"
        assert [(k, s) for k, s, _ in points(app, run.id)] == [("loss", 0)]


def test_restarting_the_server_mid_run_loses_no_point(batchlab_home: str, tmp_path: Path) -> None:
    port = free_port()
    first = make_app(tmp_path)
    with serve_in_thread(first, port=port) as url:
        run = batchlab.Client(url).start_run("restart", {"a": 1}, spool_dir=tmp_path / "spool")
        for step in range(200):
            run.log(step, loss=float(step), lr=0.1)
        wait_for(lambda: run.pending == 0)
    # The server is gone: logging goes on, into the spool on disk.
    for step in range(200, 500):
        run.log(step, loss=float(step), lr=0.1)
        if step % 50 == 0:
            time.sleep(0.1)
    wait_for(lambda: run.spool_path.exists() and run.pending == 600)
    second = make_app(tmp_path)  # a new server on the same database
    with serve_in_thread(second, port=port):
        for step in range(500, 600):
            run.log(step, loss=float(step), lr=0.1)
        done = run.finish(timeout=30)
    assert done["status"] == "succeeded"
    stored = points(second, run.id)
    for key in ("loss", "lr"):
        assert [s for k, s, _ in stored if k == key] == list(range(600))
    assert [v for k, _, v in stored if k == "loss"] == [float(s) for s in range(600)]
    assert not run.spool_path.exists()


def test_finish_without_a_server_says_how_many_points_wait_and_where(
    app: Any, tmp_path: Path
) -> None:
    with serve_in_thread(app) as url:
        run = batchlab.Client(url).start_run("gone", None, spool_dir=tmp_path / "spool")
    for step in range(40):
        run.log(step, loss=1.0)
    with pytest.raises(FinishTimeout) as err:
        run.finish(timeout=1.0)
    assert err.value.left == 40 and err.value.spool == run.spool_path
    assert "40 points" in str(err.value) and str(run.spool_path) in str(err.value)
    assert len(run.spool_path.read_text().splitlines()) == 40


def test_cancel_from_the_dashboard_reaches_the_client(server: str) -> None:
    client = batchlab.Client(server)
    run = client.start_run("to cancel", {"a": 1})
    run.log(0, loss=1.0)
    assert not run.should_stop
    client.cancel(run.id)
    wait_for(lambda: run.should_stop, timeout=5)
    assert run.finish()["status"] == "cancelled"  # the default after a cancel

    other = client.start_run("raises", {"a": 1}, raise_on_cancel=True)
    client.cancel(other.id)
    with pytest.raises(RunCancelled), other:
        for step in range(10_000):
            other.log(step, loss=1.0)
            time.sleep(0.01)
    assert client.run(other.id)["status"] == "cancelled"


def test_an_exception_in_the_block_fails_the_run_with_its_message(server: str) -> None:
    client = batchlab.Client(server)
    with pytest.raises(ZeroDivisionError), client.start_run("boom", {"a": 1}) as run:
        run.log(0, loss=1.0)
        _ = 1 / 0
    out = client.run(run.id)
    assert out["status"] == "failed" and "ZeroDivisionError" in out["error"]


def test_a_silent_external_run_is_failed_not_requeued(app: Any, server: str) -> None:
    engine = app.state.ctx.engine
    run = batchlab.Client(server).start_run("silent", {"a": 1})
    later = utcnow() + timedelta(seconds=600)
    sent: list[int] = []
    # The worker reaper leaves it alone: no broker message exists for it.
    assert reap_stale(engine, enqueue=lambda rid, spec: sent.append(rid), now=later) == []
    assert sent == []
    with db.session(engine) as s:
        assert runs.get_run(s, run.id).status == "running"
    assert reap_external(engine, older_than_s=120, now=later) == [run.id]
    with db.session(engine) as s:
        row = runs.get_run(s, run.id)
        assert row.status == "failed" and row.error.startswith("lost contact with the client")
    # Its client was only cut off: its next heartbeat revives the run, finish ends it.
    wait_for(lambda: run.status == "running" and _status(engine, run.id) == "running")
    assert run.finish()["status"] == "succeeded"
    # A client that never comes back: failed for good, never re-queued.
    http = httpx.Client(base_url=server)
    lone = http.post("/api/external/runs", json={"name": "lone"}).json()["run"]["id"]
    assert reap_external(engine, older_than_s=120, now=later) == [lone]
    assert reap_stale(engine, enqueue=lambda rid, spec: sent.append(rid), now=later) == []
    assert _status(engine, lone) == "failed" and sent == []


def _status(engine: Any, run_id: int) -> str:
    with db.session(engine) as s:
        return str(runs.get_run(s, run_id).status)


@pytest.mark.slow
def test_batchlab_train_server_end_to_end(
    app: Any, server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    try:
        code = main(["train", str(spec), "--server", server, "--name", "cli", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err
    client = batchlab.Client(server)
    (out,) = [r for r in client.list_runs() if r["name"] == "cli"]
    assert out["status"] == "succeeded" and out["origin"] == "external"
    assert out["device"].startswith("cpu") and "torch" in out["device"]
    assert out["summary"]["final_val_err"] is not None and out["progress"] == 1.0
    assert out["derived"]["total_batch"] == 32
    stored = points(app, out["id"])
    assert [s for k, s, _ in stored if k == "loss"] == list(range(10))
    assert [s for k, s, _ in stored if k == "val_err"] == [4, 9]
    assert f"run {out['id']} succeeded" in capsys.readouterr().err


# --- the cluster examples, as files --------------------------------------------------------


def _batchlab_commands(text: str) -> list[list[str]]:
    """The ``batchlab.cli train ...`` / ``batchlab train ...`` argument lists in ``text``
    (shell continuation lines joined)."""
    joined = text.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True) if "train" in line else []
        for marker in ("batchlab.cli", "batchlab"):
            if marker in words and "train" in words[words.index(marker) + 1 :][:1]:
                out.append(words[words.index(marker) + 1 :])
                break
    return out


def _parses(argv: list[str]) -> Any:
    # Shell and YAML variables stand in for values only known on the cluster.
    concrete = [a if "$" not in a else "x" for a in argv]
    return build_parser().parse_args(concrete)


def test_the_slurm_example_is_valid_bash_and_runs_batchlab_train_server() -> None:
    path = ROOT / "examples" / "slurm" / "train.sbatch"
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert "--rdzv-backend=c10d" in text and "--nnodes=2" in text
    (argv,) = _batchlab_commands(text)
    args = _parses(argv)
    assert args.command == "train" and args.server is not None


def test_the_kubernetes_example_parses_and_runs_batchlab_train_server() -> None:
    docs = list(yaml.safe_load_all((ROOT / "examples" / "k8s" / "job.yaml").read_text()))
    job = next(d for d in docs if d and d.get("kind") == "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    container = spec["template"]["spec"]["containers"][0]
    script = shlex.join(container["command"] + container.get("args", []))
    assert "torchrun" in script and "--rdzv-backend=c10d" in script
    (argv,) = _batchlab_commands(script)
    args = _parses(argv)
    assert args.command == "train" and args.server is not None
    env = {e["name"] for e in container["env"]}
    assert {"BATCHLAB_URL", "BATCHLAB_TOKEN"} <= env


@pytest.mark.slow
def test_the_examples_torchrun_command_on_cpu_reports_from_rank_0_only(
    app: Any, server: str, tmp_path: Path
) -> None:
    """The examples' command (c10d rendezvous, batchlab train --server) on this machine:
    two nodes of one CPU process each, as two torchrun agents on loopback with their own
    output folders; one run registered, every point stored once."""
    import os
    import sys

    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    endpoint = f"127.0.0.1:{free_port()}"

    def node(i: int) -> subprocess.Popen[str]:
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", "--rdzv-id=test-job", "--local-addr=127.0.0.1",
            f"--rdzv-conf=is_host={int(i == 0)}",
            "-m", "batchlab.cli", "train", str(spec), "--set", "nodes=2", "--set", "nproc=1",
            "--out", str(tmp_path / f"out{i}"), "--server", "--name", "ddp", "--no-progress",
        ]  # fmt: skip
        env = {**os.environ, "BATCHLAB_URL": server, "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    nodes = [node(0), node(1)]
    outputs = [p.communicate(timeout=180)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    listed = batchlab.Client(server).list_runs()
    assert [r["name"] for r in listed] == ["ddp"]  # rank 1 registered nothing
    (run,) = listed
    assert run["status"] == "succeeded" and run["spec"]["nodes"] == 2
    assert run["device"].endswith("x 2 processes on 2 nodes")
    stored = points(app, run["id"])
    assert [s for k, s, _ in stored if k == "loss"] == list(range(10))
