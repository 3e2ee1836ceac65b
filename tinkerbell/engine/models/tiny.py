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


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 384, extra_special: tuple[str, ...] = (),
                    **special_kwargs: str):
    """Train a byte-level BPE tokenizer on DEMO_CORPUS and save it (HF fast-tokenizer format). `extra_special`
    adds special tokens after the standard ones; `special_kwargs` names roles for them (e.g. mask_token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special),
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
        **special_kwargs,
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


LLADA_MASK_TOKEN = "<|mdm_mask|>"


def build_tiny_llada(
    out_dir: str | os.PathLike,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    mlp_hidden_size: int = 128,
    weight_tying: bool = False,
    seed: int = 0,
    initializer_range: float = 0.2,
    vocab_size: int = 384,
    embedding_pad: int = 8,
) -> Path:
    """Write a random-weight LLaDA checkpoint in the published format: an OLMo-style config.json with
    model_type "llada", safetensors under the real names (model.transformer.wte, .blocks.N.q_proj, ...), and a
    tokenizer with a mask token. The embedding is padded beyond the vocabulary as LLaDA's is."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, vocab_size=vocab_size, extra_special=(LLADA_MASK_TOKEN,),
                          mask_token=LLADA_MASK_TOKEN)
    vocab = len(tok)
    embedding_size = vocab + embedding_pad
    head_dim = d_model // n_heads
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": d_model, "n_heads": n_heads,
        "n_kv_heads": n_kv_heads, "n_layers": n_layers, "mlp_hidden_size": mlp_hidden_size, "mlp_ratio": 4,
        "vocab_size": vocab, "embedding_size": embedding_size, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "max_sequence_length": 4096, "mask_token_id": tok.mask_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "weight_tying": weight_tying,
        "include_bias": False, "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
        "rope": True, "alibi": False, "flash_attention": False, "clip_qkv": None, "input_emb_norm": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * initializer_range

    p = "model.transformer."
    tensors = {p + "wte.weight": rnd(embedding_size, d_model), p + "ln_f.weight": 1 + rnd(d_model) * 0.5}
    for i in range(n_layers):
        b = f"{p}blocks.{i}."
        tensors |= {
            b + "attn_norm.weight": 1 + rnd(d_model) * 0.5, b + "ff_norm.weight": 1 + rnd(d_model) * 0.5,
            b + "q_proj.weight": rnd(n_heads * head_dim, d_model), b + "k_proj.weight": rnd(n_kv_heads * head_dim, d_model),
            b + "v_proj.weight": rnd(n_kv_heads * head_dim, d_model), b + "attn_out.weight": rnd(d_model, n_heads * head_dim),
            b + "ff_proj.weight": rnd(mlp_hidden_size, d_model), b + "up_proj.weight": rnd(mlp_hidden_size, d_model),
            b + "ff_out.weight": rnd(d_model, mlp_hidden_size),
        }
    if not weight_tying:
        tensors[p + "ff_out.weight"] = rnd(embedding_size, d_model)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}))
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
