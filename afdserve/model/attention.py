"""MFA (Multi-Matrix Factorization Attention) over a paged KV cache, and its naive reference.

MFA: q = wq(inter_norm(q_proj(x))) gives n_q wide heads from a low-rank query; k_proj and v_proj
give ONE key head and ONE value head (num_attention_groups = 1) shared by every query head.
With one KV head, the n_q heads of a token are n_q queries against the same keys, so a decode
step is one [n_q, d] x [d, ctx] matmul per sequence.

Shapes: T = new tokens in the flattened batch, S = sequences, n_q query heads, g KV heads,
d head dim, bs block size.

The cache is in the run's dtype, or in 8 bits (`kv_cache_dtype="fp8"`: float8_e4m3fn, a
per-tensor scale, docs/fp8.md): new K/V are rounded to e4m3 when written (`write_kv`), and every
read widens them back (`dequantize_kv`; the native decode kernel in registers), so prefill,
chunked prefill and decode all attend over the same rounded values.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from afdserve.config import KV_CACHE_DTYPES, Step3Config
from afdserve.model.kernels import (decode_attention_runner, linear, native_causal_softmax, native_decode_attention,
                                    native_scores, native_write_kv)
from afdserve.model.layers import RMSNorm, RotaryEmbedding


FP8_KV = torch.float8_e4m3fn
FP8_MAX = 448.0               # largest finite e4m3 value: K/V are clamped to +-FP8_MAX x scale
FP8_KV_SCALES = (1.0, 1.0)    # (keys, values): the per-tensor scale of an fp8 cache (not calibrated)


def kv_cache_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The cache dtype `kv_cache_dtype` names for a run in `dtype`; ValueError for other names."""
    if name == "auto":
        return dtype
    if name == "fp8":
        return FP8_KV
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}")


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, scales: tuple[float, float] = FP8_KV_SCALES) -> None:
    """Write new tokens' K/V [T, g, d] into cache slots [T]; an fp8 cache stores
    clamp(x / scale, +-448) rounded to nearest e4m3 (index_copy_ on its bytes: torch has no
    float8 index_copy_ on the CPU)."""
    if k_cache.dtype is not FP8_KV:
        if not native_write_kv(k_cache, v_cache, slots, k, v):      # (one native call, or two index_copy_)
            k_cache.index_copy_(0, slots, k)
            v_cache.index_copy_(0, slots, v)
        return
    for cache, x, scale in ((k_cache, k, scales[0]), (v_cache, v, scales[1])):
        x = x if scale == 1.0 else x / scale
        cache.view(torch.uint8).index_copy_(0, slots, x.clamp(-FP8_MAX, FP8_MAX).to(FP8_KV).view(torch.uint8))


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """K or V read from the cache, in the queries' dtype (the tensor itself unless fp8)."""
    if x.dtype is not FP8_KV:
        return x
    x = x.to(dtype)
    return x if scale == 1.0 else x * scale


