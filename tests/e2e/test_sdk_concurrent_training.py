"""Three runs train at once through the official SDK, each with its own learning rate, and each converges: the
engine packs their forward/backward requests into shared batches and steps their optimizers independently."""

from __future__ import annotations

import threading

import numpy as np
from tinker import types

from tests.e2e.conftest import service_client, train_until_memorised

TEXTS = ["User: What is the colour of the sky?\nAssistant: Blue, mostly.",
         "User: Name a prime number.\nAssistant: Seven.",
         "User: Where do penguins live?\nAssistant: In the south."]
LEARNING_RATES = [5e-3, 1e-2, 2e-2]


def _train(server, text: str, lr: float, seed: int, results: dict, errors: list) -> None:
    try:
        sc = service_client(server)
        base = sc.get_server_capabilities().supported_models[0].model_name
        tc = sc.create_lora_training_client(base_model=base, rank=8, seed=seed).result()
        ids = tc.get_tokenizer().encode(text, add_special_tokens=False)
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": np.array(ids[1:]),
                                            "weights": np.ones(len(ids) - 1, np.float32)})
        results[lr] = train_until_memorised(tc, datum, lr=lr, max_steps=120, target=0.05)
    except Exception as e:  # noqa: BLE001 - reported by the test thread
        errors.append(e)


def test_three_runs_with_different_learning_rates_converge_concurrently(llama_server):
    results: dict = {}
    errors: list = []
    threads = [threading.Thread(target=_train, args=(llama_server, text, lr, i, results, errors))
               for i, (text, lr) in enumerate(zip(TEXTS, LEARNING_RATES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for lr in LEARNING_RATES:
        first, last = results[lr]
        assert last < 0.05 * first, (lr, first, last)
