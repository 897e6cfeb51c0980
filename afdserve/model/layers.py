"""Building blocks of the Step-3 model: RMSNorm, RoPE, SwiGLU and the MoE FFN.

Pure tensor math: nothing here knows about processes, caches or networks.
Shapes: T = tokens in the (flattened) batch, H = hidden size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afdserve.model.kernels import linear, native_moe, native_rms_norm, native_rope, native_route, native_silu_mul


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), computed in fp32, cast back, then scaled by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)   # same math, one kernel
        y = native_rms_norm(x, self.weight, self.eps)                          # same math, one pass
        if y is not None:
            return y
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """Rotate-half ("NeoX") RoPE over the full head dim: freqs theta^(-2i/d), cos/sin = cat(f, f)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos().float(), persistent=False)  # [P, d]
        self.register_buffer("sin", emb.sin().float(), persistent=False)
        self._positions: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] = (self.cos[:0], self.sin[:0])

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, d], positions: [T] -> rotated x, same dtype."""
        y = native_rope(x, positions, self.cos, self.sin)         # the same operations, one pass
        if y is not None:
            return y
        if positions is not self._positions:
            # Every layer (q and k) of a step rotates by the same positions: look them up once.
            self._positions = positions
            self._cos_sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        cos, sin = self._cos_sin
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); used for dense FFNs and the shared expert.

    `width` may be a slice of the checkpoint's intermediate size when the FFN is split across
    workers (tensor parallel): each slice's output is a partial sum of the full output.
    """

    gate_up: torch.Tensor | None = None     # fused [2 * width, hidden], set by prepare_for_decode

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return linear(silu_mul(linear(x, self.gate_up)), self.down_proj.weight)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a fused [..., 2W] projection output."""
    y = native_silu_mul(gate_up)                                     # the same roundings, one pass
    if y is not None:
        return y
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then top-k. Returns (weights fp32 [T, k], ids int64 [T, k]).
    Natively (kernels.native_route) equal experts' ties go to the lower expert id."""
    routed = native_route(router_logits, top_k, renormalize)               # the same in one native call
    if routed is not None:
        return routed
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)     # widened inside: one operator
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


class StackedWeight(nn.Module):
    """Experts stacked along dim 0: `weight` is [E, out, in], as in the checkpoint."""

    def __init__(self, num: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))


class MoE(nn.Module):
    """The `moe` block: a router (`gate`) and stacked routed experts, either of which may be absent.

    In disaggregated execution the router runs on the attention side and the experts on the
    FFN side; an FFN worker may own only the experts [first, first + num_local).
    Parameter names equal the checkpoint's (`gate.weight`, stacked `gate_proj.weight`, ...).
    """

    gate_up: torch.Tensor | None = None     # fused [E_local, 2 * width, hidden], set by prepare_for_decode

    def __init__(self, hidden: int, width: int, num_experts: int, top_k: int, renormalize: bool,
                 router: bool = True, experts: tuple[int, int] | None = (0, None)):
        super().__init__()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        if router:
            self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.first, stop = (0, 0) if experts is None else experts
        stop = num_experts if stop is None else stop
        self.num_local = stop - self.first
        if experts is not None:
            self.gate_proj = StackedWeight(self.num_local, width, hidden)
            self.up_proj = StackedWeight(self.num_local, width, hidden)
            self.down_proj = StackedWeight(self.num_local, hidden, width)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights fp32 [T, k], global expert ids [T, k])."""
        return route(linear(x, self.gate.weight), self.top_k, self.renormalize)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert e applied to x [n, H]."""
        down = self.down_proj.weight[e]
        if self.gate_up is not None:
            return linear(silu_mul(linear(x, self.gate_up[e])), down)
        gate, up = self.gate_proj.weight[e], self.up_proj.weight[e]
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights [T, k] fp32; ids [T, k] -> weighted sum over this module's experts.

        Tokens are grouped by expert (one GEMM per expert hit), each (token, slot) result lands in
        its own row of a [T, k, H] buffer, and the k slots are summed in a fixed order, so which
        other tokens share the batch changes a token's output only through the GEMM kernel that
        an expert's row count selects (afdserve/model/kernels.py), i.e. in the last bits.
        """
        y = native_moe(x, weights, ids, self.gate_up, self.down_proj.weight, self.first) \
            if self.gate_up is not None else None                          # the same, in one native call
        if y is not None:
            return y
        T, k = ids.shape
        if T == 1:
            return self._forward_one(x, weights, ids)
        local = ids - self.first
        hit = ((local >= 0) & (local < self.num_local)).reshape(-1)
        rows = hit.nonzero().squeeze(1)                      # flat (token, slot) indices
        expert_out = x.new_zeros(T * k, x.shape[1])
        if rows.numel():
            flat_e = local.reshape(-1)[rows]
            order = torch.argsort(flat_e, stable=True)
            rows, flat_e = rows[order], flat_e[order]
            counts = torch.bincount(flat_e, minlength=self.num_local).tolist()
            tokens = rows // k
            start = 0
            for e, n in enumerate(counts):
                if n:
                    expert_out[rows[start:start + n]] = self.expert(e, x[tokens[start:start + n]])
                    start += n
        w = (weights * hit.view(T, k)).to(x.dtype).unsqueeze(-1)
        return (expert_out.view(T, k, -1) * w).sum(1)

    def _forward_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token (batch-1 decode): the same sum as `forward` (slots in order; a slot whose
        expert is not local adds nothing) without the grouping ops, ~half the kernel calls."""
        slots = [(j, e - self.first) for j, e in enumerate(ids[0].tolist()) if 0 <= e - self.first < self.num_local]
        if not slots:
            return x.new_zeros(x.shape)
        outs = torch.cat([self.expert(e, x) for _, e in slots])                   # [n, H]
        w = weights[0, [j for j, _ in slots]].to(x.dtype).unsqueeze(-1)
        return (outs * w).sum(0, keepdim=True)


def moe_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: MoE) -> torch.Tensor:
    """Slow, obviously-correct MoE: token by token, expert by expert. Used in tests."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j]) - experts.first
            if 0 <= e < experts.num_local:
                out[t] += experts.expert(e, x[t:t + 1])[0] * weights[t, j].to(x.dtype)
    return out
