"""The notebook client: batchlab's REST API as Python calls and pandas DataFrames.

    >>> import batchlab
    >>> c = batchlab.Client("http://127.0.0.1:8000")
    >>> large, base = c.submit("examples/specs/large_gradual.yaml", baseline=True)
    >>> c.wait([base, large])
    >>> c.metrics([base, large], keys=["train_err"], x="epoch").head()
    >>> c.compare_figure([base, large]).show()

Only httpx and PyYAML are imported with this module; pandas and plotly are imported by
the calls that return DataFrames or figures, so the CLI built on it starts fast. Server
errors are raised as :class:`APIError` subclasses carrying the server's own message.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx

from core.errors import field_errors, format_validation_error
from core.settings import get_settings
from core.status import FINAL_STATUSES, RunStatus

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from batchlab.tracking import TrackedRun

# How long Client.wait rides out a server that does not answer (a restart) before failing.
WAIT_UNREACHABLE_S = 60.0
# Columns of Client.metrics, in this order, also when no point matched.
METRIC_COLUMNS = ["run", "key", "step", "epoch", "wall_time", "value"]
# Run fields kept as columns of Client.runs (nested spec/derived/summary are flattened).
RUN_COLUMNS = [
    "id", "name", "status", "progress", "eta_s", "created_at", "started_at",
    "finished_at", "host", "gpus", "worker", "error", "diverged_step", "group_id",
    "baseline_id", "is_baseline", "tags", "notes", "archived", "parent_id",
]  # fmt: skip

RunRef = int | str | Mapping[str, Any]
SpecLike = Mapping[str, Any] | str | os.PathLike[str] | Any  # dict, RunSpec, YAML path


class APIError(Exception):
    """An error answer of the batchlab server (or no answer at all)."""

    def __init__(self, message: str, *, status_code: int | None = None, detail: Any = None):
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail


class ValidationError(APIError):
    """The server rejected a spec or request (HTTP 422/400); nothing was stored.

    ``errors`` lists ``(field, message)`` pairs (``core.errors``): the field is the last
    name of the offending location with any list position (``batch_per_worker``,
    ``batch_sizes[1]``), "" for an error about the whole request.
    """

    def __init__(self, *, status_code: int, detail: Any):
        self.errors = field_errors(detail)
        super().__init__(format_validation_error(detail), status_code=status_code, detail=detail)


class NotFound(APIError):
    """The run or sweep does not exist (HTTP 404)."""


class Unauthorized(APIError):
    """A write without the right token (HTTP 401/403): pass ``token=`` or BATCHLAB_TOKEN."""


class ServerUnavailable(APIError, ConnectionError):
    """No batchlab server answered at the client's URL."""


