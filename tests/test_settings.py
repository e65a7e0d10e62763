"""core.settings: one reading of the BATCHLAB_* environment for every layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.settings import DEFAULT_URL, Settings, get_settings, mask_password
from store.db import get_engine
from trainer.data import data_cache_dir


def test_defaults_unset_and_empty_mean_the_same() -> None:
    unset = Settings.from_env({})
    empty = Settings.from_env({name: "" for name in ("BATCHLAB_HOME", "BATCHLAB_TOKEN")})
    assert unset == empty
    assert unset.home == Path(".batchlab") and unset.data_cache == Path(".batchlab/data")
    assert unset.database_url == f"sqlite:///{Path('.batchlab/batchlab.db').resolve()}"
    assert unset.broker_url == f"sqla+sqlite:///{Path('.batchlab/broker.db').resolve()}"
    assert unset.token is None and unset.url == DEFAULT_URL


def test_explicit_values() -> None:
    s = Settings.from_env(
        {
            "BATCHLAB_HOME": "/srv/bl",
            "BATCHLAB_DATABASE_URL": "postgres://u:pw@db/batchlab",
            "BATCHLAB_BROKER_URL": "redis://:pw@redis:6379/0",
            "BATCHLAB_TOKEN": "t0k",
            "BATCHLAB_DATA_CACHE": "/cache",
            "BATCHLAB_URL": "http://gpu-box:8000/",
        }
    )
    assert s.home == Path("/srv/bl") and s.data_cache == Path("/cache")
    assert s.database_url == "postgresql+psycopg://u:pw@db/batchlab"  # psycopg 3
    assert s.broker_url_safe == "redis://:***@redis:6379/0"
    assert mask_password(s.database_url) == "postgresql+psycopg://u:***@db/batchlab"
    assert (s.token, s.url) == ("t0k", "http://gpu-box:8000")
    assert Settings.from_env({"BATCHLAB_DATABASE_URL": "postgresql://h/db"}).database_url == (
        "postgresql+psycopg://h/db"
    )


@pytest.mark.parametrize("home", ["", "~/bl"])
def test_store_and_data_cache_share_the_home(home, monkeypatch, tmp_path) -> None:
    # Once: the store read `BATCHLAB_HOME or .batchlab` with ~ expanded, the data cache
    # `BATCHLAB_HOME` as given (with "" meaning the working directory, ~ kept literally).
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BATCHLAB_HOME", home)
    monkeypatch.delenv("BATCHLAB_DATABASE_URL", raising=False)
    monkeypatch.delenv("BATCHLAB_DATA_CACHE", raising=False)
    want = (tmp_path / "user" / "bl") if home else (tmp_path / ".batchlab")
    database = Path(get_engine().url.database or "")
    assert database.parent == want.resolve()
    assert data_cache_dir().resolve() == want.resolve() / "data"


def test_get_settings_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("BATCHLAB_HOME", str(tmp_path / "a"))
    first = get_settings()
    assert get_settings() is first  # parsed once, shared
    monkeypatch.setenv("BATCHLAB_HOME", str(tmp_path / "b"))
    assert get_settings().home == tmp_path / "b"
    monkeypatch.setenv("BATCHLAB_TOKEN", "")
    assert get_settings().token is None


def test_override_keeps_unset_fields() -> None:
    base = Settings.from_env({"BATCHLAB_TOKEN": "env"})
    s = base.override(database_url="sqlite://", broker_url=None, token=None)
    assert s.database_url == "sqlite://"
    assert (s.broker_url, s.token) == (base.broker_url, "env")


def test_training_threads_leave_one_core_unless_set() -> None:
    from core.settings import training_threads

    assert training_threads(0, 2) == 1
    assert training_threads(0, 16) == 15
    assert training_threads(0, 1) == 1
    assert training_threads(3, 2) == 3
    assert Settings.from_env({"BATCHLAB_TORCH_THREADS": "4"}).torch_threads == 4
    assert Settings.from_env({"BATCHLAB_TORCH_THREADS": ""}).torch_threads == 0
