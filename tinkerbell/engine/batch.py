"""What one model forward is asked to compute: packed sequences, their KV-cache places, their adapters.

The runner packs many sequences (of many users, with many adapters) into one flat token batch with no padding;
the model reads everything it needs about sequence boundaries, cache slots and LoRA segments from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tinkerbell.engine.kernels.paged_attention import PagedAttnMeta
    from tinkerbell.engine.kv_cache import PagedKVCache
    from tinkerbell.engine.lora import LoraBatch


@dataclass
class SeqSpan:
    """One sequence's share of a packed batch.

    `start`/`length` locate its query tokens in the batch; `context_len` is how many tokens its attention sees
    after this step (cached tokens + the new ones). With a paged cache, `block_table` lists its KV blocks.
    """

    start: int
    length: int
    context_len: int
    block_table: list[int] | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def cached_len(self) -> int:
        return self.context_len - self.length


@dataclass
class BatchContext:
    spans: list[SeqSpan]
    kv_cache: "PagedKVCache | None" = None
    # Flat cache slot (block * block_size + offset) of every token in the batch; set when kv_cache is.
    slot_mapping: torch.Tensor | None = None
    lora: "LoraBatch | None" = None  # or any object with the same `apply` (lora_gathered.GatheredLora)
    # Fast path: attention shape as device tensors (paged kernel instead of the per-span loop) and positions
    # as a device tensor. With these set, a forward reads nothing from `spans`, so it can be graph-captured.
    attn: "PagedAttnMeta | None" = None
    position_ids: torch.Tensor | None = None

    @classmethod
    def for_packed(cls, lengths: list[int], lora: "LoraBatch | None" = None) -> "BatchContext":
        """Training / scoring: each sequence attends only to itself, causally, with no cache."""
        spans, start = [], 0
        for n in lengths:
            spans.append(SeqSpan(start=start, length=n, context_len=n))
            start += n
        return cls(spans=spans, lora=lora)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.position_ids is not None:
            return self.position_ids
        parts = [torch.arange(s.cached_len, s.context_len, dtype=torch.long) for s in self.spans]
        return torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.long, device=device)
