"""Capture a run's output into its log (``store.logs``), in batches from a thread.

``RunLogWriter`` queues lines (``write_line`` never waits on the database) and stores
them every ``flush_interval`` seconds, one transaction per batch. A database hiccup keeps
the lines queued (at most ``MAX_QUEUED``; the oldest go first) and retries.

Three sources feed it:
- ``capture(writer)`` around an inline training: ``sys.stdout`` / ``sys.stderr`` are
  teed (what still reaches the worker's own output), ``warnings`` are shown on the
  teed stderr, and log records of ``trainer`` and ``worker`` go in as stream "log";
- ``pump(pipe, writer, copy)`` for torchrun: every rank's output through one pipe, also
  copied to ``ddp.log`` in the run's folder;
- ``writer.write_line("error", traceback)`` for a failure.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
from collections import deque
from collections.abc import Iterator
from typing import IO, Any, Protocol

from sqlalchemy.engine import Engine

from store import db
from store.logs import LOG_MAX_LINES, LogLine, append_log
from store.models import utcnow

log = logging.getLogger(__name__)

FLUSH_S = 0.5
MAX_QUEUED = LOG_MAX_LINES
# Loggers whose records belong to the run (Celery's own stay in the worker's log).
RUN_LOGGERS = ("trainer", "worker", "py.warnings")


class LineWriter(Protocol):
    """What takes a run's output line by line: ``RunLogWriter`` or a wrapper of it."""

    def write_line(self, stream: str, text: str) -> None: ...


class RunLogWriter:
    """Batches one run's log lines into the store from a background thread."""

    def __init__(self, engine: Engine, run_id: int, *, flush_interval: float = FLUSH_S) -> None:
        self.engine, self.run_id, self.flush_interval = engine, run_id, flush_interval
        self._lines: deque[LogLine] = deque(maxlen=MAX_QUEUED)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"run-{run_id}-log", daemon=True)
        self._thread.start()

    def write_line(self, stream: str, text: str) -> None:
        """Queue ``text`` (one or more lines) on ``stream``."""
        now = utcnow()
        with self._lock:
            for line in text.splitlines() or [""]:
                self._lines.append(LogLine(stream, line, now))

    def flush(self) -> None:
        """Store the queued lines now; on failure they stay queued (logged, not raised)."""
        with self._write_lock:
            with self._lock:
                batch = list(self._lines)
                self._lines.clear()
            if not batch:
                return
            try:
                with db.session(self.engine) as s:
                    append_log(s, self.run_id, batch)
            except Exception:
                with self._lock:
                    self._lines.extendleft(reversed(batch))
                log.warning("run %s: storing %d log lines failed", self.run_id, len(batch))

    def _loop(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self.flush()

    def close(self) -> None:
        """Stop the thread and store what is left (idempotent)."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
        self.flush()


class _Tee(io.TextIOBase):
    """A text stream that writes through to ``target`` and, per whole line, to the log."""

    def __init__(self, target: IO[str], writer: RunLogWriter, stream: str) -> None:
        self.target, self.writer, self.stream = target, writer, stream
        self._partial = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with contextlib.suppress(Exception):
            self.target.write(text)
        with self._lock:
            # tqdm redraws with "\r": each redraw counts as a line of its own.
            joined = (self._partial + text).replace("\r", "\n")
            *whole, self._partial = joined.split("\n")
        for line in whole:
            if line.strip():
                self.writer.write_line(self.stream, line)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self.target.flush()

    def drain(self) -> None:
        if self._partial.strip():
            self.writer.write_line(self.stream, self._partial)
        self._partial = ""

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, ... of the real stream
        return getattr(self.target, name)


class _Handler(logging.Handler):
    def __init__(self, writer: RunLogWriter) -> None:
        super().__init__(logging.INFO)
        self.writer = writer
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        name = record.name
        if name == __name__ or not any(name == n or name.startswith(n + ".") for n in RUN_LOGGERS):
            return
        with contextlib.suppress(Exception):
            self.writer.write_line("log", self.format(record))


@contextlib.contextmanager
def capture(writer: RunLogWriter) -> Iterator[None]:
    """Tee this process's stdout / stderr and the run's log records into ``writer``.

    Process-wide: a worker trains one run at a time (concurrency 1), so whatever this
    process prints meanwhile belongs to the run."""
    out, err = _Tee(sys.stdout, writer, "stdout"), _Tee(sys.stderr, writer, "stderr")
    handler = _Handler(writer)
    root = logging.getLogger()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        sys.stdout, sys.stderr = saved
        out.drain()
        err.drain()


def pump(pipe: IO[bytes], writer: LineWriter, copy: IO[bytes] | None = None) -> None:
    """Read ``pipe`` to its end (torchrun's merged output), line by line, into the log
    and into ``copy``."""
    for raw in iter(pipe.readline, b""):
        if copy is not None:
            with contextlib.suppress(ValueError, OSError):  # closed by a caller gone on
                copy.write(raw)
                copy.flush()
        text = raw.decode(errors="replace").rstrip("\r\n")
        if text.strip():
            writer.write_line("stdout", text)
