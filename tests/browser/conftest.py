"""Real-browser fixtures: the API server and a CPU worker as processes, Debian Chromium.

Once per session: ``uvicorn server.app:create_app`` on a free port and
``batchlab worker --gpus none`` on a fresh BATCHLAB_HOME (SQLite database and broker), and
one headless Chromium driven by Playwright's sync API. Tests that only need data to show
write it straight into that database through the store (``seed_run``), as a worker
would; the form test trains a real run on the real worker.

Chromium is Debian's (/usr/bin/chromium, ``make browser``), never ``playwright install``:
without it the tests skip, and fail under CI=true (the shared ``chromium_path`` fixture).
"""

from __future__ import annotations

import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(home: Path, token: str | None = None) -> dict[str, str]:
    """The environment of a server or worker on ``home`` (nothing inherited from ours)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env.update(
        BATCHLAB_HOME=str(home),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    if token is not None:
        env["BATCHLAB_TOKEN"] = token
    return env


def start_server(home: Path, log: Path, token: str | None = None) -> tuple[subprocess.Popen, str]:
    """uvicorn with the app factory on a free port; returns (process, base URL)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "server.app:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        # Open SSE streams must not hold the shutdown up.
        "--timeout-graceful-shutdown",
        "2",
    ]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=service_env(home, token),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).json().get("database") == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"server did not become healthy:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, steps: tuple[tuple[int, float], ...] | None = None) -> None:
    """End a process group we started: each (signal, seconds to wait) until it exits."""
    steps = steps or ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))
    for sig, wait in steps:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# `batchlab worker`: a first TERM asks for a warm shutdown, a second one for a cold one.
WORKER_STOP = ((signal.SIGTERM, 2.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0))


WARMUP_SPEC = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": 80,
    "epochs": 1,
    "batch_per_worker": 16,
    "warmup": "none",
    "checkpoint": False,
}


@pytest.fixture(scope="session")
def service(tmp_path_factory, chromium_path) -> Iterator[SimpleNamespace]:
    """The API server and one CPU worker on a fresh home, for the whole session."""
    home = tmp_path_factory.mktemp("browser-home")
    server, url = start_server(home, home / "api.log")
    worker_log = home / "worker.log"
    worker = subprocess.Popen(
        [
            str(VENV_BIN / "batchlab"),
            "worker",
            "--gpus",
            "none",
            "--pool",
            "solo",
            "--loglevel",
            "warning",
        ],
        cwd=ROOT,
        env=service_env(home),
        stdout=worker_log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    from store import db

    engine = db.get_engine(f"sqlite:///{home / 'batchlab.db'}")
    http = httpx.Client(base_url=url, timeout=30)
    # The worker imports PyTorch with its first run (10-20 s on a busy machine): give it
    # a tiny one now, so the live test's run trains while the page watches.
    http.post("/api/runs", json={"name": "worker warm-up", "spec": WARMUP_SPEC}).raise_for_status()
    try:
        yield SimpleNamespace(
            url=url,
            home=home,
            engine=engine,
            http=http,
            worker=worker,
            worker_log=worker_log,
        )
    finally:
        stop(worker, WORKER_STOP)
        stop(server)
        engine.dispose()


@pytest.fixture(scope="session")
def browser(chromium_path) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def browser_context(browser, service) -> Iterator[Any]:
    """One context for the session, so Plotly (4 MB) comes from the HTTP cache after the
    first page; tests that need a clean profile (localStorage) open their own."""
    context = new_context(browser, service.url)
    yield context
    context.close()


def new_context(browser: Any, url: str) -> Any:
    context = browser.new_context(base_url=url, viewport={"width": 1440, "height": 900})
    # Every view announces finished drawing with a `batchlab:drawn` event: keep them all.
    context.add_init_script(DRAWN_RECORDER)
    return context


@pytest.fixture(scope="session")
def tab(browser_context) -> Iterator[Any]:
    """One tab for the whole session: views are opened by hash (open_view), as a user
    clicks through the app, so Plotly is parsed once rather than for every test."""
    pg = browser_context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.set_default_timeout(15_000)
    pg.goto("/#/runs")
    yield pg
    pg.close()


@pytest.fixture()
def page(tab) -> Iterator[Any]:
    """The session's tab; any uncaught JavaScript error during the test fails it."""
    tab.errors.clear()
    yield tab
    errors = list(tab.errors)
    assert not errors, f"JavaScript errors on the page: {errors}"


def open_view(page: Any, route: str) -> None:
    """Show ``route`` ("#/compare?runs=1") in the page and forget earlier draw events."""
    page.evaluate(
        """(route) => {
            window.__drawn = [];
            if (location.hash === route) window.dispatchEvent(new HashChangeEvent('hashchange'));
            else location.hash = route;
        }""",
        route,
    )


DRAWN_RECORDER = (
    "window.__drawn = [];"
    "document.addEventListener('batchlab:drawn', (e) => window.__drawn.push("
    "{...e.detail, t: Date.now()}));"
)


# --------------------------------------------------------------------------------------
# Data written through the store, as a worker writes it.

BASE_SPEC: dict[str, Any] = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": 20480,
    "epochs": 10,
    "workers": 8,
    "batch_per_worker": 32,
    "warmup_epochs": 2,
    "milestones": [6, 8],
}


