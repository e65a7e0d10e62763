"""Live tracking of a run trained anywhere: a notebook's loop, a SLURM or Kubernetes job.

    >>> import batchlab
    >>> with batchlab.Client(url, token=...).start_run("my run", {"lr": 0.1}) as run:
    ...     for step in range(1000):
    ...         run.log(step, loss=..., lr=...)
    ...         if run.should_stop:          # cancelled from the dashboard
    ...             break

The run registers itself (``POST /api/external/runs``, running at once, never queued) and
shows up in the dashboard like any other: live curves, compare, sweeps. ``log`` only
appends to a list; a background thread uploads every ``flush_interval`` s (or sooner when
``batch_points`` wait), JSON gzip-compressed, in batches under the server's body limit,
and heartbeats once a second (the answer carries a cancel). A failed upload is retried
with exponential backoff; while the server does not answer, points are appended to a local
spool file (fsynced) and replayed in order once it does. The server stores each
``(key, step)`` once, so a batch re-sent after a lost answer is harmless. ``finish`` waits
until the server has acknowledged every point (or says how many are left on disk, where).

``TrackingSink`` is the trainer's ``MetricSink`` over a ``TrackedRun``
(``batchlab train SPEC --server URL``). Nothing here imports torch.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.files import append_durably
from core.settings import get_settings

if TYPE_CHECKING:
    from batchlab.client import Client

log = logging.getLogger("batchlab.tracking")

# Server-side rule (server.schemas.MetricKey): keys the API can read back.
KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
FLUSH_INTERVAL_S = 0.25
BATCH_POINTS = 20_000  # upload as soon as this many points wait
MAX_BACKOFF_S = 4.0
FINISH_TIMEOUT_S = 60.0
REGISTER_TIMEOUT_S = 60.0
# Statuses worth retrying: the server (or a proxy in front) is restarting or overloaded.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}

Record = tuple[int, float, float, dict[str, float]]


class TrackingError(RuntimeError):
    """The server refused the run's data for good (bad token, run deleted, ...)."""


class FinishTimeout(TrackingError, TimeoutError):
    """``finish`` ran out of time with points the server has not acknowledged; they are
    kept in ``spool`` (``left`` of them), and the run's final status was not recorded."""

    def __init__(self, message: str, *, left: int, spool: Path) -> None:
        super().__init__(message)
        self.left, self.spool = left, spool


class RunCancelled(Exception):
    """Raised by ``log`` (with ``raise_on_cancel=True``) once the dashboard cancelled the
    run; leaving a ``with`` block through it finishes the run as cancelled."""


# ---------------------------------------------------------------------------------------
# The spool: records the server did not take yet, in order, on local disk


