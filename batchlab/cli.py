"""The ``batchlab`` command: one subcommand per module, imported only when used.

Each command module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules must stay cheap to import (no torch at import time), so
``batchlab --help`` and the service commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, str] = {
    "up": "batchlab.cmd_up",
    "api": "batchlab.cmd_api",
    "worker": "batchlab.cmd_worker",
    "train": "batchlab.cmd_train",
    "submit": "batchlab.cmd_client",
    "ls": "batchlab.cmd_client",
    "wait": "batchlab.cmd_client",
    "cancel": "batchlab.cmd_client",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchlab",
        description="Run and compare large-minibatch trainings (Goyal et al. 2017).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        # A module serving several commands exposes per-command hooks in COMMANDS.
        hooks = getattr(module, "COMMANDS", {}).get(name, module)
        p = sub.add_parser(
            name,
            help=hooks.HELP,
            description=getattr(hooks, "DESCRIPTION", hooks.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        hooks.add_arguments(p)
        p.set_defaults(_run=hooks.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
