"""The statuses of a run, one list for every layer (the frontend's copy in
frontend/js/format.js is held to it by tests/test_status.py).

A run is ``queued`` until a worker claims it, ``running`` while an attempt trains, and
then final. Only ``store.runs`` changes a run's status; this module only names them.
``StrEnum``: members compare equal to the strings stored in the database and the API.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DIVERGED = "diverged"
    CANCELLED = "cancelled"


# A run in one of these never changes again (unless re-queued by hand).
FINAL_STATUSES: frozenset[RunStatus] = frozenset(
    {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.DIVERGED, RunStatus.CANCELLED}
)
ACTIVE_STATUSES: frozenset[RunStatus] = frozenset(RunStatus) - FINAL_STATUSES
