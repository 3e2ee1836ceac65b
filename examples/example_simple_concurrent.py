#!/usr/bin/env python
"""Three users train their own LoRA adapter at the same time on one server, then sample from it.

Alice (lr 1e-3), Bob (5e-4) and Carol (2e-3) each teach their adapter their name with two short conversations
through the official tinker SDK, concurrently (one thread each; the server packs their forward/backward passes
into shared batches). Each then samples from the adapter they just trained, handed to the sampler in memory
(`save_weights_and_get_sampling_client`, no disk), and prints the answer. Every time printed is measured here.

    python examples/example_simple_concurrent.py --url http://127.0.0.1:8000
    python examples/example_simple_concurrent.py --quick      # CI: tiny model, 10x learning rates, few steps
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, base_model, conversation_datum, parser, server_info, service_client  # noqa: E402

USERS = [("Alice", 1e-3), ("Bob", 5e-4), ("Carol", 2e-3)]
QUESTION = "What is your name?"


def conversations(name: str) -> list[tuple[str, str]]:
    return [(QUESTION, f"My name is {name}."), ("Who are you?", f"I am {name}.")]


def run_user(args, base: str, name: str, lr: float, results: dict, start: threading.Barrier) -> None:
    from tinker import types

    timer = Timer()
    sc = service_client(args)
    start.wait()  # the three users begin together
    with timer.phase("create"):
        tc = sc.create_lora_training_client(base_model=base, rank=args.rank, seed=args.seed).result()
        tok = tc.get_tokenizer()
    data = [conversation_datum(tok, q, a)[0] for q, a in conversations(name)]
    prompt = conversation_datum(tok, QUESTION, "")[1]
    losses = []
    train_start = time.perf_counter()
    with timer.phase("train"):
        for _ in range(args.steps):
            fb = tc.forward_backward(data, "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=lr))
            out = fb.result()
            opt.result()
            n = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in data)
            losses.append(out.metrics["loss:sum"] / n)
            if losses[-1] < args.stop_loss:
                break  # memorised: more steps only make Adam overshoot
    with timer.phase("handoff"):
        sampler = tc.save_weights_and_get_sampling_client().result()
    with timer.phase("sample"):
        res = sampler.sample(types.ModelInput.from_ints(prompt), num_samples=1,
                             sampling_params=types.SamplingParams(max_tokens=24, temperature=0.0)).result()
    answer = tok.decode(res.sequences[0].tokens, skip_special_tokens=True)
    results[name] = {"lr": lr, "losses": losses, "answer": answer, "timer": timer,
                     "span": (train_start, train_start + timer.total("train"))}
    sc.close("success").result()


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="most training steps per user (default 30; --quick 12)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="LoRA init seed (fixed, so a run repeats; -1: random)")
    p.add_argument("--stop-loss", type=float, default=0.01, help="a user stops training once its loss is below this")
    args = p.parse_args()
    args.steps = args.steps or (12 if args.quick else 30)
    args.seed = None if args.seed < 0 else args.seed
    # A tiny random model needs larger steps to learn a name in a few seconds; the ratios stay the same.
    scale = 10.0 if args.quick else 1.0
    info = server_info(args)
    base = base_model(args)
    print(f"server {args.url}: {base} on {info.get('device', '?')} ({info.get('dtype', '?')})")
    results: dict[str, dict] = {}
    barrier = threading.Barrier(len(USERS))
    threads = [threading.Thread(target=run_user, args=(args, base, n, lr * scale, results, barrier))
               for n, lr in USERS]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if len(results) != len(USERS):
        print(f"only {len(results)} of {len(USERS)} users finished (see the errors above)")
        return 1
    print(f"\n{'user':<6} {'lr':>8} {'loss first':>10} {'loss last':>10} {'create s':>8} {'train s':>8} "
          f"{'handoff s':>9} {'sample s':>8}  answer")
    for name, _ in USERS:
        r = results[name]
        t: Timer = r["timer"]
        print(f"{name:<6} {r['lr']:>8.0e} {r['losses'][0]:>10.4f} {r['losses'][-1]:>10.4f} "
              f"{t.total('create'):>8.2f} {t.total('train'):>8.2f} {t.total('handoff'):>9.3f} "
              f"{t.total('sample'):>8.3f}  {r['answer']!r}")
    per_user = sum(results[n]["timer"].total("train") for n, _ in USERS)
    span = max(r["span"][1] for r in results.values()) - min(r["span"][0] for r in results.values())
    steps = ", ".join(f"{n} {len(results[n]['losses'])}" for n, _ in USERS)
    print(f"\nwall time {wall:.2f}s for {len(USERS)} users (steps: {steps}). Training: the three phases add "
          f"up to {per_user:.2f}s and ran within {span:.2f}s of each other ({per_user / max(span, 1e-9):.2f}x "
          "concurrency)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
