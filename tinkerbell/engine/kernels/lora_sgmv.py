"""Multi-LoRA for a packed batch in a fixed number of launches: rows grouped by adapter slot into tiles.

`LoraTiles` is the plan: the batch rows that use an adapter, sorted by slot, cut into tiles of at most
`TILE_M` rows of one slot. Two kernels then run over the stacked slot tensors (lora_slots.py): shrink
(y = x · Aᵀ, per tile) and expand (out += scale · y · Bᵀ, per tile and output block), so each tile reads its
adapter's weights once, and rows of the same adapter share that read (SGMV). The plan has a fixed maximum
size for a given batch size, so it fits a captured CUDA graph; unused tiles have length 0 and exit at once.
The torch path computes the same per slot group and is the CPU path and the kernels' reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tinkerbell.engine.kernels import use_triton

TILE_M = 16


def max_tiles(num_rows: int, max_loras: int) -> int:
    """Upper bound of tiles for `num_rows` rows over `max_loras` slots (each slot group adds at most one)."""
    return -(-num_rows // TILE_M) + min(max_loras, num_rows)


@dataclass
class LoraTiles:
    rows: torch.Tensor  # [N] int32: batch rows that use an adapter, grouped by slot
    tile_slot: torch.Tensor  # [NT] int32
    tile_start: torch.Tensor  # [NT] int32: first entry of `rows`
    tile_len: torch.Tensor  # [NT] int32: 0 for padding tiles


def plan_tiles(row_slots: np.ndarray, num_tiles: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Host-side plan for per-row slots (-1 = no adapter): (rows int32 [N], tiles int32 [NT, 3] as
    slot/start/len). `num_tiles` pads the tile list to a fixed length."""
    row_slots = np.asarray(row_slots, dtype=np.int64)
    rows = np.nonzero(row_slots >= 0)[0]
    rows = rows[np.argsort(row_slots[rows], kind="stable")]
    slots = row_slots[rows]
    tiles: list[tuple[int, int, int]] = []
    if len(rows):
        cuts = np.flatnonzero(np.diff(slots)) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(rows)]])
        for s, e in zip(starts.tolist(), ends.tolist()):
            for t0 in range(s, e, TILE_M):
                tiles.append((int(slots[s]), t0, min(TILE_M, e - t0)))
    n = len(tiles) if num_tiles is None else num_tiles
    assert len(tiles) <= n, "more LoRA tiles than planned for"
    arr = np.zeros((n, 3), dtype=np.int32)
    if tiles:
        arr[:len(tiles)] = tiles
    return rows.astype(np.int32), arr


def lora_apply(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
               tiles: LoraTiles, present: torch.Tensor | None = None) -> torch.Tensor:
    """out[r] += scale[s] · (x[r] · A[s]ᵀ) · B[s]ᵀ for every planned row r of slot s, in place; returns out.

    x [T, in]; out [T, out] (may be a column slice of a wider tensor); a [S, R, in]; b [S, out, R];
    present [S] int32 (optional): 0 for slots whose adapter does not target this module, whose tiles are
    skipped (their weights are zeros, so skipping changes nothing but the bytes read: an lm_head B is 8 MB)."""
    if present is None:
        present = torch.ones(a.shape[0], dtype=torch.int32, device=a.device)
    if use_triton(x) and a.shape[1] >= 16:
        from tinkerbell.engine.kernels._lora_sgmv_triton import expand, shrink

        y = shrink(x, a, tiles, present)
        expand(y, b, scales, out, tiles, present)
        return out
    return lora_apply_torch(x, out, a, b, scales, tiles, present)


def lora_apply_torch(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
                     tiles: LoraTiles, present: torch.Tensor | None = None) -> torch.Tensor:
    skip = set() if present is None else {i for i, p in enumerate(present.tolist()) if p == 0}
    plan = zip(tiles.tile_slot.tolist(), tiles.tile_start.tolist(), tiles.tile_len.tolist())
    for slot, start, n in plan:
        if n == 0 or slot in skip:
            continue
        rows = tiles.rows[start:start + n].long()
        delta = (x[rows].to(a.dtype) @ a[slot].t()) @ b[slot].t() * scales[slot].to(a.dtype)
        out[rows] += delta.to(out.dtype)
    return out
