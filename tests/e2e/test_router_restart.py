"""`serve --dp 2` on CPU restarts a replica that died, without touching the other replica's futures in the
shared store. Replica X holds training run A, replica Y run B; each has a finished and a pending (held back by
a missing seq_id) future when Y is SIGKILLed. The supervisor restarts Y; the router takes it back; A's futures
are intact (the pending one completes once its turn comes), B's pending future reports the restart naming B and
how to resume it, B resumes from its saved state, and the restarted Y serves traffic through the router."""

from __future__ import annotations

import os
import signal
import time

import httpx

from tests.e2e.conftest import KEY_ALICE
from tests.e2e.test_router import INTERVAL, Cluster, _datum
from tinkerbell.router.ports import holder

HEADERS = {"X-API-Key": KEY_ALICE}


def _post(c: Cluster, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{c.url}/api/v1/{endpoint}", json=body, headers=HEADERS, timeout=60)


def _save(c: Cluster, run: str, seq_id: int, name: str) -> str:
    """Submit save_weights (a numbered training request) through the router; its tagged request id."""
    r = _post(c, "save_weights", {"model_id": run, "path": name, "seq_id": seq_id, "type": "save_weights"})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def _result(c: Cluster, request_id: str) -> dict:
    for _ in range(3):  # a long poll answers 408 try_again while the future runs
        r = _post(c, "retrieve_future", {"request_id": request_id})
        if r.status_code != 408:
            assert r.status_code == 200, r.text
            return r.json()
    raise AssertionError(f"{request_id} still pending")


def _holder_of(c: Cluster, run: str) -> int:
    return next(i for i in range(2) if run in httpx.get(c.replica_url(i) + "/stats", timeout=5).json()["live_runs"])


def test_restarted_replica_leaves_other_futures_intact_and_serves_again(tiny_llama_dir, tmp_path):
    import tinker
    from tinker import types

    base = str(tiny_llama_dir)
    c = Cluster(tiny_llama_dir, tmp_path)
    try:
        # Two sessions on an idle cluster land on the two replicas.
        sc_a, sc_b = (tinker.ServiceClient(base_url=c.url, api_key=KEY_ALICE) for _ in range(2))
        run_a = sc_a.create_lora_training_client(base_model=base, rank=4).result().get_info().model_id
        run_b = sc_b.create_lora_training_client(base_model=base, rank=4).result().get_info().model_id
        x, y = _holder_of(c, run_a), _holder_of(c, run_b)
        assert x != y
        a_done = _save(c, run_a, 1, "a1")
        assert "path" in _result(c, a_done)
        a_pending = _save(c, run_a, 3, "a3")  # waits for seq_id 2
        b_saved = _result(c, _save(c, run_b, 1, "b1"))["path"]
        b_pending = _save(c, run_b, 3, "b3")
        assert a_pending.startswith(f"r{x}~") and b_pending.startswith(f"r{y}~")

        os.kill(int(holder(c.port + 1 + y).split()[1]), signal.SIGKILL)
        killed = time.monotonic()
        # A request racing the kill may be written into the dying process's socket (the router then cannot know
        # whether it ran: a run creation gets a 400 saying to create it again); a user sees the death first.
        while c.stats()["workers"][y]["healthy"] and time.monotonic() - killed < 5:
            time.sleep(0.05)

        # B resumes from its saved state (no optimizer state: create_training_client_from_state) on a live replica.
        tc = sc_b.create_training_client_from_state(b_saved).result()
        assert tc.forward_backward([_datum()], "cross_entropy").result().loss_fn_outputs
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        resumed = tc.get_info().model_id
        assert resumed != run_b and resumed in httpx.get(c.replica_url(x) + "/stats").json()["live_runs"]

        # The supervisor restarts Y; the router puts it back once its health check passes.
        back = None
        while time.monotonic() - killed < 45:
            w = c.stats()["workers"][y]
            if w["healthy"] and w["restarts"] >= 1 and "is back after its restart" in c.log.read_text(errors="replace"):
                back = time.monotonic() - killed
                break
            time.sleep(0.1)
        assert back is not None, c.tail()
        print(f"replica {y} back in the router {back:.1f} s after the kill")
        assert f"replica {y} (http://127.0.0.1:{c.port + 1 + y}) exited with status -9; restarting it in 1 s" \
            in c.log.read_text(errors="replace")

        # X's futures are intact: the finished one still answers, the pending one completes in its turn.
        assert "path" in _result(c, a_done)
        a2 = _save(c, run_a, 2, "a2")
        assert _result(c, a2)["path"].endswith("/a2")
        assert _result(c, a_pending)["path"].endswith("/a3")

        # Y's pending future failed at its restart, naming the run and how to resume it.
        err = _result(c, b_pending)
        assert err["category"] == "server" and run_b in err["error"] and "restarted" in err["error"]
        assert f"create_training_client_from_state_with_optimizer('tinker://{run_b}/weights/<name>')" in err["error"]
        # B's next request reaches the restarted Y, which no longer holds it: it fails naming B, not a hang.
        err = _result(c, _save(c, run_b, 4, "b4"))
        assert run_b in err["error"] and "save_state" in err["error"], err

        # The restarted replica serves again through the router (idle ties go to the replica with fewer served).
        before = c.stats()["workers"][y]["requests_served"]
        for _ in range(6):
            r = httpx.post(c.url + "/v1/completions", json={"model": base, "prompt": "hi", "max_tokens": 3},
                           headers=HEADERS, timeout=60)
            assert r.status_code == 200, r.text
        assert c.stats()["workers"][y]["requests_served"] > before
        time.sleep(3 * INTERVAL)
        assert c.stats()["healthy_workers"] == 2
    finally:
        c.stop()
