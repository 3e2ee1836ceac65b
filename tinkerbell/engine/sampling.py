"""Token selection and log-probabilities for the sampler.

Conventions the rest of the system relies on:

* **Returned logprobs are raw.** The logprob reported for a sampled token is `log_softmax(logits)` at
  temperature 1, before top-k / top-p filtering, whatever temperature was used to draw it. That is exactly what
  training's `forward` computes for the same tokens, so an RL loop's importance ratios start at 1; a client that
  wants the behaviour policy's tempered logprob can derive it. Top-k logprobs (sampled and prompt positions)
  use the same raw distribution.
* **Seeded sampling is batch-independent.** Every sequence draws from its own `torch.Generator`, seeded from
  (request seed, sample index), and a row's draw depends only on that row's logits and that generator. The same
  seed therefore gives the same tokens whether the request ran alone or beside others, and a preempted sequence
  continues its stream where it stopped. Without a seed the base seed is random.
* Draws use the exponential race (argmax of p / q with q ~ Exp(1)), which is equivalent to multinomial
  sampling, needs one vector of noise per row, and keeps the selection itself a batched argmax.
* The fast path (`sample_fast`, used on GPU) draws the same way but takes its noise from a counter-based hash
  of (seed, position) instead of a generator (kernels/gumbel_sample.py): equally batch-independent and
  preemption-safe, one launch for the whole batch, no per-row Python. Its streams differ from the generator's.
* temperature 0 is greedy (argmax), and so is any temperature below 1e-5, where dividing the logits would
  overflow to inf; top_k = -1 and top_p = 1 switch those filters off.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np
import torch

# Empty slots of a top-k table (the wire format's "no data": SDK reads a row of these as absent).
TOPK_EMPTY_ID = 0
TOPK_EMPTY_LOGPROB = -99999.0
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def filtered(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def derive_seed(seed: int | None, sample_index: int) -> int:
    """A 63-bit generator seed from (request seed, sample index); random base seed when `seed` is None.

    Hashing (instead of seed + index) keeps the streams of nearby seeds and indices unrelated.
    """
    base = secrets.randbits(63) if seed is None else seed
    digest = hashlib.blake2b(f"{base}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(seed: int | None, sample_index: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, sample_index))
    return gen


def _filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Tempered logits with everything outside each row's top-k / top-p set to -inf."""
    dev = logits.device
    temps = to_device(np.array([p.temperature for p in params], dtype=np.float32), dev).to(logits.dtype)
    scaled = logits / temps[:, None]
    if not any(p.filtered for p in params):
        return scaled
    vocab = logits.shape[-1]
    # Stable sort: among equal logits the lower id ranks first, as argmax would pick it.
    sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    ks = to_device(np.array([p.top_k if p.top_k > 0 else vocab for p in params], dtype=np.int64), dev)
    drop = rank >= ks[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    top_ps = to_device(np.array([p.top_p for p in params], dtype=np.float32), dev).to(logits.dtype)
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token goes when the mass before it already does.
    mass_before = probs.cumsum(dim=-1) - probs
    # Rows with top_p = 1 skip this entirely: rounding in the cumsum must not cut their tail.
    drop = drop | ((mass_before >= top_ps[:, None]) & (rank > 0) & (top_ps[:, None] < 1.0))
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """One token id per row of `logits` [R, V] (float32), each row under its own params and generator."""
    out = logits.argmax(dim=-1)
    draw = [i for i, p in enumerate(params) if not p.greedy]
    if not draw:
        return out
    rows = logits[draw]
    probs = _filter_logits(rows, [params[i] for i in draw]).softmax(dim=-1)
    noise = torch.stack([torch.empty(rows.shape[-1], device=rows.device).exponential_(generator=generators[i])
                         for i in draw])
    out[draw] = (probs / noise).argmax(dim=-1)
    return out


def sample_fast(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                positions: list[int]) -> torch.Tensor:
    """One token id per row of float32 `logits` [R, V], all rows at once; row i's noise is keyed by
    (seeds[i], positions[i]), the position being the index its token will take in the sequence."""
    return RowSampling.build(params, seeds, logits.device).sample(logits, np.asarray(positions, dtype=np.int64))


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device without waiting for the GPU (pinned source, non-blocking copy)."""
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class RowSampling:
    """The sampling inputs of a fixed list of rows that do not change from step to step (params, seeds,
    temperatures on the device), so a run of decode steps over the same sequences builds them once."""

    params: list[SamplingParams]
    seeds: np.ndarray  # int64 [R]
    all_greedy: bool
    filtered: list[int]  # rows with top-k / top-p
    temps: torch.Tensor | None  # float32 [R] on the device; 0 = greedy, 1 for filtered rows (tempered already)
    host_temps: np.ndarray  # float32 [R]: the same on the host (a graph that samples uploads it)

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int] | np.ndarray, device: torch.device) -> "RowSampling":
        if all(p.greedy for p in params):
            return cls(params, np.asarray(seeds, dtype=np.int64), True, [], None, np.zeros(len(params), np.float32))
        filtered = [i for i, p in enumerate(params) if p.filtered]
        temps = np.array([0.0 if p.greedy else 1.0 if p.filtered else p.temperature for p in params],
                         dtype=np.float32)
        return cls(params, np.asarray(seeds, dtype=np.int64), False, filtered, to_device(temps, device), temps)

    def subset(self, keep: np.ndarray) -> "RowSampling":
        """The same rows' inputs for the rows `keep` (indices, in order)."""
        params = [self.params[i] for i in keep.tolist()]
        if self.all_greedy:
            return RowSampling(params, self.seeds[keep], True, [], None, np.zeros(len(params), np.float32))
        return RowSampling.build(params, self.seeds[keep], self.temps.device)

    def keys(self, positions: np.ndarray) -> np.ndarray:
        """Each row's noise key for drawing the token that takes index `positions` (int64 [R])."""
        from tinkerbell.engine.kernels.gumbel_sample import row_keys

        return np.ascontiguousarray(row_keys(self.seeds, positions.astype(np.int64)))

    def sample(self, logits: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
        """One token per row; `positions` (int64 [R]) are the indices the drawn tokens will take."""
        from tinkerbell.engine.kernels.gumbel_sample import sample_rows

        if self.all_greedy:
            return logits.argmax(dim=-1)
        dev = logits.device
        if self.filtered:
            logits = logits.clone()
            index = to_device(np.asarray(self.filtered, dtype=np.int64), dev)
            logits[index] = _filter_logits(logits[index], [self.params[i] for i in self.filtered])
        # numpy: the same integer arithmetic as torch
        return sample_rows(logits, self.temps, to_device(self.keys(positions), dev))


def topk(logprobs: torch.Tensor, k: int, lse: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k highest logprobs of each row: (ids int32 [R, k], logprobs float32 [R, k]). With `lse` the rows
    are logits and their logprobs are formed only for the k picked."""
    values, ids = logprobs.topk(k, dim=-1)
    if lse is not None:
        values = values - lse[:, None]
    return ids.to(torch.int32).cpu().numpy(), values.to(torch.float32).cpu().numpy()


def empty_topk(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.full((rows, k), TOPK_EMPTY_ID, dtype=np.int32),
            np.full((rows, k), TOPK_EMPTY_LOGPROB, dtype=np.float32))
