"""Writes on a server with BATCHLAB_TOKEN: a 401 asks for the token once, it is kept in
localStorage and sent as `Authorization: Bearer` from then on."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from store import db

pytestmark = pytest.mark.browser

TOKEN = "s3cret-token"


@pytest.fixture()
def locked(tmp_path, browser, ui) -> Iterator[SimpleNamespace]:
    """A second server, with a token, on its own home; a browser profile of its own."""
    home = tmp_path / "locked"
    home.mkdir()
    proc, url = ui.start_server(home, home / "api.log", token=TOKEN)
    engine = db.get_engine(f"sqlite:///{home / 'batchlab.db'}")
    context = ui.new_context(browser, url)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("dialog", lambda d: d.accept())  # Cancel asks for confirmation
    try:
        yield SimpleNamespace(url=url, engine=engine, page=page)
    finally:
        context.close()
        ui.stop(proc)
        engine.dispose()


def queued(locked, ui, name: str) -> int:
    return ui.seed_run(locked.engine, name=name, spec=ui.full_spec(), status="queued")


def test_token_prompt_then_remembered(locked, ui) -> None:
    page = locked.page
    first, second = queued(locked, ui, "first"), queued(locked, ui, "second")
    page.goto(f"/#/run/{first}")
    page.get_by_role("button", name="Cancel").click()
    dialog = page.locator("#token-dialog")
    dialog.wait_for(state="visible")
    dialog.locator("input[name=token]").fill("wrong")
    dialog.get_by_role("button", name="Save").click()
    # Refused: asked again, saying so.
    page.wait_for_function(
        "document.getElementById('token-reason').textContent.includes('refused')"
    )
    assert dialog.is_visible()
    dialog.locator("input[name=token]").fill(TOKEN)
    dialog.get_by_role("button", name="Save").click()
    page.wait_for_selector(".run-view .badge.s-cancelled")
    assert page.evaluate("localStorage.getItem('batchlab.token')") == TOKEN
    # The next write carries the kept token: no prompt.
    page.goto(f"/#/run/{second}")
    page.reload()
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_selector(".run-view .badge.s-cancelled")
    assert not dialog.is_visible()
