"""Live streams share one database read per run (server.hub), and their number is capped.

Issue 10 point 11: 50 SSE clients made ~8 reads/s each and starved the training. These
tests pin that readers' database cost does not grow with their number, that a stream
joining late misses and repeats nothing, that the poller stops with its last subscriber,
and that streams past BATCHLAB_MAX_STREAMS answer 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import run_async

from server import sse
from server.app import create_app
from server.hub import HubRegistry, Subscription
from server.serve import serve_in_thread
from server.sse_client import iter_events
from store import db, metrics, runs


@pytest.fixture()
def app(batchlab_home, sqlite_url, tmp_path) -> Iterator[Any]:
    application = create_app(
        database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    )
    db.migrate(application.state.ctx.engine)
    yield application
    application.state.ctx.engine.dispose()


def running_run(app: Any) -> int:
    with db.session(app.state.ctx.engine) as s:
        run_id = runs.create_run(s, name="live", spec={"model": "mlp"}).id
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")
    return run_id


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.02)


def subscribers(app: Any, run_id: int) -> int:
    hub = app.state.hubs.hubs.get(run_id)
    return 0 if hub is None else len(hub.subscribers)


class Follower(threading.Thread):
    """One SSE client: every event it receives, until the stream ends."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers or {}
        self.events: list[tuple[str, Any]] = []

    def run(self) -> None:
        with httpx.stream("GET", self.url, headers=self.headers, timeout=30) as r:
            for ev in iter_events(r.iter_lines()):
                self.events.append((ev.event, ev.json()))

    def steps(self, key: str) -> list[int]:
        return [
            p["step"]
            for k, d in self.events
            if k == "points"
            for p in d["points"]
            if p["key"] == key
        ]


@pytest.mark.slow
def test_readers_database_cost_does_not_grow_with_their_number(app, monkeypatch):
    calls = {"read_since": 0, "load_run": 0}
    real_read, real_load = metrics.read_since, sse.RunStream.load_run

    def read_since(*args: Any, **kwargs: Any) -> Any:
        calls["read_since"] += 1
        return real_read(*args, **kwargs)

    def load_run(self: sse.RunStream) -> Any:
        calls["load_run"] += 1
        return real_load(self)

    monkeypatch.setattr(sse.store_metrics, "read_since", read_since)
    monkeypatch.setattr(sse.RunStream, "load_run", load_run)
    run_id = running_run(app)
    metrics.write_points(app.state.ctx.engine, run_id, [(0, {"loss": 1.0, "lr": 0.1}, 0.0, 0.0)])

    def reads_during(seconds: float) -> int:
        before = sum(calls.values())
        time.sleep(seconds)
        return sum(calls.values()) - before

    with serve_in_thread(app) as url:
        stream_url = f"{url}/api/runs/{run_id}/stream"
        clients = [Follower(stream_url)]
        clients[0].start()
        wait_for(lambda: subscribers(app, run_id) == 1)
        one = reads_during(1.5)
        clients += [Follower(stream_url) for _ in range(19)]
        for c in clients[1:]:
            c.start()
        wait_for(lambda: subscribers(app, run_id) == 20)
        time.sleep(0.3)  # the last joiners' own catch-up reads are done
        twenty = reads_during(1.5)
        with db.session(app.state.ctx.engine) as s:
            runs.mark_finished(s, run_id, "succeeded")
        for c in clients:
            c.join(15)
    # 4 polls/s of one status and one points read each: ~12 either way (before the hub,
    # 20 streams read 20 times as much).
    assert one >= 6
    assert abs(twenty - one) <= 4, (one, twenty)
    for c in clients:
        assert c.steps("loss") == [0] and c.events[-1][1]["status"] == "succeeded"
    assert app.state.hubs.hubs == {} and app.state.hubs.streams == 0


