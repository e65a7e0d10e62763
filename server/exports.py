"""CSV and Parquet encodings of exports, produced chunk by chunk.

Metric exports have the columns ``run_id,key,step,epoch,wall_time,value`` at full
resolution (``store.export``). CSV is generated as the response streams, one chunk of
rows at a time; Parquet needs its footer written last, so the file is built first, one
row group per chunk, in a ``SpooledTemporaryFile`` (memory up to 16 MiB, disk beyond),
and then streamed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any, Literal

from sqlalchemy.engine import Engine

from store import export
from store.models import Run
from store.runs import iso
from trainer.metrics import SUMMARY_KEYS
from trainer.spec import RunSpec

Format = Literal["csv", "parquet"]
SPOOL_BYTES = 16 * 2**20
READ_BYTES = 2**20


def _num(x: float | None) -> str:
    """Shortest text that reads back as the same float; NaN as pandas and numpy spell it."""
    if x is None or math.isnan(x):
        return "nan"
    return repr(float(x))


def _csv_text(rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def metrics_csv(engine: Engine, run_ids: Sequence[int]) -> Iterator[str]:
    """The points of ``run_ids`` as CSV, one piece per chunk of rows."""
    yield ",".join(export.POINT_COLUMNS) + "\n"
    for chunk in export.iter_point_chunks(engine, run_ids):
        # csv writes floats as repr() does (shortest round trip, "nan", "inf"); only
        # SQLite's NULL value (a NaN) needs spelling out.
        yield _csv_text(row if row[5] is not None else (*row[:5], "nan") for row in chunk)


def metrics_parquet(engine: Engine, run_ids: Sequence[int]) -> IO[bytes]:
    """The points of ``run_ids`` as a Parquet file (one row group per chunk), rewound."""
    import pyarrow as pa  # late: only exports need it
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("run_id", pa.int64()),
            ("key", pa.string()),
            ("step", pa.int64()),
            ("epoch", pa.float64()),
            ("wall_time", pa.float64()),
            ("value", pa.float64()),
        ]
    )
    # Handed to the caller, who streams and closes it (iter_file).
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
    try:
        with pq.ParquetWriter(out, schema, compression="zstd") as writer:
            for chunk in export.iter_point_chunks(engine, run_ids):
                columns = list(zip(*chunk, strict=True))
                # SQLite's NULL is a NaN value: keep it a NaN, not a Parquet null.
                columns[5] = [math.nan if v is None else v for v in columns[5]]
                writer.write_table(pa.Table.from_arrays(
                    [pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)],
                    schema=schema,
                ))  # fmt: skip
        out.seek(0)
        return out
    except BaseException:
        out.close()
        raise


def iter_file(fh: IO[bytes]) -> Iterator[bytes]:
    """The bytes of ``fh`` in pieces, closing it at the end (or when the client leaves)."""
    try:
        while piece := fh.read(READ_BYTES):
            yield piece
    finally:
        fh.close()


# --- the runs table -------------------------------------------------------------------
SPEC_FIELDS = tuple(RunSpec.model_fields)
SUMMARY_FIELDS = tuple(k for k in SUMMARY_KEYS if k not in SPEC_FIELDS)
RUN_COLUMNS = (
    ("id", "name", "status", "tags", "notes", "archived", "parent_id", "group_id")
    + ("baseline_id", "created_at", "finished_at")
    + SPEC_FIELDS
    + SUMMARY_FIELDS
)


def _cell(value: Any) -> Any:
    """Lists and objects as JSON (tags, milestones), None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return _num(value)
    return value


def run_row(run: Run) -> list[Any]:
    spec, summary = run.spec or {}, run.summary or {}
    head = [run.id, run.name, run.status, run.tags or [], run.notes or "", run.archived]
    head += [run.parent_id, run.group_id, run.baseline_id]
    head += [iso(run.created_at), iso(run.finished_at)]
    values = head + [spec.get(k) for k in SPEC_FIELDS] + [summary.get(k) for k in SUMMARY_FIELDS]
    return [_cell(v) for v in values]


def runs_csv(engine: Engine, where: Sequence[Any]) -> Iterator[str]:
    """The runs matching ``where`` (``store.runs.run_filters``) as CSV, newest first."""
    yield _csv_text([RUN_COLUMNS])
    for chunk in export.iter_runs(engine, where):
        yield _csv_text(run_row(r) for r in chunk)
