"""Screenshots of every dashboard page (docs/img/*.png) from real training runs.

Starts the API server and a CPU worker on a scratch home (or reuses ``--home``), queues a
batch-size sweep of small MNIST-1D CNNs (k·n = 64 ... 1024 against the k·n = 32 baseline)
and two k·n = 256 runs without warmup and with constant warmup (Figure 2 of Goyal et al.),
tags and annotates some of them, then photographs: the new-run form with its LR preview,
the comparison against the baseline (light and dark), the sweep summary, the
sweep's parallel coordinates, a finished run's page (timings, system metrics,
log), and, while a last run trains, its live page and the runs table with extra columns
and a selection (the bulk-action bar).

    .venv/bin/python bench/screenshots.py                      # 4-9 min on 2 CPUs
    .venv/bin/python bench/screenshots.py --home /tmp/shots    # keep the runs; a second
                                                               # call trains one run only
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.browser_perf import CHROMIUM, CHROMIUM_ARGS, DRAWN_RECORDER, start_server, stop  # noqa: E402
from core.status import FINAL_STATUSES  # noqa: E402

VENV_BIN = Path(sys.executable).parent

BASE = {
    "model": "mnist1d_cnn",
    "dataset": "mnist1d",
    # 32,000 training samples: even k·n = 1024 takes 31 iterations per epoch (the paper's
    # comparisons hold the epochs, so a tiny set would starve the large batches of steps).
    "dataset_size": 40000,
    "epochs": 8,
    "workers": 1,
    "batch_per_worker": 32,
    "ref_batch": 32,
    "base_lr": 0.05,
    "warmup": "gradual",
    "warmup_epochs": 2,
    "milestones": [6, 7],
    "target_accuracy": 0.95,
    # The run page offers the checkpoint download and "train N more epochs" only with one.
    "checkpoint": True,
}
SIZES = [64, 128, 256, 512, 1024]
# The k·n of the warmup comparison (Figure 2): gradual (the sweep's), none and constant.
FIG2_KN = 256


def start_worker(home: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env["BATCHLAB_HOME"] = str(home)
    argv = [
        str(VENV_BIN / "batchlab"),
        "worker",
        "--gpus",
        "none",
        "--pool",
        "solo",
        "--loglevel",
        "warning",
    ]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdout=(home / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 2), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def spec_for(epochs: int, **over: Any) -> dict[str, Any]:
    """BASE trained for `epochs`, its LR divided by 10 two epochs and one epoch before the end."""
    return {**BASE, "epochs": epochs, "milestones": [epochs - 2, epochs - 1], **over}


def submit(http: httpx.Client, epochs: int, seeds: list[int]) -> dict[str, Any]:
    base = spec_for(epochs)
    sweep = http.post(
        "/api/sweeps",
        json={
            "name": "MNIST-1D CNN, k·n 32 → 1024",
            "spec": base,
            "batch_sizes": SIZES,
            "seeds": seeds,
            "baseline": True,
        },
    )
    sweep.raise_for_status()
    extra = {}
    for warmup in ("none", "constant"):
        spec = {**base, "workers": FIG2_KN // 32, "warmup": warmup}
        r = http.post("/api/runs", json={"name": f"kn={FIG2_KN} {warmup} warmup", "spec": spec})
        r.raise_for_status()
        extra[warmup] = r.json()["run"]["id"]
    return {"sweep": sweep.json()["sweep"]["id"], **extra}


def annotate(
    http: httpx.Client, sweep: list[dict[str, Any]], fig2: list[int], pictured: int
) -> None:
    """Tags and notes, as a researcher would leave them (PATCH replaces, so reruns agree)."""
    for run in sweep:
        tags = ["sweep"] + (["large-batch"] if run["derived"]["total_batch"] >= 512 else [])
        body: dict[str, Any] = {"tags": tags}
        if run["id"] == pictured:
            body["notes"] = "Linear scaling rule (η = 0.05 · k·n / 32), 2 epochs of gradual warmup."
        http.patch(f"/api/runs/{run['id']}", json=body).raise_for_status()
    for run_id in fig2:
        body = {"tags": ["fig2"]}
        http.patch(f"/api/runs/{run_id}", json=body).raise_for_status()


def shoot(
    page: Any,
    route: str,
    path: Path,
    view: str | None,
    settle_ms: int = 400,
    before: Any = None,
) -> None:
    page.evaluate("window.__drawn = []")
    page.goto(route)
    if view:
        page.wait_for_function(f"window.__drawn.some((d) => d.view === '{view}')", timeout=60_000)
    page.wait_for_timeout(settle_ms)
    if before:
        before(page)
    page.screenshot(path=str(path), full_page=True)
    print("wrote", path, flush=True)


def wait_for_worker(http: httpx.Client, timeout_s: float = 120) -> None:
    """The header's light and the form's queue hint read the workers: wait for ours."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = http.get("/api/workers").json()["workers"]
        if any(w.get("alive") is not False for w in workers):
            return
        time.sleep(1)


