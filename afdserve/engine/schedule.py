"""The layer schedule: in which order the halves of every layer run, for every execution mode.

One step walks the decoder layers with its tokens split into m micro-batches. Every attention
worker and every FFN worker walks the same sequence of (layer, micro-batch) pairs,
`layer_order(L, m)`:
    (0, 0), (0, 1), ..., (0, m-1), (1, 0), ..., (L-1, m-1)
On the attention side (`run_layers`), at pair (i, j):
    h_j += collect(i-1, j)           (the FFN output of the previous layer; skipped at i = 0)
    h_j  = attend(i, j, h_j)         (the attention half, with micro-batch j's KV and metadata)
    submit(i, j, layer_i.ffn_input(h_j))
and after the last pair, h_j += collect(L-1, j) for every j. So while the FFN works on
micro-batch j-1 of layer i, the attention side already computes micro-batch j.

Lockstep: an FFN worker serves every pair for every attention worker, so an attention worker with
nothing to compute still walks the whole order with empty micro-batches (`run_idle_layers`),
and a micro-batch that happens to be empty is submitted empty too. Nothing is ever skipped, so
the FFN side never needs to know who is idle.

How an FFN worker follows it (its loop lives in the AFD runtime): it learns m from the header of
pair (0, 0), then for every `(i, j)` in `layer_order(L, m)` receives pair (i, j) from every
attention worker, runs `layer_i.ffn_half` on the concatenated tokens (nothing when all are
empty) and sends each attention worker its rows back; a stop header ends the loop.

Plain Python: no torch import, so the model (`Step3ForCausalLM.forward`), the runner and the
workers can all use it without import cycles.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from afdserve.model.step3 import FFNInput


class FFNBackend(Protocol):
    """Where FFN halves run. `submit` may return before the result exists; `collect` waits for it."""

    def begin_step(self, num_micro_batches: int) -> None: ...
    def submit(self, layer: int, micro_batch: int, inp: "FFNInput") -> None: ...
    def collect(self, layer: int, micro_batch: int) -> "torch.Tensor": ...
    def end_step(self) -> None: ...


class LocalFFN:
    """Colocated execution: the FFN half runs in this process as soon as it is submitted."""

    def __init__(self, model):
        self.model = model
        self._results: dict[tuple[int, int], torch.Tensor] = {}

    def begin_step(self, num_micro_batches: int) -> None:
        self._results.clear()

    def submit(self, layer: int, micro_batch: int, inp: "FFNInput") -> None:
        self._results[(layer, micro_batch)] = self.model.layers[layer].ffn_half(inp)

    def collect(self, layer: int, micro_batch: int) -> "torch.Tensor":
        return self._results.pop((layer, micro_batch))

    def end_step(self) -> None:
        self._results.clear()


def layer_order(num_layers: int, num_micro_batches: int) -> Iterator[tuple[int, int]]:
    """The (layer, micro-batch) pairs of one step, in the order every worker handles them."""
    for i in range(num_layers):
        for j in range(num_micro_batches):
            yield i, j


Attend = Callable[[int, int, "torch.Tensor"], "torch.Tensor"]


def run_layers(layers: Sequence, hs: list["torch.Tensor"], attend: Attend, ffn: FFNBackend) -> list["torch.Tensor"]:
    """One step of the attention side over micro-batches `hs` (embedded hidden states, [T_j, H]).

    `attend(i, j, h)` is micro-batch j's attention half of layer i; returns the final hidden
    states (before the final norm), one tensor per micro-batch."""
    from afdserve.model.kernels import residual_add     # (torch: not imported with this module)

    hs = list(hs)
    ffn.begin_step(len(hs))
    for i, j in layer_order(len(layers), len(hs)):
        if i:
            hs[j] = residual_add(hs[j], ffn.collect(i - 1, j))
        hs[j] = attend(i, j, hs[j])
        ffn.submit(i, j, layers[i].ffn_input(hs[j]))
    for j in range(len(hs)):
        hs[j] = residual_add(hs[j], ffn.collect(len(layers) - 1, j))
    ffn.end_step()
    return hs


def run_idle_layers(layers: Sequence, empty: "torch.Tensor", num_micro_batches: int, ffn: FFNBackend) -> None:
    """A step with no tokens: walk the whole order with `empty` ([0, H]) micro-batches (lockstep)."""
    run_layers(layers, [empty] * num_micro_batches, _no_attention, ffn)


def _no_attention(i: int, j: int, h: "torch.Tensor") -> "torch.Tensor":
    return h
