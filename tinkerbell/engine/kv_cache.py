"""Paged KV cache: fixed-size blocks of keys/values per layer, addressed through per-sequence block tables."""

from __future__ import annotations

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
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
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
