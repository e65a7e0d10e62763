"""A scratch PostgreSQL database for a benchmark: created empty, dropped afterwards.

The local PostgreSQL (trust auth, as on this machine and CI) is the one
tests/conftest.py's ``pg_url`` fixture uses; benchmarks import this instead of copying
the create / terminate / drop dance.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432"


@contextmanager
def scratch_pg_database(prefix: str) -> Iterator[str]:
    """The URL of a new empty database ``PREFIX_xxxxxxxx``, dropped on exit (its open
    sessions terminated first, the store's cached engine disposed)."""
    from store import db

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    url = f"{PG_ADMIN}/{name}"
    admin = sa.create_engine(f"{PG_ADMIN}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield url
    finally:
        db.get_engine(url).dispose()
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :n AND pid <> pg_backend_pid()"
                ),
                {"n": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
