"""Helpers shared by the tests that start real processes (API, workers, torchrun)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from server.serve import free_port

__all__ = ["free_port", "stop_process_groups"]


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
