"""Where a run's metrics go: the sink protocol and the sinks that need no service.

The trainer calls ``start`` once, ``log`` for every point and ``close`` at the end. One
``log`` call carries several keys recorded at the same iteration. Keys written by the
trainer (see docs/design.md for the full list):

per iteration: loss, train_err, lr, samples, grad_norm, step_time
per epoch (logged at the epoch's last iteration): val_loss, val_err, epoch_time,
    data_time, compute_time, train_loss_epoch, train_err_epoch

``step`` is the 0-based global iteration, ``epoch`` the fractional epoch reached after
it (1.0 at the end of the first epoch), ``wall_time`` seconds since the run started
(resumed runs continue their clock).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class MetricSink(Protocol):
    def start(self, meta: Mapping[str, Any]) -> None:
        """Once, before the first point: iters_per_epoch, total_iters, device, ..."""

    def log(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        """Record ``values`` (key -> number) at iteration ``step``."""

    def close(self) -> None:
        """Flush everything; called once, also when training fails."""


class NullSink:
    """Discards everything (throughput baselines, tests)."""

    def start(self, meta: Mapping[str, Any]) -> None:
        pass

    def log(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        pass

    def close(self) -> None:
        pass


class MemorySink:
    """Keeps points in lists: handy in tests and notebooks."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.points: list[tuple[str, int, float, float, float]] = []
        self.closed = False

    def start(self, meta: Mapping[str, Any]) -> None:
        self.meta = dict(meta)

    def log(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        for key, value in values.items():
            self.points.append((key, step, epoch, wall_time, float(value)))

    def close(self) -> None:
        self.closed = True

    def series(self, key: str) -> list[float]:
        return [p[4] for p in self.points if p[0] == key]

    def steps(self, key: str) -> list[int]:
        return [p[1] for p in self.points if p[0] == key]


class JsonlSink:
    """One JSON object per ``log`` call, appended to ``path`` (the CLI's metrics file).

    Line format: {"step": 12, "epoch": 0.4, "wall_time": 1.93, "loss": 2.1, "lr": 0.1}.
    The file is opened in append mode so a resumed run continues it; readers keep the
    last value seen for each (key, step).
    """

    def __init__(self, path: str | Path, flush_every: int = 200) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")
        self._pending = 0
        self._flush_every = flush_every

    def start(self, meta: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps({"meta": dict(meta)}) + "\n")

    def log(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        row = {"step": step, "epoch": epoch, "wall_time": wall_time}
        row.update({k: float(v) for k, v in values.items()})
        self._fh.write(json.dumps(row) + "\n")
        self._pending += 1
        if self._pending >= self._flush_every:
            self._fh.flush()
            self._pending = 0

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Metric rows of a JSONL file (meta lines skipped)."""
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if "meta" not in row:
                    rows.append(row)
    return rows
