"""LoRA training on the shared, frozen base model: packed forward/backward, gradient accumulation, AdamW, and
checkpoints.

Each run owns fp32 master LoRA weights (leaf tensors whose `.grad` is its gradient accumulator) and its AdamW
moments. A forward/backward packs the datums of one or more runs into one variable-length batch with no
padding; each run's rows use its own adapter (one `LoraSegment` per run), so the scheduler can later hand
several runs' requests to `run_segments` at once. Logits are computed in row chunks under activation
checkpointing, so only one [chunk, vocab] block is alive at a time, in the forward and in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from tinkerbell.engine.adapter_io import load_peft, save_peft
from tinkerbell.engine.batch import BatchContext
from tinkerbell.engine.lora import AdapterWeights, LoraBatch, LoraSegment, LoraSpec, module_shape
from tinkerbell.engine.losses import LossConfig, LossFn, datum_inputs, resolve, validate
from tinkerbell.engine.models.llama import CausalLM
from tinkerbell.engine.optimizer import AdamW
from tinkerbell.engine.types import AdamParams, EngineUserError, ForwardBackwardResult, TrainDatum

# Elements of one [chunk, vocab] logits block: 32M floats = 128 MiB, ~220 rows at a 150k vocabulary.
DEFAULT_LOGITS_CHUNK_ELEMS = 2**25


@dataclass
class _Run:
    weights: AdapterWeights  # fp32 masters, requires_grad
    optimizer: AdamW


@dataclass
class TrainSegment:
    """One run's validated request: its share of a packed forward/backward."""

    run_id: str
    data: list[TrainDatum]
    loss: LossFn
    config: LossConfig
    forward_only: bool


@dataclass
class _Targets:
    """Every (row, target id) pair of the packed batch, row-major, so [N] and [N, K] datums mix freely."""

    rows: np.ndarray  # int64, non-decreasing
    ids: np.ndarray  # int64
    # per datum (in segment order): its slice of the flat pairs and the shape of its target_tokens
    spans: list[tuple[int, int, tuple[int, ...]]]


def _named_params(w: AdapterWeights) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in w.a:
        out[f"{key}.lora_A"] = w.a[key]
        out[f"{key}.lora_B"] = w.b[key]
    return out


def _frozen_view(w: AdapterWeights) -> AdapterWeights:
    """The same tensors cut from autograd, so a forward-only segment never touches its run's accumulator."""
    return AdapterWeights(spec=w.spec, a={k: v.detach() for k, v in w.a.items()},
                          b={k: v.detach() for k, v in w.b.items()})


