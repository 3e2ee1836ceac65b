"""Weights from a `torch.distributed.checkpoint` (DCP) folder, loaded onto a base model's architecture in memory.

Training frameworks (FSDP, torchtitan, ...) save sharded DCP folders; serving one used to mean converting it to
safetensors through /tmp first. Here the base model folder supplies config and tokenizer, the module is built
empty, and DCP reads every tensor straight into its parameters (resharding to one process as it reads).

Frameworks nest or prefix the names (`model.`, `module.`, `_orig_mod.`, a top-level `{"model": {...}}` which DCP
flattens to `model.<name>`); each of our parameter names is matched to exactly one checkpoint key, with or without
those prefixes. Anything left unmatched is an error that names it, never a silently random weight.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.models.loader import read_config

PREFIXES = ("", "model.", "module.", "_orig_mod.", "model.module.", "module._orig_mod.", "model._orig_mod.")


class DCPLoadError(ValueError):
    pass


def checkpoint_keys(dcp_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names in a DCP folder and their (global) shapes."""
    if not (dcp_dir / ".metadata").exists():
        raise DCPLoadError(f"{dcp_dir} is not a torch.distributed.checkpoint folder (no .metadata file)")
    meta = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
    out = {}
    for key, item in meta.state_dict_metadata.items():
        size = getattr(item, "size", None)
        if size is not None:
            out[key] = tuple(size)
    return out


def match_keys(ours: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Our parameter name -> the checkpoint key holding it (same shape)."""
    mapping, missing = {}, []
    for name, shape in ours.items():
        hits = [p + name for p in PREFIXES if p + name in theirs and theirs[p + name] == shape]
        if not hits:
            missing.append(name)
            continue
        mapping[name] = hits[0]
    if missing:
        raise DCPLoadError(f"the DCP checkpoint lacks {len(missing)} of the model's tensors (or their shapes "
                           f"differ), e.g. {missing[:3]}; checkpoint keys look like {sorted(theirs)[:3]}")
    return mapping


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    if cfg.is_diffusion:
        from tinkerbell.engine.models.llada import new_llada

        return new_llada(cfg, device, dtype)
    from tinkerbell.engine.models.llama import CausalLM

    with torch.device("meta"):
        model = CausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty gives every parameter its own storage; tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = cfg.inv_freq().to(device)
    return model


def load_model_from_dcp(base_path: Path, dcp_dir: Path, dtype: torch.dtype,
                        device: torch.device | str) -> nn.Module:
    """The base model's architecture (from `base_path`'s config.json) with every weight read from `dcp_dir`."""
    cfg = read_config(base_path)
    model = _empty_model(cfg, dtype, device)
    # Tied parameters appear once in named_parameters(): the head is read with the embedding.
    params = dict(model.named_parameters())
    mapping = match_keys({n: tuple(p.shape) for n, p in params.items()}, checkpoint_keys(dcp_dir))
    # DCP reads into the tensors it is given; read in the checkpoint's dtype on CPU, then cast and place,
    # so a float32 training checkpoint loads into a bf16 server without a float32 copy on the GPU.
    meta = dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
    staging = {}
    for name, key in mapping.items():
        dt = getattr(getattr(meta[key], "properties", None), "dtype", None) or torch.float32
        staging[key] = torch.empty(params[name].shape, dtype=dt)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(staging, checkpoint_id=str(dcp_dir), no_dist=True)
    with torch.no_grad():
        for name, key in mapping.items():
            params[name].copy_(staging.pop(key).to(dtype))
    model.requires_grad_(False)
    return model.eval()
