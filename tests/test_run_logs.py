"""Run logs: the store's bounded per-run lines, the capture of a worker's output, the
``GET /api/runs/{id}/log`` endpoint, and a real worker whose failing run's traceback
lands in its log."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from server.app import create_app
from store import db, runs
from store.logs import LOG_LINE_MAX_CHARS, LogLine, append_log, read_log
from store.models import RunLog
from tests.test_worker import Service, WorkerProcess, create_run, tiny_spec, worker_env
from trainer.spec import RunSpec
from worker.runlog import RunLogWriter, capture


@pytest.fixture()
def engine(sqlite_url: str) -> sa.Engine:
    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    return engine


def texts(engine: sa.Engine, run_id: int, **kw: Any) -> list[str]:
    with db.session(engine) as s:
        return [line["text"] for line in read_log(s, run_id, **kw)]


def test_append_is_bounded_numbered_and_cut(engine: sa.Engine) -> None:
    run_id = create_run(engine, tiny_spec())
    with db.session(engine) as s:
        append_log(s, run_id, [LogLine("stdout", f"line {i}") for i in range(8)], max_lines=5)
    with db.session(engine) as s:
        last = append_log(s, run_id, [LogLine("stderr", "x" * (LOG_LINE_MAX_CHARS + 50))])
    assert last == 9
    with db.session(engine) as s:
        lines = read_log(s, run_id)
    # The newest 5 of 8, then the long line (the bound is applied per batch).
    assert [ln["seq"] for ln in lines] == [4, 5, 6, 7, 8, 9]
    assert lines[0]["text"] == "line 3" and lines[0]["stream"] == "stdout"
    assert lines[-1]["stream"] == "stderr" and len(lines[-1]["text"]) == LOG_LINE_MAX_CHARS
    assert texts(engine, run_id, tail=2) == ["line 7", "x" * (LOG_LINE_MAX_CHARS - 1) + "…"]
    assert texts(engine, run_id, after=7, tail=10)[0] == "line 7"


def test_nodes_appending_to_one_log_at_once_number_lines_apart(pg_url: str) -> None:
    """The nodes of a multi-node run write one run's log from separate processes: on
    PostgreSQL two batches at once must not both take the next seq (a clash lost a flush)."""
    import threading

    engine = db.get_engine(pg_url)
    db.migrate(engine)
    run_id = create_run(engine, tiny_spec())
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def node(i: int) -> None:
        barrier.wait()
        for batch in range(10):
            try:
                with db.session(engine) as s:
                    append_log(
                        s, run_id, [LogLine("stdout", f"n{i} b{batch} {j}") for j in range(3)]
                    )
            except BaseException as exc:  # an IntegrityError on (run_id, seq)
                errors.append(exc)

    threads = [threading.Thread(target=node, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with db.session(engine) as s:
        seqs = [ln["seq"] for ln in read_log(s, run_id)]
    assert seqs == list(range(1, 4 * 10 * 3 + 1))


def test_lines_go_with_the_run(engine: sa.Engine) -> None:
    run_id = create_run(engine, tiny_spec())
    other = create_run(engine, tiny_spec())
    with db.session(engine) as s:
        append_log(s, run_id, [LogLine("stdout", "mine")])
        append_log(s, other, [LogLine("stdout", "other")])
    with db.session(engine) as s:
        assert runs.delete_run(s, run_id)
    with engine.connect() as conn:
        left = conn.execute(sa.select(RunLog.run_id, RunLog.text)).all()
    assert [tuple(r) for r in left] == [(other, "other")]


def test_capture_tees_output_warnings_and_records(engine: sa.Engine, capsys) -> None:
    run_id = create_run(engine, tiny_spec())
    writer = RunLogWriter(engine, run_id, flush_interval=0.05)
    with capture(writer):
        print("epoch 1 done")
        print("progress 10%\rprogress 20%", end="")
        sys.stderr.write("careful\n")
        warnings.warn("lr looks high", UserWarning, stacklevel=1)
        logging.getLogger("trainer.loop").warning("slow step")
        logging.getLogger("celery.worker").warning("not the run's")
    writer.close()
    assert "epoch 1 done" in capsys.readouterr().out  # still reaches the worker's output
    with db.session(engine) as s:
        got = [(ln["stream"], ln["text"]) for ln in read_log(s, run_id)]
    assert ("stdout", "epoch 1 done") in got
    assert ("stdout", "progress 10%") in got and ("stdout", "progress 20%") in got
    assert ("stderr", "careful") in got
    assert any(stream == "log" and "UserWarning: lr looks high" in t for stream, t in got)
    assert ("log", "WARNING trainer.loop: slow step") in got
    assert not any("not the run's" in t for _, t in got)
    assert sys.stdout is not None and not hasattr(sys.stdout, "drain")


def test_writer_keeps_lines_while_the_database_is_down(engine: sa.Engine) -> None:
    run_id = create_run(engine, tiny_spec())
    writer = RunLogWriter(engine, run_id, flush_interval=60)
    writer.write_line("stdout", "first\nsecond")
    real = writer.engine
    writer.engine = db.get_engine("sqlite:////nonexistent/dir/x.db")
    writer.flush()  # fails: kept
    writer.engine = real
    writer.close()
    assert texts(engine, run_id) == ["first", "second"]


# ---------------------------------------------------------------------------------------
# the API


@pytest.fixture()
def client(batchlab_home: str, sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    with TestClient(app) as c:
        yield c
    app.state.ctx.engine.dispose()


def test_log_endpoint_tail_and_after(client: TestClient, sqlite_url: str) -> None:
    engine = db.get_engine(sqlite_url)
    run_id = create_run(engine, tiny_spec())
    assert client.get(f"/api/runs/{run_id}/log").json() == {"lines": [], "next": 0}
    with db.session(engine) as s:
        append_log(s, run_id, [LogLine("stdout", f"l{i}") for i in range(5)])
    body = client.get(f"/api/runs/{run_id}/log", params={"tail": 2}).json()
    assert [ln["text"] for ln in body["lines"]] == ["l3", "l4"] and body["next"] == 5
    assert set(body["lines"][0]) == {"seq", "t", "stream", "text"}
    body = client.get(f"/api/runs/{run_id}/log", params={"after": 3}).json()
    assert [ln["seq"] for ln in body["lines"]] == [4, 5]
    assert client.get(f"/api/runs/{run_id}/log", params={"after": 5}).json() == {
        "lines": [],
        "next": 5,
    }
    missing = client.get("/api/runs/999999/log")
    assert missing.status_code == 404 and "999999" in missing.text
    assert client.get(f"/api/runs/{run_id}/log", params={"tail": 0}).status_code == 422


# ---------------------------------------------------------------------------------------
# a real worker


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("runlog-home")
    db.migrate(db.get_engine(f"sqlite:///{home / 'batchlab.db'}"))
    worker = WorkerProcess.launcher(worker_env(home), home / "worker.log", "--loglevel", "info")
    svc = Service(home, worker)
    try:
        yield svc
    finally:
        worker.stop()


def _failing_spec(**changes: Any) -> RunSpec:
    base: dict[str, Any] = dict(
        model="mlp",
        dataset="mnist",
        data_root="/nonexistent/mnist",
        dataset_size=100,
        epochs=1,
        batch_per_worker=10,
        warmup="none",
        milestones=[],
        device="cpu",
    )
    return RunSpec.model_validate({**base, **changes})


def _log_of(service: Service, run_id: int) -> str:
    deadline = time.monotonic() + 10
    while True:
        text = "\n".join(texts(service.engine, run_id))
        if "Traceback" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


@pytest.mark.slow
def test_failing_runs_traceback_is_in_its_log(service: Service) -> None:
    run_id = service.submit(_failing_spec())
    run = service.wait(run_id, "failed", "succeeded")
    assert run.status == "failed"
    text = "\n".join(texts(service.engine, run_id))  # stored before the final status
    assert text.startswith("attempt 1 on cpu-")
    assert "Traceback (most recent call last)" in text
    assert "trainer.RunConfigError: data_root '/nonexistent/mnist' is not a folder" in text
    with db.session(service.engine) as s:
        streams = {ln["stream"] for ln in read_log(s, run_id)}
    assert "error" in streams


@pytest.mark.slow
def test_torchrun_ranks_output_is_in_the_log(service: Service) -> None:
    spec = _failing_spec(workers=2, nproc=2, batch_per_worker=5)
    run_id = service.submit(spec)
    run = service.wait(run_id, "failed", "succeeded", timeout=90)
    assert run.status == "failed"
    text = _log_of(service, run_id)
    # The ranks' own tracebacks, through torchrun's pipe (and still in ddp.log).
    assert "Traceback (most recent call last)" in text
    assert "data_root '/nonexistent/mnist' is not a folder" in text
    assert (service.home / "runs" / str(run.uid) / "ddp.log").read_text().strip()
