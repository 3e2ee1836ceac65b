"""The tinker SDK side, shared by the lora and training scenarios: a client, random-token training data, one
user's training loop, and registering saved adapters with the OpenAI face."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tinkerbell.bench.context import Target
from tinkerbell.bench.load import random_prompt


def service_client(target: Target) -> Any:
    import tinker

    os.environ.setdefault("TINKER_TELEMETRY", "0")
    return tinker.ServiceClient(base_url=target.url, api_key=target.api_key)


def train_seq(target: Target, seq: int) -> int:
    return max(2, min(seq, target.max_context - 1))


def batch(rng: random.Random, target: Target, n: int, seq: int) -> list[Any]:
    """n random-token sequences of `seq` tokens, next-token targets, loss on every position."""
    from tinker import types

    seq = train_seq(target, seq)
    out = []
    for _ in range(n):
        ids = random_prompt(rng, seq + 1, target.vocab_size)
        out.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                               loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * seq}))
    return out


@dataclass
class UserRun:
    """One user's training: per-step losses (mean per token) and wall times."""
    user: int
    tokens_per_step: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    error: str = ""


def train_user(target: Target, user: int, steps: int, n: int, seq: int, rank: int, lr: float,
               seed: int, tc: Any = None) -> tuple[UserRun, Any]:
    """forward_backward + optim_step, submitted back to back and then awaited (as the cookbook pipelines
    them); the same batch each step, so the loss falls and the training curve shows learning."""
    from tinker import types

    rng = random.Random(seed)
    if tc is None:
        tc = service_client(target).create_lora_training_client(base_model=target.model, rank=rank).result()
    data = batch(rng, target, n, seq)
    run = UserRun(user, n * train_seq(target, seq), start=time.perf_counter())
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            fb = tc.forward_backward(data, "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=lr))
            out = fb.result()
            opt.result()
            run.step_seconds.append(time.perf_counter() - t0)
            run.losses.append(out.metrics["loss:sum"] / run.tokens_per_step)
    except Exception as e:  # noqa: BLE001 - reported in the scenario's notes
        run.error = f"{type(e).__name__}: {e}"[:300]
    run.end = time.perf_counter()
    return run, tc


def register_adapter(target: Target, name: str, path: str) -> None:
    """vLLM's /v1/load_lora_adapter: OpenAI requests can then name the adapter as `model`."""
    r = httpx.post(target.url.rstrip("/") + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                   headers={"Authorization": f"Bearer {target.api_key}"}, timeout=300)
    if r.status_code >= 400:
        raise RuntimeError(f"/v1/load_lora_adapter {name}: HTTP {r.status_code}: {r.text[:300]}")


def unregister_adapter(target: Target, name: str) -> None:
    httpx.post(target.url.rstrip("/") + "/v1/unload_lora_adapter", json={"lora_name": name},
               headers={"Authorization": f"Bearer {target.api_key}"}, timeout=60)
