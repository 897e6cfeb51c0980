"""The Step-3 text model, built as attention halves and FFN halves.

Every decoder layer is two halves callable separately:
  attention half (attention side): h = h + o_proj(MFA(input_layernorm(h)))
  FFN input      (attention side): x = post_attention_layernorm(h); router top-k for MoE layers
  FFN half       (FFN side):       y = dense SwiGLU(x), or sum_j w_j expert_j(x) + shared_expert(x)
  residual       (attention side): h = h + y
so Attention-FFN Disaggregation only moves x (+ routing) one way and y back. A model built with
`role="attention"` or `role="ffn"` holds only that side's parameters; an FFN shard holds a
contiguous slice of the experts and of the dense/shared intermediate dims, and its outputs are
partial sums that the attention side adds up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from afdserve.config import Step3Config
from afdserve.engine.schedule import LocalFFN, run_layers
from afdserve.model.attention import AttentionMetadata, KVCache, MFAttention
from afdserve.model.kernels import linear, native_moe, residual_add
from afdserve.model.layers import MoE, RMSNorm, RotaryEmbedding, SwiGLU

Role = Literal["full", "attention", "ffn"]


@dataclass(frozen=True)
class FFNShard:
    """Which part of every FFN this worker owns: shard `rank` of `world` contiguous slices."""

    rank: int = 0
    world: int = 1

    def split(self, n: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)


@dataclass
class FFNInput:
    """What the attention side hands an FFN half: normed hidden states and the routing."""

    x: torch.Tensor                        # [T, H]
    weights: torch.Tensor | None = None    # [T, k] fp32 (MoE layers)
    ids: torch.Tensor | None = None        # [T, k] int64 global expert ids (MoE layers)


class Step3DecoderLayer(nn.Module):
    def __init__(self, config: Step3Config, layer_id: int, role: Role, shard: FFNShard):
        super().__init__()
        H = config.hidden_size
        self.layer_id = layer_id
        self.is_moe = config.is_moe_layer(layer_id)
        attn_side, ffn_side = role in ("full", "attention"), role in ("full", "ffn")
        if attn_side:
            self.input_layernorm = RMSNorm(H, config.rms_norm_eps)
            self.self_attn = MFAttention(config)
            self.post_attention_layernorm = RMSNorm(H, config.rms_norm_eps)
        if self.is_moe:
            experts = shard.split(config.moe_num_experts) if ffn_side else None
            if attn_side or ffn_side:
                self.moe = MoE(H, config.moe_intermediate_size, config.moe_num_experts, config.moe_top_k,
                               config.norm_expert_weight, router=attn_side, experts=experts)
            if ffn_side and config.share_expert_dim:
                a, b = shard.split(config.share_expert_dim)
                self.share_expert = SwiGLU(H, b - a)
        elif ffn_side:
            a, b = shard.split(config.intermediate_size)
            self.mlp = SwiGLU(H, b - a)

    def attention_half(self, h: torch.Tensor, rope: RotaryEmbedding, meta: AttentionMetadata,
                       k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return residual_add(h, self.self_attn(self.input_layernorm(h), rope, meta, k_cache, v_cache))

    def ffn_input(self, h: torch.Tensor) -> FFNInput:
        x = self.post_attention_layernorm(h)
        if not self.is_moe:
            return FFNInput(x)
        weights, ids = self.moe.route(x)
        return FFNInput(x, weights, ids)

    def ffn_half(self, inp: FFNInput) -> torch.Tensor:
        """FFN output (a partial sum when this module holds one shard); no residual."""
        if not self.is_moe:
            return self.mlp(inp.x)
        y = self._native_ffn(inp)
        if y is not None:
            return y
        y = self.moe(inp.x, inp.weights, inp.ids)
        if hasattr(self, "share_expert"):
            y = y + self.share_expert(inp.x)
        return y

    def _native_ffn(self, inp: FFNInput) -> torch.Tensor | None:
        """The MoE half (routed + shared experts) in one native call where the kernel policy takes
        it (bf16 activations over bf16 or FP8 experts, afdserve/native/moe.c; bitwise the modules'
        result), else None."""
        moe, se = self.moe, getattr(self, "share_expert", None)
        if moe.gate_up is None or (se is not None and se.gate_up is None):
            return None
        shared = (se.gate_up, se.down_proj.weight) if se is not None else None
        return native_moe(inp.x, inp.weights, inp.ids, moe.gate_up, moe.down_proj.weight, moe.first, shared)


class Step3Model(nn.Module):
    def __init__(self, config: Step3Config, role: Role, shard: FFNShard):
        super().__init__()
        if role != "ffn":
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layers = nn.ModuleList(Step3DecoderLayer(config, i, role, shard)
                                    for i in range(config.num_hidden_layers))


class Step3ForCausalLM(nn.Module):
    """Parameter names equal the HF checkpoint names (`model.layers.0.self_attn.q_proj.weight`, ...)."""

    def __init__(self, config: Step3Config, role: Role = "full", shard: FFNShard = FFNShard()):
        super().__init__()
        if role not in ("full", "attention", "ffn"):
            raise ValueError(f"unknown role {role!r}")
        self.config, self.role, self.shard = config, role, shard
        self.model = Step3Model(config, role, shard)
        if role != "ffn":
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope: RotaryEmbedding | None = None
        self.lm_head_packed: torch.Tensor | None = None   # set by prepare_for_decode on CPU

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def init_rope(self, device: torch.device | str = "cpu") -> None:
        c = self.config
        # Tables are built for the context actually served, not the 64K of the release.
        self.rope = RotaryEmbedding(c.head_dim, c.rope_theta, c.max_position_embedding).to(device)

    # ------------------------------------------------------------ colocated forward
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """Colocated forward of the flattened batch: ids [T] -> hidden states [T, H] (pre-norm).

        One micro-batch through the shared layer schedule, FFN halves in-process."""
        def attend(i: int, j: int, h: torch.Tensor) -> torch.Tensor:
            return self.layers[i].attention_half(h, self.rope, meta, kv.k[i], kv.v[i])

        return run_layers(self.layers, [self.embed(input_ids)], attend, LocalFFN(self))[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head for the selected hidden states [n, H] -> fp32 logits [n, V]."""
        return linear(self.model.norm(h), self.lm_head.weight, self.lm_head_packed).float()

    # ------------------------------------------------------------------ loading
    def shard_slices(self) -> dict[str, tuple[int, int, int]]:
        """Checkpoint name -> (dim, start, stop) for the parameters this shard holds a slice of."""
        c, out = self.config, {}
        if self.role == "attention" or self.shard.world == 1:
            return out
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            if c.is_moe_layer(i):
                a, b = self.shard.split(c.moe_num_experts)
                for n in ("gate_proj", "up_proj", "down_proj"):
                    out[f"{p}moe.{n}.weight"] = (0, a, b)
                mlp, width = f"{p}share_expert.", c.share_expert_dim
            else:
                mlp, width = f"{p}mlp.", c.intermediate_size
            if width:
                a, b = self.shard.split(width)
                out[f"{mlp}gate_proj.weight"] = (0, a, b)
                out[f"{mlp}up_proj.weight"] = (0, a, b)
                out[f"{mlp}down_proj.weight"] = (1, a, b)
        return out


