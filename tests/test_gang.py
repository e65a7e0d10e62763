"""store.gang: node claims of multi-node runs, on SQLite and PostgreSQL.

The rules under test: tokens fill the oldest gang of a queue first (so two runs never
each hold part of the workers), a gang starts once every slot is held, a gang that did
not fill is released and not joined again before its retry time, a lost node fails the
attempt (re-queued, then failed with the reason), and every change is a compare-and-set.
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from core.status import RunStatus
from store import db, gang, runs
from store.models import Run, RunNode, utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> sa.Engine:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    engine = db.get_engine(url)
    db.migrate(engine)
    return engine


def spec(nodes: int) -> dict[str, Any]:
    return {"model": "mlp", "dataset": "synthetic", "workers": 2 * nodes, "nodes": nodes}


def new_run(engine: sa.Engine, nodes: int, queue: str = "cpu") -> int:
    with db.session(engine) as s:
        run_id = runs.create_run(s, name=f"n{nodes}", spec=spec(nodes)).id
        runs.record_queue(s, run_id, queue)
        return run_id


def join(engine: sa.Engine, worker: str, queue: str = "cpu", **kw: Any) -> gang.NodeClaim | None:
    with db.session(engine) as s:
        return gang.join(
            s,
            queue=queue,
            worker=worker,
            host=f"host-{worker}",
            addr="127.0.0.1",
            rdzv_port=lambda: 29400,
            silent_s=kw.pop("silent_s", 15.0),
            **kw,
        )


def run_row(engine: sa.Engine, run_id: int) -> Run:
    with db.session(engine) as s:
        run = runs.get_run(s, run_id)
        assert run is not None
        return run


def test_nodes_column_follows_the_spec(engine: sa.Engine) -> None:
    assert run_row(engine, new_run(engine, 3)).nodes == 3
    assert run_row(engine, new_run(engine, 1)).nodes == 1


def test_tokens_fill_the_oldest_gang_first_then_it_starts(engine: sa.Engine) -> None:
    older, younger = new_run(engine, 2), new_run(engine, 2)
    a = join(engine, "a")
    b = join(engine, "b")  # a token of the younger run would still fill the older gang
    assert a is not None and b is not None
    assert (a.run_id, a.slot, a.attempt) == (older, 0, 1)
    assert (b.run_id, b.slot) == (older, 1)
    with db.session(engine) as s:
        rows = gang.members(s, older, 1)
        assert [r.port for r in rows] == [29400, None]  # slot 0 publishes the endpoint
        assert gang.start(s, b, silent_s=15)
        assert not gang.start(s, a, silent_s=15)  # one member wins
        assert gang.started(s, a) and gang.started(s, b)
    run = run_row(engine, older)
    assert (run.status, run.attempts, run.worker, run.host) == ("running", 1, "a", "host-a")
    with db.session(engine) as s:  # the workers view: b trains it too, as node 1
        assert gang.training_run_of(s, "b") == older and gang.training_run_of(s, "z") is None
    c = join(engine, "c")
    assert c is not None and c.run_id == younger  # the next gang fills only now
    with db.session(engine) as s:
        assert not gang.start(s, c, silent_s=15)  # one of two slots held
        held = gang.held(s, silent_s=15)
        assert {w: (r.run_id, r.state) for w, r in held.items()} == {
            "a": (older, "running"),
            "b": (older, "running"),
            "c": (younger, "waiting"),
        }
        reason = gang.waiting_reason(run_row(engine, younger), gang.nodes_of(s, [younger])[younger])
    assert reason == "waiting for 1 of 2 nodes"
    with db.session(engine) as s:
        short = gang.waiting_reason(run_row(engine, younger), [], live_workers=1)
    assert short == "waiting for 2 of 2 nodes (only 1 live worker serves queue cpu)"


def test_a_gang_too_big_for_the_live_workers_is_not_joined(engine: sa.Engine) -> None:
    """One worker on the queue and a 2-node run: the worker must stay free for others."""
    run_id = new_run(engine, 2)
    assert join(engine, "a", live_workers=1) is None
    with db.session(engine) as s:
        assert gang.next_chance(s, "cpu", live_workers=1, now=utcnow()) == (run_id, float("inf"))
        assert gang.next_chance(s, "cpu", live_workers=2, now=utcnow()) is None
    claim = join(engine, "a", live_workers=2)
    assert claim is not None and claim.run_id == run_id


def test_a_gang_ignores_other_queues_and_single_node_runs(engine: sa.Engine) -> None:
    new_run(engine, 1)
    gpu_gang = new_run(engine, 2, queue="gpu")
    assert join(engine, "a", queue="cpu") is None
    claim = join(engine, "a", queue="gpu")
    assert claim is not None and claim.run_id == gpu_gang


def test_silent_waiting_claims_are_pruned(engine: sa.Engine) -> None:
    run_id = new_run(engine, 2)
    dead = join(engine, "dead")
    assert dead is not None
    with db.session(engine) as s:
        s.execute(sa.update(RunNode).values(beat_at=utcnow() - timedelta(seconds=60)))
    alive = join(engine, "alive")
    assert alive is not None and alive.slot == 0  # the dead worker's slot is free again
    with db.session(engine) as s:
        assert not gang.beat(s, dead)  # the dead worker, were it back, finds its row gone
        assert [r.worker for r in gang.members(s, run_id, 1)] == ["alive"]


def test_release_frees_the_workers_until_the_retry_time(engine: sa.Engine) -> None:
    big, small = new_run(engine, 3), new_run(engine, 2)
    a, b = join(engine, "a"), join(engine, "b")
    assert a is not None and b is not None and a.run_id == big
    retry_at = utcnow() + timedelta(seconds=30)
    with db.session(engine) as s:
        assert gang.release(s, a, retry_at=retry_at) == 2
        assert gang.release(s, b, retry_at=retry_at) is None  # once
        assert not gang.beat(s, b)
        assert not gang.start(s, a, silent_s=15)
        run = runs.get_run(s, big)
        assert run is not None
        assert "trying again in" in (gang.waiting_reason(run, []) or "")
        run_id, wait_s = gang.next_chance(s, "cpu", live_workers=5, now=utcnow()) or (0, 0)
        assert run_id == big and 25 < wait_s <= 30
    # Meanwhile the younger gang gets the workers.
    a2, b2 = join(engine, "a"), join(engine, "b")
    assert a2 is not None and b2 is not None and {a2.run_id, b2.run_id} == {small}
    with db.session(engine) as s:
        assert gang.start(s, a2, silent_s=15)
        # Past the retry time the released gang is joined again.
        later = retry_at + timedelta(seconds=1)
        assert [r.id for r in gang._forming_runs(s, "cpu", later)] == [big]


def test_a_lost_node_requeues_then_fails_the_run(engine: sa.Engine) -> None:
    run_id = new_run(engine, 2)
    first = [join(engine, w) for w in ("a", "b")]
    assert all(first)
    with db.session(engine) as s:
        assert gang.start(s, first[0], silent_s=15)  # type: ignore[arg-type]
        s.execute(
            sa.update(RunNode)
            .where(RunNode.worker == "b")
            .values(beat_at=utcnow() - timedelta(seconds=60))
        )
        # A peer whose torchrun failed counts as lost only when asked (the watch, after a
        # grace); after this node's own failure only silence does (see worker/multinode.py).
        s.execute(
            sa.update(RunNode)
            .where(RunNode.worker == "a")
            .values(state="failed", beat_at=utcnow() - timedelta(seconds=20))
        )
        assert gang.lost_peer(s, first[1], silent_s=15) is None  # type: ignore[arg-type]
        failed = gang.lost_peer(s, first[1], silent_s=15, failed_for_s=10)  # type: ignore[arg-type]
        assert failed is not None and failed.worker == "a"
        lost = gang.lost_peer(s, first[0], silent_s=15)  # type: ignore[arg-type]
        assert lost is not None and gang.describe(lost) == "node 1 (host-b)"
        assert gang.fail(s, first[0], reason="node 1 (host-b) went silent", max_attempts=2) == (
            RunStatus.QUEUED
        )
        # A second member finds it settled.
        assert gang.fail(s, first[1], reason="x", max_attempts=2) is None  # type: ignore[arg-type]
    assert run_row(engine, run_id).status == "queued"
    second = [join(engine, w) for w in ("c", "a")]
    assert [c.attempt for c in second if c] == [2, 2]
    with db.session(engine) as s:
        assert gang.start(s, second[0], silent_s=15)  # type: ignore[arg-type]
        # The run page shows the new attempt's nodes, the old rows kept for the record.
        assert [r.worker for r in gang.nodes_of(s, [run_id])[run_id]] == ["c", "a"]
        assert gang.fail(s, second[1], reason="node 0 (host-c) failed", max_attempts=2) == (
            RunStatus.FAILED
        )
    run = run_row(engine, run_id)
    assert run.status == "failed"
    assert run.error == "node 0 (host-c) failed; gave up after 2 attempts"


def test_rank_0_outcome_wins_over_a_late_gang_failure(engine: sa.Engine) -> None:
    run_id = new_run(engine, 2)
    a, b = join(engine, "a"), join(engine, "b")
    assert a is not None and b is not None
    with db.session(engine) as s:
        assert gang.start(s, a, silent_s=15)
        assert runs.mark_finished(s, run_id, RunStatus.SUCCEEDED, attempt=1)
        assert gang.fail(s, b, reason="late", max_attempts=2) is None
    assert run_row(engine, run_id).status == "succeeded"


def test_delete_run_removes_its_nodes(engine: sa.Engine) -> None:
    run_id = new_run(engine, 2)
    assert join(engine, "a") is not None
    with db.session(engine) as s:
        assert runs.delete_run(s, run_id)
    with db.session(engine) as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(RunNode)) == 0


# --- the worker's side of a token (worker/multinode.py), in this process ----------------


class Sent:
    """Stands in for worker.celery_app.enqueue: records the tokens sent again."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, Any]]] = []

    def __call__(self, run_id: int, spec_or_queue: Any, **options: Any) -> str:
        self.calls.append((run_id, options))
        return "task"


