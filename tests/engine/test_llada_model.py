"""LLaDA: the checkpoint format loads, and our forward equals a float32 reference assembled from HF transformers'
Llama modules (weights renamed, non-causal mask), with padding and cached keys never changing a row's logits."""

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from tinkerbell.engine import kernels
from tinkerbell.engine.models.config import ModelConfig, UnsupportedModelError
from tinkerbell.engine.models.llada import LLaDAModel
from tinkerbell.engine.models.loader import load_model, read_config


@pytest.fixture(scope="module")
def model(tiny_llada_dir):
    return load_model(tiny_llada_dir, torch.float32, "cpu")


def _hf_reference(path, cfg: ModelConfig):
    """Embedding, Llama decoder layers, final norm and head from transformers, fed the LLaDA tensors renamed."""
    from safetensors.torch import load_file

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, attn_implementation="eager")
    sd = load_file(str(path / "model.safetensors"))
    p = "model.transformer."
    layers = []
    for i in range(cfg.num_layers):
        layer = LlamaDecoderLayer(hf_cfg, i).eval()
        b = f"{p}blocks.{i}."
        layer.load_state_dict({
            "input_layernorm.weight": sd[b + "attn_norm.weight"],
            "post_attention_layernorm.weight": sd[b + "ff_norm.weight"],
            "self_attn.q_proj.weight": sd[b + "q_proj.weight"], "self_attn.k_proj.weight": sd[b + "k_proj.weight"],
            "self_attn.v_proj.weight": sd[b + "v_proj.weight"], "self_attn.o_proj.weight": sd[b + "attn_out.weight"],
            "mlp.gate_proj.weight": sd[b + "ff_proj.weight"], "mlp.up_proj.weight": sd[b + "up_proj.weight"],
            "mlp.down_proj.weight": sd[b + "ff_out.weight"],
        })
        layers.append(layer)
    norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    norm.load_state_dict({"weight": sd[p + "ln_f.weight"]})
    rotary = LlamaRotaryEmbedding(hf_cfg)
    head = sd.get(p + "ff_out.weight", sd[p + "wte.weight"])

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = torch.nn.functional.embedding(ids[None], sd[p + "wte.weight"])
            pos = torch.arange(len(ids))[None]
            cos_sin = rotary(h, pos)
            mask = torch.zeros(1, 1, len(ids), len(ids))  # additive and all zeros: bidirectional
            for layer in layers:
                out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
                h = out[0] if isinstance(out, tuple) else out
            return (norm(h) @ head.T)[0]

    return forward


def test_config_and_tokenizer_in_real_format(tiny_llada_dir):
    raw = json.loads((tiny_llada_dir / "config.json").read_text())
    assert raw["model_type"] == "llada" and {"d_model", "n_heads", "n_kv_heads", "mlp_hidden_size"} <= set(raw)
    cfg = read_config(tiny_llada_dir)
    assert cfg.is_diffusion and cfg.vocab_size == raw["embedding_size"] and cfg.num_kv_heads == 2
    tok = AutoTokenizer.from_pretrained(str(tiny_llada_dir))
    assert tok.mask_token_id == cfg.mask_token_id == raw["mask_token_id"]
    with pytest.raises(UnsupportedModelError, match="clip_qkv"):
        ModelConfig.from_hf_dict({**raw, "clip_qkv": 8.0})


