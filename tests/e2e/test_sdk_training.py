"""The official tinker SDK, unmodified, trains a LoRA adapter on our server, saves it and samples from it."""

from __future__ import annotations

import numpy as np
from tinker import types

from tests.e2e.conftest import service_client, train_until_memorised

COMPLETION = "User: What is your name?\nAssistant: My name is Tinkerbell."
PROMPT_END = "Assistant:"


def _completion_datum(tok) -> tuple[types.Datum, list[int], list[int]]:
    """A datum teaching the answer after "Assistant:"; returns (datum, prompt ids, answer ids)."""
    ids = tok.encode(COMPLETION, add_special_tokens=False)
    prompt_ids = tok.encode(COMPLETION[: COMPLETION.index(PROMPT_END) + len(PROMPT_END)], add_special_tokens=False)
    assert ids[: len(prompt_ids)] == prompt_ids, "prompt must tokenize as a prefix of the completion"
    answer_ids = ids[len(prompt_ids):]
    ids = prompt_ids + answer_ids
    weights = [0.0] * (len(prompt_ids) - 1) + [1.0] * len(answer_ids)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": np.array(ids[1:], dtype=np.int64), "weights": np.array(weights, np.float32)},
    )
    return datum, prompt_ids, answer_ids


def _loss(out: types.ForwardBackwardOutput) -> float:
    return out.metrics["loss:sum"]


def test_training_lowers_loss_and_greedy_sampling_reproduces_the_completion(any_server):
    sc = service_client(any_server)
    base = sc.get_server_capabilities().supported_models[0].model_name
    tc = sc.create_lora_training_client(base_model=base, rank=8, seed=0).result()
    tok = tc.get_tokenizer()
    datum, prompt_ids, answer_ids = _completion_datum(tok)

    first, _ = train_until_memorised(tc, datum)
    out = tc.forward([datum], "cross_entropy").result()
    assert out.loss_fn_outputs[0]["logprobs"].shape == [len(answer_ids) + len(prompt_ids) - 1]
    final = _loss(tc.forward([datum], "cross_entropy").result())
    assert final < 0.1 * first, (first, final)

    params = types.SamplingParams(max_tokens=len(answer_ids), temperature=0.0)
    prompt = types.ModelInput.from_ints(prompt_ids)

    # In-memory handoff: the sampler gets the trained adapter without a disk round trip.
    sampler = tc.save_weights_and_get_sampling_client().result()
    res = sampler.sample(prompt, num_samples=1, sampling_params=params).result()
    assert list(res.sequences[0].tokens) == answer_ids

    # And from the named sampler checkpoint, through a fresh sampling client.
    path = tc.save_weights_for_sampler("final").result().path
    assert path.startswith("tinker://") and path.endswith("/sampler_weights/final")
    s2 = sc.create_sampling_client(model_path=path)
    res2 = s2.sample(prompt, num_samples=1, sampling_params=params).result()
    assert list(res2.sequences[0].tokens) == answer_ids
    assert res2.sequences[0].logprobs is not None and len(res2.sequences[0].logprobs) == len(answer_ids)

    # The base model did not change: it does not produce the trained answer.
    base_sampler = sc.create_sampling_client(base_model=base)
    res3 = base_sampler.sample(prompt, num_samples=1, sampling_params=params).result()
    assert list(res3.sequences[0].tokens) != answer_ids
    sc.close("success").result()


def test_conformance_script_runs(llama_server):
    """tinker_api.md section 7, as written there (adapted to the served model and its tokenizer)."""
    import tinker

    with service_client(llama_server) as sc:
        base = sc.get_server_capabilities().supported_models[0].model_name
        tc = sc.create_lora_training_client(base_model=base, rank=8).result()
        datum = types.Datum(
            model_input=types.ModelInput.from_ints([1, 2, 3, 4]),
            loss_fn_inputs={"target_tokens": np.array([2, 3, 4, 5]), "weights": np.array([0, 1, 1, 1], np.float32)},
        )
        fb = tc.forward_backward([datum], "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))
        out = fb.result()
        assert out.loss_fn_outputs[0]["logprobs"].shape == [4] and "loss:sum" in out.metrics
        opt.result()
        state = tc.save_state("step1").result().path
        assert state.endswith("/weights/step1")
        sampler = tc.save_weights_and_get_sampling_client().result()
        res = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), num_samples=2,
                             sampling_params=types.SamplingParams(max_tokens=5, temperature=0.7)).result()
        assert len(res.sequences) == 2 and res.sequences[0].logprobs is not None
        lps = sampler.compute_logprobs(types.ModelInput.from_ints([1, 2, 3])).result()
        assert lps[0] is None and all(isinstance(x, float) for x in lps[1:])
        path = tc.save_weights_for_sampler("s1").result().path
        s2 = sc.create_sampling_client(model_path=path)
        assert s2.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result()
        tc2 = sc.create_training_client_from_state_with_optimizer(state).result()
        assert tc2.forward([datum], "cross_entropy").result().metrics["loss:sum"] > 0
        rc = tinker.RestClient(base_url=llama_server.url, api_key=sc._api_key)
        run = rc.get_training_run_by_tinker_path(path).result()
        assert run.base_model == base and run.is_lora
        rc.delete_checkpoint_from_tinker_path(state).result()
        ids = [c.checkpoint_id for c in rc.list_checkpoints(run.training_run_id).result().checkpoints]
        assert "weights/step1" not in ids and "sampler_weights/s1" in ids
