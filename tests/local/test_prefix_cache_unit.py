"""The prefix cache's bookkeeping on its own: hash chains, bounded memory, LRU eviction, reference counts."""

from __future__ import annotations

import numpy as np

from workers.local.prefix_cache import PrefixCache

BLOCK = 4


def cache(blocks: int) -> PrefixCache:
    return PrefixCache(BLOCK, block_bytes=100, max_bytes=blocks * 100)


def data(value: float) -> np.ndarray:
    return np.full((1, 2, 1, BLOCK, 2), value, dtype=np.float32)


def test_a_key_names_the_whole_prefix_and_the_salt() -> None:
    c = cache(8)
    a = c.keys([1, 2, 3, 4, 5, 6, 7, 8], None, 2)
    b = c.keys([9, 2, 3, 4, 5, 6, 7, 8], None, 2)
    assert a[1] != b[1]  # same second block, different first: a different prefix
    assert c.keys([1, 2, 3, 4], None, 1) == a[:1]
    assert c.keys([1, 2, 3, 4], "tenant-a", 1) != a[:1] != c.keys([1, 2, 3, 4], "tenant-b", 1)


def test_lookup_finds_the_longest_cached_prefix_and_counts_it() -> None:
    c = cache(8)
    keys = c.keys(list(range(12)), None, 3)
    chain = [c.insert(keys[0], data(0)), c.insert(keys[1], data(1))]
    c.release(chain)
    found = c.lookup(keys)
    assert [float(b.data.flat[0]) for b in found] == [0.0, 1.0]
    assert (c.lookups, c.hit_lookups, c.reused_tokens) == (1, 1, 2 * BLOCK)
    assert c.lookup(c.keys([7] * 4, None, 1)) == [] and c.hit_lookups == 1
    c.release(found)


def test_memory_is_bounded_and_blocks_in_use_are_never_evicted() -> None:
    c = cache(3)
    held = [c.insert(k, data(i)) for i, k in enumerate(c.keys(list(range(12)), None, 3))]
    assert c.bytes_held == 300 and c.blocks_in_use == 3
    other = c.keys([100 + i for i in range(8)], None, 2)
    assert c.insert(other[0], data(9)) is None  # full of blocks in use: nothing may go
    assert c.evictions == 0 and c.blocks == 3
    c.release(held)  # deepest first: block 2 becomes the least recently used, then 1, then 0
    new = c.insert(other[0], data(9))
    assert new is not None and c.evictions == 1 and c.bytes_held == 300
    assert len(c.lookup(c.keys(list(range(12)), None, 3))) == 2  # the deepest block went first


def test_inserting_a_cached_key_shares_the_block() -> None:
    c = cache(4)
    key = c.keys([1, 2, 3, 4], None, 1)[0]
    first = c.insert(key, data(1))
    second = c.insert(key, data(2))
    assert first is second and first.refs == 2 and c.blocks == 1 and c.inserted == 1
    c.release([first])
    assert c.blocks_in_use == 1
    c.release([second])
    assert c.blocks_in_use == 0
