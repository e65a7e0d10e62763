"""``GET /api/runs/{id}/log``: a run's output (store.logs), the tail or what follows a line.

The run page polls it (``?after=`` the last ``seq`` it has, about once a second while the
run is live) rather than taking log lines over the run's SSE stream: lines arrive in
bursts unrelated to metric points, and a poll that returns nothing costs one indexed read.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel

from server.auth import TokenFirstRoute
from server.deps import CtxDep, RunIdPath
from store import db
from store import runs as store_runs
from store.logs import LOG_MAX_LINES, read_log

router = APIRouter(prefix="/api", tags=["runs"], route_class=TokenFirstRoute)

DEFAULT_TAIL = 1000


class LogLineOut(BaseModel):
    seq: int
    t: str
    stream: str
    text: str


class LogOut(BaseModel):
    lines: list[LogLineOut]
    # The seq to pass as ``after`` next time (the last line's, or the one given).
    next: int


@router.get("/runs/{run_id}/log", response_model=LogOut, summary="A run's log lines")
def get_log(
    run_id: RunIdPath,
    ctx: CtxDep,
    tail: Annotated[int, Query(ge=1, le=LOG_MAX_LINES)] = DEFAULT_TAIL,
    after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
) -> Any:
    """At most ``tail`` lines, the newest; with ``after``, only lines past that seq."""
    with db.session(ctx.engine) as s:
        if store_runs.get_run(s, run_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id} not found")
        lines = read_log(s, run_id, tail=tail, after=after)
    last = lines[-1]["seq"] if lines else (after or 0)
    return {"lines": lines, "next": last}
