"""Start and supervise the Celery worker processes that ``batchlab worker`` plans.

Each child is ``celery -A worker.celery_app worker`` with concurrency 1, prefetch 1
and its own ``CUDA_VISIBLE_DEVICES``. Children run in their own session, so a Ctrl-C
in the terminal reaches only this supervisor, which forwards it once: the first signal
asks every worker for a warm shutdown (finish the current run), a second one for a
cold shutdown (stop now; the runs are re-queued by the reaper and resume from their
last checkpoint). A child that dies on its own is restarted with a growing delay; one
that keeps dying right after start (a broker that is down, a bad option) makes the
supervisor give up and exit non-zero.

Before any worker starts, ``prove_devices`` checks in a child process (so this one
stays torch-free) that torch sees exactly the GPUs the workers are given: a worker
pinned to a GPU that torch cannot use would otherwise train on the CPU unnoticed.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from worker.gpus import PROBE_MISMATCH, DeviceReport, WorkerPlan

log = logging.getLogger(__name__)

# A child alive shorter than this counts as failing at start.
QUICK_EXIT_S = 10.0
MAX_QUICK_EXITS = 5
MAX_RESTART_DELAY_S = 30.0
POLL_S = 0.2
# Importing torch and reading the device properties; generous for a cold disk.
PROBE_TIMEOUT_S = 180.0


class DeviceCheckError(RuntimeError):
    """The device probe itself failed (crashed, timed out), as opposed to a mismatch."""


def prove_devices(
    gpus: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = PROBE_TIMEOUT_S
) -> DeviceReport:
    """Probe with ``CUDA_VISIBLE_DEVICES`` set to ``gpus``, as the workers will be: one
    probe covers every planned worker, since each sees a subset of these GPUs. The
    report's ``error`` says what does not match; DeviceCheckError if no report came."""
    child_env = {**(os.environ if env is None else env), "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    command = [sys.executable, "-m", "worker.gpus", "--expect", ",".join(gpus)]
    try:
        out = subprocess.run(
            command, env=child_env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        raise DeviceCheckError(f"the device probe took more than {timeout:.0f} s") from err
    lines = out.stdout.strip().splitlines()
    if out.returncode not in (0, PROBE_MISMATCH) or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]  # the exception
        raise DeviceCheckError(f"the device probe failed (exit {out.returncode}): {tail}")
    return DeviceReport.from_dict(json.loads(lines[-1]))


def worker_command(plan: WorkerPlan, *, loglevel: str = "info", pool: str = "prefork") -> list[str]:
    """The Celery command line of one worker."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--hostname",
        plan.name,
        "--queues",
        ",".join(plan.queues),
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "--pool",
        pool,
        "--loglevel",
        loglevel,
        # Our workers table replaces gossip / mingle; both cost start-up time and a
        # fanout exchange the SQLite transport does not have.
        "--without-gossip",
        "--without-mingle",
    ]


def _load_prctl() -> Any:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux / glibc: no parent-death signal
        return None


# Resolved here, in the parent: a preexec_fn runs between fork and exec, where importing
# or loading a library can deadlock on a lock another thread held at fork time.
_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: on Linux the child gets SIGTERM when its parent dies (no orphans)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    plan: WorkerPlan
    command: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Runs the planned workers until they exit or a signal says stop."""

    def __init__(
        self,
        plans: Sequence[WorkerPlan],
        *,
        loglevel: str = "info",
        pool: str = "prefork",
        env: dict[str, str] | None = None,
    ) -> None:
        if not plans:
            raise ValueError("plans: at least one worker is needed")
        self.children = [Child(p, worker_command(p, loglevel=loglevel, pool=pool)) for p in plans]
        self.base_env = dict(os.environ if env is None else env)
        self.signals_seen = 0
        self.failed = False

    def _start(self, child: Child) -> None:
        env = {**self.base_env, **child.plan.env}
        child.proc = subprocess.Popen(
            child.command,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        child.started = time.monotonic()
        child.restart_at = None
        log.info(
            "started %s (pid %s, GPUs %s)",
            child.plan.name,
            child.proc.pid,
            ",".join(child.plan.gpus) or "none",
        )

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals_seen += 1
        # Celery: TERM = warm shutdown (finish the task), QUIT = cold shutdown.
        forward = signal.SIGTERM if self.signals_seen == 1 else signal.SIGQUIT
        log.warning(
            "got %s; %s shutdown of the workers",
            signal.Signals(signum).name,
            "warm" if forward == signal.SIGTERM else "cold",
        )
        self._send(forward)

    def _send(self, sig: int) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.proc.pid, sig)

    def _check(self, child: Child, now: float) -> None:
        """Restart a child that exited on its own, or give up on one that cannot start."""
        if child.proc is None:
            if child.restart_at is not None and now >= child.restart_at:
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            return
        child.exit_codes.append(code)
        child.proc = None
        lived = now - child.started
        child.quick_exits = child.quick_exits + 1 if lived < QUICK_EXIT_S else 0
        if child.quick_exits >= MAX_QUICK_EXITS:
            log.error(
                "%s exited %s times right after start (last code %s); giving up",
                child.plan.name,
                child.quick_exits,
                code,
            )
            self.failed = True
            return
        delay = min(MAX_RESTART_DELAY_S, 2.0**child.quick_exits)
        log.warning(
            "%s exited with code %s after %.0f s; restarting in %.0f s",
            child.plan.name,
            code,
            lived,
            delay,
        )
        child.restart_at = now + delay

    def run(self) -> int:
        """Start every worker and supervise; the exit code for ``batchlab worker``."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for child in self.children:
                self._start(child)
            while not self.signals_seen and not self.failed:
                now = time.monotonic()
                for child in self.children:
                    self._check(child, now)
                time.sleep(POLL_S)
            if self.failed:
                self._send(signal.SIGTERM)
            return self._wait_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _wait_all(self) -> int:
        """Wait for every child; 0 when all stopped cleanly after a requested shutdown."""
        codes = []
        for child in self.children:
            if child.proc is None:
                continue
            code = child.proc.wait()  # a second signal meanwhile is handled, not raised
            child.exit_codes.append(code)
            child.proc = None
            codes.append(code)
        if self.failed:
            return 1
        return 0 if all(c == 0 for c in codes) else 1