class Spool:
    """An append-only JSON-lines file of records, read back in order from an offset.

    Appends are fsynced (they are the only copy of those points); the file is deleted
    once everything in it was acknowledged.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0  # bytes of the file already acknowledged
        self.records = 0  # records in the file past ``offset``

    def append(self, records: list[Record]) -> None:
        if not records:
            return
        append_durably(
            self.path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        )
        self.records += len(records)

    def read(self, limit: int) -> tuple[list[Record], int]:
        """Up to ``limit`` records after ``offset``, and the offset past them."""
        out: list[Record] = []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            end = self.offset
            for line in fh:
                if len(out) >= limit:
                    break
                end += len(line)
                try:
                    step, epoch, wall, values = json.loads(line)
                except ValueError:  # a torn line of a crash while appending
                    continue
                out.append((int(step), float(epoch), float(wall), dict(values)))
        return out, end

    def advance(self, end: int, n: int) -> None:
        self.offset, self.records = end, max(0, self.records - n)
        if self.records == 0:
            self.path.unlink(missing_ok=True)
            self.offset = 0


# ---------------------------------------------------------------------------------------


class TrackedRun:
    """One external run being tracked; made by ``Client.start_run`` (see the module doc).

    ``id`` and ``url`` name it on the server. ``should_stop`` turns True once the
    dashboard cancelled (or deleted) it. ``pending`` counts the points logged but not yet
    acknowledged; ``spool_path`` is where they wait while the server is away.
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        run: Mapping[str, Any],
        *,
        max_body_bytes: int,
        heartbeat_s: float = 1.0,
        spool_dir: Path | None = None,
        flush_interval: float = FLUSH_INTERVAL_S,
        batch_points: int = BATCH_POINTS,
        raise_on_cancel: bool = False,
        timeout: float = 10.0,
    ) -> None:
        self.run = dict(run)
        self.id = int(run["id"])
        self.url = f"{base_url}/#/run/{self.id}"
        self.max_body_bytes = int(max_body_bytes)
        self.heartbeat_s = heartbeat_s
        self.flush_interval = flush_interval
        self.batch_points = batch_points
        self.raise_on_cancel = raise_on_cancel
        spool_dir = spool_dir if spool_dir is not None else get_settings().home / "spool"
        self.spool = Spool(Path(spool_dir) / f"run-{self.id}-{run.get('uid') or 'x'}.jsonl")
        self.spool_path = self.spool.path
        self.cancel_requested = False
        self.deleted = False
        self.status = str(run.get("status", "running"))
        self.acked = 0  # points the server acknowledged
        self.failures = 0  # failed uploads in a row (0 once one succeeds)
        self.last_error: str | None = None
        self.progress_fn: Callable[[], tuple[float, float | None] | None] | None = None
        self._device: str | None = None
        self._t0 = time.monotonic()
        self._epoch = 0.0
        self._records: list[Record] = []
        self._keys: set[str] = set()  # keys checked already
        self._points = 0  # points in _records
        self._inflight = 0  # points taken by the sender, not acknowledged yet
        self._spool_points = 0  # points in the spool past its offset
        self._stopping = False
        self._draining = False  # finish() waits: upload everything at once
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._finished = False
        self._batch_records = 2000  # adapted to the body limit as uploads go
        # Encodes the next batch while the current one is being stored.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"track-{self.id}")
        self._http = Transport(base_url, headers, timeout)
        self._thread = threading.Thread(target=self._loop, name=f"track-{self.id}", daemon=True)
        self._thread.start()

    # --- logging (the training thread) ---------------------------------------------------
    def log(
        self,
        step: int,
        *,
        epoch: float | None = None,
        wall_time: float | None = None,
        **metrics: float,
    ) -> None:
        """Record ``metrics`` (key=number) at iteration ``step``. ``epoch`` defaults to the
        last one given (0 at first), ``wall_time`` to the seconds since ``start_run``."""
        self.log_values(step, metrics, epoch=epoch, wall_time=wall_time)

    def log_values(
        self,
        step: int,
        values: Mapping[str, float],
        *,
        epoch: float | None = None,
        wall_time: float | None = None,
    ) -> None:
        """``log`` with the metrics as a mapping (keys need not be Python names)."""
        if self.raise_on_cancel and self.should_stop:
            raise RunCancelled(f"run {self.id} was cancelled from the dashboard")
        if self._finished:
            raise RuntimeError(f"run {self.id} is finished; start a new one to log more")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step: must be an integer >= 0, got {step!r}")
        if epoch is not None:
            self._epoch = _finite(epoch, "epoch")
        wall = time.monotonic() - self._t0 if wall_time is None else _finite(wall_time, "wall_time")
        clean: dict[str, float] = {}
        for key, value in values.items():
            if key not in self._keys:
                if not isinstance(key, str) or not KEY_RE.match(key):
                    raise ValueError(
                        f"{key!r}: metric keys are 1-64 characters of letters, digits and _.:/-"
                    )
                self._keys.add(key)
            try:
                clean[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key}: value must be a number, got {value!r}") from None
        if not clean:
            return
        with self._lock:
            self._records.append((step, self._epoch, wall, clean))
            self._points += len(clean)
            full = self._points >= self.batch_points
        if full:
            self._wake.set()

    def set_progress(self, progress: float, eta_s: float | None = None) -> None:
        """Fraction done (and seconds left), sent with the next heartbeat."""
        self.progress_fn = lambda: (progress, eta_s)

    def set_device(self, device: str) -> None:
        """What the run trains on, shown on the run page (sent with the next heartbeat)."""
        self._device = device

    @property
    def should_stop(self) -> bool:
        """The dashboard cancelled (or deleted) the run: stop and ``finish()``."""
        return self.cancel_requested or self.deleted

    @property
    def pending(self) -> int:
        """Points logged and not yet acknowledged by the server (memory and spool)."""
        with self._lock:
            return self._points + self._inflight + self._spool_points

    # --- finishing -------------------------------------------------------------------------
    def finish(
        self,
        status: str | None = None,
        summary: Mapping[str, Any] | None = None,
        *,
        error: str | None = None,
        diverged_step: int | None = None,
        timeout: float = FINISH_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Wait until every point is acknowledged, then record the final status (default:
        ``cancelled`` after a cancel, else ``succeeded``), ``summary`` and ``error``; the
        run as the server describes it. ``FinishTimeout`` (points kept in the spool file)
        when the server did not take them all within ``timeout`` s. Idempotent."""
        if self._finished:
            return self.run
        status = status or ("cancelled" if self.cancel_requested else "succeeded")
        deadline = time.monotonic() + timeout
        self._draining = True
        self._wake.set()  # upload now (a retry keeps its backoff)
        while self.pending and not self.deleted and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.pending and not self.deleted:
            self._stop_thread(spool_rest=True)
            left = self._spool_points
            raise FinishTimeout(
                f"run {self.id}: {left} points not acknowledged by the server after "
                f"{timeout:g} s (last error: {self.last_error}); kept in {self.spool_path}, "
                "and the run's final status was not recorded",
                left=left,
                spool=self.spool_path,
            )
        self._stop_thread(spool_rest=False)
        self._beat()  # the last device and progress (a short run may have had no beat)
        body: dict[str, Any] = {"status": status}
        if summary is not None:
            body["summary"] = _json_ready(summary)
        if error is not None:
            body["error"] = str(error)[:10_000]
        if diverged_step is not None:
            body["diverged_step"] = int(diverged_step)
        try:
            answer = self._call("POST", f"/api/external/runs/{self.id}/finish", body, deadline)
        finally:
            self._finished = True
            self._http.close()
        if answer is not None:
            self.run = answer["run"]
            self.status = self.run["status"]
        return self.run

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._finished:
            return
        if exc is None:
            self.finish()
            return
        cancelled = isinstance(exc, RunCancelled | KeyboardInterrupt)
        text = "".join(traceback.format_exception_only(exc_type, exc)).strip()
        try:
            self.finish("cancelled" if cancelled else "failed", error=text)
        except Exception:  # never hide the exception that ended the block
            log.warning("run %s: could not record its end", self.id, exc_info=True)

    # --- the background thread -------------------------------------------------------------
    def _loop(self) -> None:
        next_beat = time.monotonic()
        delay = self.flush_interval
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            if self._stopping:
                return
            try:
                if time.monotonic() >= next_beat:
                    self._beat()
                    next_beat = time.monotonic() + self.heartbeat_s
                ok = self._upload()
            except Exception as exc:  # a full disk under the spool, a bug: keep going
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("run %s: tracking failed: %s", self.id, exc, exc_info=True)
                ok = False
            if ok:
                self.failures, delay = 0, self.flush_interval
            else:
                self.failures += 1
                delay = min(MAX_BACKOFF_S, self.flush_interval * 2**self.failures)

    def _stop_thread(self, *, spool_rest: bool) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._encoder.shutdown()
        if spool_rest:
            with self._lock:
                records, self._records = self._records, []
                self._points = 0
            self._to_spool(records)

    def _to_spool(self, records: list[Record]) -> None:
        if records:
            self.spool.append(records)
            with self._lock:
                self._spool_points += sum(len(r[3]) for r in records)

    def _upload(self) -> bool:
        """Send what waits: the spool first (in order), then memory. False on a failure
        worth retrying (what was taken went to the spool)."""
        if self.spool.records:
            # Newer points queue behind the spooled ones, so the order is kept.
            with self._lock:
                records, self._records = self._records, []
                self._points = 0
            try:
                self._to_spool(records)
            except OSError:  # no disk: they stay in memory, behind the spooled ones
                with self._lock:
                    self._records[:0] = records
                    self._points += sum(len(r[3]) for r in records)
                raise
            while self.spool.records and not self._stopping:
                batch, end = self.spool.read(self._batch_records)
                points = sum(len(r[3]) for r in batch)
                parts = self._encode(batch)
                if self._post_all(parts) < len(parts):
                    return False  # the parts already sent go again: stored once all the same
                self.spool.advance(end, len(batch))
                with self._lock:
                    self._spool_points = max(0, self._spool_points - points)
            return True
        return self._upload_memory()

    def _take(self, at_least: int = 1) -> tuple[list[Record], int]:
        """The next batch of the memory queue, counted as in flight; none while fewer
        than ``at_least`` points wait."""
        with self._lock:
            if self._points < at_least:
                return [], 0
            batch = self._records[: self._batch_records]
            del self._records[: len(batch)]
            points = sum(len(r[3]) for r in batch)
            self._points -= points
            self._inflight += points
        return batch, points

    def _upload_memory(self) -> bool:
        """Upload the memory queue batch by batch, encoding the next batch (JSON, gzip)
        while the server stores the current one."""
        batch, points = self._take()
        if not batch:
            return True
        parts = self._encode(batch)
        while True:
            # Straight on only with a full batch (or when finishing): a trickle waits for
            # the next tick, so uploads stay few and large.
            at_least = 1 if self._draining else self.batch_points
            upcoming, upcoming_points = self._take(at_least) if not self._stopping else ([], 0)
            encoded = self._encoder.submit(self._encode, upcoming) if upcoming else None
            sent = self._post_all(parts)
            if sent < len(parts):
                # The server is away: the unsent parts and everything after them wait on
                # disk, in order.
                unsent = [r for part, _ in parts[sent:] for r in part]
                if encoded is not None:
                    encoded.result()  # done with before the records move on
                with self._lock:
                    rest, self._records = self._records, []
                    self._points = 0
                waiting = unsent + upcoming + rest
                try:
                    self._to_spool(waiting)
                except OSError:  # no disk either: they stay in memory, still counted
                    with self._lock:
                        self._records[:0] = waiting
                        self._points += sum(len(r[3]) for r in waiting)
                    raise
                finally:
                    with self._lock:
                        self._inflight -= points + upcoming_points
                return False
            with self._lock:
                self._inflight -= points
            if encoded is None:
                return True
            parts, points = encoded.result(), upcoming_points

    def _encode(self, batch: list[Record]) -> list[tuple[list[Record], bytes]]:
        """``batch`` as gzip-compressed JSON bodies, split until each fits the server's
        body limit (which holds for the decompressed bytes)."""
        if not batch:
            return []
        raw = json.dumps({"records": batch}, separators=(",", ":")).encode()
        if len(raw) > self.max_body_bytes * 0.9 and len(batch) > 1:
            half = len(batch) // 2
            self._batch_records = max(1, half)
            return self._encode(batch[:half]) + self._encode(batch[half:])
        if len(raw) < self.max_body_bytes * 0.3:
            self._batch_records = min(200_000, self._batch_records * 2)
        return [(batch, gzip.compress(raw, compresslevel=1))]

    def _post_all(self, parts: list[tuple[list[Record], bytes]]) -> int:
        """Post the parts in order; how many were acknowledged (or refused for good)
        before the first that should be retried."""
        for i, (records, body) in enumerate(parts):
            if not self._post(records, body):
                return i
        return len(parts)

    def _post(self, records: list[Record], body: bytes) -> bool:
        """One upload; True once acknowledged or refused for good (recorded in
        ``last_error``), False to retry later."""
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        try:
            r = self._http.request("POST", f"/api/external/runs/{self.id}/points", body, headers)
        except TransportError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return False
        if r.status_code == 200:
            self.acked += int(r.json().get("points", 0))
            return True
        self.last_error = f"HTTP {r.status_code}: {r.text[:300]}"
        if r.status_code in _RETRY_STATUS:
            return False
        if r.status_code == 413 and len(records) > 1:  # a server with a smaller limit
            half = len(records) // 2
            self._batch_records = max(1, half)
            self.max_body_bytes = max(1024, len(body))
            parts = self._encode(records[:half]) + self._encode(records[half:])
            return self._post_all(parts) == len(parts)
        if r.status_code == 404:
            self.deleted = True
        log.error(
            "run %s: the server refused %d records for good: %s", self.id, len(records), r.text
        )
        return True  # dropped: sending them again cannot succeed

    def _beat(self) -> None:
        body: dict[str, Any] = {}
        state = self.progress_fn() if self.progress_fn is not None else None
        if state is not None:
            progress, eta = state
            body["progress"] = min(1.0, max(0.0, float(progress)))
            if eta is not None and math.isfinite(eta) and eta >= 0:
                body["eta_s"] = float(eta)
        if self._device:
            body["device"] = self._device[:300]
        try:
            r = self._http.request("POST", f"/api/external/runs/{self.id}/heartbeat", body)
        except TransportError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return
        if r.status_code == 404:
            self.deleted = True
        elif r.status_code == 200:
            answer = r.json()
            self.status = answer["status"]
            if answer["cancel_requested"]:
                self.cancel_requested = True

    def _call(
        self, method: str, path: str, body: dict[str, Any], deadline: float
    ) -> dict[str, Any] | None:
        """One request, retried with backoff on transport errors and 5xx until
        ``deadline``; its JSON, or None when the run is gone (404)."""
        delay = self.flush_interval
        while True:
            try:
                r = self._http.request(method, path, body)
                if r.status_code == 404:
                    return None
                if r.status_code not in _RETRY_STATUS:
                    if r.is_error:
                        raise TrackingError(f"{path}: HTTP {r.status_code}: {r.text[:500]}")
                    return dict(r.json())
                self.last_error = f"HTTP {r.status_code}"
            except TransportError as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + delay > deadline:
                raise TrackingError(f"{path}: no answer from the server ({self.last_error})")
            time.sleep(delay)
            delay = min(MAX_BACKOFF_S, delay * 2)


class TransportError(OSError):
    """No answer: connection refused or lost, a timeout, a garbled response."""


@dataclass
class Response:
    status_code: int
    content: bytes

    @property
    def is_error(self) -> bool:
        return self.status_code >= 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class Transport:
    """One keep-alive HTTP/1.1 connection to the server, for the tracking thread.

    The standard library's ``http.client`` rather than httpx: a request costs about a
    third of httpx's CPU (measured 0.38 against 1.08 ms on the loaded 2-vCPU machine),
    taken in the training process several times a second. Not thread-safe: one thread
    at a time. No proxy support (the cluster's nodes reach the API directly).
    """

    def __init__(self, base_url: str, headers: Mapping[str, str], timeout: float) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"url: http(s)://host[:port] expected, got {base_url!r}")
        self.https = url.scheme == "https"
        self.host, self.port = url.hostname, url.port
        self.prefix = url.path.rstrip("/")
        self.headers = dict(headers)
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """One request (a dict body is sent as JSON); TransportError when no answer came.
        A kept-alive connection the server closed meanwhile is retried once afresh: the
        tracking endpoints are idempotent."""
        all_headers = {**self.headers, **(headers or {})}
        if isinstance(body, Mapping):
            body = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        for attempt in (0, 1):
            fresh = self._conn is None
            if fresh:
                cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                self._conn = cls(self.host, self.port, timeout=self.timeout)
            conn = self._conn
            try:
                conn.request(method, self.prefix + path, body=body, headers=all_headers)
                answer = conn.getresponse()
                content = answer.read()
                if answer.will_close:
                    self.close()
                return Response(answer.status, content)
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if fresh or attempt == 1:
                    raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _finite(value: Any, field: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{field}: must be finite, got {value!r}")
    return out


def _json_ready(value: Any) -> Any:
    """Summaries as JSON the server takes: non-finite numbers become null."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------


def start_run(
    client: Client,
    name: str,
    spec_or_params: Any = None,
    *,
    tags: list[str] | tuple[str, ...] = (),
    device: str | None = None,
    group_id: int | None = None,
    baseline_id: int | None = None,
    is_baseline: bool = False,
    spool_dir: str | os.PathLike[str] | None = None,
    raise_on_cancel: bool = False,
    register_timeout: float = REGISTER_TIMEOUT_S,
    flush_interval: float = FLUSH_INTERVAL_S,
) -> TrackedRun:
    """Register an external run on ``client``'s server and start tracking it.

    ``spec_or_params``: a RunSpec, a RunSpec's dict or YAML path (the run then compares
    and pairs like a queued one), or any dict of parameters. Registration is retried
    while the server does not answer, for up to ``register_timeout`` s, under one id, so
    a retry never makes two runs.
    """
    from batchlab.client import APIError, ServerUnavailable

    body: dict[str, Any] = {
        "uid": uuid.uuid4().hex,
        "name": name,
        "tags": list(tags),
        "host": socket.gethostname()[:200],
        "is_baseline": bool(is_baseline),
    }
    kind, value = _spec_or_params(spec_or_params)
    if value is not None:
        body[kind] = value
    for field, given in (("device", device), ("group_id", group_id), ("baseline_id", baseline_id)):
        if given is not None:
            body[field] = given
    deadline = time.monotonic() + register_timeout
    delay = 0.25
    while True:
        try:
            answer = client._request("POST", "/api/external/runs", json=body)
            break
        except APIError as exc:
            retry = isinstance(exc, ServerUnavailable) or exc.status_code in _RETRY_STATUS
            if not retry or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(MAX_BACKOFF_S, delay * 2)
    run = TrackedRun(
        client.url,
        client._headers,
        answer["run"],
        max_body_bytes=answer["max_body_bytes"],
        heartbeat_s=answer["heartbeat_s"],
        spool_dir=Path(spool_dir) if spool_dir is not None else None,
        raise_on_cancel=raise_on_cancel,
        flush_interval=flush_interval,
    )
    if device:
        run.set_device(device)
    return run


def _spec_or_params(value: Any) -> tuple[str, dict[str, Any] | None]:
    """("spec", a RunSpec's dict) when ``value`` is one (or its YAML path), else
    ("params", the dict as given)."""
    if value is None:
        return "params", None
    from pydantic import ValidationError

    from trainer.spec import RunSpec

    if isinstance(value, RunSpec):
        return "spec", value.model_dump(mode="json")
    if isinstance(value, str | os.PathLike):
        from trainer.specfile import read_spec

        value = read_spec(value)
        return "spec", RunSpec.model_validate(value).model_dump(mode="json")
    if not isinstance(value, Mapping):
        raise TypeError(f"spec_or_params: a RunSpec, a dict or a YAML path, not {type(value)}")
    try:
        return "spec", RunSpec.model_validate(dict(value)).model_dump(mode="json")
    except ValidationError:
        return "params", _json_ready(dict(value))


# ---------------------------------------------------------------------------------------


class TrackingSink:
    """The trainer's ``MetricSink`` over a ``TrackedRun``: points, device (from the
    trainer's meta), progress and ETA (epochs done / epochs, extrapolated wall time).
    ``close`` does not finish the run: the caller does, with ``fit``'s result."""

    def __init__(self, run: TrackedRun, epochs: float) -> None:
        self.run = run
        self.epochs = float(epochs)
        self._first: tuple[float, float] | None = None
        self._last: tuple[float, float] | None = None
        run.progress_fn = self._progress

    def start(self, meta: Mapping[str, Any]) -> None:
        try:
            from worker.sink import device_text  # the worker's wording of a device

            self.run.set_device(device_text(meta))
        except Exception:
            self.run.set_device(str(meta.get("device", "?")))

    def log(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        self.run.log_values(step, values, epoch=epoch, wall_time=wall_time)
        last = (epoch, wall_time)
        if self._first is None:
            self._first = last
        self._last = last

    def close(self) -> None:
        pass

    def should_stop(self) -> bool:
        return self.run.should_stop

    def _progress(self) -> tuple[float, float | None] | None:
        first, last = self._first, self._last
        if first is None or last is None:
            return None
        done = min(1.0, max(0.0, last[0] / self.epochs))
        advanced, spent = last[0] - first[0], last[1] - first[1]
        if advanced <= 0 or spent <= 0:
            return done, None
        return done, max(0.0, (self.epochs - last[0]) * spent / advanced)


# ---------------------------------------------------------------------------------------
# batchlab train SPEC --server URL (batchlab/cmd_train.py)


def start_tracking(args: Any, spec: Any, stop: Callable[[], bool]) -> tuple[TrackedRun, Any, Any]:
    """Register ``spec``'s run on ``args.server`` (empty: ``$BATCHLAB_URL``); the run, the
    trainer's sink over it, and the trainer's should_stop (Ctrl-C or a dashboard cancel).
    A server that refuses or never answers is a usage error (exit 2), before training."""
    from batchlab.client import APIError, Client
    from batchlab.cmd_train import UsageError
    from trainer.plan import default_name

    url = args.server or get_settings().url
    client = Client(url, token=args.token)
    try:
        run = client.start_run(args.name or default_name(spec), spec)
    except APIError as exc:
        raise UsageError(f"--server {url}: {exc}") from exc
    finally:
        client.close()
    print(f"tracking run {run.id} at {run.url}", file=sys.stderr)
    sink = TrackingSink(run, spec.epochs)
    return run, sink, lambda: stop() or run.should_stop


def finish_tracking(run: TrackedRun, record: Mapping[str, Any]) -> bool:
    """Record ``fit``'s result on the server once every point is in; False (and why on
    stderr) when that did not happen."""
    try:
        run.finish(
            str(record["status"]),
            summary=record.get("summary"),
            error=record.get("error"),
            diverged_step=record.get("diverged_step"),
        )
    except TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    print(f"run {run.id} {run.status}: {run.url}", file=sys.stderr)
    return True
