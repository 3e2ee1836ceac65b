"""The official SDK against the app over the real Engine on the tiny fixture model (one shared engine)."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from tests.api.conftest import KEY_A, LiveServer, make_config
from tinkerbell.api.app import build_engine, create_app


@pytest.fixture(scope="module")
def real_server(tiny_llama_dir, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("real") / "data", model=str(tiny_llama_dir), max_lora_rank=16,
                         max_loras=4)
    engine = build_engine(config)
    try:
        with LiveServer(create_app(config, engine)) as srv:
            srv.model = str(tiny_llama_dir)
            yield srv
    finally:
        engine.shutdown()


def test_train_save_and_sample(real_server):
    ids = list(range(5, 21))
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": np.array(ids[1:], dtype=np.int64),
                                        "weights": np.ones(len(ids) - 1, dtype=np.float32)})
    with tinker.ServiceClient(base_url=real_server.url, api_key=KEY_A) as sc:
        tc = sc.create_lora_training_client(base_model=real_server.model, rank=8, seed=0).result()
        losses = []
        for _ in range(4):
            fb = tc.forward_backward([datum, datum], "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=5e-2))
            out = fb.result()
            opt.result()
            assert out.loss_fn_outputs[0]["logprobs"].shape == [len(ids) - 1]
            losses.append(out.metrics["loss:sum"])
        assert losses[-1] < losses[0]

        prompt = types.ModelInput.from_ints(ids[:4])
        params = types.SamplingParams(max_tokens=4, temperature=0.0)
        sampler = tc.save_weights_and_get_sampling_client().result()
        res = sampler.sample(prompt, num_samples=2, sampling_params=params).result()
        assert len(res.sequences) == 2 and len(res.sequences[0].tokens) == len(res.sequences[0].logprobs)
        lps = sampler.compute_logprobs(prompt).result()
        assert lps[0] is None and all(isinstance(x, float) for x in lps[1:])

        path = tc.save_weights_for_sampler("final").result().path
        s2 = sc.create_sampling_client(model_path=path).result()
        res2 = s2.sample(prompt, num_samples=1, sampling_params=params).result()
        assert list(res2.sequences[0].tokens) == list(res.sequences[0].tokens)

        state = tc.save_state("st").result().path
        tc2 = sc.create_training_client_from_state_with_optimizer(state).result()
        out2 = tc2.forward([datum], "cross_entropy").result()
        final = tc.forward([datum], "cross_entropy").result()
        assert out2.metrics["loss:sum"] == pytest.approx(final.metrics["loss:sum"], rel=1e-4)
