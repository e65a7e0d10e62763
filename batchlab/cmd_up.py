"""``batchlab up``: the whole service on one machine, in one command.

Starts the API (uvicorn, in this process) and ``batchlab worker`` (a child process) on
the same database and broker: by default SQLite files under BATCHLAB_HOME, so nothing
needs installing. ``--demo`` queues a small comparison the first time (the paper's
picture on MNIST-1D: a kn=32 baseline against a 16x larger batch without and with
gradual warmup). Ctrl-C stops both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

HELP = "start the API and a worker on this machine (SQLite by default); --demo queues runs"
DESCRIPTION = """\
Start the batchlab API and dashboard together with a training worker (one per GPU, or
one on the CPU), on the database and broker of BATCHLAB_DATABASE_URL /
BATCHLAB_BROKER_URL, by default SQLite files in BATCHLAB_HOME (./.batchlab).

--demo queues a comparison on MNIST-1D when the database has no runs yet: a kn=32
baseline and kn=512 without and with gradual warmup (specs in examples/demo/). They
train one after the other in a few minutes on a laptop CPU; watch them arrive live.

The API runs at a lower CPU priority than the worker (--api-nice, default 5), so
dashboard readers take the CPU the training leaves rather than slowing it.

Ctrl-C stops the API and the worker (within about 20 s). A run still training is
stopped too; once its heartbeat is 30 s old it is re-queued and resumes from its last
epoch checkpoint when a worker runs again (a run stopped this way twice is marked failed).

examples:
  batchlab up --demo                   # then open http://127.0.0.1:8000
  batchlab up --port 8080 --gpus 0,1
  batchlab up --no-worker              # API only (workers started elsewhere)
  batchlab up -v                       # also log every HTTP request
"""

DEMO_DIR = Path(__file__).resolve().parent.parent / "examples" / "demo"
DEMO_GROUP = "demo: kn=32 baseline vs kn=512, no warmup and gradual warmup"
# After Ctrl-C: how long the worker may take to stop idle or between runs before its
# current run is interrupted (it resumes from its checkpoint), then before it is killed.
WARM_STOP_S = 10.0
COLD_STOP_S = 10.0
# The API runs this much nicer than the worker it starts: on a machine with few cores, a
# crowd of dashboard readers must not slow the training (issue 10, point 11). The worker
# keeps the normal priority; the API still gets the CPU the training leaves.
API_NICE = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument(
        "--gpus",
        default="all",
        metavar="all|none|0,1",
        help="GPUs for the worker (default: all, or the CPU when there is none)",
    )
    parser.add_argument("--demo", action="store_true", help="queue the demo comparison once")
    parser.add_argument("--no-worker", action="store_true", help="start the API only")
    parser.add_argument(
        "--api-nice",
        type=int,
        default=API_NICE,
        metavar="N",
        help=f"lower the API's CPU priority by N below the worker's (default: {API_NICE})",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="log level of the API and the worker (default: info)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also log every HTTP request (off: the 'batchlab is up' line stays in view)",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from core.settings import get_settings, mask_password
    from server.app import create_app
    from store import db

    # Absolute, so the worker child resolves the same files whatever its directory.
    os.environ["BATCHLAB_HOME"] = str(get_settings().home.resolve())
    if not _port_free(args.host, args.port):
        print(
            f"batchlab up: {args.host}:{args.port} is already in use: pick another port with "
            f"`batchlab up --port {args.port + 1}` (or `make demo PORT={args.port + 1}`)",
            file=sys.stderr,
        )
        return 1
    app = create_app(bind_host=args.host)  # the interface it binds is an allowed Host
    ctx = app.state.ctx
    # Before the worker starts: it would otherwise race us to create the schema.
    try:
        db.migrate(ctx.engine)
    except Exception as err:  # unreachable server, bad URL, unwritable file
        print(
            f"batchlab up: database {mask_password(ctx.settings.database_url)}: {err}",
            file=sys.stderr,
        )
        return 1
    ctx.migrated = True
    if args.demo:
        queue_demo(ctx)
    worker = None if args.no_worker else start_worker(args.gpus, args.log_level)
    if worker is not None and args.api_nice > 0:
        os.nice(args.api_nice)  # after the fork: the worker keeps the normal priority
    url = f"http://{args.host}:{args.port}"
    print(f"batchlab is up: {url}   (API docs {url}/docs; Ctrl-C stops)", flush=True)
    print(f"  database {mask_password(ctx.settings.database_url)}", flush=True)
    print(f"  broker   {ctx.settings.broker_url_safe}", flush=True)
    if worker is not None:
        print(f"  worker   pid {worker.pid} (batchlab worker --gpus {args.gpus})", flush=True)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # One line per request (1,450 in half an hour of a dashboard) would scroll the
        # URL above out of view: request lines only on --verbose.
        access_log=args.verbose,
        timeout_graceful_shutdown=5,
    )
    code = 0
    try:
        # Handles SIGINT/SIGTERM itself (graceful shutdown), then re-raises the signal.
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:  # uvicorn exits 1 when it cannot bind
        code = int(exc.code or 0)
    finally:
        if worker is not None:
            stop_worker(worker)
    print("batchlab stopped", flush=True)
    return code


def queue_demo(ctx: Any) -> None:
    """Queue the demo comparison unless the database already holds runs."""
    from server.submit import submit
    from store import db
    from store import runs as store_runs
    from trainer.plan import default_name, plan_compare
    from trainer.spec import load_spec

    with db.session(ctx.engine) as s:
        if store_runs.list_runs(s, limit=1):
            print("demo: the database already has runs; not queueing the demo again")
            return
    paths = sorted(DEMO_DIR.glob("*.yaml"))
    if not paths:
        print(f"demo: no specs found in {DEMO_DIR}", file=sys.stderr)
        return
    specs = [(f"demo {default_name(spec)}", spec) for spec in (load_spec(str(p)) for p in paths)]
    _, runs = submit(ctx, plan_compare(specs, name=DEMO_GROUP))
    for run in runs:
        print(f"demo: queued run {run.id} {run.name}")


def start_worker(gpus: str, log_level: str) -> subprocess.Popen[bytes]:
    """``batchlab worker`` in its own session: a terminal Ctrl-C reaches only us, and we
    stop it in order (warm, then cold) instead of it seeing the signal twice."""
    command = [sys.executable, "-m", "batchlab.cli", "worker", "--gpus", gpus]
    command += ["--loglevel", log_level]
    return subprocess.Popen(
        command,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown; if a run keeps it busy, a cold one (the run resumes later); kill."""
    steps = (
        (signal.SIGTERM, WARM_STOP_S, "stopping the worker"),
        # The worker supervisor turns a second signal into Celery's cold shutdown.
        (signal.SIGTERM, COLD_STOP_S, "interrupting the current run (it resumes later)"),
    )
    for sig, wait_s, what in steps:
        if proc.poll() is not None:
            return
        print(f"batchlab up: {what}", flush=True)
        try:
            proc.send_signal(sig)
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:  # Ctrl-C again: go straight to the next step
            continue
    if proc.poll() is None:
        print("batchlab up: killing the worker", flush=True)
        # The supervisor's Celery children run in sessions of their own: find them
        # before the supervisor dies (they would be re-parented) and kill them too.
        stragglers = _descendants(proc.pid)
        proc.kill()
        proc.wait()
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> list[int]:
    """Pids below ``pid`` in the process tree (read from Linux's /proc; [] elsewhere)."""
    children: dict[int, list[int]] = {}
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return []
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if this process dies (kill -9): no orphans."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