@pytest.fixture()
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    from worker import multinode

    recorder = Sent()
    monkeypatch.setattr(multinode, "enqueue", recorder)
    monkeypatch.setattr(multinode, "send_tokens", recorder)
    return recorder


def test_a_gang_not_full_in_time_is_released_and_its_tokens_come_back(
    sqlite_url: str, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings
    from worker import multinode

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    run_id = new_run(engine, 3)
    a, b = join(engine, "a"), join(engine, "b")
    assert a is not None and b is not None
    settings = get_settings().override(gang_timeout_s=0.3)
    assert multinode._wait_for_gang(engine, a, settings) is False
    assert len(sent.calls) == 1
    token_run, options = sent.calls[0]
    assert token_run == run_id and options["copies"] == 2  # both claims' tokens, at once
    with db.session(engine) as s:
        retry_at = runs.get_run(s, run_id).gang_retry_at  # type: ignore[union-attr]
    assert retry_at is not None
    assert 0.1 <= (retry_at - utcnow()).total_seconds() <= 0.15 + multinode.RETRY_JITTER_S
    with db.session(engine) as s:
        assert not gang.beat(s, b)  # the other member finds its claim gone and acks
        run = runs.get_run(s, run_id)
        assert run is not None and run.status == "queued"
        assert "did not fill in time" in (gang.waiting_reason(run, []) or "")
    # A token that arrives meanwhile goes back to the queue after a pause (no countdown
    # message: this worker would hold it); once no gang needs it: dropped.
    monkeypatch.setattr(multinode, "RECHECK_S", 0.01)
    assert multinode.execute(engine, run_id, worker="c") == "deferred"
    assert sent.calls[1] == (run_id, {})
    with db.session(engine) as s:
        s.execute(sa.update(Run).values(status="cancelled"))
    assert multinode.execute(engine, run_id, worker="c") == "skipped"


def test_a_waiting_node_lets_go_when_the_run_is_cancelled(sqlite_url: str, sent: Sent) -> None:
    from core.settings import get_settings
    from worker import multinode

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    run_id = new_run(engine, 2)
    a = join(engine, "a")
    assert a is not None
    with db.session(engine) as s:
        assert runs.request_cancel(s, run_id) is not None
    assert multinode._wait_for_gang(engine, a, get_settings()) is False
    with db.session(engine) as s:
        assert gang.members(s, run_id, 1) == []
    assert sent.calls == []


def test_node_address_and_rendezvous_command() -> None:
    from worker.multinode import local_address, node_command

    assert local_address("sqlite:////tmp/x.db") == "127.0.0.1"
    assert local_address("postgresql+psycopg://u@127.0.0.1:5432/db") == "127.0.0.1"
    # A remote database: the address of the interface on the route to it (an IPv4 address).
    ipaddress.IPv4Address(local_address("postgresql+psycopg://u@192.0.2.10:5432/db"))
    from trainer.spec import RunSpec

    two = RunSpec.model_validate(spec(2) | {"workers": 4, "nproc": 2})
    claim = gang.NodeClaim(run_id=7, attempt=3, slot=1, nodes=2, worker="w")
    cmd = node_command(7, two, claim, "10.0.0.1:29400", "10.0.0.2")
    text = " ".join(cmd)
    assert "--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d" in text
    assert "--rdzv-endpoint 10.0.0.1:29400 --rdzv-id run-7-3" in text
    assert "--rdzv-conf is_host=0 --local-addr 10.0.0.2 --max-restarts 0" in text
    assert cmd[-3:] == ["-m", "worker.ddp_entry", "7"]


def test_batchlab_worker_node_addr_reaches_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from batchlab import cmd_worker
    from batchlab.cli import build_parser
    from worker import launch

    seen: dict[str, str | None] = {}

    class FakeSupervisor:
        def __init__(self, plans: Any, **_: Any) -> None:
            seen["addr"] = os.environ.get("BATCHLAB_NODE_ADDR")

        def run(self) -> int:
            return 0

    monkeypatch.setattr(launch, "Supervisor", FakeSupervisor)
    monkeypatch.delenv("BATCHLAB_NODE_ADDR", raising=False)
    monkeypatch.setenv("BATCHLAB_BROKER_URL", "memory://")
    args = build_parser().parse_args(["worker", "--gpus", "none", "--node-addr", "10.0.0.5"])
    try:
        assert cmd_worker.run(args) == 0
    finally:
        os.environ.pop("BATCHLAB_NODE_ADDR", None)
    assert seen["addr"] == "10.0.0.5"


def test_members_starting_a_gang_at_once_never_deadlock(pg_url: str) -> None:
    """Every member beats and tries to start the gang twice a second. On PostgreSQL two
    of them at once once deadlocked (each held its own row and wanted the other's), and a
    member whose start waited on the winner's lock then saw the run "not queued" and
    walked away. Five rounds of four members released together: all see the gang start."""
    import threading

    from core.settings import get_settings
    from worker import multinode

    engine = db.get_engine(pg_url)
    db.migrate(engine)
    settings = get_settings()
    for _ in range(5):
        run_id = new_run(engine, 4)
        claims = [join(engine, f"w{i}") for i in range(4)]
        assert all(c is not None and c.run_id == run_id for c in claims)
        barrier = threading.Barrier(4)
        results: list[object] = []

        def member(
            claim: gang.NodeClaim, barrier: threading.Barrier, results: list[object]
        ) -> None:
            barrier.wait()
            try:
                results.append(multinode._wait_for_gang(engine, claim, settings))
            except Exception as exc:  # a deadlock surfaces here
                results.append(exc)

        threads = [threading.Thread(target=member, args=(c, barrier, results)) for c in claims]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results == [True] * 4, results
        assert run_row(engine, run_id).status == "running"


def test_a_multi_node_run_is_sent_as_one_token_per_node(sqlite_url: str) -> None:
    """Submit, the reaper and the reconciler all send through enqueue: N messages."""
    from trainer.spec import RunSpec
    from worker.celery_app import enqueue

    class Broker:
        def __init__(self) -> None:
            self.sent: list[tuple[int, str]] = []
            self.conf = type("Conf", (), {"broker_url": "memory://"})()

        def send_task(self, name: str, *, args: list[int], queue: str) -> Any:
            self.sent.append((args[0], queue))
            return type("Result", (), {"id": f"t{len(self.sent)}"})()

    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    run_id = new_run(engine, 3)
    broker = Broker()
    three = RunSpec.model_validate(spec(3) | {"device": "cpu"})
    assert enqueue(run_id, three, celery_app=broker, engine=engine) == "t1"  # type: ignore[arg-type]
    assert broker.sent == [(run_id, "cpu")] * 3
    assert run_row(engine, run_id).queue == "cpu"


def test_a_token_met_by_a_database_outage_is_retried_not_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import multinode
    from worker.tasks import ClaimFailed

    def down(*_: Any) -> Any:
        raise sa.exc.OperationalError("SELECT 1", {}, ConnectionError("server closed"))

    monkeypatch.setattr(multinode, "_join", down)
    with pytest.raises(ClaimFailed, match="server closed"):
        multinode.execute(None, 1, worker="w")  # type: ignore[arg-type]
