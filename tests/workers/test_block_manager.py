"""Block manager: exact block ids, prefix reuse, eviction order, OOM as a value."""

from workers.block_manager import Allocation, BlockManager, block_hashes


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_allocate_hands_out_lowest_free_blocks_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", toks(0, 9)) == Allocation((0, 1, 2), 0)
    assert bm.allocate("b", toks(100, 4)) == Allocation((3,), 0)
    assert bm.num_free_blocks == 4


def test_out_of_memory_is_none_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate("a", toks(0, 8))
    assert bm.can_allocate(toks(50, 8)) is False
    assert bm.allocate("b", toks(50, 8)) is None
    assert bm.num_free_blocks == 1 and not bm.has("b")
    assert bm.append("a", 13) is False  # needs 2 more blocks, 1 free
    assert bm.block_table("a") == [0, 1]


def test_append_grows_table_only_at_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", toks(0, 3))
    assert bm.append("a", 4) and bm.block_table("a") == [0]
    assert bm.append("a", 5) and bm.block_table("a") == [0, 1]
    assert bm.append("a", 12) and bm.block_table("a") == [0, 1, 2]


def test_prefix_reuse_shares_full_blocks_and_counts_hits():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = toks(0, 10)
    bm.allocate("a", a)
    bm.commit_full_blocks("a", a)  # blocks 0, 1 full; block 2 partial
    b = toks(0, 8) + [99, 98, 97]
    alloc = bm.allocate("b", b)
    assert alloc == Allocation((0, 1, 3), 8)
    assert bm.prefix_hits == 2 and bm.prefix_queries == 2 + 2


def test_whole_prompt_cached_still_computes_last_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = toks(0, 8)
    bm.allocate("a", a)
    bm.commit_full_blocks("a", a)
    alloc = bm.allocate("b", a)  # identical prompt: last token must be recomputed
    assert alloc == Allocation((0, 2), 4)


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = toks(0, 4)
    bm.allocate("a", a)
    bm.commit_full_blocks("a", a)
    bm.free("a")  # blocks 1 then 0 go to the back of the free queue
    assert bm.num_free_blocks == 4
    alloc = bm.allocate("b", toks(0, 2) + [7])  # hit on block 0, fresh block is 2
    assert alloc == Allocation((0, 2), 2)
    bm.allocate("c", toks(50, 4))  # needs 2 fresh: 3 then 1 (1 evicts a's 2nd block)
    assert bm.block_table("c") == [3, 1]
    bm.free("b")
    bm.free("c")
    again = bm.allocate("d", toks(0, 4) + [5])
    assert again.block_ids[0] == 0 and again.num_cached_tokens == 2  # block 1 was evicted


def test_truncate_frees_tail_and_unhashes_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = toks(0, 12)
    bm.allocate("a", a)
    bm.commit_full_blocks("a", a)
    bm.truncate("a", 6)
    assert bm.block_table("a") == [0, 1] and bm.num_free_blocks == 6
    hit = bm.allocate("b", toks(0, 9))  # only block 0 still names a full prefix
    assert hit.num_cached_tokens == 4


def test_block_hashes_are_chained():
    h1 = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    h2 = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(h1) == 2 and h1[0] != h2[0] and h1[1] != h2[1]
    assert block_hashes([1, 2, 3, 4, 5, 6, 7], 4) == h1[:1]
