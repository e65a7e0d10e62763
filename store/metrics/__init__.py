"""Metric points: a batched, idempotent writer (``writer``, through the ``sqlite`` and
``postgres`` back-ends, keeping each series' ``live`` overview) and downsampled / incremental
reads (``read``, served from a stored ``overview``, live or a finished run's, or the series
``cache``); ``rows`` and ``queries`` are shared."""

from store.metrics.cache import invalidate
from store.metrics.overview import build_overviews, runs_missing_overviews
from store.metrics.read import SERIES_COLUMNS, Compact, keys, read_series, read_since
from store.metrics.writer import MetricWriteError, MetricWriter, write_points

__all__ = [
    "SERIES_COLUMNS",
    "Compact",
    "MetricWriteError",
    "MetricWriter",
    "build_overviews",
    "invalidate",
    "keys",
    "read_series",
    "read_since",
    "runs_missing_overviews",
    "write_points",
]
