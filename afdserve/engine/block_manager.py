"""Paged KV cache bookkeeping: which cache blocks each request owns.

Block ids index the first dimension of a KV tensor owned by the engine,
shaped ``[num_blocks, block_size, ...]``. Token position ``p`` of a request
lives in block ``table[p // block_size]`` at offset ``p % block_size``.
No prefix caching: a block is owned by at most one request at a time.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence


class NoFreeBlocksError(RuntimeError):
    """Raised by ``BlockManager.allocate`` when the cache is short of blocks."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cache_slot(block_table: Sequence[int], position: int, block_size: int) -> int:
    """Flat KV-cache slot of token ``position``: ``table[pos // bs] * bs + pos % bs`` (the one
    definition; `AttentionMetadata.build` computes the same for whole contexts as tensors)."""
    return block_table[position // block_size] * block_size + position % block_size


class BlockManager:
    """Hands out KV cache blocks to requests and takes them back.

    Each request has a block table (list of block ids, in position order) that
    only grows until the request is freed.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def capacity(self) -> int:
        """Token slots in the whole cache: the longest sequence it can hold."""
        return self.num_blocks * self.block_size

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Extra blocks ``request_id`` needs so its table holds ``num_tokens`` tokens."""
        held = len(self._tables.get(request_id, ()))
        return max(0, _cdiv(num_tokens, self.block_size) - held)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the table of ``request_id`` to hold ``num_tokens`` tokens; return the new blocks.

        All or nothing: raises ``NoFreeBlocksError`` and changes nothing if short.
        """
        need = self.blocks_needed(request_id, num_tokens)
        if need > len(self._free):
            raise NoFreeBlocksError(
                f"{request_id!r} needs {need} blocks for {num_tokens} tokens, {len(self._free)} free"
            )
        if need == 0:
            return []
        new = [self._free.popleft() for _ in range(need)]
        self._tables.setdefault(request_id, []).extend(new)
        return new

    def free(self, request_id: str) -> None:
        """Return all blocks of ``request_id`` to the pool; a no-op if it holds none."""
        self._free.extend(self._tables.pop(request_id, ()))

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty if it holds none)."""
        return list(self._tables.get(request_id, ()))

    def slot(self, request_id: str, position: int) -> int:
        """Flat cache slot of token ``position`` (`cache_slot`), checked against the table."""
        table = self._tables.get(request_id, ())
        if position < 0 or position // self.block_size >= len(table):
            raise IndexError(f"position {position} of {request_id!r} is outside its {len(table)} blocks")
        return cache_slot(table, position, self.block_size)
