"""One process of a multi-process run: ``torchrun ... -m worker.ddp_entry RUN_ID``.

Started by ``worker.tasks`` for ``spec.nproc > 1``. ``trainer.fit`` sets up the process
group itself (``WORLD_SIZE > 1``). Rank 0 writes the metrics, progress and heartbeat
through a ``DbSink`` and leaves the outcome in ``<run_dir>/result.json`` for the task,
which records the final status; the other ranks log nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from core.files import atomic_write_text
from core.status import RunStatus
from store import db, runs
from store.runs import run_dir
from trainer.sink import MetricSink, NullSink
from trainer.spec import RunSpec
from worker.sink import SPOOL_FILE, DbSink
from worker.tasks import RESULT_FILE, error_text


def _write_result(directory: Path, result: dict[str, Any]) -> None:
    """Atomically, so the task never reads half a file."""
    atomic_write_text(directory / RESULT_FILE, json.dumps(result), fsync=False)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m worker.ddp_entry RUN_ID", file=sys.stderr)
        return 2
    run_id = int(args[0])
    rank = int(os.environ.get("RANK", "0"))
    attempt = os.environ.get("BATCHLAB_RUN_ATTEMPT")
    engine = db.get_engine()
    with db.session(engine) as s:
        run = runs.get_run(s, run_id)
        if run is None:
            print(f"run {run_id} not found", file=sys.stderr)
            return 1
        spec = RunSpec.model_validate(run.spec)
        directory = run_dir(run.uid or str(run.id))

    import trainer  # torch

    sink: MetricSink
    if rank == 0:
        db_sink = DbSink(
            engine,
            run_id,
            spec,
            attempt=int(attempt) if attempt else None,
            spool=directory / SPOOL_FILE,
            # torchrun's agent: its tree holds every rank of the run.
            sys_metrics=True,
            sys_pid=os.getppid(),
        )
        sink, should_stop = db_sink, db_sink.should_stop
    else:
        sink, should_stop = NullSink(), None
    try:
        result = trainer.fit(spec, sink, run_dir=directory, resume=True, should_stop=should_stop)
    except Exception as exc:
        if rank == 0:
            _write_result(directory, {"status": RunStatus.FAILED, "error": error_text(exc)})
        raise
    finally:
        sink.close()
    if rank == 0:
        _write_result(directory, result.to_dict())
    return 0


if __name__ == "__main__":
    from trainer.distributed import exit_worker_process

    exit_worker_process(main())
