#!/usr/bin/env python
"""A minimal GRPO-style RL loop with the tinker SDK on a toy verifiable reward.

Task: "What is a + b?" for small random integers; the reward is 1 when the first number in the answer is the
sum, else 0. Each step takes a fresh sampler with the current weights (`save_weights_and_get_sampling_client`,
in memory), samples a group of answers per question, turns rewards into group-relative advantages
(reward - group mean), and trains with the `importance_sampling` loss on the sampled tokens and their sampling
logprobs. Prints the mean reward per step (measured on that step's samples).

    python examples/rl_loop.py --url http://127.0.0.1:8000 --steps 20
"""

from __future__ import annotations

import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_model, parser, service_client  # noqa: E402


def reward(text: str, answer: int) -> float:
    m = re.search(r"-?\d+", text)
    return 1.0 if m and int(m.group()) == answer else 0.0


def main() -> int:
    from tinker import types

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="RL steps (default 20; --quick 3)")
    p.add_argument("--questions", type=int, default=None, help="questions per step (default 8; --quick 2)")
    p.add_argument("--group-size", type=int, default=None, help="samples per question (default 8; --quick 4)")
    p.add_argument("--lr", type=float, default=4e-5)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    steps = args.steps or (3 if args.quick else 20)
    questions = args.questions or (2 if args.quick else 8)
    group = args.group_size or (4 if args.quick else 8)
    rng = random.Random(args.seed)

    sc = service_client(args)
    tc = sc.create_lora_training_client(base_model=base_model(args), rank=16).result()
    tok = tc.get_tokenizer()
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
    print(f"{'step':>4} {'reward':>7} {'samples':>7} {'trained':>7} {'seconds':>7}")
    for step in range(steps):
        t0 = time.perf_counter()
        sampler = tc.save_weights_and_get_sampling_client().result()  # a fresh sampler every step
        batch = []
        for _ in range(questions):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            text = tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}? Answer with a number."}],
                                           tokenize=False, add_generation_prompt=True)
            prompt = tok.encode(text, add_special_tokens=False)
            batch.append((prompt, a + b, sampler.sample(types.ModelInput.from_ints(prompt), group, params)))
        data, rewards = [], []
        for prompt, answer, fut in batch:
            seqs = fut.result().sequences
            rs = [reward(tok.decode(s.tokens, skip_special_tokens=True), answer) for s in seqs]
            rewards += rs
            mean = sum(rs) / len(rs)
            for s, r in zip(seqs, rs):
                if r == mean or not s.tokens:
                    continue  # no signal: every answer in the group scored the same
                ids = prompt + list(s.tokens)
                n = len(prompt) - 1
                data.append(types.Datum(
                    model_input=types.ModelInput.from_ints(ids[:-1]),
                    loss_fn_inputs={"target_tokens": ids[1:],
                                    "logprobs": [0.0] * n + list(s.logprobs),
                                    "advantages": [0.0] * n + [r - mean] * len(s.tokens)}))
        if data:
            fb = tc.forward_backward(data, "importance_sampling")
            opt = tc.optim_step(types.AdamParams(learning_rate=args.lr))
            fb.result()
            opt.result()
        print(f"{step:>4} {sum(rewards) / len(rewards):>7.3f} {len(rewards):>7} {len(data):>7} "
              f"{time.perf_counter() - t0:>7.2f}", flush=True)
    sc.close("success").result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
