"""The dashboard's compare figure for notebooks (``Client.compare_figure``).

The look and the legend rules live in frontend/figure_spec.json, which the dashboard's
frontend/js/compare.js reads too; this module mirrors compare.js's algorithms (seed
folding, debiased EMA, labels) step for step, and tests/browser/test_figure_parity.py
holds the two to the same traces.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import plotly.graph_objects as go

BANDS = ("minmax", "std", "off")
# What compare.js's escapeHtml writes: Plotly renders trace names as (a little) HTML.
_ENTITIES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;"})


@cache
def figure_spec() -> dict[str, Any]:
    return json.loads(files("frontend").joinpath("figure_spec.json").read_text("utf-8"))


def ema(values: Sequence[float | None], smoothing: float) -> list[float | None]:
    """TensorBoard's debiased EMA (smoothing.js ``debiasedEma``).

    ``last = s * last + (1 - s) * v``, shown as ``last / (1 - s**t)`` with t the finite
    values seen so far; non-finite values pass through, a constant series is unchanged.
    """
    if not smoothing > 0 or len(set(values)) <= 1:
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


def fold(curves: Sequence[tuple[list, list]], band: str) -> dict[str, list[float]]:
    """Mean and band of one configuration's seeds (smoothing.js ``aggregate``).

    The curves are interpolated onto the densest one's x grid within the range all cover;
    ``band`` "minmax" or "std" (mean ± population std).
    """
    import numpy as np

    usable = [(np.asarray(x, float), np.asarray(y, float)) for x, y in curves if len(x)]
    if not usable:
        return {"x": [], "mean": [], "lo": [], "hi": []}
    start, end = max(x[0] for x, _ in usable), min(x[-1] for x, _ in usable)
    densest = max(usable, key=lambda c: len(c[0]))[0]
    grid = densest[(densest >= start) & (densest <= end)]
    ys = np.array([np.interp(grid, x, y) for x, y in usable])
    keep = np.isfinite(ys).any(axis=0)
    grid, ys = grid[keep], ys[:, keep]
    mean = np.nanmean(ys, axis=0)
    if band == "std":
        sd = np.nanstd(ys, axis=0)
        lo, hi = mean - sd, mean + sd
    else:
        lo, hi = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
    return {"x": grid.tolist(), "mean": mean.tolist(), "lo": lo.tolist(), "hi": hi.tolist()}


@dataclass
class Config:
    """Runs whose specs are equal apart from the seed: one curve (compare.js ``groupRuns``)."""

    key: str
    spec: dict[str, Any]
    runs: list[Mapping[str, Any]] = field(default_factory=list)
    is_baseline: bool = False
    color: str = ""
    label: str = ""


def group_runs(runs: Sequence[Mapping[str, Any]], baseline_id: int | None) -> list[Config]:
    """Configurations, baseline first, then by kn and first id; coloured and labelled."""
    by_key: dict[str, Config] = {}
    for run in runs:
        spec = run.get("spec") or {}
        rest = sorted((k, v) for k, v in spec.items() if k != "seed")
        key = json.dumps(rest, separators=(",", ":"), ensure_ascii=False)
        by_key.setdefault(key, Config(key, spec)).runs.append(run)
    groups = list(by_key.values())
    for g in groups:
        g.is_baseline = any(r.get("id") == baseline_id for r in g.runs)
    groups.sort(key=lambda g: (not g.is_baseline, _kn(g.runs[0]), g.runs[0]["id"]))
    fs = figure_spec()
    colors = iter(fs["palette"] * (len(groups) // len(fs["palette"]) + 1))
    for g in groups:
        g.color = fs["baseline"]["color"] if g.is_baseline else next(colors)
    _label(groups)
    return groups


def _label(groups: list[Config]) -> None:
    """The paper's words for kn, η and warmup, then each other field whose value differs
    among the configurations where it has an effect (figure_spec.json), then the error."""
    fs = figure_spec()
    words, only = fs["legend_words"], fs["legend_only_with"]

    def applies(spec: Mapping[str, Any], k: str) -> bool:
        return spec.get(k) is not None and (k not in only or spec.get(only[k][0]) in only[k][1])

    keys = dict.fromkeys(k for g in groups for k in g.spec if k not in fs["legend_skip"])
    values = {k: {json.dumps(g.spec[k]) for g in groups if applies(g.spec, k)} for k in keys}
    differing = [k for k in keys if len(values[k]) > 1]
    for g in groups:
        run, spec = g.runs[0], g.spec
        label = f"kn={format_kn(_kn(run))}, η={num((run.get('derived') or {}).get('peak_lr'))}"
        if spec.get("warmup"):
            label += ", " + words["warmup"].get(spec["warmup"], spec["warmup"])
        label += "".join(
            f", {_words(k, spec[k], words.get(k))}" for k in differing if applies(spec, k)
        )
        errs = [(r.get("summary") or {}).get("final_val_err") for r in g.runs]
        errs = [e for e in errs if isinstance(e, int | float) and math.isfinite(e)]
        if errs:
            mean = sum(errs) / len(errs)
            std = math.sqrt(sum((e - mean) ** 2 for e in errs) / len(errs))
            label += f": {100 * mean:.2f}%" + (f"±{100 * std:.2f}" if std > 0 else "")
        if len(g.runs) > 1:
            seeds = {(r.get("spec") or {}).get("seed") for r in g.runs}
            label += f" ({len(g.runs)} {'seeds' if len(seeds) == len(g.runs) else 'runs'})"
        g.label = label + (" · baseline" if g.is_baseline else "")
    labels = [g.label for g in groups]
    for g in groups:
        if labels.count(g.label) > 1:
            g.label += f" [{', '.join(str(r.get('name') or r['id']) for r in g.runs)}]"


def _words(k: str, value: Any, words: Any) -> str:
    """``words[value]``, ``words`` with the value for {}, or field=value."""
    if isinstance(words, str):
        return words.replace("{}", _text(value))
    return (
        words.get(value, f"{k}={_text(value)}")
        if isinstance(words, dict)
        else f"{k}={_text(value)}"
    )


def _text(value: Any) -> str:
    """A spec value as JavaScript's String() writes it (5.0 -> "5", True -> "true")."""
    if isinstance(value, list):
        return "/".join(map(_text, value))
    if isinstance(value, float):
        import numpy as np

        return np.format_float_positional(value, trim="-")
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _kn(run: Mapping[str, Any]) -> int:
    spec = run.get("spec") or {}
    total = (run.get("derived") or {}).get("total_batch")
    return int(total or spec.get("workers", 1) * spec.get("batch_per_worker", 32))


