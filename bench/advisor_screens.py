"""Screenshots of the dashboard's layer-health heatmaps for runs trained with
``batchlab train`` (docs/ui.md): the run folders' metrics.jsonl go into a fresh SQLite
store, a server is started on it, and Chromium photographs the compare page's small
multiples (and each run's page).

    .venv/bin/batchlab train examples/fig3/kn1024_constant.yaml --out runs/c --set checkpoint=false
    .venv/bin/batchlab train examples/fig3/kn1024_gradual.yaml --out runs/g --set checkpoint=false
    .venv/bin/python bench/advisor_screens.py runs/c runs/g --out docs/img/layer_health

Needs Chromium at /usr/bin/chromium (``make browser``) and Playwright.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def load_run(engine: Any, folder: Path) -> int:
    """A finished run from a ``batchlab train`` folder: its spec, summary and points."""
    import yaml

    from store import db, metrics, runs
    from trainer.sink import read_jsonl

    spec = yaml.safe_load((folder / "spec.yaml").read_text())
    result = json.loads((folder / "summary.json").read_text())  # FitResult.to_dict()
    with db.session(engine) as s:
        run_id = runs.create_run(s, name=folder.name, spec=spec).id
    points = []
    for row in read_jsonl(folder / "metrics.jsonl"):
        step, epoch, wall = row.pop("step"), row.pop("epoch"), row.pop("wall_time")
        points.append((step, row, epoch, wall))
    metrics.write_points(engine, run_id, points)
    with db.session(engine) as s:
        runs.mark_running(s, run_id, host="bench", gpus="", worker="bench")
        runs.mark_finished(
            s, run_id, result.get("status", "succeeded"), summary=result.get("summary")
        )
    return run_id


def serve(home: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env["BATCHLAB_HOME"] = str(home)
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "server.app:create_app",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/api/health", timeout=2).json().get("database") == "ok":
                return proc, url
        except (httpx.HTTPError, ValueError):
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="batchlab train --out folders")
    parser.add_argument("--out", type=Path, required=True, help="file prefix of the PNGs")
    parser.add_argument("--stat", default="dead", help="dead | w_norm | g_norm | update_ratio")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from store import db

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        engine = db.get_engine(f"sqlite:///{home / 'batchlab.db'}")
        db.migrate(engine)
        ids = [load_run(engine, f) for f in args.folders]
        engine.dispose()
        proc, url = serve(home)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(
                    executable_path="/usr/bin/chromium", args=["--no-sandbox"]
                )
                page = browser.new_page(viewport={"width": 1300, "height": 900})
                page.add_init_script(
                    "window.__drawn = []; document.addEventListener('batchlab:drawn',"
                    " (e) => window.__drawn.push(e.detail));"
                )
                page.goto(f"{url}/#/compare?runs={','.join(map(str, ids))}&x=epoch")
                page.wait_for_function("window.__drawn.some((d) => d.view === 'compare-health')")
                if args.stat != "dead":
                    page.select_option(".compare-health select[name=health_stat]", args.stat)
                    page.wait_for_function(
                        "(s) => window.__drawn.some("
                        "(d) => d.view === 'compare-health' && d.stat === s)",
                        arg=args.stat,
                    )
                page.wait_for_timeout(500)
                shot = args.out.with_name(f"{args.out.name}_compare_{args.stat}.png")
                page.locator(".compare-health").screenshot(path=str(shot))
                print(shot)
                for run_id, folder in zip(ids, args.folders, strict=True):
                    page.goto(f"{url}/#/run/{run_id}?x=epoch&health={args.stat}")
                    page.wait_for_function("window.__drawn.some((d) => d.view === 'health')")
                    page.wait_for_timeout(500)
                    shot = args.out.with_name(f"{args.out.name}_run_{folder.name}.png")
                    page.locator(".run-charts").screenshot(path=str(shot))
                    print(shot)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
