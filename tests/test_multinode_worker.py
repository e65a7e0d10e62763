"""Multi-node runs end to end on one machine: batchlab workers acting as nodes.

Each worker is a real Celery worker with a ``BATCHLAB_HOME`` of its own (its own run
folders and checkpoints, as on separate machines), all on one PostgreSQL database and one
broker, reaching each other on loopback (``BATCHLAB_NODE_ADDR=127.0.0.1``). A run with
``nodes=2`` gets two tokens; the gang forms through the database, the nodes meet through
torchrun's c10d rendezvous at the endpoint slot 0 published, gloo carries the gradients.

- two 2-node runs on three workers (nproc 1 and 2): no deadlock, one runs while the
  other shows "waiting for 1 of 2 nodes", both finish, and each run's losses equal its
  k virtual workers in one process;
- kill -9 of one node mid-run (the one hosting the rendezvous): the gang fails within
  seconds, the run resumes from its checkpoint on a new gang (the third worker, whose
  folder holds no checkpoint, takes the state from its peer) and finishes with every
  point stored once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_worker import (
    WorkerProcess,
    assert_complete,
    create_run,
    get_run,
    tiny_spec,
    wait_for,
    worker_env,
)

from store import db, gang
from store.models import MetricPoint
from trainer.sink import MemorySink
from trainer.spec import RunSpec
from worker.celery_app import enqueue, make_app

pytestmark = pytest.mark.slow

NODE_ENV = {
    "BATCHLAB_NODE_ADDR": "127.0.0.1",
    "BATCHLAB_GANG_TIMEOUT_S": "30",
    "BATCHLAB_NODE_SILENT_S": "5",
    "BATCHLAB_COLLECTIVE_TIMEOUT_S": "60",
}


class Cluster:
    """Node workers on one database and one broker, each with a home of its own."""

    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.broker_url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
        self.engine = db.get_engine(database_url)
        db.migrate(self.engine)
        self.celery = make_app(self.broker_url)
        self.workers: dict[str, WorkerProcess] = {}

    def start(self, name: str) -> WorkerProcess:
        home = self.tmp_path / name
        home.mkdir(exist_ok=True)
        env = worker_env(home, database_url=self.database_url, broker_url=self.broker_url)
        env.update(NODE_ENV)
        proc = WorkerProcess.celery(env, self.tmp_path / f"{name}.log", name=f"{name}@%h")
        self.workers[name] = proc
        return proc

    def submit(self, spec: RunSpec, name: str) -> int:
        run_id = create_run(self.engine, spec, name=name)
        enqueue(run_id, spec, celery_app=self.celery, engine=self.engine)
        return run_id

    def logs(self) -> str:
        return "\n\n".join(f"== {n}\n{w.log_tail(60)}" for n, w in self.workers.items())

    def stop(self) -> None:
        # kill -9: the workers are idle by now and their shutdown is not under test here
        # (tests/test_worker.py covers it); a warm one costs seconds per worker.
        for proc in self.workers.values():
            proc.kill()
            proc.stop(timeout=1)  # closes its log; the group is gone already


@pytest.fixture()
def cluster(tmp_path: Path, pg_url: str) -> Any:
    c = Cluster(tmp_path, pg_url)
    try:
        yield c
    finally:
        c.stop()


def node_spec(**changes: Any) -> RunSpec:
    return tiny_spec(**{"workers": 2, "nodes": 2, "batch_per_worker": 10, **changes})


def values(engine: sa.Engine, run_id: int, key: str, column: str = "value") -> list[float]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                sa.select(getattr(MetricPoint, column))
                .where(MetricPoint.run_id == run_id, MetricPoint.key == key)
                .order_by(MetricPoint.step)
            )
        )


def gang_rows(engine: sa.Engine, run_id: int) -> list[Any]:
    with db.session(engine) as s:
        return gang.nodes_of(s, [run_id]).get(run_id, [])


def settled_nodes(engine: sa.Engine, run_id: int, timeout: float = 15) -> list[Any]:
    """The run's nodes once none is running: rank 0's node records the outcome first,
    the others mark themselves exited when their torchrun has gone (a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = gang_rows(engine, run_id)
        if all(n.state != "running" for n in nodes) or time.monotonic() > deadline:
            return nodes
        time.sleep(0.1)


def waiting_reasons(engine: sa.Engine, run_ids: list[int]) -> set[str]:
    from server.schemas import runs_out
    from store import runs

    with db.session(engine) as s:
        rows = [runs.get_run(s, r) for r in run_ids]
        return {o.waiting_for for o in runs_out(s, [r for r in rows if r]) if o.waiting_for}


def test_two_gangs_on_three_workers_take_turns_and_match_virtual_workers(
    cluster: Cluster,
) -> None:
    """nodes=2 x nproc=1 (k=2) and nodes=2 x nproc=2 (k=4, four processes): three workers
    for four slots, so one gang waits for the other; each equals its k virtual workers."""
    specs = {
        "first": node_spec(dataset_size=1000, epochs=3),
        "second": node_spec(dataset_size=1000, epochs=3, workers=4, nproc=2),
    }
    ids = {name: cluster.submit(spec, name) for name, spec in specs.items()}
    for name in ("a", "b", "c"):
        cluster.start(name)
    seen: set[str] = set()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        seen |= waiting_reasons(cluster.engine, list(ids.values()))
        statuses = {get_run(cluster.engine, r).status for r in ids.values()}
        if statuses <= {"succeeded", "failed", "cancelled", "diverged"}:
            break
        time.sleep(0.2)
    import trainer

    for name, run_id in ids.items():
        spec = specs[name]
        run = wait_for(cluster.engine, run_id, ("succeeded",), 5, cluster.workers["a"])
        assert run.attempts == 1, run.error
        assert_complete(cluster.engine, run_id, spec)
        nodes = settled_nodes(cluster.engine, run_id)
        assert sorted(n.slot for n in nodes) == [0, 1]
        assert len({n.worker for n in nodes}) == 2  # two workers, one node each
        assert {n.state for n in nodes} == {"exited"}
        assert nodes[0].port and nodes[0].addr == "127.0.0.1"
        processes = spec.nodes * spec.nproc
        assert run.device is not None
        assert run.device.endswith(f"x {processes} processes on 2 nodes"), run.device
        # The same k workers in one process (virtual) give the same updates.
        virtual = MemorySink()
        one = spec.model_copy(update={"nodes": 1, "nproc": 1})
        assert trainer.fit(one, virtual).status == "succeeded"
        assert values(cluster.engine, run_id, "lr") == virtual.series("lr")
        losses = values(cluster.engine, run_id, "loss")
        worst = max(
            abs(a - b) / abs(b) for a, b in zip(losses, virtual.series("loss"), strict=True)
        )
        assert worst < 1e-5, (name, worst)
    # Three workers, four slots: a gang waited while the other ran.
    assert any(r.startswith("waiting for 1 of 2 nodes") for r in seen), (seen, cluster.logs())


def test_kill_9_of_a_node_fails_the_gang_and_it_resumes_on_a_new_one(
    cluster: Cluster,
) -> None:
    spec = node_spec(dataset_size=6000, epochs=4)
    run_id = cluster.submit(spec, "killed")
    for name in ("a", "b"):
        cluster.start(name)
    deadline = time.monotonic() + 180
    while get_run(cluster.engine, run_id).progress < 0.3:  # an epoch's checkpoint written
        assert time.monotonic() < deadline, cluster.logs()
        assert get_run(cluster.engine, run_id).status in ("queued", "running"), cluster.logs()
        time.sleep(0.1)
    early = values(cluster.engine, run_id, "loss", "wall_time")[: spec.iters_per_epoch]
    # Slot 0: the node that hosts the rendezvous store (bench/multinode.py kills slot 1).
    victim = next(n for n in gang_rows(cluster.engine, run_id) if n.slot == 0).worker
    cluster.workers[victim.split("@")[0]].kill()
    killed_at = time.monotonic()
    cluster.start("c")  # the new gang: the survivor and a worker with no checkpoint

    # The survivor fails the gang within seconds (not the reaper's 30 s, nor a hang).
    while get_run(cluster.engine, run_id).attempts < 2:
        assert time.monotonic() - killed_at < 25, cluster.logs()
        time.sleep(0.1)
    run = wait_for(cluster.engine, run_id, ("succeeded", "failed"), 180, cluster.workers["c"])
    assert run.status == "succeeded", (run.error, cluster.logs())
    assert run.attempts == 2
    assert_complete(cluster.engine, run_id, spec)
    # Resumed from the checkpoint: the first epoch's losses are the first attempt's rows.
    assert values(cluster.engine, run_id, "loss", "wall_time")[: spec.iters_per_epoch] == early
    nodes = gang_rows(cluster.engine, run_id)
    assert all(n.attempt == 2 for n in nodes) and victim not in {n.worker for n in nodes}
    with db.session(cluster.engine) as s:
        old = gang.members(s, run_id, 1)
    assert {n.worker for n in old} >= {victim}