def format_kn(kn: int) -> str:
    """Total batch as the paper writes it: 256, 1k, 8k (k = 1024), as format.js does."""
    return f"{kn / 1024:g}k" if kn >= 1024 and kn % 512 == 0 else str(kn)


def num(x: float | None) -> str:
    """Three significant digits, no trailing zeros (format.js ``num``)."""
    return "–" if x is None else format(float(f"{x:.3g}"), "g")


def rgba(hex_color: str, alpha: float) -> str:
    n = int(hex_color[1:], 16)
    return f"rgba({n >> 16 & 255},{n >> 8 & 255},{n & 255},{alpha})"


def trace(kind: str, values: Mapping[str, Any], **data: Any) -> dict[str, Any]:
    """One of the spec's trace templates with its "$color", "$name", ... filled in."""

    def fill(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: fill(x) for k, x in v.items()}
        if isinstance(v, str) and v[1:] in values and v[0] == "$":
            return values[v[1:]]  # a whole "$width" keeps its type
        if isinstance(v, str):
            return re.sub(r"\$(\w+)", lambda m: str(values.get(m[1], m[0])), v)
        return v

    return {**fill(figure_spec()["traces"][kind]), **data}


def compare_traces(
    groups: Sequence[Config],
    series: Mapping[str, Mapping[str, Mapping[str, list]]],
    *,
    key: str,
    x: str,
    smoothing: float,
    band: str,
) -> list[dict[str, Any]]:
    """Plotly trace dicts, as compare.js ``buildTraces`` makes them (order and meta too)."""
    fs = figure_spec()
    metric = fs["metrics"].get(key, {})
    markers, scale = metric.get("markers", False), metric.get("scale", 1)
    smoothing = 0.0 if markers else smoothing

    def curve(run: Mapping[str, Any], k: str, factor: float) -> tuple[list, list] | None:
        s = (series.get(str(run["id"])) or {}).get(k)
        if not s or not s["value"]:
            return None
        xs = [(st + 1) * _kn(run) for st in s["step"]] if x == "samples" else s[x]
        return xs, [None if v is None else v * factor for v in s["value"]]

    out: list[dict[str, Any]] = []
    for g in groups:
        pairs = [(r["id"], c) for r in g.runs if (c := curve(r, key, scale))]
        lr = curve(g.runs[0], "lr", 1) if key != "lr" and pairs else None
        out += _group_traces(g, pairs, lr, markers=markers, smoothing=smoothing, band=band)
    return out


