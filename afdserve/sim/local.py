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
import statistics
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
    """Rows at which a decode-shaped GEMM reaches half of `gemm_flops` (fitted to measurements)."""
    p2p_latency_us: float = 0.0
    p2p_bytes_per_s: float = 1e12
    gemm_flops: float = 0.0
    """The decode-shaped GEMMs' asymptotic FLOP/s (fitted; 0 = `matmul_flops`)."""

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


GEMM_ROWS = (4, 8, 16, 32, 64)


def measure_cpu(threads: int, quick: bool = False) -> CpuFigures:
    """Streaming-read bandwidth, GEMM FLOP/s, the decode-shape GEMM curve and per-op cost with
    `threads` torch threads.

    `matmul_flops` is a large GEMM's rate. Decode GEMMs multiply streamed weights by a few rows:
    x[rows, in] times distinct weights of the `small` preset's decode shapes, in the layouts and
    through the kernels the engine uses (`afdserve.model.kernels`), is timed at GEMM_ROWS, and
    the simulator's curve, time = 2 x params x rows / (gemm_flops x rows / (rows + n_half)), is
    fitted to it (`fit_gemm_curve`).
    """
    import torch

    from afdserve.model.kernels import linear
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    reps = 3 if quick else 7
    try:
        x = torch.ones(32 * 2**20 if quick else 64 * 2**20)          # 128/256 MB fp32
        bw = x.numel() * 4 / _median_time(lambda: x.sum(), reps)
        del x
        a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
        flops = 2 * 512 * 1024 * 1024 / _median_time(lambda: a @ b, reps)
        weights = decode_weights(8 if quick else 16)
        params = sum(w.numel() for w in weights)
        seconds_per_param = {}
        for rows in GEMM_ROWS:
            xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
            seconds_per_param[rows] = _median_time(
                lambda: [linear(xs[w.shape[1]], w) for w in weights], reps) / params
        s = torch.ones(4)
        n = 2000

        def ops():
            for _ in range(n):
                s.add(1.0)
        op_us = _median_time(ops, reps) / n * 1e6
    finally:
        torch.set_num_threads(old)
    gemm_flops, n_half = fit_gemm_curve(seconds_per_param)
    return CpuFigures(threads, bw, flops, op_us, n_half, gemm_flops=gemm_flops)


# (out, in, stored transposed): the small preset's fused expert gate+up, expert down, wq, o_proj.
DECODE_SHAPES = ((1024, 768, True), (768, 512, False), (2048, 384, True), (768, 2048, False))


def decode_weights(per_shape: int):
    """Distinct random weights of DECODE_SHAPES in the engine's layouts (more than the caches hold)."""
    import torch
    out = []
    for o, i, transposed in DECODE_SHAPES:
        for _ in range(per_shape):
            w = torch.randn(o, i)
            out.append(w.t().contiguous().t() if transposed else w)
    return out


def fit_gemm_curve(seconds_per_param: dict[int, float]) -> tuple[float, float]:
    """(gemm_flops, n_half) of the simulator's GEMM curve from measured seconds per weight.

    With efficiency e(n) = n / (n + n_half), a GEMM of n rows over P weights takes
    2 P n / (F e(n)) = P (2 / F) (n + n_half): time per weight is linear in the rows, so a
    least-squares line a + b n gives F = 2 / b and n_half = a / b.
    """
    pts = sorted(seconds_per_param.items())
    if len(pts) < 2:
        raise ValueError("need at least two row counts to fit the GEMM curve")
    n_mean = sum(n for n, _ in pts) / len(pts)
    t_mean = sum(t for _, t in pts) / len(pts)
    b = sum((n - n_mean) * (t - t_mean) for n, t in pts) / sum((n - n_mean) ** 2 for n, _ in pts)
    if b <= 0:
        raise ValueError("GEMM time does not grow with the rows; the measurement is unusable")
    a = t_mean - b * n_mean
    return 2.0 / b, max(a / b, 0.0)


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
    peak = (fig.gemm_flops or fig.matmul_flops) / fig.matmul_flops
    return load_efficiency("cpu", gemm_half_tokens=fig.gemm_half_tokens, gemm_peak_efficiency=peak,
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
