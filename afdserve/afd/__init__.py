"""Attention-FFN Disaggregation: attention and FFN halves of every layer in different workers."""
