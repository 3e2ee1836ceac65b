"""The official tinker SDK, unmodified, against the real app over a fake engine: the wire protocol end to end
(handles, protobuf results, long-polls, seq ordering with pipelining, checkpoints and REST)."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from tests.api.conftest import KEY_A, KEY_B, MODEL


def _datum(n: int = 4) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(list(range(1, n + 1))),
                       loss_fn_inputs={"target_tokens": np.arange(2, n + 2, dtype=np.int64),
                                       "weights": np.ones(n, dtype=np.float32)})


def test_conformance_flow(fake_server):
    with tinker.ServiceClient(base_url=fake_server.url, api_key=KEY_A) as sc:
        caps = tinker.RestClient(base_url=fake_server.url, api_key=KEY_A).get_server_capabilities().result()
        assert caps.supported_models[0].model_name == MODEL
        tc = sc.create_lora_training_client(base_model=MODEL, rank=8).result()
        fb = tc.forward_backward([_datum(), _datum(3)], "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))
        out = fb.result()
        assert out.loss_fn_outputs[0]["logprobs"].shape == [4]
        assert out.loss_fn_outputs[1]["logprobs"].shape == [3]
        assert "loss:sum" in out.metrics
        opt.result()
        state = tc.save_state("step1").result().path
        assert state == f"tinker://{tc.model_id}/weights/step1"
        sampler = tc.save_weights_and_get_sampling_client().result()
        res = sampler.sample(types.ModelInput.from_ints([1, 2, 3]), num_samples=2,
                             sampling_params=types.SamplingParams(max_tokens=2, temperature=0.7)).result()
        assert len(res.sequences) == 2 and res.sequences[0].logprobs is not None
        assert list(res.sequences[0].tokens) == [1, 7]  # sampled from the weights after one optim step
        path = tc.save_weights_for_sampler("s1").result().path
        assert path.endswith("/sampler_weights/s1")
        s2 = sc.create_sampling_client(model_path=path).result()
        res2 = s2.sample(types.ModelInput.from_ints([1, 2]), num_samples=1,
                         sampling_params=types.SamplingParams(max_tokens=2)).result()
        assert list(res2.sequences[0].tokens) == [1, 7]
        tc2 = sc.create_training_client_from_state_with_optimizer(state).result()
        assert tc2.get_info().lora_rank == 8
        tc2.forward_backward([_datum()], "cross_entropy").result()
        rc = tinker.RestClient(base_url=fake_server.url, api_key=KEY_A)
        run = rc.get_training_run_by_tinker_path(path).result()
        assert run.training_run_id == tc.model_id and run.lora_rank == 8
        ckpts = rc.list_checkpoints(tc.model_id).result().checkpoints
        assert {c.checkpoint_id for c in ckpts} == {"weights/step1", "sampler_weights/s1"}
        rc.delete_checkpoint_from_tinker_path(state).result()
        assert {c.checkpoint_id for c in rc.list_checkpoints(tc.model_id).result().checkpoints} == {
            "sampler_weights/s1"}
        runs = rc.list_training_runs().result()
        assert runs.cursor.total_count == 2


def test_failures_reach_the_user_and_do_not_stop_the_model(fake_server):
    with tinker.ServiceClient(base_url=fake_server.url, api_key=KEY_A) as sc:
        tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
        bad = tc.forward_backward([_datum()], "no_such_loss")
        good = tc.forward_backward([_datum()], "cross_entropy")
        with pytest.raises(tinker.RequestFailedError, match="no_such_loss"):
            bad.result()
        assert "loss:sum" in good.result().metrics
        tc.save_state("dup").result()
        with pytest.raises(tinker.RequestFailedError, match="already exists"):
            tc.save_state("dup").result()
        with pytest.raises(tinker.RequestFailedError, match="path must be a checkpoint name"):
            tc.save_state("a/b").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()  # the model still runs


def test_other_tenant_sees_nothing(fake_server):
    with tinker.ServiceClient(base_url=fake_server.url, api_key=KEY_A) as sa:
        tc = sa.create_lora_training_client(base_model=MODEL, rank=4).result()
        path = tc.save_weights_for_sampler("mine").result().path
        rb = tinker.RestClient(base_url=fake_server.url, api_key=KEY_B)
        with pytest.raises(tinker.NotFoundError):
            rb.get_training_run(tc.model_id).result()
        with pytest.raises(tinker.NotFoundError):
            rb.delete_checkpoint_from_tinker_path(path).result()
        with tinker.ServiceClient(base_url=fake_server.url, api_key=KEY_B) as sb:
            with pytest.raises(tinker.NotFoundError):
                sb.create_sampling_client(model_path=path).result().sample(
                    types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=1)).result()
            # Published checkpoints are readable by everyone.
            ra = tinker.RestClient(base_url=fake_server.url, api_key=KEY_A)
            ra.publish_checkpoint_from_tinker_path(path).result()
            res = sb.create_sampling_client(model_path=path).result().sample(
                types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=1)).result()
            assert len(res.sequences) == 1


def test_bad_key_is_refused_with_401(fake_server):
    with pytest.raises(tinker.AuthenticationError):
        tinker.RestClient(base_url=fake_server.url, api_key="tml-wrong").list_training_runs().result()
