"""`afdserve worker`: start one AFD role by itself, e.g. the FFN role on another machine.

    afdserve worker --role ffn --afd 1A2F --rank 0 --master-addr 10.0.0.1 --master-port 29600 --model DIR

joins the deployment whose engine process (`afdserve serve --afd 1A2F --ffn-remote --master-addr
10.0.0.1 --master-port 29600`) hosts the rendezvous. `--rank` is the index within
the role (0..y-1 for FFN workers). The worker refuses to serve when its checkpoint, dtype or
topology differ from attention worker 0's, and exits when the deployment stops. When the
deployment loses a worker it re-forms its process group and this worker rejoins by itself; a
worker started to replace a lost FFN worker takes the lost one's --rank.

The engine process starts its local workers through this same entry point (`python -m
afdserve.afd.cli worker --role R --rank I --control-fd FD`): a fresh interpreter that receives its
settings over the inherited control channel, so nothing of the caller's main module is imported.
"""
from __future__ import annotations

import argparse
import sys

from afdserve.afd.config import DEFAULTS


def register(subparsers) -> None:
    p = subparsers.add_parser("worker", help="start one AFD role (e.g. an FFN worker) that joins a deployment",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("ffn", "attention"), required=True)
    p.add_argument("--afd", metavar="xAyF", help="topology of the whole deployment (required)")
    p.add_argument("--rank", type=int, required=True, help="index within the role (FFN workers: 0..y-1)")
    p.add_argument("--master-addr", help="address of the engine process (the rendezvous; required)")
    p.add_argument("--master-port", type=int, help="rendezvous port (required)")
    p.add_argument("--model", help="checkpoint directory (same checkpoint as the attention side; required)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="as for `afdserve serve` (auto: the same choice the engine makes)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--join-timeout", type=float, default=DEFAULTS["join_timeout_s"], metavar="S")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="fp8: quantize the linear weights to block-scaled FP8 at load, as the engine's "
                   "--quantization (the worker is refused if they differ; docs/fp8.md)")
    p.add_argument("--control-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from afdserve.afd.topology import TopologyError, parse_topology
    if args.control_fd is not None:
        return _run_local(args)
    missing = [f"--{n.replace('_', '-')}" for n in ("afd", "master_addr", "master_port", "model")
               if getattr(args, n) is None]
    if missing:
        print(f"afdserve worker: error: the following arguments are required: {', '.join(missing)}", file=sys.stderr)
        return 2
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

    from afdserve.afd.config import AFDConfig
    from afdserve.afd.executor import available_cores
    from afdserve.afd.ffn_worker import ffn_worker_main
    from afdserve.afd.protocol import WorkerSpec
    from afdserve.config import Step3Config
    from afdserve.engine.executor import default_device
    from afdserve.model.kernels import resolve_dtype
    device = args.device or default_device()
    try:
        dtype = resolve_dtype(args.dtype, Step3Config.from_file(args.model).torch_dtype, device)
    except (OSError, ValueError) as exc:
        print(f"afdserve worker: error: cannot read the checkpoint's config in {args.model}: {exc}", file=sys.stderr)
        return 2
    try:
        afd = AFDConfig(topo, master_addr=args.master_addr, master_port=args.master_port,
                        join_timeout_s=args.join_timeout, ffn_remote=True)
    except ValueError as exc:
        print(f"afdserve worker: error: {exc}", file=sys.stderr)
        return 2
    spec = WorkerSpec(afd, args.model, dtype, device, threads=args.threads or available_cores(),
                      quantization=args.quantization)
    code = _guarded("afdserve worker", lambda: ffn_worker_main(spec, args.rank, None))
    os._exit(code)     # skip process-group teardown, which can block on peers that are gone


def _guarded(who: str, main) -> int:
    """Run a worker's main; a refused handshake exits 2, a lost deployment or an error 1."""
    from afdserve.afd.rendezvous import HandshakeError
    try:
        code = main()
    except HandshakeError as exc:
        print(f"{who}: error: {exc}", file=sys.stderr)
        code = 2
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{who}: the deployment ended: {text}" if isinstance(exc, RuntimeError) else
              f"{who}: {type(exc).__name__}: {text}", file=sys.stderr)
        code = 1
    sys.stderr.flush()
    return code


def _run_local(args: argparse.Namespace) -> int:
    """A worker started by the engine process: its WorkerSpec arrives over the control channel."""
    import os
    from multiprocessing.connection import Connection

    from afdserve.afd.attention_worker import attention_worker_main
    from afdserve.afd.ffn_worker import ffn_worker_main
    conn = Connection(args.control_fd)
    spec = conn.recv()
    parent = os.getppid()
    if args.role == "attention":
        code = _guarded(f"afdserve attention worker {args.rank}",
                        lambda: attention_worker_main(spec, args.rank, conn, parent))
    else:
        _exit_on_hangup(conn)
        code = _guarded(f"afdserve FFN worker {args.rank}", lambda: ffn_worker_main(spec, args.rank, parent))
    os._exit(code)


def _exit_on_hangup(conn) -> None:
    """A local FFN worker ends when the engine closes its control channel."""
    import os
    import threading

    def wait():
        try:
            conn.recv()
        except (EOFError, OSError):
            pass
        os._exit(3)
    threading.Thread(target=wait, daemon=True, name="afd-control").start()


def main(argv: list[str] | None = None) -> int:
    """`python -m afdserve.afd.cli worker ...` (same as `afdserve worker ...`)."""
    parser = argparse.ArgumentParser(prog="afdserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
