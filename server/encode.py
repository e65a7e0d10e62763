"""JSON answers without NaN: JSON has no NaN or Infinity, and a diverged run logs both
(``core.jsonsafe`` turns them into null).

``store.metrics`` already hands out series as parallel lists (``step``, ``epoch``,
``wall_time``, ``value``) with None for non-finite values, which the browser passes to
Plotly unchanged. ``FastJSONResponse`` serialises such payloads directly (FastAPI's
generic encoder walks every element, slow for long arrays) and refuses NaN, so a bug
upstream is a 500, never a body that browsers' ``JSON.parse`` rejects.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse


def dumps(obj: Any) -> str:
    """Compact JSON; raises on a NaN that slipped through rather than emit invalid JSON."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False)


class FastJSONResponse(JSONResponse):
    """JSON answer for already-sanitized payloads: skips FastAPI's per-item encoder.

    A ``JSONResponse`` so that OpenAPI documents the route's model as its JSON answer."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")
