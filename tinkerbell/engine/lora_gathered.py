"""Multi-LoRA for the fast sampling path: every adapter of a batch applied through the stacked slot tensors.

Drop-in for `LoraBatch` where no gradient is needed (`ctx.lora.apply(key, x, out)`): instead of one pair of
matmuls per segment it runs the SGMV kernels (kernels/lora_sgmv.py) over a per-row slot plan, so the number of
launches does not grow with the number of adapters and the plan can live in a CUDA graph's static buffers.
Adapters that do not target a module have zeros in that module's slot, which adds nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from tinkerbell.engine.kernels.lora_sgmv import LoraTiles, lora_apply, plan_tiles
from tinkerbell.engine.lora_slots import LoraSlots


class GatheredLora:
    def __init__(self, slots: LoraSlots, tiles: LoraTiles):
        self.slots, self.tiles = slots, tiles

    @classmethod
    def for_rows(cls, slots: LoraSlots, row_slots: np.ndarray | list[int], device: torch.device) -> "GatheredLora":
        """Plan for per-row slots (-1: base model only), as fresh device tensors (the eager path)."""
        rows, tiles = plan_tiles(np.asarray(row_slots))
        t = torch.from_numpy(np.ascontiguousarray(tiles.T)).to(device)
        return cls(slots, LoraTiles(rows=torch.from_numpy(rows).to(device), tile_slot=t[0], tile_start=t[1],
                                    tile_len=t[2]))

    def apply(self, key: str, x: torch.Tensor, out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        assert row_offset == 0, "GatheredLora plans cover the rows they are applied to"
        a = self.slots.a.get(key)
        if a is None or self.tiles.rows.numel() == 0:
            return out
        return lora_apply(x, out, a, self.slots.b[key], self.slots.scales, self.tiles, self.slots.present[key])