class Client:
    """Talks to one batchlab server.

    ``url`` defaults to ``$BATCHLAB_URL`` or http://127.0.0.1:8000 and ``token`` to
    ``$BATCHLAB_TOKEN`` (needed for writes only when the server sets one). ``http`` shares
    an existing ``httpx.Client`` (its base URL, pool and proxies); it is not closed here.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        settings = get_settings()
        self.url = url.rstrip("/") if url else settings.url
        self.token = token if token is not None else settings.token
        # Sent with each request rather than set on the httpx client, which may be shared.
        self._headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._owns_http = http is None
        if http is None:
            self._http = httpx.Client(base_url=self.url, timeout=timeout)
        else:
            self._http = http
            if url is None:
                self.url = str(http.base_url).rstrip("/")

    # --- plumbing ---------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"batchlab.Client({self.url!r})"

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, headers=self._headers, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnavailable(
                f"no batchlab server answered at {self.url} ({exc}); "
                "start one with `batchlab up` or `batchlab api`"
            ) from exc
        if response.is_error:
            raise _error_from(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    # --- runs ---------------------------------------------------------------------------
    @overload
    def submit(
        self, spec: SpecLike, baseline: Literal[False] = ..., name: str | None = ...
    ) -> dict[str, Any]: ...

    @overload
    def submit(
        self, spec: SpecLike, baseline: Literal[True], name: str | None = ...
    ) -> tuple[dict[str, Any], dict[str, Any] | None]: ...

    def submit(
        self, spec: SpecLike, baseline: bool = False, name: str | None = None
    ) -> dict[str, Any] | tuple[dict[str, Any], dict[str, Any] | None]:
        """Queue one run; with ``baseline=True`` also its kn = ref_batch reference.

        ``spec`` is a dict of RunSpec fields, a ``RunSpec`` or the path of a YAML file.
        Returns the run, or ``(run, baseline_run)`` when a baseline was asked for.
        """
        body: dict[str, Any] = {"spec": spec_to_dict(spec), "baseline": bool(baseline)}
        if name is not None:
            body["name"] = name
        answer = self._request("POST", "/api/runs", json=body)
        if baseline:
            return answer["run"], answer.get("baseline")
        return answer["run"]

    def sweep(
        self,
        spec: SpecLike,
        batch_sizes: Sequence[int] | Literal["auto"],
        seeds: Sequence[int] | None = None,
        baseline: bool = True,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Queue one run per total batch size (and seed): ``{"sweep": Group, "runs": [...]}``.

        ``batch_sizes="auto"`` queues the baseline only; when it has finished, the server
        queues powers of two from B/8 to 8B around its measured gradient noise scale B
        (``sweep_info(id)["sweep"]["auto_state"]`` / ``["auto_message"]`` say where it is,
        ``["advice"]`` the critical batch and the knee)."""
        sizes: list[int] | str = "auto" if batch_sizes == "auto" else [int(b) for b in batch_sizes]
        body: dict[str, Any] = {
            "spec": spec_to_dict(spec),
            "batch_sizes": sizes,
            "baseline": bool(baseline),
        }
        if seeds is not None:
            body["seeds"] = [int(s) for s in seeds]
        if name is not None:
            body["name"] = name
        return self._request("POST", "/api/sweeps", json=body)

    def run(self, run: RunRef) -> dict[str, Any]:
        """One run as the server describes it (status, progress, summary, ...)."""
        return self._request("GET", f"/api/runs/{run_id(run)}")

    def list_runs(
        self,
        status: str | None = None,
        group: int | None = None,
        *,
        archived: str | None = None,
        q: str | None = None,
        tag: str | None = None,
    ) -> list[dict]:
        """Runs as dicts, newest first (see :meth:`runs` for a DataFrame)."""
        given = {"status": status, "group": group, "archived": archived, "q": q, "tag": tag}
        params = {k: v for k, v in given.items() if v is not None}
        return self._request("GET", "/api/runs", params=params)

    def runs(
        self,
        status: str | None = None,
        group: int | None = None,
        *,
        archived: str | None = None,
        q: str | None = None,
        tag: str | None = None,
    ) -> pd.DataFrame:
        """One row per run, newest first: run fields, spec fields, derived figures, summary.

        Spec fields (``model``, ``workers``, ``batch_per_worker``, ...), derived figures
        (``total_batch``, ``peak_lr``, ...) and summary figures (``final_val_err``, ...)
        become columns of their own; a summary key that repeats a derived one is dropped.
        Archived runs are left out unless ``archived="only"`` or ``"all"``; ``q`` searches
        names, notes and tags (case-insensitive), ``tag`` keeps runs with that tag.
        """
        return runs_frame(
            self.list_runs(status=status, group=group, archived=archived, q=q, tag=tag)
        )

    def update_run(
        self,
        run: RunRef,
        *,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        notes: str | None = None,
        archived: bool | None = None,
    ) -> dict[str, Any]:
        """Rename a run, replace its tags, set its notes or (un)archive it; the run after."""
        given = {"name": name, "tags": None if tags is None else list(tags)}
        given |= {"notes": notes, "archived": archived}
        body = {k: v for k, v in given.items() if v is not None}
        return self._request("PATCH", f"/api/runs/{run_id(run)}", json=body)

    def export(
        self, runs: RunRef | Sequence[RunRef], path: str | os.PathLike[str], format: str = "csv"
    ) -> Path:
        """Write every metric point of ``runs`` (columns run_id, key, step, epoch,
        wall_time, value) to ``path`` as ``csv`` or ``parquet``, streamed to disk."""
        if format not in ("csv", "parquet"):
            raise ValueError(f"format: 'csv' or 'parquet', got {format!r}")
        many = isinstance(runs, Sequence) and not isinstance(runs, str | Mapping)
        ids = [run_id(r) for r in runs] if many else [run_id(runs)]  # type: ignore[union-attr]
        url = f"/api/metrics.{format}"
        params = {"runs": ",".join(map(str, ids))}
        out = Path(path)
        try:
            with self._http.stream(
                "GET", url, params=params, headers=self._headers, timeout=None
            ) as response:
                if response.is_error:
                    response.read()
                    raise _error_from(response)
                with out.open("wb") as fh:
                    for piece in response.iter_bytes():
                        fh.write(piece)
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"no batchlab server answered at {self.url} ({exc})") from exc
        return out

    def extend(self, run: RunRef, epochs: int) -> dict[str, Any]:
        """Train ``epochs`` more epochs: a new run (returned) resuming from the run's last
        checkpoint, its ``parent_id`` the run."""
        return self._request("POST", f"/api/runs/{run_id(run)}/extend", json={"epochs": epochs})

    def start_run(self, name: str, spec_or_params: Any = None, **options: Any) -> TrackedRun:
        """Track a run trained here (a notebook loop, a cluster job): it registers on the
        server, ``run.log(step, loss=...)`` streams points, ``run.finish()`` ends it; a
        context manager too. ``spec_or_params``: a RunSpec (dict, object or YAML path) or
        any parameters. Options and behaviour: ``batchlab.tracking.start_run``."""
        from batchlab.tracking import start_run

        return start_run(self, name, spec_or_params, **options)

    def cancel(self, run: RunRef) -> dict[str, Any]:
        """Cancel a run: a queued one at once, a running one at its next check (~1 s)."""
        return self._request("POST", f"/api/runs/{run_id(run)}/cancel")

    def delete(self, run: RunRef) -> None:
        """Delete a run and all its metric points."""
        self._request("DELETE", f"/api/runs/{run_id(run)}")

    def wait(
        self,
        runs: RunRef | Sequence[RunRef],
        progress: bool = True,
        timeout: float | None = None,
        poll: float = 1.0,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Block until the run(s) finish; return their final state (one dict or a list).

        A progress bar per run shows the fraction done and the ETA the worker estimates.
        Raises ``TimeoutError`` after ``timeout`` seconds with runs still unfinished, and
        ``ServerUnavailable`` once the server has not answered for a minute.
        """
        single = isinstance(runs, int | str | Mapping)
        ids = [run_id(runs)] if single else [run_id(r) for r in runs]  # type: ignore[union-attr]
        state = {i: self.run(i) for i in ids}
        bars = _ProgressBars(ids, enabled=progress)
        deadline = None if timeout is None else time.monotonic() + timeout
        unreachable_since: float | None = None
        try:
            while True:
                bars.update(state)
                pending = [i for i in ids if state[i]["status"] not in FINAL_STATUSES]
                if not pending:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"runs {pending} still unfinished after {timeout:g} s "
                        f"(status: {', '.join(state[i]['status'] for i in pending)})"
                    )
                left = math.inf if deadline is None else deadline - time.monotonic()
                time.sleep(max(0.0, min(poll, left)))
                try:
                    for i in pending:
                        state[i] = self.run(i)
                    unreachable_since = None
                except ServerUnavailable:
                    # A restarting API (compose, `batchlab up`) must not end a long wait.
                    unreachable_since = unreachable_since or time.monotonic()
                    if time.monotonic() - unreachable_since > WAIT_UNREACHABLE_S:
                        raise
        finally:
            bars.close()
        return state[ids[0]] if single else [state[i] for i in ids]

    # --- metrics ------------------------------------------------------------------------
    def metrics(
        self,
        runs: RunRef | Sequence[RunRef],
        keys: str | Sequence[str] | None = None,
        x: Literal["step", "epoch", "wall_time"] = "step",
        max_points: int | None = None,
    ) -> pd.DataFrame:
        """Metric histories in long format: columns run, key, step, epoch, wall_time, value.

        ``keys`` defaults to the server's (loss, train_err, lr, val_loss, val_err; the
        full list is in docs/design.md). The server downsamples each series along ``x`` to
        ``max_points`` (2000 when None), keeping extremes and the last point; up to
        100000 points per series can be asked for.
        """
        return metrics_frame(self._series(runs, keys, x, max_points))

    def _series(
        self,
        runs: RunRef | Sequence[RunRef],
        keys: str | Sequence[str] | None,
        x: str,
        max_points: int | None,
        trim: Mapping[str, Any] | None = None,
    ) -> dict[str, dict[str, dict[str, list]]]:
        ids = [run_id(runs)] if isinstance(runs, int | str | Mapping) else [run_id(r) for r in runs]
        params: dict[str, Any] = {"runs": ",".join(map(str, ids)), "x": x, **(trim or {})}
        if keys is not None:
            params["keys"] = keys if isinstance(keys, str) else ",".join(keys)
        if max_points is not None:
            params["max_points"] = int(max_points)
        answer = self._request("GET", "/api/metrics", params=params)
        if answer.get("missing"):
            # The batch endpoint skips unknown ids; a notebook user wants to hear of them.
            raise NotFound(f"runs {answer['missing']} not found", status_code=404, detail=answer)
        return answer["runs"]

    # --- schedules, sweeps, service -----------------------------------------------------
    def schedule(self, spec: SpecLike) -> dict[str, Any]:
        """The planned LR schedule of a spec (warmup, decay), as the server computes it."""
        return self._request("POST", "/api/schedule", json=spec_to_dict(spec))

    def sweeps(self) -> list[dict[str, Any]]:
        return self._request("GET", "/api/sweeps")

    def sweep_info(self, sweep_id: int) -> dict[str, Any]:
        """``{"sweep": Group, "runs": [Run], "baseline_id", "summary": [Row], "advice"}``
        (``advice``: the predicted critical batch and the measured knee, docs/api.md)."""
        return self._request("GET", f"/api/sweeps/{int(sweep_id)}")

    def sweep_summary(self, sweep_id: int) -> pd.DataFrame:
        """One row per run of a sweep: kn, LR, final/best error, time to target, ..."""
        import pandas as pd

        rows = self.sweep_info(sweep_id)["summary"]
        frame = pd.DataFrame(rows)
        if "total_batch" in frame:
            frame = frame.sort_values(["total_batch", "run_id"], ignore_index=True)
        return frame

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/api/health")

    def workers(self) -> dict[str, Any]:
        return self._request("GET", "/api/workers")

    # --- figures ------------------------------------------------------------------------
    def compare_figure(
        self,
        runs: Sequence[RunRef],
        key: str = "train_err",
        x: Literal["step", "epoch", "samples", "wall_time"] = "epoch",
        baseline: RunRef | None = None,
        smoothing: float = 0.0,
        max_points: int = 1500,
        band: Literal["minmax", "std", "off"] = "minmax",
        logy: bool = False,
    ) -> go.Figure:
        """The dashboard's compare view as a Plotly figure (Goyal et al. Fig. 2/3 style).

        Drawn by the dashboard's rules (frontend/figure_spec.json, batchlab/figure.py):
        ``key`` against ``x`` (errors in percent), the baseline in black, the others
        coloured and labelled as the paper does ("kn=8k, η=3.2, gradual warmup: 23.74%"),
        runs that differ only in seed folded into their mean with a min-max (or ±1 std)
        ``band`` (``"off"``: one line per run), each configuration's LR beneath on the
        same x axis. The baseline is ``baseline`` if given (added when missing from
        ``runs``), else the first run flagged ``is_baseline``. ``smoothing`` in [0, 1)
        draws the debiased EMA over the faint raw curve.
        """
        from batchlab.figure import BANDS, build_compare_figure, figure_spec

        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if band not in BANDS:
            raise ValueError(f"band must be one of {BANDS}, got {band!r}")
        ids = list(dict.fromkeys(run_id(r) for r in runs))
        if baseline is not None and run_id(baseline) not in ids:
            ids.insert(0, run_id(baseline))
        info = [self.run(i) for i in ids]
        base_id = (
            run_id(baseline)
            if baseline is not None
            else next((r["id"] for r in info if r.get("is_baseline")), None)
        )
        api_x = "step" if x == "samples" else x
        # The dashboard's trimmed read (figure_spec.json "read"): the same points as it draws.
        read = figure_spec()["read"]
        trim = {
            "columns": f"{api_x},value",
            "digits": read["digits"],
            "drop_flat": ",".join(k for k in read["drop_flat"] if k != key),
        }
        keys = [key] if key == "lr" else [key, "lr"]
        series = self._series(ids, keys, api_x, max_points, trim)
        return build_compare_figure(
            info,
            series,
            key=key,
            x=x,
            baseline_id=base_id,
            smoothing=smoothing,
            band=band,
            logy=logy,
        )


# --- helpers (pure: unit-testable without a server) ---------------------------------------
def run_id(run: RunRef) -> int:
    """The id of a run given as an int, a numeric string or a run dict."""
    if isinstance(run, Mapping):
        if "id" not in run:
            raise ValueError("run dict has no 'id'")
        return int(run["id"])
    if isinstance(run, bool):
        raise TypeError("a run id is an int, not a bool")
    try:
        return int(run)
    except (TypeError, ValueError):
        raise ValueError(f"not a run id: {run!r}") from None


def spec_to_dict(spec: SpecLike) -> dict[str, Any]:
    """A spec as the JSON body the server validates: dict, RunSpec or YAML/JSON file path."""
    if isinstance(spec, Mapping):
        return dict(spec)
    if hasattr(spec, "model_dump"):  # a pydantic RunSpec; no trainer import needed here
        return spec.model_dump(mode="json")
    if isinstance(spec, str | os.PathLike):
        from trainer.specfile import read_spec

        return read_spec(spec)
    raise TypeError(f"spec must be a dict, a RunSpec or a file path, not {type(spec).__name__}")


TOKEN_HINT = "pass Client(token=...), --token on the CLI, or set BATCHLAB_TOKEN"


def _error_from(response: httpx.Response) -> APIError:
    """Map an error response to the exception a notebook user can act on."""
    try:
        detail: Any = response.json().get("detail")
    except ValueError:
        detail = response.text
    code = response.status_code
    if code in (400, 422):
        return ValidationError(status_code=code, detail=detail)
    message = detail if isinstance(detail, str) and detail else f"HTTP {code}"
    if code == 404:
        return NotFound(message, status_code=code, detail=detail)
    if code in (401, 403):
        if "BATCHLAB_TOKEN" not in message:  # a server that does not say how
            message += f" ({TOKEN_HINT})"
        return Unauthorized(message, status_code=code, detail=detail)
    return APIError(f"server error {code}: {message}", status_code=code, detail=detail)


def runs_frame(runs: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Flatten run dicts into a DataFrame (see :meth:`Client.runs`)."""
    import pandas as pd

    rows = []
    for run in runs:
        row = {k: run.get(k) for k in RUN_COLUMNS}
        for section in ("spec", "derived", "summary"):
            for k, v in (run.get(section) or {}).items():
                row.setdefault(k, v)
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS)
    for col in ("created_at", "started_at", "finished_at"):
        frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
    # Nullable integers: a missing baseline must not turn the other ids into floats.
    for col in ("id", "group_id", "baseline_id", "diverged_step", "parent_id"):
        frame[col] = frame[col].astype("Int64")
    return frame


