"""Alembic environment of the batchlab store.

``store.db.migrate`` hands over an open connection (``config.attributes["connection"]``)
already inside a locked transaction; the Alembic CLI gets an engine from the store's
configuration instead.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from store.models import Base


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things: batch mode copies tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from store.db import get_engine

    url = context.config.get_main_option("sqlalchemy.url") or None
    with get_engine(url).connect() as conn:
        _run(conn)
        conn.commit()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run against a database")
run_migrations_online()
