"""The answers pollers ask for over and over, computed once per ``TTL_S`` and shared.

Dashboards poll ``GET /api/runs`` and ``GET /api/runs/{id}``; 50 of them asked 50 times a
second for the same few answers, each a database read and the serialization of every run
(~2.6 ms of the API's ~3.7 ms of CPU per request, taken from the training on a small
machine: issue 10, point 11). ``PollCache`` keeps each successful answer of those paths,
by path and query, for ``TTL_S``, and serves it while a path is asked more than
``SHARE_AFTER`` times within ``TTL_S`` (a crowd of pollers; one client's occasional reads
always read afresh). A shared answer is at most ``TTL_S`` old when a worker changes a
run, and never older than a write made through this API: a request that is not a read
starts a new generation when it arrives and again when its answer starts (the write is
committed by then, server.deps), so no answer computed while it ran is served after it.

It sits inside the Host / origin / body-size guards (server.middleware) and serves only
paths whose reads need no token.
"""

from __future__ import annotations

import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Pollers wait 2 s between polls (frontend/js/runs.js): half a second of staleness is
# not seen, and 25 pollers of one answer cost 2 reads a second instead of 25.
TTL_S = 0.5
# Answers are shared only under load: once a path and query was asked this many times
# within TTL_S. A client polling now and then (a script, a test) always reads afresh.
SHARE_AFTER = 4
MAX_ENTRIES = 256
CACHED_PATHS = re.compile(r"^/api/runs(/[0-9]+)?$")
_READS = frozenset({"GET", "HEAD", "OPTIONS"})


class PollCache:
    """ASGI middleware: GET answers of ``CACHED_PATHS`` shared for ``ttl_s``."""

    def __init__(self, app: ASGIApp, ttl_s: float = TTL_S) -> None:
        self.app = app
        self.ttl_s = ttl_s
        # (path, query) -> (time, generation, start message, body)
        self.entries: dict[tuple[str, bytes], tuple[float, int, Message, bytes]] = {}
        self.demand: dict[tuple[str, bytes], tuple[float, int]] = {}  # (window start, asks)
        self.generation = 0

    def invalidate(self) -> None:
        self.generation += 1
        self.entries.clear()

    def _busy(self, key: tuple[str, bytes], now: float) -> bool:
        """Count this ask; True when its key was asked more than SHARE_AFTER times in the
        current window of TTL_S."""
        start, asks = self.demand.get(key, (now, 0))
        if now - start >= self.ttl_s:
            start, asks = now, 0
        if len(self.demand) >= MAX_ENTRIES and key not in self.demand:
            self.demand.clear()
        self.demand[key] = (start, asks + 1)
        return asks >= SHARE_AFTER

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        elif scope["method"] not in _READS:
            await self._write(scope, receive, send)
        elif scope["method"] == "GET" and CACHED_PATHS.match(scope["path"]):
            await self._read(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _write(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.invalidate()

        async def send_voiding(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.invalidate()
            await send(message)

        await self.app(scope, receive, send_voiding)

    async def _read(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = (scope["path"], scope.get("query_string", b""))
        now = time.monotonic()
        hit = self.entries.get(key) if self._busy(key, now) else None
        if hit is not None and hit[1] == self.generation and now - hit[0] < self.ttl_s:
            # Copies: the gzip layer outside rewrites the headers of what it is given.
            await send({**hit[2], "headers": list(hit[2]["headers"])})
            await send({"type": "http.response.body", "body": hit[3]})
            return
        generation = self.generation
        start: Message | None = None
        body: list[bytes] = []

        async def send_keeping(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = {**message, "headers": list(message["headers"])}
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, send_keeping)
        # Kept under the generation it started in: a write meanwhile voids it.
        if start is not None and start["status"] == 200 and generation == self.generation:
            if len(self.entries) >= MAX_ENTRIES:
                self.entries.clear()
            self.entries[key] = (now, generation, start, b"".join(body))
