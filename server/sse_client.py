"""A small Server-Sent Events reader for Python clients (tests, benchmarks, notebooks).

Parses the ``text/event-stream`` format (https://html.spec.whatwg.org/#server-sent-events)
line by line from any iterator of text lines, such as ``httpx.Response.iter_lines()``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Event:
    event: str
    data: str
    id: str | None

    def json(self) -> Any:
        return json.loads(self.data)


def iter_events(lines: Iterable[str]) -> Iterator[Event]:
    """Events from SSE lines; comments (pings) are skipped."""
    event, data, last_id = "message", [], None
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield Event(event, "\n".join(data), last_id)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            last_id = value
    if data:
        yield Event(event, "\n".join(data), last_id)
