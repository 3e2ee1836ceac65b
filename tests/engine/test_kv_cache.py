"""Block manager bookkeeping (free list, reference counts, prefix cache, LRU eviction) and KV block copies."""

import pytest
import torch

from tinkerbell.engine.kv_cache import BlockManager, PagedKVCache, block_hash


def _chain(tokens: list[int], bs: int, salt: str = "") -> list[bytes]:
    out, prev = [], None
    for j in range(len(tokens) // bs):
        prev = block_hash(prev, tokens[j * bs:(j + 1) * bs], salt)
        out.append(prev)
    return out


def test_allocate_free_and_refcounts():
    bm = BlockManager(4, 2)
    a, b = bm.allocate(), bm.allocate()
    assert bm.num_used == 2 and bm.num_free == 2
    bm.share([a])
    assert bm.ref_count(a) == 2
    bm.free([a, b])
    assert bm.num_used == 1 and bm.ref_count(a) == 1
    bm.free([a])
    assert bm.num_used == 0
    with pytest.raises(AssertionError):
        bm.free([a])
    for _ in range(4):
        bm.allocate()
    with pytest.raises(RuntimeError):
        bm.allocate()


def test_hash_chains_over_predecessors_and_salt():
    h = _chain([1, 2, 3, 4], 2)
    assert _chain([1, 2, 3, 4], 2) == h
    assert _chain([9, 2, 3, 4], 2)[1] != h[1]  # same block tokens, different prefix
    assert _chain([1, 2, 3, 4], 2, salt="lora:x:1") != h


def test_prefix_cache_hit_and_lru_eviction():
    bm = BlockManager(4, 2)
    hashes = _chain([1, 2, 3, 4, 5, 6], 2)
    blocks = [bm.allocate() for _ in range(3)]
    for b, h in zip(blocks, hashes):
        bm.register(b, h)
    assert bm.lookup(hashes) == blocks
    bm.free(blocks)
    # Freed but cached: still found, and counted as free.
    assert bm.num_free == 4 and bm.num_cached == 3
    assert bm.lookup(hashes) == blocks
    assert bm.num_evictable_among(blocks) == 3
    bm.take(blocks[:2])
    assert bm.num_free == 2 and bm.ref_count(blocks[0]) == 1
    bm.free(blocks[:2])
    # The uncached block goes first; then the least recently freed cached block, which is the tail (freed in
    # reverse order), so the shared prefix lives longest.
    first = bm.allocate()
    assert first not in blocks
    second = bm.allocate()
    assert second == blocks[2]
    assert bm.lookup(hashes) == blocks[:2]
    third = bm.allocate()
    assert third == blocks[1] and bm.lookup(hashes) == blocks[:1]


def test_duplicate_registration_keeps_the_first_block():
    bm = BlockManager(3, 2)
    h = _chain([1, 2], 2)[0]
    a, b = bm.allocate(), bm.allocate()
    bm.register(a, h)
    bm.register(b, h)
    assert bm.lookup([h]) == [a]
    bm.free([b])
    assert bm.num_cached == 1


def test_copy_prefix_copies_every_layer():
    cache = PagedKVCache(2, 3, 4, 1, 2, torch.float32, "cpu")
    for layer in range(2):
        cache.k[layer][:12] = torch.arange(12, dtype=torch.float32)[:, None, None] + 100 * layer
        cache.v[layer][:] = -cache.k[layer]
    cache.copy_prefix(0, 2, 3)
    for layer in range(2):
        assert torch.equal(cache.k[layer][8:11], cache.k[layer][0:3])
        assert torch.equal(cache.v[layer][8:11], cache.v[layer][0:3])
        assert cache.k[layer][11, 0, 0].item() == 11 + 100 * layer
