"""One decode step of a deployment, layer by layer and micro-batch by micro-batch (no torch).

Two deployment kinds (Step-3 report, sections 3 and 7):

* AFD `xAyF`: x attention instances and y FFN instances of `gpus_per_instance` GPUs. Attention
  is data-parallel (each attention GPU owns its sequences and their KV cache, and holds all
  attention weights, the embedding, the router and a vocab-parallel share of the LM head). The
  experts are sharded over all y * g FFN GPUs (TP/EP), so each FFN GPU streams 1/(y*g) of the
  FFN weights per layer. m micro-batches flow through four stages per layer: attention, A->F
  transfer, FFN, F->A transfer, on four resources (attention GPUs, the attention->FFN direction
  of the NICs, FFN GPUs, the FFN->attention direction).
* Colocated (DeepSeek-style): EP GPUs each run data-parallel attention for their own sequences
  and host E/EP routed experts (shared expert and dense layers replicated); dispatch/combine are
  all-to-all over the NICs; two micro-batches overlap compute with communication. Same four
  stages, but attention and FFN share one resource (the GPU), dispatch and combine another (NIC).

Stage times are rooflines with efficiency factors from `efficiency.json`:
  attention = max(KV bytes / (HBM * e_hbm), attn FLOPs / (peak * e_attn))
              + max(projection weight bytes / (HBM * e_hbm), 2 * params * rows / (peak * e_gemm(rows)))
              + per-layer overhead
  FFN       = sum over (routed, shared, dense) of max(weight bytes / (HBM * e_hbm),
              FLOPs / (peak * e_gemm(tokens per expert))) + per-layer overhead
  transfer  = bytes per GPU / (NIC * e_nic) + latency
The pipeline is then list-scheduled over three steps; TPOT is the steady-state period of a step.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from afdserve.afd.topology import parse_topology
from afdserve.cost.arch import ModelArch
from afdserve.cost.hardware import Hardware

EFFICIENCY_FILE = Path(__file__).with_name("efficiency.json")
SCALE_GROUP = 128          # FP8 activation scales: one fp32 scale per 128 elements
STEPS_SIMULATED = 3        # steps list-scheduled; TPOT = period between the last two


# ----------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Efficiency:
    """Efficiency factors (see efficiency.json for the source of every value)."""

    hbm_efficiency: float
    colocated_a2a_efficiency: float
    attention_flop_efficiency: float
    gemm_peak_efficiency: float
    gemm_half_tokens: float
    nic_efficiency: float
    transfer_latency_us: float
    attention_layer_overhead_us: float
    ffn_layer_overhead_us: float
    step_overhead_us: float
    memory_usable_fraction: float
    gemm_table: tuple[tuple[float, float], ...] = ()
    """Measured (rows, efficiency) points; when given, `gemm` interpolates them instead of the
    curve (afdserve.sim.local measures them on the current machine)."""
    ffn_gemm_table: tuple[tuple[float, float], ...] = ()
    """The same for the FFN layers' weight shapes (experts, dense FFN), when they stream at other
    rates than the attention projections; empty: `gemm_table` / the curve for every layer."""

    def for_ffn(self) -> "Efficiency":
        """The factors the FFN layers use (their own GEMM table when measured)."""
        return replace(self, gemm_table=self.ffn_gemm_table) if self.ffn_gemm_table else self

    def gemm(self, rows: float) -> float:
        """GEMM efficiency vs rows (tokens per expert): e_peak * n / (n + n_half), or the
        measured table interpolated linearly (clamped to its end points)."""
        rows = max(rows, 1e-9)
        if self.gemm_table:
            return _interpolate(self.gemm_table, rows)
        return self.gemm_peak_efficiency * rows / (rows + self.gemm_half_tokens)


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    if x <= points[0][0]:
        return points[0][1] * x / points[0][0]       # below the first point: same time per weight
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


@lru_cache(maxsize=None)
def _load_profiles(path: str) -> dict:
    return json.loads(Path(path).read_text())["profiles"]


def load_efficiency(profile: str = "gpu", path: str | Path = EFFICIENCY_FILE,
                    **overrides: float) -> Efficiency:
    """The efficiency factors of `profile` ('gpu' or 'cpu'), with optional overrides."""
    profiles = _load_profiles(str(path))
    if profile not in profiles:
        raise ValueError(f"unknown efficiency profile {profile!r}; have {', '.join(profiles)}")
    values = {k: float(v["value"]) for k, v in profiles[profile].items()}
    values.update(overrides)
    return Efficiency(**values)


@dataclass(frozen=True)
class SimPrecision:
    """Precision per stage, modelled as the report does (report default: 8-bit weights, KV and
    A->F activations, BF16 F->A).

    weight_bytes            FFN weights (routed and shared experts, dense FFN), router, embedding and
                            LM head, bytes per element
    gemm_compute            the peak their GEMMs run at: 'fp8' or 'bf16' (`Hardware.flops_for`: chips
                            without FP8 run BF16)
    attention_weight_bytes  the attention projections' weights (None: `weight_bytes`)
    attention_gemm_compute  the projections' GEMMs (None: `gemm_compute`)
    kv_bytes                KV cache bytes per element, read by the attention core
    attention_compute       the attention core, QK^T and PV: BF16 in every configuration of the
                            report (its "FP8 attention" quantizes the projections and the KV, not
                            the core)
    a2f_bytes, a2f_scales   A->F activations per element, plus one fp32 scale per 128 elements
    f2a_bytes               F->A partial sums per element (residual precision)

    `for_attention("fp8")` is the report's FP8 attention: FP8 projection GEMMs and 8-bit KV;
    `for_attention("bf16")`: BF16 projection GEMMs and BF16 KV. The FFN stays FP8 in both.
    """

    weight_bytes: float = 1.0
    kv_bytes: float = 1.0
    a2f_bytes: float = 1.0          # activations A->F (FP8 + per-128 fp32 scales)
    f2a_bytes: float = 2.0          # F->A at residual precision (bf16)
    attention_compute: str = "bf16"
    gemm_compute: str = "fp8"
    a2f_scales: bool = True
    attention_weight_bytes: float | None = None
    attention_gemm_compute: str | None = None

    @classmethod
    def for_attention(cls, attention: str = "fp8") -> "SimPrecision":
        if attention not in ("fp8", "bf16"):
            raise ValueError(f"attention precision must be fp8 or bf16, got {attention!r}")
        size = 1.0 if attention == "fp8" else 2.0
        return cls(kv_bytes=size, attention_weight_bytes=size, attention_gemm_compute=attention)

    @property
    def projection_bytes(self) -> float:
        return self.weight_bytes if self.attention_weight_bytes is None else self.attention_weight_bytes

    @property
    def projection_compute(self) -> str:
        return self.attention_gemm_compute or self.gemm_compute

    @property
    def attention_label(self) -> str:
        """'fp8' or 'bf16' for the report's two attention configurations, else a description."""
        for name, size in (("fp8", 1.0), ("bf16", 2.0)):
            if self.projection_compute == name and self.projection_bytes == size and self.kv_bytes == size:
                return name
        return f"{self.projection_compute} projections, {self.kv_bytes * 8:g}-bit KV"


