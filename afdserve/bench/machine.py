"""The machine's own limits, measured in the same run as the benchmarks they normalise.

* memory bandwidth: the fastest of several streaming-read kernels (torch.sum with the run's
  threads, a copy, numpy, afdserve's native GEMV over one large weight) and of the decode-shaped
  GEMMs timed below, so no read kernel of the same run exceeds it;
* matmul throughput: square matmuls in the benchmark's dtype with the run's threads, best of several;
* a description: CPU model, cores, torch threads and version, GPU if any.
"""
from __future__ import annotations

import os
import platform
import statistics
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
    return min(run_times(fn, repeats, device, warmup))


def run_times(fn, repeats: int, device: str = "cpu", warmup: int = 1) -> list[float]:
    """Wall times of `repeats` runs of `fn()` (after `warmup` untimed runs)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


STATISTICS = {"best": min, "median": statistics.median}


def _read_kernels(device: str, size_bytes: int) -> dict:
    """name -> (fn, bytes moved per call) of the streaming-read candidates over ~size_bytes."""
    n = size_bytes // 4
    x = torch.ones(n, dtype=torch.float32, device=device)
    half = x[: n // 2]
    dst = torch.empty_like(half)
    kernels = {"torch.sum": (lambda: x.sum(), n * 4),
               # a copy reads half the buffer and writes as much: both count as traffic
               "torch copy": (lambda: dst.copy_(half), 2 * half.numel() * 4)}
    if torch.device(device).type == "cpu":
        xn = x.numpy()
        kernels["numpy sum"] = (lambda: xn.sum(), n * 4)
        from afdserve.model import kernels as k
        if k.NATIVE:
            cols = 4096
            w = x[: (n // cols) * cols].view(-1, cols)      # one large weight [rows, 4096], checkpoint layout
            v = torch.ones(1, cols)
            threads = k.decide_policy(threads=torch.get_num_threads()).threads   # what the policy gives them
            kernels["afdserve native GEMV"] = (lambda: k._native_linear(v, w, threads), w.numel() * 4)
    return kernels


def measure_bandwidth(device: str = "cpu", size_bytes: int = 1 << 30, repeats: int = 5,
                      statistic: str = "best") -> dict:
    """Streaming-read bandwidth with the current torch threads: the fastest of several read kernels
    over a buffer of `size_bytes` (torch.sum with the run's threads, a torch copy counting bytes
    read + written, numpy's sum, afdserve's native GEMV streaming one large weight), each timed by
    `statistic` ('best' or 'median') of `repeats` runs, the kernels taking turns. The limit is the
    highest of them, so no read kernel measured here exceeds it; `kernels` keeps every rate."""
    agg = STATISTICS[statistic]
    kernels = _read_kernels(device, size_bytes)
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for name, (fn, _) in kernels.items():                   # warm-up
        run_times(fn, 0, device)
    for _ in range(repeats):          # interleaved, so that a slow minute slows every kernel alike
        for name, (fn, _) in kernels.items():
            times[name] += run_times(fn, 1, device, warmup=0)
    rates = {name: nbytes / agg(times[name]) for name, (_, nbytes) in kernels.items()}
    best = max(rates, key=rates.get)
    return {"bytes_per_s": rates[best], "kernel": best, "kernels": rates, "size_bytes": size_bytes,
            "repeats": repeats, "threads": torch.get_num_threads(), "statistic": statistic,
            "method": f"{statistic} of {repeats} runs of each read kernel over {size_bytes / 2**20:.0f} MiB "
                      f"with {torch.get_num_threads()} torch thread(s); the fastest ({best}) is the limit"}


def measure_matmul(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                   repeats: int = 5) -> dict:
    """Matmul throughput: 2*n^3 / best time of an n x n @ n x n product in `dtype`."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=g)
    out = torch.empty(n, n, dtype=dtype, device=device)
    t = best_time(lambda: torch.mm(a, b, out=out), repeats, device)
    return {"flops_per_s": 2 * n ** 3 / t, "n": n, "dtype": str(dtype).replace("torch.", ""),
            "best_s": t, "repeats": repeats, "threads": torch.get_num_threads(),
            "method": f"best of {repeats} runs of torch.mm on square matrices"}


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
        flops = 2 * m * len(ws) * 2048 * 768
        out[str(m)] = {"bytes_per_s": len(ws) * per / t, "flops_per_s": flops / t,
                       "engine_bytes_per_s": len(ws) * per / te, "engine_flops_per_s": flops / te}
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
    bw = measure_bandwidth(device, size, reps)
    ws = measure_weight_streaming(device, dtype, total_bytes=(16 << 20) if quick or size < (64 << 20)
                                  else (256 << 20 if cuda else 64 << 20))
    mm = measure_matmul(device, dtype, n, reps)
    raise_limits(bw, ws, mm)
    return {"description": describe(device), "bandwidth": bw, "matmul": mm, "weight_streaming": ws}


