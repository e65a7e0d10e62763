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

from store.db import alembic_config, dispose_engines, get_engine, migrate, session
from store.models import Base
from store.runs import create_run, get_run, list_runs

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


def test_0003_adds_queue_and_device_to_existing_runs(url: str) -> None:
    """A database at 0002 with a run: upgraded, the run is kept with no queue or device;
    downgraded again, the run is still there and ids are not reused (AUTOINCREMENT kept)."""
    engine = get_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0002")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO runs (name, spec, status, created_at, attempts, cancel_requested,"
                " progress, is_baseline) VALUES ('old', '{}', 'queued', CURRENT_TIMESTAMP, 0,"
                " false, 0, false)"
            )
        )
    migrate(engine)
    with session(engine) as s:
        (old,) = list_runs(s)
        assert (old.name, old.queue, old.device) == ("old", None, None)
        s.delete(old)
        newer = create_run(s, name="newer", spec={}).id
    assert newer > old.id
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0002")
        names = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
    assert {"queue", "device"}.isdisjoint(names) and "name" in names
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM runs"))
    migrate(engine)
    with session(engine) as s:
        assert create_run(s, name="after", spec={}).id > newer


def test_0005_backfills_uid_with_the_folder_name_existing_runs_have(url: str) -> None:
    """Runs from before 0005 keep their folder (runs/<id>); new runs get a random uid."""
    engine = get_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0004")
        for name in ("a", "b"):
            conn.execute(
                sa.text(
                    "INSERT INTO runs (name, spec, status, created_at, attempts,"
                    " cancel_requested, progress, is_baseline) VALUES (:n, '{}', 'queued',"
                    " CURRENT_TIMESTAMP, 0, false, 0, false)"
                ),
                {"n": name},
            )
    migrate(engine)
    with session(engine) as s:
        old = list_runs(s)
        assert sorted(r.uid for r in old) == sorted(str(r.id) for r in old)
        new = create_run(s, name="new", spec={})
        assert new.uid is not None and len(new.uid) == 32 and new.uid != str(new.id)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0004")
        assert "uid" not in {c["name"] for c in sa.inspect(conn).get_columns("runs")}


def test_0006_gives_existing_runs_empty_tags_and_notes_and_keeps_them(url: str) -> None:
    """Runs from before 0006 survive it (no tags, no notes, not archived, no parent) and
    its downgrade; the new columns take values, a 64-bit parent id included."""
    engine = get_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0005")
        conn.execute(
            sa.text(
                "INSERT INTO runs (uid, name, spec, status, created_at, attempts,"
                " cancel_requested, progress, is_baseline) VALUES ('u1', 'old', '{}',"
                " 'succeeded', CURRENT_TIMESTAMP, 1, false, 1, false)"
            )
        )
    migrate(engine)
    with session(engine) as s:
        (old,) = list_runs(s)
        assert (old.name, old.tags, old.notes, old.archived, old.parent_id) == (
            "old",
            [],
            "",
            False,
            None,
        )
        child = create_run(s, name="child", spec={})
        child.tags, child.notes, child.archived, child.parent_id = ["a"], "n", True, 2**40
        child_id = child.id
    with session(engine) as s:
        got = get_run(s, child_id)
        assert (got.tags, got.notes, got.archived, got.parent_id) == (["a"], "n", True, 2**40)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0005")
        names = {c["name"] for c in sa.inspect(conn).get_columns("runs")}
        assert {"tags", "notes", "archived", "parent_id"}.isdisjoint(names)
        assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar() == 2
    migrate(engine)
    with session(engine) as s:
        assert {r.name: r.tags for r in list_runs(s)} == {"old": [], "child": []}


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