def test_logits_match_hf_llama_with_bidirectional_mask(tiny_llada_dir, model):
    ref = _hf_reference(tiny_llada_dir, model.cfg)
    ids = torch.randint(0, model.cfg.vocab_size, (19,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(ids[None], torch.arange(19)[None], torch.ones(1, 19, dtype=torch.bool))
    expected = ref(ids)
    assert (ours - expected).abs().max().item() <= 1e-4
    # Bidirectional: changing the last token changes the first position's logits.
    ids2 = ids.clone()
    ids2[-1] = (ids2[-1] + 1) % model.cfg.vocab_size
    assert (ref(ids2)[0] - expected[0]).abs().max().item() > 1e-3


def test_padded_rows_equal_unpadded(model):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g) for n in (7, 16, 11)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, True
    pos = torch.arange(width).expand(3, width)
    with torch.no_grad():
        batched, _ = model(ids, pos, mask)
        batched = batched.view(3, width, -1)
        for i, s in enumerate(seqs):
            alone, _ = model(s[None], torch.arange(len(s))[None], torch.ones(1, len(s), dtype=torch.bool))
            assert (batched[i, :len(s)] - alone).abs().max().item() <= 1e-5


def test_cached_keys_and_fused_projections_give_full_forward_logits(tiny_llada_dir):
    model = load_model(tiny_llada_dir, torch.float32, "cpu")
    ids = torch.randint(0, model.cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(2))
    full_mask = torch.ones(1, 12, dtype=torch.bool)
    with torch.no_grad():
        full, kv = model(ids[None], torch.arange(12)[None], full_mask, want_kv=True)
        # The last 4 positions as queries over the first 8 positions' cached keys plus their own.
        tail, _ = model(ids[None, 8:], torch.arange(8, 12)[None], full_mask, past=kv[:, :, :, :8])
        model.fuse_projections()
        fused, _ = model(ids[None], torch.arange(12)[None], full_mask, logits_rows=torch.tensor([3, 9]))
    assert (tail - full[8:]).abs().max().item() <= 1e-5
    assert (fused - full[[3, 9]]).abs().max().item() <= 1e-5
    assert isinstance(model, LLaDAModel)
    assert set(dict(model.named_parameters())) >= {"model.transformer.blocks.0.q_proj.weight",
                                                   "model.transformer.ff_out.weight"}


# "cpu": the kernels' torch forms; "cpu-triton": the Triton kernels in Triton's CPU interpreter (where Triton is
# installed: tests/engine/conftest.py chooses the interpreter); "cuda": the Triton kernels on the GPU.
DEVICES = ["cpu", "cpu-triton"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def kernel_device(request, monkeypatch) -> str:
    if request.param == "cpu-triton":
        if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton is not installed (or was imported before TRITON_INTERPRET was set)")
        monkeypatch.setattr(kernels, "RUN_KERNELS_ON_CPU", True)
        return "cpu"
    return request.param


def _padded_batch(model, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, model.cfg.vocab_size, (3, 12), generator=g)
    pos = torch.arange(12).expand(3, 12) + torch.tensor([[0], [5], [2]])  # rows start at their own positions
    key_mask = torch.ones(3, 12, dtype=torch.bool)
    key_mask[1, 9:] = False  # row 1 is padded
    return ids, pos, key_mask


@pytest.mark.parametrize("kernel_device", DEVICES, indirect=True)
@pytest.mark.parametrize("fused", [False, True])
def test_fast_forward_equals_plain_forward(tiny_llada_dir, kernel_device, fused):
    """The sampler's path (fused add+RMSNorm, RoPE from the cos/sin table written into the key/value buffer,
    silu·mul, one SDPA over the buffer) computes what the modules as written compute: with its kernels' torch
    forms, to the bit; with the Triton kernels, to float32 rounding."""
    device = kernel_device
    model = load_model(tiny_llada_dir, torch.float32, device)
    if fused:
        model.fuse_projections()
    ids, pos, key_mask = (t.to(device) for t in _padded_batch(model, torch.Generator().manual_seed(3)))
    rows = torch.tensor([0, 4, 13, 20, 35], device=device)
    tol = 0.0 if device == "cpu" and not kernels.RUN_KERNELS_ON_CPU else 1e-4
    with torch.no_grad():
        fast, fast_kv = model(ids, pos, key_mask, logits_rows=rows, want_kv=True)
        plain, plain_kv = model(ids, pos, key_mask, logits_rows=rows, want_kv=True, plain=True)
    valid = torch.tensor([True, True, False, True, True], device=device)  # row 20 = padded row 1's position 8
    torch.testing.assert_close(fast[valid], plain[valid], rtol=0, atol=tol)
    torch.testing.assert_close(fast_kv, plain_kv, rtol=0, atol=tol)


@pytest.mark.parametrize("kernel_device", DEVICES, indirect=True)
def test_cached_context_with_room_equals_without(tiny_llada_dir, kernel_device):
    """`past` may carry room for the new keys (the sampler's buffer: they are written in place, no concatenation)
    or hold only the cached ones (copied into such a buffer): same logits as the plain path's concatenation, and
    the new keys returned are a view of the room."""
    device = kernel_device
    model = load_model(tiny_llada_dir, torch.float32, device)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=g).to(device)
    pos = torch.arange(12, device=device).expand(2, 12)
    ones = torch.ones(2, 12, dtype=torch.bool, device=device)
    tol = 0.0 if device == "cpu" and not kernels.RUN_KERNELS_ON_CPU else 1e-4
    with torch.no_grad():
        _, kv = model(ids, pos, ones, want_kv=True, plain=True)
        past = kv[:, :, :, :8].clone()
        room = torch.zeros(*past.shape[:3], 12, *past.shape[4:], device=device)
        room[:, :, :, :8] = past
        plain, _ = model(ids[:, 8:], pos[:, 8:], ones, past=past, plain=True)
        tight, _ = model(ids[:, 8:], pos[:, 8:], ones, past=past)
        roomy, new_kv = model(ids[:, 8:], pos[:, 8:], ones, past=room, want_kv=True)
    torch.testing.assert_close(tight, plain, rtol=0, atol=tol)
    torch.testing.assert_close(roomy, plain, rtol=0, atol=tol)
    assert new_kv.data_ptr() == room[:, :, :, 8:].data_ptr()  # the new keys were written into the room
    torch.testing.assert_close(room[:, :, :, :8], past, rtol=0, atol=0)  # the cached keys are left alone
