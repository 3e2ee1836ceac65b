"""Per-adapter AdamW with the caller's hyper-parameters on every step, and its state on disk.

The update is torch.optim.AdamW's single-tensor algorithm (decoupled weight decay, bias correction, eps outside
the square root) and the clipping is torch.nn.utils.clip_grad_norm_'s; they are re-stated here because Tinker
sends new hyper-parameters with every `optim_step` (schedules live client-side), and because the state has to
travel in checkpoints as plain named tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tinkerbell.engine.types import AdamParams, EngineUserError

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

    @classmethod
    def for_params(cls, params: dict[str, torch.Tensor]) -> "AdamW":
        return cls(
            params=params,
            exp_avg={k: torch.zeros_like(p) for k, p in params.items()},
            exp_avg_sq={k: torch.zeros_like(p) for k, p in params.items()},
        )

    @torch.no_grad()
    def step(self, hp: AdamParams) -> dict[str, float]:
        """One AdamW step on the accumulated gradients, which are then cleared. Parameters without a gradient
        are left alone (as torch's optimizers do), so a step with nothing accumulated changes nothing."""
        check_params(hp)
        live = {k: p for k, p in self.params.items() if p.grad is not None}
        if not live:
            return {"grad_norm": 0.0, "learning_rate": hp.learning_rate}
        grads = [p.grad for p in live.values()]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if not math.isfinite(grad_norm):
            # One overflowing ratio (e.g. sampler logprobs far from the model's) would turn every weight into
            # NaN for good; refusing the step keeps the run usable.
            for p in live.values():
                p.grad = None
            raise EngineUserError(f"the accumulated gradient is not finite (norm {grad_norm}); the step was "
                                  "skipped and the gradients dropped. Check the loss inputs (logprobs, advantages)")
        if hp.grad_clip_norm > 0:
            coef = min(hp.grad_clip_norm / (grad_norm + 1e-6), 1.0)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        self.step_count += 1
        bias1 = 1 - hp.beta1**self.step_count
        bias2_sqrt = math.sqrt(1 - hp.beta2**self.step_count)
        for k, p in live.items():
            g, m, v = p.grad, self.exp_avg[k], self.exp_avg_sq[k]
            p.mul_(1 - hp.learning_rate * hp.weight_decay)
            m.lerp_(g, 1 - hp.beta1)
            v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
            denom = (v.sqrt() / bias2_sqrt).add_(hp.eps)
            p.addcdiv_(m, denom, value=-hp.learning_rate / bias1)
            p.grad = None
        return {"grad_norm": grad_norm, "learning_rate": hp.learning_rate}

    def save(self, out_dir: Path) -> int:
        """Write the moments and step count next to the adapter files; returns the bytes written."""
        tensors = {f"exp_avg.{k}": t.detach().cpu().contiguous() for k, t in self.exp_avg.items()}
        tensors.update({f"exp_avg_sq.{k}": t.detach().cpu().contiguous() for k, t in self.exp_avg_sq.items()})
        path = out_dir / STATE_FILE
        save_file(tensors, str(path), metadata={"format": _FORMAT, "step": str(self.step_count)})
        return path.stat().st_size

    def load(self, src_dir: Path) -> None:
        """Restore state written by `save` for the same parameter names."""
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
                self.exp_avg[k] = f.get_tensor(f"exp_avg.{k}").to(device=p.device, dtype=p.dtype)
                self.exp_avg_sq[k] = f.get_tensor(f"exp_avg_sq.{k}").to(device=p.device, dtype=p.dtype)
            self.step_count = int(meta["step"])
