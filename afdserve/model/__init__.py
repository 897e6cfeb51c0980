"""The Step-3 model: pure tensor math, no process or network code."""
from afdserve.model.attention import AttentionMetadata, KVCache, naive_attention, paged_attention
from afdserve.model.checkpoint import CheckpointError, init_checkpoint, load_model, save_checkpoint
from afdserve.model.step3 import FFNInput, FFNShard, Step3ForCausalLM

__all__ = ["AttentionMetadata", "KVCache", "naive_attention", "paged_attention", "CheckpointError",
           "init_checkpoint", "load_model", "save_checkpoint", "FFNInput", "FFNShard", "Step3ForCausalLM"]
