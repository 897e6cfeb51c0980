"""`afdserve bench`: decode performance against the machine's own limits and a peer.

One run measures the machine (memory bandwidth, matmul throughput), the decode throughput of
the engine over a batch x context grid with its roofline efficiency, a Hugging Face
transformers peer on the same workload, MFA vs GQA vs MLA attention layers next to the cost
model's prediction, and colocated vs AFD execution. See benchmarks/README.md.
"""
