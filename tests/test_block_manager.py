"""BlockManager: allocation accounting, all-or-nothing failure, slot mapping."""

import pytest

from afdserve.engine.block_manager import BlockManager, NoFreeBlocksError


def test_allocate_grows_table_and_counts_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.blocks_needed("a", 5) == 2
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.num_free_blocks == 6
    assert bm.blocks_needed("a", 8) == 0
    assert bm.allocate("a", 8) == []  # still fits in two blocks
    assert bm.allocate("a", 9) == [2]
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.usage == pytest.approx(3 / 8)
    assert bm.capacity == 32


def test_free_returns_blocks_and_is_idempotent():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 3)
    bm.allocate("b", 4)
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    bm.free("a")
    assert bm.num_free_blocks == 2 and bm.block_table("a") == []
    bm.free("a")
    bm.free("never-seen")
    assert bm.num_free_blocks == 2
    # Freed blocks are reused, and never handed to two owners.
    bm.allocate("c", 4)
    assert set(bm.block_table("c")).isdisjoint(bm.block_table("b"))
    assert sorted(bm.block_table("b") + bm.block_table("c")) == [0, 1, 2, 3]


def test_shortage_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate("a", 4)
    assert not bm.can_allocate("b", 9)  # needs 3, 2 free
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("b", 9)
    assert bm.num_free_blocks == 2
    assert bm.block_table("b") == []
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("a", 13)  # needs 3 more, 2 free
    assert bm.block_table("a") == [0] and bm.num_free_blocks == 2
    assert bm.can_allocate("a", 12)


def test_slot_mapping():
    bm = BlockManager(num_blocks=6, block_size=4)
    bm.allocate("x", 2)  # block 0
    bm.allocate("a", 12)  # blocks 1, 2, 3
    bm.free("x")
    bm.allocate("a", 13)  # block 4 (the free deque hands out 4 before the freed 0)
    table = bm.block_table("a")
    assert table == [1, 2, 3, 4]
    assert [bm.slot("a", p) for p in (0, 3, 4, 9, 12)] == [4, 7, 8, 13, 16]
    for p in range(16):
        assert bm.slot("a", p) == table[p // 4] * 4 + p % 4
    with pytest.raises(IndexError):
        bm.slot("a", 16)
    with pytest.raises(IndexError):
        bm.slot("nobody", 0)


def test_block_table_is_a_copy():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    bm.block_table("a").append(3)
    assert bm.block_table("a") == [0]


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
