"""The run statuses are written out once (core/status.py); the copies that cannot import
it (the browser's, the database's check constraint) are held to it here."""

from __future__ import annotations

import re
from pathlib import Path

from core.status import ACTIVE_STATUSES, FINAL_STATUSES, RunStatus

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "frontend" / "js"
PACKAGES = ("batchlab", "bench", "core", "server", "store", "trainer", "worker")


def _js_list(source: str, pattern: str) -> list[str]:
    match = re.search(pattern, source, re.S)
    assert match, f"{pattern!r} not found in frontend/js/format.js"
    return re.findall(r"'([a-z]+)'", match.group(1))


def test_the_frontend_copy_matches_run_status() -> None:
    source = (JS / "format.js").read_text()
    statuses = _js_list(source, r"export const STATUSES = \[(.*?)\];")
    terminal = _js_list(source, r"export const TERMINAL = new Set\(\[(.*?)\]\);")
    assert statuses == [s.value for s in RunStatus]  # the filter menu's order too
    assert set(terminal) == FINAL_STATUSES and len(terminal) == len(FINAL_STATUSES)


def test_no_other_frontend_module_lists_statuses() -> None:
    # 'queued' and 'cancelled' are only ever needed in a list: another one is a copy.
    for path in JS.glob("*.js"):
        if path.name != "format.js":
            text = path.read_text()
            assert "'queued'" not in text and "'cancelled'" not in text, path.name


def test_no_python_module_lists_statuses() -> None:
    # A status list outside core/status.py would drift: import RunStatus / FINAL_STATUSES.
    listing = re.compile(
        r"""["'](queued|succeeded|failed|diverged)["'],\s*["'](running|failed|diverged|cancelled)"""
    )
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts or path.name == "status.py":
                continue
            assert not listing.search(path.read_text()), path.relative_to(ROOT)


def test_the_database_constraint_allows_exactly_the_statuses() -> None:
    # Migrations are history and spell the list out; a new status needs a new migration.
    initial = (ROOT / "store" / "migrations" / "versions" / "0001_initial.py").read_text()
    constraint = re.search(r'"status IN \(([^)]*)\)"', initial)
    assert constraint
    assert re.findall(r"'([a-z]+)'", constraint.group(1)) == [s.value for s in RunStatus]


def test_final_and_active_statuses_split_the_list() -> None:
    assert set(RunStatus) == FINAL_STATUSES | ACTIVE_STATUSES
    assert not FINAL_STATUSES & ACTIVE_STATUSES
    assert {RunStatus.QUEUED, RunStatus.RUNNING} == ACTIVE_STATUSES
    assert RunStatus("queued") == "queued" and f"{RunStatus.CANCELLED}" == "cancelled"
