"""The peer: Hugging Face transformers `generate` on an equivalent standard MoE model.

`Qwen3MoeForCausalLM` built from a config matched to a Step-3 config: same hidden size, layers,
vocabulary, dense layers (`mlp_only_layers`) of the same width, 16 query heads x 128 over ONE
KV head (MQA: 2 x 128 = 256 cached elements per token per layer, MFA's KV size), and
top-(k + shared/expert width) routed experts of the same width so that the active FFN width per
token equals ours (Step-3 small: 3 x 512 routed + 512 shared = 4 x 512). Random weights.
Differences (q/k norm, full-rank query, no shared expert) are listed in benchmarks/README.md.

Decode-only time, with the statistic the engine's figures use: the KV cache is pre-filled
(zeros, like the engine's synthetic prefill) with C tokens, `generate` is given C + 1 tokens (so
its first forward is a single-token step) and asked for N + 1 new tokens; a stopping criterion
that never stops records the time each token is produced, so the N gaps between consecutive
tokens are N decode steps (forward, logits processing, sampling, cache update), without the
set-up of the call. The step time is the median of those N gaps, as `decode.measure_decode`
takes the median of its N timed steps; the call is repeated (`repeats`) and the median of the
runs' medians is reported with their spread.
"""
from __future__ import annotations

import statistics
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


def _criterion_base():
    try:
        from transformers import StoppingCriteria
        return StoppingCriteria
    except Exception:               # a duck-typed model (tests): any callable criterion will do
        return object


class _StepClock(_criterion_base()):
    """A stopping criterion that never stops: it records when each new token exists."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def measure_peer(model, batch: int, context: int, steps: int = 8, repeats: int = 3, seed: int = 0) -> dict:
    """Decode time per step of `model.generate` (greedy, use_cache) for `batch` x `context`: the
    median over `steps` decode steps of each of `repeats` runs, then the median over runs."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (batch, context + 1), generator=g).to(dev)
    mask = torch.ones_like(ids)
    cache = _prefilled_cache(model, batch, context)

    def run(n: int) -> list[float]:
        extra = cache.get_seq_length() - context
        if extra > 0:
            cache.crop(-extra)   # back to the pre-filled context (negative: tokens to remove)
        clock = _StepClock(dev)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # `past_key_values` renamed in 5.x
            model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0,
                           stopping_criteria=[clock])
        if len(clock.stamps) != n:
            raise RuntimeError(f"the peer's generate produced {len(clock.stamps)} of {n} tokens")
        return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]

    run(2)  # warm-up
    medians = [statistics.median(run(steps + 1)) for _ in range(max(1, repeats))]
    step_s = statistics.median(medians)
    del cache
    return {"batch": batch, "context": context, "steps": steps, "repeats": len(medians),
            "run_medians_s": medians, "step_s": step_s, "tpot_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
            "method": f"median of {len(medians)} runs' medians over {steps} decode steps (time between "
                      "consecutive tokens of generate, pre-filled DynamicCache)"}
