"""xAyF topologies: x data-parallel attention workers and y FFN workers, and their ranks.

Ranks in the process group: attention workers 0..x-1 (rank 0 also hosts the rendezvous store),
FFN workers x..x+y-1. With y > 1 the FFN is sharded: experts split contiguously across FFN
workers (expert parallel) and the dense FFN / shared expert split by intermediate dim (tensor
parallel); every FFN worker returns a partial sum and the attention worker adds them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # torch stays out of the torch-free callers (the simulator's CLI)
    from afdserve.model.step3 import FFNShard

_PATTERN = re.compile(r"\s*([0-9]+)\s*A\s*([0-9]+)\s*F\s*", re.IGNORECASE)


class TopologyError(ValueError):
    """A topology string that is not of the form xAyF."""


@dataclass(frozen=True)
class Topology:
    num_attention: int
    num_ffn: int

    @property
    def world_size(self) -> int:
        return self.num_attention + self.num_ffn

    def attention_rank(self, i: int) -> int:
        return i

    def ffn_rank(self, k: int) -> int:
        return self.num_attention + k

    @property
    def attention_ranks(self) -> list[int]:
        return list(range(self.num_attention))

    @property
    def ffn_ranks(self) -> list[int]:
        return [self.ffn_rank(k) for k in range(self.num_ffn)]

    def ffn_shard(self, k: int) -> "FFNShard":
        from afdserve.model.step3 import FFNShard
        return FFNShard(k, self.num_ffn)

    def role_of(self, rank: int) -> tuple[str, int]:
        """Global rank -> (role, index within the role)."""
        if rank < self.num_attention:
            return "attention", rank
        return "ffn", rank - self.num_attention

    def __str__(self) -> str:
        return f"{self.num_attention}A{self.num_ffn}F"


def parse_topology(text: str | Topology) -> Topology:
    """'2A1F' -> Topology(2, 1); the one parser of `serve`, `worker` and `simulate`.

    Case and spaces are free ('2a1f', ' 2A 1F ' and '2A1F' are the same); both counts must be >= 1.
    """
    if isinstance(text, Topology):
        return text
    m = _PATTERN.fullmatch(text) if isinstance(text, str) else None
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise TopologyError(f"invalid AFD topology {text!r}: expected xAyF with x, y >= 1 attention "
                            "and FFN workers, e.g. 1A1F, 2A1F, 1A2F, 3A2F")
    return Topology(int(m.group(1)), int(m.group(2)))