def metrics_frame(series: Mapping[str, Mapping[str, Mapping[str, list]]]) -> pd.DataFrame:
    """Long-format DataFrame from the ``runs`` object of GET /api/metrics."""
    import pandas as pd

    parts = []
    for rid, by_key in series.items():
        for key, s in by_key.items():
            part = pd.DataFrame({c: s.get(c, []) for c in ("step", "epoch", "wall_time", "value")})
            part.insert(0, "key", key)
            part.insert(0, "run", int(rid))
            parts.append(part)
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in METRIC_COLUMNS}).astype(
            {"run": "int64", "key": "object", "step": "int64"}
        )
    frame = pd.concat(parts, ignore_index=True)
    return frame.astype({"run": "int64", "step": "int64", "value": "float64"})[METRIC_COLUMNS]


class _ProgressBars:
    """One tqdm bar per run: fraction done, status and the worker's ETA."""

    def __init__(self, ids: Sequence[int], *, enabled: bool) -> None:
        self._bars: dict[int, Any] = {}
        if not enabled:
            return
        from tqdm.auto import tqdm

        width = max(len(str(rid)) for rid in ids)
        for pos, rid in enumerate(ids):
            self._bars[rid] = tqdm(
                total=1000,
                desc=f"run {rid:<{width}}",
                position=pos,
                leave=True,
                # The status/ETA text goes in the ``unit`` slot: tqdm prefixes a postfix
                # with ", ", and its own ETA would be a guess from our polling rate.
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {unit}",
                unit="",
            )

    def update(self, state: Mapping[int, Mapping[str, Any]]) -> None:
        for rid, bar in self._bars.items():
            run = state[rid]
            status = run["status"]
            frac = 1.0 if status == RunStatus.SUCCEEDED else float(run.get("progress") or 0.0)
            bar.n = round(1000 * min(max(frac, 0.0), 1.0))
            eta = run.get("eta_s")
            text = status
            if status == RunStatus.RUNNING and eta is not None:
                text += f", eta {_fmt_seconds(eta)}"
            bar.unit = text
            bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"
