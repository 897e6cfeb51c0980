"""The peer: Hugging Face transformers `generate` on an equivalent standard MoE model.

`Qwen3MoeForCausalLM` built from a config matched to a Step-3 config: same hidden size, layers,
vocabulary, dense layers (`mlp_only_layers`) of the same width, 16 query heads x 128 over ONE
KV head (MQA: 2 x 128 = 256 cached elements per token per layer, MFA's KV size), and
top-(k + shared/expert width) routed experts of the same width so that the active FFN width per
token equals ours (Step-3 small: 3 x 512 routed + 512 shared = 4 x 512). Random weights.
Differences (q/k norm, full-rank query, no shared expert) are listed in benchmarks/README.md.

Decode-only time: the KV cache is pre-filled (zeros, like the engine's synthetic prefill) with
C tokens, `generate` is given C + 1 tokens (so its first forward is a single-token step), and
    t_decode = (T(N + 1 new tokens) - T(1 new token)) / N
removes the set-up, the first forward and the output handling common to both calls.
"""
from __future__ import annotations

import time
import warnings

import torch

from afdserve.config import Step3Config


def available() -> bool:
    try:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: F401
        return True
    except Exception:
        return False


def peer_config(c: Step3Config):
    from transformers import Qwen3MoeConfig
    dense = [i for i in range(c.num_hidden_layers) if not c.is_moe_layer(i)]
    W = c.moe_intermediate_size or c.intermediate_size
    shared_as_experts = round(c.share_expert_dim / W) if c.share_expert_dim else 0
    top_k = (c.moe_top_k + shared_as_experts) if c.moe_layers_enum else 1
    num_experts = max(c.moe_num_experts, top_k) if c.moe_layers_enum else 0
    cfg = Qwen3MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_attention_groups, head_dim=c.head_dim,
        moe_intermediate_size=W, num_experts=num_experts, num_experts_per_tok=top_k,
        decoder_sparse_step=1, mlp_only_layers=dense, norm_topk_prob=False,
        rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embedding, tie_word_embeddings=False,
        use_cache=True, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_peer(c: Step3Config, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    from transformers import Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    cfg = peer_config(c)
    model = Qwen3MoeForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return model


def peer_description(model) -> dict:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    H, W = cfg.hidden_size, cfg.moe_intermediate_size
    moe_layers = cfg.num_hidden_layers - len(cfg.mlp_only_layers)
    active = n - moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * 3 * H * W - cfg.vocab_size * H
    return {"architecture": type(model).__name__, "total_params": n, "active_params": active,
            "num_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "expert_width": W,
            "dense_layers": list(cfg.mlp_only_layers), "q_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "attn_implementation": getattr(cfg, "_attn_implementation", None)}


def _prefilled_cache(model, batch: int, context: int):
    from transformers import DynamicCache
    cfg = model.config
    p = next(model.parameters())
    cache = DynamicCache(config=cfg)
    shape = (batch, cfg.num_key_value_heads, context, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        cache.update(torch.zeros(shape, dtype=p.dtype, device=p.device),
                     torch.zeros(shape, dtype=p.dtype, device=p.device), i)
    return cache


def measure_peer(model, batch: int, context: int, steps: int = 8, repeats: int = 2, seed: int = 0) -> dict:
    """Decode-only time per step of `model.generate` (greedy, use_cache) for `batch` x `context`."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, context + 1), generator=g).to(dev)
    mask = torch.ones_like(ids)
    cache = _prefilled_cache(model, batch, context)

    def run(n: int) -> float:
        extra = cache.get_seq_length() - context
        if extra > 0:
            cache.crop(-extra)   # back to the pre-filled context (negative: tokens to remove)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # `past_key_values` renamed in 5.x
            model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if batch * context > 32768:
        repeats = 1          # large points: one run each (a step takes seconds on a CPU)
    run(1)  # warm-up
    t1 = min(run(1) for _ in range(repeats))
    tn = min(run(steps + 1) for _ in range(repeats))
    step_s = max(tn - t1, 1e-9) / steps
    del cache
    return {"batch": batch, "context": context, "steps": steps, "t_1_s": t1, "t_n_plus_1_s": tn,
            "step_s": step_s, "tpot_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
            "method": "(T(N+1) - T(1)) / N with a pre-filled DynamicCache"}
