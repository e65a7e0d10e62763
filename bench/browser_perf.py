"""Dashboard speed in headless Chromium against the real API server.

1. Compare view: ``--runs`` runs of ``--points`` iterations each (train_err and lr at every
   iteration, val_err each epoch) are written through ``store.metrics.MetricWriter``;
   the compare view opens on all of them. Measured: milliseconds from navigation start
   to the view's ``batchlab:drawn`` event (every trace drawn), first with an empty
   browser cache (Plotly.js downloaded and compiled; ``--cold-loads`` of them, each in a
   new context) and then again in the same context. Broken down: when Plotly.js had run,
   the /api/metrics request (the server's wait, the answer's size) and when it was in,
   building the traces and Plotly.react; then, for the full and the trimmed answer (issue
   12), the read from Python, JSON.parse in Chromium and the API's work in-process (read,
   JSON, gzip).
2. Live latency: a run page is open on a running run; points are logged one at a time
   through a MetricWriter (the trainer's DbSink path) at ``--rate`` per second. For each
   point: time from ``writer.add`` to the page's draw event that holds it (the page
   appends with Plotly.extendTraces and then announces the step it drew). Both clocks
   are this machine's wall clock (Python time.time, browser Date.now).

    .venv/bin/python bench/browser_perf.py                 # 20 runs x 100,000 points
    .venv/bin/python bench/browser_perf.py --runs 5 --points 20000 --live-points 50
    .venv/bin/python bench/browser_perf.py --running                  # runs still training
    .venv/bin/python bench/browser_perf.py --running --drop-overviews # ... without overviews
    .venv/bin/python bench/browser_perf.py --running --cold --settle 10  # a cold first read
    .venv/bin/python bench/browser_perf.py --running --cold --settle 10 --cold-loads 5

Needs Debian's Chromium (/usr/bin/chromium, or BATCHLAB_CHROMIUM). Prints a Markdown
table (docs/benchmarks/frontend.md records it).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

CHROMIUM = os.environ.get("BATCHLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DRAWN_RECORDER = (
    "window.__drawn = [];"
    "document.addEventListener('batchlab:drawn', (e) => window.__drawn.push("
    "{...e.detail, t: performance.now(), wall: Date.now()}));"
    # When plotly.min.js has run (its last act is to set window.Plotly): fetched,
    # compiled and executed.
    "Object.defineProperty(window, 'Plotly', {configurable: true, set(v) {"
    " window.__plotlyReady = performance.now();"
    " Object.defineProperty(window, 'Plotly', {value: v, writable: true, configurable: true});"
    "}});"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, database_url: str | None) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env["BATCHLAB_HOME"] = str(home)
    if database_url:
        env["BATCHLAB_DATABASE_URL"] = database_url
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "server.app:create_app",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--timeout-graceful-shutdown",
        "2",
    ]
    log = (home / "api.log").open("wb")
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(home / 'api.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).json().get("database") == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit("server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def spec_for(total_batch: int, seed: int) -> dict[str, Any]:
    from trainer.spec import RunSpec

    return RunSpec(
        model="mlp",
        dataset="synthetic",
        dataset_size=1_280_000,
        epochs=90,
        workers=total_batch // 32,
        batch_per_worker=32,
        seed=seed,
    ).model_dump()


def seed_runs(engine: Any, n_runs: int, points: int, *, running: bool = False) -> list[int]:
    """n_runs finished runs of ``points`` iterations (train_err, lr) + val_err per epoch;
    ``running``: left running, so only the live overviews their writer kept exist."""
    from store import db, runs
    from store.metrics import MetricWriter, build_overviews

    ids: list[int] = []
    sizes = [256 * 2**i for i in range(6)]
    for i in range(n_runs):
        kn = sizes[i % len(sizes)]
        spec = spec_for(kn, seed=i // len(sizes))
        with db.session(engine) as s:
            run = runs.create_run(s, name=f"perf kn={kn} #{i}", spec=spec, is_baseline=i == 0)
            ids.append(run.id)
            # A worker claims a run (a new attempt) before it writes points.
            runs.mark_running(s, run.id, host="bench", gpus="", worker="bench")
        rng = random.Random(i)
        per_epoch = max(1, points // 90)
        lr = 0.1 * kn / 256
        with MetricWriter(engine, run.id, max_pending=20_000) as w:
            for step in range(points):
                epoch = (step + 1) / per_epoch
                err = 0.25 + 0.7 * math.exp(-epoch / 20) + rng.gauss(0, 0.02)
                values = {"train_err": err, "lr": lr * 0.1 ** sum(epoch >= m for m in (30, 60, 80))}
                if (step + 1) % per_epoch == 0:
                    values["val_err"] = err + 0.02
                w.add(step, values, epoch=epoch, wall_time=0.05 * step)
        if not running:
            with db.session(engine) as s:
                runs.mark_finished(s, run.id, "succeeded", summary={"final_val_err": 0.25})
            build_overviews(engine, run.id)  # as the worker does when a run finishes
    return ids


def keep_alive(engine: Any, ids: list[int], every_s: float = 5.0) -> threading.Event:
    """Heartbeat the runs as their workers would, so the API's reaper leaves them
    running; set the returned event to stop."""
    from store import db, runs

    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            with db.session(engine) as s:
                for run_id in ids:
                    runs.heartbeat(s, run_id)
            stop.wait(every_s)

    threading.Thread(target=beat, name="heartbeats", daemon=True).start()
    return stop


RESOURCE_TIMING = """() => {
    const r = performance.getEntriesByType('resource');
    const last = (s) => r.filter((e) => e.name.includes(s)).at(-1);
    const m = last('/api/metrics?');
    const used = document.querySelector('script[src*="plotly"]');
    const p = used && last(new URL(used.src).pathname);
    return {metrics_ms: m && m.duration, metrics_end: m && m.responseEnd,
            metrics_wait: m && m.responseStart - m.requestStart,
            metrics_bytes: m && m.transferSize, metrics_raw: m && m.decodedBodySize,
            metrics_url: m && m.name, plotly_ms: p ? p.duration : 0, plotly_url: p && p.name,
            plotly_ready: window.__plotlyReady ?? null};
}"""

# The browser's share of one answer, timed apart in the open page: reading the body
# and JSON.parse (the page does both in api.js).
PARSE_TIMING = """async (url) => {
    const out = [];
    for (let i = 0; i < 3; i++) {
        const res = await fetch(url);
        const text = await res.text();
        const t = performance.now();
        JSON.parse(text);
        out.push(performance.now() - t);
    }
    return out;
}"""


def measure_compare(
    browser: Any, url: str, ids: list[int], repeats: int, cold_loads: int = 1
) -> list[dict]:
    """Page loads with every browser cache empty (each in a new context), then page loads
    in the last one (caches warm), then in-app navigations."""
    route = f"#/compare?runs={','.join(map(str, ids))}&baseline={ids[0]}"
    out = []
    for _ in range(cold_loads):
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        context.add_init_script(DRAWN_RECORDER)
        page = context.new_page()
        out.append(_page_load(page, url, route, "first page load (caches empty)"))
        if len(out) < cold_loads:
            context.close()
    for _ in range(repeats - 1):
        page.close()
        page = context.new_page()
        out.append(_page_load(page, url, route, "page load (caches warm)"))
    # Within the app (Runs -> Compare): Plotly is already compiled.
    for _ in range(repeats):
        page.evaluate("location.hash = '#/runs'")
        page.wait_for_selector(".runs-view")
        t0 = page.evaluate(
            """(route) => { window.__drawn = []; const t = performance.now();
                location.hash = route; return t; }""",
            route,
        )
        page.wait_for_function("window.__drawn.some((d) => d.view === 'compare')", timeout=60_000)
        drawn = page.evaluate("window.__drawn.find((d) => d.view === 'compare')")
        details = _details(page, drawn)
        details["metrics_end"] -= t0
        details["plotly_ms"] = None  # compiled at the page load, not fetched again
        out.append({"load": "in-app navigation", "total_ms": drawn["t"] - t0, **details})
    context.close()
    return out


def _page_load(page: Any, url: str, route: str, label: str) -> dict:
    page.goto(f"{url}/{route}")
    page.wait_for_function("window.__drawn.some((d) => d.view === 'compare')", timeout=120_000)
    drawn = page.evaluate("window.__drawn.find((d) => d.view === 'compare')")
    return {"load": label, "total_ms": drawn["t"], **_details(page, drawn)}


def _details(page: Any, drawn: dict) -> dict:
    points = page.evaluate(
        "document.getElementById('compare-chart').data.reduce((a, t) => a + t.x.length, 0)"
    )
    return {
        "draw_ms": drawn["ms"],
        "build_ms": drawn.get("build_ms"),
        "traces": drawn["traces"],
        "points": points,
        **page.evaluate(RESOURCE_TIMING),
    }


# The compare view's first read before and after issue 12's compact answer.
FULL_QUERY = "keys=train_err,lr&x=epoch&max_points=1500"
COMPACT_QUERY = FULL_QUERY + "&columns=epoch,value&digits=6&drop_flat=lr"


def server_alone(url: str, ids: list[int], query: str, repeats: int = 3) -> dict[str, Any]:
    """An /api/metrics read from Python, nothing else running: ms each, and its size."""
    runs = ",".join(map(str, ids))
    q = f"{url}/api/metrics?runs={runs}&{query}"
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = httpx.get(q, timeout=60)
        r.raise_for_status()
        times.append(1000 * (time.perf_counter() - t))
    return {"ms": times, "bytes": len(r.content), "gzip": int(r.headers["content-length"])}


def server_breakdown(engine: Any, ids: list[int], repeats: int = 3) -> dict[str, list[tuple]]:
    """The API's work for one /api/metrics answer, in this process (ms each, medians of
    ``repeats``, the series cache emptied first): read + downsample, JSON, gzip level 1."""
    import gzip

    from server.encode import dumps
    from store.metrics import Compact, cache, read_series

    trims = {
        "full": None,
        "compact": Compact(columns=("epoch", "value"), digits=6, drop_flat=frozenset({"lr"})),
    }
    out: dict[str, list[tuple]] = {}
    for name, trim in trims.items():
        for _ in range(repeats):
            cache.invalidate()
            t0 = time.perf_counter()
            body = {
                str(i): read_series(
                    engine, i, ["train_err", "lr"], x="epoch", max_points=1500, compact=trim
                )
                for i in ids
            }
            t1 = time.perf_counter()
            raw = dumps({"runs": body, "missing": []}).encode()
            t2 = time.perf_counter()
            gzip.compress(raw, compresslevel=1)
            t3 = time.perf_counter()
            out.setdefault(name, []).append((1000 * (t1 - t0), 1000 * (t2 - t1), 1000 * (t3 - t2)))
    return out


def parse_in_browser(browser: Any, url: str, ids: list[int], query: str) -> list[float]:
    """JSON.parse of one /api/metrics answer in Chromium (ms, 3 times)."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{url}/static/app.css")
    runs = ",".join(map(str, ids))
    got = page.evaluate(PARSE_TIMING, f"{url}/api/metrics?runs={runs}&{query}")
    context.close()
    return got


