"""The training forward over a packed batch: the model's own weights, with attention over all sequences at
once on GPU, LoRA computed in the base model's dtype from the fp32 masters, and the elementwise work fused.

Why not `CausalLM.hidden_states`: its `attend` loops over the sequences of the batch in Python (one SDPA call
and one GQA expansion per sequence per layer, in forward, recompute and backward alike), and `LoraBatch` upcasts
activations to the masters' float32, which on GPU doubles the bytes each LoRA matmul moves and runs it off the
tensor cores. Here the layer is re-stated around a pluggable attention (`PackedAttention`), a LoRA applier
(training_lora.TrainLora: one autograd node per fused projection on GPU) and kernels/train_ops.py (RMSNorm with
the residual add, RoPE of the fused q/k/v output, SiLU·mul: one kernel each way on GPU, the model's own ops on
CPU); the weights are the model's modules', so the same checkpoints load, and CPU tests hold this forward to
the model's (float32, same sums).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tinkerbell.engine.batch import BatchContext
from tinkerbell.engine.kernels.train_ops import rms_norm, rope_qkv, silu_mul
from tinkerbell.engine.models.llama import MLP, Attention, CausalLM, DecoderLayer
from tinkerbell.engine.tp.group import copy_to_tp, reduce_from_tp

# Padded attention groups sequences whose padded cost (count × longest²) stays within this factor of their
# unpadded cost (Σ length²), so a batch of equal lengths is one SDPA call and a ragged batch only a few.
PAD_SLACK = 1.5


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
            if groups > 1 and not q.is_cuda:
                kb, vb = kb.repeat_interleave(groups, dim=1), vb.repeat_interleave(groups, dim=1)
            # On GPU the flash kernel reads each K/V head for its query group itself (no expanded copies,
            # forward or backward).
            o = F.scaled_dot_product_attention(batched(q), kb, vb, is_causal=True,
                                               enable_gqa=groups > 1 and q.is_cuda)
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
    keys = (p + "q_proj", p + "k_proj", p + "v_proj")
    if m.qkv is not None:
        qkv = lora.linear(keys, x, *m.qkv)
    else:
        qkv = lora.add(keys, x, torch.cat([m.q_proj(x), m.k_proj(x), m.v_proj(x)], -1))
    if cfg.qk_norm:
        q, k, v = qkv.split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                             cfg.num_kv_heads * cfg.head_dim], dim=-1)
        q = m.q_norm(q.view(t, cfg.num_heads, cfg.head_dim))
        k = m.k_norm(k.view(t, cfg.num_kv_heads, cfg.head_dim))
        qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v], dim=-1)
    q, k, v = rope_qkv(qkv, cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    o = attend(q, k, v).reshape(t, cfg.num_heads * cfg.head_dim)
    out = lora.linear((p + "o_proj",), o, m.o_proj.weight, m.o_proj.bias)
    return out if m.tp is None else reduce_from_tp(out, m.tp)


def _mlp(m: MLP, x: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    p, lora = m.prefix, ctx.lora
    if m.tp is not None:
        x = copy_to_tp(x, m.tp)
    keys = (p + "gate_proj", p + "up_proj")
    if m.gate_up is not None:
        gate_up = lora.linear(keys, x, *m.gate_up)
    else:
        gate_up = lora.add(keys, x, torch.cat([m.gate_proj(x), m.up_proj(x)], -1))
    h = silu_mul(gate_up)
    out = lora.linear((p + "down_proj",), h, m.down_proj.weight, m.down_proj.bias)
    return out if m.tp is None else reduce_from_tp(out, m.tp)


def layer_forward(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: BatchContext,
                  attend: PackedAttention) -> torch.Tensor:
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    h, _ = rms_norm(x, n1.weight, n1.eps)
    h, x = rms_norm(_attention(layer.self_attn, h, cos, sin, ctx, attend), n2.weight, n2.eps, residual=x)
    return x + _mlp(layer.mlp, h, ctx)


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
    norm = model.model.norm
    return rms_norm(x, norm.weight, norm.eps)[0]
