"""The FFN worker of AFD (global rank x..x+y-1): dense FFNs, experts and shared expert of its `FFNShard`.

Its loop walks the shared layer schedule (`engine/schedule.layer_order`): for every (layer,
micro-batch) of a step it receives from every attention worker, concatenates all their tokens
into one batch, computes that layer's FFN half and sends each attention worker its rows back.
The micro-batch count m of a step comes with the header of its first pair; the worker adopts
the runtime settings of attention worker 0 (`AFDConfig.adopt`). When the process group breaks
it drops it and rejoins the engine's next generation by itself.
"""
from __future__ import annotations

import sys
import time

import torch

from afdserve.afd import rendezvous as rdv
from afdserve.afd.connector import Connector, FFNMessage, first_line, make_connector
from afdserve.afd.handshake import Membership, watch_parent, worker_device
from afdserve.afd.protocol import WorkerSpec
from afdserve.afd.trace import pack_ffn_stamps
from afdserve.config import Step3Config
from afdserve.engine.schedule import layer_order
from afdserve.model.checkpoint import load_model, parse_dtype
from afdserve.model.kernels import prepare_for_decode
from afdserve.model.step3 import FFNInput


def ffn_worker_main(spec: WorkerSpec, index: int, parent_pid: int | None) -> int:
    """Entry point of FFN worker `index` (local child or `afdserve worker --role ffn`).

    Serves until a stop message; when the group breaks it rejoins the engine's next generation
    (DeploymentEnded when none comes within the join timeout or the engine is gone)."""
    watch_parent(parent_pid)
    torch.set_num_threads(max(1, spec.threads))
    config = Step3Config.from_file(spec.model_dir)
    member = Membership(spec, "ffn", index)
    afd = member.enter(config)
    device = worker_device(spec, afd.topology.ffn_rank(index))
    err = None
    try:
        dtype = parse_dtype(spec.dtype)
        model = prepare_for_decode(load_model(spec.model_dir, dtype, role="ffn", shard=afd.topology.ffn_shard(index),
                                              config=config, device=device, quantization=spec.quantization))
        conn = make_connector(afd, config, dtype, device)
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
    conn.pg = member.form(err, device)
    with torch.inference_mode():
        while True:
            try:
                serve_ffn(model, conn)
                return 0
            except RuntimeError as exc:        # a peer was lost, or the engine re-forms the group
                print(f"afdserve FFN worker {index}: process group lost ({first_line(exc)}); rejoining",
                      file=sys.stderr, flush=True)
                conn.pg = member.pg = None
                gen = rdv.wait_generation_after(member.store, member.gen, afd.join_timeout_s)
                conn.pg = member.rejoin(gen, config, device)


def serve_ffn(model, conn: Connector) -> None:
    """Steps until a stop message; after each, its timings go to attention worker 0."""
    config, L = model.config, len(model.layers)
    top_k = [config.moe_top_k if config.is_moe_layer(i) else 0 for i in range(L)]
    while (times := ffn_step(model.layers, conn, top_k)) is not None:
        conn.send_timings(pack_ffn_stamps(times))


def ffn_step(layers, conn: Connector, top_k: list[int]) -> list[list[tuple]] | None:
    """One step over `layer_order(L, m)`; times[i][j] = (wait from, received, computed, replied),
    or None at a stop message."""
    L = len(layers)
    t0 = time.perf_counter()
    msgs = conn.recv_from_attention(0, 0, top_k[1] if L > 1 else None)
    if any(msg.stop for msg in msgs):
        return None
    m = msgs[0].num_micro_batches
    times: list[list[tuple]] = [[()] * m for _ in range(L)]
    for i, j in layer_order(L, m):
        if (i, j) != (0, 0):
            t0 = time.perf_counter()
            msgs = conn.recv_from_attention(i, j, top_k[i + 1] if i + 1 < L else None)
            if any(msg.stop for msg in msgs):
                return None
        check_order(msgs, i, j, m)
        t1 = time.perf_counter()
        y = ffn_half(layers[i], msgs)
        t2 = time.perf_counter()
        if y is not None:
            conn.reply(j, msgs, y)
        times[i][j] = (t0, t1, t2, time.perf_counter())
    return times


def check_order(msgs: list[FFNMessage], i: int, j: int, m: int) -> None:
    """Every attention worker must send the pair (i, j) of a step with m micro-batches."""
    for a, msg in enumerate(msgs):
        if (msg.layer, msg.micro_batch, msg.num_micro_batches) != (i, j, m):
            raise RuntimeError(f"protocol error: attention worker {a} sent layer {msg.layer} micro-batch "
                               f"{msg.micro_batch}/{msg.num_micro_batches}, expected layer {i} micro-batch {j}/{m}")


def ffn_half(layer, msgs: list[FFNMessage]) -> torch.Tensor | None:
    """The layer's FFN half on every attention worker's tokens at once (None when all are empty)."""
    live = [msg for msg in msgs if msg.num_tokens]
    if not live:
        return None
    x = torch.cat([msg.x for msg in live]) if len(live) > 1 else live[0].x
    weights = ids = None
    if live[0].ids is not None:
        weights = torch.cat([msg.weights for msg in live])
        ids = torch.cat([msg.ids for msg in live])
    return layer.ffn_half(FFNInput(x, weights, ids))
