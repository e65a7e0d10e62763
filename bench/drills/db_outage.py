"""Drill: PostgreSQL refuses connections across an epoch end; no metric point is lost.

Creates a scratch database, trains one run in this process (``worker.tasks.execute``,
the worker's own code path), and once the first epoch is stored closes the database to
everyone (``ALTER DATABASE ... ALLOW_CONNECTIONS false`` and ``pg_terminate_backend``
of its sessions) for ``--outage-s`` seconds, across the next epoch ends. Before issue 10
the points of those epochs could be lost while the run still ended ``succeeded``; now
they are spooled to the run's folder before each checkpoint and replayed.

    .venv/bin/python bench/drills/db_outage.py [--outage-s 8] [--admin-url URL]

Prints the stored / expected point counts per key and the final status; exit code 0
when the run succeeded with every point stored exactly once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

SPEC = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": 6000,
    "epochs": 6,
    "batch_per_worker": 20,
    "warmup": "none",
    "milestones": [],
    "device": "cpu",
}
PER_ITER = ("loss", "train_err", "lr", "samples", "grad_norm", "step_time")
PER_EPOCH = ("val_loss", "val_err", "epoch_time", "data_time", "compute_time")


def counts(engine: sa.Engine, run_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT key, count(*) FROM metric_points WHERE run_id = :r GROUP BY key"),
            {"r": run_id},
        )
        return {k: int(n) for k, n in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outage-s", type=float, default=8.0)
    parser.add_argument("--admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    name = f"batchlab_drill_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{args.admin_url}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    home = tempfile.mkdtemp(prefix="batchlab-drill-")
    os.environ["BATCHLAB_HOME"] = home
    os.environ["BATCHLAB_DATABASE_URL"] = f"{args.admin_url}/{name}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from store import db, runs
        from trainer.spec import RunSpec
        from worker.tasks import execute

        spec = RunSpec.model_validate(SPEC)
        engine = db.get_engine()
        db.migrate(engine)
        with db.session(engine) as s:
            run_id = runs.create_run(s, name="drill", spec=spec.model_dump(mode="json")).id
        result: dict[str, str] = {}
        worker = threading.Thread(
            target=lambda: result.update(status=execute(engine, run_id, worker="drill"))
        )
        t0 = time.monotonic()
        worker.start()
        while counts(engine, run_id).get("val_err", 0) < 1:
            if not worker.is_alive():
                break
            time.sleep(0.05)
        print(f"epoch 1 stored after {time.monotonic() - t0:.1f} s; closing the database")
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"
                ),
                {"d": name},
            )
        time.sleep(args.outage_s)
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        print(f"database open again after {args.outage_s:.0f} s")
        worker.join()
        with db.session(engine) as s:
            run = runs.get_run(s, run_id)
            assert run is not None
            status, error, uid = run.status, run.error, run.uid
        stored = counts(engine, run_id)
        expected = {k: spec.total_iters for k in PER_ITER} | {k: spec.epochs for k in PER_EPOCH}
        print(f"status: {status} (task returned {result.get('status')}) error: {error}")
        ok = status == "succeeded"
        for key, want in expected.items():
            got = stored.get(key, 0)
            ok = ok and got == want
            print(f"  {key:14s} stored {got:5d} / expected {want}")
        spool = Path(home) / "runs" / str(uid) / "points.spool"
        print(f"spool left: {spool.exists()}  ->  {'PASS' if ok else 'FAIL'}")
        engine.dispose()
        return 0 if ok else 1
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    sys.exit(main())
