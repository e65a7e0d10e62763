"""JSON answers without NaN: JSON has no NaN or Infinity, and a diverged run logs both.

``store.metrics`` already hands out series as parallel lists (``step``, ``epoch``,
``wall_time``, ``value``) with None for non-finite values, which the browser passes to
Plotly unchanged. ``FastJSONResponse`` serialises such payloads directly (FastAPI's
generic encoder walks every element, slow for long arrays) and refuses NaN, so a bug
upstream is a 500, never a body that browsers' ``JSON.parse`` rejects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response


def sanitize(obj: Any) -> Any:
    """Recursively replace non-finite floats (summaries, run dicts) by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [sanitize(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Compact JSON; raises on a NaN that slipped through rather than emit invalid JSON."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


class FastJSONResponse(Response):
    """JSON answer for already-sanitized payloads: skips FastAPI's per-item encoder."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")
