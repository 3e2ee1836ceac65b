"""Per-adapter AdamW with the caller's hyper-parameters on every step, and its state on disk.

The update is torch.optim.AdamW's single-tensor algorithm (decoupled weight decay, bias correction, eps outside
the square root) and the clipping is torch.nn.utils.clip_grad_norm_'s; they are re-stated here because Tinker
sends new hyper-parameters with every `optim_step` (schedules live client-side), and because the state has to
travel in checkpoints as plain named tensors.

Under tensor parallelism each rank steps its own pieces of the adapters; the gradient norm (clipping, the
non-finite check) is the whole adapter's, summed over ranks with each replicated tensor counted once
(`AdamW.norm_owner`), so every rank takes the same decision and replicated tensors stay identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from tinkerbell.engine.training_params import views_like
from tinkerbell.engine.types import AdamParams, EngineUserError

if TYPE_CHECKING:
    from tinkerbell.engine.tp.group import TPGroup

STATE_FILE = "optimizer_state.safetensors"
_FORMAT = "tinkerbell-adamw-1"


def check_params(p: AdamParams) -> None:
    for f in fields(p):
        value = getattr(p, f.name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EngineUserError(f"adam_params.{f.name} must be a finite number, got {value!r}")
    for name in ("learning_rate", "eps", "weight_decay", "grad_clip_norm"):
        if getattr(p, name) < 0:
            raise EngineUserError(f"adam_params.{name} must be >= 0, got {getattr(p, name)}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(p, name) < 1.0:
            raise EngineUserError(f"adam_params.{name} must be in [0, 1), got {getattr(p, name)}")


@dataclass
class AdamW:
    """Moments for named parameters (leaf tensors whose `.grad` accumulates between steps)."""

    params: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step_count: int = 0
    # Tensor parallel: whether this rank counts each parameter in the global gradient norm (the first of the
    # ranks holding a replicated tensor does; every rank counts its split pieces). None: all of them.
    norm_owner: dict[str, bool] | None = None
    # Parameters packed in one buffer (training_params.pack), in `params` order: that buffer and the moments'
    # matching buffers (the dicts' entries are views of them), so a step is a few ops on three tensors.
    flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_params(cls, params: dict[str, torch.Tensor], flat: torch.Tensor | None = None) -> "AdamW":
        """Zero moments for `params`; with `flat` (the buffer the params tile, in order) the moments are
        buffers laid out alike."""
        if flat is None:
            return cls(params=params, exp_avg={k: torch.zeros_like(p) for k, p in params.items()},
                       exp_avg_sq={k: torch.zeros_like(p) for k, p in params.items()})
        at = flat.storage_offset()
        for p in params.values():  # the flat step relies on it: gradients concatenated in dict order tile `flat`
            assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and p.storage_offset() == at, \
                "the parameters must tile the flat buffer in order"
            at += p.numel()
        assert at == flat.storage_offset() + flat.numel(), "the parameters must tile the flat buffer in order"
        m, v = torch.zeros_like(flat), torch.zeros_like(flat)
        tensors = list(params.values())
        return cls(params=params, exp_avg=dict(zip(params, views_like(m, flat, tensors))),
                   exp_avg_sq=dict(zip(params, views_like(v, flat, tensors))), flat=(flat, m, v))

    def step(self, hp: AdamParams) -> dict[str, float]:
        """One AdamW step on the accumulated gradients, which are then cleared. Parameters without a gradient
        are left alone (as torch's optimizers do), so a step with nothing accumulated changes nothing."""
        out = fused_step([self], [hp])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def save(self, out_dir: Path) -> int:
        """Write the moments and step count next to the adapter files; returns the bytes written."""
        tensors = {f"exp_avg.{k}": t.detach().cpu().contiguous() for k, t in self.exp_avg.items()}
        tensors.update({f"exp_avg_sq.{k}": t.detach().cpu().contiguous() for k, t in self.exp_avg_sq.items()})
        path = out_dir / STATE_FILE
        save_file(tensors, str(path), metadata={"format": _FORMAT, "step": str(self.step_count)})
        return path.stat().st_size

    def load(self, src_dir: Path, reshard: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> None:
        """Restore state written by `save` for the same parameter names; `reshard(name, whole)` cuts each
        saved (whole) moment to this rank's piece under tensor parallelism."""
        path = src_dir / STATE_FILE
        if not path.exists():
            raise EngineUserError("this checkpoint has no optimizer state (it was saved without it); "
                                  "load its weights only")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise EngineUserError(f"unrecognised optimizer state format {meta.get('format')!r}")
            names = set(f.keys())
            want = {f"{kind}.{k}" for kind in ("exp_avg", "exp_avg_sq") for k in self.params}
            if names != want:
                raise EngineUserError("the checkpoint's optimizer state does not match its adapter's parameters")
            for k, p in self.params.items():
                for kind, moments in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                    t = f.get_tensor(f"{kind}.{k}")
                    if reshard is not None:
                        t = reshard(k, t)
                    if t.shape != p.shape:
                        raise EngineUserError("the checkpoint's optimizer state does not match its adapter's "
                                              f"shapes ({kind}.{k}: {list(t.shape)} vs {list(p.shape)})")
                    moments[k].copy_(t)  # in place: the entries may be views of one buffer
            self.step_count = int(meta["step"])


@torch.no_grad()
def fused_step(opts: Sequence[AdamW], hps: Sequence[AdamParams],
               tp: "TPGroup | None" = None) -> list[dict[str, float] | EngineUserError]:
    """One AdamW step for each (optimizer, hyper-parameters) pair, as a handful of `torch._foreach_*` launches
    over every tensor of every adapter instead of ~6 launches per tensor. Per-tensor scalar lists carry each
    run's own learning rate, betas and bias corrections, so the arithmetic is exactly the per-run update.

    A run whose parameters or gradients are refused gets its EngineUserError in its result slot; the others
    step regardless. One device-to-host sync reads every run's gradient norm.

    With `tp` every rank calls this with the same runs (gradients already summed over ranks where replicated):
    one all-reduce adds the ranks' squared norms, so the norm, the clipping and the refusals agree."""
    results: list[dict[str, float] | EngineUserError | None] = [None] * len(opts)
    live: list[tuple[int, AdamW, AdamParams, list[str]]] = []
    for i, (opt, hp) in enumerate(zip(opts, hps)):
        try:
            check_params(hp)
        except EngineUserError as e:
            results[i] = e
            continue
        keys = [k for k, p in opt.params.items() if p.grad is not None]
        if keys:
            live.append((i, opt, hp, keys))
        else:
            results[i] = {"grad_norm": 0.0, "learning_rate": hp.learning_rate}
    if not live:
        return results  # type: ignore[return-value]

    # Per run, the tensors the step works on: a packed run's three buffers and its gradients concatenated in
    # one copy (when every parameter has one and the norm is not tensor-parallel), else every tensor.
    grads_of, state_of = [], []
    for _, opt, _, keys in live:
        if opt.flat is not None and tp is None and opt.norm_owner is None and len(keys) == len(opt.params):
            grads_of.append([torch.cat([opt.params[k].grad.reshape(-1) for k in keys])])
            state_of.append(([opt.flat[0]], [opt.flat[1]], [opt.flat[2]]))
        else:
            grads_of.append([opt.params[k].grad for k in keys])
            state_of.append(([opt.params[k] for k in keys], [opt.exp_avg[k] for k in keys],
                             [opt.exp_avg_sq[k] for k in keys]))
    flat_norms = torch._foreach_norm([g for grads in grads_of for g in grads])
    if tp is None:
        run_norms, at = [], 0
        for grads in grads_of:
            run_norms.append(flat_norms[at] if len(grads) == 1
                             else torch.linalg.vector_norm(torch.stack(flat_norms[at:at + len(grads)])))
            at += len(grads)
        norms = torch.stack(run_norms).tolist()
    else:
        norms = _global_norms(live, flat_norms, tp)

    P, G, M, V = [], [], [], []
    decay, lerp_w, beta2, one_minus_beta2, bias2_sqrt, eps, step_size = [], [], [], [], [], [], []
    for (i, opt, hp, keys), grads, (params, exp_avg, exp_avg_sq), grad_norm in zip(live, grads_of, state_of, norms):
        if not math.isfinite(grad_norm):
            # One overflowing ratio (e.g. sampler logprobs far from the model's) would turn every weight into
            # NaN for good; refusing the step keeps the run usable.
            for k in keys:
                opt.params[k].grad = None
            results[i] = EngineUserError(
                f"the accumulated gradient is not finite (norm {grad_norm}); the step was skipped and the "
                "gradients dropped. Check the loss inputs (logprobs, advantages)")
            continue
        if hp.grad_clip_norm > 0:
            coef = min(hp.grad_clip_norm / (grad_norm + 1e-6), 1.0)
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)
        opt.step_count += 1
        n = len(params)
        P += params
        G += grads
        M += exp_avg
        V += exp_avg_sq
        decay += [1 - hp.learning_rate * hp.weight_decay] * n
        lerp_w += [1 - hp.beta1] * n
        beta2 += [hp.beta2] * n
        one_minus_beta2 += [1 - hp.beta2] * n
        bias2_sqrt += [math.sqrt(1 - hp.beta2**opt.step_count)] * n
        eps += [hp.eps] * n
        step_size += [-hp.learning_rate / (1 - hp.beta1**opt.step_count)] * n
        results[i] = {"grad_norm": grad_norm, "learning_rate": hp.learning_rate}
    if P:
        torch._foreach_mul_(P, decay)
        torch._foreach_lerp_(M, G, lerp_w)
        torch._foreach_mul_(V, beta2)
        torch._foreach_addcmul_(V, G, G, one_minus_beta2)
        denom = torch._foreach_sqrt(V)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(P, M, denom, step_size)
    for i, opt, _, keys in live:
        if not isinstance(results[i], Exception):
            for k in keys:
                opt.params[k].grad = None
    return results  # type: ignore[return-value]


def _global_norms(live: list[tuple[int, AdamW, AdamParams, list[str]]], flat_norms: list[torch.Tensor],
                  tp: "TPGroup") -> list[float]:
    """Each run's gradient norm over its whole adapter: this rank's squared norms of the tensors it counts,
    summed over the ranks in one all-reduce."""
    squares, at = [], 0
    for _, opt, _, keys in live:
        counted = [flat_norms[at + j].float() for j, k in enumerate(keys)
                   if opt.norm_owner is None or opt.norm_owner[k]]
        at += len(keys)
        squares.append(torch.stack(counted).square().sum() if counted
                       else flat_norms[0].new_zeros((), dtype=torch.float32))
    total = torch.stack(squares)
    dist.all_reduce(total, group=tp.group)
    return total.sqrt().tolist()
