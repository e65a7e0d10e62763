"""JSON has no NaN or Infinity, and a diverged run logs both: one rule turns them into null."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` unless it is a non-finite float (NaN, +-inf), which becomes None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float, however deeply nested, replaced by None.

    Mapping keys become strings (JSON objects have string keys); tuples become lists.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
