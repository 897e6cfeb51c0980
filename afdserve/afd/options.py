"""Command-line options of the disaggregated runtime, shared by `serve`, `generate` and friends."""
from __future__ import annotations

import argparse


def add_afd_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Attention-FFN Disaggregation")
    g.add_argument("--afd", metavar="xAyF", default=None,
                   help="run disaggregated with x attention and y FFN workers, e.g. 1A1F, 2A1F, 1A2F")
    g.add_argument("--micro-batches", type=int, default=3, metavar="M",
                   help="micro-batches pipelined per step in AFD mode (default 3)")


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    """EngineArgs fields set by the options above."""
    return {"afd": args.afd, "micro_batches": args.micro_batches}
