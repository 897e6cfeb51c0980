"""The machine's own limits, measured in the same run as the benchmarks they normalise.

* memory bandwidth: a streaming read (`sum` of a large fp32 tensor), best of several;
* matmul throughput: square matmuls in the benchmark's dtype, best of several;
* a description: CPU model, cores, torch threads and version, GPU if any.
"""
from __future__ import annotations

import os
import platform
import time

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def describe(device: str = "cpu") -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = available_memory_bytes()
    out = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "device": str(device),
        "mem_available_gb": round(mem / 2**30, 1) if mem else None,
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover - optional
        out["transformers"] = None
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(torch.device(device))
        out.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return out


def available_memory_bytes(device: str = "cpu") -> int | None:
    """Memory a benchmark may still allocate (MemAvailable on Linux; free memory on CUDA)."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def best_time(fn, repeats: int, device: str = "cpu", warmup: int = 1) -> float:
    """Best wall time of `fn()` over `repeats` runs (after `warmup` untimed runs)."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(device: str = "cpu", size_bytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Streaming-read bandwidth: bytes / best time of `x.sum()` over an fp32 tensor of `size_bytes`."""
    n = size_bytes // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    t = best_time(lambda: x.sum(), repeats, device)
    del x
    return {"bytes_per_s": size_bytes / t, "size_bytes": size_bytes, "best_s": t, "repeats": repeats,
            "method": "best-of-N time of torch.sum over a fp32 tensor"}


def measure_matmul(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                   repeats: int = 5) -> dict:
    """Matmul throughput: 2*n^3 / best time of an n x n @ n x n product in `dtype`."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    out = torch.empty(n, n, dtype=dtype, device=device)
    t = best_time(lambda: torch.mm(a, b, out=out), repeats, device)
    return {"flops_per_s": 2 * n ** 3 / t, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "best_s": t, "repeats": repeats, "method": "best-of-N time of torch.mm on square matrices"}


def measure_weight_streaming(device: str = "cpu", dtype: torch.dtype = torch.float32,
                             rows: tuple[int, ...] = (1, 8, 32, 64), total_bytes: int = 64 << 20,
                             repeats: int = 3) -> dict:
    """Decode-shaped GEMMs: x [M, 768] @ W^T over many distinct [2048, 768] weights (more than the
    caches hold), as a decode step streams its weights. Bytes of weight / time per M, for torch's
    BLAS (`F.linear` over the checkpoint layout) and for afdserve's decode kernels
    (`kernels.linear` over the layout `prepare_for_decode` stores at this thread count): what each
    sustains at that batch, next to the plain streaming read above."""
    from afdserve.model import kernels
    elem = torch.empty((), dtype=dtype).element_size()
    per = 2048 * 768 * elem
    ws = [torch.randn(2048, 768, dtype=dtype, device=device) for _ in range(max(1, total_bytes // per))]
    cpu_fp32 = torch.device(device).type == "cpu" and dtype == torch.float32
    stored = [w.t().contiguous().t() for w in ws] if cpu_fp32 and kernels.stored_transposed(2048, 768) else ws
    out = {}
    for m in rows:
        x = torch.randn(m, 768, dtype=dtype, device=device)
        t = best_time(lambda: [torch.nn.functional.linear(x, w) for w in ws], repeats, device)
        te = best_time(lambda: [kernels.linear(x, w) for w in stored], repeats, device)
        out[str(m)] = {"bytes_per_s": len(ws) * per / t, "flops_per_s": 2 * m * len(ws) * 2048 * 768 / t,
                       "engine_bytes_per_s": len(ws) * per / te}
    return {"rows": out, "weight_bytes": len(ws) * per,
            "method": "best-of-N time of F.linear (BLAS) and of afdserve's kernels.linear (engine) "
                      "for x[M, 768] @ W[2048, 768]^T over distinct weights"}


def streaming_summary(ws: dict) -> str:
    """'M=1: 9.3 / 14.0 GB/s, ...' (BLAS / afdserve's kernels) from measure_weight_streaming's rows."""
    return ", ".join(f"M={k}: {v['bytes_per_s'] / 1e9:.1f}" +
                     (f" / {v['engine_bytes_per_s'] / 1e9:.1f}" if "engine_bytes_per_s" in v else "") + " GB/s"
                     for k, v in ws.items())


def measure(device: str = "cpu", dtype: torch.dtype = torch.float32, quick: bool = False,
            size_bytes: int | None = None, n: int | None = None) -> dict:
    cuda = torch.device(device).type == "cuda"
    size = size_bytes or ((256 << 20) if quick else ((2 << 30) if cuda else (1 << 30)))
    n = n or (1024 if quick else (8192 if cuda else 2048))
    reps = 3 if quick else (10 if cuda else 5)
    return {"description": describe(device),
            "bandwidth": measure_bandwidth(device, size, reps),
            "matmul": measure_matmul(device, dtype, n, reps),
            "weight_streaming": measure_weight_streaming(device, dtype, total_bytes=(16 << 20) if quick or
                                                         size < (64 << 20) else (256 << 20 if cuda else 64 << 20))}
