"""The simulator on this machine: a CPU 'accelerator' built from measured figures, and a
decode-throughput predictor for a small Step-3-shaped model (colocated and AFD 1A1F).

Measured: streaming-read bandwidth (the bench's: the fastest of several read kernels), matmul FLOP/s, a table of
decode-GEMM rates at 1-64 rows through the engine's own kernels and layouts, per-op dispatch
cost (`measure_cpu`); the per-layer cost of afdserve's attention and FFN halves on a model of
the same structure with tiny widths (`measure_layer_overheads`); gloo point-to-point latency
and bandwidth (`measure_p2p`) and the AFD runtime's cost per exchange (`fit_link_latency`, from
the tiny-width model run through 1A1F). The predictor then runs the same `simulate` as the GPU
model with the 'cpu' efficiency profile and fp32 everywhere. torch is imported only inside the
measuring functions.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass

from afdserve.cost.arch import ModelArch, from_hf_config
from afdserve.cost.hardware import Hardware
from afdserve.sim.simulator import Deployment, SimPrecision, SimResult, load_efficiency, \
    simulate

FP32 = SimPrecision(weight_bytes=4, kv_bytes=4, a2f_bytes=4, f2a_bytes=4, a2f_scales=False)
# PyTorch ops dispatched per step outside the layers (embedding, final norm, sampling, batch
# building; Python + torch), counted from afdserve/engine.
OPS_STEP = 300


@dataclass(frozen=True)
class CpuFigures:
    """Achieved rates of this CPU with `threads` threads (per process)."""

    threads: int
    read_bytes_per_s: float
    matmul_flops: float
    op_us: float
    gemm_seconds_per_weight: tuple[tuple[int, float], ...] = ()
    """(rows, seconds per weight) of decode-shaped GEMMs through the engine's kernels, over the
    attention projections' shapes (ATTENTION_SHAPES)."""
    p2p_latency_us: float = 0.0
    p2p_bytes_per_s: float = 1e12
    ffn_gemm_seconds_per_weight: tuple[tuple[int, float], ...] = ()
    """The same over the FFN layers' shapes (FFN_SHAPES); empty: use the attention table."""

    def gemm_efficiency_table(self, ffn: bool = False) -> tuple[tuple[float, float], ...]:
        """(rows, achieved fraction of `matmul_flops`) for the simulator's `gemm_table` (or, with
        `ffn`, its `ffn_gemm_table`)."""
        table = self.ffn_gemm_seconds_per_weight if ffn else self.gemm_seconds_per_weight
        return tuple((n, 2 * n / (t * self.matmul_flops)) for n, t in table)

    def hardware(self) -> Hardware:
        return Hardware(name=f"cpu-{self.threads}t", usd_per_hour=1.0,
                        bf16_flops=self.matmul_flops, fp8_flops=self.matmul_flops,
                        hbm_bytes_per_s=self.read_bytes_per_s, memory_bytes=8e9,
                        nic_bytes_per_s=self.p2p_bytes_per_s, gpus_per_node=1,
                        source="measured on this machine by afdserve.sim.local")


