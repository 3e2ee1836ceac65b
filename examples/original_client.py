#!/usr/bin/env python
"""The original Tinkerbell client API end to end, with plain HTTP (httpx), as scripts written for the first
prototype call it: add an adapter, train it on a conversation (async /fwdbwd + /optim_step, results through
/retrieve_future), sample from it (/api/v1/sample), save a checkpoint, remove the adapter.

    python examples/original_client.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, api_key, parser  # noqa: E402

CONVERSATION = [{"role": "user", "content": "What is your name?"},
                {"role": "assistant", "content": "My name is Tinkerbell."}]


def wait(c: httpx.Client, request_id: str, timeout: float = 600) -> dict:
    """Poll /retrieve_future: 202 while pending, 200 with the result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.post("/retrieve_future", json={"request_id": request_id})
        if r.status_code == 200:
            return r.json()
        if r.status_code != 202:
            raise SystemExit(f"request {request_id} failed: {r.status_code} {r.text}")
        time.sleep(0.05)
    raise SystemExit(f"request {request_id} still pending after {timeout}s")


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="most training steps (default 20; --quick 20)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3; --quick 1e-2)")
    p.add_argument("--stop-loss", type=float, default=0.01, help="stop training once the loss is below this")
    args = p.parse_args()
    steps = args.steps or 20
    lr = args.lr or (1e-2 if args.quick else 1e-3)
    timer = Timer()
    with httpx.Client(base_url=args.url, headers={"X-API-Key": api_key(args)}, timeout=600) as c:
        info = c.get("/").json()
        print(f"server {args.url}: {info['model']}; {len(info['faces']['original_client'])} original-client routes")
        with timer.phase("add_lora"):
            h = c.post("/add_lora", json={"base_model": args.model or "base", "rank": 16, "alpha": 32}).json()
            model_id = wait(c, h["request_id"])["model_id"]
        print(f"adapter {model_id}")
        with timer.phase("train"):
            for step in range(steps):
                fb = c.post("/fwdbwd", json={"model_id": model_id, "data": [CONVERSATION],
                                             "loss_fn": "cross_entropy"}).json()
                opt = c.post("/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": lr}}).json()
                result = wait(c, fb["request_id"])
                wait(c, opt["request_id"])
                print(f"step {step:>3}  loss {result['loss']:.4f}  ({result['num_loss_tokens']} assistant tokens)")
                if result["loss"] < args.stop_loss:
                    break  # memorised: more steps at this rate only make Adam overshoot
        with timer.phase("sample"):
            r = c.post("/api/v1/sample", json={"model_id": model_id, "prompts": ["What is your name?"],
                                              "sampling_params": {"max_tokens": 24, "temperature": 0.0}})
            r.raise_for_status()
        print(f"answer: {r.json()['generated_text']!r}")
        with timer.phase("save"):
            saved = wait(c, c.post("/save_weights_async", json={"model_id": model_id, "path": "example"}).json()
                         ["request_id"])
        print(f"checkpoint: {saved['path']}")
        with timer.phase("remove"):
            removed = c.post("/api/v1/remove_lora", json={"model_id": model_id}).json()
        print(f"remove_lora: {removed['status']}")
    print("measured: " + ", ".join(f"{k} {timer.total(k):.2f}s" for k in timer.phases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
