"""The `afdserve` command line: one sub-command per part of the project.

Each part registers its own sub-commands through a `register(subparsers)` function in its
CLI module, so this file stays a dispatcher and importing it stays cheap (the cost model
never imports torch).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# Modules that contribute sub-commands, in the order they appear in `--help`.
COMMAND_MODULES = (
    "afdserve.commands",        # generate, init-checkpoint, demo
    "afdserve.server.cli",      # serve
    "afdserve.afd.cli",         # worker (a role of a multi-node AFD deployment)
    "afdserve.cost.cli",        # cost, cost sparsity, cost compare
    "afdserve.sim.cli",         # simulate, plan
    "afdserve.bench.cli",       # bench
    "afdserve.trace_cli",       # trace validate, trace plot, trace compare
)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afdserve",
        description="Step-3 decoding: MFA model, serving engine with Attention-FFN "
        "Disaggregation, and the co-design cost model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if not _exists(name):
            continue
        importlib.import_module(name).register(sub)
    return parser


def _exists(module: str) -> bool:
    """Whether a command module is present (parts of the project may be installed without others)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"afdserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        # Config and checkpoint errors carry specific messages; show them without a traceback.
        print(f"afdserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into a reader that stopped early (`| head`): not an error.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
