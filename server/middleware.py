"""ASGI guards that run before any route: the Host header, cross-site writes, body size.

They are pure ASGI (no ``BaseHTTPMiddleware``) so that an SSE stream passes through
unbuffered and a refused request costs no more than reading its headers:

- ``HostGuard``: a Host header not in ``Settings.allowed_hosts`` answers 400, so a page
  whose DNS name was rebound to 127.0.0.1 cannot talk to a local server.
- ``CrossSiteGuard``: a write (any method but GET, HEAD, OPTIONS) sent by a browser from
  another origin answers 403. Browsers mark such requests with ``Origin`` (and
  ``Sec-Fetch-Site``); the CLI and the notebook client send neither and pass.
- ``BodyLimit``: a body larger than ``Settings.max_body_bytes`` answers 413, whether it
  announces its length (refused before reading) or streams in chunks (refused at the
  first byte past the limit; the route sees a disconnect and its answer is dropped).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def send_json(send: Send, status: int, detail: str) -> None:
    """A complete JSON answer ``{"detail": ...}`` (the shape of FastAPI's errors)."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(netloc: str) -> str:
    """``"LocalHost:8000"`` -> ``"localhost"``, ``"[::1]:8000"`` -> ``"::1"``."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    return netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc


class HostGuard:
    """400 for a Host header outside ``hosts`` ("*" in ``hosts`` allows every host)."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)
        self.any = "*" in self.hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.any:
            host = host_name(header(scope, b"host") or "")
            if host not in self.hosts:
                await send_json(
                    send, 400, f"unknown Host {host!r}: add it to BATCHLAB_ALLOWED_HOSTS"
                )
                return
        await self.app(scope, receive, send)


class CrossSiteGuard:
    """403 for a browser's write from a page of another origin (scheme, host and port)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            reason = self.refusal(scope)
            if reason:
                await send_json(send, 403, reason)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def refusal(scope: Scope) -> str | None:
        origin = header(scope, b"origin")
        if origin is not None:
            # "null": a sandboxed frame or a file:// page, never this server's own page.
            parts = urlsplit(origin) if origin != "null" else None
            own = (header(scope, b"host") or "").lower()
            if parts is None or parts.netloc.lower() != own:
                return f"cross-origin write refused (Origin {origin!r}, Host {own!r})"
            return None
        # Without Origin: browsers that send Sec-Fetch-Site say where the request came from.
        site = header(scope, b"sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"cross-site write refused (Sec-Fetch-Site {site!r})"
        return None


class BodyLimit:
    """413 for request bodies larger than ``limit`` bytes, counted as they arrive."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        detail = f"request body larger than {self.limit} bytes (BATCHLAB_MAX_BODY_BYTES)"
        length = header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await send_json(send, 413, detail)
            return

        received = 0
        refused = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await send_json(send, 413, detail)
                    # The route sees a client that went away; whatever it answers is dropped.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # the route's reaction to the cut body (ClientDisconnect and the like)


def install(app: Any, *, hosts: Iterable[str], max_body_bytes: int) -> None:
    """Add the guards to a Starlette/FastAPI app; the Host check runs first."""
    # add_middleware puts each new one outside the previous ones.
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(CrossSiteGuard)
    app.add_middleware(HostGuard, hosts=hosts)
