"""Shared fixtures: tiny random-weight checkpoints of real architectures, built once per test session.

Paths are absolute and contain no ':' and not exactly two '/' after the root segment, so the tinker SDK and
cookbook treat them as local tokenizer folders (tinker_api.md 8.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _build(root: Path, name: str, **kw) -> Path:
    from tinkerbell.engine.models.tiny import build_tiny_model

    path = root / "fx" / name
    if not (path / "config.json").exists():
        build_tiny_model(path, **kw)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(fixtures_root) -> Path:
    return _build(fixtures_root, "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(fixtures_root) -> Path:
    return _build(fixtures_root, "tiny-qwen3", arch="qwen3", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(fixtures_root) -> Path:
    return _build(fixtures_root, "tiny-qwen2", arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llada_dir(fixtures_root) -> Path:
    """A random-weight LLaDA checkpoint in the published format (config, real tensor names, mask token)."""
    from tinkerbell.engine.models.tiny import build_tiny_llada

    path = fixtures_root / "fx" / "tiny-llada"
    if not (path / "config.json").exists():
        build_tiny_llada(path)
    return path
