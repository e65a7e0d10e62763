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

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "diverged", "cancelled"})
# How long Client.wait rides out a server that does not answer (a restart) before failing.
WAIT_UNREACHABLE_S = 60.0
# Columns of Client.metrics, in this order, also when no point matched.
METRIC_COLUMNS = ["run", "key", "step", "epoch", "wall_time", "value"]
# Run fields kept as columns of Client.runs (nested spec/derived/summary are flattened).
RUN_COLUMNS = [
    "id", "name", "status", "progress", "eta_s", "created_at", "started_at",
    "finished_at", "host", "gpus", "worker", "error", "diverged_step", "group_id",
    "baseline_id", "is_baseline",
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

    ``errors`` lists ``(field, message)`` pairs, the field being the last part of the
    offending location (``batch_per_worker``, ``spec``, ...).
    """

    def __init__(self, errors: list[tuple[str, str]], *, status_code: int, detail: Any):
        self.errors = errors
        message = "; ".join(f"{field}: {msg}" if field else msg for field, msg in errors)
        super().__init__(message, status_code=status_code, detail=detail)


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
        self.url = (url or os.environ.get("BATCHLAB_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("BATCHLAB_TOKEN") or None
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
        batch_sizes: Sequence[int],
        seeds: Sequence[int] | None = None,
        baseline: bool = True,
        name: str | None = None,
    ) -> dict[str, Any]:
        """Queue one run per total batch size (and seed): ``{"sweep": Group, "runs": [...]}``."""
        body: dict[str, Any] = {
            "spec": spec_to_dict(spec),
            "batch_sizes": [int(b) for b in batch_sizes],
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

    def list_runs(self, status: str | None = None, group: int | None = None) -> list[dict]:
        """Runs as dicts, newest first (see :meth:`runs` for a DataFrame)."""
        params = {k: v for k, v in {"status": status, "group": group}.items() if v is not None}
        return self._request("GET", "/api/runs", params=params)

    def runs(self, status: str | None = None, group: int | None = None) -> pd.DataFrame:
        """One row per run, newest first: run fields, spec fields, derived figures, summary.

        Spec fields (``model``, ``workers``, ``batch_per_worker``, ...), derived figures
        (``total_batch``, ``peak_lr``, ...) and summary figures (``final_val_err``, ...)
        become columns of their own; a summary key that repeats a derived one is dropped.
        """
        return runs_frame(self.list_runs(status=status, group=group))

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
                pending = [i for i in ids if state[i]["status"] not in TERMINAL_STATUSES]
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
    ) -> dict[str, dict[str, dict[str, list]]]:
        ids = [run_id(runs)] if isinstance(runs, int | str | Mapping) else [run_id(r) for r in runs]
        params: dict[str, Any] = {"runs": ",".join(map(str, ids)), "x": x}
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
        """``{"sweep": Group, "runs": [Run], "baseline_id", "summary": [Row]}``."""
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
        x: Literal["step", "epoch", "wall_time"] = "epoch",
        baseline: RunRef | None = None,
        smoothing: float = 0.0,
        max_points: int = 1500,
    ) -> go.Figure:
        """The dashboard's compare view as a Plotly figure (Goyal et al. Fig. 2/3 style).

        Top: ``key`` against ``x`` (errors in percent, per-epoch keys as markers), the
        baseline in black and the other runs coloured, labelled as the paper does
        ("kn=1k, η=1.6, gradual: 12.34%"); beneath, on the same x axis, each run's LR.
        The baseline is ``baseline`` if given (added when missing from ``runs``), else the
        first run flagged ``is_baseline``. ``smoothing`` in [0, 1) draws the dashboard's
        debiased EMA over the faint raw curve. Show it with ``fig.show()`` or save it with
        ``fig.write_html(path)``.
        """
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        ids = list(dict.fromkeys(run_id(r) for r in runs))
        if baseline is not None and run_id(baseline) not in ids:
            ids.insert(0, run_id(baseline))
        info = {i: self.run(i) for i in ids}
        base_id = (
            run_id(baseline)
            if baseline is not None
            else next((i for i in ids if info[i].get("is_baseline")), None)
        )
        series = self._series(ids, [key, "lr"], x, max_points)
        return build_compare_figure(
            info, series, key=key, x=x, baseline_id=base_id, smoothing=smoothing
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
        import yaml

        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"spec file not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a spec file holds a mapping of RunSpec fields")
        return data
    raise TypeError(f"spec must be a dict, a RunSpec or a file path, not {type(spec).__name__}")


def _error_from(response: httpx.Response) -> APIError:
    """Map an error response to the exception a notebook user can act on."""
    try:
        detail: Any = response.json().get("detail")
    except ValueError:
        detail = response.text
    code = response.status_code
    if code in (400, 422):
        return ValidationError(_validation_errors(detail), status_code=code, detail=detail)
    message = detail if isinstance(detail, str) and detail else f"HTTP {code}"
    if code == 404:
        return NotFound(message, status_code=code, detail=detail)
    if code in (401, 403):
        return Unauthorized(message, status_code=code, detail=detail)
    return APIError(f"server error {code}: {message}", status_code=code, detail=detail)


def _validation_errors(detail: Any) -> list[tuple[str, str]]:
    """(field, message) pairs from FastAPI's 422 detail list or a plain string."""
    if not isinstance(detail, list):
        return [("", str(detail))]
    out = []
    for item in detail:
        if not isinstance(item, Mapping):
            out.append(("", str(item)))
            continue
        loc = [str(p) for p in item.get("loc", []) if p != "body"]
        msg = str(item.get("msg", ""))
        # pydantic prefixes custom validator messages; the field name says enough.
        msg = msg.removeprefix("Value error, ")
        out.append((loc[-1] if loc else "", msg))
    return out


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
    for col in ("id", "group_id", "baseline_id", "diverged_step"):
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


def ema(values: Sequence[float | None], smoothing: float) -> list[float | None]:
    """TensorBoard's debiased EMA, as the dashboard draws it (frontend/js/smoothing.js).

    ``last = s * last + (1 - s) * v``, shown as ``last / (1 - s**t)`` with t the finite
    values seen so far; non-finite values pass through, a constant series is unchanged.
    """
    if not smoothing > 0:
        return list(values)
    if len(set(values)) <= 1:
        return list(values)
    out: list[float | None] = []
    last, count = 0.0, 0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(v)
            continue
        last = smoothing * last + (1 - smoothing) * v
        count += 1
        out.append(last / (1 - smoothing**count))
    return out


# The dashboard's compare view (frontend/js/compare.js, plots.js), kept in step with it.
BASELINE_COLOR = "#111111"
# Tableau 10 without its grey: distinct, print-friendly, none close to black.
PALETTE = [
    "#4e79a7",
    "#e15759",
    "#f28e2b",
    "#59a14f",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#ff9da7",
    "#9c755f",
    "#2f4b7c",
    "#d62728",
    "#17becf",
]
METRIC_LABELS = {
    "train_err": ("training error (%)", 100.0),
    "val_err": ("validation error (%)", 100.0),
    "train_err_epoch": ("training error per epoch (%)", 100.0),
    "loss": ("training loss", 1.0),
    "val_loss": ("validation loss", 1.0),
    "grad_norm": ("gradient norm", 1.0),
    "lr": ("learning rate", 1.0),
    "step_time": ("time per iteration (s)", 1.0),
}
_PER_EPOCH = {"val_err", "val_loss", "train_err_epoch", "train_loss_epoch"}
_X_TITLES = {"epoch": "epoch", "step": "iteration", "wall_time": "wall time (s)"}
_WARMUP = {"none": "no warmup", "constant": "constant", "gradual": "gradual"}
# Spec fields that never tell two runs apart in a legend (as the dashboard's LEGEND_SKIP).
_LEGEND_SKIP = {
    "seed", "workers", "batch_per_worker", "nproc", "micro_batch", "warmup", "device",
    "checkpoint", "data_root", "eval_every", "base_lr", "ref_batch",
}  # fmt: skip


def format_kn(kn: int) -> str:
    """Total batch as the paper writes it: 256, 1k, 8k (k = 1024)."""
    return f"{kn / 1024:g}k" if kn >= 1024 and kn % 512 == 0 else str(kn)


def paper_label(run: Mapping[str, Any]) -> str:
    """The legend of the paper's figures: "kn=8k, η=3.2, gradual"."""
    derived, spec = run.get("derived") or {}, run.get("spec") or {}
    kn = derived.get("total_batch", spec.get("workers", 1) * spec.get("batch_per_worker", 32))
    label = f"kn={format_kn(int(kn))}"
    if derived.get("peak_lr") is not None:
        label += f", η={derived['peak_lr']:.3g}"
    warmup = spec.get("warmup")
    return label + (f", {_WARMUP.get(warmup, warmup)}" if warmup else "")


def run_labels(runs: Sequence[Mapping[str, Any]], baseline_id: int | None) -> list[str]:
    """Legend texts: the paper's label, the spec fields that differ, the final error."""
    specs = [r.get("spec") or {} for r in runs]
    keys = sorted({k for spec in specs for k in spec} - _LEGEND_SKIP)
    differing = [k for k in keys if len({repr(spec.get(k)) for spec in specs}) > 1]
    labels = []
    for run, spec in zip(runs, specs, strict=True):
        extra = [f"{k}={_legend_value(spec.get(k))}" for k in differing]
        label = ", ".join([paper_label(run), *extra])
        err = (run.get("summary") or {}).get("final_val_err")
        if err is not None:
            label += f": {100 * err:.2f}%"
        if run.get("id") == baseline_id:
            label += " · baseline"
        labels.append(label)
    # Identical labels (the same spec twice) get their run names.
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} [{runs[i].get('name') or runs[i].get('id')}]"
    return labels


