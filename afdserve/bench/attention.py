"""Attention designs side by side: MFA vs GQA vs MLA decode layers of equal width.

All designs: hidden 768, 16 query heads, output projection 2048 -> 768 (the `small` preset).
* MFA (afdserve): `MFAttention` over a paged `KVCache`, exactly what the engine runs
  (low-rank query 768 -> 384 -> 16 x 128, ONE K and ONE V head of 128: 256 cached elements/token;
  with one torch thread the native kernel reads K/V in place, otherwise gather + SDPA).
* MFA (contiguous): the same math over a contiguous [B, 1, ctx, 128] cache with torch's SDPA,
  like the GQA and MLA layers below, so that the designs are compared through one attention
  implementation and the engine's paged kernel is seen against it.
* GQA: q 768 -> 16 x 128, 4 KV heads x 128 (1024 cached elements/token), contiguous cache.
* MLA (absorbed, at this width): q 768 -> 16 x (128 nope + 64 rope), the
  latent cache holds kv_lora 512 + rope 64 = 576 elements/token; W_UK is absorbed into the
  query (16 x 128 -> 16 x 512) and W_UV applied after attention over the latent.
Each layer's time per decode step (batch B, one new token per sequence at context C) is put
next to the cost model's roofline prediction max(FLOPs / measured matmul, bytes / measured
bandwidth), with FLOPs and bytes from `afdserve.cost.analysis.per_token_work`.
"""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from afdserve.bench.machine import sync
from afdserve.model.layers import RMSNorm, RotaryEmbedding

