"""One node of a multi-node run (``spec.nodes > 1``): join a gang, meet the other nodes
through torchrun's c10d rendezvous, train, and fail the whole gang when a node is lost.

A run with ``nodes = N`` sends N messages; each is a token for one node (``store.gang``
explains why a token joins the *oldest* gang of its queue that needs nodes). The life of
one token on a worker:

1. join: a slot in a gang (slot 0 publishes ``addr:port``, the rendezvous endpoint), or
   no gang needs a node: the token is dropped, or sent again for the time a released gang
   may be joined again.
2. wait until the N slots are held (``store.gang.start`` makes the run ``running``, attempt
   a), beating the claim; past ``BATCHLAB_GANG_TIMEOUT_S`` the gang is released (claims
   deleted, the reason on the run) and its tokens come back later.
3. train: ``torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint
   HOST:PORT --rdzv-id run-ID-a`` (slot 0 hosts the rendezvous store), ``worker.ddp_entry``
   in each process: gloo on CPUs, NCCL on GPUs; the global rank 0 (on whichever node)
   writes metrics, and its node records the final status.
4. watch: every node beats its row; a node that failed or fell silent for
   ``BATCHLAB_NODE_SILENT_S`` makes its peers stop their torchrun and ``store.gang.fail``
   the attempt: re-queued (N new tokens; it resumes from the newest checkpoint any node of
   the new gang holds, trainer/loop.py) or failed with the reason after the attempts
   allowed. The collective timeout (``BATCHLAB_COLLECTIVE_TIMEOUT_S``) is the backstop for
   a rank blocked in a collective.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Engine

from core.errors import format_validation_error
from core.settings import Settings, get_settings, training_threads
from core.status import RunStatus
from store import db, gang, runs
from store.models import RunNode, utcnow
from store.runs import run_dir
from trainer.spec import RunSpec
from worker import auto_sweep
from worker.celery_app import CPU_QUEUE, WORKER_STALE_S, enqueue, send_tokens
from worker.recovery import MAX_ATTEMPTS
from worker.runlog import RunLogWriter

if TYPE_CHECKING:
    from worker.tasks import TorchrunEnd

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.5
WATCH_BEAT_S = 1.0
# While training, a peer whose torchrun failed this long ago (and whose ranks' failure
# did not end this node's) stops this node: its ranks may wait in a collective. Long
# enough for rank 0 to record an error raised on every rank as the run's own outcome.
FAILED_PEER_S = 10.0
# A token for a gang that cannot be joined yet (released, or too few live workers) goes
# back to the queue after this pause: the worker is free for other runs in between.
RECHECK_S = 2.0
# After a release the gang is not joined again for this long (plus jitter): other runs of
# the queue get the workers meanwhile.
RETRY_JITTER_S = 5.0


def execute(engine: Engine, run_id: int, *, worker: str) -> str:
    """Serve one token of run ``run_id``'s queue: what became of it. A database that
    cannot be asked before the token is used raises ``ClaimFailed`` (the task retries)."""
    from worker.tasks import ClaimFailed, error_text

    try:
        claim, queue, live = _join(engine, run_id, worker)
    except sa.exc.DBAPIError as exc:
        raise ClaimFailed(error_text(exc)) from exc
    if claim is None:
        return _defer(engine, queue, live) if queue is not None else "skipped"
    log.info("run %s: node slot %s of %s (attempt %s)", claim.run_id, claim.slot, claim.nodes,
             claim.attempt)  # fmt: skip
    settings = get_settings()
    if not _wait_for_gang(engine, claim, settings):
        return "released"
    return _train(engine, claim, worker, settings)


def _join(
    engine: Engine, run_id: int, worker: str
) -> tuple[gang.NodeClaim | None, str | None, int]:
    """A slot in the oldest gang of the token's queue (None: none may be joined now), the
    queue (None: the token's run is gone) and how many live workers serve it."""
    settings = get_settings()
    with db.session(engine) as s:
        run = runs.get_run(s, run_id)
        if run is None:
            return None, None, 0
        queue = run.queue or CPU_QUEUE
    addr = settings.node_addr or local_address(settings.database_url)
    with db.session(engine) as s:
        # This worker counts itself: it beats the workers table from its start.
        live = runs.live_workers_per_queue(s, seen_within_s=WORKER_STALE_S).get(queue, 1)
        claim = gang.join(
            s,
            queue=queue,
            worker=worker,
            host=socket.gethostname(),
            addr=addr,
            rdzv_port=lambda: settings.rdzv_port or free_port(addr),
            silent_s=settings.node_silent_s,
            live_workers=live,
        )
    return claim, queue, live


def _defer(engine: Engine, queue: str, live_workers: int) -> str:
    """No gang may be joined now. If one waits (out its retry time after a release, or
    for more live workers than the queue has), the token goes back to the queue after a
    short pause (any free worker may take it then; a countdown message would be held by
    this worker and could not reach another); otherwise no gang needs it: dropped."""
    with db.session(engine) as s:
        chance = gang.next_chance(s, queue, live_workers=live_workers, now=utcnow())
    if chance is None:
        return "skipped"
    run_id, wait_s = chance
    time.sleep(min(max(0.0, wait_s), RECHECK_S))
    send_tokens(run_id, queue)
    return "deferred"


def _wait_for_gang(engine: Engine, claim: gang.NodeClaim, settings: Settings) -> bool:
    """Beat the claim until the gang starts (True), or it is released or the run leaves
    the queue (cancelled, deleted): False. A warm shutdown of the worker waits for this
    like for a run, at most ``BATCHLAB_GANG_TIMEOUT_S``."""
    while True:
        with db.session(engine) as s:  # a transaction of its own: it locks only this row
            if not gang.beat(s, claim):
                return False  # released by another member, or pruned as silent
        with db.session(engine) as s:
            # start waits on the run row while another member starts the gang: ask
            # started after it, or this member would see "not queued" and walk away.
            if gang.start(s, claim, silent_s=settings.node_silent_s) or gang.started(s, claim):
                return True
            run = runs.get_run(s, claim.run_id)
            if run is None or run.status != RunStatus.QUEUED:
                gang.leave(s, claim)
                return False
            first = min(r.joined_at for r in gang.members(s, claim.run_id, claim.attempt))
            now = utcnow()
            if (now - first).total_seconds() > settings.gang_timeout_s:
                delay = settings.gang_timeout_s / 2 + random.uniform(0, RETRY_JITTER_S)
                released = gang.release(s, claim, retry_at=now + timedelta(seconds=delay))
                queue = run.queue or CPU_QUEUE
                break
        time.sleep(WAIT_POLL_S)
    if released:  # this member released the gang: its tokens go back to the queue
        log.info("run %s: gang not full in %.0f s; released %s claims",
                 claim.run_id, settings.gang_timeout_s, released)  # fmt: skip
        try:
            send_tokens(claim.run_id, queue, copies=released)
        except Exception:  # the reconciler re-sends a queued run's lost messages
            log.warning("run %s: sending its tokens back failed", claim.run_id, exc_info=True)
    return False


@dataclass
class GangWatch:
    """Beats this node's row and finds a lost peer; ``check`` is torchrun's ``watch``."""

    engine: Engine
    claim: gang.NodeClaim
    silent_s: float
    last_beat: float = 0.0
    lost: str | None = None

    def check(self) -> str | None:
        if self.lost is not None or time.monotonic() - self.last_beat < WATCH_BEAT_S:
            return self.lost
        self.last_beat = time.monotonic()
        try:
            with db.session(self.engine) as s:
                gang.beat(s, self.claim)
                peer = gang.lost_peer(
                    s, self.claim, silent_s=self.silent_s, failed_for_s=FAILED_PEER_S
                )
                if peer is not None:
                    what = "failed" if peer.state == gang.FAILED else "went silent"
                    self.lost = f"{gang.describe(peer)} {what}"
        except Exception:  # a database hiccup: the next tick tries again
            log.warning("run %s: gang watch failed", self.claim.run_id, exc_info=True)
        return self.lost


class _NodeLog:
    """The run's log as one node writes it: every line says which node it came from."""

    def __init__(self, writer: RunLogWriter, prefix: str) -> None:
        self.writer, self.prefix = writer, prefix

    def write_line(self, stream: str, text: str) -> None:
        lines = text.splitlines() or [""]
        self.writer.write_line(stream, "\n".join(f"{self.prefix} {line}" for line in lines))


def node_command(
    run_id: int, spec: RunSpec, claim: gang.NodeClaim, endpoint: str, addr: str
) -> list[str]:
    """torchrun for this node of the gang (c10d rendezvous; slot 0 hosts its store)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(spec.nodes),
        "--nproc-per-node",
        str(spec.nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        f"run-{run_id}-{claim.attempt}",
        "--rdzv-conf",
        f"is_host={int(claim.slot == 0)}",
        "--local-addr",
        addr,
        "--max-restarts",
        "0",
        "-m",
        "worker.ddp_entry",
        str(run_id),
    ]


def _train(engine: Engine, claim: gang.NodeClaim, worker: str, settings: Settings) -> str:
    from worker.tasks import run_torchrun

    with db.session(engine) as s:
        run = runs.get_run(s, claim.run_id)
        rows = gang.members(s, claim.run_id, claim.attempt)
        if run is None or not rows:
            return "lost"
        spec_dict, uid = dict(run.spec), run.uid or str(run.id)
    try:
        spec = RunSpec.model_validate(spec_dict)
    except ValidationError as exc:  # written by another version: no gang can train it
        error = f"invalid spec: {format_validation_error(exc)}"
        with db.session(engine) as s:
            runs.mark_finished(s, claim.run_id, RunStatus.FAILED, attempt=claim.attempt,
                               error=error)  # fmt: skip
        return RunStatus.FAILED
    first, me = rows[0], next(r for r in rows if r.slot == claim.slot)
    endpoint = f"{first.addr}:{first.port}"
    directory = run_dir(uid)
    writer = RunLogWriter(engine, claim.run_id)
    node_log = _NodeLog(writer, f"[node {claim.slot}]")
    node_log.write_line(
        "log",
        f"attempt {claim.attempt}: node {claim.slot} of {claim.nodes} on {worker} "
        f"({me.host}, {me.addr}); rendezvous {endpoint}",
    )
    watch = GangWatch(engine, claim, settings.node_silent_s)
    try:
        ended = run_torchrun(
            engine,
            claim.run_id,
            claim.attempt,
            node_command(claim.run_id, spec, claim, endpoint, me.addr),
            directory,
            node_log,
            env=_thread_env(spec, settings),
            watch=watch.check,
        )
        return _conclude(engine, claim, spec, ended, me, directory, node_log, settings)
    except Exception as exc:
        log.exception("run %s: node %s failed", claim.run_id, claim.slot)
        _set_state(engine, claim, gang.FAILED, str(exc))
        return _fail_gang(engine, claim, spec, f"{gang.describe(me)} failed: {exc}")
    finally:
        writer.close()


def _conclude(
    engine: Engine,
    claim: gang.NodeClaim,
    spec: RunSpec,
    ended: TorchrunEnd,
    me: RunNode,
    directory: Path,
    node_log: _NodeLog,
    settings: Settings,
) -> str:
    """What this node's torchrun ending means for the attempt, recorded; what became of
    this token."""
    from worker.tasks import _finish, _outcome, _store_spooled

    if ended.result is not None:  # the global rank 0 ran on this node
        outcome = _outcome(ended.result)
        if outcome.status == RunStatus.FAILED:
            # Rank 0 failed: the run's own error, unless a peer was lost (a node's death
            # surfaces on rank 0 as a connection error).
            _set_state(engine, claim, gang.FAILED, outcome.error)
            peer = _lost_peer_within(engine, claim, settings, settings.node_silent_s + 2)
            if peer is not None:
                return _fail_gang(engine, claim, spec, f"{peer}; {outcome.error}")
        else:
            _set_state(engine, claim, gang.EXITED)
        outcome = _store_spooled(engine, claim.run_id, directory, outcome)
        _finish(engine, claim.run_id, claim.attempt, outcome, directory)
        auto_sweep.after_run(engine, claim.run_id)
        return str(outcome.status)
    if ended.stopped_by:
        node_log.write_line("log", f"stopping: {ended.stopped_by}")
        _set_state(engine, claim, gang.EXITED)
        return _fail_gang(engine, claim, spec, ended.stopped_by)
    if ended.lost or ended.returncode == 0:
        _set_state(engine, claim, gang.EXITED)
        return "node-done"
    # This node's ranks failed and rank 0 is elsewhere: its node records the run's
    # own error; a lost peer (rank 0's node, say) fails the gang; neither in time: this
    # node fails it with its own error.
    reason = f"{gang.describe(me)} failed: {ended.error}"
    node_log.write_line("error", reason)
    _set_state(engine, claim, gang.FAILED, ended.error)
    wait_s = 2 * settings.node_silent_s + 5
    peer = _lost_peer_within(engine, claim, settings, wait_s)
    if peer is None and not _running(engine, claim):
        return "node-done"
    return _fail_gang(engine, claim, spec, peer or reason)


def _thread_env(spec: RunSpec, settings: Settings) -> dict[str, str]:
    """torchrun gives each process one thread only with nproc > 1; a node of one process
    trains on the usable CPUs but one, as an inline run does."""
    if "OMP_NUM_THREADS" in os.environ or spec.nproc > 1:
        return {}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"OMP_NUM_THREADS": str(training_threads(settings.torch_threads, usable or 1))}


def _set_state(engine: Engine, claim: gang.NodeClaim, state: str, error: str | None = None) -> None:
    try:
        with db.session(engine) as s:
            gang.set_state(s, claim, state, error)
    except Exception:
        log.warning("run %s: could not record node %s as %s", claim.run_id, claim.slot, state,
                    exc_info=True)  # fmt: skip


def _running(engine: Engine, claim: gang.NodeClaim) -> bool:
    with db.session(engine) as s:
        return gang.started(s, claim)


def _lost_peer_within(
    engine: Engine, claim: gang.NodeClaim, settings: Settings, seconds: float
) -> str | None:
    """Wait up to ``seconds`` for a peer to be found lost (``node 1 (host) went silent``);
    None once the attempt stopped running (settled by another node) or time is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with db.session(engine) as s:
            if not gang.started(s, claim):
                return None
            peer = gang.lost_peer(s, claim, silent_s=settings.node_silent_s)
            if peer is not None:
                return f"{gang.describe(peer)} went silent"
        time.sleep(WAIT_POLL_S)
    return None


def _fail_gang(engine: Engine, claim: gang.NodeClaim, spec: RunSpec, reason: str) -> str:
    """Fail this attempt of the gang: re-queued with new tokens, or failed for good."""
    with db.session(engine) as s:
        status = gang.fail(s, claim, reason=reason, max_attempts=MAX_ATTEMPTS)
    if status is None:
        return "node-done"  # another node (or rank 0's outcome) settled it first
    log.warning("run %s: attempt %s of the gang ended (%s): %s", claim.run_id, claim.attempt,
                reason, status)  # fmt: skip
    if status == RunStatus.QUEUED:
        try:
            enqueue(claim.run_id, spec, engine=engine)
        except Exception:  # the reconciler re-sends a queued run's lost messages
            log.warning("run %s: sending the new gang's tokens failed", claim.run_id,
                        exc_info=True)  # fmt: skip
    return status


def local_address(database_url: str) -> str:
    """The address of the interface this host reaches the database through: the one the
    other nodes, on the same network, can reach it at. Loopback for a local database."""
    host = urlsplit(database_url).hostname
    if not host or host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP: no packet is sent, only a route chosen
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def free_port(addr: str) -> int:
    """A port free on ``addr`` now (the rendezvous store binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])
