"""Bearer-token protection of writes.

With ``BATCHLAB_TOKEN`` set, every request that changes something (POST, DELETE) must
carry ``Authorization: Bearer <token>``; reads stay open so a shared dashboard can be
watched without it. ``POST /api/schedule`` computes a preview and stores nothing, so it
is treated as a read. Without a token the service is open, as on a laptop.
"""

from __future__ import annotations

import secrets

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.deps import Context, get_ctx

# auto_error=False: we answer 401 ourselves, also when the header is missing (HTTPBearer
# would say 403), and only when a token is configured at all.
_bearer = HTTPBearer(auto_error=False, description="Needed for writes when BATCHLAB_TOKEN is set.")


def require_token(
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
    ctx: Context = Depends(get_ctx),
) -> None:
    """Dependency of every write route: passes when no token is configured or it matches."""
    expected = ctx.settings.token
    if expected is None:
        return
    if credentials is None:
        raise _unauthorized("this server needs 'Authorization: Bearer <token>' for changes")
    # compare_digest: the time taken does not reveal how much of the token matched.
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise _unauthorized("invalid token")


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": 'Bearer realm="batchlab"'},
    )
