"""Architecture descriptions for the decoding-cost model (no torch).

A `ModelArch` is everything the cost model needs to know about a decoder: layer counts, the
attention family and its widths, and the FFN layout. It is built from a named preset
(`MODEL_PRESETS`, the models of the Step-3 report, arXiv 2507.19427, section 4 tables) or from a
Hugging Face `config.json` (`from_hf_config`). Unknown config keys are ignored; a missing or
malformed key needed by the cost model raises `ValueError` naming the field.

Per-token quantities follow the report's section 4.1 (formulas in docs/cost-model.md).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ATTENTION_FAMILIES = ("mha", "gqa", "mqa", "mla", "mfa")


@dataclass(frozen=True)
class ModelArch:
    """A decoder-only transformer as the cost model sees it.

    Layers come in up to three attention kinds: `full` softmax layers (read the whole context),
    `chunked` softmax layers (read at most `chunk_size` tokens, Llama 4 local layers) and `linear`
    layers (a fixed-size recurrent state, MiniMax-M1 lightning attention). Softmax layers of all
    kinds use the widths of `attention` (MHA/GQA/MQA/MLA/MFA).
    """

    name: str
    num_layers: int                      # L, decoder layers
    hidden_size: int                     # H, residual width
    vocab_size: int                      # embedding rows (and LM head rows)
    # --- attention ---
    attention: str                       # family: mha | gqa | mqa | mla | mfa
    num_q_heads: int                     # query heads
    num_kv_heads: int                    # K/V heads (MFA: num_attention_groups = 1; MLA: = num_q_heads)
    head_dim: int                        # per-head width of q, k and v (GQA/MFA)
    share_q_dim: int = 0                 # MFA: rank of the factorised query (Step-3: 2048)
    q_lora_rank: int = 0                 # MLA: query low-rank (0 = direct q projection)
    kv_lora_rank: int = 0                # MLA: compressed KV width, what the cache stores
    qk_rope_head_dim: int = 0            # MLA: decoupled RoPE key width (cached, shared by heads)
    qk_nope_head_dim: int = 0            # MLA: non-RoPE part of each q/k head
    v_head_dim: int = 0                  # MLA: value head width
    num_chunked_layers: int = 0          # softmax layers restricted to chunks of `chunk_size`
    chunk_size: int = 0                  # tokens a chunked layer reads at most
    num_linear_layers: int = 0           # linear-attention layers with a fixed-size state
    linear_heads: int = 0                # linear layers: heads (MiniMax-M1: 64)
    linear_head_dim: int = 0             # linear layers: per-head width; state is heads x d x d
    linear_num_input_projections: int = 4  # H -> heads*d projections (q, k, v, output gate)
    linear_state_bytes_per_elem: float = 4.0  # fp32 state (MiniMax-M1)
    full_layer_kv_bytes_per_elem: float | None = None  # KV precision of the *full* softmax layers
    # of hybrid models (the report keeps BF16 = 2 there); None = the global KV precision.
    # --- FFN ---
    dense_width: int = 0                 # SwiGLU width of the dense FFN layers
    moe_layer_ids: tuple[int, ...] = ()  # which layers are MoE; all others are dense
    num_experts: int = 0                 # routed experts per MoE layer
    top_k: int = 0                       # routed experts chosen per token
    expert_width: int = 0                # SwiGLU width of one routed expert
    num_shared_experts: int = 0          # always-on experts per MoE layer
    shared_width: int = 0                # SwiGLU width of ONE shared expert
    tie_word_embeddings: bool = False
    notes: str = field(default="", compare=False)  # where the figures come from

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_FAMILIES:
            raise ValueError(f"attention family must be one of {ATTENTION_FAMILIES}, "
                             f"got {self.attention!r}")
        for name in ("num_layers", "hidden_size", "num_q_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_chunked_layers + self.num_linear_layers > self.num_layers:
            raise ValueError("num_chunked_layers + num_linear_layers exceeds num_layers")
        if self.num_chunked_layers and self.chunk_size <= 0:
            raise ValueError("chunk_size must be positive when there are chunked layers")
        if any(not 0 <= i < self.num_layers for i in self.moe_layer_ids):
            raise ValueError("moe_layer_ids out of range [0, num_layers)")
        if self.moe_layer_ids and (self.num_experts <= 0 or self.top_k <= 0
                                   or self.expert_width <= 0):
            raise ValueError("MoE layers need num_experts, top_k and expert_width > 0")
        if self.num_dense_layers and self.dense_width <= 0:
            raise ValueError("dense layers need dense_width > 0")

    # ----- layer counts -----
    @property
    def num_full_layers(self) -> int:
        """Softmax layers that read the whole context."""
        return self.num_layers - self.num_chunked_layers - self.num_linear_layers

    @property
    def num_softmax_layers(self) -> int:
        return self.num_layers - self.num_linear_layers

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - len(self.moe_layer_ids)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layer_ids)

    # ----- attention side -----
    @property
    def kv_elems_per_layer(self) -> int:
        """Cached elements per token per softmax layer (report section 4.1).

        GQA/MHA/MQA/MFA: one K and one V vector per KV head, 2 * n_kv * d (MFA: n_kv = 1).
        MLA absorbed: the compressed latent plus the shared RoPE key, kv_lora_rank + rope dim.
        """
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def attention_flops_per_ctx_token(self) -> int:
        """Attention FLOPs (QK^T and PV) per decoded token, per layer, per context token.

        GQA/MFA: 4 * n_q * d. MLA absorbed: every head scores against the 576-wide latent and
        reads values from the 512-wide latent: 4 * n_q * (kv_lora_rank + rope) as the report counts.
        """
        if self.attention == "mla":
            return 4 * self.num_q_heads * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 4 * self.num_q_heads * self.head_dim

    def attention_params_per_layer(self) -> int:
        """Linear-projection parameters of one softmax attention layer (report section 4.1).

        GQA: q, k, v, o. MFA: q_proj (H x share_q), k/v (H x d each per KV head), wq
        (share_q x n_q*d), o. MLA: q_a, q_b (or q), kv_a (H x (kv_lora + rope)), kv_b, o.
        Norms are left out (negligible).
        """
        h, nq, nkv, d = self.hidden_size, self.num_q_heads, self.num_kv_heads, self.head_dim
        if self.attention == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank * nq * qk
            else:
                q = h * nq * qk
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * nq * (self.qk_nope_head_dim + self.v_head_dim)
            o = nq * self.v_head_dim * h
            return q + kv_a + kv_b + o
        kv = 2 * h * nkv * d
        o = nq * d * h
        if self.attention == "mfa":
            return h * self.share_q_dim + kv + self.share_q_dim * nq * d + o
        return h * nq * d + kv + o

    def linear_attention_params_per_layer(self) -> int:
        """Projections of one linear-attention layer: q, k, v, gate (H -> heads*d) and o.

        MiniMax-M1 lightning layers (its public config): 4 input projections + o at 64 x 128.
        """
        inner = self.linear_heads * self.linear_head_dim
        return (self.linear_num_input_projections + 1) * self.hidden_size * inner

    def attention_params_total(self) -> int:
        """Attention projection parameters of all layers."""
        return (self.num_softmax_layers * self.attention_params_per_layer()
                + self.num_linear_layers * self.linear_attention_params_per_layer())

    def linear_state_elems_per_layer(self) -> int:
        """Elements of one linear layer's recurrent state per sequence (heads x d x d)."""
        return self.linear_heads * self.linear_head_dim * self.linear_head_dim

    def kv_bytes_per_token(self, context: int, kv_bytes_per_elem: float = 1.0,
                           full_layer_kv_bytes_per_elem: float | None = None) -> float:
        """Bytes of KV cache (and linear state) read to decode one token at `context`.

        Report section 4.1: full layers read `context` tokens, chunked layers
        at most `chunk_size` tokens (Llama 4's 8192-token chunks, the upper bound), linear
        layers read and write their state (2 x heads x d x d x state bytes) whatever the context.
        Full layers of hybrid models use `full_layer_kv_bytes_per_elem` (arch default: BF16).
        """
        full_b = full_layer_kv_bytes_per_elem or self.full_layer_kv_bytes_per_elem \
            or kv_bytes_per_elem
        per_tok = self.kv_elems_per_layer
        full = self.num_full_layers * context * per_tok * full_b
        chunk = self.num_chunked_layers * min(context, self.chunk_size) * per_tok \
            * kv_bytes_per_elem
        state = self.num_linear_layers * 2 * self.linear_state_elems_per_layer() \
            * self.linear_state_bytes_per_elem
        return full + chunk + state

    def kv_cache_bytes_per_cached_token(self, kv_bytes_per_elem: float = 1.0) -> float:
        """Bytes one cached token occupies across all softmax layers (capacity planning).

        Chunked layers are counted as full (an upper bound: they only need the current chunk);
        linear layers hold a per-sequence state, not per token, and are not counted here.
        """
        full_b = self.full_layer_kv_bytes_per_elem or kv_bytes_per_elem
        return self.kv_elems_per_layer * (self.num_full_layers * full_b
                                          + self.num_chunked_layers * kv_bytes_per_elem)

    def linear_state_bytes_per_sequence(self) -> float:
        return (self.num_linear_layers * self.linear_state_elems_per_layer()
                * self.linear_state_bytes_per_elem)

    def attention_flops_per_token(self, context: int) -> float:
        """QK^T and PV FLOPs to decode one token at `context` (report section 4.1).

        Linear layers: state update (k^T v, 2*d*d) and readout (q S, 2*d*d) per head,
        4 * heads * d * d per layer, constant in context.
        """
        per = self.attention_flops_per_ctx_token
        softmax = per * (self.num_full_layers * context
                         + self.num_chunked_layers * min(context, self.chunk_size))
        linear = self.num_linear_layers * 4 * self.linear_state_elems_per_layer()
        return softmax + linear

    # ----- FFN side -----
    def _swiglu(self, width: int) -> int:
        return 3 * self.hidden_size * width

    def ffn_params_total(self) -> int:
        """All FFN parameters: dense layers plus every routed and shared expert (no routers)."""
        moe = self.num_experts * self._swiglu(self.expert_width) \
            + self.num_shared_experts * self._swiglu(self.shared_width)
        return self.num_dense_layers * self._swiglu(self.dense_width) + self.num_moe_layers * moe

    def ffn_active_params(self) -> int:
        """FFN parameters used by one token: dense layers whole, top_k + shared experts."""
        moe = self.top_k * self._swiglu(self.expert_width) \
            + self.num_shared_experts * self._swiglu(self.shared_width)
        return self.num_dense_layers * self._swiglu(self.dense_width) + self.num_moe_layers * moe

    def router_params_total(self) -> int:
        return self.num_moe_layers * self.num_experts * self.hidden_size

    def embedding_params(self) -> int:
        """Embedding plus LM head (one matrix if tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def attention_side_params(self) -> int:
        """What an AFD attention instance holds: attention, embedding, LM head and routers."""
        return self.attention_params_total() + self.embedding_params() + self.router_params_total()

    def total_params(self) -> int:
        """All parameters (norms left out). Step-3: 316.3B."""
        return self.attention_params_total() + self.ffn_params_total() \
            + self.router_params_total() + self.embedding_params()

    def active_params(self) -> int:
        """Parameters touched per token: attention, active FFN, routers and the LM head
        (the embedding is a lookup). Step-3: about 37.9B."""
        return self.attention_params_total() + self.ffn_active_params() \
            + self.router_params_total() + self.vocab_size * self.hidden_size

    @property
    def sparsity(self) -> float:
        """MoE sparsity S = (top_k + shared) / routed experts (report section 5; Step-3
        (3+1)/48 = 0.083, DeepSeek-V3 9/256). Dense models: 1."""
        if not self.is_moe:
            return 1.0
        return (self.top_k + self.num_shared_experts) / self.num_experts


# --------------------------------------------------------------------------------------
# Presets: the public configs of the models in the report's tables.
# --------------------------------------------------------------------------------------

def _ids(start: int, stop: int, step: int = 1) -> tuple[int, ...]:
    return tuple(range(start, stop, step))


def _presets() -> dict[str, ModelArch]:
    mla = dict(attention="mla", head_dim=128, q_lora_rank=1536, kv_lora_rank=512,
               qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    p = [
        # Step-3 (its released config.json): MFA 64 q heads x 256 over one K/V head, share_q 2048;
        # layers 0-3 and 60 dense 18432; 56 MoE layers 48 x 5120 top-3 + 1 shared 5120.
        ModelArch(name="step3", num_layers=61, hidden_size=7168, vocab_size=128815,
                  attention="mfa", num_q_heads=64, num_kv_heads=1, head_dim=256,
                  share_q_dim=2048, dense_width=18432, moe_layer_ids=_ids(4, 60),
                  num_experts=48, top_k=3, expert_width=5120, num_shared_experts=1,
                  shared_width=5120, notes="Step-3 config (report section 2)"),
        # DeepSeek-V3: MLA (absorbed in decode), layers 0-2 dense, 58 MoE 256 x 2048 top-8 + 1.
        ModelArch(name="deepseek-v3", num_layers=61, hidden_size=7168, vocab_size=129280,
                  num_q_heads=128, num_kv_heads=128, dense_width=18432,
                  moe_layer_ids=_ids(3, 61), num_experts=256, top_k=8, expert_width=2048,
                  num_shared_experts=1, shared_width=2048,
                  notes="deepseek-ai/DeepSeek-V3 config.json", **mla),
        # Kimi K2: DeepSeek-V3 MLA with 64 heads, layer 0 dense, 60 MoE 384 x 2048 top-8 + 1.
        ModelArch(name="kimi-k2", num_layers=61, hidden_size=7168, vocab_size=163840,
                  num_q_heads=64, num_kv_heads=64, dense_width=18432,
                  moe_layer_ids=_ids(1, 61), num_experts=384, top_k=8, expert_width=2048,
                  num_shared_experts=1, shared_width=2048,
                  notes="moonshotai/Kimi-K2-Instruct config.json", **mla),
        # Qwen3-235B-A22B: GQA 64/4/128, 94 MoE layers 128 x 1536 top-8, no shared.
        ModelArch(name="qwen3-235b-a22b", num_layers=94, hidden_size=4096, vocab_size=151936,
                  attention="gqa", num_q_heads=64, num_kv_heads=4, head_dim=128,
                  moe_layer_ids=_ids(0, 94), num_experts=128, top_k=8, expert_width=1536,
                  dense_width=12288, notes="Qwen/Qwen3-235B-A22B config.json"),
        # Qwen3-32B: dense GQA 64/8/128, SwiGLU 25600.
        ModelArch(name="qwen3-32b", num_layers=64, hidden_size=5120, vocab_size=151936,
                  attention="gqa", num_q_heads=64, num_kv_heads=8, head_dim=128,
                  dense_width=25600, notes="Qwen/Qwen3-32B config.json"),
        # ERNIE 4.5 300B-A47B: GQA 64/8/128, layers 0-2 dense 28672, 51 MoE 64 x 3584 top-8.
        ModelArch(name="ernie-4.5-300b-a47b", num_layers=54, hidden_size=8192,
                  vocab_size=103424, attention="gqa", num_q_heads=64, num_kv_heads=8,
                  head_dim=128, dense_width=28672, moe_layer_ids=_ids(3, 54), num_experts=64,
                  top_k=8, expert_width=3584,
                  notes="baidu/ERNIE-4.5-300B-A47B config.json"),
        # Pangu Pro MoE 72B: GQA 40/8/128, all 48 layers MoE: 64 x 1344 top-8 (grouped)
        # + 4 shared experts of 1344.
        ModelArch(name="pangu-pro-moe", num_layers=48, hidden_size=5120, vocab_size=153376,
                  attention="gqa", num_q_heads=40, num_kv_heads=8, head_dim=128,
                  moe_layer_ids=_ids(0, 48), num_experts=64, top_k=8, expert_width=1344,
                  num_shared_experts=4, shared_width=1344,
                  notes="Pangu Pro MoE (MoGE) 72B public config"),
        # Llama 4 Maverick: GQA 40/8/128; 3 of 4 layers chunked attention (8192-token chunks,
        # 8-bit KV), every 4th layer global (BF16 KV); odd layers MoE 128 x 8192 top-1 + 1
        # shared 8192, even layers dense 16384.
        ModelArch(name="llama4-maverick", num_layers=48, hidden_size=5120, vocab_size=202048,
                  attention="gqa", num_q_heads=40, num_kv_heads=8, head_dim=128,
                  num_chunked_layers=36, chunk_size=8192, full_layer_kv_bytes_per_elem=2.0,
                  dense_width=16384, moe_layer_ids=_ids(1, 48, 2), num_experts=128, top_k=1,
                  expert_width=8192, num_shared_experts=1, shared_width=8192,
                  notes="meta-llama/Llama-4-Maverick-17B-128E config.json"),
        # MiniMax-M1 456B: 70 lightning layers (64 x 128 x 128 fp32 state), 10 softmax GQA
        # layers 64/8/128 with BF16 KV; all 80 layers MoE 32 x 9216 top-2.
        ModelArch(name="minimax-m1", num_layers=80, hidden_size=6144, vocab_size=200064,
                  attention="gqa", num_q_heads=64, num_kv_heads=8, head_dim=128,
                  num_linear_layers=70, linear_heads=64, linear_head_dim=128,
                  full_layer_kv_bytes_per_elem=2.0, moe_layer_ids=_ids(0, 80),
                  num_experts=32, top_k=2, expert_width=9216,
                  notes="MiniMaxAI/MiniMax-M1-80k config.json"),
    ]
    return {m.name: m for m in p}


MODEL_PRESETS: dict[str, ModelArch] = _presets()


# --------------------------------------------------------------------------------------
# From a Hugging Face config.json
# --------------------------------------------------------------------------------------

def _int(cfg: Mapping[str, Any], key: str, default: int | None = None, *,
         min_value: int = 1) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"config.json: missing field '{key}'")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config.json: field '{key}' must be an integer, got {value!r}")
    if value < min_value:
        raise ValueError(f"config.json: field '{key}' must be >= {min_value}, got {value}")
    return value


def _int_list(cfg: Mapping[str, Any], key: str) -> list[int]:
    raw = cfg.get(key) or []
    if isinstance(raw, str):
        raw = [x for x in raw.replace(" ", "").split(",") if x]
    try:
        return [int(x) for x in raw]
    except (TypeError, ValueError):
        raise ValueError(f"config.json: field '{key}' must be a list of layer indices, "
                         f"got {cfg.get(key)!r}") from None


def _name(cfg: Mapping[str, Any], default: str) -> str:
    return str(cfg.get("_name_or_path") or cfg.get("model_type") or default)


def _from_step3(cfg: Mapping[str, Any]) -> ModelArch:
    """Step-3 text config (`step3_text`, or `text_config` of `step3_vl`): MFA + MoE."""
    layers = _int(cfg, "num_hidden_layers")
    moe_ids = _int_list(cfg, "moe_layers_enum")
    shared_dim = _int(cfg, "share_expert_dim", 0, min_value=0)
    return ModelArch(
        name=_name(cfg, "step3"), num_layers=layers, hidden_size=_int(cfg, "hidden_size"),
        vocab_size=_int(cfg, "vocab_size"), attention="mfa",
        num_q_heads=_int(cfg, "num_attention_heads"),
        num_kv_heads=_int(cfg, "num_attention_groups", 1), head_dim=_int(cfg, "head_dim"),
        share_q_dim=_int(cfg, "share_q_dim"), dense_width=_int(cfg, "intermediate_size"),
        moe_layer_ids=tuple(moe_ids),
        num_experts=_int(cfg, "moe_num_experts") if moe_ids else 0,
        top_k=_int(cfg, "moe_top_k") if moe_ids else 0,
        expert_width=_int(cfg, "moe_intermediate_size") if moe_ids else 0,
        num_shared_experts=1 if shared_dim else 0, shared_width=shared_dim,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _from_mla(cfg: Mapping[str, Any]) -> ModelArch:
    """DeepSeek-V3 / Kimi K2 style: MLA, first_k_dense_replace dense layers, then MoE every
    moe_layer_freq layers with n_shared_experts of moe_intermediate_size."""
    layers = _int(cfg, "num_hidden_layers")
    heads = _int(cfg, "num_attention_heads")
    n_routed = _int(cfg, "n_routed_experts", 0, min_value=0)
    first_dense = _int(cfg, "first_k_dense_replace", 0, min_value=0)
    freq = _int(cfg, "moe_layer_freq", 1)
    moe_ids = tuple(i for i in range(layers) if n_routed and i >= first_dense and i % freq == 0)
    width = _int(cfg, "moe_intermediate_size") if moe_ids else 0
    n_shared = _int(cfg, "n_shared_experts", 0, min_value=0) if moe_ids else 0
    q_lora = cfg.get("q_lora_rank")
    return ModelArch(
        name=_name(cfg, "deepseek_v3"), num_layers=layers, hidden_size=_int(cfg, "hidden_size"),
        vocab_size=_int(cfg, "vocab_size"), attention="mla", num_q_heads=heads,
        num_kv_heads=heads, head_dim=_int(cfg, "v_head_dim"),
        q_lora_rank=0 if q_lora is None else _int(cfg, "q_lora_rank"),
        kv_lora_rank=_int(cfg, "kv_lora_rank"), qk_rope_head_dim=_int(cfg, "qk_rope_head_dim"),
        qk_nope_head_dim=_int(cfg, "qk_nope_head_dim"), v_head_dim=_int(cfg, "v_head_dim"),
        dense_width=_int(cfg, "intermediate_size"), moe_layer_ids=moe_ids,
        num_experts=n_routed if moe_ids else 0,
        top_k=_int(cfg, "num_experts_per_tok") if moe_ids else 0, expert_width=width,
        num_shared_experts=n_shared, shared_width=width if n_shared else 0,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _from_gqa(cfg: Mapping[str, Any]) -> ModelArch:
    """Llama / Qwen3 (dense) and Qwen3-MoE / Qwen2-MoE: GQA with optional MoE layers chosen by
    `decoder_sparse_step` and `mlp_only_layers`."""
    layers = _int(cfg, "num_hidden_layers")
    hidden = _int(cfg, "hidden_size")
    heads = _int(cfg, "num_attention_heads")
    kv_heads = _int(cfg, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ValueError(f"config.json: 'num_attention_heads' ({heads}) is not a multiple of "
                         f"'num_key_value_heads' ({kv_heads})")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError("config.json: missing field 'head_dim' and hidden_size is not a "
                             "multiple of num_attention_heads")
        head_dim = hidden // heads
    else:
        head_dim = _int(cfg, "head_dim")
    n_exp = _int(cfg, "num_experts", 0, min_value=0)
    step = _int(cfg, "decoder_sparse_step", 1)
    dense_only = set(_int_list(cfg, "mlp_only_layers"))
    moe_ids = tuple(i for i in range(layers)
                    if n_exp and i not in dense_only and (i + 1) % step == 0)
    shared = _int(cfg, "shared_expert_intermediate_size", 0, min_value=0) if moe_ids else 0
    family = "mha" if kv_heads == heads else ("mqa" if kv_heads == 1 else "gqa")
    needs_dense = len(moe_ids) < layers
    return ModelArch(
        name=_name(cfg, "gqa"), num_layers=layers, hidden_size=hidden,
        vocab_size=_int(cfg, "vocab_size"), attention=family, num_q_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim,
        dense_width=_int(cfg, "intermediate_size") if needs_dense
        else int(cfg.get("intermediate_size") or 0),
        moe_layer_ids=moe_ids, num_experts=n_exp if moe_ids else 0,
        top_k=_int(cfg, "num_experts_per_tok") if moe_ids else 0,
        expert_width=_int(cfg, "moe_intermediate_size") if moe_ids else 0,
        num_shared_experts=1 if shared else 0, shared_width=shared,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def from_hf_config(config: Mapping[str, Any] | str | os.PathLike) -> ModelArch:
    """Build a `ModelArch` from an HF config dict or a path to `config.json` (or its folder).

    Supported: Step-3 (`step3_vl` with `text_config`, `step3_text`), DeepSeek-V3-style MLA
    (`kv_lora_rank` present), Qwen3/Llama-style GQA and Qwen3-MoE. Unused keys are ignored.
    """
    if not isinstance(config, Mapping):
        config = _read_config(Path(config))
    cfg: Mapping[str, Any] = config
    model_type = str(cfg.get("model_type", ""))
    if model_type == "step3_vl" or ("text_config" in cfg and "num_hidden_layers" not in cfg):
        text = cfg.get("text_config")
        if not isinstance(text, Mapping):
            raise ValueError("config.json: field 'text_config' must be an object")
        merged = dict(text)
        merged.setdefault("_name_or_path", cfg.get("_name_or_path") or model_type)
        return from_hf_config(merged)
    if model_type.startswith("step3") or "share_q_dim" in cfg:
        return _from_step3(cfg)
    if "kv_lora_rank" in cfg:
        return _from_mla(cfg)
    if "num_attention_heads" in cfg or "num_key_value_heads" in cfg:
        if "attn_type_list" in cfg or "attention_chunk_size" in cfg:
            raise ValueError(f"config.json: model_type {model_type!r} (hybrid attention) is "
                             "only supported through its named preset")
        return _from_gqa(cfg)
    raise ValueError(f"config.json: unsupported architecture (model_type {model_type!r}); "
                     "expected field 'num_attention_heads'")


def _read_config(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a JSON object")
    return data


def get_model(name_or_path: str) -> ModelArch:
    """A preset by name (case-insensitive) or an HF config.json path."""
    key = name_or_path.strip().lower()
    if key in MODEL_PRESETS:
        return MODEL_PRESETS[key]
    if os.path.exists(name_or_path) or name_or_path.endswith(".json"):
        return from_hf_config(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}; presets: {', '.join(MODEL_PRESETS)} "
                     "(or a path to an HF config.json)")
