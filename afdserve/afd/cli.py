"""`afdserve worker`: start one AFD role by itself, e.g. the FFN role on another machine.

    afdserve worker --role ffn --afd 1A2F --rank 0 --master-addr 10.0.0.1 --master-port 29600 --model DIR

joins the deployment whose attention worker 0 (started by `afdserve serve --afd 1A2F --ffn-remote
--master-addr 10.0.0.1 --master-port 29600`) hosts the rendezvous. `--rank` is the index within
the role (0..y-1 for FFN workers). The worker refuses to serve when its checkpoint, dtype or
topology differ from attention worker 0's, and exits when the deployment stops.
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("worker", help="start one AFD role (e.g. an FFN worker) that joins a deployment",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("ffn", "attention"), required=True)
    p.add_argument("--afd", required=True, metavar="xAyF", help="topology of the whole deployment")
    p.add_argument("--rank", type=int, required=True, help="index within the role (FFN workers: 0..y-1)")
    p.add_argument("--master-addr", required=True, help="address of attention worker 0 (the rendezvous)")
    p.add_argument("--master-port", type=int, required=True)
    p.add_argument("--model", required=True, help="checkpoint directory (same checkpoint as the attention side)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--join-timeout", type=float, default=120.0, metavar="S")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from afdserve.afd.topology import TopologyError, parse_topology
    try:
        topo = parse_topology(args.afd)
    except TopologyError as exc:
        print(f"afdserve worker: error: {exc}", file=sys.stderr)
        return 2
    if args.role == "attention":
        print("afdserve worker: error: attention workers are started by the engine process that schedules "
              "their requests: run `afdserve serve --afd ... --ffn-remote --master-addr A --master-port P` "
              "there and start the FFN workers with `afdserve worker --role ffn`", file=sys.stderr)
        return 2
    if not 0 <= args.rank < topo.num_ffn:
        print(f"afdserve worker: error: --rank {args.rank} is outside 0..{topo.num_ffn - 1} for {topo}",
              file=sys.stderr)
        return 2
    return _run_ffn(args, topo)


def _run_ffn(args: argparse.Namespace, topo) -> int:
    import os

    from afdserve.afd.executor import available_cores
    from afdserve.afd.worker import HandshakeError, WorkerSpec, ffn_worker_main
    from afdserve.engine.executor import default_device
    spec = WorkerSpec(topo, args.model, args.dtype, args.device or default_device(), args.master_addr,
                      args.master_port, args.join_timeout, threads=args.threads or available_cores())
    try:
        code = ffn_worker_main(spec, args.rank, None)
    except HandshakeError as exc:
        print(f"afdserve worker: error: {exc}", file=sys.stderr)
        code = 2
    except RuntimeError as exc:
        print(f"afdserve worker: the deployment ended: {str(exc).splitlines()[0] if str(exc) else exc}",
              file=sys.stderr)
        code = 1
    sys.stderr.flush()
    os._exit(code)     # skip process-group teardown, which can block on peers that are gone


def main(argv: list[str] | None = None) -> int:
    """`python -m afdserve.afd.cli worker ...` (same as `afdserve worker ...`)."""
    parser = argparse.ArgumentParser(prog="afdserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
