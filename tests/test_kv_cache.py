"""KVCacheManager: block accounting, prefix caching, LRU eviction."""

from __future__ import annotations

import pytest

from engine.core import KVCacheManager, Sequence


def _seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, max_tokens=16)


def _compute_all(kv: KVCacheManager, seq: Sequence) -> None:
    """What a step does after the model ran: every token is computed."""
    assert kv.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_full_blocks(seq)


def test_allocation_rounds_up_to_blocks_and_free_returns_them():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    seq = _seq(list(range(10)))
    assert kv.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3
    assert kv.num_free_blocks == 5
    seq.num_computed_tokens = 10
    seq.append_token(99)
    seq.append_token(98)
    assert kv.allocate_slots(seq, 2)  # 12 tokens: still 3 blocks
    assert len(seq.block_table) == 3
    seq.num_computed_tokens = 12
    assert kv.allocate_slots(seq, 1)  # 13th token opens a 4th block
    assert len(seq.block_table) == 4
    kv.free(seq)
    assert kv.num_free_blocks == 8 and seq.block_table == []


def test_allocation_fails_without_side_effects_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    seq = _seq(list(range(12)))
    assert not kv.allocate_slots(seq, 12)
    assert seq.block_table == [] and kv.num_free_blocks == 2


def test_repeated_prefix_hits_full_blocks_only():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = _seq(list(range(10)))
    _compute_all(kv, first)
    second = _seq(list(range(9)) + [42, 43])  # shares 9 tokens: two full blocks
    blocks, num_cached = kv.get_computed_blocks(second)
    assert num_cached == 8
    assert [b.block_id for b in blocks] == first.block_table[:2]
    assert kv.allocate_slots(second, second.num_tokens - num_cached, blocks)
    assert second.block_table[:2] == first.block_table[:2]
    assert all(kv.blocks[b].ref_count == 2 for b in first.block_table[:2])


def test_a_fully_cached_prompt_still_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = _seq(list(range(8)))
    _compute_all(kv, first)
    _, num_cached = kv.get_computed_blocks(_seq(list(range(8))))
    assert num_cached == 4  # the last block would leave nothing to sample from


def test_prefix_key_covers_the_whole_prefix_not_just_the_block():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    _compute_all(kv, _seq([1, 2, 3, 4, 5]))
    # same second block [3, 4] after a different first block: no hit at all
    _, num_cached = kv.get_computed_blocks(_seq([9, 9, 3, 4, 5]))
    assert num_cached == 0


def test_freed_cached_blocks_stay_findable_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] [5]
    _compute_all(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    _, num_cached = kv.get_computed_blocks(_seq([1, 2, 3, 4, 7]))
    assert num_cached == 4
    # a new unrelated sequence takes the never-cached blocks first, then the cached tail
    b = _seq([8, 8, 8, 8, 8])
    assert kv.allocate_slots(b, 5)
    _, num_cached = kv.get_computed_blocks(_seq([1, 2, 3, 4, 7]))
    assert num_cached == 2  # [3, 4] (queued before [1, 2]) was evicted, the head survives


def test_hit_on_a_free_cached_block_counts_against_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    _compute_all(kv, a)
    kv.free(a)
    c = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])  # 2 hits + needs 3 more blocks: 5 > 3
    blocks, num_cached = kv.get_computed_blocks(c)
    assert num_cached == 4
    assert not kv.allocate_slots(c, c.num_tokens - num_cached, blocks)
    assert kv.num_free_blocks == 3
    assert all(b.ref_count == 0 for b in blocks)


def test_same_block_computed_twice_is_cached_once():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a, b = _seq([1, 2, 3]), _seq([1, 2, 4])
    for seq in (a, b):
        assert kv.allocate_slots(seq, 3)
    for seq in (a, b):
        seq.num_computed_tokens = 3
        kv.cache_full_blocks(seq)
    assert len(kv.cached_blocks) == 1
    assert a.block_hashes == b.block_hashes
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    _compute_all(kv, _seq([1, 2, 3, 4, 5]))
    assert kv.get_computed_blocks(_seq([1, 2, 3, 4, 5]))[1] == 0
    assert kv.cached_blocks == {}


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0)])
def test_bad_sizes_are_refused(num_blocks, block_size):
    with pytest.raises(ValueError, match="num_blocks|block_size"):
        KVCacheManager(num_blocks, block_size)
