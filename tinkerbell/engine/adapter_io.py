"""LoRA adapters on disk in PEFT format (`adapter_model.safetensors` + `adapter_config.json`).

The files are exactly what `peft.PeftModel.from_pretrained` (and vLLM) load, and nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinkerbell.engine.lora import ATTN_MODULES, MLP_MODULES, UNEMBED_KEY, AdapterWeights, LoraSpec
from tinkerbell.engine.models.config import ModelConfig

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_PREFIX = "base_model.model."


def save_peft(weights: AdapterWeights, out_dir: Path, base_model: str) -> int:
    """Write the adapter into out_dir (created); returns the bytes written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = weights.spec
    tensors: dict[str, torch.Tensor] = {}
    for key in weights.a:
        tensors[f"{_PREFIX}{key}.lora_A.weight"] = weights.a[key].detach().float().cpu().contiguous()
        tensors[f"{_PREFIX}{key}.lora_B.weight"] = weights.b[key].detach().float().cpu().contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "target_modules": spec.target_module_names(),
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return sum(f.stat().st_size for f in (out_dir / WEIGHTS_FILE, out_dir / CONFIG_FILE))


def read_spec(src_dir: Path) -> LoraSpec:
    cfg = json.loads((src_dir / CONFIG_FILE).read_text())
    # Which module groups are trained is fully told by PEFT's own target_modules.
    targets = set(cfg.get("target_modules") or [])
    return LoraSpec(
        rank=int(cfg["r"]),
        alpha=float(cfg.get("lora_alpha", cfg["r"])),
        train_attn=bool(targets & set(ATTN_MODULES)),
        train_mlp=bool(targets & set(MLP_MODULES)),
        train_unembed=UNEMBED_KEY in targets,
    )


def load_peft(src_dir: Path, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> AdapterWeights:
    """Read an adapter written by save_peft (or by PEFT itself for the same target modules)."""
    spec = read_spec(src_dir)
    raw = load_file(str(src_dir / WEIGHTS_FILE))
    out = AdapterWeights(spec=spec)
    for key in spec.target_keys(cfg):
        a, b = raw.get(f"{_PREFIX}{key}.lora_A.weight"), raw.get(f"{_PREFIX}{key}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"adapter in {src_dir} lacks LoRA weights for {key}")
        out.a[key] = a.to(device=device, dtype=dtype)
        out.b[key] = b.to(device=device, dtype=dtype)
    return out
