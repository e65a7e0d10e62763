"""The per-process series cache: each (engine, run, key) series as numpy columns, extended
with the steps beyond what it holds, so serving a 1M-point series does not refetch it.

A series carries the run's attempt count as its token: a resumed run may rewrite steps it
had logged, so a new attempt (or a deleted run, ``invalidate``) starts the series afresh.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from sqlalchemy.engine import Engine

from store.metrics.rows import COLUMN_DTYPES

CACHE_MAX_POINTS = 4_000_000  # about 128 MB of float64 columns before eviction


class Series:
    """One (run, key) series as growable numpy columns, ordered by step."""

    __slots__ = ("token", "n", "cols", "sorted", "lock")

    def __init__(self, token: int) -> None:
        self.token = token
        self.n = 0
        self.cols = {name: np.empty(0, dtype) for name, dtype in COLUMN_DTYPES.items()}
        self.sorted = {"step": True, "epoch": True, "wall_time": True}
        self.lock = threading.Lock()

    @property
    def last_step(self) -> int:
        return int(self.cols["step"][self.n - 1]) if self.n else -1

    def extend(self, new: Mapping[str, np.ndarray]) -> None:
        m = len(new["step"])
        if not m:
            return
        need = self.n + m
        if need > len(self.cols["step"]):
            # Grow by doubling: appending a few points to a 1M series must not copy it.
            cap = max(need, 2 * len(self.cols["step"]), 1024)
            for name, col in self.cols.items():
                grown = np.empty(cap, col.dtype)
                grown[: self.n] = col[: self.n]
                self.cols[name] = grown
        for name in ("epoch", "wall_time"):
            if self.sorted[name]:
                chunk = new[name]
                prev = self.cols[name][self.n - 1 : self.n]
                self.sorted[name] = bool(np.all(np.diff(np.concatenate((prev, chunk))) >= 0))
        # Only slots beyond n are written, so views handed out earlier stay valid.
        for name, col in self.cols.items():
            col[self.n : need] = new[name]
        self.n = need

    def view(self) -> dict[str, np.ndarray]:
        return {name: col[: self.n] for name, col in self.cols.items()}


_cache: OrderedDict[tuple[str, int, str], Series] = OrderedDict()
_cache_lock = threading.Lock()


def invalidate(run_id: int | None = None) -> None:
    """Forget cached series of one run (every run when None), in every engine."""
    with _cache_lock:
        for k in [k for k in _cache if run_id is None or k[1] == run_id]:
            del _cache[k]


def cached(engine: Engine, run_id: int, key: str, token: int) -> Series:
    """The cached series (most recently used now), empty if new or of an older attempt."""
    ck = (str(engine.url), run_id, key)
    with _cache_lock:
        series = _cache.get(ck)
        if series is None or series.token != token:
            series = _cache[ck] = Series(token)
        _cache.move_to_end(ck)
        return series


def is_cached(engine: Engine, run_id: int, key: str, token: int) -> bool:
    with _cache_lock:
        series = _cache.get((str(engine.url), run_id, key))
        return series is not None and series.token == token and series.n > 0


def evict() -> None:
    """Drop least recently used series while the cache holds over CACHE_MAX_POINTS."""
    with _cache_lock:
        total = sum(s.n for s in _cache.values())
        while total > CACHE_MAX_POINTS and len(_cache) > 1:
            _, oldest = _cache.popitem(last=False)
            total -= oldest.n
