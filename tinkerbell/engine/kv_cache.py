"""Paged KV cache: fixed-size blocks of keys/values per layer, addressed through per-sequence block tables.

`PagedKVCache` is the storage; `BlockManager` is the bookkeeping (free list, reference counts, prefix cache by
chained block hashes). They meet only through block ids, so the manager never touches a tensor.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
import torch


class PagedKVCache:
    """Storage only: one flat [num_blocks * block_size, kv_heads, head_dim] tensor per layer for K and for V.

    A token's slot is `block_id * block_size + offset`; which blocks a sequence owns is the block manager's
    business (see BlockManager)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        # One block past the managed ones: padding rows of a captured decode batch write there, never into a
        # sequence's blocks (the block manager never hands it out).
        self.scratch_block = num_blocks
        shape = ((num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slot_mapping, k.detach().to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, slot_mapping, v.detach().to(self.v[layer].dtype))

    def slots(self, block_table: list[int], length: int) -> torch.Tensor:
        """Flat slots of positions 0..length-1 of a sequence with this block table."""
        pos = torch.arange(length)
        blocks = torch.tensor(block_table, dtype=torch.long)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.k[0].device)

    def gather(self, layer: int, block_table: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.slots(block_table, length)
        return self.k[layer][idx], self.v[layer][idx]

    def copy_prefix(self, src_block: int, dst_block: int, num_slots: int) -> None:
        """Copy the first `num_slots` token slots of one block to another, in every layer (copy-on-write)."""
        bs = self.block_size
        src = slice(src_block * bs, src_block * bs + num_slots)
        dst = slice(dst_block * bs, dst_block * bs + num_slots)
        for k, v in zip(self.k, self.v):
            k[dst] = k[src]
            v[dst] = v[src]


def block_hash(prev: bytes | None, tokens: list[int], salt: str) -> bytes:
    """Identity of a full block: its tokens, every token before it (through `prev`) and the adapter that
    produced its K/V (`salt`: an adapter changes K/V, so equal tokens under another adapter must not match)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(prev or b"\x00" * 16)
    h.update(salt.encode())
    h.update(b"\xff")
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and registered in the prefix cache


class BlockManager:
    """Which blocks are free, who holds which (reference counts), and which full blocks are cached by hash.

    A block is in exactly one of three states: held (ref_count > 0), free and uncached (`_free`), or free but
    still cached (`_evictable`, LRU order). Allocation prefers uncached blocks and evicts the least recently
    freed cached block only when those run out, so a popular prefix survives as long as possible.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.reset()

    def reset(self) -> None:
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self._free: deque[int] = deque(range(self.num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}

    # ------------------------------------------------------------------------------------------- accounting

    @property
    def num_free(self) -> int:
        """Blocks that an allocation can get (uncached free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------------------------------- prefix cache

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Block ids of the longest prefix of `hashes` that is cached (not taken: see `take`)."""
        out: list[int] = []
        for h in hashes:
            bid = self._cached.get(h)
            if bid is None:
                break
            out.append(bid)
        return out

    def num_evictable_among(self, block_ids: list[int]) -> int:
        """How many of these cached blocks currently count as free (taking them lowers num_free)."""
        return sum(1 for b in block_ids if b in self._evictable)

    def register(self, block_id: int, h: bytes) -> None:
        """Offer a just-filled block to the prefix cache. A hash computed twice (two sequences prefilled the
        same prefix at once) keeps its first block; the duplicate stays an ordinary block."""
        block = self.blocks[block_id]
        if block.hash is None and h not in self._cached:
            block.hash = h
            self._cached[h] = block_id

    # ------------------------------------------------------------------------------------------- ownership

    def take(self, block_ids: list[int]) -> None:
        """Hold cached blocks found by `lookup` (one more reference each)."""
        for b in block_ids:
            block = self.blocks[b]
            if block.ref_count == 0:
                self._evictable.pop(b)
            block.ref_count += 1

    def share(self, block_ids: list[int]) -> None:
        """One more reference to blocks already held (a forked sample shares its prompt's blocks)."""
        for b in block_ids:
            assert self.blocks[b].ref_count > 0, "sharing a block nobody holds"
            self.blocks[b].ref_count += 1

    def allocate(self) -> int:
        if self._free:
            b = self._free.popleft()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            block = self.blocks[b]
            assert block.hash is not None
            del self._cached[block.hash]
            block.hash = None
        else:
            raise RuntimeError("KV cache exhausted (the scheduler must check num_free first)")
        self.blocks[b].ref_count = 1
        return b

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block. Freed in reverse so a sequence's tail is evicted before its prefix,
        which other requests are likelier to share."""
        for b in reversed(block_ids):
            block = self.blocks[b]
            assert block.ref_count > 0, f"double free of block {b}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    def ref_count(self, block_id: int) -> int:
        return self.blocks[block_id].ref_count
