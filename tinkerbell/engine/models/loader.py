"""Find a checkpoint (local folder or HF hub cache), read its config, load its safetensors into our module."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from tinkerbell.engine.models.config import ModelConfig
from tinkerbell.engine.models.llama import CausalLM
from tinkerbell.engine.tp.group import TPGroup
from tinkerbell.engine.tp.shard import ROW_BIAS, ShardInfo, param_split


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_path(model: str, allow_download: bool = False) -> Path:
    """A local folder as is; otherwise an HF hub id looked up in the local cache (downloaded if allowed)."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFoundError(f"{p} has no config.json; point --model at an HF model folder")
        return p.resolve()
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelNotFoundError(f"{model!r} is not a local folder and huggingface_hub is missing") from e
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if not allow_download:
            raise ModelNotFoundError(
                f"{model!r} is neither a local folder nor in the HF cache; download it "
                f"(huggingface-cli download {model}) or pass a folder"
            ) from None
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:
        raise ModelNotFoundError(f"could not download {model!r}: {e}") from None


def read_config(path: Path) -> ModelConfig:
    cfg = json.loads((path / "config.json").read_text())
    gen = path / "generation_config.json"
    if gen.exists() and cfg.get("eos_token_id") is None:
        cfg["eos_token_id"] = json.loads(gen.read_text()).get("eos_token_id")
    return ModelConfig.from_hf_dict(cfg)


def load_model(path: Path, dtype: torch.dtype, device: torch.device | str, tp: TPGroup | None = None) -> CausalLM:
    """The checkpoint as our module; under `tp`, this rank's shard, read slice by slice from the safetensors
    (never a whole tensor in host memory)."""
    cfg = read_config(path)
    if cfg.is_diffusion:  # LLaDA: its own module (bidirectional), same folder layout
        if tp is not None:
            raise ValueError("tensor parallelism (--tp) is not supported for diffusion models (LLaDA); use --tp 1")
        from tinkerbell.engine.models.llada import load_llada

        return load_llada(path, cfg, dtype, device)  # type: ignore[return-value]
    with torch.device("meta"):
        model = CausalLM(cfg, tp)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:  # to_empty gives every parameter its own storage; tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = cfg.inv_freq().to(device)
    params = dict(model.named_parameters())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors in {path}")
    seen: set[str] = set()
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    if name not in params:
                        continue  # e.g. rotary buffers of older exports
                    if model.shard is None:
                        params[name].copy_(st.get_tensor(name).to(dtype))
                    else:
                        _load_shard(st, name, params[name], model.shard, dtype)
                    seen.add(name)
    missing = set(params) - seen
    if cfg.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.requires_grad_(False)
    return model.eval()


def _load_shard(st, name: str, param: torch.Tensor, shard: ShardInfo, dtype: torch.dtype) -> None:
    """Copy this rank's part of tensor `name` into `param`, reading only that part (`get_slice`)."""
    split = param_split(name, shard)
    if split == ROW_BIAS:  # added once, after the all-reduce of the partial sums: rank 0 holds it
        if shard.rank == 0:
            param.copy_(st.get_tensor(name).to(dtype))
        else:
            param.zero_()
        return
    if split is None:
        piece = st.get_tensor(name)
    else:
        dim, start, end = split
        sl = st.get_slice(name)
        piece = sl[start:end] if dim == 0 else sl[:, start:end]
    if tuple(piece.shape) != tuple(param.shape):
        raise ValueError(f"{name}: the checkpoint's slice has shape {list(piece.shape)}, this rank's shard "
                         f"expects {list(param.shape)} (config.json does not match the weights?)")
    param.copy_(piece.to(dtype))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AutoTokenizer.from_pretrained(str(path))
