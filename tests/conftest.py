"""Shared fixtures: real local services, skipped outside CI and required inside it.

CI=true turns a missing Redis, PostgreSQL or Chromium into a loud failure, so a green CI
run always means the service paths were exercised.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Iterator

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("BATCHLAB_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BATCHLAB_TEST_REDIS", "redis://127.0.0.1:6379")
CHROMIUM = os.environ.get("BATCHLAB_CHROMIUM", "/usr/bin/chromium")


def need(available: bool, what: str) -> None:
    """Skip when a service is missing; fail instead under CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but is not available", pytrace=False)
    pytest.skip(f"{what} not available")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip without CUDA (torch is imported only if there are any)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=f"no CUDA GPU (torch {torch.__version__})")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _testclient_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starlette's TestClient sends ``Host: testserver``, which the API accepts only when
    allowed (server.middleware.HostGuard); tests of the guard itself unset this."""
    monkeypatch.setenv("BATCHLAB_ALLOWED_HOSTS", "testserver")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database number of its own, flushed before and after."""
    need(_port_open("127.0.0.1", 6379), "Redis on 127.0.0.1:6379")
    import redis

    db = 9
    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


RABBITMQ_URL = os.environ.get("BATCHLAB_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672//")
RABBITMQ_QUEUES = ("cpu", "gpu")


def _purge_rabbitmq(url: str) -> None:
    import contextlib

    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        for name in RABBITMQ_QUEUES:
            # Not declared yet: nothing to purge (and that channel is closed).
            with contextlib.suppress(Exception):
                conn.channel().queue_purge(name)


@pytest.fixture()
def rabbitmq_url() -> Iterator[str]:
    """The local RabbitMQ, its batchlab queues purged before and after."""
    need(_port_open("127.0.0.1", 5672), "RabbitMQ on 127.0.0.1:5672")
    _purge_rabbitmq(RABBITMQ_URL)
    yield RABBITMQ_URL
    _purge_rabbitmq(RABBITMQ_URL)


@pytest.fixture()
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    need(_port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    import sqlalchemy as sa

    name = f"batchlab_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{PG_ADMIN_URL}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_ADMIN_URL}/{name}"
    finally:
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


@pytest.fixture()
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'batchlab.db'}"


@pytest.fixture(scope="session")
def chromium_path() -> str:
    need(shutil.which(CHROMIUM) is not None or os.path.exists(CHROMIUM), "Chromium")
    return CHROMIUM


@pytest.fixture()
def batchlab_home(tmp_path, monkeypatch) -> str:
    """An isolated BATCHLAB_HOME (database, broker, checkpoints) for one test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BATCHLAB_HOME", str(home))
    monkeypatch.delenv("BATCHLAB_DATABASE_URL", raising=False)
    monkeypatch.delenv("BATCHLAB_BROKER_URL", raising=False)
    monkeypatch.delenv("BATCHLAB_TOKEN", raising=False)
    return str(home)


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread, as torchrun gives its processes (OMP_NUM_THREADS=1): tiny
    models run several times faster on a shared, busy CPU. Trainer tests ask for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch  # here: the torch-free tests (other Pythons) load this file too

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def broker_url(tmp_path) -> str:
    """A SQLite broker of the test's own (kombu's SQLAlchemy transport)."""
    return f"sqla+sqlite:///{tmp_path / 'broker.db'}"
