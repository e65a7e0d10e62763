"""``batchlab submit | ls | wait | cancel``: the REST API from a shell.

One module serves the four commands (see ``COMMANDS``); each talks to a running server
through :class:`batchlab.client.Client`, imported only when a command runs so that
``batchlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from core.settings import DEFAULT_URL
from core.status import FINAL_STATUSES, RunStatus

FAILED = FINAL_STATUSES - {RunStatus.SUCCEEDED}

# Exit status shared by the commands.
EXIT_OK, EXIT_RUN_FAILED, EXIT_ERROR, EXIT_TIMEOUT = 0, 1, 2, 124


def _add_url(parser: argparse.ArgumentParser, *, token: bool) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help=f"server address (default: $BATCHLAB_URL or {DEFAULT_URL})",
    )
    if token:
        parser.add_argument(
            "--token",
            default=None,
            help="API token for writes when the server sets one (default: $BATCHLAB_TOKEN)",
        )


def _client(args: argparse.Namespace) -> Any:
    from batchlab.client import Client

    # None: the client takes BATCHLAB_URL / BATCHLAB_TOKEN (core.settings).
    return Client(args.url or None, getattr(args, "token", None) or None)


def _report_error(exc: Exception) -> int:
    """Print a server or client error the way a shell user can act on it."""
    from batchlab.client import ValidationError
    from core.errors import format_validation_error

    if isinstance(exc, ValidationError):
        print("batchlab: the server rejected the request:", file=sys.stderr)
        print("  " + format_validation_error(exc.detail, "\n  "), file=sys.stderr)
    else:
        print(f"batchlab: {exc}", file=sys.stderr)
    return EXIT_ERROR


def _run_url(base: str, run_id: int) -> str:
    return f"{base}/#/run/{run_id}"


def _describe(run: dict[str, Any]) -> str:
    """One line: id, status, kn = k x n, peak LR and iterations."""
    spec, derived = run.get("spec") or {}, run.get("derived") or {}
    parts = [f"run {run['id']} {run['status']}"]
    if "total_batch" in derived:
        k, n = spec.get("workers"), spec.get("batch_per_worker")
        parts.append(f"kn={derived['total_batch']} ({k} x {n})")
    if derived.get("peak_lr") is not None:
        parts.append(f"peak lr {derived['peak_lr']:.4g}")
    if derived.get("total_iters") is not None:
        n = derived["total_iters"]
        parts.append(f"{n} iteration{'s' if n != 1 else ''}")
    return ", ".join(parts)


def _outcome(run: dict[str, Any]) -> str:
    """How a finished run ended, in one line."""
    status = run["status"]
    summary = run.get("summary") or {}
    line = f"run {run['id']} {status}"
    if status == RunStatus.SUCCEEDED and summary.get("final_val_err") is not None:
        line += f": final val err {100 * summary['final_val_err']:.2f}%"
        if summary.get("wall_time_s") is not None:
            line += f" in {summary['wall_time_s']:.1f} s"
    elif status == RunStatus.DIVERGED and run.get("diverged_step") is not None:
        line += f" at iteration {run['diverged_step']}"
    elif status == RunStatus.FAILED and run.get("error"):
        line += f": {run['error']}"
    return line


def _wait_and_report(client: Any, ids: list[int], *, timeout: float | None, poll: float,
                     quiet: bool) -> int:  # fmt: skip
    try:
        final = client.wait(ids, progress=not quiet, timeout=timeout, poll=poll)
    except TimeoutError as exc:
        print(f"batchlab: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    for run in final:
        print(_outcome(run))
    return EXIT_RUN_FAILED if any(r["status"] in FAILED for r in final) else EXIT_OK


# --- submit --------------------------------------------------------------------------------
class Submit:
    HELP = "queue a training run on the server (optionally with its baseline)"
    DESCRIPTION = """\
Queue the run described by a RunSpec YAML file on a running batchlab server.

--baseline also queues the matching reference run (kn = ref_batch, no warmup), so the
dashboard can draw the large-batch curve over it. --set overrides single fields; the
value is read as YAML. The server checks the spec and names the field of any error.

