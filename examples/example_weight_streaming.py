#!/usr/bin/env python
"""How fast freshly trained weights reach the sampler: in memory vs through disk.

Trains a LoRA adapter a few steps, then measures, several times, the time from "the trainer is done" to the
first sampled token (a 1-token sample):
  - in-memory handoff: `save_weights_and_get_sampling_client()` (the trained tensors are copied device to
    device into a sampler slot; the files are written in the background, off this path);
  - disk path: `save_weights_for_sampler(name)` (a PEFT checkpoint written under --data-dir), then a fresh
    `create_sampling_client(model_path=...)` that loads it.
Prints both (median and min over the repeats) and the device they ran on. Every figure is measured here.

    python examples/example_weight_streaming.py --url http://127.0.0.1:8000 --repeats 5
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_model, conversation_datum, parser, server_info, service_client  # noqa: E402


def main() -> int:
    from tinker import types

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="measurements per path (default 5; --quick 2)")
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    info = server_info(args)
    base = base_model(args)
    sc = service_client(args)
    tc = sc.create_lora_training_client(base_model=base, rank=args.rank).result()
    tok = tc.get_tokenizer()
    datum, prompt = conversation_datum(tok, "What is your name?", "My name is Tinkerbell.")
    params = types.SamplingParams(max_tokens=1, temperature=0.0)
    model_input = types.ModelInput.from_ints(prompt)
    memory, disk = [], []
    for i in range(repeats):
        # A training step before each measurement, so every handoff carries weights the sampler has not seen.
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        t0 = time.perf_counter()
        sampler = tc.save_weights_and_get_sampling_client().result()
        sampler.sample(model_input, 1, params).result()
        memory.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        path = tc.save_weights_for_sampler(f"stream-{i}").result().path
        fresh = sc.create_sampling_client(model_path=path).result()
        fresh.sample(model_input, 1, params).result()
        disk.append(time.perf_counter() - t0)

    print(f"server {args.url}: {base} on {info.get('device', '?')} ({info.get('dtype', '?')}), LoRA rank {args.rank}")
    print(f"time from trained weights to the first sampled token, {repeats} measurements each:")
    for name, xs in (("in-memory handoff (save_weights_and_get_sampling_client)", memory),
                     ("disk path (save_weights_for_sampler + create_sampling_client)", disk)):
        print(f"  {name:<64} median {statistics.median(xs) * 1000:8.1f} ms   min {min(xs) * 1000:8.1f} ms")
    print(f"disk path / in-memory handoff, medians: {statistics.median(disk) / statistics.median(memory):.2f}")
    sc.close("success").result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
