"""The generated-data cache is bounded (BATCHLAB_DATA_CACHE_MAX_BYTES), least recently
used files evicted first (core.files.evict_lru, trainer.data)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.files import evict_lru
from core.settings import DEFAULT_DATA_CACHE_MAX_BYTES, Settings
from trainer.data import mnist1d_arrays


def _file(folder: Path, name: str, size: int, mtime: float) -> Path:
    path = folder / name
    path.write_bytes(b"x" * size)
    os.utime(path, (mtime, mtime))
    return path


def test_evict_lru_deletes_oldest_until_within_bound(tmp_path: Path) -> None:
    old = _file(tmp_path, "a.npz", 100, 1_000)
    mid = _file(tmp_path, "b.npz", 100, 2_000)
    new = _file(tmp_path, "c.npz", 100, 3_000)
    other = _file(tmp_path, "user-data.bin", 10_000, 0)  # not ours: never counted or deleted
    assert evict_lru(tmp_path, "*.npz", 300) == []
    assert evict_lru(tmp_path, "*.npz", 250) == [old]
    # The file just written stays even when it is the oldest.
    assert evict_lru(tmp_path, "*.npz", 0, keep=mid) == [new]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz", "user-data.bin"]
    assert other.exists()


def test_setting_and_default() -> None:
    assert Settings.from_env({}).data_cache_max_bytes == DEFAULT_DATA_CACHE_MAX_BYTES == 2 << 30
    env = {"BATCHLAB_DATA_CACHE_MAX_BYTES": "1000"}
    assert Settings.from_env(env).data_cache_max_bytes == 1000


def test_mnist1d_cache_keeps_recently_used_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("BATCHLAB_DATA_CACHE", str(cache))
    mnist1d_arrays(200)
    mnist1d_arrays(210)
    (a, b) = sorted(cache.glob("mnist1d-*.npz"), key=lambda p: p.stat().st_size)
    os.utime(a, (1_000, 1_000))
    os.utime(b, (2_000, 2_000))
    mnist1d_arrays(200)  # a cache hit marks it used: now b is the least recently used
    assert a.stat().st_mtime > b.stat().st_mtime
    limit = a.stat().st_size + b.stat().st_size + b.stat().st_size // 2
    monkeypatch.setenv("BATCHLAB_DATA_CACHE_MAX_BYTES", str(limit))
    mnist1d_arrays(220)
    files = list(cache.glob("mnist1d-*.npz"))
    assert len(files) == 2 and a in files and b not in files
    assert sum(p.stat().st_size for p in files) <= limit