def _group_traces(
    g: Config, pairs: list, lr: tuple | None, *, markers: bool, smoothing: float, band: str
) -> list[dict[str, Any]]:
    fs = figure_spec()
    width = fs["baseline"]["width"] if g.is_baseline else fs["line_width"]
    values = {"color": g.color, "width": width, "name": g.label.translate(_ENTITIES)}
    values |= {"faint": rgba(g.color, fs["raw_alpha"]), "fill": rgba(g.color, fs["band_alpha"])}
    out: list[dict[str, Any]] = []

    def add(kind: str, xs: list, ys: list, **meta: Any) -> None:
        meta = {"group": g.key, "baseline": g.is_baseline, **meta}
        t = trace(kind, values, legendgroup=g.key, x=xs, y=ys, meta=meta)
        if kind == "curve":
            t |= {"name": values["name"], "showlegend": not any("name" in o for o in out)}
            t |= trace("markers", values) if markers else {}
        out.append(t)

    if not pairs:
        add("curve", [], [])  # the configuration stays in the legend before it has points
    elif len(pairs) > 1 and band != "off":
        agg = fold([(c[0], ema(c[1], smoothing)) for _, c in pairs], band)
        add("band_lo", agg["x"], agg["lo"], band="lo")
        add("band_hi", agg["x"], agg["hi"], band=band)
        if smoothing > 0:
            raw = fold([c for _, c in pairs], band)
            add("raw", raw["x"], raw["mean"], raw=True)
        add("curve", agg["x"], agg["mean"], mean=True, runs=[i for i, _ in pairs])
    else:
        for i, (xs, ys) in pairs:
            if smoothing > 0:
                add("raw", xs, ys, raw=True)
            add("curve", xs, ema(ys, smoothing), run=i)
    if lr:
        add("lr", *lr, lr=True)
    return out


def compare_layout(key: str, x: str, has_lr: bool, logy: bool = False) -> dict[str, Any]:
    """The layout of compare.js's chart: one x axis under the curves and the LR panel."""
    fs = figure_spec()
    metric = fs["metrics"].get(key, {"label": key.replace("_", " ")})
    axis, lr = fs["axis"], fs["lr_panel"]
    x_title = {"text": fs["x_titles"].get(x, x)}
    layout = {
        **fs["layout"],
        "xaxis": {**axis, "title": x_title, "anchor": "y2" if has_lr else "y"},
        "yaxis": {
            **axis, "title": {"text": metric["label"]}, "exponentformat": "power",
            "domain": lr["curves_domain"] if has_lr else [0, 1],
            "type": "log" if logy else "linear",
        },
    }  # fmt: skip
    if has_lr:
        layout["yaxis2"] = {**axis, "title": {"text": lr["title"]}, "domain": lr["domain"]}
        layout["yaxis2"]["rangemode"] = "tozero"
    return layout


def build_compare_figure(
    runs: Sequence[Mapping[str, Any]],
    series: Mapping[str, Mapping[str, Mapping[str, list]]],
    *,
    key: str,
    x: str,
    baseline_id: int | None,
    smoothing: float = 0.0,
    band: str = "minmax",
    logy: bool = False,
) -> go.Figure:
    """The compare view from run dicts and the ``runs`` object of GET /api/metrics."""
    import plotly.graph_objects as go

    groups = group_runs(runs, baseline_id)
    traces = compare_traces(groups, series, key=key, x=x, smoothing=smoothing, band=band)
    has_lr = any(t.get("yaxis") == "y2" for t in traces)
    return go.Figure(data=traces, layout=compare_layout(key, x, has_lr, logy))