@pytest.mark.slow
def test_a_late_joiner_catches_up_then_shares_the_hub(app):
    engine = app.state.ctx.engine
    run_id = running_run(app)
    with serve_in_thread(app) as url:
        stream_url = f"{url}/api/runs/{run_id}/stream"
        early = Follower(stream_url)
        early.start()
        wait_for(lambda: subscribers(app, run_id) == 1)
        with metrics.MetricWriter(engine, run_id) as writer:
            for step in range(20):
                writer.add(step, {"loss": 1.0 / (step + 1)}, epoch=step / 10, wall_time=step)
            writer.flush()
            wait_for(lambda: len(early.steps("loss")) == 20)
            # Joins late, resuming after step 4 of loss (what EventSource sends).
            late = Follower(stream_url, headers={"Last-Event-ID": "loss:4"})
            late.start()
            wait_for(lambda: subscribers(app, run_id) == 2)
            assert len(app.state.hubs.hubs) == 1  # one poller for both
            for step in range(20, 40):
                writer.add(step, {"loss": 1.0 / (step + 1)}, epoch=step / 10, wall_time=step)
                if step == 29:
                    writer.add(step, {"val_err": 0.5}, epoch=3.0, wall_time=step)
                time.sleep(0.01)
        with db.session(engine) as s:
            runs.mark_finished(s, run_id, "succeeded")
        early.join(15)
        late.join(15)
    assert early.steps("loss") == list(range(40))  # each point once, in order
    assert late.steps("loss") == list(range(5, 40))
    assert early.steps("val_err") == late.steps("val_err") == [29]
    for c in (early, late):
        assert c.events[0][0] == "status" and c.events[-1][1]["status"] == "succeeded"
    assert app.state.hubs.hubs == {} and app.state.hubs.streams == 0


