"""Issue 14 part 1 in the browser: the workers view (#/workers) and a multi-node run's
nodes. Written through the store as workers would: three fake workers on a queue of this
module's own (the session's real worker serves ``cpu`` only, so it never joins these
gangs), a running two-node gang (workers a and b) and a second two-node run whose gang
has one of its two nodes (worker c)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

pytestmark = pytest.mark.browser

# A host name that is markup: it must reach the page as text.
EVIL_HOST = '<img src=x onerror="window.__xss=3">'
WORKERS = {
    "node-a@host-a": ("host-a", "10.0.0.1"),
    "node-b@host-b": ("host-b", "10.0.0.2"),
    "node-c@host-c": ("host-c", "10.0.0.3"),
}
IDLE = "idle@evil"


@pytest.fixture()
def gangs(service, ui) -> Iterator[SimpleNamespace]:
    """Run ``running`` (nodes a, b: started) and run ``forming`` (node c of 2: queued).
    ``beat()`` refreshes every heartbeat the views read (workers, nodes, the running run),
    so none goes stale however slowly the machine runs the test."""
    from store import db, gang, models, runs

    queue = f"mn-{uuid.uuid4().hex[:8]}"
    spec = ui.full_spec(workers=2, nodes=2)
    claims: list[Any] = []

    def beat() -> None:
        with db.session(service.engine) as s:
            for name, (host, _) in WORKERS.items():
                active = ids.running if name != "node-c@host-c" else None
                runs.record_worker(
                    s, name=name, host=host, gpus="", queues=[queue], active_run_id=active
                )
            runs.record_worker(s, name=IDLE, host=EVIL_HOST, gpus="0,1", queues=["gpu2"])
            for claim in claims:
                assert gang.beat(s, claim)
            runs.heartbeat(s, ids.running)

    def join(name: str) -> Any:
        host, addr = WORKERS[name]
        with db.session(service.engine) as s:
            claim = gang.join(
                s,
                queue=queue,
                worker=name,
                host=host,
                addr=addr,
                rdzv_port=lambda: 29400,
                silent_s=60,
            )
        assert claim is not None
        claims.append(claim)
        return claim

    ids = SimpleNamespace(running=None, forming=None)
    with db.session(service.engine) as s:
        ids.running = runs.create_run(s, name="gang of two", spec=spec).id
    with db.session(service.engine) as s:
        assert runs.record_queue(s, ids.running, queue)
    beat()
    join("node-a@host-a")
    last = join("node-b@host-b")
    with db.session(service.engine) as s:
        assert gang.start(s, last, silent_s=60)
    # Created after the first gang started: the oldest gang still forming is this one.
    with db.session(service.engine) as s:
        ids.forming = runs.create_run(s, name="gang forming", spec=spec).id
    with db.session(service.engine) as s:
        assert runs.record_queue(s, ids.forming, queue)
    join("node-c@host-c")
    beat()
    try:
        yield SimpleNamespace(running=ids.running, forming=ids.forming, queue=queue, beat=beat)
    finally:
        with db.session(service.engine) as s:
            runs.delete_run(s, ids.running)
            runs.delete_run(s, ids.forming)
            for name in [*WORKERS, IDLE]:
                if (row := s.get(models.WorkerBeat, name)) is not None:
                    s.delete(row)


ROWS_JS = """() => Object.fromEntries([...document.querySelectorAll('.workers-view tbody tr')]
    .filter((tr) => tr.dataset.worker)
    .map((tr) => [tr.dataset.worker, [...tr.querySelectorAll('td')].map((td) => {
        const a = td.querySelector('a');
        return td.classList.contains('alive') ? td.textContent.split(' · ')[0]
            : a ? `${td.textContent} -> ${a.getAttribute('href')}` : td.textContent;
    })]))"""


def open_workers(page: Any, ui: Any, gangs: SimpleNamespace) -> dict[str, list[str]]:
    gangs.beat()
    ui.open(page, "#/workers")
    ui.wait_drawn(page, "workers")
    return page.evaluate(ROWS_JS)


def test_workers_view_shows_each_workers_node(page, browser_context, gangs, ui) -> None:
    r, f = gangs.running, gangs.forming
    rows = open_workers(page, ui, gangs)
    mine = [*WORKERS, IDLE]
    # name, host, queues, GPUs, status, training, node
    assert rows["node-a@host-a"] == [
        "node-a@host-a",
        "host-a",
        gangs.queue,
        "none (CPU)",
        "alive",
        f"run {r} -> #/run/{r}",
        f"run {r} · node 0 of 2 · running -> #/run/{r}",
    ]
    assert rows["node-b@host-b"][6] == f"run {r} · node 1 of 2 · running -> #/run/{r}"
    assert rows["node-c@host-c"][5:] == ["", f"run {f} · node 0 of 2 · waiting -> #/run/{f}"]
    assert rows[IDLE][1] == EVIL_HOST and rows[IDLE][3] == "0,1" and rows[IDLE][6] == ""
    assert page.evaluate("window.__xss") is None
    assert page.locator("main img").count() == 0

    # One line per multi-node run holding nodes, every slot of its gang.
    lines = page.locator(".workers-view ul.gangs li")
    assert lines.all_inner_texts() == [
        f"run {r}: node 0 host-a (worker node-a@host-a), node 1 host-b (worker node-b@host-b)",
        f"run {f}: node 0 host-c (worker node-c@host-c)",
    ]
    assert lines.first.locator("a").get_attribute("href") == f"#/run/{r}"
    # Queue lengths: this module's queue with the live workers that serve it.
    queue_row = page.locator(f".queue-lengths tr[data-queue='{gangs.queue}'] td")
    assert queue_row.all_inner_texts()[2] == "3"
    assert page.locator("header nav a.active").inner_text() == "Workers"

    # The link reproduces the view (tests/browser/test_links.py's rule): no state of its own.
    assert page.evaluate("location.hash") == "#/workers"
    pg = browser_context.new_page()
    try:
        pg.goto("/#/workers")
        ui.wait_drawn(pg, "workers")
        # Only this test's workers: the session's real worker may register meanwhile.
        again = pg.evaluate(ROWS_JS)
        assert {k: again.get(k) for k in mine} == {k: rows[k] for k in mine}
    finally:
        pg.close()

    # The node link opens the run.
    page.locator("tr[data-worker='node-b@host-b'] td.node a").click()
    page.wait_for_function("(id) => location.hash === `#/run/${id}`", arg=r)


def test_the_service_light_links_to_the_workers_view(page, ui) -> None:
    ui.open(page, "#/runs")
    ui.wait_drawn(page, "runs")
    page.locator("header #health").click()
    ui.wait_drawn(page, "workers")
    assert page.evaluate("location.hash") == "#/workers"


NODES_JS = """() => [...document.querySelectorAll('.run-view .nodes-section tbody tr')]
    .map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent))"""


def test_run_page_shows_the_nodes_of_a_multi_node_run(page, gangs, ui) -> None:
    gangs.beat()
    ui.open(page, f"#/run/{gangs.running}")
    ui.wait_drawn(page, "run")
    section = page.locator(".run-view .nodes-section")
    section.wait_for()
    assert section.locator("h2").inner_text() == "Nodes"
    rows = page.evaluate(NODES_JS)
    # slot, host, worker, address (slot 0: the rendezvous endpoint), state, last beat, error
    assert [row[:5] for row in rows] == [
        ["0", "host-a", "node-a@host-a", "10.0.0.1:29400", "running"],
        ["1", "host-b", "node-b@host-b", "10.0.0.2", "running"],
    ]
    assert all(row[5].endswith(" s ago") and row[6] == "" for row in rows), rows
    facts = page.locator(".run-view dl.facts:not(.summary)").inner_text()
    assert "2 × 1 process = 2" in facts
    assert page.locator(".run-view .waiting").is_hidden()


def test_a_forming_gang_says_how_many_nodes_it_waits_for(page, gangs, ui) -> None:
    reason = "waiting for 1 of 2 nodes"
    gangs.beat()
    ui.open(page, f"#/run/{gangs.forming}")
    ui.wait_drawn(page, "run")
    waiting = page.locator(".run-view .waiting")
    waiting.wait_for()
    assert waiting.inner_text() == f"Queued — {reason}."
    rows = page.evaluate(NODES_JS)
    assert [row[:5] for row in rows] == [
        ["0", "host-c", "node-c@host-c", "10.0.0.3:29400", "waiting"]
    ]
    assert "1 of 2 nodes joined" in page.locator(".run-view .nodes-note").inner_text()

    ui.open(page, "#/runs")
    page.wait_for_function(
        "([id, text]) => document.querySelector(`tr[data-run-id='${id}'] td:nth-child(4)`)"
        "?.textContent === text",
        arg=[gangs.forming, f"queued — {reason}"],
    )


def test_a_single_node_run_has_no_nodes_section(page, service, ui) -> None:
    from store import db, runs

    run_id = ui.seed_run(service.engine, name="one node", spec=ui.full_spec(), points=False)
    try:
        ui.open(page, f"#/run/{run_id}")
        ui.wait_drawn(page, "run")
        page.locator(".run-view h1").wait_for()
        assert page.locator(".run-view .nodes-section").is_hidden()
        assert "nodes" not in page.locator(".run-view dl.facts:not(.summary) dt").all_inner_texts()
    finally:
        with db.session(service.engine) as s:
            runs.delete_run(s, run_id)