class KVCache:
    """Paged K/V storage: per layer, `k[layer]` is `[num_blocks * block_size, g, d]` (flat slots).

    A token at position p of a sequence lives in slot `block_table[p // bs] * bs + p % bs`.
    `dtype` is the run's dtype or float8_e4m3fn (an 8-bit cache, written by `write_kv`).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class AttentionMetadata:
    """Where each new token sits and what each sequence attends to, built once per step.

    Sequences appear in the flattened batch in order; sequence s owns `query_lens[s]` new
    tokens and, after this step, `context_lens[s]` tokens of KV (cached + new). `context_slots`
    and `context_mask` (what the gathering paths read; the native decode kernel reads the block
    tables) are made on first use.
    """

    positions: torch.Tensor        # [T] int64
    slot_mapping: torch.Tensor     # [T] int64: cache slot each new token's K/V is written to
    query_lens: list[int]          # [S]
    context_lens: list[int]        # [S]
    block_tables: torch.Tensor     # [S, max_blocks] int64 (padded with 0)
    block_size: int

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @functools.cached_property
    def context_lens_tensor(self) -> torch.Tensor:
        """context_lens as a CPU int64 tensor (the native decode kernel's argument)."""
        return torch.tensor(self.context_lens, dtype=torch.int64)

    @functools.cached_property
    def context_slots(self) -> torch.Tensor:
        """[S, max_ctx] int64: slots of positions 0..ctx-1 (padded with block 0's slots)."""
        tables = self.block_tables
        offsets = torch.arange(self.block_size, dtype=torch.int64, device=tables.device)
        slots = (tables.unsqueeze(-1) * self.block_size + offsets).reshape(tables.shape[0], -1)
        return slots[:, :max(self.context_lens, default=0)]

    @functools.cached_property
    def context_mask(self) -> torch.Tensor:
        """[S, max_ctx] bool: True where the slot is a real token."""
        width = max(self.context_lens, default=0)
        lens = self.context_lens_tensor.to(self.block_tables.device)
        return torch.arange(width, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)

    @classmethod
    def build(cls, positions: list[int], slot_mapping: list[int], query_lens: list[int],
              context_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device | str = "cpu") -> "AttentionMetadata":
        max_blocks = max((len(b) for b in block_tables), default=0)
        table = np.zeros((len(block_tables), max_blocks), dtype=np.int64)   # ~5x torch's row by row
        for s, blocks in enumerate(block_tables):
            table[s, :len(blocks)] = blocks
        return cls(
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            query_lens=list(query_lens), context_lens=list(context_lens),
            block_tables=torch.from_numpy(table).to(device), block_size=block_size)

    def select(self, seqs: slice) -> "AttentionMetadata":
        """The metadata of a contiguous run of sequences (one micro-batch)."""
        tok0 = sum(self.query_lens[:seqs.start])
        tok1 = tok0 + sum(self.query_lens[seqs])
        ctx = self.context_lens[seqs]
        nblk = -(-max(ctx, default=0) // self.block_size)
        return AttentionMetadata(
            positions=self.positions[tok0:tok1], slot_mapping=self.slot_mapping[tok0:tok1],
            query_lens=self.query_lens[seqs], context_lens=ctx,
            block_tables=self.block_tables[seqs, :nblk], block_size=self.block_size)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float,
                    kv_scales: tuple[float, float] = FP8_KV_SCALES) -> torch.Tensor:
    """Causal attention of new queries over each sequence's cached K/V (new tokens included).

    q: [T, n_q, d]; k_cache, v_cache: [slots, g, d] (q's dtype, or fp8 with `kv_scales`) -> [T, n_q, d].
    """
    if meta.is_decode_only:
        return _decode_attention(q, k_cache, v_cache, meta, scale, kv_scales)
    out = torch.empty_like(q)
    tok = 0
    for s, (nq, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        slots = meta.context_slots[s, :ctx]
        k = dequantize_kv(k_cache[slots], q.dtype, kv_scales[0])
        v = dequantize_kv(v_cache[slots], q.dtype, kv_scales[1])
        out[tok:tok + nq] = _sequence_attention(q[tok:tok + nq], k, v, scale)
        tok += nq
    return out


def paged_decode_runner(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float, kv_scales: tuple[float, float] = FP8_KV_SCALES, *, out: torch.Tensor):
    """For decode graphs (engine/graphs.py): a callable(meta) -> bool that writes
    paged_attention(q, k_cache, v_cache, meta, scale, kv_scales) of a later decode step (its own
    metadata, the same tensors) into `out` through the native kernel, with the checks of these
    tensors done once here; False where the kernel does not apply then (the caller runs
    paged_attention). None where it does not apply to this step."""
    if not meta.is_decode_only:
        return None
    run = decode_attention_runner(q, k_cache, v_cache, meta.block_size, scale, kv_scales, out)
    return None if run is None else (lambda m: run(m.block_tables, m.context_lens_tensor))


def _group_queries(q: torch.Tensor, g: int) -> torch.Tensor:
    """[..., T, n_q, d] -> [..., g, T * n_q/g, d]: each KV head's queries as one row block."""
    *lead, t, nq, d = q.shape
    q = q.reshape(*lead, t, g, nq // g, d).movedim(-3, -4)
    return q.reshape(*lead, g, t * (nq // g), d)


def _ungroup(o: torch.Tensor, t: int, nq: int) -> torch.Tensor:
    """Inverse of _group_queries: [..., g, T * n_q/g, d] -> [..., T, n_q, d]."""
    *lead, g, _, d = o.shape
    o = o.reshape(*lead, g, t, nq // g, d).movedim(-4, -3)
    return o.reshape(*lead, t, nq, d)


class _GatherWorkspace(threading.local):
    """Reused destination buffers of the decode K/V gather, one set per thread.

    A decode step gathers every sequence's K and V once per layer (at batch 32 x context 4096 in
    fp32, 2 x 67 MB per layer). Allocating that afresh each time costs more than the copy itself:
    the allocator returns large blocks to the OS, so every layer page-faults the whole buffer
    back in. The buffers grow (with headroom, as contexts grow a token a step) and are kept.
    """

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            grown = numel if buf is None else max(numel, buf.numel() * 5 // 4)
            with torch.inference_mode(False):          # a normal tensor: writable in and out of it
                buf = self.buffers[key] = torch.empty(grown, dtype=dtype, device=device)
        return buf[:numel]


_workspace = _GatherWorkspace()


def _gather_blocks(cache: torch.Tensor, meta: AttentionMetadata, name: str) -> torch.Tensor:
    """[slots, g, d] -> [S, max_ctx, g, d]: each sequence's K or V, copied a whole block at a time.

    Without autograd the copy lands in the thread's reused buffer `name`: the result is only
    valid until the next gather of the same name.
    """
    S = meta.block_tables.shape[0]
    g, d = cache.shape[1:]
    blocks = cache.view(-1, meta.block_size * g * d)                 # [num_blocks, bs*g*d]
    index = meta.block_tables.reshape(-1)
    if not (torch.is_grad_enabled() and cache.requires_grad):
        buf = _workspace.get(name, index.numel() * blocks.shape[1], cache.dtype, cache.device)
        out = torch.index_select(blocks, 0, index, out=buf.view(index.numel(), blocks.shape[1]))
    else:
        out = blocks.index_select(0, index)
    return out.view(S, -1, g, d)[:, :meta.context_mask.shape[1]]


def _decode_attention(q, k_cache, v_cache, meta, scale, kv_scales=FP8_KV_SCALES):
    out = native_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens_tensor,
                                  meta.block_size, scale, kv_scales)
    return out if out is not None else _gathered_decode_attention(q, k_cache, v_cache, meta, scale, kv_scales)


def _gathered_decode_attention(q, k_cache, v_cache, meta, scale, kv_scales=FP8_KV_SCALES):
    # One new token per sequence: gather each sequence's K/V ([S, ctx, g, d]) block by block and
    # attend with a padding mask; the n_q heads sharing a KV head become rows of one matmul. An
    # fp8 cache is gathered in 8 bits and widened to q's dtype after.
    S, nq, d = q.shape
    g = k_cache.shape[1]
    k = dequantize_kv(_gather_blocks(k_cache, meta, "k"), q.dtype, kv_scales[0]).transpose(1, 2)   # [S, g, ctx, d]
    v = dequantize_kv(_gather_blocks(v_cache, meta, "v"), q.dtype, kv_scales[1]).transpose(1, 2)
    qg = _group_queries(q.unsqueeze(1), g)                       # [S, g, n_q/g, d]
    # [S, 1, 1, ctx]; none needed when every sequence has the same context length
    mask = None if min(meta.context_lens) == max(meta.context_lens) else meta.context_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return _ungroup(o, 1, nq).squeeze(1)


PROMPT_BLOCK = 128           # query positions per block of the native causal attention ...
PROMPT_SCORES = 1 << 22      # ... fewer where a block's scores would pass this many (16 MiB fp32)


def _mfa_causal_attention(q, k, v, scale):
    """Causal attention of the last t positions of a sequence (a whole prompt, or a later chunk of
    one) over ONE KV head (MFA), block by block of query positions: the scores of a block (all its
    heads as rows) against the keys up to the block's last position in one native GEMM with fp32
    outputs, one native pass of causal softmax in fp32 whose probabilities are rounded to bf16,
    then one GEMM with V (torch's). Scores and probabilities live in the thread's reused buffers
    (fresh multi-MB tensors per block page-fault every time). None where the native kernels are
    not available (then SDPA). q [t, n_q, d]; k, v [ctx, 1, d]."""
    t, nq, d = q.shape
    ctx = k.shape[0]
    if k.shape[1] != 1 or q.dtype is not torch.bfloat16 or torch.is_grad_enabled():
        return None
    keys, values, off = k[:, 0], v[:, 0], ctx - t                    # query i is position off + i
    B = max(1, min(PROMPT_BLOCK, t, PROMPT_SCORES // (nq * ctx)))
    out = torch.empty_like(q)
    scores_buf = _workspace.get("scores", B * nq * ctx, torch.float32, q.device)
    probs_buf = _workspace.get("probs", B * nq * ctx, torch.bfloat16, q.device)
    for s in range(0, t, B):
        e = min(t, s + B)
        rows, seen = (e - s) * nq, off + e
        scores = native_scores(q[s:e].reshape(rows, d), keys[:seen], scores_buf[:rows * seen].view(rows, seen))
        if scores is None:
            return None
        probs = native_causal_softmax(scores, scale, nq, off + s, probs_buf[:rows * seen].view(rows, seen))
        torch.mm(probs, values[:seen], out=out[s:e].view(rows, d))
    return out


def _sequence_attention(q, k, v, scale):
    # q [t, n_q, d] are the last t positions of a sequence whose K/V are k, v [ctx, g, d].
    t, nq, d = q.shape
    ctx, g, _ = k.shape
    o = _mfa_causal_attention(q, k, v, scale)
    if o is not None:
        return o
    if t == ctx:
        # A whole prompt: heads as the batch (K/V broadcast to the query heads, a view) and
        # is_causal, which torch's fused CPU kernel takes (an explicit mask falls back to its
        # unfused math path, ~9x slower at 1024 tokens).
        def per_head(x):        # [ctx, g, d] -> [1, nq, ctx, d], query head h reads KV head h // (nq / g)
            return x.transpose(0, 1).unsqueeze(1).expand(g, nq // g, ctx, d).reshape(1, nq, ctx, d)
        o = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), per_head(k), per_head(v),
                                           is_causal=True, scale=scale)
        return o[0].transpose(0, 1)
    qg = _group_queries(q, g)                                    # [g, t*n_q/g, d]
    qpos = torch.arange(ctx - t, ctx, device=q.device).repeat_interleave(nq // g)
    mask = torch.arange(ctx, device=q.device).unsqueeze(0) <= qpos.unsqueeze(1)   # [t*n_q/g, ctx]
    o = F.scaled_dot_product_attention(qg, k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return _ungroup(o, t, nq)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference: q [t, n_q, d] are the last t positions of a sequence with K/V [ctx, g, d].

    Loops over tokens and heads with an explicit fp32 softmax; slow and obviously right.
    """
    t, nq, d = q.shape
    ctx, g, _ = k.shape
    out = torch.empty_like(q)
    for i in range(t):
        pos = ctx - t + i
        for h in range(nq):
            kv = h // (nq // g)
            scores = (k[:pos + 1, kv].float() @ q[i, h].float()) * scale
            probs = torch.softmax(scores, dim=0)
            out[i, h] = (probs @ v[:pos + 1, kv].float()).to(q.dtype)
    return out


class MFAttention(nn.Module):
    """The `self_attn` block; parameter names equal the checkpoint's."""

    qkv_a: torch.Tensor | None = None     # fused [q_proj; k_proj; v_proj], set by prepare_for_decode

    def __init__(self, config: Step3Config):
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_groups
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.q_proj = nn.Linear(H, config.share_q_dim, bias=False)
        self.inter_norm = RMSNorm(config.share_q_dim, config.rms_norm_eps)
        self.wq = nn.Linear(config.share_q_dim, config.q_width, bias=False)
        self.k_proj = nn.Linear(H, config.kv_width, bias=False)
        self.v_proj = nn.Linear(H, config.kv_width, bias=False)
        self.o_proj = nn.Linear(config.q_width, H, bias=False)

    def qkv(self, x: torch.Tensor, rope: RotaryEmbedding, positions: torch.Tensor):
        """x [T, H] -> q [T, n_q, d], k, v [T, g, d], RoPE applied to q and k."""
        T = x.shape[0]
        if self.qkv_a is None:
            q_low, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv = self.num_kv_heads * self.head_dim
            q_low, k, v = linear(x, self.qkv_a).split([self.q_proj.out_features, kv, kv], dim=-1)
        q = linear(self.inter_norm(q_low), self.wq.weight).view(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        return rope(q, positions), rope(k, positions), v

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]; writes the new tokens' K/V into the cache first (rounded to e4m3 in
        an fp8 cache, at the default scales; attention then reads them back from the cache)."""
        q, k, v = self.qkv(x, rope, meta.positions)
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale)
        return linear(o.reshape(x.shape[0], -1), self.o_proj.weight)
