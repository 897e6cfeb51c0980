"""Command-line options of the disaggregated runtime, shared by `serve`, `generate` and friends."""
from __future__ import annotations

import argparse

from afdserve.afd.config import A2F_CHOICES, DEFAULTS

_D = DEFAULTS


def add_afd_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Attention-FFN Disaggregation")
    g.add_argument("--afd", metavar="xAyF", default=None,
                   help="run disaggregated with x attention and y FFN workers, e.g. 1A1F, 2A1F, 1A2F")
    g.add_argument("--micro-batches", type=int, default=_D["micro_batches"], metavar="M",
                   help=f"micro-batches pipelined per step in AFD mode (default {_D['micro_batches']})")
    g.add_argument("--afd-timeout", type=float, default=_D["timeout_s"], metavar="S",
                   help="a worker that stops answering for this long counts as lost (/health names it; an FFN "
                        f"worker is replaced and the step replayed) (default {_D['timeout_s']:g})")
    g.add_argument("--afd-transfer", choices=A2F_CHOICES, default=_D["a2f"],
                   help="A->F activation precision: the model dtype, or 8-bit (FP8 e4m3, int8 fallback) "
                        "with per-token scales (default model)")
    g.add_argument("--afd-return-dtype", choices=("model", "bfloat16", "float32"), default="model",
                   help="F->A precision of the FFN outputs (default: the model dtype)")
    g.add_argument("--ffn-remote", action="store_true",
                   help="start only the attention workers here; the FFN workers join from elsewhere with "
                        "`afdserve worker --role ffn` (needs --master-addr/--master-port)")
    g.add_argument("--master-addr", default=_D["master_addr"], metavar="ADDR",
                   help="address of the rendezvous (hosted by the engine process; default 127.0.0.1)")
    g.add_argument("--master-port", type=int, default=None, metavar="PORT",
                   help="rendezvous port (default: a free port; set it with --ffn-remote)")
    g.add_argument("--afd-join-timeout", type=float, default=_D["join_timeout_s"], metavar="S",
                   help=f"how long start-up waits for every worker to join (default {_D['join_timeout_s']:g})")
    g.add_argument("--afd-rejoin-timeout", type=float, default=None, metavar="S",
                   help="after losing a remote FFN worker, how long to wait for its replacement "
                        "(`afdserve worker --role ffn --rank K`) to join (default: --afd-join-timeout)")
    g.add_argument("--afd-trace-file", default=None, metavar="PATH",
                   help=f"write the pipeline trace of the last {_D['trace_keep']} steps as Chrome trace-event JSON (Perfetto, "
                        "chrome://tracing, `afdserve trace plot/compare`; a worker per track, a slice per "
                        "stage x layer x micro-batch, transfer arrows); a name ending in .jsonl appends "
                        "per-step timings as JSON lines instead. Colocated runs are traced too "
                        "(also: environment variable AFD_TRACE_FILE; docs/trace.md)")
    g.add_argument("--afd-link-latency-ms", type=float, default=_D["link_latency_ms"], metavar="MS",
                   help="benchmarking only: emulate this much A<->F link latency per message")


_OPTIONS = {"timeout_s": "afd_timeout", "a2f": "afd_transfer", "ffn_remote": "ffn_remote",
            "master_addr": "master_addr", "master_port": "master_port", "join_timeout_s": "afd_join_timeout",
            "rejoin_timeout_s": "afd_rejoin_timeout", "trace_file": "afd_trace_file",
            "link_latency_ms": "afd_link_latency_ms"}
"""AFDConfig field -> the option's attribute on the parsed arguments."""


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    """EngineArgs fields set by the options above (`afd_options`: AFDConfig fields)."""
    options = {field: getattr(args, attr, _D[field]) for field, attr in _OPTIONS.items()}
    ret = getattr(args, "afd_return_dtype", "model")
    options["f2a_dtype"] = None if ret == "model" else ret
    if options["ffn_remote"] and not options["master_port"]:
        raise SystemExit("--ffn-remote needs --master-port (the port remote FFN workers connect to)")
    return {"afd": args.afd, "micro_batches": args.micro_batches, "afd_options": options}
