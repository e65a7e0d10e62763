"""Helpers shared by the tests that start real processes (API, workers, torchrun)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from server.serve import free_port, serve_in_thread

__all__ = ["free_port", "run_async", "serve_app", "stop_process_groups"]


def serve_app(token: str | None = None, port: int = 0) -> Iterator[SimpleNamespace]:
    """The real app under uvicorn in a thread, on the test's BATCHLAB_HOME (a generator:
    `yield from` it in a fixture, or close it to take the server away)."""
    from server.app import create_app

    app = create_app(token=token)
    with serve_in_thread(app, port=port or None) as url:
        port = int(url.rsplit(":", 1)[1])
        yield SimpleNamespace(url=url, port=port, engine=app.state.ctx.engine)


def stop_process_groups(procs: list[subprocess.Popen]) -> None:
    """Stop processes started in their own sessions: SIGTERM (a warm shutdown), a second
    one (the worker supervisor then stops its Celery workers cold), then SIGKILL."""
    for sig, grace_s in ((signal.SIGTERM, 2.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + grace_s
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))


def run_async(coro: Any) -> Any:
    """``asyncio.run(coro)`` in a thread of its own: the browser tests' Playwright keeps an
    event loop running in the main thread, where asyncio.run refuses to start another."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