def full_spec(**overrides: Any) -> dict[str, Any]:
    """A validated RunSpec dict: BASE_SPEC with ``overrides``."""
    from trainer.spec import RunSpec

    return RunSpec.model_validate({**BASE_SPEC, **overrides}).model_dump()


def seed_run(
    engine: Any,
    *,
    name: str,
    spec: dict[str, Any],
    status: str = "succeeded",
    group_id: int | None = None,
    baseline_id: int | None = None,
    is_baseline: bool = False,
    final_err: float = 0.2,
    summary: dict[str, Any] | None = None,
    error: str | None = None,
    diverged_step: int | None = None,
    points: bool = True,
) -> int:
    """A finished run with curves shaped like training: error falling towards final_err.

    lr follows the real schedule (trainer.schedule.lr_at); train_err and loss decay with
    noise from the run's seed; val_err is logged at each epoch's last iteration.
    """
    from store import db, runs
    from store.metrics import MetricWriter
    from trainer.schedule import lr_at
    from trainer.spec import RunSpec

    rs = RunSpec.model_validate(spec)
    with db.session(engine) as s:
        run = runs.create_run(
            s,
            name=name,
            spec=spec,
            group_id=group_id,
            baseline_id=baseline_id,
            is_baseline=is_baseline,
        )
        run_id = run.id
    if points:
        rng = random.Random(1000 * rs.seed + rs.total_batch)
        ipe, total = rs.iters_per_epoch, rs.total_iters
        with MetricWriter(engine, run_id) as writer:
            for step in range(total):
                epoch = (step + 1) / ipe
                level = final_err + (0.9 - final_err) * math.exp(-3.0 * epoch / rs.epochs)
                err = min(1.0, max(0.0, level + rng.gauss(0, 0.03)))
                values = {
                    "loss": 2.3 * level + rng.gauss(0, 0.05),
                    "train_err": err,
                    "lr": lr_at(rs, step, ipe),
                    "grad_norm": 1 + rng.random(),
                }
                if (step + 1) % ipe == 0:
                    values.update(val_err=level + 0.02, val_loss=2.3 * level + 0.1)
                writer.add(step, values, epoch=epoch, wall_time=0.01 * (step + 1))
    with db.session(engine) as s:
        if status != "queued":
            runs.mark_running(s, run_id, host="testbox", gpus="", worker="cpu@testbox")
        if status in ("succeeded", "failed", "diverged", "cancelled"):
            done = {
                "final_val_err": final_err + 0.02,
                "best_val_err": final_err,
                "median_last5_val_err": final_err + 0.025,
                **(summary or {}),
            }
            runs.mark_finished(
                s, run_id, status, error=error, diverged_step=diverged_step, summary=done
            )
    return run_id


@pytest.fixture()
def seed(service) -> Callable[..., int]:
    """seed(name=..., spec=..., ...) -> run id, written into the live server's database."""

    def _seed(**kwargs: Any) -> int:
        return seed_run(service.engine, **kwargs)

    return _seed


def wait_drawn(page: Any, view: str, count: int = 1, timeout_ms: int = 15_000) -> dict[str, Any]:
    """Wait until the view has announced ``count`` draws; returns the latest one's detail."""
    page.wait_for_function(
        "([v, n]) => window.__drawn.filter((d) => d.view === v).length >= n",
        arg=[view, count],
        timeout=timeout_ms,
    )
    return page.evaluate("(v) => window.__drawn.filter((d) => d.view === v).at(-1)", view)


def drawn_count(page: Any, view: str) -> int:
    return page.evaluate("(v) => window.__drawn.filter((d) => d.view === v).length", view)


@pytest.fixture(scope="session")
def ui() -> SimpleNamespace:
    """The helpers above, for test modules (tests/ is not a package to import from)."""
    return SimpleNamespace(
        open=open_view,
        wait_drawn=wait_drawn,
        drawn_count=drawn_count,
        full_spec=full_spec,
        seed_run=seed_run,
        start_server=start_server,
        stop=stop,
        new_context=new_context,
    )
