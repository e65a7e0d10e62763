"""Live updates of one run over Server-Sent Events.

``GET /api/runs/{id}/stream`` sends, in order:

- ``status`` (a Run) on connect, and again whenever status or progress changes;
- ``points`` ``{"points": [{"key", "step", "epoch", "wall_time", "value"}]}`` with the
  points stored since the previous event, polled every ``POLL_S`` and coalesced into one
  event per poll (catch-up after a reconnect is split into chunks);
- after a final status (succeeded, failed, diverged, cancelled) the last points, the
  final ``status``, and the stream ends. A deleted run ends it with ``gone``.

Every event's ``id`` is the cursor "key:step,key:step" of the last point sent per key,
so a browser's automatic reconnect (``Last-Event-ID``) resumes where it left off.
``?since=N`` starts after step N for every key (a page that loaded the history through
``/metrics`` first), ``?since=key:step,...`` from explicit cursors.

Latency from a trainer's ``log`` to the browser: the writer flushes every 250 ms, this
loop polls every 250 ms; bench/sse_latency.py measures it (docs/benchmarks/service.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from server.deps import Context, get_ctx
from server.encode import dumps, sanitize
from server.schemas import TERMINAL
from store import db
from store import metrics as store_metrics
from store import runs as store_runs

router = APIRouter(prefix="/api", tags=["runs"])

POLL_S = 0.25
# Points per key per database read: a reconnect to a long run catches up in chunks.
CATCHUP_LIMIT = 5000
PING_S = 15


def parse_cursor(text: str | None) -> tuple[dict[str, int], int]:
    """``"loss:12,lr:12"`` -> ({"loss": 12, "lr": 12}, -1); ``"40"`` -> ({}, 40).

    Returns per-key cursors and the floor applying to keys without one.
    Raises ValueError on anything else.
    """
    if text is None or not text.strip():
        return {}, -1
    text = text.strip()
    if ":" not in text:
        return {}, int(text)
    cursors: dict[str, int] = {}
    for part in text.split(","):
        key, _, step = part.rpartition(":")
        if not key:
            raise ValueError(f"bad cursor part {part!r}")
        cursors[key] = int(step)
    return cursors, -1


def format_cursor(cursors: dict[str, int]) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(cursors.items()))


class RunStream:
    """The state of one client's stream: cursors and the last status it was sent."""

    def __init__(self, ctx: Context, run_id: int, cursors: dict[str, int], floor: int) -> None:
        self.ctx = ctx
        self.run_id = run_id
        self.cursors = cursors
        self.floor = floor
        self.last_status: tuple[Any, ...] | None = None

    # --- blocking reads (run in the thread pool) ---------------------------------------
    def load_run(self) -> dict[str, Any] | None:
        with db.session(self.ctx.engine) as s:
            run = store_runs.get_run(s, self.run_id)
            return None if run is None else sanitize(store_runs.run_to_dict(run))

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
        if self.floor >= 0:  # a key that appeared after connect: apply the floor too
            points = [p for p in points if p["key"] in self.cursors or p["step"] > self.floor]
        per_key: dict[str, int] = {}
        for p in points:
            key = p["key"]
            per_key[key] = per_key.get(key, 0) + 1
            if p["step"] > self.cursors.get(key, -1):
                self.cursors[key] = p["step"]
        return points, any(n >= CATCHUP_LIMIT for n in per_key.values())

    # --- events ------------------------------------------------------------------------
    def status_event(self, run: dict[str, Any]) -> ServerSentEvent:
        self.last_status = (run["status"], run["progress"], run.get("attempts"))
        return ServerSentEvent(dumps(run), event="status", id=format_cursor(self.cursors))

    def changed(self, run: dict[str, Any]) -> bool:
        return (run["status"], run["progress"], run.get("attempts")) != self.last_status

    def points_event(self, points: list[dict[str, Any]]) -> ServerSentEvent:
        return ServerSentEvent(
            dumps({"points": points}), event="points", id=format_cursor(self.cursors)
        )

    async def events(self, first: dict[str, Any]) -> AsyncIterator[Any]:
        await run_in_threadpool(self.seed_floor)
        yield self.status_event(first)
        while True:
            # Status before points: once a final status is seen, every point the worker
            # flushed before finishing is already in the table and read just below.
            run = await run_in_threadpool(self.load_run)
            if run is None:
                yield ServerSentEvent(
                    dumps({"detail": f"run {self.run_id} was deleted"}), event="gone"
                )
                return
            final = run["status"] in TERMINAL
            more = True
            while more:
                points, more = await run_in_threadpool(self.read_points)
                if points:
                    yield self.points_event(points)
            if final or self.changed(run):
                yield self.status_event(run)
            if final:
                return
            # A client that goes away cancels this generator (sse-starlette watches).
            await asyncio.sleep(POLL_S)


@router.get(
    "/runs/{run_id}/stream",
    response_class=EventSourceResponse,
    summary="Server-Sent Events: status and new points of a run until it finishes",
    response_description="text/event-stream of `status`, `points` and `gone` events",
)
async def stream_run(
    run_id: int,
    request: Request,
    since: str | None = Query(
        None, description='Resume after step N ("120") or per key ("loss:120,val_err:119").'
    ),
    ctx: Context = Depends(get_ctx),
) -> EventSourceResponse:
    # A browser reconnect carries Last-Event-ID; it wins over the page's original ?since.
    cursor_text = request.headers.get("last-event-id") or since
    try:
        cursors, floor = parse_cursor(cursor_text)
    except ValueError as err:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"type": "value_error", "loc": ["query", "since"], "msg": str(err)}],
        ) from err
    stream = RunStream(ctx, run_id, cursors, floor)
    first = await run_in_threadpool(stream.load_run)
    if first is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id} not found")
    return EventSourceResponse(
        stream.events(first),
        ping=PING_S,
        # Proxies (nginx) must not buffer the stream.
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
