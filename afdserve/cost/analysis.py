"""The Step-3 report's decoding-cost analysis as formulas (no torch).

From the Step-3 report (arXiv 2507.19427):
  * per-token work of one decode step (report section 4.1),
  * cost per token with and without AFD (report section 4.2),
  * MoE sparsity against the hardware (report section 5),
plus a KV-capacity check of an attention instance (an afdserve addition, assumptions stated).
All costs are USD per 1M decoded tokens.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from afdserve.cost.arch import ModelArch
from afdserve.cost.hardware import Hardware

MTOK = 1e6


@dataclass(frozen=True)
class Precision:
    """Storage and compute precision (report default: everything 8-bit, report section 4.1).

    `weight_bytes`/`kv_bytes` are bytes per element; `compute` is 'fp8' (BF16 on chips without
    FP8) or 'bf16'. `full_layer_kv_bytes` overrides the KV precision of hybrid models' full
    attention layers (None = the model's default, BF16 for Llama 4 and MiniMax-M1).
    """

    weight_bytes: float = 1.0
    kv_bytes: float = 1.0
    compute: str = "fp8"
    full_layer_kv_bytes: float | None = None


DEFAULT_PRECISION = Precision()


@dataclass(frozen=True)
class PerTokenWork:
    """Work of decoding one token (report section 4.1): KV bytes read, attention FLOPs (QK^T, PV),
    linear FLOPs (2 x attention projections), FFN FLOPs (2 x activated FFN parameters)."""

    kv_bytes: float
    attention_flops: float
    linear_flops: float
    ffn_flops: float


def per_token_work(arch: ModelArch, context: int,
                   precision: Precision = DEFAULT_PRECISION) -> PerTokenWork:
    """Per-token decode work at `context` (report section 4.1).

    Routers, embedding and LM head are left out, as in the report (under 5%).
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    return PerTokenWork(
        kv_bytes=arch.kv_bytes_per_token(context, precision.kv_bytes,
                                         precision.full_layer_kv_bytes),
        attention_flops=float(arch.attention_flops_per_token(context)),
        linear_flops=2.0 * arch.attention_params_total(),
        ffn_flops=2.0 * arch.ffn_active_params(),
    )


def arithmetic_intensity(arch: ModelArch, context: int = 8192,
                         precision: Precision = DEFAULT_PRECISION) -> float:
    """Attention FLOPs per KV byte (report section 4.1): GQA 2*n_q/(n_kv*b), MLA 4*n_q/b,
    MFA 2*n_q/b. Constant in context for pure models; hybrids depend on `context`."""
    work = per_token_work(arch, max(context, 1), precision)
    return work.attention_flops / work.kv_bytes if work.kv_bytes else float("inf")


def attention_cost(work: PerTokenWork, hw: Hardware, compute: str = "fp8") -> float:
    """USD per token of the attention half (report section 4.2):
    max(attn_FLOPs * U_flop, KV_bytes * U_byte) + linear_FLOPs * U_flop."""
    u_flop = hw.usd_per_hour / (3600.0 * hw.flops_for(compute))
    core = max(work.attention_flops * u_flop, work.kv_bytes * hw.usd_per_byte)
    return core + work.linear_flops * u_flop


def ffn_cost(work: PerTokenWork, hw: Hardware, compute: str = "fp8") -> float:
    """USD per token of the FFN half: FFN_FLOPs * U_flop (AFD keeps the FFN compute bound)."""
    return work.ffn_flops * hw.usd_per_hour / (3600.0 * hw.flops_for(compute))


def attention_bound(work: PerTokenWork, hw: Hardware, compute: str = "fp8") -> str:
    """'memory' if KV reading dominates the attention core on `hw`, else 'compute'."""
    flop_time = work.attention_flops / hw.flops_for(compute)
    byte_time = work.kv_bytes / hw.hbm_bytes_per_s
    return "memory" if byte_time >= flop_time else "compute"


def _chip_costs(work: PerTokenWork, hw: Hardware, compute: str) -> dict:
    attn = attention_cost(work, hw, compute) * MTOK
    ffn = ffn_cost(work, hw, compute) * MTOK
    return {"attention_usd_per_mtok": attn, "ffn_usd_per_mtok": ffn,
            "total_usd_per_mtok": attn + ffn,
            "attention_bound": attention_bound(work, hw, compute),
            "usd_per_hour": hw.usd_per_hour, "peak_flops": hw.flops_for(compute),
            "hbm_bytes_per_s": hw.hbm_bytes_per_s, "ridge": hw.flops_for(compute)
            / hw.hbm_bytes_per_s, "source": hw.source}


def best_afd(chips: dict[str, dict]) -> dict:
    """AFD: attention and FFN each on their cheapest chip (report section 4.2)."""
    a = min(chips, key=lambda c: chips[c]["attention_usd_per_mtok"])
    f = min(chips, key=lambda c: chips[c]["ffn_usd_per_mtok"])
    attn, ffn = chips[a]["attention_usd_per_mtok"], chips[f]["ffn_usd_per_mtok"]
    return {"attention_hardware": a, "ffn_hardware": f, "usd_per_mtok": attn + ffn,
            "attention_usd_per_mtok": attn, "ffn_usd_per_mtok": ffn}


def best_single(chips: dict[str, dict]) -> dict:
    """Without AFD: both halves on one chip type; the cheapest such chip (report section 4.2)."""
    c = min(chips, key=lambda k: chips[k]["total_usd_per_mtok"])
    return {"hardware": c, "usd_per_mtok": chips[c]["total_usd_per_mtok"]}


def cost_report(arch: ModelArch, context: int, hardware_list: list[Hardware],
                precision: Precision = DEFAULT_PRECISION) -> dict:
    """Everything `afdserve cost` prints, as a JSON-ready dict."""
    if not hardware_list:
        raise ValueError("at least one hardware is needed")
    work = per_token_work(arch, context, precision)
    chips = {hw.name: _chip_costs(work, hw, precision.compute) for hw in hardware_list}
    return {
        "model": arch.name,
        "context": context,
        "precision": asdict(precision),
        "params": {"total": arch.total_params(), "active": arch.active_params(),
                   "attention_side": arch.attention_side_params(),
                   "ffn": arch.ffn_params_total()},
        "per_token": asdict(work),
        "arithmetic_intensity": arithmetic_intensity(arch, context, precision),
        "hardware": chips,
        "best_afd": best_afd(chips),
        "best_single": best_single(chips),
        "kv_capacity": {hw.name: kv_capacity(arch, hw, context, precision)
                        for hw in hardware_list},
    }


# ----- section 5: MoE sparsity against the hardware -----

def min_batch_dense(hw: Hardware, precision: Precision = DEFAULT_PRECISION) -> float:
    """Tokens per batch for a compute-bound dense FFN: compute per weight byte is
    2*B/weight_bytes, so B >= ridge * weight_bytes / 2 (report section 5)."""
    peak = hw.flops_for(precision.compute)
    return peak * precision.weight_bytes / (2.0 * hw.hbm_bytes_per_s)


def min_batch_moe(sparsity: float, hw: Hardware,
                  precision: Precision = DEFAULT_PRECISION) -> float:
    """Batch (tokens per FFN instance) for compute-bound experts: B >= peak / (2 S bandwidth)
    with 8-bit weights (report section 5)."""
    return min_batch_dense(hw, precision) / sparsity


def min_sparsity_network(arch: ModelArch, hw: Hardware, *, nic_bytes_per_s: float | None = None,
                         tpot_s: float = 0.050, stages: int = 3, act_bytes: float = 3.0,
                         precision: Precision = DEFAULT_PRECISION) -> float:
    """Lowest sparsity whose minimum batch the node network can move in time (report section 5).

    A micro-batch of B tokens moves act_bytes * H * B per layer (8-bit dispatch + 16-bit
    combine = 3 bytes); communication gets tpot / stages (16.6 ms) over L layers. With
    B = peak * wb / (2 S bw): S >= act_bytes * H * peak * wb * L / (2 * net * bw * tpot/stages),
    i.e. H * peak * L / (net * bw * 11.1 ms) at the defaults. net = NIC per card x cards per node.
    """
    nic = hw.nic_bytes_per_s if nic_bytes_per_s is None else nic_bytes_per_s
    net = nic * hw.gpus_per_node
    if net <= 0:
        return float("inf")
    t_comm = tpot_s / stages
    peak = hw.flops_for(precision.compute)
    return (act_bytes * arch.hidden_size * peak * precision.weight_bytes * arch.num_layers
            / (2.0 * net * hw.hbm_bytes_per_s * t_comm))


def sparsity_report(arch: ModelArch, hardware_list: list[Hardware],
                    precision: Precision = DEFAULT_PRECISION, *, tpot_s: float = 0.050,
                    stages: int = 3, measured_nic_efficiency: float = 0.8) -> dict:
    """Section-5 figures per chip. `measured_nic_efficiency` = DeepEP's ~40 GB/s per 400 Gbps
    NIC (0.8 of line rate), the report's reason for choosing S ~ 0.08."""
    s = arch.sparsity
    chips = {}
    for hw in hardware_list:
        s_min = min_sparsity_network(arch, hw, tpot_s=tpot_s, stages=stages, precision=precision)
        s_meas = min_sparsity_network(arch, hw, tpot_s=tpot_s, stages=stages, precision=precision,
                                      nic_bytes_per_s=hw.nic_bytes_per_s * measured_nic_efficiency)
        chips[hw.name] = {
            "ridge": hw.flops_for(precision.compute) / hw.hbm_bytes_per_s,
            "min_batch_dense": min_batch_dense(hw, precision),
            "min_batch_moe": min_batch_moe(s, hw, precision),
            "min_sparsity": s_min,
            "min_sparsity_measured_nic": s_meas,
            "min_active_experts": s_min * arch.num_experts if arch.is_moe else None,
            "network_bound": s < s_min,
            "ffn_cost_factor": max(1.0, s_min / s),
        }
    return {
        "model": arch.name, "sparsity": s,
        "activated_experts": arch.top_k + arch.num_shared_experts,
        "num_experts": arch.num_experts, "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size, "tpot_s": tpot_s, "stages": stages,
        "hardware": chips,
    }


# ----- KV capacity of an attention instance (afdserve addition) -----

def kv_capacity(arch: ModelArch, hw: Hardware, context: int,
                precision: Precision = DEFAULT_PRECISION, *, usable_fraction: float = 0.9,
                gpus: int | None = None) -> dict:
    """How many tokens of KV fit next to the attention weights on an AFD attention instance.

    Assumptions: data-parallel attention (report sections 3 and 7), so every card holds all attention
    side weights (attention projections, embedding, LM head, routers) at `weight_bytes`;
    `usable_fraction` of device memory is usable (the rest: activations, runtime); the remainder
    holds KV at `kv_bytes` (chunked layers counted as full, an upper bound). Sequences at
    `context` also hold the linear-attention state of hybrid models.
    """
    gpus = gpus or hw.gpus_per_node
    weights = arch.attention_side_params() * precision.weight_bytes
    free = hw.memory_bytes * usable_fraction - weights
    per_tok = arch.kv_cache_bytes_per_cached_token(precision.kv_bytes)
    per_seq = context * per_tok + arch.linear_state_bytes_per_sequence()
    tokens = max(0.0, free) / per_tok if per_tok else float("inf")
    seqs = max(0.0, free) / per_seq if per_seq else float("inf")
    return {"fits": free > 0, "gpus": gpus, "weight_bytes_per_gpu": weights,
            "kv_bytes_per_cached_token": per_tok, "free_bytes_per_gpu": max(0.0, free),
            "tokens_per_gpu": int(tokens), "tokens_per_instance": int(tokens) * gpus,
            "sequences_per_gpu_at_context": int(seqs),
            "sequences_per_instance_at_context": int(seqs) * gpus,
            "assumption": f"data-parallel attention, attention-side weights on every GPU, "
                          f"{usable_fraction:.0%} of memory usable"}


# ----- several models and contexts -----

def compare_report(archs: list[ModelArch], contexts: list[int], hardware_list: list[Hardware],
                   precision: Precision = DEFAULT_PRECISION) -> dict:
    """Best AFD / single-chip cost and attention intensity per model and context."""
    models = {}
    for arch in archs:
        rows = [cost_report(arch, c, hardware_list, precision) for c in contexts]
        models[arch.name] = {
            "best_afd_usd_per_mtok": [r["best_afd"]["usd_per_mtok"] for r in rows],
            "attention_hardware": [r["best_afd"]["attention_hardware"] for r in rows],
            "ffn_hardware": [r["best_afd"]["ffn_hardware"] for r in rows],
            "best_single_usd_per_mtok": [r["best_single"]["usd_per_mtok"] for r in rows],
            "best_single_hardware": [r["best_single"]["hardware"] for r in rows],
            "arithmetic_intensity": [r["arithmetic_intensity"] for r in rows],
        }
    ridges = {hw.name: hw.flops_for(precision.compute) / hw.hbm_bytes_per_s
              for hw in hardware_list}
    return {"contexts": list(contexts), "models": models, "ridges": ridges}
