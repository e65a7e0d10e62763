"""The service's settings and the FastAPI dependencies that hand them to routes.

Everything a route needs (the engine, the token, the enqueue function) lives on
``app.state.ctx`` so that several apps with different databases can coexist in one
process (the tests do that), instead of being module globals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from celery import Celery
from fastapi import Request
from sqlalchemy import Engine

from trainer.spec import RunSpec


@dataclass(frozen=True)
class Settings:
    """Where the service keeps its data and whom it lets write."""

    database_url: str
    broker_url: str
    token: str | None

    @property
    def broker_url_safe(self) -> str:
        """The broker URL with any password masked, for messages and logs."""
        from kombu.utils.url import maybe_sanitize_url

        return str(maybe_sanitize_url(self.broker_url))

    @classmethod
    def resolve(
        cls,
        database_url: str | None = None,
        broker_url: str | None = None,
        token: str | None = None,
    ) -> Settings:
        """Explicit arguments win; otherwise the BATCHLAB_* environment (docs/design.md)."""
        from store import config as store_config
        from worker import celery_app

        return cls(
            database_url=database_url or store_config.database_url(),
            broker_url=broker_url or celery_app.broker_url(),
            # An empty BATCHLAB_TOKEN means "no token", as unset does.
            token=token if token is not None else (os.environ.get("BATCHLAB_TOKEN") or None),
        )


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
