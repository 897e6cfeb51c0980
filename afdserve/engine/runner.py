"""One attention worker's step: the model forward over a scheduled batch, then sampling.

The FFN half of every layer goes through an `FFNBackend`, which is where Attention-FFN
Disaggregation plugs in: colocated execution uses `LocalFFN` (the FFN half runs in-process, right
away); the disaggregated runtime supplies a backend that ships the micro-batch to FFN workers and
collects their partial sums. The order of the layer halves and micro-batches, shared with the
model's own forward and the FFN workers, is `afdserve.engine.schedule`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afdserve.engine.block_manager import cache_slot
from afdserve.engine.graphs import DecodeGraphs
from afdserve.engine.schedule import FFNBackend, LocalFFN, run_idle_layers, run_layers
from afdserve.model.attention import AttentionMetadata, KVCache
from afdserve.model.step3 import Step3ForCausalLM
from afdserve.sampling import Sample, SampleRequest, sample

__all__ = ["FFNBackend", "LocalFFN", "ModelRunner", "SeqWork", "StepInput", "split_micro_batches"]


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
                 micro_batches: int = 1, graphs: bool = True):
        if micro_batches < 1:
            raise ValueError("micro_batches must be >= 1")
        self.model, self.kv, self.micro_batches = model, kv, micro_batches
        self.ffn = ffn if ffn is not None else LocalFFN(model)
        self.device = kv.k.device
        # Decode steps replayed from recorded kernel calls (engine/graphs.py): colocated CPU only
        # (an FFN backend elsewhere is not a kernel call).
        local = ffn is None and micro_batches == 1 and self.device.type == "cpu"
        self.graphs = DecodeGraphs(self._all_logits, None if graphs else "off") if local else None

    def _metadata(self, step: StepInput) -> AttentionMetadata:
        bs = self.kv.block_size
        positions, slots = [], []
        for s in step.seqs:
            for p in range(s.start, s.start + len(s.token_ids)):
                positions.append(p)
                slots.append(cache_slot(s.block_table, p, bs))
        return AttentionMetadata.build(
            positions, slots, [len(s.token_ids) for s in step.seqs],
            [s.start + len(s.token_ids) for s in step.seqs], [s.block_table for s in step.seqs], bs,
            device=self.device)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> dict[str, Sample]:
        """Compute the step's tokens, then sample for the sequences that asked: request_id -> Sample."""
        if not step.seqs:   # lockstep: the FFN workers still expect every layer and micro-batch
            empty = torch.empty(0, self.model.config.hidden_size, dtype=self.kv.k.dtype, device=self.device)
            run_idle_layers(self.model.layers, empty, self.micro_batches, self.ffn)
            return {}
        ids = torch.tensor([t for s in step.seqs for t in s.token_ids], dtype=torch.int64, device=self.device)
        meta = self._metadata(step)
        if self.graphs is not None and all(len(s.token_ids) == 1 and s.sample is not None for s in step.seqs):
            logits = self.graphs.run(ids, meta)
            if logits is not None:
                return dict(zip([s.request_id for s in step.seqs], sample(logits.cpu(), [s.sample for s in step.seqs])))
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

    def _all_logits(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """fp32 logits of every token of a step (decode steps, where each sequence samples)."""
        return self.model.logits(self.forward(ids, meta))

    def forward(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """ids [T] -> final hidden states [T, H] (before the final norm)."""
        groups = split_micro_batches(meta.query_lens, self.micro_batches)
        metas = [meta.select(g) for g in groups]
        bounds = [0]
        for m in metas:
            bounds.append(bounds[-1] + len(m.positions))
        hs = [self.model.embed(ids[bounds[j]:bounds[j + 1]]) for j in range(len(groups))]
        kv, rope = self.kv, self.model.rope

        def attend(i: int, j: int, h: torch.Tensor) -> torch.Tensor:
            if not metas[j].query_lens:   # an empty micro-batch still goes to the FFN (lockstep)
                return h
            return self.model.layers[i].attention_half(h, rope, metas[j], kv.k[i], kv.v[i])

        return torch.cat(run_layers(self.model.layers, hs, attend, self.ffn))