def _median_time(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls after one untimed call (medians, like the decode runs
    they predict, which average over noise rather than keep the best case)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


GEMM_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def measure_cpu(threads: int, quick: bool = False, neighbour: bool = False) -> CpuFigures:
    """Streaming-read bandwidth, GEMM FLOP/s, the decode-shape GEMM rate table and per-op cost with
    `threads` torch threads.

    The bandwidth is `afdserve.bench.machine.measure_bandwidth` (the fastest of several read
    kernels, afdserve's native GEMV among them) taking medians instead of best times.

    `matmul_flops` is a large GEMM's rate. Decode GEMMs multiply streamed weights by a few rows:
    x[rows, in] times distinct weights of the `small` preset's decode shapes, in the layouts and
    through the kernels the engine uses (`afdserve.model.kernels`), is timed at GEMM_ROWS; the
    simulator interpolates these points instead of its GEMM-efficiency curve (the CPU kernels'
    rate is not monotone in the rows: 1-row GEMVs stream faster than 3-4-row GEMMs).

    With `neighbour`, everything is measured while another process (one thread) streams decode
    weights through the same kernels: the condition of an AFD worker whose peer computes at the
    same time on the same memory system (both roles on one machine, pipelined micro-batches).
    """
    import torch

    from afdserve.bench.machine import measure_bandwidth
    from afdserve.model import kernels
    from afdserve.model.kernels import linear
    old, policy = torch.get_num_threads(), kernels.current_policy()
    torch.set_num_threads(threads)
    kernels.ensure_policy()           # the kernels and layouts the engine picks at `threads`
    reps = 3 if quick else 7
    peer = _start_neighbour() if neighbour else None
    try:
        # the bench's measurement (the fastest of its read kernels), with medians like the rest here
        bw = measure_bandwidth("cpu", (128 if quick else 256) << 20, reps, statistic="median")["bytes_per_s"]
        a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
        flops = 2 * 512 * 1024 * 1024 / _median_time(lambda: a @ b, reps)
        tables = []
        for shapes in (ATTENTION_SHAPES, FFN_SHAPES):
            weights = decode_weights(8 if quick else 16, shapes)
            params = sum(w.numel() for w in weights)
            seconds_per_param = {}
            for rows in GEMM_ROWS:
                xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
                seconds_per_param[rows] = _median_time(
                    lambda: [linear(xs[w.shape[1]], w) for w in weights], reps) / params
            tables.append(tuple(sorted(seconds_per_param.items())))
            del weights
        s = torch.ones(4)
        n = 2000

        def ops():
            for _ in range(n):
                s.add(1.0)
        op_us = _median_time(ops, reps) / n * 1e6
    finally:
        torch.set_num_threads(old)
        kernels.use_policy(policy)
        if peer is not None:
            peer.kill()
            peer.wait()
    return CpuFigures(threads, bw, flops, op_us, tables[0], ffn_gemm_seconds_per_weight=tables[1])


# The neighbour of measure_cpu(neighbour=True): streams 8-row decode GEMMs until killed, and exits
# by itself if the measuring process goes away.
_NEIGHBOUR = """
import os, sys, torch
torch.set_num_threads(1)
from afdserve.model.kernels import linear
from afdserve.sim.local import decode_weights
parent = int(sys.argv[1])
ws = decode_weights(16)
xs = {w.shape[1]: torch.randn(8, w.shape[1]) for w in ws}
print("ready", flush=True)
while os.getppid() == parent:
    for w in ws:
        linear(xs[w.shape[1]], w)
"""


def _start_neighbour():
    import select
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", _NEIGHBOUR, str(os.getpid())], stdout=subprocess.PIPE,
                            text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("the neighbour process of measure_cpu(neighbour=True) did not start")
    return proc


# (out, in) of the small preset's matrices: the attention projections (fused q/k/v, wq, o_proj)
# and the FFN layers' (fused expert gate+up, expert down; the shared expert has the same shapes).
# Measured apart because the kernels stream them at different rates (benchmarks/kernel_bench.py).
ATTENTION_SHAPES = ((640, 768), (2048, 384), (768, 2048))
FFN_SHAPES = ((1024, 768), (768, 512))
DECODE_SHAPES = ATTENTION_SHAPES + FFN_SHAPES


def decode_weights(per_shape: int, shapes: tuple[tuple[int, int], ...] = DECODE_SHAPES):
    """Distinct random weights of `shapes` (more than the caches hold), in the layouts
    `prepare_for_decode` gives them under the current thread count."""
    import torch

    from afdserve.model.kernels import stored_transposed
    out = []
    for o, i in shapes:
        for _ in range(per_shape):
            w = torch.randn(o, i)
            out.append(w.t().contiguous().t() if stored_transposed(o, i) else w)
    return out


def _p2p_worker(rank: int, port: int, sizes: list[int], reps: int, queue) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    out = {}
    for size in sizes:
        buf = torch.zeros(size // 4)
        best = float("inf")
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            if rank == 0:           # ping-pong: one-way time = round trip / 2
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            best = min(best, (time.perf_counter() - t) / 2)
        out[size] = best
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def measure_p2p(quick: bool = False) -> tuple[float, float]:
    """(latency_us, bytes_per_s) of gloo send/recv between two local processes (ping-pong)."""
    import torch.multiprocessing as mp
    from afdserve.afd.executor import free_port
    sizes = [4, 4 * 2**20]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_p2p_worker, args=(r, port, sizes, 5 if quick else 20, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    out = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    lat = out[sizes[0]]
    bw = (sizes[1] - sizes[0]) / max(out[sizes[1]] - lat, 1e-9)
    return lat * 1e6, bw


def small_arch(model_dir: str | os.PathLike | None = None) -> ModelArch:
    """The `small` preset as the cost model sees it (from a checkpoint's config.json, or from
    afdserve.config's preset)."""
    if model_dir is not None:
        return from_hf_config(model_dir)
    from afdserve.config import get_preset
    return arch_of(get_preset("small"))


def arch_of(cfg) -> ModelArch:
    """A Step3Config as the cost model sees it."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields["model_type"] = "step3_text"
    fields["moe_layers_enum"] = list(fields.get("moe_layers_enum") or [])
    return from_hf_config(fields)


def narrow_config():
    """The `small` preset's structure (layers, heads, experts, top-k) with widths of a few
    elements: running it times everything a decode step does except streaming weights and KV."""
    from afdserve.config import get_preset
    return dataclasses.replace(get_preset("small"), hidden_size=16, share_q_dim=16, head_dim=8,
                               intermediate_size=16, moe_intermediate_size=8, share_expert_dim=8,
                               vocab_size=1024)


@dataclass(frozen=True)
class LayerOverheads:
    """Measured fixed cost (us) of one layer half, everything but streaming weights and KV."""

    attention_us: float
    ffn_us: float           # averaged over the model's dense and MoE layers


def measure_layer_overheads(threads: int, tokens: int, quick: bool = False) -> LayerOverheads:
    """Time afdserve's own attention and FFN layer halves for `tokens` decoding sequences in a
    model with the `small` preset's structure (16 query heads over one KV head, 16 experts top-3
    + shared expert) but widths of a few elements, so that what is timed is the per-layer cost
    of the ops, kernel calls and Python the real layers run (routing picks experts at random
    weights, as in the benchmarks)."""
    import torch

    from afdserve.config import get_preset
    from afdserve.model.attention import AttentionMetadata, KVCache
    from afdserve.model.checkpoint import init_random
    from afdserve.model.kernels import prepare_for_decode
    from afdserve.model.step3 import Step3ForCausalLM
    small = get_preset("small")
    cfg = dataclasses.replace(narrow_config(), num_hidden_layers=2, moe_layers_enum=(1,))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = prepare_for_decode(init_random(Step3ForCausalLM(cfg), seed=0))
        model.init_rope()
        ctx, bs = 32, 16
        per_seq = ctx // bs + 1
        kv = KVCache(2, tokens * per_seq + 1, bs, cfg.num_attention_groups, cfg.head_dim, torch.float32)
        tables = [[1 + s * per_seq + j for j in range(per_seq)] for s in range(tokens)]
        meta = AttentionMetadata.build([ctx] * tokens, [t[ctx // bs] * bs + ctx % bs for t in tables],
                                       [1] * tokens, [ctx + 1] * tokens, tables, bs)
        h = torch.randn(tokens, cfg.hidden_size)
        dense, moe = model.layers
        reps = 5 if quick else 15
        with torch.inference_mode():
            attn = _median_time(lambda: moe.ffn_input(moe.attention_half(h, model.rope, meta, kv.k[1], kv.v[1])),
                                reps)
            inp_d, inp_m = dense.ffn_input(h), moe.ffn_input(h)
            t_dense = _median_time(lambda: dense.ffn_half(inp_d), reps)
            t_moe = _median_time(lambda: moe.ffn_half(inp_m), reps)
    finally:
        torch.set_num_threads(old)
    n_moe = len(small.moe_layers_enum)
    ffn = (n_moe * t_moe + (small.num_hidden_layers - n_moe) * t_dense) / small.num_hidden_layers
    return LayerOverheads(attn * 1e6, ffn * 1e6)


def cpu_efficiency(fig: CpuFigures, over: LayerOverheads, ffn_fig: CpuFigures | None = None):
    """The 'cpu' profile with the measured GEMM rates (the FFN layers' from `ffn_fig`, default
    `fig`: a fraction of the matmul rate of the machine that runs them), layer overheads and link
    latency."""
    ffn_fig = ffn_fig or fig
    ffn_table = ffn_fig.gemm_efficiency_table(ffn=True) if ffn_fig.ffn_gemm_seconds_per_weight else ()
    return load_efficiency("cpu", gemm_table=fig.gemm_efficiency_table(), ffn_gemm_table=ffn_table,
                           attention_layer_overhead_us=over.attention_us,
                           ffn_layer_overhead_us=over.ffn_us,
                           step_overhead_us=fig.op_us * OPS_STEP,
                           transfer_latency_us=fig.p2p_latency_us)


def predict_colocated(arch: ModelArch, fig: CpuFigures, over: LayerOverheads, batch: int,
                      context: int) -> SimResult:
    """One process does everything (EP 1, one micro-batch, no transfers)."""
    hw = fig.hardware()
    dep = Deployment("colocated", hw, hw, ep=1, micro_batches=1)
    return simulate(arch, dep, context, batch, FP32, cpu_efficiency(fig, over))


def predict_afd(arch: ModelArch, attn: CpuFigures, ffn: CpuFigures, over: LayerOverheads,
                batch: int, context: int, micro_batches: int) -> SimResult:
    """1A1F: one attention process and one FFN process of one core each, gloo in between."""
    dep = Deployment("afd", attn.hardware(), ffn.hardware(), 1, 1, 1,
                     micro_batches=micro_batches)
    return simulate(arch, dep, context, batch, FP32, cpu_efficiency(attn, over, ffn))


def measure_engine_decode(model_dir: str, batch: int, tokens: int, prompt_len: int, **llm_kwargs) -> float:
    """Decode tokens/s of `afdserve.LLM` after prefill (engine.step() timed directly): B requests
    of `prompt_len` tokens, greedy, ignore_eos, `tokens` new tokens each. In fp32 unless `dtype` is
    given: the figures this module measures, and so its predictions, are fp32 (an fp32 engine
    runs its layers one by one, without decode graphs, as `measure_layer_overheads` times them)."""
    from afdserve import LLM, SamplingParams
    llm_kwargs.setdefault("dtype", "float32")
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    with LLM(model=model_dir, max_num_seqs=max(batch, 64), **llm_kwargs) as llm:
        eng = llm.engine
        for i in range(batch):
            eng.add_request(f"r{i}", [(7 * i + j) % 1000 + 2 for j in range(prompt_len)], params)
        produced: dict[str, int] = {}
        while len(produced) < batch or min(produced.values()) < 1:   # prefill (+ first token)
            for out in eng.step():
                produced[out.request_id] = len(out.outputs[0].token_ids)
        start_tokens = sum(produced.values())
        t = time.perf_counter()
        while eng.has_unfinished_requests():
            for out in eng.step():
                produced[out.request_id] = len(out.outputs[0].token_ids)
        elapsed = time.perf_counter() - t
    return (sum(produced.values()) - start_tokens) / elapsed


def fit_link_latency(fig: CpuFigures, over: LayerOverheads, batch: int, context: int,
                     micro_batches: int, measured_step_s: float) -> float:
    """The per-transfer latency (us) at which the simulator reproduces `measured_step_s`, the
    decode step of the *narrow* model (`narrow_config`) through the AFD 1A1F runtime.

    The narrow model streams almost no weights, so its step is the runtime's fixed costs: layer
    overheads (measured separately) and, per layer and micro-batch, the A->F and F->A exchanges
    with everything the runtime does around them (queueing, process wake-ups, gloo). This
    measures that exchange cost through the runtime itself; a gloo ping-pong alone misses most
    of it. 0 when the step is already explained without any latency.
    """
    arch = arch_of(narrow_config())

    def step_s(lat_us: float) -> float:
        f = dataclasses.replace(fig, p2p_latency_us=lat_us)
        return predict_afd(arch, f, f, over, batch, context, micro_batches).tpot_ms / 1e3

    lo, hi = 0.0, 1e5
    if step_s(lo) >= measured_step_s:
        return 0.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if step_s(mid) < measured_step_s:
            lo = mid
        else:
            hi = mid
    return lo
