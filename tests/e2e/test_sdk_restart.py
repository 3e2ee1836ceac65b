"""A restart on the same --data-dir loses no saved checkpoint and no finished future."""

from __future__ import annotations

import signal

import httpx
import numpy as np
from tinker import types

from tests.e2e.conftest import KEY_ALICE, ServerProcess, rest_client, service_client


def _datum(ids: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": np.array(ids[1:]), "weights": np.ones(len(ids) - 1, np.float32)})


HEADERS = {"X-API-Key": KEY_ALICE}


def _poll(srv: ServerProcess, request_id: str) -> bytes:
    """One retrieve_future as the SDK sends it; returns the protobuf SampleResponse bytes."""
    for _ in range(10):
        r = httpx.post(srv.url + "/api/v1/retrieve_future", json={"request_id": request_id},
                       headers={**HEADERS, "Accept": "application/x-protobuf"}, timeout=60)
        if r.status_code != 408:
            break
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-protobuf"), r.text
    return r.content


def _raw_sample(srv: ServerProcess) -> tuple[str, bytes]:
    """Submit a sample over raw HTTP (so the test knows its request id) and wait for its result."""
    sid = httpx.post(srv.url + "/api/v1/create_session", json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"},
                     headers=HEADERS).json()["session_id"]
    base = httpx.get(srv.url + "/api/v1/get_server_capabilities", headers=HEADERS).json()
    sampler = httpx.post(srv.url + "/api/v1/create_sampling_session", headers=HEADERS, json={
        "session_id": sid, "sampling_session_seq_id": 0,
        "base_model": base["supported_models"][0]["model_name"]}).json()["sampling_session_id"]
    handle = httpx.post(srv.url + "/api/v1/asample", headers=HEADERS, json={
        "sampling_session_id": sampler, "seq_id": 0, "num_samples": 2,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 17, 33]}]},
        "sampling_params": {"max_tokens": 4, "temperature": 0.0}}).json()
    assert len(handle["sample_sequence_ids"]) == 2
    return handle["request_id"], _poll(srv, handle["request_id"])


def test_checkpoints_and_futures_survive_a_hard_restart(tiny_qwen3_dir, tmp_path):
    srv = ServerProcess(tiny_qwen3_dir, tmp_path / "data", tmp_path / "server.log", ["--api-key", KEY_ALICE]).start()
    try:
        sc = service_client(srv)
        base = sc.get_server_capabilities().supported_models[0].model_name
        tc = sc.create_lora_training_client(base_model=base, rank=4, seed=0).result()
        datum = _datum([5, 17, 33, 2, 90, 41, 7])
        for _ in range(3):
            tc.forward_backward([datum], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-2))
        state = tc.save_state("s3").result().path
        sampler_path = tc.save_weights_for_sampler("w3").result().path
        request_id, before = _raw_sample(srv)
        prompt = types.ModelInput.from_ints([5, 17, 33])
        lp_before = sc.create_sampling_client(model_path=sampler_path).compute_logprobs(prompt).result()
        # Next step after the save, to compare with the resumed client below.
        tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        next_loss = tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]
    finally:
        srv.stop(signal.SIGKILL)

    srv.start()
    try:
        rc = rest_client(srv)
        run_id = state.split("/")[2]
        ids = {c.checkpoint_id for c in rc.list_checkpoints(run_id).result().checkpoints}
        assert {"weights/s3", "sampler_weights/w3"} <= ids
        # The finished future is still retrievable after the restart (raw poll, as the SDK does).
        assert _poll(srv, request_id) == before

        sc = service_client(srv)
        lp_after = sc.create_sampling_client(model_path=sampler_path).compute_logprobs(prompt).result()
        np.testing.assert_allclose(np.array(lp_after[1:]), np.array(lp_before[1:]), atol=1e-5)
        tc2 = sc.create_training_client_from_state_with_optimizer(state).result()
        tc2.forward_backward([datum], "cross_entropy")
        tc2.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        resumed_loss = tc2.forward([datum], "cross_entropy").result().metrics["loss:sum"]
        assert abs(resumed_loss - next_loss) < 1e-3, (resumed_loss, next_loss)
        sc.close("success").result()
    finally:
        srv.stop()
