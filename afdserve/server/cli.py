"""`afdserve serve`: the OpenAI-compatible server (FastAPI + uvicorn) over one engine.

Shutdown: on SIGINT/SIGTERM uvicorn stops accepting connections and gives in-flight requests
`--shutdown-timeout` seconds to finish; the ones still running then end with an error ("the
server is shutting down": an SSE error event then `data: [DONE]`, or a 503), the step thread
stops, and `engine.close()` stops the workers (AFD mode). The process exits with status 0.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from afdserve.afd.options import add_afd_arguments, engine_kwargs_from_args
from afdserve.commands import (add_kernels_argument, add_kv_cache_dtype_argument, add_quantization_argument,
                               apply_kernels_argument)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
                       "/metrics over one engine (colocated, or disaggregated with --afd).")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: folder name)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 where the checkpoint is bf16/fp16 or the CPU has bf16 arithmetic, else float32")
    add_kernels_argument(p)
    add_quantization_argument(p)
    add_kv_cache_dtype_argument(p)
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step, at most")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + output)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per attention worker "
                   "(default: from a 512 MiB budget)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get to finish on SIGINT/SIGTERM")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    add_afd_arguments(p)
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from afdserve.engine.engine import EngineArgs, LLMEngine
    from afdserve.server.api import build_app
    from afdserve.server.async_engine import AsyncEngine

    apply_kernels_argument(args)
    engine_args = EngineArgs(model=args.model, dtype=args.dtype, quantization=args.quantization,
                             kv_cache_dtype=args.kv_cache_dtype, max_num_seqs=args.max_num_seqs,
                             max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks,
                             progress=True, **engine_kwargs_from_args(args))
    engine = LLMEngine(engine_args)
    async_engine = AsyncEngine(engine)
    try:
        name = args.served_model_name or engine.model_dir.name
        app = build_app(async_engine, name, args.api_key, args.max_body_bytes)
        print(summary(engine, name, args), flush=True)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                access_log=not args.no_access_log,
                                timeout_graceful_shutdown=args.shutdown_timeout + 5, lifespan="off")
        server = _make_server(config, async_engine, args.shutdown_timeout)
        # uvicorn re-raises the signal that stopped it once it is done; these handlers take it, so
        # the engine below is still closed and the exit is clean.
        previous = {s: signal.signal(s, _noted) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.run()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    finally:
        async_engine.shutdown()
    print("afdserve serve: stopped", file=sys.stderr, flush=True)
    return 0


def _noted(signum, frame) -> None:
    pass


def _make_server(config, async_engine, grace: float):
    """A uvicorn.Server (imported here: `afdserve --help` must stay cheap)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """Ends requests still running `grace` seconds into shutdown with an error, instead of
        letting uvicorn cancel their tasks (which would cut streams without a message)."""

        def __init__(self, config, async_engine, grace: float):
            super().__init__(config)
            self.async_engine, self.grace = async_engine, grace

        async def shutdown(self, sockets=None) -> None:
            timer = asyncio.get_running_loop().call_later(self.grace, self.async_engine.fail_in_flight)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return GracefulServer(config, async_engine, grace)


def summary(engine, name: str, args: argparse.Namespace) -> str:
    """One line: what is served, how, and where."""
    stats = engine.stats()
    workers = engine.executor.num_workers
    mode = f"AFD {args.afd}" if getattr(args, "afd", None) else "colocated"
    tok = "tokenizer" if engine.tokenizer is not None else "no tokenizer (token ids only)"
    kv = "" if engine.args.kv_cache_dtype == "auto" else f" ({engine.args.kv_cache_dtype})"
    return (f"afdserve serve: model {name} ({engine.model_dir}), {engine.dtype}, "
            f"{stats.num_kv_blocks} KV blocks{kv} x {engine.args.block_size} tokens over {workers} attention "
            f"worker(s), context {engine.max_model_len}, {tok}, {mode}, "
            f"listening on http://{args.host}:{args.port}")
