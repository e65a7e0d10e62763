"""Store configuration, engines and Alembic migrations on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from store import config
from store.db import alembic_config, dispose_engines, get_engine, migrate, session
from store.models import Base
from store.runs import create_run, get_run

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
TABLES = {"runs", "groups", "metric_points", "workers", "alembic_version"}


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    dispose_engines()  # before pg_url drops the database


def _head() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _version(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_migrate_from_empty_matches_models_and_is_idempotent(url: str) -> None:
    engine = get_engine(url)
    assert set(sa.inspect(engine).get_table_names()) == set()
    migrate(engine)
    assert set(sa.inspect(engine).get_table_names()) >= TABLES
    assert _version(engine) == _head()
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"migrations and store.models disagree: {diff}"

    with session(engine) as s:
        run_id = create_run(s, name="kept", spec={"epochs": 1}).id
    migrate(engine)  # a second process starting: no-op, data kept
    migrate(engine)
    assert _version(engine) == _head()
    with session(engine) as s:
        assert get_run(s, run_id).name == "kept"


def test_downgrade_to_base_and_upgrade_again(url: str) -> None:
    engine = get_engine(url)
    migrate(engine)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate(engine)
    assert set(sa.inspect(engine).get_table_names()) >= TABLES


@pytest.mark.slow
def test_concurrent_migrations_from_other_directories(url: str, tmp_path: Path) -> None:
    """Three processes start at once on an empty database, none in the repository."""
    code = (
        "import sys; from store.db import get_engine, migrate; "
        "migrate(get_engine(sys.argv[1])); print('ok')"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == "ok"
    engine = get_engine(url)
    assert _version(engine) == _head()
    assert set(sa.inspect(engine).get_table_names()) >= TABLES


def test_sqlite_engine_pragmas_and_cache(sqlite_url: str) -> None:
    engine = get_engine(sqlite_url)
    assert get_engine(sqlite_url) is engine
    with engine.connect() as conn:
        pragma = {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        }
    assert pragma == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 30000,
                      "foreign_keys": 1}  # fmt: skip
    dispose_engines()
    assert get_engine(sqlite_url) is not engine


def test_config_defaults_and_overrides(
    batchlab_home: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert config.home() == Path(batchlab_home)
    assert config.database_url() == f"sqlite:///{Path(batchlab_home).resolve()}/batchlab.db"

    nested = tmp_path / "a" / "b"
    monkeypatch.setenv("BATCHLAB_HOME", str(nested))
    assert config.home() == nested and nested.is_dir()

    monkeypatch.delenv("BATCHLAB_HOME")
    monkeypatch.chdir(tmp_path)
    assert config.home() == Path(".batchlab") and (tmp_path / ".batchlab").is_dir()

    monkeypatch.setenv("BATCHLAB_DATABASE_URL", "postgresql://u@h:5432/db")
    assert config.database_url() == "postgresql+psycopg://u@h:5432/db"
    monkeypatch.setenv("BATCHLAB_DATABASE_URL", "postgres://u@h/db")
    assert config.database_url() == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("BATCHLAB_DATABASE_URL", "postgresql+psycopg://u@h/db")
    assert config.database_url() == "postgresql+psycopg://u@h/db"


def test_default_engine_uses_batchlab_home(batchlab_home: str) -> None:
    engine = get_engine()
    try:
        migrate(engine)
        assert (Path(batchlab_home) / "batchlab.db").is_file()
        assert engine.dialect.name == "sqlite"
    finally:
        dispose_engines()


def test_alembic_cli_from_another_directory(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`alembic -c store/alembic.ini upgrade head` works without being in the repo."""
    alembic_bin = Path(sys.executable).with_name("alembic")
    env = {"PATH": "/usr/bin:/bin", "BATCHLAB_DATABASE_URL": sqlite_url}
    proc = subprocess.run(
        [str(alembic_bin), "-c", str(ROOT / "store" / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        assert _version(get_engine(sqlite_url)) == _head()
    finally:
        dispose_engines()
