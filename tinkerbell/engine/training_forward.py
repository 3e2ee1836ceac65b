"""The training forward over a packed batch: the model's own layers and weights, with attention over all
sequences at once on GPU and LoRA computed in the base model's dtype from the fp32 masters.

Why not `CausalLM.hidden_states`: its `attend` loops over the sequences of the batch in Python (one SDPA call
and one GQA expansion per sequence per layer, in forward, recompute and backward alike), and `LoraBatch` upcasts
activations to the masters' float32, which on GPU doubles the bytes each LoRA matmul moves and runs it off the
tensor cores. Here the layer is re-stated around a pluggable attention (`PackedAttention`) and a LoRA applier
(`TrainLora`) that casts the small adapter matrices down instead of the large activations up; the norms, MLP,
RoPE and projections are the model's modules, so the same weights load, and CPU tests hold this forward to the
model's (float32, same sums).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tinkerbell.engine.batch import BatchContext
from tinkerbell.engine.lora import LoraSegment
from tinkerbell.engine.models.llama import Attention, CausalLM, DecoderLayer, rotate_half
from tinkerbell.engine.tp.group import copy_to_tp, reduce_from_tp

# Padded attention groups sequences whose padded cost (count × longest²) stays within this factor of their
# unpadded cost (Σ length²), so a batch of equal lengths is one SDPA call and a ragged batch only a few.
PAD_SLACK = 1.5


class TrainLora:
    """`ctx.lora` for training: rows [start, end) use their segment's adapter, computed in the activations'
    dtype (bf16 on GPU) with autograd flowing through the cast to the fp32 masters.

    A segment that covers every row (one run's batch) adds its delta with no concatenation. With several
    segments, `stacked` (the GPU path) concatenates their A's along the rank (and B's to match) and runs two
    matmuls for all of them, zeroing each row's product outside its own adapter's columns by a mask that also
    carries each adapter's scale: a few launches whatever the number of runs, for Σ rank extra columns of work,
    instead of a handful of small launches per run per module. Unstacked is the per-segment reference."""

    def __init__(self, segments: list[LoraSegment], stacked: bool = False):
        self.segments = [s for s in segments if s.weights is not None]
        self.stacked = stacked and len(self.segments) > 1
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}

    def apply(self, key: str, x: torch.Tensor, out: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        n = x.shape[0]
        live = [i for i, seg in enumerate(self.segments) if key in seg.weights.a
                and min(seg.end - row_offset, n) > max(seg.start - row_offset, 0)]
        if not live:
            return out
        if self.stacked and len(live) > 1:
            return self._apply_stacked(key, x, out, row_offset, live)
        parts: list[tuple[int, int, torch.Tensor]] = []
        for i in live:
            seg = self.segments[i]
            w = seg.weights
            s, e = max(seg.start - row_offset, 0), min(seg.end - row_offset, n)
            a, b = w.a[key].to(x.dtype), w.b[key].to(x.dtype)
            parts.append((s, e, (x[s:e] @ a.t()) @ b.t() * w.spec.scale))
        if len(parts) == 1 and parts[0][0] == 0 and parts[0][1] == n:
            return out + parts[0][2].to(out.dtype)
        pieces, cursor = [], 0
        for s, e, delta in parts:
            if s > cursor:
                pieces.append(delta.new_zeros(s - cursor, delta.shape[1]))
            pieces.append(delta)
            cursor = e
        if cursor < n:
            pieces.append(pieces[-1].new_zeros(n - cursor, pieces[-1].shape[1]))
        return out + torch.cat(pieces).to(out.dtype)

    def _apply_stacked(self, key: str, x: torch.Tensor, out: torch.Tensor, row_offset: int,
                       live: list[int]) -> torch.Tensor:
        segs = [self.segments[i] for i in live]
        a = torch.cat([s.weights.a[key] for s in segs]).to(x.dtype)  # [Σr, in]
        b = torch.cat([s.weights.b[key] for s in segs], dim=1).to(x.dtype)  # [out, Σr]
        mask = self._mask(tuple(live), x.dtype, x.device)[row_offset:row_offset + x.shape[0]]
        return out + (((x @ a.t()) * mask) @ b.t()).to(out.dtype)

    def _mask(self, live: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[rows of the batch, Σ rank]: each adapter's scale on its own rows and columns, zero elsewhere."""
        mask = self._masks.get(live)
        if mask is None:
            segs = [self.segments[i] for i in live]
            rows = max(s.end for s in self.segments)
            host = np.zeros((rows, sum(s.weights.spec.rank for s in segs)), np.float32)
            col = 0
            for s in segs:
                r = s.weights.spec.rank
                host[s.start:s.end, col:col + r] = s.weights.spec.scale
                col += r
            mask = torch.from_numpy(host).to(device=device, dtype=dtype)
            self._masks[live] = mask
        return mask


