"""SQLAlchemy 2 models: runs, groups (sweeps / comparisons), metric points, workers.

The schema itself is created by the Alembic migrations in store/migrations; these
classes must match them (tests/test_migrations.py compares the two).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from core.status import RunStatus

GROUP_KINDS = ("sweep", "compare")
KEY_MAX_LEN = 64
# Run and group ids are BIGINT on PostgreSQL (migration 0004). SQLite's INTEGER is 64-bit
# already, and only "INTEGER PRIMARY KEY" is its rowid (and AUTOINCREMENT) column.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uid() -> str:
    """A run's never-repeating identity (32 hex digits)."""
    return uuid.uuid4().hex


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so values are stored as
    naive UTC and get their ``tzinfo`` back when read. Naive input is taken as UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Explicit constraint names: Alembic needs them to alter constraints later, on SQLite too.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: sa.JSON, list[Any]: sa.JSON}


class Group(Base):
    """A sweep over batch sizes (and seeds) or a hand-made comparison of runs."""

    __tablename__ = "groups"
    __table_args__ = (sa.CheckConstraint("kind IN ('sweep', 'compare')", name="kind"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    kind: Mapped[str] = mapped_column(sa.String(16))
    spec: Mapped[dict[str, Any] | None] = mapped_column()
    batch_sizes: Mapped[list[Any] | None] = mapped_column()
    seeds: Mapped[list[Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # A sweep of batch_sizes "auto" (migration 0008): "waiting" for its baseline, then
    # "queued" (the ladder) or "failed" (why in auto_message), once (store.runs.settle_auto).
    auto_state: Mapped[str | None] = mapped_column(sa.String(16))
    auto_message: Mapped[str | None] = mapped_column(sa.Text)

    # selectin: server.schemas.GroupOut reads a group whose session is closed.
    runs: Mapped[list[Run]] = relationship(
        back_populates="group", lazy="selectin", order_by="Run.id"
    )


class Run(Base):
    """One training run and its lifecycle (queued -> running -> a final status)."""

    __tablename__ = "runs"
    __table_args__ = (
        # A new status needs a migration too: 0001_initial.py spells this constraint out.
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in RunStatus) + ")", name="status"
        ),
        # No id reuse after a delete: caches and browser tabs key on run ids.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # An identity that never repeats, not even after the database is reset while
    # $BATCHLAB_HOME is kept: the run's folder (checkpoint, metric spool) is named by it.
    uid: Mapped[str | None] = mapped_column(sa.String(32), unique=True, index=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    spec: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(sa.String(16), default=RunStatus.QUEUED, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    host: Mapped[str | None] = mapped_column(sa.String(200))
    gpus: Mapped[str | None] = mapped_column(sa.String(200))
    worker: Mapped[str | None] = mapped_column(sa.String(200))
    # The Celery queue of its last message (waiting_for in the API names it) and the
    # device its last attempt trained on ("cuda:0 NVIDIA H200 (139 GiB), torch ...").
    queue: Mapped[str | None] = mapped_column(sa.String(64))
    device: Mapped[str | None] = mapped_column(sa.String(300))
    task_id: Mapped[str | None] = mapped_column(sa.String(200))
    attempts: Mapped[int] = mapped_column(default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(sa.Text)
    diverged_step: Mapped[int | None] = mapped_column()
    summary: Mapped[dict[str, Any] | None] = mapped_column()
    progress: Mapped[float] = mapped_column(sa.Double, default=0.0)
    eta_s: Mapped[float | None] = mapped_column(sa.Double)
    group_id: Mapped[int | None] = mapped_column(
        BigId, sa.ForeignKey("groups.id", ondelete="SET NULL"), index=True
    )
    baseline_id: Mapped[int | None] = mapped_column(
        BigId, sa.ForeignKey("runs.id", ondelete="SET NULL")
    )
    is_baseline: Mapped[bool] = mapped_column(default=False)
    # Run management (migration 0006; rules in store.runs.update_run).
    tags: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")
    notes: Mapped[str] = mapped_column(sa.Text, default="", server_default="")
    archived: Mapped[bool] = mapped_column(default=False, server_default=sa.false(), index=True)
    # The run this one extends ("train N more epochs" from its checkpoint). No foreign key,
    # as for metric points: delete_run clears it.
    parent_id: Mapped[int | None] = mapped_column(BigId, index=True)
    # "worker" (queued, trained by a batchlab worker) or "external" (registered by its own
    # client: batchlab train --server, Client.start_run; migration 0009). The reaper
    # never re-queues an external run: it has no broker message.
    origin: Mapped[str] = mapped_column(sa.String(16), default="worker", server_default="worker")
    # Multi-node runs (migration 0010, store/gang.py): the spec's nodes, and the time a gang
    # that did not fill may be joined again.
    nodes: Mapped[int] = mapped_column(default=1, server_default="1")
    gang_retry_at: Mapped[datetime | None] = mapped_column()

    group: Mapped[Group | None] = relationship(back_populates="runs", lazy="raise")


class MetricPoint(Base):
    """One value of one metric key at one iteration of a run.

    ``value`` is nullable only because SQLite stores NaN as NULL; a NULL reads as NaN.

    ``run_id`` deliberately has no foreign key: PostgreSQL checks one per inserted row
    (a trigger and a lookup each), which cost a third of the ingest rate (see
    docs/benchmarks/store.md). Integrity is kept per batch instead: the metric writer
    locks the run row (``FOR KEY SHARE`` / SQLite's write lock) before inserting and
    drops the batch if the run is gone, and ``store.runs.delete_run`` deletes the run
    row before its points, so a concurrent batch is either blocked or deleted with them.
    """

    __tablename__ = "metric_points"
    # SQLite: cluster rows by the primary key so a series is one contiguous range.
    __table_args__ = {"sqlite_with_rowid": False}

    run_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(sa.String(KEY_MAX_LEN), primary_key=True)
    step: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    epoch: Mapped[float] = mapped_column(sa.Double)
    wall_time: Mapped[float] = mapped_column(sa.Double)
    value: Mapped[float | None] = mapped_column(sa.Double)


class SeriesOverview(Base):
    """One series of a run, downsampled and kept: kept up to date while the run writes
    (store.metrics.live, min/max/first/last buckets), replaced by a MinMaxLTTB overview
    when it finishes.

    A cold read of a long series costs about a second per million points (every row comes
    out of the database); a compare view of 20 runs would pay that for each.
    Views without an x range read this instead (store.metrics.read_series), ``attempts``
    tying it to the run attempt whose points it summarises.
    """

    __tablename__ = "series_overviews"

    run_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    key: Mapped[str] = mapped_column(sa.String(KEY_MAX_LEN), primary_key=True)
    attempts: Mapped[int] = mapped_column(sa.Integer)
    total: Mapped[int] = mapped_column(sa.BigInteger)
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)


class WorkerBeat(Base):
    """The last sign of life of one Celery worker process."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    host: Mapped[str] = mapped_column(sa.String(200))
    gpus: Mapped[str] = mapped_column(sa.String(200), default="")
    queues: Mapped[list[Any]] = mapped_column(default=list)
    active_run_id: Mapped[int | None] = mapped_column(
        BigId, sa.ForeignKey("runs.id", ondelete="SET NULL")
    )
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)


class RunNode(Base):
    """One node of a multi-node run's attempt: the worker holding the slot, where it runs,
    its state (``waiting`` for the gang to fill, ``running``, ``exited``, ``failed``) and
    its last beat. Slot 0 publishes the rendezvous endpoint (``addr:port``). No foreign
    key, like MetricPoint: ``delete_run`` removes the rows after the run."""

    __tablename__ = "run_nodes"

    run_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    attempt: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    slot: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    worker: Mapped[str] = mapped_column(sa.String(200), index=True)
    host: Mapped[str] = mapped_column(sa.String(200))
    addr: Mapped[str] = mapped_column(sa.String(200))
    port: Mapped[int | None] = mapped_column()
    state: Mapped[str] = mapped_column(sa.String(16))
    joined_at: Mapped[datetime] = mapped_column()
    beat_at: Mapped[datetime] = mapped_column()
    error: Mapped[str | None] = mapped_column(sa.Text)


class RunLog(Base):
    """One line of a run's output (the training's stdout / stderr, warnings, a failure's
    traceback), ``seq`` numbering the run's lines across attempts. Bounded per run by
    ``store.runs.append_log``; no foreign key, like MetricPoint: ``delete_run`` removes
    the lines after the run row."""

    __tablename__ = "run_logs"

    run_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    t: Mapped[datetime] = mapped_column()
    stream: Mapped[str] = mapped_column(sa.String(16))
    text: Mapped[str] = mapped_column(sa.Text)
