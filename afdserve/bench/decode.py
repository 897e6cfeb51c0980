"""Decode throughput of the engine over a batch x context grid, with roofline accounting.

Method (documented in benchmarks/README.md):
* B requests whose prompt length is the context C are added to an `LLMEngine`; the engine is
  stepped until every request decodes; only steps in which all B requests decode are timed
  (wall time of `engine.step()`: scheduling, model, sampling, bookkeeping).
* Prefill is *synthetic* by default: steps holding prefill chunks skip the model and return a
  fixed token, so the KV cache keeps its initial zeros. Decode time does not depend on the
  cached values, and a real prefill of 64 x 4096 tokens would take minutes on a CPU.
  `prefill="real"` runs it for real.
* Bytes a step needs: active weights (attention + dense + router + routed experts actually hit
  + shared expert + LM head) + the KV it reads (B x C x L x 2 x kv_width x elem) + embeddings rows,
  each at its stored precision (FP8 weights: 1 byte each + fp32 block scales).
  FLOPs: 2 x per-token active weights x B + attention 4 x n_q x d x C x L x B.
"""
from __future__ import annotations

import math
import random
import statistics
import time
from pathlib import Path

import torch

from afdserve.config import Step3Config

ELEM_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


# ---------------------------------------------------------------------------- accounting
def expected_distinct_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts hit by `tokens` tokens choosing top_k of num_experts uniformly."""
    if num_experts == 0 or tokens == 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def attention_params_per_layer(c: Step3Config) -> int:
    H = c.hidden_size
    return H * c.share_q_dim + c.share_q_dim * c.q_width + 2 * H * c.kv_width + c.q_width * H


def linear_bytes(out: int, inp: int, elem: int, quantization: str | None = None) -> int:
    """Bytes of one linear weight [out, in] as stored: `elem` per weight, or for FP8 one byte per
    weight plus one fp32 scale per 128 x 128 block (afdserve/model/fp8.py)."""
    if quantization is None:
        return out * inp * elem
    if quantization != "fp8":
        raise ValueError(f"unknown quantization {quantization!r} (expected None or 'fp8')")
    return out * inp + 4 * -(-out // 128) * -(-inp // 128)


def _layer_weight_bytes(c: Step3Config, elem: int, quantization: str | None) -> tuple[int, int, int, int]:
    """(attention incl. norms, dense MLP, one routed expert, shared expert) bytes of one layer; the
    linear weights at their stored precision, the RMSNorms at `elem`."""
    H, lb = c.hidden_size, lambda o, i: linear_bytes(o, i, elem, quantization)
    attn = (lb(c.share_q_dim, H) + 2 * lb(c.kv_width, H) + lb(c.q_width, c.share_q_dim) + lb(H, c.q_width)
            + (c.share_q_dim + 2 * H) * elem)
    mlp = lambda inter: 2 * lb(inter, H) + lb(H, inter)          # gate, up, down
    return attn, mlp(c.intermediate_size), mlp(c.moe_intermediate_size), mlp(c.share_expert_dim)


def step_bytes(c: Step3Config, batch: int, context: float, elem: int,
               distinct_experts: float | list[float] | None = None, quantization: str | None = None,
               kv_elem: int | None = None) -> dict:
    """Bytes one decode step of `batch` sequences at `context` must move (a lower bound), each
    tensor at the precision it is stored in: with `quantization="fp8"` the attention and MLP /
    expert projections at one byte per weight plus their fp32 block scales, the embedding rows,
    LM head, norms and router at `elem` (the run's dtype), the KV cache at `kv_elem` bytes per
    element (default `elem`; 1 for an fp8 cache)."""
    H = c.hidden_size
    moe_layers = list(c.moe_layers_enum)
    if distinct_experts is None:
        distinct = [expected_distinct_experts(c.moe_num_experts, c.moe_top_k, batch)] * len(moe_layers)
    elif isinstance(distinct_experts, (int, float)):
        distinct = [float(distinct_experts)] * len(moe_layers)
    else:
        distinct = list(distinct_experts)
    n_dense = c.num_hidden_layers - len(moe_layers)
    attn, dense_mlp, expert, shared_mlp = _layer_weight_bytes(c, elem, quantization)
    router = len(moe_layers) * c.moe_num_experts * H * elem
    head = (c.vocab_size * H + H + batch * H) * elem          # LM head, final norm, embedding rows
    weights = (c.num_hidden_layers * attn + n_dense * dense_mlp + sum(distinct) * expert
               + len(moe_layers) * shared_mlp + router + head)
    kv = batch * context * c.num_hidden_layers * 2 * c.kv_width * (elem if kv_elem is None else kv_elem)
    return {"weights": weights, "kv": kv, "total": weights + kv,
            "distinct_experts_per_moe_layer": sum(distinct) / max(len(distinct), 1)}


def step_flops(c: Step3Config, batch: int, context: float) -> float:
    """FLOPs of one decode step: 2 x active weights per token + QK^T and PV over the context."""
    H = c.hidden_size
    moe = len(c.moe_layers_enum)
    per_tok = (c.num_hidden_layers * attention_params_per_layer(c)
               + (c.num_hidden_layers - moe) * 3 * H * c.intermediate_size
               + moe * (c.moe_top_k * 3 * H * c.moe_intermediate_size + 3 * H * c.share_expert_dim
                        + c.moe_num_experts * H)
               + c.vocab_size * H)
    attn = 4 * c.num_attention_heads * c.head_dim * context * c.num_hidden_layers
    return batch * (2.0 * per_tok + attn)


# ----------------------------------------------------------------------------- checkpoint
def make_checkpoint(preset: str, out_dir: str | Path, dtype: str = "float32") -> Path:
    from afdserve.config import get_preset
    from afdserve.model.checkpoint import init_checkpoint
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    return init_checkpoint(get_preset(preset), out, seed=0, dtype=dtype)


def kv_bytes_needed(c: Step3Config, batch: int, context: int, steps: int, elem: int,
                    block_size: int = 16) -> tuple[int, int]:
    """(KV blocks, bytes) for `batch` sequences of context + steps tokens."""
    per_seq = math.ceil((context + steps + 2) / block_size)
    blocks = batch * per_seq + 1
    per_block = 2 * c.num_hidden_layers * block_size * c.kv_width * elem
    return blocks, blocks * per_block


def kv_elem_bytes(kv_cache_dtype: str, elem: int) -> int:
    """Bytes per KV cache element: the run's `elem`, or 1 for an fp8 cache."""
    return 1 if kv_cache_dtype == "fp8" else elem


def tokens_to_generate(batch: int, context: int, steps: int, warmup: int, budget: int = 2048) -> int:
    """max_tokens per request: early requests decode while later ones still prefill (chunked
    prefill), so every request must still be running when the last prefill ends."""
    return steps + warmup + math.ceil(batch * context / max(budget, batch)) + 4


# ---------------------------------------------------------------------------------- runs
class _StepProbe:
    """An executor over the engine's (`Executor`): records each step's shape and, for synthetic
    prefill, skips the model on steps that hold prefill chunks; everything else is the wrapped
    executor's."""

    def __init__(self, executor, synthetic_prefill: bool, vocab_size: int, seed: int = 0):
        self.inner, self.synthetic = executor, synthetic_prefill
        self.rng = random.Random(seed)
        self.vocab_size = vocab_size
        self.last_decode_batch = 0
        self.recording, self.contexts = False, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def execute(self, steps):
        from afdserve.sampling import Sample
        prefill = any(len(s.token_ids) > 1 for st in steps for s in st.seqs)
        self.last_decode_batch = 0 if prefill else sum(len(st.seqs) for st in steps)
        if not prefill and self.recording:
            ctxs = [s.start + 1 for st in steps for s in st.seqs]
            self.contexts.append(sum(ctxs) / len(ctxs))
        if prefill and self.synthetic:
            # Random first tokens, so that sequences (and their routing) differ from the first decode.
            return [{s.request_id: Sample(self.rng.randrange(2, self.vocab_size))
                     for s in st.seqs if s.sample is not None} for st in steps]
        return self.inner.execute(steps)


def _expert_hooks(engine, counts: list[list[int]]):
    """Forward hooks counting distinct experts per MoE layer (colocated engines only)."""
    model = engine.executor.local_model
    if model is None:
        return []
    handles = []
    for layer in model.layers:
        if getattr(layer, "is_moe", False) and hasattr(layer, "moe"):
            def hook(mod, args, out, _li=len(handles)):
                counts[_li].append(int(torch.unique(args[2]).numel()))
            handles.append(layer.moe.register_forward_hook(hook))
    counts.extend([] for _ in range(len(handles) - len(counts)))
    return handles


def measure_decode(model_dir: str | Path, batch: int, context: int, steps: int = 8, warmup: int = 2,
                   device: str = "cpu", dtype: str = "float32", afd: str | None = None,
                   micro_batches: int = 1, prefill: str = "synthetic", seed: int = 0,
                   afd_options: dict | None = None, profile: str | None = None,
                   quantization: str | None = None, kv_cache_dtype: str = "auto") -> dict:
    """Time `steps` decode steps of `batch` sequences at prompt length `context` (after `warmup`).

    Returns tokens/s, time per output token (ms), the mean context of the timed steps, and the
    distinct experts hit per MoE layer (counted during warm-up when the model is reachable).
    `profile`: None, "cprofile" or "torch": also return a profile of the timed steps.
    `quantization`: None or "fp8" (weights quantized at load; recorded in the result, so that
    `roofline` counts the FP8 weights at their stored bytes). `kv_cache_dtype`: "auto" or "fp8"
    (an 8-bit KV cache; recorded too).
    """
    from afdserve.engine.engine import EngineArgs, LLMEngine
    from afdserve.sampling import SamplingParams

    c = Step3Config.from_file(model_dir)
    tdtype = getattr(torch, dtype)
    elem = ELEM_BYTES[tdtype]
    budget = max(2048, batch)
    max_tokens = tokens_to_generate(batch, context, steps, warmup, budget)
    blocks, _ = kv_bytes_needed(c, batch, context, max_tokens, kv_elem_bytes(kv_cache_dtype, elem))
    args = EngineArgs(model=str(model_dir), dtype=dtype, device=device, num_kv_blocks=blocks,
                      max_num_seqs=max(batch, 1), max_num_batched_tokens=budget,
                      max_model_len=min(context + max_tokens + 2, c.max_position_embedding),
                      afd=afd, micro_batches=micro_batches, afd_options=afd_options or {},
                      quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    engine = LLMEngine(args)
    try:
        probe = engine.executor = _StepProbe(engine.executor, prefill == "synthetic", c.vocab_size, seed)
        step = _stepper(engine, probe)
        rng = random.Random(seed)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"r{i}", [rng.randrange(2, c.vocab_size) for _ in range(context)], params)
        # Prefill (and any mixed steps) until every request decodes.
        t0 = time.perf_counter()
        guard = 0
        while True:
            step()
            guard += 1
            if probe.last_decode_batch == batch:
                break
            if guard > 100000 or not engine.has_unfinished_requests():
                raise RuntimeError("the requests never all decoded together")
        prefill_s = time.perf_counter() - t0
        counts: list[list[int]] = []
        handles = _expert_hooks(engine, counts)
        for _ in range(warmup):
            step()
        for h in handles:
            h.remove()
        distinct = [statistics.mean(x) for x in counts if x] or None
        times = []
        prof = _Profiler(profile)
        probe.recording = True
        with prof:
            for _ in range(steps):
                t = time.perf_counter()
                step()
                dt = time.perf_counter() - t
                if probe.last_decode_batch == batch:
                    times.append(dt)
        if not times:
            raise RuntimeError("no full decode step was timed")
        step_s = statistics.median(times)
        ctx = statistics.mean(probe.contexts) if probe.contexts else context  # mean KV length of timed steps
        out = {"batch": batch, "context": context, "mean_context": ctx, "steps_timed": len(times),
               "step_s": step_s, "step_s_min": min(times), "tpot_ms": step_s * 1e3,
               "tokens_per_s": batch / step_s, "prefill": prefill, "prefill_s": prefill_s,
               "distinct_experts": distinct, "afd": afd, "micro_batches": micro_batches,
               "quantization": quantization, "kv_cache_dtype": kv_cache_dtype}
        if prof.summary is not None:
            out["profile"] = prof.summary
        return out
    finally:
        engine.close()


def _stepper(engine, probe: _StepProbe):
    def step():
        probe.last_decode_batch = 0
        return engine.step()
    return step


class _Profiler:
    def __init__(self, kind: str | None):
        self.kind, self.summary, self._p = kind, None, None

    def __enter__(self):
        if self.kind == "cprofile":
            import cProfile
            self._p = cProfile.Profile()
            self._p.enable()
        elif self.kind == "torch":
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._p = profile(activities=acts)
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self.kind == "cprofile":
            import io
            import pstats
            self._p.disable()
            s = io.StringIO()
            pstats.Stats(self._p, stream=s).sort_stats("tottime").print_stats(25)
            self.summary = s.getvalue()
        elif self.kind == "torch":
            self._p.__exit__(*exc)
            self.summary = self._p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        return False


def roofline(c: Step3Config, r: dict, bandwidth: float, matmul: float, elem: int) -> dict:
    """Bytes and FLOPs of a measured step against the measured machine limits (bytes at the stored
    precision: `r["quantization"]` "fp8" counts FP8 weights at one byte plus scales)."""
    b = step_bytes(c, r["batch"], r["mean_context"], elem, r.get("distinct_experts"), r.get("quantization"),
                   kv_elem_bytes(r.get("kv_cache_dtype", "auto"), elem))
    f = step_flops(c, r["batch"], r["mean_context"])
    t = r["step_s"]
    bound = max(b["total"] / bandwidth, f / matmul)
    return {"bytes_per_step": b["total"], "weight_bytes": b["weights"], "kv_bytes": b["kv"],
            "distinct_experts_per_moe_layer": b["distinct_experts_per_moe_layer"],
            "flops_per_step": f, "achieved_bytes_per_s": b["total"] / t, "achieved_flops_per_s": f / t,
            "bandwidth_fraction": b["total"] / t / bandwidth, "matmul_fraction": f / t / matmul,
            "roofline_step_s": bound, "roofline_efficiency": bound / t}