def _legend_value(value: Any) -> str:
    return "/".join(map(str, value)) if isinstance(value, list) else str(value)


def _rgba(hex_color: str, alpha: float) -> str:
    n = int(hex_color[1:], 16)
    return f"rgba({n >> 16 & 255},{n >> 8 & 255},{n & 255},{alpha})"


def build_compare_figure(
    runs: Mapping[int, Mapping[str, Any]],
    series: Mapping[str, Mapping[str, Mapping[str, list]]],
    *,
    key: str,
    x: str,
    baseline_id: int | None,
    smoothing: float = 0.0,
) -> go.Figure:
    """Draw the compare view from run dicts and the ``runs`` object of GET /api/metrics."""
    import plotly.graph_objects as go

    label, scale = METRIC_LABELS.get(key, (key.replace("_", " "), 1.0))
    markers = key in _PER_EPOCH
    smooth_on = smoothing > 0 and not markers
    # Baseline first (legend, and drawn beneath the others), then by kn, then by id.
    order = sorted(
        runs,
        key=lambda i: (
            i != baseline_id,
            (runs[i].get("derived") or {}).get("total_batch") or 0,
            i,
        ),
    )
    labels = dict(zip(order, run_labels([runs[i] for i in order], baseline_id), strict=True))
    colors = iter(PALETTE * (len(order) // len(PALETTE) + 1))
    traces, has_lr = [], False
    for rid in order:
        is_base = rid == baseline_id
        color = BASELINE_COLOR if is_base else next(colors)
        name, group = labels[rid], str(rid)
        by_key = series.get(str(rid), {})
        s = by_key.get(key) or {}
        xs = s.get(x, [])
        ys = [None if v is None else v * scale for v in s.get("value", [])]
        if smooth_on:
            traces.append(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    showlegend=False,
                    hoverinfo="skip",
                    legendgroup=group,
                    line=dict(color=_rgba(color, 0.22), width=1),
                )
            )
            ys = ema(ys, smoothing)
        traces.append(
            go.Scatter(
                x=xs,
                y=ys,
                name=name,
                legendgroup=group,
                mode="lines+markers" if markers else "lines",
                marker=dict(size=4, color=color) if markers else None,
                line=dict(color=color, width=2 if is_base else 1.6),
                hovertemplate=f"%{{y:.4g}}<extra>{name}</extra>",
            )
        )
        lr = by_key.get("lr")
        if lr and key != "lr":
            has_lr = True
            traces.append(
                go.Scatter(
                    x=lr.get(x, []),
                    y=lr.get("value", []),
                    yaxis="y2",
                    mode="lines",
                    showlegend=False,
                    legendgroup=group,
                    line=dict(color=color, width=1.2),
                    hovertemplate=f"LR %{{y:.4g}}<extra>{name}</extra>",
                )
            )
    axis = dict(
        gridcolor="#eceef1",
        zerolinecolor="#d0d4da",
        linecolor="#aab",
        showline=True,
        ticks="outside",
        tickcolor="#aab",
        automargin=True,
    )
    layout = go.Layout(
        height=560,
        font=dict(
            family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial",
            size=12,
            color="#222",
        ),
        paper_bgcolor="#fff",
        plot_bgcolor="#fff",
        hovermode="closest",
        hoverlabel=dict(namelength=-1),
        margin=dict(l=64, r=16, t=8, b=44),
        legend=dict(
            x=1,
            xanchor="right",
            y=1,
            yanchor="top",
            bgcolor="rgba(255,255,255,0.85)",
            bordercolor="#dde",
            borderwidth=1,
            font=dict(size=11),
        ),
        # One x axis under both panels: zooming the curves zooms the LR with them.
        xaxis=dict(axis, title=dict(text=_X_TITLES.get(x, x)), anchor="y2" if has_lr else "y"),
        yaxis=dict(
            axis,
            title=dict(text=label),
            domain=[0.3, 1] if has_lr else [0, 1],
            exponentformat="power",
        ),
    )
    if has_lr:
        layout.yaxis2 = dict(axis, title=dict(text="LR"), domain=[0, 0.22], rangemode="tozero")
    return go.Figure(data=traces, layout=layout)


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
            frac = 1.0 if status == "succeeded" else float(run.get("progress") or 0.0)
            bar.n = round(1000 * min(max(frac, 0.0), 1.0))
            eta = run.get("eta_s")
            text = status
            if status == "running" and eta is not None:
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