HIDDEN, HEADS, HEAD_DIM = 768, 16, 128
SHARE_Q = 384
GQA_KV_HEADS = 4
MLA_LORA, MLA_ROPE, MLA_NOPE, MLA_V = 512, 64, 128, 128
DESIGNS = ("mfa", "mfa-contiguous", "gqa", "mla")


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, nq, dq], k [B, g, L, dq], v [B, g, L, dv] -> [B, nq, dv]: each KV head's queries
    form the rows of one matmul (as afdserve's decode path does)."""
    B, nq, _ = q.shape
    g = k.shape[1]
    qg = q.reshape(B, g, nq // g, q.shape[-1])
    return F.scaled_dot_product_attention(qg, k, v, scale=scale).reshape(B, nq, v.shape[-1])


class _Contiguous(nn.Module):
    """Decode layer over a contiguous cache [B, g, max_len, w]; all sequences at the same position."""

    rope_dim, rope_theta = HEAD_DIM, 500000.0

    def allocate(self, batch: int, max_len: int, dtype, device) -> None:
        self.rope = RotaryEmbedding(self.rope_dim, self.rope_theta, max_len + 1).to(device)
        shape = (batch, self.cache_heads, max_len, self.cache_width)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape[:-1] + (self.value_width,), dtype=dtype, device=device) \
            if self.value_width else None


class GQALayer(_Contiguous):
    def __init__(self, kv_heads: int = GQA_KV_HEADS, low_rank_q: bool = False):
        super().__init__()
        self.kv_heads, self.low_rank_q = kv_heads, low_rank_q
        self.cache_heads, self.cache_width, self.value_width = kv_heads, HEAD_DIM, HEAD_DIM
        if low_rank_q:   # MFA: q = wq(inter_norm(q_proj(x)))
            self.q_proj = nn.Linear(HIDDEN, SHARE_Q, bias=False)
            self.inter_norm = RMSNorm(SHARE_Q, 1e-5)
            self.wq = nn.Linear(SHARE_Q, HEADS * HEAD_DIM, bias=False)
        else:
            self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(HIDDEN, kv_heads * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(HIDDEN, kv_heads * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        B = x.shape[0]
        p = torch.full((B,), pos, dtype=torch.int64, device=x.device)
        q = self.wq(self.inter_norm(self.q_proj(x))) if self.low_rank_q else self.q(x)
        q = self.rope(q.view(B, HEADS, HEAD_DIM), p)
        k = self.rope(self.k_proj(x).view(B, self.kv_heads, HEAD_DIM), p)
        self.k[:, :, pos] = k
        self.v[:, :, pos] = self.v_proj(x).view(B, self.kv_heads, HEAD_DIM)
        o = _grouped_sdpa(q, self.k[:, :, :pos + 1], self.v[:, :, :pos + 1], 1 / math.sqrt(HEAD_DIM))
        return self.o_proj(o.reshape(B, -1))


class MLALayer(_Contiguous):
    """Absorbed MLA decode: scores and values computed against the cached latent."""

    def __init__(self):
        super().__init__()
        self.cache_heads, self.cache_width, self.value_width = 1, MLA_LORA + MLA_ROPE, 0
        self.q = nn.Linear(HIDDEN, HEADS * (MLA_NOPE + MLA_ROPE), bias=False)
        self.kv_a = nn.Linear(HIDDEN, MLA_LORA + MLA_ROPE, bias=False)
        self.kv_norm = RMSNorm(MLA_LORA, 1e-5)
        s = 1 / math.sqrt(MLA_LORA)
        self.w_uk = nn.Parameter(torch.randn(HEADS, MLA_NOPE, MLA_LORA) * s)   # kv_b, key half
        self.w_uv = nn.Parameter(torch.randn(HEADS, MLA_LORA, MLA_V) * s)      # kv_b, value half
        self.o_proj = nn.Linear(HEADS * MLA_V, HIDDEN, bias=False)
        self.rope_dim, self.rope_theta = MLA_ROPE, 10000.0

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        B = x.shape[0]
        p = torch.full((B,), pos, dtype=torch.int64, device=x.device)
        q = self.q(x).view(B, HEADS, MLA_NOPE + MLA_ROPE)
        q_nope, q_rope = q.split([MLA_NOPE, MLA_ROPE], -1)
        q_lat = torch.einsum("bhn,hnl->bhl", q_nope, self.w_uk)              # absorb W_UK
        q_all = torch.cat([q_lat, self.rope(q_rope, p)], -1)                  # [B, 16, 576]
        kv = self.kv_a(x)
        lat, kr = kv.split([MLA_LORA, MLA_ROPE], -1)
        self.k[:, 0, pos] = torch.cat([self.kv_norm(lat), self.rope(kr.unsqueeze(1), p).squeeze(1)], -1)
        cache = self.k[:, :, :pos + 1]                                        # [B, 1, L, 576]
        o_lat = _grouped_sdpa(q_all, cache, cache[..., :MLA_LORA], 1 / math.sqrt(MLA_NOPE + MLA_ROPE))
        o = torch.einsum("bhl,hlv->bhv", o_lat, self.w_uv)                    # apply W_UV
        return self.o_proj(o.reshape(B, -1))


class PagedMFA(nn.Module):
    """afdserve's MFAttention over its paged KVCache (one layer), metadata built once per step."""

    def __init__(self):
        super().__init__()
        from afdserve.config import get_preset
        from afdserve.model.attention import MFAttention
        self.config = get_preset("small")
        self.attn = MFAttention(self.config)

    def allocate(self, batch: int, max_len: int, dtype, device) -> None:
        from afdserve.model.attention import AttentionMetadata, KVCache
        bs = 16
        self.rope = RotaryEmbedding(HEAD_DIM, 500000.0, max_len + 1).to(device)
        per_seq = math.ceil(max_len / bs)
        self.kv = KVCache(1, batch * per_seq, bs, 1, HEAD_DIM, dtype, device)
        self.tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(batch)]
        self._meta_for = None
        self._build = lambda pos: AttentionMetadata.build(
            [pos] * batch, [t[pos // bs] * bs + pos % bs for t in self.tables], [1] * batch,
            [pos + 1] * batch, self.tables, bs, device=device)

    def forward(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        if self._meta_for != pos:
            self._meta, self._meta_for = self._build(pos), pos
        return self.attn(x, self.rope, self._meta, self.kv.k[0], self.kv.v[0])


def make_layer(design: str) -> nn.Module:
    if design == "mfa":
        return PagedMFA()
    if design == "mfa-contiguous":
        return GQALayer(kv_heads=1, low_rank_q=True)
    if design == "gqa":
        return GQALayer(kv_heads=GQA_KV_HEADS)
    if design == "mla":
        return MLALayer()
    raise ValueError(f"unknown attention design {design!r}")


def cost_arch(design: str):
    """The cost model's description of one layer of `design` (afdserve.cost.arch.ModelArch)."""
    from afdserve.cost.arch import ModelArch
    common = dict(num_layers=1, hidden_size=HIDDEN, vocab_size=1, num_q_heads=HEADS, head_dim=HEAD_DIM,
                  dense_width=1)
    if design in ("mfa", "mfa-contiguous"):
        return ModelArch(name=design, attention="mfa", num_kv_heads=1, share_q_dim=SHARE_Q, **common)
    if design == "gqa":
        return ModelArch(name=design, attention="gqa", num_kv_heads=GQA_KV_HEADS, **common)
    return ModelArch(name=design, attention="mla", num_kv_heads=HEADS, kv_lora_rank=MLA_LORA,
                     qk_rope_head_dim=MLA_ROPE, qk_nope_head_dim=MLA_NOPE, v_head_dim=MLA_V, **common)


def predict(design: str, batch: int, context: int, elem: int, bandwidth: float, matmul: float) -> dict:
    """Cost-model roofline time of one decode step of one layer: max(FLOPs/F, bytes/BW)."""
    from afdserve.cost.analysis import Precision, per_token_work
    arch = cost_arch(design)
    w = per_token_work(arch, context, Precision(weight_bytes=elem, kv_bytes=elem, compute="bf16"))
    flops = batch * (w.attention_flops + w.linear_flops)
    nbytes = batch * w.kv_bytes + arch.attention_params_total() * elem
    return {"flops": flops, "bytes": nbytes, "kv_bytes": batch * w.kv_bytes,
            "arithmetic_intensity": w.attention_flops / w.kv_bytes if w.kv_bytes else float("inf"),
            "kv_elems_per_token": arch.kv_elems_per_layer,
            "predicted_s": max(flops / matmul, nbytes / bandwidth),
            "bound": "memory" if nbytes / bandwidth >= flops / matmul else "compute"}


@torch.inference_mode()
def time_layer(design: str, batch: int, context: int, repeats: int = 10, dtype=torch.float32,
               device: str = "cpu", seed: int = 0) -> float:
    """Median seconds of one decode step of one layer at `context` (KV of `context` + the new token)."""
    torch.manual_seed(seed)
    layer = make_layer(design).to(device=device, dtype=dtype).eval()
    layer.allocate(batch, context + 1, dtype, device)    # also builds the fp32 RoPE tables
    x = torch.randn(batch, HIDDEN, dtype=dtype, device=device)
    for _ in range(2):
        layer(x, context)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        layer(x, context)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(batch: int, contexts: list[int], bandwidth: float, matmul: float, dtype=torch.float32,
            device: str = "cpu", repeats: int = 10, designs=DESIGNS) -> list[dict]:
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for ctx in contexts:
        for d in designs:
            t = time_layer(d, batch, ctx, repeats, dtype, device)
            p = predict(d, batch, ctx, elem, bandwidth, matmul)
            rows.append({"design": d, "batch": batch, "context": ctx, "step_s": t, **p,
                         "efficiency": p["predicted_s"] / t})
    return rows
