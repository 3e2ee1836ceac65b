"""An RL-style loop makes a fresh sampler every step; older ones leave memory but keep working from disk."""

from __future__ import annotations

import time

import numpy as np
from tinker import types

from tests.e2e.conftest import service_client


def test_every_ephemeral_sampler_of_a_loop_stays_usable(llama_server):
    sc = service_client(llama_server)
    base = sc.get_server_capabilities().supported_models[0].model_name
    tc = sc.create_lora_training_client(base_model=base, rank=4, seed=5).result()
    datum = types.Datum(model_input=types.ModelInput.from_ints([9, 8, 7, 6, 5]),
                        loss_fn_inputs={"target_tokens": np.array([8, 7, 6, 5, 4]),
                                        "weights": np.ones(5, np.float32)})
    prompt = types.ModelInput.from_ints([9, 8, 7])
    params = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    samplers, first_outputs = [], []
    for _ in range(4):
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=5e-2))
        s = tc.save_weights_and_get_sampling_client().result()
        samplers.append(s)
        first_outputs.append(list(s.sample(prompt, 1, params).result().sequences[0].tokens))
    assert len({tuple(o) for o in first_outputs}) > 1, "training should change what the samplers produce"
    time.sleep(1.0)  # let the background writes of the adapters finish, so old samplers are demoted to disk
    for s, expected in zip(samplers, first_outputs):
        assert list(s.sample(prompt, 1, params).result().sequences[0].tokens) == expected
    sc.close("success").result()
