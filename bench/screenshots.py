"""Screenshots of every dashboard page (docs/img/*.png) from real training runs.

Starts the API server and a CPU worker on a scratch home (or reuses ``--home``), queues a
batch-size sweep of MNIST-1D CNNs (k·n = 64 ... 1024 against the k·n = 32 baseline, two
seeds) and two k·n = 256 runs without warmup and with constant warmup (Figure 2 of Goyal
et al.), then photographs: the new-run form with its LR preview, the comparison against
the baseline, the sweep summary, and a last run's page and the runs table while it trains.

    .venv/bin/python bench/screenshots.py                      # ~8 min on 2 CPUs
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

VENV_BIN = Path(sys.executable).parent
TERMINAL = {"succeeded", "failed", "diverged", "cancelled"}

BASE = {
    "model": "mnist1d_cnn",
    "dataset": "mnist1d",
    # 32,000 training samples: even k·n = 1024 takes 31 iterations per epoch (the paper's
    # comparisons hold the epochs, so a tiny set would starve the large batches of steps).
    "dataset_size": 40000,
    "epochs": 10,
    "workers": 1,
    "batch_per_worker": 32,
    "ref_batch": 32,
    "base_lr": 0.05,
    "warmup": "gradual",
    "warmup_epochs": 2,
    "milestones": [6, 9],
    "target_accuracy": 0.95,
    "checkpoint": False,
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


def submit(http: httpx.Client, epochs: int, seeds: list[int]) -> dict[str, Any]:
    base = {**BASE, "epochs": epochs}
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


def shoot(page: Any, route: str, path: Path, view: str | None, settle_ms: int = 400) -> None:
    page.evaluate("window.__drawn = []")
    page.goto(route)
    if view:
        page.wait_for_function(f"window.__drawn.some((d) => d.view === '{view}')", timeout=60_000)
    page.wait_for_timeout(settle_ms)
    page.screenshot(path=str(path), full_page=True)
    print("wrote", path)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--home", default=None, help="keep runs here; reuse them if present")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="0,1")
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
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=url)
            context.add_init_script(DRAWN_RECORDER)
            page = context.new_page()
            shoot(
                page,
                "/#/new?workers=32&warmup_epochs=2&epochs=10&ref_batch=32&milestones=6,9"
                "&baseline=1&name=kn%3D1024+gradual",
                out / "new-run.png",
                "new",
            )
            while any(r["status"] not in TERMINAL for r in http.get("/api/runs").json()):
                time.sleep(3)
            detail = http.get(f"/api/sweeps/{ids['sweep']}").json()
            base = [r["id"] for r in detail["runs"] if r["is_baseline"]]
            big = [r["id"] for r in detail["runs"] if r["derived"]["total_batch"] == FIG2_KN]
            chosen = sorted(base + big + [ids["none"], ids["constant"]])
            shoot(
                page,
                f"/#/compare?runs={','.join(map(str, chosen))}&baseline={base[0]}&smooth=0.6",
                out / "compare.png",
                "compare",
                800,
            )
            shoot(page, f"/#/sweep/{ids['sweep']}", out / "sweep.png", "sweep", 800)
            # One more run, photographed about half way: its live page and the table.
            live = {**BASE, "epochs": 2 * args.epochs, "workers": 2, "seed": 2}
            http.post(
                "/api/runs", json={"name": "kn=64 gradual, longer", "spec": live}
            ).raise_for_status()
            while True:
                running = http.get("/api/runs", params={"status": "running"}).json()
                if running and 0.3 <= (running[0]["progress"] or 0) <= 0.6:
                    break
                time.sleep(0.3)
            shoot(page, f"/#/run/{running[0]['id']}", out / "run.png", "run", 2000)
            shoot(page, "/#/runs", out / "runs.png", None, 1000)
            browser.close()
    finally:
        stop_worker(worker)
        stop(server)
    print("home:", home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