--sweep queues a batch-size sweep of the spec instead (one run per size and seed, plus
the kn = ref_batch baseline per seed); --sweep auto queues the baseline only, and when it
has finished the server queues powers of two from B/8 to 8B around its measured gradient
noise scale B (the spec needs noise_every > 0).

example:
  batchlab submit examples/specs/large_gradual.yaml --baseline --set epochs=5
  batchlab submit examples/specs/baseline.yaml --name "kn=32 seed 1" --set seed=1 --wait
  batchlab submit examples/specs/large_gradual.yaml --sweep 256,1024,4096 --seeds 0,1
  batchlab submit examples/specs/large_gradual.yaml --sweep auto
"""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("spec", help="RunSpec YAML (or JSON) file")
        parser.add_argument(
            "--baseline", action="store_true", help="also queue the kn = ref_batch baseline"
        )
        parser.add_argument("--name", help="run name shown in the dashboard")
        parser.add_argument(
            "--sweep",
            type=_sweep_sizes,
            metavar="KN,KN,...|auto",
            help="queue a batch-size sweep instead: total batch sizes, or auto",
        )
        parser.add_argument(
            "--seeds", type=_ints, metavar="S,S,...", help="seeds of the sweep (with --sweep)"
        )
        parser.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="override one spec field (repeatable), e.g. --set workers=32",
        )
        parser.add_argument(
            "--wait", action="store_true", help="wait for the run(s) like `batchlab wait`"
        )
        parser.add_argument("--json", action="store_true", help="print the server's answer")
        _add_url(parser, token=True)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from batchlab.client import APIError
        from trainer.specfile import read_spec

        try:
            spec = read_spec(args.spec, args.overrides)
        except (OSError, ValueError) as exc:
            print(f"batchlab: {exc}", file=sys.stderr)
            return EXIT_ERROR
        if args.seeds is not None and args.sweep is None:
            print("batchlab: --seeds needs --sweep", file=sys.stderr)
            return EXIT_ERROR
        client = _client(args)
        if args.sweep is not None:
            return _submit_sweep(client, spec, args)
        try:
            with client:
                if args.baseline:
                    run, base = client.submit(spec, baseline=True, name=args.name)
                else:
                    run, base = client.submit(spec, name=args.name), None
                if args.json:
                    print(json.dumps({"run": run, "baseline": base}, indent=2))
                else:
                    for r in ([base] if base else []) + [run]:
                        label = "baseline " if r is base else ""
                        print(f"{label}{_describe(r)}  {_run_url(client.url, r['id'])}")
                if not args.wait:
                    return EXIT_OK
                ids = ([base["id"]] if base else []) + [run["id"]]
                return _wait_and_report(client, ids, timeout=None, poll=1.0, quiet=False)
        except APIError as exc:
            return _report_error(exc)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        msg = f"not a comma-separated list of integers: {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _sweep_sizes(text: str) -> list[int] | str:
    return "auto" if text.strip() == "auto" else _ints(text)


def _submit_sweep(client: Any, spec: Any, args: argparse.Namespace) -> int:
    from batchlab.client import APIError

    try:
        with client:
            out = client.sweep(spec, args.sweep, seeds=args.seeds, name=args.name)
            group, created = out["sweep"], out["runs"]
            if args.json:
                print(json.dumps(out, indent=2))
            else:
                print(f"sweep {group['id']} {group['name']}  {client.url}/#/sweep/{group['id']}")
                for r in created:
                    label = "baseline " if r.get("is_baseline") else ""
                    print(f"{label}{_describe(r)}  {_run_url(client.url, r['id'])}")
                if group.get("auto_message"):
                    print(group["auto_message"])
            if not args.wait:
                return EXIT_OK
            ids = [r["id"] for r in created]
            return _wait_and_report(client, ids, timeout=None, poll=1.0, quiet=False)
    except APIError as exc:
        return _report_error(exc)


# --- ls ------------------------------------------------------------------------------------
class Ls:
    HELP = "list runs on the server, newest first"
    DESCRIPTION = """\
List the runs a batchlab server knows, newest first, as a compact table: id, status,
progress, kn = k x n, peak LR, epochs, final validation error and name.

