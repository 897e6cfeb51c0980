"""One attention worker's step: the model forward over a scheduled batch, then sampling.

The layer loop lives here, not in the model, because this is where Attention-FFN
Disaggregation plugs in: the FFN half of every layer goes through an `FFNBackend`. Colocated
execution uses `LocalFFN` (the FFN half runs in-process, right away); the disaggregated runtime
supplies a backend that ships the micro-batch to FFN workers and collects their partial sums.

With m micro-batches the loop is ordered so that, at layer i, micro-batch j's attention runs
while the FFN works on micro-batch j-1 and the transfers of others are in flight:
    for layer i: for mb j: h_j += collect(i-1, j); h_j = attn_i(h_j); submit(i, j, ffn_input(h_j))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from afdserve.model.attention import AttentionMetadata, KVCache
from afdserve.model.step3 import FFNInput, Step3ForCausalLM
from afdserve.sampling import Sample, SampleRequest, sample


@dataclass
class SeqWork:
    """One sequence's share of a step: the tokens to compute and where their KV goes."""

    request_id: str
    token_ids: list[int]          # new tokens, positions start .. start + len - 1
    start: int
    block_table: list[int]
    sample: SampleRequest | None  # set when a token is sampled after this chunk


@dataclass
class StepInput:
    """What one attention worker computes in one engine step (picklable, no tensors)."""

    seqs: list[SeqWork]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


class FFNBackend(Protocol):
    """Where FFN halves run. `submit` may return before the result exists; `collect` waits for it."""

    def begin_step(self, num_micro_batches: int) -> None: ...
    def submit(self, layer: int, micro_batch: int, inp: FFNInput) -> None: ...
    def collect(self, layer: int, micro_batch: int) -> torch.Tensor: ...
    def end_step(self) -> None: ...


class LocalFFN:
    """Colocated execution: the FFN half runs in this process as soon as it is submitted."""

    def __init__(self, model: Step3ForCausalLM):
        self.model = model
        self._results: dict[tuple[int, int], torch.Tensor] = {}

    def begin_step(self, num_micro_batches: int) -> None:
        self._results.clear()

    def submit(self, layer: int, micro_batch: int, inp: FFNInput) -> None:
        self._results[(layer, micro_batch)] = self.model.layers[layer].ffn_half(inp)

    def collect(self, layer: int, micro_batch: int) -> torch.Tensor:
        return self._results.pop((layer, micro_batch))

    def end_step(self) -> None:
        self._results.clear()


def split_micro_batches(query_lens: list[int], m: int) -> list[slice]:
    """m contiguous groups of sequences with balanced token counts (groups may be empty)."""
    total = sum(query_lens)
    bounds, acc, s = [0], 0, 0
    for j in range(1, m):
        target = total * j / m
        while s < len(query_lens) and acc + query_lens[s] / 2 < target:
            acc += query_lens[s]
            s += 1
        bounds.append(max(s, bounds[-1]))
    bounds.append(len(query_lens))
    return [slice(bounds[j], bounds[j + 1]) for j in range(m)]


class ModelRunner:
    """Runs steps for the requests of one attention worker, which owns their KV cache."""

    def __init__(self, model: Step3ForCausalLM, kv: KVCache, ffn: FFNBackend | None = None,
                 micro_batches: int = 1):
        if micro_batches < 1:
            raise ValueError("micro_batches must be >= 1")
        self.model, self.kv, self.micro_batches = model, kv, micro_batches
        self.ffn = ffn if ffn is not None else LocalFFN(model)
        self.device = kv.k.device

    def _metadata(self, step: StepInput) -> AttentionMetadata:
        bs = self.kv.block_size
        positions, slots = [], []
        for s in step.seqs:
            for p in range(s.start, s.start + len(s.token_ids)):
                positions.append(p)
                slots.append(s.block_table[p // bs] * bs + p % bs)
        return AttentionMetadata.build(
            positions, slots, [len(s.token_ids) for s in step.seqs],
            [s.start + len(s.token_ids) for s in step.seqs], [s.block_table for s in step.seqs], bs,
            device=self.device)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> dict[str, Sample]:
        """Compute the step's tokens, then sample for the sequences that asked: request_id -> Sample."""
        if not step.seqs:
            self.ffn.begin_step(self.micro_batches)
            self._idle_layers()
            self.ffn.end_step()
            return {}
        ids = torch.tensor([t for s in step.seqs for t in s.token_ids], dtype=torch.int64, device=self.device)
        meta = self._metadata(step)
        h = self.forward(ids, meta)
        last, sel, rows, rids = 0, [], [], []
        for s in step.seqs:
            last += len(s.token_ids)
            if s.sample is not None:
                sel.append(last - 1)
                rows.append(s.sample)
                rids.append(s.request_id)
        if not sel:
            return {}
        logits = self.model.logits(h[torch.tensor(sel, device=self.device)])
        return dict(zip(rids, sample(logits.cpu(), rows)))

    def forward(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """ids [T] -> final hidden states [T, H] (before the final norm)."""
        groups = split_micro_batches(meta.query_lens, self.micro_batches)
        metas = [meta.select(g) for g in groups]
        bounds = [0]
        for m in metas:
            bounds.append(bounds[-1] + len(m.positions))
        hs = [self.model.embed(ids[bounds[j]:bounds[j + 1]]) for j in range(len(groups))]
        kv, rope = self.kv, self.model.rope
        self.ffn.begin_step(len(groups))
        for i, layer in enumerate(self.model.layers):
            for j, m in enumerate(metas):
                if i:
                    hs[j] = hs[j] + self.ffn.collect(i - 1, j)
                if m.query_lens:
                    hs[j] = layer.attention_half(hs[j], rope, m, kv.k[i], kv.v[i])
                self.ffn.submit(i, j, layer.ffn_input(hs[j]))
        last = len(self.model.layers) - 1
        for j in range(len(groups)):
            hs[j] = hs[j] + self.ffn.collect(last, j)
        self.ffn.end_step()
        return torch.cat(hs)

    def _idle_layers(self) -> None:
        """An empty step still walks every layer with empty micro-batches (keeps FFN peers in step)."""
        H = self.model.config.hidden_size
        dtype = self.kv.k.dtype
        empty = torch.empty(0, H, dtype=dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            for j in range(self.micro_batches):
                if i:
                    self.ffn.collect(i - 1, j)
                self.ffn.submit(i, j, layer.ffn_input(empty))
        for j in range(self.micro_batches):
            self.ffn.collect(len(self.model.layers) - 1, j)
