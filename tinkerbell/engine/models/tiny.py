"""Tiny random-weight checkpoints of real architectures, built offline and deterministically.

Used as the built-in demo model (`make serve` on a machine that cannot download) and as test fixtures. They
are written with HF transformers' own `save_pretrained`, so they load through exactly the path real
checkpoints take. A small byte-level BPE tokenizer is trained on a fixed corpus with `tokenizers`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEMO_CORPUS = """\
Hello! My name is Tinkerbell. I am a small demo model that lives on your own machine.
The quick brown fox jumps over the lazy dog. Alice, Bob and Carol each train their own adapter.
User: What is your name?
Assistant: My name is Tinkerbell.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { }
Training a LoRA adapter lowers the loss; sampling from it shows what it learned.
The answer is 42. Paris is the capital of France. Water boils at 100 degrees.
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer on DEMO_CORPUS and save it (HF fast-tokenizer format)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(DEMO_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    initializer_range: float = 0.2,
    vocab_size: int = 384,
) -> Path:
    """Write a random-weight HF checkpoint of `arch` ("llama", "qwen2", "qwen3") plus tokenizer to out_dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, vocab_size=vocab_size)
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = hidden_size // num_heads
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})
    )
    return out


def demo_model_dir() -> Path:
    """Where the built-in demo model lives (built on first use)."""
    root = Path(os.environ.get("TINKERBELL_CACHE", Path.home() / ".cache" / "tinkerbell"))
    return root / "demo-llama"


def ensure_demo_model() -> Path:
    path = demo_model_dir()
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        tmp = path.with_name(path.name + ".tmp")
        build_tiny_model(tmp, arch="llama", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                         intermediate_size=256, seed=1234, vocab_size=512)
        if path.exists():
            import shutil

            shutil.rmtree(path)
        os.replace(tmp, path)
    return path
