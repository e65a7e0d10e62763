"""The FastAPI dependencies that hand the service's shared state to routes.

Everything a route needs (the engine, the token, the enqueue function) lives on
``app.state.ctx`` so that several apps with different databases can coexist in one
process (the tests do that), instead of being module globals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from celery import Celery
from fastapi import Depends, Path, Query, Request
from sqlalchemy import Engine
from starlette.convertors import StringConvertor, register_url_convertor

from core.settings import Settings
from trainer.spec import RunSpec


@dataclass
class Context:
    """What the routes of one app share."""

    settings: Settings
    engine: Engine
    celery: Celery
    # Set once migrations have run; the lifespan retries every 10 s until the database
    # answers (meanwhile database errors answer 503, and /api/health says why).
    migrated: bool = False

    def enqueue(self, run_id: int, spec: RunSpec) -> str:
        """Send the run's Celery message; raises when the broker cannot take it."""
        from worker.celery_app import enqueue

        return enqueue(run_id, spec, celery_app=self.celery, engine=self.engine)


def get_ctx(request: Request) -> Context:
    """The app's shared context. Routes open their own ``store.db.session`` so that a
    write is committed before its answer is sent (a yield dependency would commit after)."""
    return request.app.state.ctx


# Routes declare ``ctx: CtxDep``: the dependency lives in the type, not in a call default.
CtxDep = Annotated[Context, Depends(get_ctx)]


# Ids past the id columns' range answer 422 instead of a database overflow (a 500): run
# and group ids are 64-bit on SQLite and PostgreSQL alike (migration 0004).
MAX_ID = 2**63 - 1
RunIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="A run id.")]
SweepIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="A sweep (group) id.")]
GroupIdQuery = Annotated[
    int | None,
    Query(ge=1, le=MAX_ID, description="Only runs of this sweep/compare group."),
]
# Run-management filters of GET /api/runs and GET /api/runs.csv (store.runs.run_filters).
ArchivedQuery = Annotated[
    Literal["hide", "only", "all"],
    Query(description="Archived runs: hidden (default), only them, or all runs."),
]
SearchQuery = Annotated[
    str | None,
    Query(max_length=200, description="Case-insensitive text in the name, notes or a tag."),
]
TagQuery = Annotated[str | None, Query(max_length=64, description="Only runs with this tag.")]


class _RunIdSegment(StringConvertor):
    """``{run_id:run}``: any path segment but ``bulk``, so ``/api/runs/bulk`` (POST) is not
    also ``/api/runs/{id}`` (GET, PATCH, DELETE) and its 405 ``Allow`` names POST alone.
    The value stays a string: FastAPI validates it as ``RunIdPath`` (422 when not an id)."""

    regex = r"(?!bulk(?:/|$))[^/]+"


register_url_convertor("run", _RunIdSegment())
