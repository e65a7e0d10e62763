"""Engines, sessions and schema migrations.

One engine per database URL per process. SQLite is tuned for one writer and many
readers across processes (WAL, a 30 s busy timeout, foreign keys on, which SQLite leaves
off by default). ``migrate`` is meant to be called by every process at start-up: it
serialises concurrent callers and is a no-op once the schema is at head.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from core.settings import get_settings, normalize_database_url

BUSY_TIMEOUT_S = 30
# Arbitrary constant naming the migration lock among PostgreSQL advisory locks.
_PG_MIGRATE_LOCK = 0x6261746368  # "batch"
_STORE_DIR = Path(__file__).resolve().parent

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # busy_timeout first: switching to WAL itself needs a lock another process may hold.
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.close()


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pre_ping: a restarted PostgreSQL must not fail the first request after it.
        return sa.create_engine(url, pool_pre_ping=True)
    database = parsed.database or ""
    if database in ("", ":memory:"):
        # One shared connection, or every checkout would see its own empty database.
        engine = sa.create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
        )
    sa.event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def get_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: ``BATCHLAB_DATABASE_URL``), cached per URL."""
    key = normalize_database_url(url) if url else get_settings().database_url
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _create_engine(key)
        return engine


def dispose_engines() -> None:
    """Close every cached engine's connections (tests, forked processes)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def alembic_config(connection: sa.Connection | None = None) -> Any:
    """Alembic configuration for store/migrations, independent of the working directory."""
    from alembic.config import Config

    cfg = Config(str(_STORE_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(_STORE_DIR / "migrations"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine) -> None:
    """Upgrade the schema to head; safe when several processes start at once.

    The whole upgrade runs in one transaction that first takes a database-wide lock
    (PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``, waiting up to the busy
    timeout), so a second process waits and then finds the schema already at head.
    """
    from alembic import command

    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
        command.upgrade(alembic_config(conn), "head")
        conn.commit()


@contextmanager
def session(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error.

    Objects stay readable after the block (``expire_on_commit=False``) so callers can
    turn them into API dicts once the transaction is over.
    """
    s = Session(engine, expire_on_commit=False)
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()