@pytest.mark.slow
def test_streams_past_the_cap_answer_503_with_retry_after(batchlab_home, tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHLAB_MAX_STREAMS", "2")
    app = create_app(
        database_url=f"sqlite:///{tmp_path / 'capped.db'}",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
    )
    db.migrate(app.state.ctx.engine)
    run_id = running_run(app)
    with serve_in_thread(app) as url, httpx.Client(timeout=10) as client:
        stream_url = f"{url}/api/runs/{run_id}/stream"

        alive = []  # the event iterators: one dropped closes its response

        def open_stream() -> Any:
            r = client.send(client.build_request("GET", stream_url), stream=True)
            if r.status_code == 200:
                alive.append(iter_events(r.iter_lines()))
                assert next(alive[-1]).event == "status"
            return r

        first, second = open_stream(), open_stream()
        assert first.status_code == second.status_code == 200
        assert app.state.hubs.streams == 2
        refused = open_stream()
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == str(sse.RETRY_AFTER_S)
        assert "BATCHLAB_MAX_STREAMS" in refused.read().decode()
        assert client.get(f"{url}/api/runs/{run_id}").status_code == 200  # the rest works
        first.close()  # its slot comes back once the server sees the disconnect
        wait_for(lambda: app.state.hubs.streams == 1)
        third = open_stream()
        assert third.status_code == 200
        third.close()
        second.close()
        wait_for(lambda: app.state.hubs.streams == 0)
    app.state.ctx.engine.dispose()


# --- the hub alone, with a reader that counts its calls -----------------------------------
class CountingReader:
    def __init__(self) -> None:
        self.loads = self.reads = 0
        self.status = "running"

    def load_run(self) -> dict[str, Any]:
        self.loads += 1
        return {"status": self.status}

    def read_points(self) -> tuple[list[dict[str, Any]], bool]:
        self.reads += 1
        return [{"key": "loss", "step": self.reads, "value": 1.0}], False


def test_hub_reads_once_per_poll_whatever_the_number_of_subscribers() -> None:
    async def reads_with(n: int) -> tuple[int, list[int]]:
        reader = CountingReader()
        hubs = HubRegistry(max_streams=0, poll_s=0.01)
        subs = [hubs.subscribe(7, lambda: reader) for _ in range(n)]
        await asyncio.sleep(0.2)
        reader.status = "succeeded"
        await asyncio.sleep(0.05)
        assert hubs.hubs == {}  # a final status ends the hub
        return reader.reads, [s.queue.qsize() for s in subs]

    one, (queued_one,) = run_async(reads_with(1))
    twenty, queued = run_async(reads_with(20))
    assert abs(twenty - one) <= 3, (one, twenty)
    assert len(set(queued)) == 1  # every subscriber got every message


def test_the_poller_stops_when_the_last_subscriber_leaves() -> None:
    async def scenario() -> None:
        reader = CountingReader()
        hubs = HubRegistry(max_streams=0, poll_s=0.01)
        a = hubs.subscribe(7, lambda: reader)
        b = hubs.subscribe(7, lambda: reader)
        hub = hubs.hubs[7]
        await asyncio.sleep(0.05)
        hubs.unsubscribe(7, a)
        assert hubs.hubs == {7: hub}
        hubs.unsubscribe(7, b)
        assert hubs.hubs == {}
        await asyncio.sleep(0.02)
        assert hub._task is not None and hub._task.done()
        reads = reader.reads
        await asyncio.sleep(0.05)
        assert reader.reads == reads  # no more polls

    run_async(scenario())


def test_a_subscriber_that_stops_reading_is_told_to_resync() -> None:
    async def scenario() -> None:
        sub = Subscription(maxsize=3)
        assert all(sub.offer(("points", [i])) for i in range(3))
        assert not sub.offer(("points", [3]))
        assert sub.queue.qsize() == 1 and sub.queue.get_nowait() == ("resync", None)

    run_async(scenario())


def test_max_streams_setting() -> None:
    from core.settings import Settings

    assert Settings.from_env({}).max_streams == 200
    assert Settings.from_env({"BATCHLAB_MAX_STREAMS": "5"}).max_streams == 5


# --- the pollers' answers (server.readcache) ----------------------------------------------
def test_polled_answers_are_shared_for_a_moment_and_voided_by_writes(app, monkeypatch):
    from fastapi.testclient import TestClient

    from server import readcache, routes_runs

    reads = []
    real = routes_runs.store_runs.get_run

    def get_run(s: Any, run_id: int) -> Any:
        reads.append(run_id)
        return real(s, run_id)

    monkeypatch.setattr(routes_runs.store_runs, "get_run", get_run)
    run_id = running_run(app)
    with TestClient(app) as client:
        gz = {"Accept-Encoding": "gzip"}
        answers = [client.get(f"/api/runs/{run_id}", headers=gz) for _ in range(20)]
        # Read afresh until the path is busy, then shared: 4 reads served 20 pollers.
        assert len(reads) == readcache.SHARE_AFTER
        assert {a.content for a in answers} == {answers[0].content}
        assert answers[-1].json()["status"] == "running"
        assert client.get("/api/runs").json()[0]["id"] == run_id
        # A write through the API is seen by the next read, not TTL_S later.
        assert client.post(f"/api/runs/{run_id}/cancel").status_code == 200
        assert client.get(f"/api/runs/{run_id}").json()["cancel_requested"] is True
        assert len(reads) == readcache.SHARE_AFTER + 1  # read again after the write
        # Changes made elsewhere (a worker) show within TTL_S.
        with db.session(app.state.ctx.engine) as s:
            runs.mark_finished(s, run_id, "cancelled")
        time.sleep(readcache.TTL_S + 0.05)
        assert client.get(f"/api/runs/{run_id}").json()["status"] == "cancelled"
        assert client.get("/api/runs/999999").status_code == 404  # not kept


# --- priority: the API yields the CPU to the worker ---------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_up_runs_the_api_nicer_than_its_worker(tmp_path):
    from batchlab.cmd_up import API_NICE
    from tests.test_up import start_up, stop, wait_healthy

    def nice(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

    home = tmp_path / "home"
    home.mkdir()
    proc, log, port = start_up(home, "--gpus", "none")
    try:
        wait_healthy(proc, log, port)
        match = re.search(r"worker\s+pid (\d+)", log.read_text())
        assert match, log.read_text()
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert nice(proc.pid) == min(19, base + API_NICE)
        assert nice(int(match.group(1))) == base
    finally:
        stop(proc, log)


@pytest.mark.slow
def test_streams_share_each_read_and_progress_alone_is_sent_once_a_second(app):
    """Three streams of a run whose points and progress move every 50 ms: each gets every
    step once, in order (the shared fast path, server.hub.Points.start/end), progress-only
    status events at most about once a second, and the final status at once."""
    run_id = running_run(app)
    engine = app.state.ctx.engine
    metrics.write_points(engine, run_id, [(0, {"loss": 1.0}, 0.0, 0.0)])
    steps = 60
    with serve_in_thread(app) as url:
        clients = [Follower(f"{url}/api/runs/{run_id}/stream?since=0") for _ in range(3)]
        for c in clients:
            c.start()
        wait_for(lambda: subscribers(app, run_id) == 3)
        t0 = time.monotonic()
        for step in range(1, steps + 1):
            metrics.write_points(engine, run_id, [(step, {"loss": 1.0 / step}, 0.0, 0.0)])
            with db.session(engine) as s:
                runs.set_progress(s, run_id, step / steps, None)
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        time.sleep(0.6)  # the last points reach every stream
        with db.session(engine) as s:
            runs.mark_finished(s, run_id, "succeeded")
        for c in clients:
            c.join(15)
    for c in clients:
        assert c.steps("loss") == list(range(1, steps + 1))
        statuses = [d for k, d in c.events if k == "status"]
        # connect, about one per second of progress, the final one
        assert 3 <= len(statuses) <= 2 + math.ceil(elapsed) + 1, (len(statuses), elapsed)
        assert statuses[-1]["status"] == "succeeded"
