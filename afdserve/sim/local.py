"""The simulator on this machine: a CPU 'accelerator' built from measured figures, and a
decode-throughput predictor for a small Step-3-shaped model (colocated and AFD 1A1F).

Measured (`measure_cpu`): streaming-read bandwidth (a large fp32 reduction), matmul FLOP/s
(fp32 GEMM), per-op dispatch cost of PyTorch on CPU, and gloo point-to-point latency and
bandwidth between two local processes. The predictor then runs the same `simulate` as the GPU
model with the 'cpu' efficiency profile (efficiencies ~1, since the rates are achieved ones) and
fp32 everywhere. torch is imported only inside the measuring functions.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from afdserve.cost.arch import ModelArch, from_hf_config
from afdserve.cost.hardware import Hardware
from afdserve.sim.simulator import Deployment, SimPrecision, SimResult, load_efficiency, \
    simulate

FP32 = SimPrecision(weight_bytes=4, kv_bytes=4, a2f_bytes=4, f2a_bytes=4, a2f_scales=False)
# PyTorch ops dispatched per layer half and per step by afdserve's model code (counted from
# afdserve/model: norms, projections, RoPE, paged-cache write/read, softmax, residuals; the MoE
# half: router, top-k, per-expert gather/GEMMs/scatter for each active expert, shared expert).
OPS_ATTENTION_LAYER = 40
OPS_FFN_LAYER_BASE = 20
OPS_PER_ACTIVE_EXPERT = 10
OPS_STEP = 300            # embedding, LM head, sampling, batch building (Python + torch)


@dataclass(frozen=True)
class CpuFigures:
    """Achieved rates of this CPU with `threads` threads (per process)."""

    threads: int
    read_bytes_per_s: float
    matmul_flops: float
    op_us: float
    gemm_half_tokens: float = 1.0
    """Rows at which a decode-shaped GEMM reaches half of `matmul_flops` (fitted to measurements)."""
    p2p_latency_us: float = 0.0
    p2p_bytes_per_s: float = 1e12

    def hardware(self) -> Hardware:
        return Hardware(name=f"cpu-{self.threads}t", usd_per_hour=1.0,
                        bf16_flops=self.matmul_flops, fp8_flops=self.matmul_flops,
                        hbm_bytes_per_s=self.read_bytes_per_s, memory_bytes=8e9,
                        nic_bytes_per_s=self.p2p_bytes_per_s, gpus_per_node=1,
                        source="measured on this machine by afdserve.sim.local")


def _best_time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


GEMM_ROWS = (4, 8, 16, 32, 64)


def measure_cpu(threads: int, quick: bool = False) -> CpuFigures:
    """Streaming-read bandwidth, GEMM FLOP/s, the decode-shape GEMM curve and per-op cost with
    `threads` torch threads.

    `matmul_flops` is a large GEMM's rate. Decode GEMMs multiply streamed weights by a few rows
    and reach a fraction of it that grows with the rows: x[rows, 768] times distinct [2048, 768]
    weights is timed at GEMM_ROWS and `gemm_half_tokens` is fitted to e(n) = n / (n + n_half),
    the simulator's GEMM-efficiency curve.
    """
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(32 * 2**20 if quick else 64 * 2**20)          # 128/256 MB fp32
        bw = x.numel() * 4 / _best_time(lambda: x.sum(), 3 if quick else 5)
        del x
        a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
        flops = 2 * 512 * 1024 * 1024 / _best_time(lambda: a @ b, 5)
        weights = [torch.randn(2048, 768) for _ in range(8 if quick else 24)]
        efficiency = {}
        for rows in GEMM_ROWS:
            xr = torch.randn(rows, 768)
            t = _best_time(lambda: [torch.nn.functional.linear(xr, w) for w in weights], 3)
            efficiency[rows] = 2 * rows * 768 * 2048 * len(weights) / t / flops
        s = torch.ones(4)
        n = 2000

        def ops():
            for _ in range(n):
                s.add(1.0)
        op_us = _best_time(ops, 3) / n * 1e6
    finally:
        torch.set_num_threads(old)
    return CpuFigures(threads, bw, flops, op_us, fit_gemm_half_tokens(efficiency))


def fit_gemm_half_tokens(efficiency: dict[int, float]) -> float:
    """n_half of e(n) = n / (n + n_half) from measured efficiencies (mean of the per-point solutions)."""
    halves = [n * (1 - e) / e for n, e in efficiency.items() if 0 < e < 1]
    return sum(halves) / len(halves) if halves else 1.0


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
    cfg = get_preset("small")
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields["model_type"] = "step3_text"
    fields["moe_layers_enum"] = list(fields.get("moe_layers_enum") or [])
    return from_hf_config(fields)


def cpu_efficiency(fig: CpuFigures, arch: ModelArch):
    """The 'cpu' profile with the per-op overheads and link latency put in from measurements."""
    ffn_ops = OPS_FFN_LAYER_BASE + OPS_PER_ACTIVE_EXPERT * (arch.num_experts or 1)
    return load_efficiency("cpu", gemm_half_tokens=fig.gemm_half_tokens,
                           attention_layer_overhead_us=fig.op_us * OPS_ATTENTION_LAYER,
                           ffn_layer_overhead_us=fig.op_us * ffn_ops,
                           step_overhead_us=fig.op_us * OPS_STEP,
                           transfer_latency_us=fig.p2p_latency_us)


def predict_colocated(arch: ModelArch, fig: CpuFigures, batch: int, context: int) -> SimResult:
    """One process does everything (EP 1, one micro-batch, no transfers)."""
    hw = fig.hardware()
    dep = Deployment("colocated", hw, hw, ep=1, micro_batches=1)
    return simulate(arch, dep, context, batch, FP32, cpu_efficiency(fig, arch))


def predict_afd(arch: ModelArch, attn: CpuFigures, ffn: CpuFigures, batch: int, context: int,
                micro_batches: int) -> SimResult:
    """1A1F: one attention process and one FFN process of one core each, gloo in between."""
    dep = Deployment("afd", attn.hardware(), ffn.hardware(), 1, 1, 1,
                     micro_batches=micro_batches)
    return simulate(arch, dep, context, batch, FP32, cpu_efficiency(attn, arch))
