"""Two tenants train at once on one base model without cross-talk, and cannot see each other's work."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import KEY_ALICE, KEY_BOB, rest_client, service_client, train_until_memorised

TEXTS = {KEY_ALICE: "User: Who are you?\nAssistant: I am Alice.", KEY_BOB: "User: Who are you?\nAssistant: I am Bob!"}
PROMPT = "User: Who are you?\nAssistant:"


def _train(server, key: str, results: dict, errors: list) -> None:
    try:
        sc = service_client(server, key)
        base = sc.get_server_capabilities().supported_models[0].model_name
        tc = sc.create_lora_training_client(base_model=base, rank=8, seed=3).result()
        tok = tc.get_tokenizer()
        ids = tok.encode(TEXTS[key], add_special_tokens=False)
        n_prompt = len(tok.encode(PROMPT, add_special_tokens=False))
        w = np.array([0.0] * (n_prompt - 1) + [1.0] * (len(ids) - n_prompt), np.float32)
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": np.array(ids[1:]), "weights": w})
        train_until_memorised(tc, datum)
        path = tc.save_weights_for_sampler("mine").result().path
        sampler = sc.create_sampling_client(model_path=path)
        out = sampler.sample(types.ModelInput.from_ints(ids[:n_prompt]), 1,
                             types.SamplingParams(max_tokens=len(ids) - n_prompt, temperature=0)).result()
        results[key] = {"path": path, "run": tc.model_id, "answer": list(out.sequences[0].tokens),
                        "want": ids[n_prompt:]}
        sc.close("success").result()
    except Exception as e:  # noqa: BLE001 - reported by the test thread
        errors.append(e)


def test_two_tenants_train_concurrently_without_cross_talk(llama_server):
    results: dict = {}
    errors: list = []
    threads = [threading.Thread(target=_train, args=(llama_server, k, results, errors)) for k in (KEY_ALICE, KEY_BOB)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    for key in (KEY_ALICE, KEY_BOB):
        assert results[key]["answer"] == results[key]["want"], key
    assert results[KEY_ALICE]["answer"] != results[KEY_BOB]["answer"]

    # Bob cannot see or use Alice's run, checkpoint or sampler path.
    alice, bob = results[KEY_ALICE], results[KEY_BOB]
    rc_bob = rest_client(llama_server, KEY_BOB)
    with pytest.raises(tinker.NotFoundError):
        rc_bob.get_training_run(alice["run"]).result()
    with pytest.raises(tinker.NotFoundError):
        rc_bob.list_checkpoints(alice["run"]).result()
    with pytest.raises(tinker.NotFoundError):
        rc_bob.delete_checkpoint_from_tinker_path(alice["path"]).result()
    listed = [r.training_run_id for r in rc_bob.list_training_runs().result().training_runs]
    assert bob["run"] in listed and alice["run"] not in listed
    sc_bob = service_client(llama_server, KEY_BOB)
    with pytest.raises(Exception, match="404|not found|Not Found"):
        sc_bob.create_sampling_client(model_path=alice["path"]).sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=1)).result()
    sc_bob.close("success").result()
    # Alice still sees hers.
    assert rest_client(llama_server, KEY_ALICE).get_training_run(alice["run"]).result().training_run_id == alice["run"]


def test_bad_api_key_is_refused_with_401(llama_server):
    with pytest.raises(tinker.AuthenticationError):
        rest_client(llama_server, "tml-not-a-real-key").list_training_runs().result()