def select_rows(page: Any, count: int) -> None:
    """Tick the first `count` rows of the runs table: the bulk-action bar appears."""
    boxes = page.locator("table.runs tbody input[type=checkbox]")
    for i in range(count):
        boxes.nth(i).check()
    page.wait_for_selector(".bulk:not([hidden])")
    page.wait_for_timeout(300)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--home", default=None, help="keep runs here; reuse them if present")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", default="0")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    home = Path(args.home or tempfile.mkdtemp(prefix="batchlab-shots-"))
    home.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    server, url = start_server(home, None)
    worker = start_worker(home)
    http = httpx.Client(base_url=url, timeout=30)
    try:
        sweeps = http.get("/api/sweeps").json()
        if sweeps:
            sweep_id = sweeps[-1]["id"]
            names = {r["name"]: r["id"] for r in http.get("/api/runs").json()}
            ids = {
                "sweep": sweep_id,
                "none": names[f"kn={FIG2_KN} none warmup"],
                "constant": names[f"kn={FIG2_KN} constant warmup"],
            }
        else:
            ids = submit(http, args.epochs, [int(s) for s in args.seeds.split(",")])
        e = args.epochs
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=url)
            context.add_init_script(DRAWN_RECORDER)
            page = context.new_page()
            wait_for_worker(http)
            shoot(
                page,
                f"/#/new?workers=32&warmup_epochs=2&epochs={e}&ref_batch=32&base_lr=0.05"
                f"&dataset_size={BASE['dataset_size']}"
                f"&milestones={e - 2},{e - 1}&baseline=1&name=kn%3D1024+gradual",
                out / "new-run.png",
                "new",
            )
            t0 = time.monotonic()
            while any(r["status"] not in FINAL_STATUSES for r in http.get("/api/runs").json()):
                time.sleep(3)
            print(f"runs trained in {time.monotonic() - t0:.0f} s", flush=True)
            detail = http.get(f"/api/sweeps/{ids['sweep']}").json()
            base = [r["id"] for r in detail["runs"] if r["is_baseline"]]
            big = [r["id"] for r in detail["runs"] if r["derived"]["total_batch"] == FIG2_KN]
            annotate(http, detail["runs"], [ids["none"], ids["constant"]], big[0])
            chosen = sorted(base + big + [ids["none"], ids["constant"]])
            compare = f"/#/compare?runs={','.join(map(str, chosen))}&baseline={base[0]}&smooth=0.6"
            shoot(page, compare, out / "compare.png", "compare", 800)
            shoot(page, f"/#/sweep/{ids['sweep']}", out / "sweep.png", "sweep", 800)
            shoot(page, f"/#/parallel?group={ids['sweep']}", out / "parallel.png", "parallel", 800)
            # A finished run: every panel (training, timings, system metrics) and its log.
            shoot(page, f"/#/run/{big[0]}?x=epoch&smooth=0.6", out / "run.png", "run", 1500)
            dark = browser.new_context(
                viewport={"width": 1440, "height": 900}, base_url=url, color_scheme="dark"
            )
            dark.add_init_script(DRAWN_RECORDER)
            shoot(dark.new_page(), compare, out / "compare-dark.png", "compare", 800)
            dark.close()
            # One more run, photographed about half way: its live page and the table.
            live = spec_for(2 * e, workers=2, seed=2)
            live_id = http.post(
                "/api/runs", json={"name": "kn=64 gradual, longer", "spec": live}
            ).json()["run"]["id"]
            while True:
                progress = http.get(f"/api/runs/{live_id}").json()["progress"] or 0
                if 0.3 <= progress <= 0.6:
                    break
                time.sleep(0.3)
            shoot(page, f"/#/run/{live_id}", out / "run-live.png", "run", 2000)
            shoot(
                page,
                "/#/runs?sort=-kn&cols=s.best_val_err,s.samples_per_s",
                out / "runs.png",
                "runs",
                1000,
                before=lambda pg: select_rows(pg, 3),
            )
            browser.close()
            # Stopping the worker mid-run would fail the run; a cancel leaves it tidy.
            http.post(f"/api/runs/{live_id}/cancel")
    finally:
        stop_worker(worker)
        stop(server)
    print("home:", home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