example:
  batchlab ls
  batchlab ls --status running --url http://gpu-box:8000
"""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--status",
            choices=list(RunStatus),
            help="only runs in this state",
        )
        parser.add_argument("--group", type=int, help="only runs of this sweep/group id")
        parser.add_argument("--limit", type=int, default=None, help="show at most N runs")
        parser.add_argument("--json", action="store_true", help="print the runs as JSON")
        _add_url(parser, token=False)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from batchlab.client import APIError

        try:
            with _client(args) as client:
                runs = client.list_runs(status=args.status, group=args.group)
        except APIError as exc:
            return _report_error(exc)
        if args.limit is not None:
            runs = runs[: args.limit]
        if args.json:
            print(json.dumps(runs, indent=2))
        elif not runs:
            print("no runs" + (f" with status {args.status}" if args.status else ""))
        else:
            print(format_table(runs))
        return EXIT_OK


def format_table(runs: list[dict[str, Any]]) -> str:
    """Runs as an aligned text table (one line each)."""
    header = ["ID", "STATUS", "PROG", "KN", "K x N", "PEAK_LR", "EPOCHS", "VAL_ERR", "NAME"]
    rows = [header]
    for r in runs:
        spec, derived = r.get("spec") or {}, r.get("derived") or {}
        val = (r.get("summary") or {}).get("final_val_err")
        status = r["status"] + ("*" if r.get("is_baseline") else "")
        rows.append(
            [
                str(r["id"]),
                status,
                f"{100 * (r.get('progress') or 0):.0f}%",
                str(derived.get("total_batch", "")),
                f"{spec.get('workers', '?')} x {spec.get('batch_per_worker', '?')}",
                f"{derived['peak_lr']:.4g}" if derived.get("peak_lr") is not None else "",
                str(spec.get("epochs", "")),
                f"{100 * val:.2f}%" if val is not None else "",
                _shorten(r.get("name") or "", 40),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    if any(r.get("is_baseline") for r in runs):
        lines.append("* baseline run")
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# --- wait ----------------------------------------------------------------------------------
class Wait:
    HELP = "wait for runs to finish, with a progress bar"
    DESCRIPTION = """\
Wait until the given runs finish, showing a progress bar per run (fraction done and the
worker's ETA), then print how each ended.

exit status: 0 all succeeded, 1 a run failed, diverged or was cancelled, 2 an error
talking to the server, 124 --timeout passed with runs unfinished.

example:
  batchlab wait 11 12 && echo "both runs succeeded"
"""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ids", nargs="+", type=int, metavar="ID", help="run ids")
        parser.add_argument("--timeout", type=float, help="give up after this many seconds")
        parser.add_argument(
            "--poll", type=float, default=1.0, help="seconds between checks (default 1)"
        )
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_url(parser, token=False)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from batchlab.client import APIError

        try:
            with _client(args) as client:
                return _wait_and_report(
                    client, args.ids, timeout=args.timeout, poll=args.poll, quiet=args.quiet
                )
        except APIError as exc:
            return _report_error(exc)


# --- cancel --------------------------------------------------------------------------------
class Cancel:
    HELP = "cancel queued or running runs"
    DESCRIPTION = """\
Cancel runs: a queued run is cancelled at once, a running one stops at its next check
(about a second) and keeps the metrics it logged.

example:
  batchlab cancel 12 13 --token "$BATCHLAB_TOKEN"
"""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("ids", nargs="+", type=int, metavar="ID", help="run ids")
        _add_url(parser, token=True)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from batchlab.client import APIError

        code = EXIT_OK
        with _client(args) as client:
            for rid in args.ids:
                try:
                    run = client.cancel(rid)
                except APIError as exc:
                    code = _report_error(exc)
                    continue
                if run["status"] == RunStatus.RUNNING:
                    print(f"run {rid}: cancel requested, stops within seconds")
                else:
                    print(f"run {rid}: {run['status']}")
        return code


COMMANDS: dict[str, Any] = {"submit": Submit, "ls": Ls, "wait": Wait, "cancel": Cancel}