def raise_limits(bw: dict, ws: dict, mm: dict | None = None) -> None:
    """Lift the bandwidth limit `bw` (in place) to the fastest decode-shaped GEMM of `ws` where one
    streams its weights faster than every plain read kernel did (a limit our kernels exceed is no
    limit); the GEMMs' rates are listed among `bw['kernels']` either way. Likewise the matmul
    limit `mm` for a decode GEMM that computed faster than the square matmul."""
    for m, row in ws.get("rows", {}).items():
        for key, who in (("bytes_per_s", "BLAS"), ("engine_bytes_per_s", "afdserve")):
            if key in row:
                bw["kernels"][f"decode GEMM M={m} ({who})"] = row[key]
    best = max(bw["kernels"], key=bw["kernels"].get)
    if bw["kernels"][best] > bw["bytes_per_s"]:
        bw.update(bytes_per_s=bw["kernels"][best], kernel=best)
        bw["method"] += f"; raised to {best}, which streamed faster"
    if mm is None:
        return
    for m, row in ws.get("rows", {}).items():
        for key, who in (("flops_per_s", "BLAS"), ("engine_flops_per_s", "afdserve")):
            if row.get(key, 0) > mm["flops_per_s"]:
                mm.update(flops_per_s=row[key], kernel=f"decode GEMM M={m} ({who})")
    if "kernel" in mm:
        mm["method"] += f"; raised to {mm['kernel']}, which computed faster"


def merge_limits(m: dict, later: dict) -> None:
    """Fold a later `measure()` of the same run into `m` (in place): every read kernel and decode
    GEMM keeps its best rate of the two, the limits are the best of all, and the methods say so."""
    bw, bw2 = m["bandwidth"], later["bandwidth"]
    for k, v in bw2["kernels"].items():
        bw["kernels"][k] = max(bw["kernels"].get(k, 0.0), v)
    best = max(bw["kernels"], key=bw["kernels"].get)
    bw.update(bytes_per_s=bw["kernels"][best], kernel=best)
    bw["method"] = bw2["method"].split(";")[0] + f", measured before and after the decode grid; the fastest ({best}) is the limit"
    mm, mm2 = m["matmul"], later["matmul"]
    if mm2["flops_per_s"] > mm["flops_per_s"]:
        mm["flops_per_s"] = mm2["flops_per_s"]
        mm.pop("kernel", None)
        if mm2.get("kernel"):
            mm["kernel"] = mm2["kernel"]
    mm["method"] = mm2["method"].split(";")[0] + ", best of before and after the decode grid" + (
        f"; raised to {mm['kernel']}, which computed faster" if mm.get("kernel") else "")
    for key, row in later["weight_streaming"]["rows"].items():
        mine = m["weight_streaming"]["rows"].setdefault(key, row)
        for k, v in row.items():
            mine[k] = max(mine[k], v)