@dataclass(frozen=True)
class Deployment:
    """What runs where. kind 'afd': x attention + y FFN instances of `gpus_per_instance`;
    kind 'colocated': `ep` GPUs of `attention_hw` each doing attention and experts."""

    kind: str
    attention_hw: Hardware
    ffn_hw: Hardware
    attention_instances: int = 0
    ffn_instances: int = 0
    gpus_per_instance: int = 8
    ep: int = 0
    micro_batches: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ("afd", "colocated"):
            raise ValueError(f"deployment kind must be 'afd' or 'colocated', got {self.kind!r}")
        if self.micro_batches < 1:
            raise ValueError(f"micro-batches must be >= 1, got {self.micro_batches}")
        if self.kind == "afd":
            for name in ("attention_instances", "ffn_instances", "gpus_per_instance"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        elif self.ep < 1:
            raise ValueError(f"colocated EP width must be >= 1, got {self.ep}")

    @property
    def attention_gpus(self) -> int:
        return self.attention_instances * self.gpus_per_instance if self.kind == "afd" \
            else self.ep

    @property
    def ffn_gpus(self) -> int:
        return self.ffn_instances * self.gpus_per_instance if self.kind == "afd" else self.ep

    @property
    def gpus(self) -> int:
        return self.attention_gpus + self.ffn_gpus if self.kind == "afd" else self.ep

    @property
    def name(self) -> str:
        if self.kind == "afd":
            hw = self.attention_hw.name if self.attention_hw == self.ffn_hw else \
                f"{self.attention_hw.name}+{self.ffn_hw.name}"
            return f"{self.attention_instances}A{self.ffn_instances}F x{self.gpus_per_instance} {hw}"
        return f"colocated EP{self.ep} {self.attention_hw.name}"

    @property
    def family(self) -> str:
        """Plot family: the shape without the instance counts' hardware detail."""
        if self.kind == "afd":
            return f"AFD {self.attention_hw.name}/{self.ffn_hw.name}"
        return f"colocated {self.attention_hw.name}"

    @property
    def usd_per_hour(self) -> float:
        if self.kind == "afd":
            return self.attention_gpus * self.attention_hw.usd_per_hour \
                + self.ffn_gpus * self.ffn_hw.usd_per_hour
        return self.ep * self.attention_hw.usd_per_hour


def parse_afd(text: str) -> tuple[int, int]:
    """'2A2F' -> (2, 2), by the parser `serve --afd` uses (a ValueError for anything else)."""
    topo = parse_topology(text)
    return topo.num_attention, topo.num_ffn


# ----------------------------------------------------------------------------- stage times

def _roofline(bytes_: float, flops: float, hw_bw: float, peak: float, e_mem: float,
              e_flop: float) -> float:
    """Seconds: the slower of streaming `bytes_` and computing `flops`."""
    return max(bytes_ / (hw_bw * e_mem), flops / (peak * e_flop) if flops else 0.0)


def attention_time(arch: ModelArch, hw: Hardware, seqs: float, context: int,
                   prec: SimPrecision, eff: Efficiency) -> dict[str, float]:
    """Seconds for one layer of attention on one GPU serving `seqs` sequences (one micro-batch).

    Per-layer figures are the model's per-token totals divided by L (hybrid models average
    their full, chunked and linear layers). Returns the parts and their sum under 'total'.
    """
    layers = arch.num_layers
    kv = seqs * arch.kv_bytes_per_token(context, prec.kv_bytes) / layers
    flops = seqs * arch.attention_flops_per_token(context) / layers
    core = _roofline(kv, flops, hw.hbm_bytes_per_s, hw.flops_for(prec.attention_compute),
                     eff.hbm_efficiency, eff.attention_flop_efficiency)
    params = arch.attention_params_total() / layers
    linear = _roofline(params * prec.projection_bytes, 2 * params * seqs, hw.hbm_bytes_per_s,
                       hw.flops_for(prec.projection_compute), eff.hbm_efficiency, eff.gemm(seqs))
    over = eff.attention_layer_overhead_us * 1e-6
    return {"core": core, "linear": linear, "overhead": over, "total": core + linear + over}


def _gemm_part(hw: Hardware, params: float, rows: float, prec: SimPrecision,
               eff: Efficiency) -> float:
    """Stream `params` weights and multiply each by `rows` token rows."""
    if params <= 0:
        return 0.0
    return _roofline(params * prec.weight_bytes, 2 * params * rows,
                     hw.hbm_bytes_per_s, hw.flops_for(prec.gemm_compute), eff.hbm_efficiency,
                     eff.gemm(rows))


BINOMIAL_MAX_MEAN_ROWS = 32.0


def _expert_gemm(hw: Hardware, params: float, tokens: float, p: float, prec: SimPrecision,
                 eff: Efficiency) -> float:
    """Expected seconds of one routed expert (`params` weights here) when `tokens` tokens each
    pick it with probability p (uniform routing).

    Rows per expert are Binomial(tokens, p). At small batches the GEMM time is not linear in the
    rows (an expert that gets no token is not read; on CPUs 1 row streams faster than 3), so the
    time is averaged over the distribution; from BINOMIAL_MAX_MEAN_ROWS mean rows up, where the
    distribution is narrow, the mean is used.
    """
    mean = tokens * p
    n = round(tokens)
    if mean >= BINOMIAL_MAX_MEAN_ROWS or n < 1 or p >= 1:
        return _gemm_part(hw, params, mean, prec, eff)
    total, pmf = 0.0, (1 - p) ** n                     # pmf(0)
    for r in range(1, n + 1):
        pmf *= (n - r + 1) / r * p / (1 - p)
        if pmf < 1e-12 and r > mean:
            break
        total += pmf * _gemm_part(hw, params, r, prec, eff)
    return total


def ffn_time(arch: ModelArch, hw: Hardware, tokens: float, gpus: int, moe: bool,
             prec: SimPrecision, eff: Efficiency, *, routed_shards: int | None = None,
             replicated_shared: bool = False) -> float:
    """Seconds for one FFN layer on one GPU of an FFN pool of `gpus` GPUs that together serve
    `tokens` tokens (one micro-batch).

    AFD: every weight is sharded over the pool (`routed_shards` = `gpus`), each GPU does 1/gpus
    of every expert's work. Colocated: routed experts are sharded over EP = `gpus`, the shared
    expert and dense layers are replicated (`replicated_shared`): each GPU runs them for its own
    tokens / gpus tokens.
    """
    h = arch.hidden_size
    shards = routed_shards or gpus
    eff = eff.for_ffn()
    over = eff.ffn_layer_overhead_us * 1e-6
    if not moe:
        dense = 3 * h * arch.dense_width
        if replicated_shared:
            return _gemm_part(hw, dense, tokens / gpus, prec, eff) + over
        return _gemm_part(hw, dense / shards, tokens, prec, eff) + over
    expert = 3 * h * arch.expert_width
    per_expert = tokens * arch.top_k / arch.num_experts           # tokens each expert receives
    experts_here = arch.num_experts / shards
    if experts_here >= 1 or not replicated_shared:
        routed = experts_here * _expert_gemm(hw, expert, tokens, arch.top_k / arch.num_experts, prec, eff)
    else:  # more EP ranks than experts: replicas split an expert's tokens
        routed = _gemm_part(hw, expert, per_expert * experts_here, prec, eff)
    shared = arch.num_shared_experts * 3 * h * arch.shared_width
    if replicated_shared:
        shared_t = _gemm_part(hw, shared, tokens / gpus, prec, eff)
    else:
        shared_t = _gemm_part(hw, shared / shards, tokens, prec, eff)
    return routed + shared_t + over


def transfer_time(bytes_per_gpu: float, nic: float, efficiency: float, latency_us: float) -> float:
    """Seconds to move `bytes_per_gpu` over one GPU's NIC share, plus the per-transfer latency."""
    return bytes_per_gpu / (nic * efficiency) + latency_us * 1e-6


def head_time(arch: ModelArch, hw: Hardware, seqs: float, shards: int, prec: SimPrecision,
              eff: Efficiency) -> float:
    """LM head (vocab-parallel over `shards` GPUs) + per-step overhead, once per micro-batch."""
    params = arch.vocab_size * arch.hidden_size / shards
    return _gemm_part(hw, params, seqs * shards, prec, eff) \
        + eff.step_overhead_us * 1e-6


# ----------------------------------------------------------------------------- pipeline

@dataclass
class StageTimes:
    """Seconds per layer and micro-batch on the busiest GPU / link of each stage, MoE layers
    (dense layers in `dense_*`), plus the once-per-micro-batch head."""

    attention: float
    ffn: float
    a2f: float
    f2a: float
    dense_ffn: float
    head: float
    attention_parts: dict = field(default_factory=dict)


def pipeline_period(arch: ModelArch, st: StageTimes, m: int, resources: dict[str, str],
                    record: list | None = None) -> float:
    """List-schedule STEPS_SIMULATED decode steps of m micro-batches through L layers of
    (attention, a2f, ffn, f2a) and return the steady-state step period (TPOT) in seconds.

    `resources` maps each stage to the resource it occupies; stages sharing a resource run one
    at a time in (step, layer, stage, micro-batch) order. A micro-batch's stages run in order;
    its next step starts after its head (LM head, sampling) finishes.

    With `record` (a list), every scheduled stage is appended to it as a `ScheduledStage`: the
    per-stage schedule `schedule` draws as the predicted timeline.
    """
    stages = ("attention", "a2f", "ffn", "f2a")
    names = sorted(set(resources.values()))
    res = [names.index(resources[s]) for s in stages]
    head_res = res[0]
    moe = set(arch.moe_layer_ids)
    moe_t = (st.attention, st.a2f, st.ffn, st.f2a)
    dense_t = (st.attention, st.a2f, st.dense_ffn, st.f2a)
    layer_times = [moe_t if layer in moe else dense_t for layer in range(arch.num_layers)]
    free = [0.0] * len(names)
    ready = [0.0] * m
    ends: list[float] = []
    for step in range(STEPS_SIMULATED):
        for layer, times in enumerate(layer_times):
            for k in range(4):
                r, t = res[k], times[k]
                f = free[r]
                for i in range(m):
                    f = (ready[i] if ready[i] > f else f) + t
                    ready[i] = f
                    if record is not None:
                        record.append(ScheduledStage(step, layer, stages[k], i, names[r], f - t, f))
                free[r] = f
        f = free[head_res]
        for i in range(m):
            f = (ready[i] if ready[i] > f else f) + st.head
            ready[i] = f
            if record is not None:
                record.append(ScheduledStage(step, -1, "head", i, names[head_res], f - st.head, f))
        free[head_res] = f
        ends.append(max(ready))
    return ends[-1] - ends[-2]


@dataclass(frozen=True)
class ScheduledStage:
    """One stage of one micro-batch in the simulated schedule (seconds from the first step's start)."""

    step: int
    layer: int              # -1: the once-per-step head
    stage: str              # attention, a2f, ffn, f2a, head
    micro_batch: int
    resource: str
    start: float
    end: float


def schedule(arch: ModelArch, dep: "Deployment", context: int, batch: int, prec: SimPrecision | None = None,
             eff: Efficiency | None = None) -> list[ScheduledStage]:
    """The list schedule of the last simulated (steady-state) step of `dep`, times relative to
    that step's first stage: what `simulate` computes TPOT from, stage by stage."""
    prec = prec or SimPrecision()
    eff = eff or load_efficiency("gpu")
    st = stage_times(arch, dep, context, batch, prec, eff)
    out: list[ScheduledStage] = []
    pipeline_period(arch, st, dep.micro_batches, AFD_RESOURCES if dep.kind == "afd" else COLOCATED_RESOURCES, out)
    last = [s for s in out if s.step == STEPS_SIMULATED - 1]
    t0 = min(s.start for s in last)
    return [replace(s, step=0, start=s.start - t0, end=s.end - t0) for s in last]


AFD_RESOURCES = {"attention": "attn_gpu", "a2f": "a2f_link", "ffn": "ffn_gpu", "f2a": "f2a_link"}
COLOCATED_RESOURCES = {"attention": "gpu", "a2f": "nic", "ffn": "gpu", "f2a": "nic"}


# ----------------------------------------------------------------------------- simulation

@dataclass
class SimResult:
    """One simulated decode step at steady state."""

    deployment: str
    kind: str
    model: str
    context: int
    batch: int
    micro_batches: int
    gpus: int
    tpot_ms: float
    tokens_per_gpu_s: float
    stage_us: dict
    bottleneck: str
    memory: dict
    fits: bool
    usd_per_mtok: float
    attention_precision: str
    seqs_per_attention_gpu: float

    def to_dict(self) -> dict:
        return asdict(self)


def _a2f_bytes(arch: ModelArch, prec: SimPrecision) -> float:
    """Bytes per token A->F: activations, scales, the expert choice (ids int32 + fp32 weights)."""
    h = arch.hidden_size
    scales = 4 * math.ceil(h / SCALE_GROUP) if prec.a2f_scales else 0
    return h * prec.a2f_bytes + scales + 8 * arch.top_k


def stage_times(arch: ModelArch, dep: Deployment, context: int, batch: int,
                prec: SimPrecision, eff: Efficiency) -> StageTimes:
    """Per-layer per-micro-batch stage times of `dep` serving `batch` sequences."""
    m = dep.micro_batches
    tokens = batch / m                                  # tokens per micro-batch, whole system
    seqs = tokens / dep.attention_gpus                  # per attention GPU per micro-batch
    attn = attention_time(arch, dep.attention_hw, seqs, context, prec, eff)
    a2f_tok, f2a_tok = _a2f_bytes(arch, prec), arch.hidden_size * prec.f2a_bytes
    if dep.kind == "afd":
        ffn = ffn_time(arch, dep.ffn_hw, tokens, dep.ffn_gpus, True, prec, eff)
        dense = ffn_time(arch, dep.ffn_hw, tokens, dep.ffn_gpus, False, prec, eff)

        def link(per_tok: float) -> float:
            per_attn = tokens * per_tok / dep.attention_gpus / dep.attention_hw.nic_bytes_per_s
            per_ffn = tokens * per_tok / dep.ffn_gpus / dep.ffn_hw.nic_bytes_per_s
            return max(per_attn, per_ffn) / eff.nic_efficiency + eff.transfer_latency_us * 1e-6
        a2f, f2a = link(a2f_tok), link(f2a_tok)
        head = head_time(arch, dep.attention_hw, seqs, dep.gpus_per_instance, prec, eff)
    else:
        ep, hw = dep.ep, dep.attention_hw
        ffn = ffn_time(arch, hw, tokens, ep, True, prec, eff, replicated_shared=True)
        dense = ffn_time(arch, hw, tokens, ep, False, prec, eff, replicated_shared=True)
        remote = (ep - 1) / ep if ep > 1 else 0.0       # copies leaving the GPU
        nic = hw.nic_bytes_per_s * eff.colocated_a2a_efficiency
        lat = eff.transfer_latency_us * 1e-6 if ep > 1 else 0.0
        a2f = seqs * arch.top_k * remote * a2f_tok / nic + lat
        f2a = seqs * arch.top_k * remote * f2a_tok / nic + lat
        head = head_time(arch, hw, seqs, 1, prec, eff)
    return StageTimes(attention=attn["total"], ffn=ffn, a2f=a2f, f2a=f2a, dense_ffn=dense,
                      head=head, attention_parts=attn)


def memory_check(arch: ModelArch, dep: Deployment, context: int, batch: int,
                 prec: SimPrecision, eff: Efficiency) -> dict:
    """Bytes per GPU of weights + KV cache against usable device memory."""
    seqs_total = batch / dep.attention_gpus
    kv = seqs_total * (context * arch.kv_cache_bytes_per_cached_token(prec.kv_bytes)
                       + arch.linear_state_bytes_per_sequence())
    attn_w = arch.attention_params_total() * prec.projection_bytes \
        + (arch.router_params_total() + arch.vocab_size * arch.hidden_size) * prec.weight_bytes
    lm_head = arch.vocab_size * arch.hidden_size * prec.weight_bytes
    if dep.kind == "afd":
        attn_w += lm_head / dep.gpus_per_instance
        ffn_w = arch.ffn_params_total() * prec.weight_bytes / dep.ffn_gpus
        sides = {"attention": (attn_w, kv, dep.attention_hw), "ffn": (ffn_w, 0.0, dep.ffn_hw)}
    else:
        h = arch.hidden_size
        routed = arch.num_moe_layers * arch.num_experts * 3 * h * arch.expert_width
        rest = arch.ffn_params_total() - routed
        w = attn_w + lm_head + (routed / dep.ep + rest) * prec.weight_bytes
        sides = {"gpu": (w, kv, dep.attention_hw)}
    out, fits = {}, True
    for side, (w, k, hw) in sides.items():
        usable = hw.memory_bytes * eff.memory_usable_fraction
        ok = w + k <= usable
        fits &= ok
        out[side] = {"weights_gb": w / 1e9, "kv_gb": k / 1e9, "usable_gb": usable / 1e9,
                     "fits": ok}
    out["fits"] = fits
    return out


def simulate(arch: ModelArch, dep: Deployment, context: int, batch: int,
             prec: SimPrecision | None = None, eff: Efficiency | None = None) -> SimResult:
    """Simulate one decode step of `dep` with `batch` running sequences at `context`."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if batch < dep.micro_batches:
        raise ValueError(f"batch ({batch}) must be at least the number of micro-batches "
                         f"({dep.micro_batches})")
    prec = prec or SimPrecision()
    eff = eff or load_efficiency("gpu")
    st = stage_times(arch, dep, context, batch, prec, eff)
    resources = AFD_RESOURCES if dep.kind == "afd" else COLOCATED_RESOURCES
    tpot = pipeline_period(arch, st, dep.micro_batches, resources)
    stage_us = {"attention": st.attention * 1e6, "ffn": st.ffn * 1e6, "a2f": st.a2f * 1e6,
                "f2a": st.f2a * 1e6}
    bottleneck = _bottleneck(st, dep)
    mem = memory_check(arch, dep, context, batch, prec, eff)
    tps = batch / tpot / dep.gpus
    return SimResult(
        deployment=dep.name, kind=dep.kind, model=arch.name, context=context, batch=batch,
        micro_batches=dep.micro_batches, gpus=dep.gpus, tpot_ms=tpot * 1e3,
        tokens_per_gpu_s=tps, stage_us=stage_us, bottleneck=bottleneck, memory=mem,
        fits=mem["fits"], usd_per_mtok=dep.usd_per_hour / 3600 / (batch / tpot) * 1e6,
        attention_precision=prec.attention_label, seqs_per_attention_gpu=batch / dep.attention_gpus)


def _bottleneck(st: StageTimes, dep: Deployment) -> str:
    """The resource with the most busy time per layer (MoE layers)."""
    if dep.kind == "afd":
        loads = {"attention": st.attention, "ffn": st.ffn, "a2f": st.a2f, "f2a": st.f2a}
    else:
        loads = {"compute": st.attention + st.ffn, "communication": st.a2f + st.f2a}
    return max(loads, key=loads.get)


def max_batch_for_tpot(arch: ModelArch, dep: Deployment, context: int, tpot_ms: float,
                       prec: SimPrecision | None = None, eff: Efficiency | None = None,
                       max_seqs_per_gpu: int = 4096) -> SimResult | None:
    """Largest batch (a multiple of micro-batches x attention GPUs) whose TPOT <= `tpot_ms` and
    whose KV cache fits; None if even one sequence per GPU per micro-batch misses."""
    if tpot_ms <= 0:
        raise ValueError(f"TPOT target must be positive, got {tpot_ms}")
    unit = dep.micro_batches * dep.attention_gpus

    def ok(k: int) -> SimResult | None:
        r = simulate(arch, dep, context, k * unit, prec, eff)
        return r if r.fits and r.tpot_ms <= tpot_ms else None

    best = ok(1)
    if best is None:
        return None
    lo, hi = 1, 2
    while hi <= max_seqs_per_gpu and ok(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, max_seqs_per_gpu + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return ok(lo)


def calibrate(eff: Efficiency | None = None) -> Efficiency:
    """Refit the two calibrated factors on the report's two published points (section 7):
    hbm_efficiency on Step-3 2A2F (4,039), then colocated_a2a_efficiency on DeepSeek-V3
    EP128 (2,324). Used to produce efficiency.json; tests check the stored values reproduce."""
    from afdserve.cost.arch import get_model
    from afdserve.cost.hardware import get_hardware
    eff = eff or load_efficiency("gpu")
    h800 = get_hardware("H800")
    step3, dsv3 = get_model("step3"), get_model("deepseek-v3")
    afd = Deployment("afd", h800, h800, 2, 2, 8, micro_batches=3)
    col = Deployment("colocated", h800, h800, ep=128, micro_batches=2)

    def fit(name: str, f, target: float, lo: float, hi: float) -> float:
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(replace(eff, **{name: mid})) < target else (lo, mid)
        return (lo + hi) / 2

    eff = replace(eff, hbm_efficiency=fit(
        "hbm_efficiency", lambda e: simulate(step3, afd, 4096, 6144, None, e).tokens_per_gpu_s,
        4039.0, 0.05, 1.0))

    def col_tps(e: Efficiency) -> float:
        r = max_batch_for_tpot(dsv3, col, 4096, 50.0, None, e)
        return r.tokens_per_gpu_s if r else 0.0
    return replace(eff, colocated_a2a_efficiency=fit("colocated_a2a_efficiency", col_tps,
                                                     2324.0, 0.05, 1.0))
