"""The worker package: planning, the DB sink, and real Celery workers running tiny runs.

The end-to-end tests start ``batchlab worker --gpus none`` (the supervisor and one
Celery worker with its prefork child) on the embedded SQLite broker and store, once for
the module, and push runs through it the way the API does (``enqueue``).
Helpers here are also imported by test_worker_recovery.py and test_worker_redis.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from store import db, runs
from store.models import MetricPoint, Run
from trainer.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
PER_ITER = ("loss", "train_err", "lr", "samples", "grad_norm", "step_time")
PER_EPOCH = ("val_loss", "val_err", "epoch_time", "train_err_epoch")


# ---------------------------------------------------------------------------------------
# helpers shared with the other worker test files


def tiny_spec(**changes: Any) -> RunSpec:
    """A run of well under a second of training: 400 samples, batch 20, 3 epochs."""
    base: dict[str, Any] = dict(
        model="mlp",
        dataset="synthetic",
        dataset_size=500,
        epochs=3,
        batch_per_worker=20,
        warmup="none",
        milestones=[],
        device="cpu",
    )
    return RunSpec.model_validate({**base, **changes})


def worker_env(home: Path, *, database_url: str | None = None, broker_url: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env["BATCHLAB_HOME"] = str(home)
    if database_url:
        env["BATCHLAB_DATABASE_URL"] = database_url
    if broker_url:
        env["BATCHLAB_BROKER_URL"] = broker_url
    env["PYTHONUNBUFFERED"] = "1"
    # Tiny models on a shared CPU: torch's default of one thread per core makes every
    # op wait on oversubscribed cores (measured 10x slower under load).
    env["OMP_NUM_THREADS"] = "1"
    return env


class WorkerProcess:
    """A real worker in its own process group: the supervisor or a bare Celery worker."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def celery(
        cls, env: dict[str, str], log_path: Path, *, queues: str = "cpu", name: str = "cpu@%h"
    ) -> WorkerProcess:
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "-Q",
            queues,
            "-n",
            name,
            "--pool",
            "prefork",
            "-c",
            "1",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "info",
        ]
        return cls(cmd, env, log_path)

    @classmethod
    def launcher(cls, env: dict[str, str], log_path: Path, *args: str) -> WorkerProcess:
        cmd = [sys.executable, "-m", "batchlab.cli", "worker", "--gpus", "none", *args]
        return cls(cmd, env, log_path)

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (warm shutdown); the whole group is killed if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reap_group()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9 the worker and its pool child at once, like a lost machine."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def _reap_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers only; the leader is gone


def create_run(engine: sa.Engine, spec: RunSpec, name: str = "t") -> int:
    with db.session(engine) as s:
        return runs.create_run(s, name=name, spec=spec.model_dump(mode="json")).id


def get_run(engine: sa.Engine, run_id: int) -> Run:
    with db.session(engine) as s:
        run = runs.get_run(s, run_id)
        assert run is not None
        return run


def wait_for(
    engine: sa.Engine,
    run_id: int,
    statuses: tuple[str, ...],
    timeout: float,
    worker: WorkerProcess | None = None,
) -> Run:
    deadline = time.monotonic() + timeout
    while True:
        run = get_run(engine, run_id)
        if run.status in statuses:
            return run
        if time.monotonic() > deadline:
            tail = worker.log_tail() if worker else ""
            pytest.fail(f"run {run_id} still {run.status} after {timeout} s\n{tail}")
        time.sleep(0.05)


def point_counts(engine: sa.Engine, run_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(MetricPoint.key, sa.func.count())
            .where(MetricPoint.run_id == run_id)
            .group_by(MetricPoint.key)
        ).all()
    return {k: int(n) for k, n in rows}


def steps_of(engine: sa.Engine, run_id: int, key: str) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                sa.select(MetricPoint.step)
                .where(MetricPoint.run_id == run_id, MetricPoint.key == key)
                .order_by(MetricPoint.step)
            )
        )


def assert_complete(engine: sa.Engine, run_id: int, spec: RunSpec) -> None:
    """Every per-iteration key has exactly steps 0..total-1; per-epoch keys one a epoch."""
    counts = point_counts(engine, run_id)
    for key in PER_ITER:
        assert counts.get(key) == spec.total_iters, (key, counts)
    assert steps_of(engine, run_id, "loss") == list(range(spec.total_iters))
    for key in PER_EPOCH:
        assert counts.get(key) == spec.epochs, (key, counts)
    ipe = spec.iters_per_epoch
    assert steps_of(engine, run_id, "val_err") == [(e + 1) * ipe - 1 for e in range(spec.epochs)]


