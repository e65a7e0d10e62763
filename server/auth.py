"""Bearer-token protection of writes.

With ``BATCHLAB_TOKEN`` set, every request that changes something (POST, DELETE) must
carry ``Authorization: Bearer <token>``; reads stay open so a shared dashboard can be
watched without it. ``POST /api/schedule`` computes a preview and stores nothing, so it
is treated as a read. Without a token the service is open, as on a laptop.

FastAPI reads and parses a body before it resolves dependencies, so routers whose
writes take a body use ``TokenFirstRoute``: the token is checked before the body is read,
and an anonymous request costs no parsing. ``require_token`` stays on each write route
as well, which is what puts the Bearer scheme and the 401 into the OpenAPI document.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.deps import CtxDep

# Every 401 says how each client passes the token.
TOKEN_HINT = (
    "pass the server's BATCHLAB_TOKEN as 'Authorization: Bearer <token>': "
    "`batchlab submit|cancel --token TOKEN` or BATCHLAB_TOKEN in the environment, "
    "`Client(token=...)` in a notebook, the token dialog in the dashboard"
)

# auto_error=False: we answer 401 ourselves, also when the header is missing (HTTPBearer
# would say 403), and only when a token is configured at all.
_bearer = HTTPBearer(auto_error=False, description="Needed for writes when BATCHLAB_TOKEN is set.")


def require_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)], ctx: CtxDep
) -> None:
    """Dependency of every write route: passes when no token is configured or it matches."""
    check_token(ctx.settings.token, credentials.credentials if credentials else None)


def check_token(expected: str | None, given: str | None) -> None:
    """Raise 401 unless no token is expected or ``given`` is it."""
    if expected is None:
        return
    if given is None:
        raise _unauthorized(f"this server needs a token for changes: {TOKEN_HINT}")
    # compare_digest: the time taken does not reveal how much of the token matched.
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise _unauthorized(f"invalid token: {TOKEN_HINT}")


def _bearer_of(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class TokenFirstRoute(APIRoute):
    """A route that, when it depends on ``require_token``, checks the token before
    FastAPI reads the body (routers pass it as ``route_class``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not any(d.dependency is require_token for d in self.dependencies):
            return handler

        async def token_first(request: Request) -> Response:
            check_token(request.app.state.ctx.settings.token, _bearer_of(request))
            return await handler(request)

        return token_first


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": 'Bearer realm="batchlab"'},
    )