class PackedAttention:
    """Causal self-attention of each packed sequence over itself.

    `padded=False` is the reference (one SDPA per sequence, as `models.llama.attend` does). `padded=True` groups
    sequences of similar length and runs one SDPA per group over a [B, H, Lmax, D] gather of the packed rows:
    padding sits after each sequence's last token, so under the causal mask real queries never see it, and the
    padded query rows are dropped. Equal-length contiguous sequences are a view, with no gather at all."""

    def __init__(self, lengths: list[int], device: torch.device, padded: bool):
        self.lengths, self.padded = lengths, padded
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if lengths else np.zeros(0, np.int64)
        self.starts = starts.tolist()
        # per group: (batch, lmax, gather index or None for a view, first row of the view, kept rows or None)
        self.groups: list[tuple[int, int, torch.Tensor | None, int, torch.Tensor | None]] = []
        self.inverse: torch.Tensor | None = None
        if padded and lengths:
            self._plan(np.asarray(lengths, np.int64), starts, device)

    def _plan(self, lengths: np.ndarray, starts: np.ndarray, device: torch.device) -> None:
        order = np.argsort(-lengths, kind="stable")
        groups: list[list[int]] = []
        for i in order.tolist():
            if groups:
                g = groups[-1]
                lmax = int(lengths[g[0]])
                cost = float((lengths[g].astype(np.float64) ** 2).sum() + float(lengths[i]) ** 2)
                if (len(g) + 1) * float(lmax) ** 2 <= PAD_SLACK * cost:
                    g.append(i)
                    continue
            groups.append([i])
        token_order = []
        for g in groups:
            g.sort()  # packed order inside a group keeps contiguous equal-length runs viewable
            lmax = int(lengths[g].max())
            contiguous = all(int(lengths[i]) == lmax for i in g) and g == list(range(g[0], g[0] + len(g)))
            if contiguous:
                self.groups.append((len(g), lmax, None, int(starts[g[0]]), None))
                token_order.append(np.arange(starts[g[0]], starts[g[0]] + len(g) * lmax))
                continue
            pos = np.arange(lmax)
            gather = np.where(pos[None, :] < lengths[g][:, None], starts[g][:, None] + pos[None, :], 0)
            keep = np.flatnonzero((pos[None, :] < lengths[g][:, None]).reshape(-1))
            self.groups.append((len(g), lmax, torch.from_numpy(gather.reshape(-1)).to(device), 0,
                                torch.from_numpy(keep).to(device)))
            token_order.append(gather.reshape(-1)[keep])
        flat = np.concatenate(token_order)
        if not np.array_equal(flat, np.arange(len(flat))):
            self.inverse = torch.from_numpy(np.argsort(flat, kind="stable")).to(device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        groups = q.shape[1] // k.shape[1]
        if not self.padded:
            outs = []
            for s, n in zip(self.starts, self.lengths):
                qs = q[s:s + n].transpose(0, 1)
                ks = k[s:s + n].transpose(0, 1).repeat_interleave(groups, dim=0)
                vs = v[s:s + n].transpose(0, 1).repeat_interleave(groups, dim=0)
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
            return torch.cat(outs, dim=0)
        outs = []
        for b, lmax, gather, first, keep in self.groups:
            def batched(t: torch.Tensor) -> torch.Tensor:
                rows = t[first:first + b * lmax] if gather is None else t.index_select(0, gather)
                return rows.view(b, lmax, t.shape[1], t.shape[2]).transpose(1, 2)

            kb, vb = batched(k), batched(v)
            if groups > 1:
                kb, vb = kb.repeat_interleave(groups, dim=1), vb.repeat_interleave(groups, dim=1)
            o = F.scaled_dot_product_attention(batched(q), kb, vb, is_causal=True)
            o = o.transpose(1, 2).reshape(b * lmax, q.shape[1], q.shape[2])
            outs.append(o if keep is None else o.index_select(0, keep))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return out if self.inverse is None else out.index_select(0, self.inverse)


def _attention(m: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: BatchContext,
               attend: PackedAttention) -> torch.Tensor:
    """`models.llama.Attention.forward` with the attention itself swapped for `attend` (and the same
    tensor-parallel collectives: `m.cfg` holds the rank's local head counts)."""
    cfg, p, lora = m.cfg, m.prefix, ctx.lora
    t = x.shape[0]
    if m.tp is not None:
        x = copy_to_tp(x, m.tp)
    if m.qkv is not None:
        q, k, v = F.linear(x, *m.qkv).split([m.q_proj.out_features, m.k_proj.out_features,
                                             m.v_proj.out_features], dim=-1)
    else:
        q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    q = lora.apply(p + "q_proj", x, q).view(t, cfg.num_heads, cfg.head_dim)
    k = lora.apply(p + "k_proj", x, k).view(t, cfg.num_kv_heads, cfg.head_dim)
    v = lora.apply(p + "v_proj", x, v).view(t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = m.q_norm(q), m.k_norm(k)
    c, s = cos[:, None, :], sin[:, None, :]
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    o = attend(q, k, v).reshape(t, cfg.num_heads * cfg.head_dim)
    out = lora.apply(p + "o_proj", o, m.o_proj(o))
    return out if m.tp is None else reduce_from_tp(out, m.tp)


def layer_forward(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: BatchContext,
                  attend: PackedAttention) -> torch.Tensor:
    x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, ctx, attend)
    return x + layer.mlp(layer.post_attention_layernorm(x), ctx)


def packed_positions(lengths: list[int], device: torch.device) -> torch.Tensor:
    """0..n-1 for each sequence, built on the host in one pass and copied once."""
    lens = np.asarray(lengths, np.int64)
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    return torch.from_numpy(np.arange(int(lens.sum()), dtype=np.int64) - starts).to(device, non_blocking=True)


def hidden_states(model: CausalLM, input_ids: torch.Tensor, ctx: BatchContext, attend: PackedAttention,
                  checkpoint_layers: bool) -> torch.Tensor:
    """Final-norm hidden states [T, hidden]; `ctx` must carry `position_ids` and a `lora` (TrainLora)."""
    x = model.embed(input_ids)
    cos, sin = model.rope(ctx.positions(input_ids.device), x.dtype)
    for layer in model.model.layers:
        if checkpoint_layers and torch.is_grad_enabled():
            x = checkpoint(layer_forward, layer, x, cos, sin, ctx, attend, use_reentrant=False)
        else:
            x = layer_forward(layer, x, cos, sin, ctx, attend)
    return model.model.norm(x)
