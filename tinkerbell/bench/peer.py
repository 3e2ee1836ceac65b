"""The peer baseline, run in this process on the same model folder while the server is idle: HF transformers
`generate` (static batch, greedy, forced to the full output length) for sampling, PEFT LoRA + AdamW for
training. Tables show ours / peer / ratio; the peer's figures come from the same run on the same machine."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

_TORCH_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class PeerSample:
    batch: int
    in_len: int
    out_len: int
    seconds: float
    output_tok_s: float


@dataclass
class PeerTrain:
    batch: int
    seq: int
    steps: int
    rank: int
    seconds: float
    tok_s: float
    losses: list[float] = field(default_factory=list)


class Peer:
    """Loads the model lazily, once, on the GPU when there is one (the server's dtype), else on the CPU."""

    def __init__(self, model_path: str, dtype: str, vocab_size: int):
        self.model_path, self.dtype, self.vocab_size = model_path, dtype, vocab_size
        self._model: Any = None
        self.device = "cpu"

    def _load(self) -> Any:
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = getattr(torch, self.dtype) if self.dtype in _TORCH_DTYPES else torch.float32
            self._model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        return self._model

    def _ids(self, batch: int, length: int, seed: int) -> Any:
        import torch

        rng = random.Random(seed)
        rows = [[rng.randint(16, max(17, self.vocab_size - 1)) for _ in range(length)] for _ in range(batch)]
        return torch.tensor(rows, device=self.device)

    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def sample(self, batch: int, in_len: int, out_len: int) -> PeerSample:
        import torch

        model = self._load()
        ids = self._ids(batch, in_len, 1)
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids[:1], max_new_tokens=2, min_new_tokens=2, **{**kw, "attention_mask": mask[:1]})
            self._sync()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, **kw)
            self._sync()
            dt = time.perf_counter() - t0
        return PeerSample(batch, in_len, out_len, dt, batch * out_len / dt)

    def train(self, batch: int, seq: int, steps: int, rank: int, lr: float) -> PeerTrain:
        """LoRA on every linear layer of the blocks (what the server trains), AdamW, cross-entropy on all
        tokens; the first step is a warm-up outside the timing."""
        import torch
        from peft import LoraConfig, get_peft_model

        base = self._load()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        ids = self._ids(batch, seq, 2)
        losses: list[float] = []
        try:
            for step in range(steps + 1):
                if step == 1:
                    self._sync()
                    t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            self._sync()
            dt = time.perf_counter() - t0
        finally:
            # Give the plain base model back for later sampling runs, without the adapter layers.
            self._model = model.unload().eval()
        return PeerTrain(batch, seq, steps, rank, dt, batch * seq * steps / dt, losses)  # step 1 (warm-up) too, like ours

    def close(self) -> None:
        self._model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
