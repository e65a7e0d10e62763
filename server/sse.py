"""Live updates of one run over Server-Sent Events.

``GET /api/runs/{id}/stream`` sends, in order:

- ``status`` (a Run) on connect, at once when its status (or attempt, device, waiting
  reason) changes, and at most once a second when only its progress moves;
- ``points`` ``{"points": [{"key", "step", "epoch", "wall_time", "value"}]}`` with the
  points stored since the previous event, polled every ``POLL_S`` and coalesced into one
  event per poll (catch-up after a reconnect is split into chunks);
- after a final status (succeeded, failed, diverged, cancelled) the last points, the
  final ``status``, and the stream ends. A deleted run ends it with ``gone``;
- a database that stops answering ends it with ``error`` ``{"detail": ...}`` (the
  browser's EventSource reconnects by itself and resumes from the last id).

Every event's ``id`` is the cursor "key:step,key:step" of the last point sent per key,
so a browser's automatic reconnect (``Last-Event-ID``) resumes where it left off.
``?since=N`` starts after step N for every key (a page that loaded the history through
``/metrics`` first), ``?since=key:step,...`` from explicit cursors.

One read serves every stream of a run: the run's ``server.hub.RunHub`` polls every 250 ms
and fans the result out; a stream reads the database itself only to catch up when it
joins. At most ``BATCHLAB_MAX_STREAMS`` streams are open at once (past it: 503 with
``Retry-After``). Latency from a trainer's ``log`` to the browser: the writer flushes every
250 ms, the hub polls every 250 ms; bench/sse_latency.py and bench/sse_load.py measure it
(docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import sqlalchemy.exc
from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from core.status import FINAL_STATUSES
from server.deps import Context, CtxDep, RunIdPath
from server.encode import dumps
from server.hub import HubRegistry, Points, Subscription
from server.schemas import runs_out
from store import db
from store import metrics as store_metrics
from store import runs as store_runs

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api", tags=["runs"])

# Points per key per database read: a reconnect to a long run catches up in chunks.
CATCHUP_LIMIT = 5000
PING_S = 15
# A status event for progress alone at most this often (status changes go at once): the
# hub polls 4 times a second, and each event costs the API per stream (issue 10).
PROGRESS_EVERY_S = 1.0
# What a client refused for too many streams is told to wait, in seconds.
RETRY_AFTER_S = 10
# Cursor steps are BIGINT in the store: larger ones would overflow the query (a 500).
MAX_STEP = 2**63 - 1
_CURSOR_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


def parse_cursor(text: str | None) -> tuple[dict[str, int], int]:
    """``"loss:12,lr:12"`` -> ({"loss": 12, "lr": 12}, -1); ``"40"`` -> ({}, 40).

    Returns per-key cursors and the floor applying to keys without one.
    Raises ValueError on anything else.
    """
    if text is None or not text.strip():
        return {}, -1
    text = text.strip()
    if ":" not in text:
        return {}, _step(text)
    cursors: dict[str, int] = {}
    for part in text.split(","):
        key, _, step = part.rpartition(":")
        if not _CURSOR_KEY.match(key):
            raise ValueError(f"bad cursor part {part!r}")
        cursors[key] = _step(step)
    return cursors, -1


def _step(text: str) -> int:
    step = int(text)
    if not -1 <= step <= MAX_STEP:
        raise ValueError(f"cursor step {step} is outside -1..{MAX_STEP}")
    return step


def format_cursor(cursors: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(cursors.items()))


def _status_key(run: dict[str, Any]) -> tuple[Any, ...]:
    """What a new status event is sent for (a worker starting or going away changes
    ``waiting_for``; ``device`` is recorded just after the claim; a node's state)."""
    keys = ("status", "progress", "attempts", "waiting_for", "device")
    # A multi-node run's nodes joining, failing or exiting change its Nodes table.
    nodes = tuple((n["slot"], n["worker"], n["state"]) for n in run.get("gang") or ())
    return (*(run.get(k) for k in keys), nodes)


class RunStream:
    """The state of one client's stream: cursors and the last status it was sent.

    Also the reader of a run's hub (``server.hub.Reader``): the hub's own ``RunStream``
    holds the cursors of the newest points it has read.
    """

    def __init__(
        self,
        ctx: Context,
        run_id: int,
        cursors: dict[str, int],
        floor: int,
        hubs: HubRegistry | None = None,
    ) -> None:
        self.ctx = ctx
        self.run_id = run_id
        self.cursors = cursors
        self.floor = floor
        self.hubs = hubs
        self.last_status: tuple[Any, ...] | None = None
        self.last_status_at = -math.inf

    # --- blocking reads (run in the thread pool) ---------------------------------------
    def load_run(self) -> dict[str, Any] | None:
        with db.session(self.ctx.engine) as s:
            run = store_runs.get_run(s, self.run_id)
            return None if run is None else runs_out(s, [run])[0].model_dump(mode="json")

    def seed_floor(self) -> None:
        """Turn ``?since=N`` into cursors for the keys the run has now."""
        if self.floor >= 0:
            for key in store_metrics.keys(self.ctx.engine, self.run_id):
                self.cursors.setdefault(key, self.floor)

    def read_points(self) -> tuple[list[dict[str, Any]], bool]:
        """New points and whether a key hit the chunk limit (more are waiting)."""
        points = store_metrics.read_since(
            self.ctx.engine, self.run_id, self.cursors, limit_per_key=CATCHUP_LIMIT
        )
        per_key: dict[str, int] = {}
        for p in points:
            per_key[p["key"]] = per_key.get(p["key"], 0) + 1
        return self.accept(points), any(n >= CATCHUP_LIMIT for n in per_key.values())

    def accept(self, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The points this stream has not sent yet (a hub's read may overlap its own
        catch-up), cursors advanced past them."""
        fresh = []
        for p in points:
            key = p["key"]
            if key not in self.cursors and p["step"] <= self.floor:
                continue  # a key that appeared after connect: the floor applies too
            if p["step"] > self.cursors.get(key, -1):
                fresh.append(p)
        for p in fresh:  # (step, key) order: the last point of a key has its largest step
            self.cursors[p["key"]] = p["step"]
        return fresh

    # --- events ------------------------------------------------------------------------
    def status_event(self, run: dict[str, Any], encoded: str | None = None) -> ServerSentEvent:
        self.last_status = _status_key(run)
        self.last_status_at = time.monotonic()
        data = encoded if encoded is not None else dumps(run)
        return ServerSentEvent(data, event="status", id=format_cursor(self.cursors))

    def due(self, run: dict[str, Any]) -> bool:
        """A status event is due: status, attempt, device, waiting reason or a node changed (at
        once), or progress moved and the last one is ``PROGRESS_EVERY_S`` old."""
        key, last = _status_key(run), self.last_status
        if key == last:
            return False
        moved_only = last is not None and key[0] == last[0] and key[2:] == last[2:]
        return not moved_only or time.monotonic() - self.last_status_at >= PROGRESS_EVERY_S

    def takes_all(self, points: Points) -> bool:
        """Whether every point of the hub's read is new to this stream: its cursors are the
        read's start and the read brought no key it has not seen (the floor may apply)."""
        return (
            points.start is not None
            and points.end is not None
            and self.cursors == points.start
            and points.end.keys() == points.start.keys()
        )

    def points_event(
        self, points: list[dict[str, Any]], encoded: str | None = None
    ) -> ServerSentEvent:
        data = encoded if encoded is not None else dumps({"points": points})
        return ServerSentEvent(data, event="points", id=format_cursor(self.cursors))

    def gone_event(self) -> ServerSentEvent:
        return ServerSentEvent(dumps({"detail": f"run {self.run_id} was deleted"}), event="gone")

    async def events(self, first: dict[str, Any]) -> AsyncIterator[Any]:
        try:
            async for event in self._events(first):
                yield event
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError) as err:
            # End the response cleanly (a truncated chunked body is a client-side error).
            log.warning("stream of run %s ended: database error: %s", self.run_id, err)
            detail = f"database unavailable: {type(err.orig).__name__}"
            yield ServerSentEvent(dumps({"detail": detail}), event="error")

    async def catch_up(self) -> AsyncIterator[ServerSentEvent]:
        """This stream's own reads: every point after its cursors, in chunks, read and
        encoded in a worker thread (a chunk can be 5000 points per key)."""
        limiter = self.hubs.catchup_limiter if self.hubs is not None else None
        more = True
        while more:
            event, more = await anyio.to_thread.run_sync(self.read_event, limiter=limiter)
            if event is not None:
                yield event

    def read_event(self) -> tuple[ServerSentEvent | None, bool]:
        points, more = self.read_points()
        return (self.points_event(points) if points else None), more

    async def _events(self, first: dict[str, Any]) -> AsyncIterator[Any]:
        await run_in_threadpool(self.seed_floor)
        yield self.status_event(first)
        if first["status"] in FINAL_STATUSES or self.hubs is None:
            # Finished: every point is stored already; one catch-up and the final status.
            async for event in self.catch_up():
                yield event
            yield self.status_event(first)
            return
        while True:  # once, and again after a resync
            # Catch up before joining, so a long catch-up does not fill the queue.
            async for event in self.catch_up():
                yield event
            sub = self.hubs.subscribe(self.run_id, self.hub_reader)
            try:
                # Points committed while joining (the hub's next read may start past them).
                async for event in self.catch_up():
                    yield event
                async for event in self.follow(sub):
                    yield event
                if sub.resync:
                    continue
                return
            finally:
                # Also when the client goes away (sse-starlette cancels this generator).
                self.hubs.unsubscribe(self.run_id, sub)

    def hub_reader(self) -> RunStream:
        return RunStream(self.ctx, self.run_id, dict(self.cursors), -1)

    async def follow(self, sub: Subscription) -> AsyncIterator[ServerSentEvent]:
        """Events from the hub's messages until the stream ends (or must resync)."""
        while True:
            kind, data = await sub.queue.get()
            if kind == "points":
                if self.takes_all(data):  # the usual case: one encoding for every stream
                    self.cursors = dict(data.end)
                    if data.encoded is None:
                        data.encoded = dumps({"points": data.items})
                        data.event_id = format_cursor(self.cursors)
                    yield ServerSentEvent(data.encoded, event="points", id=data.event_id)
                    continue
                points = self.accept(data.items)
                if points:
                    yield self.points_event(points)
            elif kind == "status":
                run = data.run
                final = run["status"] in FINAL_STATUSES
                if final or self.due(run):
                    if data.encoded is None:
                        data.encoded = dumps(run)
                    yield self.status_event(run, encoded=data.encoded)
                if final:
                    return
            elif kind == "gone":
                yield self.gone_event()
                return
            elif kind == "error":
                raise data
            else:  # resync: this stream fell behind and left the hub
                sub.resync = True
                return


class _SlotResponse(EventSourceResponse):
    """Gives its stream slot back however the response ends (also when the client leaves
    before the first event, where the events generator never starts)."""

    def __init__(self, *args: Any, hubs: HubRegistry, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hubs = hubs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._hubs.release()


@router.get(
    "/runs/{run_id}/stream",
    response_class=EventSourceResponse,
    summary="Server-Sent Events: status and new points of a run until it finishes",
    response_description="text/event-stream of `status`, `points`, `gone` and `error` events",
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
        404: {"description": "No run with this id."},
        503: {"description": "Too many open streams (`BATCHLAB_MAX_STREAMS`); see Retry-After."},
    },
)
async def stream_run(
    ctx: CtxDep,
    run_id: RunIdPath,
    request: Request,
    since: str | None = Query(
        None, description='Resume after step N ("120") or per key ("loss:120,val_err:119").'
    ),
) -> EventSourceResponse:
    # A browser reconnect carries Last-Event-ID; it wins over the page's original ?since.
    cursor_text = request.headers.get("last-event-id") or since
    try:
        cursors, floor = parse_cursor(cursor_text)
    except ValueError as err:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "since"), "msg": str(err), "input": since}]
        ) from err
    hubs: HubRegistry = request.app.state.hubs
    stream = RunStream(ctx, run_id, cursors, floor, hubs)
    first = await run_in_threadpool(stream.load_run)
    if first is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id} not found")
    if not hubs.try_acquire():
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"too many open streams (at most {hubs.max_streams}, BATCHLAB_MAX_STREAMS)",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return _SlotResponse(
        stream.events(first),
        hubs=hubs,
        ping=PING_S,
        # Proxies (nginx) must not buffer the stream.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
