"""`batchlab up`: one command brings up the API and a worker; Ctrl-C stops both.

Also `batchlab api` (the API alone) and the demo comparison `up --demo` queues.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from batchlab import cmd_up
from server.app import create_app
from server.schemas import RunOut
from server.serve import free_port
from store import db
from store import runs as store_runs
from worker.celery_app import queue_lengths

ROOT = Path(__file__).resolve().parent.parent


def start_up(
    home: Path, *args: str, command: str = "up"
) -> tuple[subprocess.Popen[bytes], Path, int]:
    """``batchlab <command> --port <free port> args`` with only BATCHLAB_HOME set."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env.update(BATCHLAB_HOME=str(home), PYTHONUNBUFFERED="1")
    log = home / f"up-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchlab.cli", command, "--port", str(port), *args],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    return proc, log, port


def wait_healthy(proc: subprocess.Popen[bytes], log: Path, port: int, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"batchlab up exited early:\n{log.read_text()}"
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"no healthy API after {timeout} s:\n{log.read_text()}")


def processes_using(home: Path) -> list[int]:
    """Pids whose environment has BATCHLAB_HOME=home (the up process and its workers)."""
    needle = f"BATCHLAB_HOME={home}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env and state != "Z":
            pids.append(int(entry.name))
    return pids


def stop(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"batchlab up ignored Ctrl-C:\n{log.read_text()}") from None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the worker")
def test_up_starts_api_and_worker_and_ctrl_c_stops_both(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc, log, port = start_up(home, "--gpus", "none")
    try:
        health = wait_healthy(proc, log, port)
        assert health["database"] == "ok" and health["broker"] == "ok"
        match = re.search(r"worker\s+pid (\d+)", log.read_text())
        assert match, log.read_text()
        worker_pid = int(match.group(1))
        os.kill(worker_pid, 0)  # the worker supervisor runs
        # ... and its Celery worker registered itself in the same database
        deadline = time.monotonic() + 90
        while not httpx.get(f"http://127.0.0.1:{port}/api/workers").json()["workers"]:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        # the embedded defaults: SQLite files in BATCHLAB_HOME
        assert (home / "batchlab.db").is_file()
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        code = stop(proc, log)
    assert code == 0, log.read_text()
    assert "batchlab stopped" in log.read_text()
    deadline = time.monotonic() + 10
    while processes_using(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_using(home) == [], log.read_text()


@pytest.mark.slow
def test_api_command_serves_from_the_environment(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc, log, port = start_up(home, command="api")
    try:
        health = wait_healthy(proc, log, port)
        assert health["status"] == "ok" and health["auth"] is False
        assert (home / "batchlab.db").is_file()  # BATCHLAB_HOME's default database
    finally:
        assert stop(proc, log) == 0, log.read_text()


def test_demo_queues_the_comparison_once(batchlab_home, sqlite_url, tmp_path, capsys):
    broker_url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    app = create_app(database_url=sqlite_url, broker_url=broker_url)
    ctx = app.state.ctx
    db.migrate(ctx.engine)
    cmd_up.queue_demo(ctx)
    cmd_up.queue_demo(ctx)  # a second `up --demo` finds runs and leaves them alone
    assert "not queueing the demo again" in capsys.readouterr().out
    with db.session(ctx.engine) as s:
        runs = [RunOut.model_validate(r).model_dump() for r in store_runs.list_runs(s)]
    assert len(runs) == 3
    (base,) = [r for r in runs if r["is_baseline"]]
    assert base["derived"]["total_batch"] == 32 and base["spec"]["warmup"] == "none"
    large = sorted((r for r in runs if not r["is_baseline"]), key=lambda r: r["spec"]["warmup"])
    assert [(r["derived"]["total_batch"], r["spec"]["warmup"]) for r in large] == [
        (512, "gradual"),
        (512, "none"),
    ]
    assert all(r["baseline_id"] == base["id"] and r["group_id"] == base["group_id"] for r in large)
    assert all(r["spec"]["model"] == "mnist1d_cnn" for r in runs)
    # queued for the worker: the baseline first
    assert queue_lengths(["cpu"], celery_app=ctx.celery) == {"cpu": 3}
    ctx.engine.dispose()
