"""``batchlab worker``: Celery workers pinned to this machine's GPUs (or one on the CPU)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

HELP = "start training workers: one per GPU (pinned), or one CPU worker"
DESCRIPTION = """\
Start one Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES and
consuming the "gpu" queue; without GPUs, one worker on the "cpu" queue. Every worker
trains one run at a time (concurrency 1, prefetch 1, late acknowledgement): a GPU
holds one run, and a run nobody has finished stays on the queue.

--group gives all the selected GPUs to a single worker on queue "gpuN" (N = number of
GPUs); runs with nproc=N on CUDA go there and train with torchrun over those GPUs.

The broker and database come from BATCHLAB_BROKER_URL / BATCHLAB_DATABASE_URL (default:
SQLite files in BATCHLAB_HOME). Before taking work, GPU workers prove that torch sees
exactly their GPUs (a CUDA build of torch, the right count); on a mismatch they refuse
to start and say why. --gpus none is the explicit choice of the CPU.

Runs with nodes=N > 1 take N workers on N machines at once, each on the queue of the
run's nproc: the workers form a gang through the database and meet through torchrun's
rendezvous. --node-addr (BATCHLAB_NODE_ADDR) is the address the other machines reach
this one at (default: this host's address on the route to the database).

Ctrl-C once: finish the current runs and stop; twice: stop now (the runs are re-queued
and resume from their last epoch checkpoint).

examples:
  batchlab worker                      # every GPU, or the CPU when there is none
  batchlab worker --gpus 0,1           # two workers, on GPUs 0 and 1
  batchlab worker --gpus 0,1 --group   # one worker for 2-GPU runs (queue gpu2)
  batchlab worker --gpus none --queues gpu   # CPU worker also taking the gpu queue
  batchlab worker --group --node-addr 10.0.0.5   # one node of multi-node 8-GPU runs
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus",
        default="all",
        metavar="all|none|0,1",
        help="GPUs to start workers on (default: all; none: one CPU worker)",
    )
    parser.add_argument(
        "--group",
        action="store_true",
        help='one worker owning all the selected GPUs, on queue "gpuN"',
    )
    parser.add_argument(
        "--queues",
        default="",
        metavar="Q1,Q2",
        help="extra queues every worker also consumes (e.g. cpu on a GPU machine)",
    )
    parser.add_argument(
        "--pool",
        choices=("prefork", "solo"),
        default="prefork",
        help="prefork (default): each run in a child process; solo: in the worker itself",
    )
    parser.add_argument("--loglevel", default="info", help="Celery log level (default: info)")
    parser.add_argument(
        "--node-addr",
        metavar="ADDR",
        help="the address other nodes of a multi-node run reach this machine at "
        "(sets BATCHLAB_NODE_ADDR for the workers)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the workers and commands, start nothing"
    )


def run(args: argparse.Namespace) -> int:
    from worker import gpus as gpu_mod
    from worker.launch import DeviceCheckError, Supervisor, prove_devices, worker_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s batchlab-worker %(message)s")
    try:
        # "none" needs no detection (which may import torch when nvidia-smi is absent).
        wants_cpu = args.gpus.strip().lower() in gpu_mod.NO_GPU_WORDS
        selected = gpu_mod.parse_gpus(args.gpus, [] if wants_cpu else gpu_mod.detect_gpus())
    except ValueError as err:
        print(f"batchlab worker: {err}", file=sys.stderr)
        return 2
    extra = [q.strip() for q in args.queues.split(",") if q.strip()]
    if args.node_addr:
        os.environ["BATCHLAB_NODE_ADDR"] = args.node_addr  # the workers inherit it
    # The pid tells apart several CPU workers' node names on one host.
    plans = gpu_mod.plan_workers(
        selected, group=args.group, extra_queues=extra, tag=str(os.getpid())
    )
    for plan in plans:
        devices = plan.env.get("CUDA_VISIBLE_DEVICES", "")
        print(
            f"{plan.name}: GPUs {devices or 'none'}, queues {','.join(plan.queues)}",
            flush=True,
        )
        if args.dry_run:
            print("  " + " ".join(worker_command(plan, loglevel=args.loglevel, pool=args.pool)))
    if args.dry_run:
        return 0
    if selected:
        # Before any worker consumes the queue: a mismatch must not take (and fail) runs.
        try:
            report = prove_devices(selected)
        except DeviceCheckError as err:
            print(f"batchlab worker: {err}", file=sys.stderr)
            return 2
        if not report.ok:
            print(f"batchlab worker: {report.error}", file=sys.stderr)
            return 2
        print(f"devices: {report.describe()}", flush=True)
    from worker.celery_app import app, prepare_broker

    # Once here, before several workers race to create the broker's SQLite file.
    prepare_broker(str(app.conf.broker_url))
    return Supervisor(plans, loglevel=args.loglevel, pool=args.pool).run()
