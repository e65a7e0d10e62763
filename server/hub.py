"""One database read per run, fanned out to every live stream of it.

Each stream of a run used to poll the database itself (~8 reads/s per client): 50 browser
tabs on one run were 50x the reads and starved the worker's training (issue 10, point 11).
A ``RunHub`` polls once per ``poll_s`` for all the run's subscribers: it reads the run's
status, then the points after its own head cursors, and puts each result on every
subscriber's queue. A subscriber catches up by itself before it joins (and once more just
after, for the points committed while it joined), then only reads its queue, so the
database cost of a run's readers does not grow with their number.

The hub starts its poller with its first subscriber and stops it when the last one leaves,
or after a final status, a deleted run or a read error (each passed on to the subscribers).
A subscriber whose queue fills up (a client that stopped reading) gets ``resync``: it
leaves, catches up from its own cursors and joins again; memory per stream stays bounded.

``HubRegistry`` holds an app's hubs and counts its open streams (``max_streams``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from starlette.concurrency import run_in_threadpool

from core.status import FINAL_STATUSES

# Reads per second of one hub: the writer flushes every 250 ms, so a faster poll finds
# nothing new most of the time.
POLL_S = 0.25
# Messages a subscriber may have waiting (about 16 s of polls) before it must resync.
QUEUE_MAX = 64
# Streams' own catch-up reads running at once: 50 clients connecting together to a long
# run must not take every thread of the pool (the REST routes run there too) nor every
# database connection.
CATCHUP_CONCURRENCY = 4

# (kind, data): ("points", Points), ("status", Status), ("gone", None), ("error", exception),
# ("resync", None)
Message = tuple[str, Any]


@dataclass
class Points:
    """One read's points, the same object on every subscriber's queue: a subscriber that
    sends all of them reuses the JSON and the event id the first one encoded.

    ``start`` and ``end`` are the hub reader's cursors before and after the read: a
    subscriber whose cursors equal ``start`` takes every point without looking at each
    (the usual case; 50 streams of a fast run were 50 loops over every point per poll).
    """

    items: list[dict[str, Any]]
    encoded: str | None = None
    start: dict[str, int] | None = None
    end: dict[str, int] | None = None
    event_id: str | None = None


@dataclass
class Status:
    """One poll's run, shared like ``Points``: encoded once for every subscriber."""

    run: dict[str, Any]
    encoded: str | None = None


class Reader(Protocol):
    """The blocking reads of one run (``server.sse.RunStream``), run in the thread pool."""

    def load_run(self) -> dict[str, Any] | None: ...

    def read_points(self) -> tuple[list[dict[str, Any]], bool]: ...


def _cursors(reader: Reader) -> dict[str, int] | None:
    """The reader's cursors (``RunStream.cursors``), if it keeps them."""
    cursors = getattr(reader, "cursors", None)
    return dict(cursors) if cursors is not None else None


class Subscription:
    """One stream's mailbox."""

    def __init__(self, maxsize: int = QUEUE_MAX) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=maxsize)
        self.resync = False  # set by the stream when it read ``resync``

    def offer(self, message: Message) -> bool:
        """Queue ``message``; on a full queue, replace its contents with ``resync``."""
        try:
            self.queue.put_nowait(message)
            return True
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(("resync", None))
            return False


class RunHub:
    """The poller of one run and its subscribers."""

    def __init__(
        self, run_id: int, reader: Reader, poll_s: float, on_end: Callable[[RunHub], None]
    ) -> None:
        self.run_id = run_id
        self.reader = reader
        self.poll_s = poll_s
        self.subscribers: set[Subscription] = set()
        self.polls = 0
        self._on_end = on_end
        self._task: asyncio.Task[None] | None = None

    def add(self, sub: Subscription) -> None:
        self.subscribers.add(sub)
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name=f"batchlab-hub-{self.run_id}")

    def discard(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)
        if not self.subscribers:
            self.stop()

    def stop(self) -> None:
        self._on_end(self)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def _broadcast(self, message: Message) -> None:
        for sub in list(self.subscribers):
            if not sub.offer(message):
                self.subscribers.discard(sub)  # it rejoins after its own catch-up

    def _finish(self, message: Message) -> None:
        # Leave the registry in the same step (no await): a stream joining later starts a
        # new hub instead of waiting on this one.
        self._broadcast(message)
        self.subscribers.clear()
        self.stop()

    async def _poll(self) -> None:
        try:
            while True:
                self.polls += 1
                # Status before points: once a final status is seen, every point the worker
                # flushed before finishing is already in the table and read just below.
                run = await run_in_threadpool(self.reader.load_run)
                if run is None:
                    self._finish(("gone", None))
                    return
                more = True
                while more:
                    start = _cursors(self.reader)
                    points, more = await run_in_threadpool(self.reader.read_points)
                    if points:
                        end = _cursors(self.reader)
                        self._broadcast(("points", Points(points, start=start, end=end)))
                if run["status"] in FINAL_STATUSES:
                    self._finish(("status", Status(run)))
                    return
                self._broadcast(("status", Status(run)))
                await asyncio.sleep(self.poll_s)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # each subscriber's stream reports it (server.sse)
            self._finish(("error", err))


class HubRegistry:
    """An app's run hubs and its count of open streams."""

    def __init__(self, max_streams: int, poll_s: float = POLL_S) -> None:
        self.max_streams = max_streams  # 0: no bound
        self.poll_s = poll_s
        self.hubs: dict[int, RunHub] = {}
        self.streams = 0
        self._catchup: anyio.CapacityLimiter | None = None

    @property
    def catchup_limiter(self) -> anyio.CapacityLimiter:
        """Bounds the streams' own reads (created in the event loop, on first use)."""
        if self._catchup is None:
            self._catchup = anyio.CapacityLimiter(CATCHUP_CONCURRENCY)
        return self._catchup

    def try_acquire(self) -> bool:
        """Take a stream slot; False when ``max_streams`` are open."""
        if self.max_streams and self.streams >= self.max_streams:
            return False
        self.streams += 1
        return True

    def release(self) -> None:
        self.streams -= 1

    def subscribe(self, run_id: int, make_reader: Callable[[], Reader]) -> Subscription:
        """Join the run's hub (started, with a reader from ``make_reader``, if none runs)."""
        hub = self.hubs.get(run_id)
        if hub is None:
            hub = self.hubs[run_id] = RunHub(run_id, make_reader(), self.poll_s, self._ended)
        sub = Subscription()
        hub.add(sub)
        return sub

    def unsubscribe(self, run_id: int, sub: Subscription) -> None:
        hub = self.hubs.get(run_id)
        if hub is not None:
            hub.discard(sub)

    def _ended(self, hub: RunHub) -> None:
        if self.hubs.get(hub.run_id) is hub:
            del self.hubs[hub.run_id]

    async def close(self) -> None:
        """Stop every poller (the app is shutting down)."""
        tasks = [hub._task for hub in self.hubs.values() if hub._task is not None]
        for hub in list(self.hubs.values()):
            hub.stop()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