# ---------------------------------------------------------------------------------------
# planning and pure pieces (no processes)


def test_celery_app_import_is_torch_free() -> None:
    code = (
        "import sys, worker.celery_app, worker.recovery, worker.gpus, batchlab.cmd_worker; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_app_settings(batchlab_home: str) -> None:
    from core.settings import get_settings
    from worker.celery_app import make_app

    assert get_settings().broker_url == f"sqla+sqlite:///{Path(batchlab_home).resolve()}/broker.db"
    app = make_app()
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options == {"connect_args": {"timeout": 30}}
    redis = make_app("redis://127.0.0.1:6379/0").conf
    assert redis.broker_transport_options["visibility_timeout"] >= 3600
    assert redis.worker_enable_remote_control


def test_queue_for() -> None:
    from worker.celery_app import queue_for

    assert queue_for(tiny_spec()) == "cpu"
    assert queue_for(tiny_spec(device="cuda")) == "gpu"
    assert queue_for(tiny_spec(device="cuda", workers=4, nproc=4)) == "gpu4"
    assert queue_for(tiny_spec(device="auto")) == "cpu"
    assert queue_for(tiny_spec(device="auto"), have_gpus=True) == "gpu"
    # Several processes on the CPU (gloo) need no GPU worker.
    assert queue_for(tiny_spec(workers=2, nproc=2)) == "cpu"


def test_parse_gpus() -> None:
    from worker.gpus import parse_gpus

    assert parse_gpus("all", ["0", "1"]) == ["0", "1"]
    assert parse_gpus("all", []) == []
    assert parse_gpus("none", ["0"]) == []
    assert parse_gpus("1", ["0", "1"]) == ["1"]
    with pytest.raises(ValueError, match=r"--gpus: GPU 2 not found \(visible GPUs: 0, 1\)"):
        parse_gpus("0,2", ["0", "1"])
    with pytest.raises(ValueError, match="--gpus.*visible GPUs: none"):
        parse_gpus("0", [])
    with pytest.raises(ValueError, match="twice"):
        parse_gpus("0,0", ["0"])


def test_detect_gpus_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.gpus import detect_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert detect_gpus() == []


def test_plan_workers() -> None:
    from worker.gpus import plan_workers

    (cpu,) = plan_workers([])
    assert cpu.queues == ("cpu",) and cpu.env == {"CUDA_VISIBLE_DEVICES": ""}
    per_gpu = plan_workers(["0", "1"], extra_queues=["cpu"])
    assert [(p.name, p.env["CUDA_VISIBLE_DEVICES"], p.queues) for p in per_gpu] == [
        ("gpu0@%h", "0", ("gpu", "cpu")),
        ("gpu1@%h", "1", ("gpu", "cpu")),
    ]
    (group,) = plan_workers(["0", "1"], group=True)
    assert group.queues == ("gpu2",) and group.env == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert group.name == "gpu0-1@%h"


def test_worker_command_pins_concurrency_and_prefetch() -> None:
    from worker.gpus import plan_workers
    from worker.launch import worker_command

    cmd = worker_command(plan_workers(["3"])[0])
    joined = " ".join(cmd)
    assert "-A worker.celery_app worker" in joined
    assert "--concurrency 1" in joined and "--prefetch-multiplier 1" in joined
    assert "--queues gpu" in joined and "--hostname gpu3@%h" in joined


def test_cli_dry_run_and_bad_gpus(
    batchlab_home: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchlab.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert main(["worker", "--gpus", "0,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "gpu0@%h: GPUs 0, queues gpu" in out
    assert "gpu1@%h: GPUs 1, queues gpu" in out
    assert main(["worker", "--gpus", "0,1", "--group", "--queues", "cpu", "--dry-run"]) == 0
    assert "gpu0-1@%h: GPUs 0,1, queues gpu2,cpu" in capsys.readouterr().out
    assert main(["worker", "--gpus", "7", "--dry-run"]) == 2
    assert "--gpus: GPU 7 not found (visible GPUs: 0, 1)" in capsys.readouterr().err


def test_db_sink_progress_eta_and_cancel(sqlite_url: str) -> None:
    """Points reach the store, progress/ETA/heartbeat follow, the cancel flag is seen."""
    from worker.sink import DbSink

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    spec = tiny_spec(epochs=4)
    run_id = create_run(engine, spec)
    with db.session(engine) as s:
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")
    sink = DbSink(engine, run_id, spec, interval=0.05, attempt=1)
    sink.start({"total_iters": spec.total_iters})
    ipe = spec.iters_per_epoch
    for step in range(2 * ipe):  # half the run, one "second" per epoch
        sink.log(step, {"loss": 1.0}, epoch=(step + 1) / ipe, wall_time=(step + 1) / ipe)
    deadline = time.monotonic() + 5
    while (run := get_run(engine, run_id)).progress < 0.5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run.progress == pytest.approx(0.5)
    # One second of wall time per epoch, two epochs left.
    assert run.eta_s == pytest.approx(2.0)
    assert not sink.should_stop()
    with db.session(engine) as s:
        runs.request_cancel(s, run_id)
    deadline = time.monotonic() + 5
    while not sink.should_stop() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sink.should_stop()
    sink.close()
    sink.close()  # idempotent
    assert point_counts(engine, run_id) == {"loss": 2 * ipe}


def test_device_text_names_the_trainers_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU and DDP here; a CUDA device with torch's CUDA answers faked (no GPU needed)."""
    import types

    import torch

    from worker.sink import device_text

    cpu = device_text({"device": "cpu", "nproc": 1})
    assert re.fullmatch(rf"cpu \(\d+ cores\), torch {re.escape(torch.__version__)}", cpu)
    assert device_text({"device": "cpu", "nproc": 4}) == f"{cpu} x 4 processes"
    props = types.SimpleNamespace(name="NVIDIA H200", total_memory=140 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    meta = {"device": "cuda:0", "device_name": "NVIDIA H200", "nproc": 1}
    assert (
        device_text(meta) == f"cuda:0 NVIDIA H200 (140 GiB), torch {torch.__version__}, CUDA 12.8"
    )


def test_db_sink_notices_lost_run(sqlite_url: str) -> None:
    """Re-queued by the reaper and started elsewhere: this attempt must stop."""
    from worker.sink import DbSink

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    spec = tiny_spec()
    run_id = create_run(engine, spec)
    with db.session(engine) as s:
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")
    sink = DbSink(engine, run_id, spec, interval=0.05, attempt=1)
    with db.session(engine) as s:
        runs.requeue(s, run_id)
        runs.mark_running(s, run_id, host="h2", gpus="", worker="w2")  # attempt 2
    deadline = time.monotonic() + 5
    while not sink.should_stop() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sink.monitor.lost and sink.should_stop()
    sink.close()


# ---------------------------------------------------------------------------------------
# end to end: `batchlab worker --gpus none` on the embedded SQLite broker and store


class Service:
    def __init__(self, home: Path, worker: WorkerProcess) -> None:
        from worker.celery_app import make_app

        self.home = home
        self.worker = worker
        self.engine = db.get_engine(f"sqlite:///{home / 'batchlab.db'}")
        self.app = make_app(f"sqla+sqlite:///{home / 'broker.db'}")

    def submit(self, spec: RunSpec) -> int:
        from worker.celery_app import enqueue

        run_id = create_run(self.engine, spec)
        enqueue(run_id, spec, celery_app=self.app, engine=self.engine)
        return run_id

    def wait(self, run_id: int, *statuses: str, timeout: float = 60) -> Run:
        return wait_for(self.engine, run_id, statuses, timeout, self.worker)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("worker-home")
    engine = db.get_engine(f"sqlite:///{home / 'batchlab.db'}")
    db.migrate(engine)
    worker = WorkerProcess.launcher(worker_env(home), home / "worker.log", "--loglevel", "info")
    svc = Service(home, worker)
    try:
        yield svc
    finally:
        worker.stop()


@pytest.mark.slow
def test_run_succeeds_with_every_point(service: Service) -> None:
    spec = tiny_spec()
    run_id = service.submit(spec)
    run = service.wait(run_id, "succeeded", "failed", "diverged", "cancelled")
    assert run.status == "succeeded", run.error
    assert_complete(service.engine, run_id, spec)
    assert run.attempts == 1 and run.progress == 1.0
    assert run.host == socket.gethostname()
    # CPU node names carry the supervisor's pid: two CPU workers on one host differ.
    assert re.fullmatch(rf"cpu-\d+@{re.escape(socket.gethostname())}", run.worker or "")
    assert run.gpus == ""
    # What it trained on, in the words of the worker's device probe; and where it was sent.
    import torch

    assert run.device and run.device.startswith("cpu (")
    assert run.device.endswith(f"torch {torch.__version__}") and run.queue == "cpu"
    assert run.summary and 0 <= run.summary["final_val_err"] <= 1
    assert (service.home / "runs" / run.uid / "checkpoint.pt").exists()
    # The worker registered itself, with its queue, for GET /api/workers.
    from worker.celery_app import inspect_workers

    info = inspect_workers(service.engine, celery_app=service.app)
    (me,) = [w for w in info["workers"] if w["name"] == run.worker]
    assert me["queues"] == ["cpu"] and me["alive"] and me["gpus"] == ""
    assert info["queues"]["cpu"] == 0


@pytest.mark.slow
def test_duplicate_and_obsolete_messages_are_skipped(service: Service) -> None:
    from worker.celery_app import enqueue

    first = service.submit(tiny_spec(epochs=1))
    # A second message for the same run (a broker re-delivery), and one for a run that
    # was deleted after its message was sent. Neither may start a training.
    enqueue(first, tiny_spec(epochs=1), celery_app=service.app, queue="cpu")
    enqueue(10**9, tiny_spec(), celery_app=service.app, queue="cpu")
    # One worker, FIFO: once a later run is done, both were handled.
    last = service.submit(tiny_spec(epochs=1))
    assert service.wait(last, "succeeded", "failed").status == "succeeded"
    run = get_run(service.engine, first)
    assert (run.status, run.attempts) == ("succeeded", 1)


@pytest.mark.slow
def test_cancel_stops_a_running_run(service: Service) -> None:
    spec = tiny_spec(epochs=2000)  # minutes of training if nobody stops it
    run_id = service.submit(spec)
    service.wait(run_id, "running")
    while not point_counts(service.engine, run_id).get("loss"):
        time.sleep(0.05)
    asked = time.monotonic()
    with db.session(service.engine) as s:
        runs.request_cancel(s, run_id)
    run = service.wait(run_id, "cancelled", "succeeded", "failed", timeout=10)
    took = time.monotonic() - asked
    assert run.status == "cancelled", run.error
    assert took < 5, f"cancel took {took:.1f} s"
    assert 0 < point_counts(service.engine, run_id)["loss"] < spec.total_iters


@pytest.mark.slow
def test_diverging_run_ends_diverged(service: Service) -> None:
    spec = tiny_spec(base_lr=1000, scaling="none", epochs=2)
    run_id = service.submit(spec)
    run = service.wait(run_id, "diverged", "succeeded", "failed")
    assert run.status == "diverged", run.error
    assert run.diverged_step is not None and 0 <= run.diverged_step < spec.total_iters
    assert "loss" in (run.error or "")
    assert steps_of(service.engine, run_id, "loss")[-1] == run.diverged_step


@pytest.mark.slow
def test_trainer_error_marks_failed_with_its_type(service: Service) -> None:
    spec = RunSpec(
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
    run_id = service.submit(spec)
    run = service.wait(run_id, "failed", "succeeded")
    assert run.status == "failed"
    assert run.error == "trainer.RunConfigError: data_root '/nonexistent/mnist' is not a folder"


@pytest.mark.slow
def test_multi_process_run_uses_torchrun(service: Service) -> None:
    """nproc=2 on the CPU: the task starts torchrun, rank 0 writes every point."""
    spec = tiny_spec(workers=2, nproc=2, batch_per_worker=10, epochs=2)
    run_id = service.submit(spec)
    run = service.wait(run_id, "succeeded", "failed", "diverged", timeout=90)
    assert run.status == "succeeded", run.error
    assert_complete(service.engine, run_id, spec)
    assert run.summary and run.summary["total_batch"] == 20
    assert run.device and re.fullmatch(r"cpu \(\d+ cores\), torch \S+ x 2 processes", run.device)


@pytest.mark.slow
def test_launcher_shuts_down_cleanly(service: Service) -> None:
    """SIGTERM to `batchlab worker`: a warm shutdown of its worker, exit code 0."""
    proc = service.worker.proc
    assert proc.poll() is None
    # The Celery worker runs in a session of its own (Ctrl-C reaches the supervisor only).
    (pid,) = re.findall(r"started cpu-\d+@%h \(pid (\d+),", service.worker.log_path.read_text())
    assert os.getpgid(int(pid)) == int(pid) != os.getpgid(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    # The supervisor waited for it: neither the worker nor its pool child is left.
    with pytest.raises(ProcessLookupError):
        os.killpg(int(pid), 0)
    assert "Warm shutdown" in service.worker.log_path.read_text()


def test_task_skips_runs_that_are_not_queued(sqlite_url: str) -> None:
    from worker.tasks import execute

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    cancelled = create_run(engine, tiny_spec())
    with db.session(engine) as s:
        runs.request_cancel(s, cancelled)  # queued -> cancelled at once
    assert execute(engine, cancelled, worker="w") == "skipped"
    assert execute(engine, 12345, worker="w") == "skipped"  # deleted / never existed
    run = get_run(engine, cancelled)
    assert (run.status, run.attempts) == ("cancelled", 0)


def test_task_fails_a_stored_spec_that_no_longer_validates(sqlite_url: str) -> None:
    from worker.tasks import execute

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    with db.session(engine) as s:
        run_id = runs.create_run(s, name="old", spec={"model": "vgg", "epochs": 3}).id
    assert execute(engine, run_id, worker="w") == "failed"
    run = get_run(engine, run_id)
    assert run.status == "failed" and run.attempts == 1
    assert run.error is not None and run.error.startswith("invalid spec: model: ")


def test_sqlite_broker_is_wal_and_pruned(tmp_path: Path) -> None:
    import sqlite3

    from worker.celery_app import enqueue, make_app, prune_delivered, queue_lengths

    url = f"sqla+sqlite:///{tmp_path / 'sub' / 'broker.db'}"  # folder created on demand
    app = make_app(url)
    enqueue(1, tiny_spec(), celery_app=app)
    enqueue(2, tiny_spec(), celery_app=app)
    path = tmp_path / "sub" / "broker.db"
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert queue_lengths(["cpu"], celery_app=app) == {"cpu": 2}
    # One message delivered (invisible, as kombu leaves it): pruning removes only it.
    with conn:
        conn.execute("UPDATE kombu_message SET visible = 0 WHERE id = 1")
    conn.close()
    assert prune_delivered(url) == 1
    assert queue_lengths(["cpu"], celery_app=app) == {"cpu": 1}
    assert prune_delivered("redis://localhost:6379/0") == 0


def test_task_reports_an_unreachable_database_as_claim_failure() -> None:
    """Raised before the run is ours: the Celery task re-sends its message on it."""
    from worker.tasks import ClaimFailed, execute

    engine = sa.create_engine("sqlite:////nonexistent-dir/batchlab.db")
    with pytest.raises(ClaimFailed, match="OperationalError"):
        execute(engine, 1, worker="w")


def test_inspect_workers_answers_when_the_broker_is_down(sqlite_url: str) -> None:
    from worker.celery_app import inspect_workers, make_app

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    with db.session(engine) as s:
        runs.record_worker(s, name="gpu0@box", host="box", gpus="0", queues=["gpu"])
    started = time.monotonic()
    info = inspect_workers(engine, celery_app=make_app("redis://127.0.0.1:1/0"))
    assert time.monotonic() - started < 5
    assert info["queues"] == {}
    (w,) = info["workers"]
    assert (w["name"], w["gpus"], w["queues"], w["alive"]) == ("gpu0@box", "0", ["gpu"], True)


def test_auto_device_goes_to_gpu_only_while_a_gpu_worker_is_alive(
    sqlite_url: str, tmp_path: Path
) -> None:
    from worker.celery_app import enqueue, make_app, queue_lengths

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    app = make_app(f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    auto = tiny_spec(device="auto")
    enqueue(1, auto, celery_app=app, engine=engine)
    assert queue_lengths(["cpu", "gpu"], celery_app=app) == {"cpu": 1, "gpu": 0}
    with db.session(engine) as s:
        runs.record_worker(s, name="gpu0@box", host="box", gpus="0", queues=["gpu"])
    enqueue(2, auto, celery_app=app, engine=engine)
    assert queue_lengths(["cpu", "gpu"], celery_app=app) == {"cpu": 1, "gpu": 1}


def _scripted_supervisor(monkeypatch: pytest.MonkeyPatch, script: str) -> Any:
    """A Supervisor whose one child runs ``script`` instead of Celery, restarting fast."""
    from worker import launch
    from worker.gpus import plan_workers

    monkeypatch.setattr(launch, "MAX_RESTART_DELAY_S", 0.01)
    sup = launch.Supervisor(plan_workers([]))
    sup.children[0].command = [sys.executable, "-c", script]
    return sup


def test_supervisor_restarts_a_dead_worker_and_forwards_stop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import threading

    starts = tmp_path / "starts"
    # First start: exit 1 (a crash). Second start: wait for SIGTERM, exit 0 on it.
    script = (
        "import os, signal, sys, time\n"
        f"p = {str(starts)!r}\n"
        "n = len(open(p).read()) if os.path.exists(p) else 0\n"
        "open(p, 'a').write('x')\n"
        "if n == 0: sys.exit(1)\n"
        "assert os.environ['CUDA_VISIBLE_DEVICES'] == ''\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "time.sleep(60)\n"
    )
    sup = _scripted_supervisor(monkeypatch, script)

    def stop_after_restart() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if starts.exists() and len(starts.read_text()) >= 2:
                time.sleep(0.3)  # let the child install its handler
                os.kill(os.getpid(), signal.SIGTERM)  # what Ctrl-C / docker stop does
                return
            time.sleep(0.02)

    threading.Thread(target=stop_after_restart, daemon=True).start()
    assert sup.run() == 0
    assert starts.read_text() == "xx"
    assert sup.children[0].exit_codes == [1, 0]


def test_supervisor_gives_up_on_a_worker_that_cannot_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import launch

    sup = _scripted_supervisor(monkeypatch, "import sys; sys.exit(3)")
    assert sup.run() == 1
    assert sup.children[0].exit_codes == [3] * launch.MAX_QUICK_EXITS


def test_db_sink_stores_an_epoch_before_its_checkpoint(sqlite_url: str) -> None:
    """After the epoch's values are logged (the trainer checkpoints next), every point
    of the epoch is in the database, not only in the writer's queue."""
    from store.metrics import MetricWriter
    from worker.sink import DbSink

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    spec = tiny_spec()
    run_id = create_run(engine, spec)
    lazy = MetricWriter(engine, run_id, flush_interval=3600)  # never flushes by itself
    sink = DbSink(engine, run_id, spec, writer=lazy)
    ipe = spec.iters_per_epoch
    for step in range(ipe - 1):
        sink.log(step, {"loss": 1.0, "lr": 0.1}, epoch=(step + 1) / ipe, wall_time=step)
    assert point_counts(engine, run_id) == {}  # the writer holds them
    # The epoch's last iteration starts a background write (the trainer validates next);
    # its epoch values must find everything stored before the checkpoint is taken.
    sink.log(ipe - 1, {"loss": 1.0, "lr": 0.1}, epoch=1.0, wall_time=ipe - 1)
    sink.log(ipe - 1, {"val_err": 0.5, "epoch_time": 1.0}, epoch=1.0, wall_time=ipe)
    assert point_counts(engine, run_id) == {"loss": ipe, "lr": ipe, "val_err": 1, "epoch_time": 1}
    sink.close()


def test_a_cold_shutdown_leaves_the_run_to_the_reaper(
    sqlite_url: str, batchlab_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's cold shutdown (a second SIGTERM) raises inside the training, with the solo
    pool as NotImplementedError("... does not implement kill_job"): not a failure of the
    run, which stays running for the reaper to re-queue from its checkpoint."""
    from worker import tasks

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    run_id = create_run(engine, tiny_spec())

    def interrupted(*_: Any) -> None:
        tasks._on_shutting_down(how="Cold")  # what Celery's signal sends first
        raise NotImplementedError("solo.TaskPool does not implement kill_job")

    monkeypatch.setattr(tasks, "_train_inline", interrupted)
    try:
        assert tasks.execute(engine, run_id, worker="cpu-1@box") == "interrupted"
    finally:
        tasks.cold_shutdown.clear()
    with db.session(engine) as s:
        run = runs.get_run(s, run_id)
        assert run.status == "running" and run.error is None
        later = run.heartbeat_at + timedelta(seconds=60)
        assert [r.id for r in runs.stale_runs(s, 30, now=later)] == [run_id]
