"""A worker's own record in the ``workers`` table, and its start-up chores.

Celery's remote inspection does not work over the SQLite transport, so each worker
process writes a row (name, host, GPUs, queues, the run it is training) every few
seconds; ``worker.celery_app.inspect_workers`` reads them for ``GET /api/workers``.

The hooks are connected to Celery's worker signals by ``worker.tasks``, which every
worker imports; they run in the worker's main process (the prefork pool's children
only run tasks).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine

from store import db, gang, runs

log = logging.getLogger(__name__)

BEAT_S = 5.0


def visible_gpus() -> str:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES lists them ("" for none)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()


class WorkerRegistry:
    """Refreshes one worker's row every ``interval`` seconds in a daemon thread."""

    def __init__(
        self, engine: Engine, name: str, queues: Sequence[str], *, interval: float = BEAT_S
    ) -> None:
        self.engine = engine
        self.name = name
        self.queues = list(queues)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-registry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        with db.session(self.engine) as s:
            # The run this worker trains is the one the task marked with its name (or, as a
            # node of a multi-node run, the gang it trains in); with a prefork pool the task
            # lives in a child process, so ask the database.
            active = runs.running_run_of(s, self.name) or gang.training_run_of(s, self.name)
            runs.record_worker(
                s,
                name=self.name,
                host=socket.gethostname(),
                gpus=visible_gpus(),
                queues=self.queues,
                active_run_id=active,
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:
                log.warning("worker %s: registry beat failed", self.name, exc_info=True)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


_registry: WorkerRegistry | None = None


def on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Worker main process, once consuming: migrate, reap stale runs, remove the folders
    of deleted runs, prune the SQLite broker, start beating. Each chore that fails is
    logged and skipped: the database may be starting too, and tasks retry their claim
    until it answers."""
    global _registry
    from worker.celery_app import app, prune_delivered
    from worker.recovery import reap_stale

    engine = db.get_engine()
    chores = (
        ("migrating the database", lambda: db.migrate(engine)),
        ("reaping stale runs", lambda: reap_stale(engine)),
        ("removing folders of deleted runs", lambda: prune_orphans(engine)),
        ("pruning the SQLite broker", lambda: prune_delivered(str(app.conf.broker_url))),
    )
    for what, chore in chores:
        try:
            result = chore()
        except Exception:
            log.warning("%s at start failed", what, exc_info=True)
            continue
        if result:
            log.info("%s at start: %s", what, result)
    name = getattr(sender, "hostname", None) or f"celery@{socket.gethostname()}"
    queues = sorted(q.name for q in sender.task_consumer.queues) if sender is not None else []
    _registry = WorkerRegistry(engine, name, queues)
    _registry.start()


def prune_orphans(engine: Engine) -> list[str]:
    """Folders under runs/ whose run is gone: the API deletes a run's folder only on its
    own disk, so each worker clears its own at start."""
    with db.session(engine) as s:
        return runs.prune_orphan_run_dirs(s)


def on_worker_shutdown(**_: Any) -> None:
    if _registry is not None:
        _registry.stop()


def on_process_init(**_: Any) -> None:
    """A freshly forked pool child must not reuse its parent's pooled connections."""
    db.get_engine().dispose(close=False)
    warm_imports()


def warm_imports() -> None:
    """Import the trainer (and torch) in the background so the first run does not pay
    10-20 s of imports. A thread, because Celery kills a pool child that takes more than
    a few seconds to report itself up; the import lock makes a task that arrives early
    simply wait for it."""
    import importlib
    import threading

    threading.Thread(
        target=importlib.import_module, args=("trainer.loop",), name="warm-imports", daemon=True
    ).start()
