"""``batchlab train SPEC --out DIR``: one run on this machine, no service needed.

Writes DIR/spec.yaml (the spec after --set/--nproc), DIR/metrics.jsonl (one JSON object
per logged point, appended across resumes), DIR/checkpoint.pt (each epoch end) and
DIR/summary.json (how the run ended and its summary figures). With a checkpoint in DIR
the run continues from it, unless --no-resume starts it over.

``--nproc P`` (or ``nproc: P`` in the spec) with P > 1 re-enters this command under
``python -m torch.distributed.run --standalone --nproc_per_node P``: every process runs
the same command, rank 0 writes the files.

``--server URL`` (alone: $BATCHLAB_URL; token --token or BATCHLAB_TOKEN) also tracks
the run live on a batchlab server, as the dashboard shows any run: it registers, streams
its points, device, progress and summary (only rank 0 under torchrun, as in a SLURM or
Kubernetes job), and stops when cancelled there. Its points then go to the server, not
to metrics.jsonl; --out is optional (a temporary folder: no resume).

Exit codes: 0 succeeded, 1 diverged (or crashed), 2 invalid spec or arguments,
130 cancelled (Ctrl-C: the run stops at its next poll, the last checkpoint is kept).

Nothing here imports torch at module import time: ``batchlab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.status import RunStatus

HELP = "Train one RunSpec here; metrics, checkpoint and summary go to --out."
# The docstring's middle paragraphs, without reST markup, as ``batchlab train --help``.
DESCRIPTION = __doc__.split("\n\n", 1)[1].rsplit("\n\nNothing here", 1)[0].replace("``", "")

EXIT_OK, EXIT_DIVERGED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad spec or arguments: printed as is, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="RunSpec file (YAML or JSON); see docs/runspec.md")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="run folder (created if needed); with --server optional (a temporary one)",
    )
    parser.add_argument(
        "--server",
        nargs="?",
        const="",
        default=None,
        metavar="URL",
        help="also track the run live on this batchlab server (alone: $BATCHLAB_URL); "
        "under torchrun only rank 0 reports",
    )
    parser.add_argument("--token", default=None, help="the server's token (or BATCHLAB_TOKEN)")
    parser.add_argument("--name", default=None, help="the run's name on the server")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes to spread the k workers over (DDP through torchrun); "
        "default: the spec's nproc",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start over even if --out holds a checkpoint (its metrics are replaced)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a spec field; VALUE is read as YAML (e.g. --set workers=32 "
        "--set milestones=[30,60])",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        spec = resolve_spec(args.spec, args.overrides, args.nproc)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.out is None and args.server is None:
        print("error: --out DIR is required (or track the run with --server)", file=sys.stderr)
        return EXIT_USAGE
    if args.out is None:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="batchlab-train-"))
        args.out = str(out)
        try:
            return run(args)
        finally:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
    out = Path(args.out)
    if spec.nodes > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        print(
            f"error: nodes={spec.nodes}: start this command on every node under torchrun "
            f"(--nnodes {spec.nodes} --nproc-per-node {spec.nproc}, see "
            "examples/slurm/train.sbatch), or queue the run on batchlab workers with "
            "`batchlab submit`",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if spec.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _launch_torchrun(spec, out, args)
    try:
        code = _train(spec, out, args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from trainer.distributed import exit_worker_process

        exit_worker_process(code)
    return code


def resolve_spec(path: str, overrides: list[str], nproc: int | None) -> Any:
    """The validated RunSpec of ``path`` with ``--set`` and ``--nproc`` applied."""
    from pydantic import ValidationError

    from core.errors import format_validation_error
    from trainer.spec import RunSpec
    from trainer.specfile import read_spec

    try:
        data = read_spec(path, overrides)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if nproc is not None:
        data["nproc"] = nproc
    try:
        return RunSpec.model_validate(data)
    except ValidationError as exc:
        raise UsageError("invalid spec:\n  " + format_validation_error(exc, "\n  ")) from exc


def _write_spec(spec: Any, out: Path) -> Path:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    path = out / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    return path


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node P -m batchlab.cli``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "batchlab.cli",
        *argv,
    ]


def _launch_torchrun(spec: Any, out: Path, args: argparse.Namespace) -> int:
    """Run this command in ``spec.nproc`` processes under torchrun; their exit status.

    The launching process only validates and waits: it never imports torch.
    """
    spec_path = _write_spec(spec, out)
    argv = ["train", str(spec_path), "--out", str(out)]
    if args.no_resume:
        argv.append("--no-resume")
    if args.no_progress:
        argv.append("--no-progress")
    env = None
    if args.server is not None:
        argv += ["--server", args.server] + (["--name", args.name] if args.name else [])
        if args.token:  # through the environment: argv is visible to every user
            env = {**os.environ, "BATCHLAB_TOKEN": args.token}
    cmd = torchrun_command(spec.nproc, argv)
    print(f"launching {spec.nproc} processes: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd, env=env)


class _StopFlag:
    """Set by the first SIGINT/SIGTERM (graceful cancel); a second one interrupts."""

    def __init__(self) -> None:
        self.set = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test helper)
                return

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True
        self.restore()  # a second signal acts as usual
        print("\nstopping at the next poll (again to interrupt)...", file=sys.stderr)

    def __call__(self) -> bool:
        return self.set


def _train(spec: Any, out: Path, args: argparse.Namespace) -> int:
    from trainer import RunConfigError, fit
    from trainer.checkpoint import CHECKPOINT_NAME, check_compatible
    from trainer.sink import JsonlSink, NullSink

    main = int(os.environ.get("RANK", "0")) == 0
    checkpoint = out / CHECKPOINT_NAME
    resume = not args.no_resume and checkpoint.exists()
    if resume and (out / "spec.yaml").exists():
        import yaml

        saved = yaml.safe_load((out / "spec.yaml").read_text()) or {}
        try:
            check_compatible(saved, spec, out)
        except RunConfigError as exc:
            raise UsageError(str(exc)) from exc
    if main:
        _write_spec(spec, out)
        if not resume:
            # A fresh start replaces whatever an earlier run left in the folder.
            for name in ("metrics.jsonl", "summary.json", CHECKPOINT_NAME):
                (out / name).unlink(missing_ok=True)
    stop = _StopFlag()
    tracked, should_stop = None, stop
    if main and args.server is not None:  # rank 0 only: the others train with a NullSink
        from batchlab.tracking import start_tracking

        tracked, sink, should_stop = start_tracking(args, spec, stop)
    else:
        sink = JsonlSink(out / "metrics.jsonl") if main else NullSink()
    stop.install()
    try:
        result = fit(
            spec,
            sink,
            run_dir=out,
            resume=resume,
            should_stop=should_stop,
            progress=main and not args.no_progress,
        )
    except BaseException as exc:
        if tracked is not None:
            tracked.__exit__(type(exc), exc, None)  # failed (cancelled on Ctrl-C), with why
        if isinstance(exc, RunConfigError):
            raise UsageError(str(exc)) from exc
        raise
    finally:
        stop.restore()
    if not main:
        return _exit_code(result.status)
    record = result.to_dict()
    (out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    text = format_summary(spec, record, out)
    print(text if tracked is None else text.rsplit("\n", 1)[0])  # no local files to name
    if tracked is not None:
        from batchlab.tracking import finish_tracking

        if not finish_tracking(tracked, record):  # says why on stderr
            return EXIT_DIVERGED
    return _exit_code(result.status)


def _exit_code(status: str) -> int:
    return {RunStatus.SUCCEEDED: EXIT_OK, RunStatus.DIVERGED: EXIT_DIVERGED}.get(
        status, EXIT_CANCELLED
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def format_summary(spec: Any, record: dict[str, Any], out: Path) -> str:
    """A few lines for the terminal: outcome, errors, time to target, throughput."""
    s = record["summary"]
    lines = [
        f"{record['status']}: {record['iterations']} iterations, "
        f"{record['epochs']:.2f} epochs, {s['wall_time_s'] or 0:.1f} s "
        f"(kn={s['total_batch']}, peak lr {s['peak_lr']:.4g})",
    ]
    if record["error"]:
        lines.append(f"  {record['error']}")
    lines.append(
        f"  val err: final {_pct(s['final_val_err'])}, best {_pct(s['best_val_err'])}, "
        f"median of last 5 {_pct(s['median_last5_val_err'])}; "
        f"train err {_pct(s['final_train_err'])}"
    )
    if spec.target_accuracy is not None:
        if s["time_to_target_s"] is None:
            lines.append(f"  target accuracy {_pct(spec.target_accuracy)}: not reached")
        else:
            lines.append(
                f"  target accuracy {_pct(spec.target_accuracy)}: {s['time_to_target_s']:.1f} s, "
                f"{s['iters_to_target']} iterations, {s['epochs_to_target']} epochs"
            )
    if s["samples_per_s"]:
        lines.append(f"  {s['samples_per_s']:,.0f} samples/s")
    lines.append(f"  files: {out}/metrics.jsonl, summary.json, checkpoint.pt")
    return "\n".join(lines)
