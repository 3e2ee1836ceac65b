"""How many tokens one training micro-batch may hold, and whether it needs activation checkpointing.

The bytes autograd keeps per token per layer are measured, not guessed: one decoder layer runs forward at two
batch sizes under `saved_tensors_hooks`, and the slope is what each extra token costs (weights excluded). With
checkpointing a layer keeps only its input, but the layer being recomputed holds its full set again, so

    without: T · (L · per_layer + per_token_other)
    with:    T · (L · hidden_bytes + per_layer + per_token_other)

must fit the budget. On GPU the budget is the memory free when training first runs (after the sampler's KV
cache took its `--gpu-memory-util` share), less a reserve; on CPU it is a fixed figure.

The runs' own state comes out of the same memory: each run's fp32 masters, two AdamW moments and gradient
accumulator (16 bytes an adapter element: ~430 MB for Llama-3.2-1B at rank 32, ~1.4 GB for 8B), and, during a
batch, the model-dtype copy of every adapter in it and the pass's own gradients. The budget measured on GPU
already excludes the masters and moments of the runs that existed then; runs created later, the gradients and
the copies are charged against it at each use (`MemoryPlan.after_state`), so a server that gains runs shrinks
its micro-batches, then refuses new runs with a 4xx, instead of running out of memory mid-step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tinkerbell.engine.batch import BatchContext
from tinkerbell.engine.lora import LoraSpec, module_shape
from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.models.llama import CausalLM
from tinkerbell.engine.training_forward import PackedAttention, layer_forward, packed_positions
from tinkerbell.engine.training_lora import TrainLora

CPU_BUDGET_BYTES = 8 * 2**30
GPU_RESERVE_BYTES = 2 * 2**30  # the sampler's transient activations and allocator slack
GPU_FREE_FRACTION = 0.85
# A micro-batch at least this large keeps the GPU busy, so splitting into such micro-batches without
# checkpointing beats one checkpointed batch (which recomputes every layer's forward: a third more work).
EFFICIENT_TOKENS = 4096
# A request may span at most this many micro-batches: it bounds how long one request holds the engine.
MAX_MICROBATCHES_PER_REQUEST = 32
PROBE_TOKENS = (64, 128)
# A run's state per adapter element, in bytes: fp32 master, two fp32 AdamW moments, fp32 gradient accumulator.
RUN_STATE_BYTES = 16
RESIDENT_STATE_BYTES = 12  # of which allocated from creation on (the gradient appears at the first backward)
# A run in a batch, per element beside its model-dtype copy: the pass's own fp32 gradients, kept apart from the
# earlier requests' until the pass succeeds (Trainer.run_segments).
PASS_GRAD_BYTES = 4
# A new run is refused when, with it, training could no longer hold a micro-batch of this many tokens.
MIN_TRAINABLE_TOKENS = 1024


def adapter_elements(cfg: ModelConfig, spec: LoraSpec, world: int = 1) -> int:
    """A run's adapter size in elements on one rank of a `world`-way tensor-parallel group: the whole adapter's
    even share, the same figure on every rank, so that all ranks plan the same micro-batches."""
    total = sum(spec.rank * sum(module_shape(cfg, key)) for key in spec.target_keys(cfg))
    return -(-total // world)


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    layer_bytes_per_token: float  # what one layer keeps for backward, per token
    checkpoint_bytes_per_token: float  # what a checkpointed layer keeps (its input), per token
    other_bytes_per_token: float  # embeddings, final norm, hidden-state gradient, per-target scalars
    num_layers: int
    # Run state (bytes) already outside `budget_bytes` when it was measured; None: a fixed plan for activations
    # alone, against which no run state is charged.
    state_at_plan: int | None = None

    def after_state(self, state_bytes: int) -> MemoryPlan:
        """This plan while runs hold `state_bytes` (their training state and a batch's copies of them)."""
        if self.state_at_plan is None:
            return self
        return replace(self, budget_bytes=max(0, self.budget_bytes - (state_bytes - self.state_at_plan)))

    def bytes_per_token(self, checkpointed: bool) -> float:
        if checkpointed:
            per = self.num_layers * self.checkpoint_bytes_per_token + self.layer_bytes_per_token
        else:
            per = self.num_layers * self.layer_bytes_per_token
        return per + self.other_bytes_per_token

    def max_tokens(self, checkpointed: bool) -> int:
        return max(1, int(self.budget_bytes // self.bytes_per_token(checkpointed)))

    def spare_bytes(self, tokens: int, checkpointed: bool) -> float:
        """What a micro-batch of `tokens` leaves of the budget."""
        return self.budget_bytes - tokens * self.bytes_per_token(checkpointed)

    @property
    def max_sequence_tokens(self) -> int:
        """The longest datum that can train at all (alone, checkpointed)."""
        return self.max_tokens(checkpointed=True)

    @property
    def max_request_tokens(self) -> int:
        return MAX_MICROBATCHES_PER_REQUEST * self.max_sequence_tokens

    def microbatch_tokens(self, total: int) -> tuple[int, bool]:
        """(token cap of each micro-batch, checkpointed?) for a batch of `total` tokens."""
        plain = self.max_tokens(checkpointed=False)
        if total <= plain or plain >= EFFICIENT_TOKENS:
            return plain, False
        return self.max_tokens(checkpointed=True), True


def _saved_bytes(model: CausalLM, tokens: int, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for one layer over `tokens` tokens."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in param_storages:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randn(tokens, model.cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
    ctx = BatchContext(spans=[], lora=TrainLora([]), position_ids=packed_positions([tokens], device))
    cos, sin = model.rope(ctx.positions(device), dtype)
    attend = PackedAttention([tokens], device, padded=device.type == "cuda")
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer_forward(model.model.layers[0], x, cos, sin, ctx, attend)
    del out
    return sum(seen.values())


def plan_memory(model: CausalLM, logits_chunk_elems: int, resident_state_bytes: int = 0) -> MemoryPlan:
    """`resident_state_bytes`: what the runs that exist now hold (on GPU, already gone from the free memory)."""
    first = next(model.parameters())
    device, dtype = first.device, first.dtype
    lo, hi = PROBE_TOKENS
    # LoRA adds [T, Σ rank] pieces per module and the allocator fragments: a 25% margin (on an H100 the 8B
    # step with 8 runs peaked at 79.8 GB with 10%).
    per_layer = 1.25 * (_saved_bytes(model, hi, device, dtype) - _saved_bytes(model, lo, device, dtype)) / (hi - lo)
    elt = first.element_size()
    hidden_bytes = model.cfg.hidden_size * elt
    # embedding out, final-norm in/out (float32 inside RMSNorm), the gradient flowing back, targets and outputs
    other = 6 * model.cfg.hidden_size * 4 + 64
    # the [chunk, vocab] block of logits: bf16 matmul out, its float32 copy, softmax and gradient
    logits_ws = logits_chunk_elems * (elt + 3 * 4)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = int(GPU_FREE_FRACTION * (free + cached)) - GPU_RESERVE_BYTES - logits_ws
        state_at_plan = resident_state_bytes
    else:  # a fixed figure that every run's state comes out of
        budget, state_at_plan = CPU_BUDGET_BYTES - logits_ws, 0
    return MemoryPlan(budget_bytes=max(budget, 0), layer_bytes_per_token=per_layer,
                      checkpoint_bytes_per_token=hidden_bytes, other_bytes_per_token=other,
                      num_layers=model.cfg.num_layers, state_at_plan=state_at_plan)
