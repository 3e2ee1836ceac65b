"""Write a random-weight HF checkpoint of a real model shape (default Llama-3.2-1B) plus a small tokenizer, so
`tinkerbell serve` / `tinkerbell bench --model DIR` can run a real-size model on a machine with no downloads.

    python bench/make_random_checkpoint.py /tmp/llama-3.2-1b-random [--shape Llama-3.1-8B] [--dtype bfloat16]

Weights are N(0, 0.02) (norms 1), built on the GPU (one is needed). The tokenizer is the demo BPE tokenizer
(a few hundred tokens), so prompts use only the first ids of the real 128k vocabulary: speed is what this is
for, not text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.sampling_speed import SHAPES, build_ours, hf_dict  # noqa: E402
from tinkerbell.engine.models.tiny import build_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="Llama-3.2-1B")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = ap.parse_args()
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(args.out)
    cfg = hf_dict(args.shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, torch_dtype=args.dtype, architectures=["LlamaForCausalLM"])
    model = build_ours(cfg, getattr(torch, args.dtype))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    save_file(state, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2))
    size = (args.out / "model.safetensors").stat().st_size
    print(f"wrote {args.shape} ({size / 2**30:.2f} GiB, {args.dtype}) to {args.out} in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