def measure_live(browser: Any, url: str, engine: Any, n_points: int, rate: float) -> list[float]:
    from store import db, runs
    from store.metrics import MetricWriter

    spec = spec_for(1024, seed=0)
    with db.session(engine) as s:
        run_id = runs.create_run(s, name="perf live", spec=spec).id
        runs.mark_running(s, run_id, host="bench", gpus="", worker="bench")
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.add_init_script(DRAWN_RECORDER)
    page = context.new_page()
    page.goto(f"{url}/#/run/{run_id}")
    page.wait_for_function("window.__drawn.some((d) => d.view === 'run')", timeout=60_000)
    time.sleep(1.0)  # the stream is connected after the (empty) history is drawn
    logged: dict[int, float] = {}
    with MetricWriter(engine, run_id) as writer:  # flushes every 250 ms, as the DbSink
        for step in range(n_points):
            logged[step] = time.time() * 1000
            writer.add(step, {"loss": 2.0 - step / n_points}, epoch=step / 100, wall_time=step)
            time.sleep(1 / rate)
    page.wait_for_function(
        "(n) => window.__drawn.some((d) => d.view === 'run' && d.lastStep.loss >= n)",
        arg=n_points - 1,
        timeout=30_000,
    )
    draws = page.evaluate(
        "window.__drawn.filter((d) => d.view === 'run').map((d) => [d.wall, d.lastStep.loss])"
    )
    with db.session(engine) as s:
        runs.mark_finished(s, run_id, "succeeded")
    context.close()
    latencies = []
    for step, t_log in logged.items():
        t_seen = min(wall for wall, last in draws if last >= step)
        latencies.append(t_seen - t_log)
    return latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--points", type=int, default=100_000, help="iterations per run")
    ap.add_argument(
        "--repeats", type=int, default=3, help="page loads (1st cold), then in-app navigations"
    )
    ap.add_argument(
        "--cold-loads", type=int, default=1, help="first page loads, each with empty caches"
    )
    ap.add_argument("--live-points", type=int, default=100)
    ap.add_argument("--rate", type=float, default=10.0, help="live points per second")
    ap.add_argument("--database-url", default=None, help="default: SQLite in a temp home")
    ap.add_argument(
        "--running", action="store_true", help="compare runs still running (live overviews)"
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds between the server answering /api/health and the first page load "
        "(its start-up work, migration check and first maintenance pass, done)",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="add newer empty runs, so the server's start-up cache warming (its most recent "
        "runs) reads none of the compared ones",
    )
    ap.add_argument(
        "--drop-overviews",
        action="store_true",
        help="delete every stored overview after seeding: reads take the points path",
    )
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from store import db

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        url_db = args.database_url or f"sqlite:///{home / 'batchlab.db'}"
        engine = db.get_engine(url_db)
        db.migrate(engine)
        t0 = time.perf_counter()
        ids = seed_runs(engine, args.runs, args.points, running=args.running)
        seed_s = time.perf_counter() - t0
        if args.drop_overviews:
            with engine.begin() as conn:
                conn.exec_driver_sql("DELETE FROM series_overviews")
        if args.cold:
            from server.app import WARM_RUNS
            from store import runs

            with db.session(engine) as s:
                for i in range(WARM_RUNS):
                    runs.create_run(s, name=f"newer #{i}", spec=spec_for(256, seed=i))
        beating = keep_alive(engine, ids) if args.running else threading.Event()
        proc, url = start_server(home, args.database_url)
        time.sleep(args.settle)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                loads = measure_compare(browser, url, ids, args.repeats, args.cold_loads)
                alone = {q: server_alone(url, ids, q) for q in (FULL_QUERY, COMPACT_QUERY)}
                parse = {q: parse_in_browser(browser, url, ids, q) for q in alone}
                work = server_breakdown(engine, ids)
                lat = measure_live(browser, url, engine, args.live_points, args.rate)
                browser.close()
        finally:
            beating.set()
            stop(proc)
            engine.dispose()

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; database: {engine.dialect.name}"
    )
    state = "running" if args.running else "finished"
    overviews = "none (dropped)" if args.drop_overviews else "stored"
    print(
        f"seeded {args.runs} {state} runs x {args.points} iterations in {seed_s:.1f} s; "
        f"overviews: {overviews}; first load {args.settle:g} s after the server answered"
        f"{'; its start-up cache warming kept off them' if args.cold else ''}\n"
    )
    print(
        "| compare load | all traces drawn (ms) | /api/metrics (ms) | of it: server wait "
        "| answer (KB gzip / raw) | Plotly.js fetch (ms) | Plotly.js ready at (ms) "
        "| data in at (ms) | data in -> drawn (ms) | build traces (ms) | Plotly.react (ms) "
        "| traces | points drawn |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    dash = "–"
    for r in loads:
        ready = r["plotly_ready"]
        build = r["build_ms"]
        print(
            f"| {r['load']} | {r['total_ms']:.0f} | {r['metrics_ms']:.0f} | "
            f"{r['metrics_wait']:.0f} | "
            f"{(r['metrics_bytes'] or 0) / 1024:.0f} / {(r['metrics_raw'] or 0) / 1024:.0f} | "
            f"{dash if r['plotly_ms'] is None else round(r['plotly_ms'])} | "
            f"{dash if ready is None or r['load'] == 'in-app navigation' else round(ready)} | "
            f"{r['metrics_end']:.0f} | "
            f"{r['total_ms'] - r['metrics_end']:.0f} | "
            f"{dash if build is None else round(build)} | "
            f"{r['draw_ms'] - (build or 0):.0f} | {r['traces']} | {r['points']} |"
        )
    for label in ("first page load (caches empty)", "page load (caches warm)", "in-app navigation"):
        got = [r["total_ms"] for r in loads if r["load"] == label]
        if got:
            print(f"\n{label}: median {statistics.median(got):.0f} ms")
    print(f"\npage's /api/metrics query: {loads[0]['metrics_url'].split('&', 1)[-1]}")
    print(f"page's Plotly.js: {loads[0]['plotly_url']}")
    print("\n| /api/metrics, nothing else running | from Python (gzip), ms | JSON.parse in "
          "Chromium, ms | KB gzip / raw |")  # fmt: skip
    print("|---|---|---|---|")
    for q, a in alone.items():
        print(
            f"| {'compact' if q == COMPACT_QUERY else 'full'}: `{q}` | "
            + ", ".join(f"{t:.0f}" for t in a["ms"])
            + " | "
            + ", ".join(f"{t:.0f}" for t in parse[q])
            + f" | {a['gzip'] / 1024:.0f} / {a['bytes'] / 1024:.0f} |"
        )
    print("\n| the API's work per answer (in-process, median ms) | read + downsample | JSON "
          "| gzip -1 |")  # fmt: skip
    print("|---|---|---|---|")
    for name, runs_ in work.items():
        cols = [statistics.median(r[k] for r in runs_) for k in range(3)]
        print(f"| {name} | " + " | ".join(f"{c:.0f}" for c in cols) + " |")
    print(
        f"\nlive latency, {len(lat)} points at {args.rate:g}/s, log -> drawn (ms): "
        f"p50 {pct(lat, 50):.0f}, p95 {pct(lat, 95):.0f}, max {max(lat):.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
