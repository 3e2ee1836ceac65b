"""Tiny checkpoints whose shapes exercise the tensor-parallel splits: kv heads split and replicated
(num_kv_heads < T), a vocabulary not divisible by T, tied embeddings, q/k/v biases (column-split) and
o/down biases (row-parallel: added once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.engine.tp import ranks
from tests.engine.tp.harness import run_ranks


def _build(root: Path, name: str, **kw) -> Path:
    from tinkerbell.engine.models.tiny import build_tiny_model

    path = root / "tp" / name
    if not (path / "config.json").exists():
        build_tiny_model(path, **kw)
    return path


def _llama_with_row_biases(root: Path) -> Path:
    """Llama with attention_bias and mlp_bias: o_proj and down_proj carry biases (build_tiny_model has none)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinkerbell.engine.models.tiny import build_tokenizer

    path = root / "tp" / "llama-row-bias"
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, vocab_size=384)
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.2,
                                  attention_bias=True, mlp_bias=True, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # HF initialises biases to zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tp_models(fixtures_root, tiny_llama_dir) -> dict[str, Path]:
    return {
        "llama_kv2": tiny_llama_dir,  # 4 heads, 2 kv heads: split over 2 ranks
        # kv 1 < T = 2 (replicated kv head), tied embeddings, 383 ids (odd: uneven vocab shards)
        "qwen3_kv1_odd_vocab": _build(fixtures_root, "qwen3-kv1", arch="qwen3", num_heads=4, num_kv_heads=1,
                                      tie_word_embeddings=True, vocab_size=383),
        "llama_biases": _llama_with_row_biases(fixtures_root),
    }


@dataclass
class TPRun:
    """One model's checks at TP 1 (in this process) and TP T (T gloo ranks): what `ranks.all_checks` returned
    for each, and where TP T saved its checkpoint."""

    path: Path
    ref: dict
    ranks: list[dict]
    saved: Path


@pytest.fixture(scope="session")
def tp_run(tp_models, tmp_path_factory) -> Callable[[str, int], TPRun]:
    """`tp_run(name, world)`: model `name`'s checks at TP 1 and TP `world`. Starting the rank processes is the
    slow part, so the first call for a world runs every case of `ranks.CASES` at that world in one spawn; the
    TP 1 reference of a model is shared by every world."""
    from tinkerbell.engine.models.loader import read_config

    cache: dict[tuple[str, int], TPRun] = {}
    refs: dict[str, dict] = {}
    root = tmp_path_factory.mktemp("tp-runs")

    def args_of(name: str) -> tuple:
        path = tp_models[name]
        cfg = read_config(path)
        adapters = root / "adapters" / name
        if not adapters.exists():
            ranks.write_adapter(cfg, adapters / "sampler", rank=4, seed=1, scale=0.3)
            # B small enough that the tiny model stays well-conditioned (with B ~ 0.3 the loss is ~10 nats per
            # token and float32 rounding in the gradients grows past 1e-5), large enough to reach every tensor.
            ranks.write_adapter(cfg, adapters / "train", rank=4, seed=5, scale=0.05)
        return path, adapters / "sampler", adapters / "train"

    def get(name: str, world: int) -> TPRun:
        if (name, world) not in cache:
            names = [n for n, w in ranks.CASES if w == world] or [name]
            jobs = [(*args_of(n), root / f"tp{world}" / n) for n in names]
            for n, job in zip(names, jobs):
                if n not in refs:
                    refs[n] = ranks.all_checks(None, *job[:3], root / "tp1" / n)
            per_rank = run_ranks(ranks.all_checks_many, world, jobs)
            for i, (n, job) in enumerate(zip(names, jobs)):
                cache[n, world] = TPRun(job[0], refs[n], [r[i] for r in per_rank], job[3])
        return cache[name, world]

    return get
