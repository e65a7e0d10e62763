"""Screenshots of a real multi-node run (docs/img/multinode-run.png, docs/img/workers.png).

Starts the API and three CPU workers on one scratch home (one machine standing in for
three; the nodes meet over loopback), queues a 2-node run of the demo's MNIST-1D CNN and
a second 2-node run behind it, and while the first trains photographs its run page (the
Nodes table) and the workers view (which run and slot each worker holds; the second run
waiting for a node). The runs are cancelled at the end.

    .venv/bin/python bench/multinode_screens.py          # about 1 minute on 2 CPUs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.browser_perf import CHROMIUM, CHROMIUM_ARGS, DRAWN_RECORDER, start_server, stop  # noqa: E402
from bench.screenshots import BASE, shoot, start_worker, stop_worker  # noqa: E402
from core.status import ACTIVE_STATUSES  # noqa: E402


def wait_training(http: httpx.Client, run_id: int, timeout_s: float = 180) -> None:
    """Until the run's gang trains and a fifth of it is done (curves worth showing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = http.get(f"/api/runs/{run_id}").json()
        if run["status"] == "running" and run["progress"] > 0.2:
            return
        if run["status"] not in ACTIVE_STATUSES:
            raise RuntimeError(f"run {run_id} ended {run['status']}: {run['error']}")
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} not a fifth done in {timeout_s} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    out = Path(args.out)
    home = Path(tempfile.mkdtemp(prefix="batchlab-multinode-shots-"))
    os.environ["BATCHLAB_NODE_ADDR"] = "127.0.0.1"  # the workers inherit it

    from playwright.sync_api import sync_playwright

    server, url = start_server(home, None)
    workers = []
    http = httpx.Client(base_url=url, timeout=30)
    try:
        for _ in range(3):
            workers.append(start_worker(home))
            time.sleep(1)  # distinct names: cpu-<pid>@host
        spec = {**BASE, "workers": 8, "nodes": 2, "epochs": 6, "milestones": [4, 5]}
        first = http.post("/api/runs", json={"name": "kn=256 on 2 nodes", "spec": spec})
        second = http.post(
            "/api/runs", json={"name": "kn=256 on 2 nodes, next", "spec": {**spec, "seed": 1}}
        )
        ids = [first.raise_for_status().json()["run"]["id"], second.json()["run"]["id"]]
        wait_training(http, ids[0])
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=url)
            context.add_init_script(DRAWN_RECORDER)
            page = context.new_page()
            shoot(page, f"/#/run/{ids[0]}", out / "multinode-run.png", "run", 1500)
            shoot(page, "/#/workers", out / "workers.png", "workers", 1500)
            browser.close()
        for run_id in ids:
            http.post(f"/api/runs/{run_id}/cancel")
    finally:
        for worker in workers:
            stop_worker(worker)
        stop(server)
    print("home:", home)


if __name__ == "__main__":
    main()