class Trainer:
    def __init__(self, model: CausalLM, device: torch.device,
                 logits_chunk_elems: int = DEFAULT_LOGITS_CHUNK_ELEMS, checkpoint_layers: bool = True):
        self.model = model
        self.cfg = model.cfg
        self.device = torch.device(device)
        first = next(model.parameters())
        self.model_dtype, self.model_device = first.dtype, first.device
        self.chunk_rows = max(1, logits_chunk_elems // self.cfg.vocab_size)
        self.checkpoint_layers = checkpoint_layers
        self._runs: dict[str, _Run] = {}
        self._counters = {"forward_backward_calls": 0, "optim_steps": 0, "tokens_trained": 0, "tokens_scored": 0}

    # ------------------------------------------------------------------------------------------- runs

    def _get(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise EngineUserError(f"unknown training run {run_id!r}")
        return run

    def _add(self, run_id: str, weights: AdapterWeights, optimizer: AdamW | None = None) -> None:
        if run_id in self._runs:
            raise EngineUserError(f"training run {run_id!r} already exists")
        for t in weights.parameters():
            t.requires_grad_(True)
        self._runs[run_id] = _Run(weights=weights, optimizer=optimizer or AdamW.for_params(_named_params(weights)))

    def create(self, run_id: str, spec: LoraSpec, seed: int | None) -> None:
        if spec.rank < 1:
            raise EngineUserError(f"lora_config.rank must be >= 1, got {spec.rank}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise EngineUserError("lora_config: at least one of train_attn, train_mlp, train_unembed must be true")
        if run_id in self._runs:  # before spending time on initialisation
            raise EngineUserError(f"training run {run_id!r} already exists")
        self._add(run_id, AdapterWeights.init(self.cfg, spec, seed, dtype=torch.float32, device=self.device))

    def remove(self, run_id: str) -> None:
        self._get(run_id)
        del self._runs[run_id]

    def has(self, run_id: str) -> bool:
        return run_id in self._runs

    def spec(self, run_id: str) -> LoraSpec:
        return self._get(run_id).weights.spec

    def snapshot(self, run_id: str) -> AdapterWeights:
        return self._get(run_id).weights.detached_copy(dtype=self.model_dtype, device=self.model_device)

    def stats(self) -> dict:
        return {"runs": len(self._runs), **self._counters}

    # ------------------------------------------------------------------------------------------- training

    def prepare(self, run_id: str, data: list[TrainDatum], loss_fn: str, loss_config: dict[str, float] | None,
                forward_only: bool) -> TrainSegment:
        """Check a request completely (run, loss, every datum) before any tensor is touched."""
        self._get(run_id)
        loss = resolve(loss_fn)
        config = LossConfig.parse(loss_config)
        validate(data, loss, self.cfg.vocab_size, self.cfg.max_position_embeddings)
        return TrainSegment(run_id, data, loss, config, forward_only)

    def forward_backward(self, run_id: str, data: list[TrainDatum], loss_fn: str, loss_config: dict[str, float],
                         forward_only: bool) -> ForwardBackwardResult:
        return self.run_segments([self.prepare(run_id, data, loss_fn, loss_config, forward_only)])[0]

    def run_segments(self, segments: list[TrainSegment]) -> list[ForwardBackwardResult]:
        """One packed forward (and backward, unless every segment is forward-only) over all segments' datums;
        each training segment's gradient is added to its run's accumulator. Results come back per segment."""
        runs = [self._get(s.run_id) for s in segments]
        lengths = [len(d.tokens) for s in segments for d in s.data]
        ids = torch.from_numpy(np.concatenate([np.asarray(d.tokens, dtype=np.int64) for s in segments
                                               for d in s.data])).to(self.model_device)
        lora_segments, start = [], 0
        for seg, run in zip(segments, runs):
            end = start + sum(len(d.tokens) for d in seg.data)
            weights = _frozen_view(run.weights) if seg.forward_only else run.weights
            lora_segments.append(LoraSegment(start, end, weights))
            start = end
        ctx = BatchContext.for_packed(lengths, lora=LoraBatch(lora_segments))
        targets = self._targets(segments)
        need_grad = not all(s.forward_only for s in segments)

        with torch.set_grad_enabled(need_grad):
            hidden = self.model.hidden_states(ids, ctx, checkpoint_layers=need_grad and self.checkpoint_layers)
            lp_flat = self._target_logprobs(hidden, ctx, targets)
            losses, to_backprop, span_iter = [], [], iter(targets.spans)
            for seg in segments:
                for d in seg.data:
                    lo, hi, shape = next(span_iter)
                    lp = lp_flat[lo:hi].view(shape)
                    elementwise = seg.loss.compute(lp, datum_inputs(d, seg.loss, lp.device), seg.config)
                    losses.append(elementwise.detach().reshape(-1))
                    if not seg.forward_only:
                        to_backprop.append(elementwise.sum())
            if to_backprop:
                torch.stack(to_backprop).sum().backward()

        # One device-to-host copy for the whole batch, then split per datum and per segment.
        lp_host = lp_flat.detach().float().cpu().numpy()
        loss_host = torch.cat(losses).float().cpu().numpy()
        results, span_iter = [], iter(targets.spans)
        for seg in segments:
            outputs, loss_sum = [], 0.0
            for _ in seg.data:
                lo, hi, shape = next(span_iter)
                outputs.append({"logprobs": lp_host[lo:hi].reshape(shape),
                                "elementwise_loss": loss_host[lo:hi].reshape(shape)})
                loss_sum += float(loss_host[lo:hi].sum(dtype=np.float64))
            ntokens = sum(len(d.tokens) for d in seg.data)
            results.append(ForwardBackwardResult(outputs, {"loss:sum": loss_sum, "ntokens:sum": float(ntokens)}))
            self._counters["tokens_scored"] += ntokens
            if not seg.forward_only:
                self._counters["tokens_trained"] += ntokens
        self._counters["forward_backward_calls"] += len(segments)
        return results

    def _targets(self, segments: list[TrainSegment]) -> _Targets:
        rows, ids, spans = [], [], []
        offset = flat = 0
        for seg in segments:
            for d in seg.data:
                t = np.asarray(d.inputs["target_tokens"], dtype=np.int64)
                n, k = len(d.tokens), (1 if t.ndim == 1 else t.shape[1])
                rows.append(np.repeat(np.arange(offset, offset + n, dtype=np.int64), k))
                ids.append(t.reshape(-1))
                spans.append((flat, flat + n * k, tuple(t.shape)))
                offset, flat = offset + n, flat + n * k
        return _Targets(np.concatenate(rows), np.concatenate(ids), spans)

    def _target_logprobs(self, hidden: torch.Tensor, ctx: BatchContext, targets: _Targets) -> torch.Tensor:
        """log_softmax(logits)[row, id] for every target pair, [chunk, vocab] logits at a time. With autograd on,
        each chunk runs under checkpointing: only its hidden rows are kept, its logits are rebuilt in backward."""
        total_rows = hidden.shape[0]
        starts = np.arange(0, total_rows, self.chunk_rows)
        bounds = np.searchsorted(targets.rows, np.append(starts, total_rows))
        rows = torch.from_numpy(targets.rows).to(hidden.device)
        ids = torch.from_numpy(targets.ids).to(hidden.device)
        pieces = []
        for i, r0 in enumerate(starts.tolist()):
            r1 = min(r0 + self.chunk_rows, total_rows)
            a, b = int(bounds[i]), int(bounds[i + 1])
            args = (hidden[r0:r1], ctx, r0, rows[a:b] - r0, ids[a:b])
            if torch.is_grad_enabled():
                pieces.append(checkpoint(self._chunk_logprobs, *args, use_reentrant=False))
            else:
                pieces.append(self._chunk_logprobs(*args))
        return torch.cat(pieces)

    def _chunk_logprobs(self, hidden: torch.Tensor, ctx: BatchContext, row_offset: int, local_rows: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(hidden, ctx, row_offset=row_offset).float()
        return logits[local_rows, ids] - torch.logsumexp(logits, dim=-1)[local_rows]

    def optim_step(self, run_id: str, params: AdamParams) -> dict[str, float]:
        metrics = self._get(run_id).optimizer.step(params)
        self._counters["optim_steps"] += 1
        return metrics

    # ------------------------------------------------------------------------------------------- checkpoints

    def save(self, run_id: str, out_dir: Path, with_optimizer: bool, base_model: str) -> int:
        run = self._get(run_id)
        written = save_peft(run.weights, out_dir, base_model)
        if with_optimizer:
            written += run.optimizer.save(out_dir)
        return written

    def load(self, run_id: str, src_dir: Path, with_optimizer: bool) -> LoraSpec:
        if run_id in self._runs:
            raise EngineUserError(f"training run {run_id!r} already exists")
        try:
            weights = load_peft(src_dir, self.cfg, dtype=torch.float32, device=self.device)
        except FileNotFoundError:
            raise EngineUserError("the checkpoint holds no adapter (adapter_config.json / "
                                  "adapter_model.safetensors missing)") from None
        except (ValueError, KeyError):
            raise EngineUserError("the checkpoint's adapter is unreadable or does not fit this base model "
                                  "(a target module's LoRA weights are missing)") from None
        self._check_shapes(weights)
        optimizer = AdamW.for_params(_named_params(weights))
        if with_optimizer:
            optimizer.load(src_dir)
        self._add(run_id, weights, optimizer)
        return weights.spec

    def _check_shapes(self, w: AdapterWeights) -> None:
        r = w.spec.rank
        for key in w.a:
            fan_in, fan_out = module_shape(self.cfg, key)
            if tuple(w.a[key].shape) != (r, fan_in) or tuple(w.b[key].shape) != (fan_out, r):
                raise EngineUserError(
                    f"the checkpoint's adapter does not fit this base model: {key} has LoRA shapes "
                    f"{list(w.a[key].shape)} / {list(w.b[key].shape)}, want {[r, fan_in]} / {[fan_out, r]}"
                )
