"""``batchlab api``: the REST API, live streams and dashboard, served by uvicorn."""

from __future__ import annotations

import argparse
import os

HELP = "serve the REST API and the dashboard (no workers; see `batchlab up`)"
DESCRIPTION = """\
Serve the batchlab API, its Server-Sent Event streams and the web dashboard.

The database, broker and write token come from BATCHLAB_DATABASE_URL,
BATCHLAB_BROKER_URL and BATCHLAB_TOKEN (defaults: SQLite files in BATCHLAB_HOME, no
token). Runs are only trained by workers started with `batchlab worker`; `batchlab up`
starts both on one machine.

examples:
  batchlab api                         # http://127.0.0.1:8000
  batchlab api --host 0.0.0.0 --port 8080
  batchlab api -v                      # also log every HTTP request
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn log level (default: info)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also log every HTTP request")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        metavar="N",
        help="lower the API's CPU priority by N (workers training on the same machine)",
    )


def run(args: argparse.Namespace) -> int:
    import functools

    import uvicorn

    from server.app import create_app

    if args.nice > 0:
        os.nice(args.nice)
    # factory=True: the app (and its database engine) is built inside the server process;
    # the interface it binds is one of the Host headers it accepts (server.middleware).
    uvicorn.run(
        functools.partial(create_app, bind_host=args.host),
        factory=True,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.verbose,  # quiet by default, as `batchlab up`
        # SSE streams end on shutdown; don't wait long for idle keep-alive clients.
        timeout_graceful_shutdown=5,
    )
    return 0
