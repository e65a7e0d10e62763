"""A run's log: the lines its training printed, bounded per run.

Writers append batches of lines (``append_log``: one transaction per batch, never one per
line); each batch continues the run's ``seq`` numbering and trims the run to its newest
``LOG_MAX_LINES`` lines, so a chatty run cannot grow the table without bound. Readers take
the tail (``read_log(tail=N)``) or what follows a line they have (``after=SEQ``).
``store.runs.delete_run`` deletes a run's lines with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from store.models import Run, RunLog, utcnow

LOG_MAX_LINES = 10_000
LOG_LINE_MAX_CHARS = 4_000
STREAMS = ("stdout", "stderr", "log", "error")


class LogLine(NamedTuple):
    stream: str
    text: str
    t: datetime | None = None


def _clip(text: str) -> str:
    text = text.rstrip("\r\n")
    if len(text) <= LOG_LINE_MAX_CHARS:
        return text
    return text[: LOG_LINE_MAX_CHARS - 1] + "…"


def last_seq(s: Session, run_id: int) -> int:
    """The newest line's ``seq`` (0 when the run has none)."""
    got = s.scalar(sa.select(sa.func.max(RunLog.seq)).where(RunLog.run_id == run_id))
    return int(got or 0)


def append_log(
    s: Session, run_id: int, lines: Sequence[LogLine], *, max_lines: int = LOG_MAX_LINES
) -> int:
    """Store ``lines`` after the run's last one and drop all but the newest ``max_lines``;
    the last ``seq`` written. Lines longer than ``LOG_LINE_MAX_CHARS`` are cut.

    The nodes of a multi-node run append to one log: on PostgreSQL the run row is locked
    first (``FOR NO KEY UPDATE``: writers of one run take turns, the metric writer's ``FOR
    KEY SHARE`` is not blocked), so two batches never number their lines alike; SQLite
    serialises writers anyway (a clash there is retried by the writer's next flush).
    """
    s.execute(sa.select(Run.id).where(Run.id == run_id).with_for_update(key_share=True))
    seq = last_seq(s, run_id)
    if not lines:
        return seq
    now = utcnow()
    rows = []
    kept = lines[-max_lines:]
    seq += len(lines) - len(kept)  # the lines cut here keep their numbers
    for line in kept:
        seq += 1
        stream = line.stream if line.stream in STREAMS else "stdout"
        rows.append(
            {
                "run_id": run_id,
                "seq": seq,
                "t": line.t or now,
                "stream": stream,
                "text": _clip(line.text),
            }
        )
    s.execute(sa.insert(RunLog), rows)
    s.execute(sa.delete(RunLog).where(RunLog.run_id == run_id, RunLog.seq <= seq - max_lines))
    return seq


def read_log(
    s: Session, run_id: int, *, tail: int | None = None, after: int | None = None
) -> list[dict[str, Any]]:
    """Lines in ``seq`` order: those after ``after``, at most the last ``tail`` of them."""
    q = sa.select(RunLog).where(RunLog.run_id == run_id)
    if after is not None:
        q = q.where(RunLog.seq > after)
    if tail is not None:
        rows = list(s.scalars(q.order_by(RunLog.seq.desc()).limit(tail)))[::-1]
    else:
        rows = list(s.scalars(q.order_by(RunLog.seq)))
    return [{"seq": r.seq, "t": r.t.isoformat(), "stream": r.stream, "text": r.text} for r in rows]


def delete_log(s: Session, run_id: int) -> None:
    s.execute(sa.delete(RunLog).where(RunLog.run_id == run_id))
