"""Fast-path building blocks against the reference paths, on the CPU: paged attention (torch form, and the
Triton kernel under TRITON_INTERPRET where Triton is installed), gathered multi-LoRA vs the segment loop, and
fused projections vs separate ones. The kernels themselves run on the GPU in bench/sampling_speed.py."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinkerbell.engine.batch import BatchContext, SeqSpan
from tinkerbell.engine import kernels
from tinkerbell.engine.kernels import gumbel_sample as gs
from tinkerbell.engine.kernels import paged_attention as pa
from tinkerbell.engine.kernels.lora_sgmv import TILE_M, LoraTiles, lora_apply, plan_tiles
from tinkerbell.engine.kv_cache import PagedKVCache
from tinkerbell.engine.lora import AdapterWeights, LoraBatch, LoraSegment, LoraSpec
from tinkerbell.engine.lora_gathered import GatheredLora
from tinkerbell.engine.lora_slots import LoraSlots
from tinkerbell.engine.models import llama
from tinkerbell.engine.models.loader import load_model, read_config

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(params=["torch", "triton-interpret"])
def backend(request, monkeypatch):
    if request.param == "triton-interpret":
        if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton is not installed (or was imported before TRITON_INTERPRET was set)")
        _patch_interpreter_scalar_index(monkeypatch)
        monkeypatch.setattr(kernels, "RUN_KERNELS_ON_CPU", True)
    return request.param


@pytest.fixture
def triton_interpreter(monkeypatch):
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton is not installed (or was imported before TRITON_INTERPRET was set)")
    _patch_interpreter_scalar_index(monkeypatch)
    monkeypatch.setattr(kernels, "RUN_KERNELS_ON_CPU", True)


def _patch_interpreter_scalar_index(monkeypatch) -> None:
    """Triton's CPU interpreter turns a loaded scalar into an int with int(array) of shape (1,), which numpy 2
    refuses; data-dependent loop bounds (a token's context length) need it. Interpreter-only, tests-only."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
    _patch_interpreter_float_rounding(monkeypatch)


def _patch_interpreter_float_rounding(monkeypatch) -> None:
    """Compiled Triton rounds a float32 → bfloat16 `.to()` to nearest, ties to even; Triton 3.6's interpreter
    truncates (and its optional "RTNE" mode rounds ties up), so bf16 kernels differed from torch in the last
    bit under the interpreter only. Tests-only."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_fp_trunc

    def rounded(self, src, dst_type):
        if not (src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16):
            return original(self, src, dst_type)
        bits = src.data.astype(np.float32).view(np.uint32).astype(np.uint64)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # NaN-free inputs here
        return interpreter.TensorHandle(out, dst_type.scalar)

    monkeypatch.setattr(builder, "create_fp_trunc", rounded)


def _attn_batch(block_size: int = 4):
    """Mixed batch: a fresh prompt, a prompt chunk over a cached prefix, two decode tokens; shuffled tables."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 8, 2, 16
    cache = PagedKVCache(1, 32, block_size, kv_heads, d, torch.float32, "cpu")
    cache.k[0].normal_(generator=g)
    cache.v[0].normal_(generator=g)
    perm = torch.randperm(32, generator=g).tolist()
    shapes = [(7, 7), (5, 13), (1, 9), (1, 22)]  # (new tokens, context after this step)
    spans, start = [], 0
    for n, c in shapes:
        nb = -(-c // block_size)
        spans.append(SeqSpan(start, n, c, [perm.pop() for _ in range(nb)]))
        start += n
    slots = torch.cat([cache.slots(s.block_table, s.context_len)[s.cached_len:] for s in spans])
    q = torch.randn(start, heads, d, generator=g)
    k = torch.randn(start, kv_heads, d, generator=g)
    v = torch.randn(start, kv_heads, d, generator=g)
    return cache, spans, slots, q, k, v


def test_paged_attention_equals_span_loop(backend):
    cache, spans, slots, q, k, v = _attn_batch()
    ref = llama.attend(q, k, v, BatchContext(spans, cache, slots), 0)
    meta = pa.meta_for_spans(spans, "cpu")
    got = llama.attend(q, k, v, BatchContext(spans, cache, slots, attn=meta), 0)
    assert (got - ref).abs().max().item() < 1e-5


def _slots_with_adapters(cfg, n: int, rank: int):
    slots = LoraSlots(cfg, max_loras=n, max_lora_rank=16, dtype=torch.float32, device="cpu")
    weights = []
    for i in range(n):
        w = AdapterWeights.init(cfg, LoraSpec(rank=rank + i, train_mlp=i % 2 == 0), seed=i)
        g = torch.Generator().manual_seed(100 + i)
        for key in w.b:
            w.b[key] = torch.randn(w.b[key].shape, generator=g)
        slots.register(f"a{i}", w)
        assert slots.acquire(f"a{i}") == i
        weights.append(slots.weights(i))
    return slots, weights


def test_tile_plan_groups_rows_by_slot():
    rows, tiles = plan_tiles(np.array([2, -1, 0, 2] + [1] * 20), num_tiles=8)
    assert rows[:1].tolist() == [2] and rows[21:].tolist() == [0, 3]
    live = tiles[tiles[:, 2] > 0].tolist()
    assert live == [[0, 0, 1], [1, 1, TILE_M], [1, 1 + TILE_M, 20 - TILE_M], [2, 21, 2]]
    assert (tiles[len(live):, 2] == 0).all()


def test_gathered_lora_equals_segment_loop(tiny_llama_dir, backend):
    cfg = read_config(tiny_llama_dir)
    slots, weights = _slots_with_adapters(cfg, 3, rank=2)
    row_slots = [1] * 5 + [-1] * 3 + [0] * 20 + [2] * 2 + [1] * 3
    g = torch.Generator().manual_seed(3)
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        fan_in, fan_out = slots.a[key].shape[2], slots.b[key].shape[1]
        x = torch.randn(len(row_slots), fan_in, generator=g)
        base = torch.randn(len(row_slots), fan_out, generator=g)
        segments, start = [], 0
        for i in range(1, len(row_slots) + 1):
            if i == len(row_slots) or row_slots[i] != row_slots[start]:
                s = row_slots[start]
                segments.append(LoraSegment(start, i, weights[s] if s >= 0 else None))
                start = i
        ref = LoraBatch(segments).apply(key, x, base.clone())
        got = GatheredLora.for_rows(slots, row_slots, torch.device("cpu")).apply(key, x, base.clone())
        assert (got - ref).abs().max().item() < 1e-4, key
        # Writing into a column slice of a wider output (the fused QKV case) leaves the other columns alone.
        wide = torch.cat([base, base], dim=1)
        GatheredLora.for_rows(slots, row_slots, torch.device("cpu")).apply(key, x, wide[:, :fan_out])
        assert (wide[:, :fan_out] - ref).abs().max().item() < 1e-4 and torch.equal(wide[:, fan_out:], base)


def test_padded_tile_plan_is_a_no_op_for_missing_rows(tiny_llama_dir):
    cfg = read_config(tiny_llama_dir)
    slots, _ = _slots_with_adapters(cfg, 1, rank=2)
    rows, tiles = plan_tiles(np.array([-1, -1]), num_tiles=4)
    plan = LoraTiles(torch.from_numpy(rows), *torch.from_numpy(tiles.T.copy()))
    key = "lm_head"
    x, out = torch.randn(2, slots.a[key].shape[2]), torch.randn(2, slots.b[key].shape[1])
    assert torch.equal(lora_apply(x, out.clone(), slots.a[key], slots.b[key], slots.scales, plan), out)


def test_fused_projections_equal_separate(tiny_qwen2_dir):
    plain = load_model(tiny_qwen2_dir, torch.float32, "cpu")
    fused = llama.CausalLM(plain.cfg)
    fused.load_state_dict(plain.state_dict())
    fused.fuse_projections()
    assert fused.model.layers[0].self_attn.qkv is not None and plain.model.layers[0].self_attn.qkv is None
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv[0].data_ptr()  # a view, not a second copy
    assert "model.layers.0.self_attn.q_proj.weight" in dict(fused.named_parameters())
    ids = torch.randint(0, fused.cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(0))
    ctx = BatchContext.for_packed([5, 7])
    with torch.no_grad():
        assert (fused(ids, ctx) - plain(ids, ctx)).abs().max().item() < 1e-4


def test_gumbel_sampler_equals_torch_form(backend):
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(0))
    temps = torch.tensor([0.0, 1.0, 0.5, 2.0, 1.0, 0.0])
    keys = gs.row_keys(torch.tensor([1, 2, 3, 2**62 + 5, 7, 9]), torch.tensor([5, 6, 7, 8, 9, 10]))
    got = gs.sample_rows(logits, temps, keys)
    assert torch.equal(got, gs.sample_rows_torch(logits, temps, keys))
    assert torch.equal(got[[0, 5]], logits[[0, 5]].argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gumbel_sampler_with_logprobs_equals_separate_ops(backend, dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 5000, generator=g) * 4).to(dtype)
    temps = torch.tensor([0.0, 1.0, 0.7, 1.5, 1.0])
    keys = gs.row_keys(torch.tensor([11, 12, 13, 14, 15]), torch.tensor([3, 4, 5, 6, 7]))
    out = (torch.full((5,), -1, dtype=torch.int64), torch.full((2, 5), float("nan"), dtype=torch.float64),
           torch.full((5,), float("nan")))
    tokens, both, lse = gs.sample_rows_logprob(logits, temps, keys, out)
    assert tokens is out[0] and both is out[1] and lse is out[2]
    lf = logits.float()
    ref_tokens = gs.sample_rows_torch(lf, temps, keys)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(both[0], ref_tokens.double())
    ref_lse = lf.logsumexp(-1)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-5)
    ref_lp = (lf.gather(-1, ref_tokens[:, None]).squeeze(-1) - ref_lse).double()
    torch.testing.assert_close(both[1], ref_lp, rtol=1e-6, atol=1e-5)


def test_gemv_equals_linear(triton_interpreter):
    """The GEMV has no torch form of its own (`linear` is F.linear off the GPU): Triton's interpreter only."""
    from tinkerbell.engine.kernels.gemv import linear

    g = torch.Generator().manual_seed(2)
    n, k = 37, 300  # neither a multiple of the blocks
    w, x = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, wins_alone=True), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_gemv_adds_the_bias(triton_interpreter):
    from tinkerbell.engine.kernels.gemv import linear

    g = torch.Generator().manual_seed(3)
    w, x, b = torch.randn(37, 300, generator=g), torch.randn(1, 300, generator=g), torch.randn(37, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, b, wins_alone=True), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
