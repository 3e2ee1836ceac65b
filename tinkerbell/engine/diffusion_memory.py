"""GPU memory a diffusion request holds while it runs, so the sampler admits only what fits.

A row (one sample of a request; its CFG companion doubles it) holds, per token of prompt + max_tokens:
- with `prefix_cache` / `dual_cache`: its cached keys/values, the batch's assembled copy of them (with room for
  the forward's own keys) and, on the steps that rebuild the cache, the forward's returned keys/values before
  they are cut into the row's cache: three times the keys/values of a token over every layer;
- with `basic`: nothing between steps, but a forward's keys/values of one token;
plus a forward's activations (hidden states, fused q/k/v and gate/up outputs). LLaDA-8B in bf16: 1.7 MB a token
cached, 0.6 MB with `basic`. On a GPU the budget is `--gpu-memory-util` of the memory free once the weights
are loaded (as for the autoregressive sampler's KV cache); requests beyond it wait, and one that could never
fit is refused with a message naming the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.types import EngineUserError

CACHED_COPIES = 3  # the row's cache, the batch's assembled copy, a rebuilding forward's output


@dataclass(frozen=True)
class DiffusionMemory:
    kv_token_bytes: int  # keys and values of one token over every layer
    act_token_bytes: int  # a forward's activations per token
    budget_bytes: int | None  # None: unbounded (the CPU)

    @classmethod
    def for_model(cls, cfg: ModelConfig, dtype: torch.dtype, budget_bytes: int | None) -> DiffusionMemory:
        elt = torch.finfo(dtype).bits // 8
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elt
        act = elt * (4 * cfg.hidden_size + 2 * cfg.intermediate_size
                     + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
        return cls(kv, act, budget_bytes)

    def row_bytes(self, tokens: int, algorithm: str, cfg_scale: float) -> int:
        copies = 1 if algorithm == "basic" else CACHED_COPIES
        return tokens * (copies * self.kv_token_bytes + self.act_token_bytes) * (2 if cfg_scale > 0 else 1)

    def check(self, tokens: int, algorithm: str, cfg_scale: float) -> None:
        """Refuse a request whose one row could never be admitted."""
        need = self.row_bytes(tokens, algorithm, cfg_scale)
        if self.budget_bytes is None or need <= self.budget_bytes:
            return
        cfg = " with cfg_scale > 0 (a second, unconditional row)" if cfg_scale > 0 else ""
        hint = "" if algorithm == "basic" else ", use generation_algorithm basic (no cache: a third of the memory)"
        raise EngineUserError(
            f"max_tokens: prompt + max_tokens = {tokens} tokens with generation_algorithm {algorithm}{cfg} need "
            f"{need / 2**30:.1f} GiB of GPU memory; this server's diffusion budget is "
            f"{self.budget_bytes / 2**30:.1f} GiB. Shorten the request{hint}, or restart the server with a higher "
            "--gpu-memory-util")
