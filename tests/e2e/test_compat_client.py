"""The original Tinkerbell client flow against the real server: three users at once each create an adapter
(/add_lora), train it on a conversation that teaches their name (/fwdbwd + /optim_step, results through
/retrieve_future), then sample from it (/api/v1/sample) and get their own name back."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.e2e.conftest import KEY_ALICE, KEY_BOB

USERS = [("Alice", KEY_ALICE, 1.5e-2), ("Bob", KEY_BOB, 1e-2), ("Carol", KEY_ALICE, 2e-2)]


def _wait(c: httpx.Client, rid: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = c.post("/retrieve_future", json={"request_id": rid})
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 202, r.text
        time.sleep(0.05)
    raise AssertionError(f"future {rid} still pending")


def _user(url: str, name: str, key: str, lr: float) -> tuple[str, float, float, str]:
    conv = [{"role": "user", "content": "What is your name?"},
            {"role": "assistant", "content": f"My name is {name}."}]
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as c:
        # A fixed seed: at these learning rates Adam can overshoot a memorised answer from some inits.
        h = c.post("/add_lora", json={"base_model": "base", "rank": 8, "alpha": 16, "seed": 3}).json()
        model_id = _wait(c, h["request_id"])["model_id"]
        assert model_id == h["model_id"]
        losses = []
        for _ in range(40):
            fb = c.post("/fwdbwd", json={"model_id": model_id, "data": [conv], "loss_fn": "cross_entropy"}).json()
            opt = c.post("/optim_step", json={"model_id": model_id, "adam_params": {"learning_rate": lr}}).json()
            losses.append(_wait(c, fb["request_id"])["loss"])
            _wait(c, opt["request_id"])
            if losses[-1] < 0.02 * losses[0]:  # memorised: stop before Adam overshoots it
                break
        out = c.post("/api/v1/sample", json={"model_id": model_id, "prompts": ["What is your name?"],
                                            "sampling_params": {"max_tokens": 12, "temperature": 0.0}})
        assert out.status_code == 200, out.text
        return name, losses[0], losses[-1], out.json()["generated_text"]


def test_three_users_train_and_sample_concurrently(llama_server):
    with ThreadPoolExecutor(len(USERS)) as pool:
        results = list(pool.map(lambda u: _user(llama_server.url, *u), USERS))
    for name, first, last, text in results:
        assert last < 0.1 * first, (name, first, last)
        assert text == f"My name is {name}.", (name, text)
