"""A run's folder (checkpoint, metric spool) belongs to that run alone (issue 10, point 4).

Run ids repeat when the database is reset or restored while ``$BATCHLAB_HOME`` is kept;
folders are named by the run's uid, so a new run never resumes an old run's checkpoint,
and deleting a run deletes its folder.
"""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from test_worker import create_run, get_run, point_counts, tiny_spec

from server.app import create_app
from store import db, runs


def test_a_reset_database_reusing_an_id_trains_from_scratch(
    batchlab_home: str, tmp_path: Path
) -> None:
    from worker.tasks import execute

    spec = tiny_spec()
    uids = []
    for name in ("before.db", "after-reset.db"):  # same BATCHLAB_HOME, fresh database
        engine = db.get_engine(f"sqlite:///{tmp_path / name}")
        db.migrate(engine)
        run_id = create_run(engine, spec)
        assert run_id == 1
        assert execute(engine, run_id, worker="w") == "succeeded"
        # Trained, not "resumed" from the old run's last checkpoint with 0 points.
        assert point_counts(engine, run_id)["loss"] == spec.total_iters
        uids.append(get_run(engine, run_id).uid)
    assert uids[0] != uids[1]
    folders = sorted(p.name for p in (Path(batchlab_home) / "runs").iterdir())
    assert folders == sorted(uids)


def test_delete_removes_the_runs_folder(
    batchlab_home: str, sqlite_url: str, tmp_path: Path
) -> None:
    app = create_app(database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    try:
        with TestClient(app) as client:
            engine = app.state.ctx.engine
            kept, gone = create_run(engine, tiny_spec()), create_run(engine, tiny_spec())
            folders = {}
            for run_id in (kept, gone):
                folders[run_id] = runs.run_dir(str(get_run(engine, run_id).uid))
                folders[run_id].mkdir(parents=True)
                (folders[run_id] / "checkpoint.pt").write_bytes(b"state")
            assert client.delete(f"/api/runs/{gone}").status_code == 204
            assert not folders[gone].exists()
            assert (folders[kept] / "checkpoint.pt").exists()
            assert client.delete(f"/api/runs/{gone}").status_code == 404
    finally:
        app.state.ctx.engine.dispose()
