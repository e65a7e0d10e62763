"""One wording for validation errors, ``field: message``, wherever they are shown.

Takes pydantic's ``ValidationError``, its ``errors()`` list, or FastAPI's 422 detail (whose
``loc`` starts with "body" or "query"); the API adds ``field`` and ``message`` to each
422 item so the browser shows them without a rule of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def error_field(loc: Sequence[Any]) -> str:
    """The last name in ``loc`` plus any list positions (``batch_sizes[1]``); "" for none."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]  # where FastAPI found the input, not part of the field's name
    indexes = ""
    while parts and isinstance(parts[-1], int):
        indexes = f"[{parts.pop()}]{indexes}"
    return f"{parts[-1]}{indexes}" if parts else indexes


def error_message(msg: Any) -> str:
    """pydantic prefixes custom validator messages with "Value error, "; the field says it."""
    return str(msg).removeprefix("Value error, ")


def field_errors(errors: Any) -> list[tuple[str, str]]:
    """``(field, message)`` pairs of a ``ValidationError``, an ``errors()`` list or a string."""
    if hasattr(errors, "errors"):
        errors = errors.errors()
    if isinstance(errors, str) or not isinstance(errors, Iterable):
        return [("", str(errors))]
    return [
        (error_field(e.get("loc", ())), error_message(e.get("msg", "")))
        if isinstance(e, Mapping)
        else ("", str(e))
        for e in errors
    ]


def format_validation_error(errors: Any, sep: str = "; ") -> str:
    """Each error as ``field: message`` (the message alone without a field), joined."""
    return sep.join(f"{f}: {m}" if f else m for f, m in field_errors(errors))