def checkpoint_shapes(config: Step3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete Step-3 text checkpoint holds, with its shape (HF names, stacked experts)."""
    c, H = config, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, H),
                                          "model.norm.weight": (H,), "lm_head.weight": (c.vocab_size, H)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (c.share_q_dim, H),
            p + "self_attn.inter_norm.weight": (c.share_q_dim,),
            p + "self_attn.wq.weight": (c.q_width, c.share_q_dim),
            p + "self_attn.k_proj.weight": (c.kv_width, H),
            p + "self_attn.v_proj.weight": (c.kv_width, H),
            p + "self_attn.o_proj.weight": (H, c.q_width),
        })
        if c.is_moe_layer(i):
            E, W = c.moe_num_experts, c.moe_intermediate_size
            shapes.update({p + "moe.gate.weight": (E, H), p + "moe.gate_proj.weight": (E, W, H),
                           p + "moe.up_proj.weight": (E, W, H), p + "moe.down_proj.weight": (E, H, W)})
            mlp, width = p + "share_expert.", c.share_expert_dim
        else:
            mlp, width = p + "mlp.", c.intermediate_size
        if width:
            shapes.update({mlp + "gate_proj.weight": (width, H), mlp + "up_proj.weight": (width, H),
                           mlp + "down_proj.weight": (H, width)})
    return shapes
