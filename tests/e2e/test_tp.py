"""`serve --tp 2` on CPU (two processes on gloo) against `--tp 1` of the same model folder, through the official
tinker SDK: the same per-token logprobs, greedy tokens and training losses; checkpoints saved at TP 2 load at
TP 1; a dead worker ends the server loudly and no worker outlives it.

Each model gets one TP 1 and one TP 2 server sharing a data dir (as `--dp` replicas do), so a `tinker://` path
saved on one loads on the other. Qwen3 has one KV head: at TP 2 it is replicated on both ranks.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from tinker import types

from tests.e2e.conftest import KEY_ALICE, ServerProcess, service_client

PROMPT = [5, 17, 42, 99, 7, 23, 64, 11, 3, 150, 31, 77]
STEPS = 10


@pytest.fixture(scope="module")
def qwen3_kv1_dir(fixtures_root: Path) -> Path:
    from tinkerbell.engine.models.tiny import build_tiny_model

    path = fixtures_root / "fx" / "tiny-qwen3-kv1"
    if not (path / "config.json").exists():
        build_tiny_model(path, arch="qwen3", num_kv_heads=1, tie_word_embeddings=True, seed=1)
    return path


def _start(model: Path, data: Path, log: Path, tp: int) -> ServerProcess:
    return ServerProcess(model, data, log, ["--api-key", KEY_ALICE, "--tp", str(tp)]).start()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pair(request, tiny_llama_dir, qwen3_kv1_dir, tmp_path_factory):
    """(TP 1 server, TP 2 server) of one model, sharing one data dir."""
    model = tiny_llama_dir if request.param == "llama" else qwen3_kv1_dir
    root = tmp_path_factory.mktemp(f"tp-{request.param}")
    one = _start(model, root / "data", root / "tp1.log", 1)
    try:
        two = _start(model, root / "data", root / "tp2.log", 2)
    except BaseException:
        one.stop()
        raise
    try:
        yield one, two
    finally:
        two.stop()
        one.stop()


def _base(sc) -> str:
    return sc.get_server_capabilities().supported_models[0].model_name


def _datum() -> types.Datum:
    ids = np.array(PROMPT + [9, 10, 12, 14, 200, 201], dtype=np.int64)
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1].tolist()),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": np.ones(len(ids) - 1, np.float32)})


def _greedy(sampler, n: int = 12) -> tuple[list[int], list[float]]:
    res = sampler.sample(types.ModelInput.from_ints(PROMPT), num_samples=1,
                         sampling_params=types.SamplingParams(max_tokens=n, temperature=0.0)).result()
    return list(res.sequences[0].tokens), list(res.sequences[0].logprobs)


def _train(server: ServerProcess) -> tuple[list[float], object, object]:
    """10 seeded steps; returns (losses, the training client, its service client)."""
    sc = service_client(server)
    tc = sc.create_lora_training_client(base_model=_base(sc), rank=8, seed=0).result()
    losses = []
    for _ in range(STEPS):
        fb = tc.forward_backward([_datum()], "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return losses, tc, sc


def test_base_model_logprobs_and_greedy_tokens_match_tp1(pair):
    out = []
    for server in pair:
        sc = service_client(server)
        sampler = sc.create_sampling_client(base_model=_base(sc))
        lps = sampler.compute_logprobs(types.ModelInput.from_ints(PROMPT)).result()
        out.append((np.array(lps[1:], dtype=np.float64), *_greedy(sampler)))
    (lp1, tok1, slp1), (lp2, tok2, slp2) = out
    np.testing.assert_allclose(lp2, lp1, atol=1e-4, rtol=0)
    assert tok2 == tok1
    np.testing.assert_allclose(slp2, slp1, atol=1e-4, rtol=0)


def test_training_losses_and_trained_sampler_match_tp1(pair):
    runs = [_train(server) for server in pair]
    (loss1, tc1, _), (loss2, tc2, _) = runs
    assert loss1[-1] < 0.5 * loss1[0], loss1  # it learned: the comparison is not of two untrained models
    np.testing.assert_allclose(loss2, loss1, atol=1e-3, rtol=0)
    # The in-memory train→sampler handoff, on each rank's shard of the sampler's LoRA slots.
    (tok1, lp1), (tok2, lp2) = (_greedy(tc.save_weights_and_get_sampling_client().result()) for tc in (tc1, tc2))
    assert tok2 == tok1
    np.testing.assert_allclose(lp2, lp1, atol=1e-4, rtol=0)


def test_checkpoint_saved_at_tp2_loads_at_tp1(pair):
    one, two = pair
    _, tc2, _ = _train(two)
    sampler_path = tc2.save_weights_for_sampler("tp2-sampler").result().path
    state_path = tc2.save_state("tp2-state").result().path
    want_tokens, want_lps = _greedy(tc2.save_weights_and_get_sampling_client().result())  # in memory, TP 2
    want_loss = tc2.forward([_datum()], "cross_entropy").result().metrics["loss:sum"]

    # The saved file is a whole PEFT adapter: the TP 1 server reads it as is; on the TP 2 server each rank cuts
    # its pieces when rank 0's scheduler loads it into a LoRA slot (the workers repeat that load).
    for server in (one, two):
        tokens, lps = _greedy(service_client(server).create_sampling_client(model_path=sampler_path))
        assert tokens == want_tokens, server.extra
        np.testing.assert_allclose(lps, want_lps, atol=1e-4, rtol=0)
    tc1 = service_client(one).create_training_client_from_state_with_optimizer(state_path).result()
    loss = tc1.forward([_datum()], "cross_entropy").result().metrics["loss:sum"]
    assert abs(loss - want_loss) <= 1e-3, (loss, want_loss)


# ------------------------------------------------------------------------------------------- process lifetime


def _worker_pid(server: ServerProcess) -> int:
    m = re.search(r"tensor-parallel worker rank 1 started \(pid (\d+)\)", server.log_path.read_text())
    assert m, server.log_tail()
    return int(m.group(1))


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie (exited, not yet reaped by its dead parent's reaper) counts as gone
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def tp2_server(tiny_llama_dir, tmp_path):
    server = _start(tiny_llama_dir, tmp_path / "data", tmp_path / "tp2.log", 2)
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
        server.stop()


def test_killing_a_worker_makes_the_server_exit_loudly(tp2_server):
    pid = _worker_pid(tp2_server)
    os.kill(pid, signal.SIGKILL)
    proc = tp2_server.proc
    assert proc is not None
    code = proc.wait(timeout=30)  # never a hang
    assert code != 0
    log = tp2_server.log_path.read_text()
    assert f"tensor-parallel worker rank 1 (pid {pid}) exited with code -9" in log, tp2_server.log_tail()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_worker_outlives_the_server(tp2_server, sig):
    pid = _worker_pid(tp2_server)
    proc = tp2_server.proc
    assert proc is not None
    proc.send_signal(sig)
    proc.wait(timeout=30)  # (uvicorn re-raises SIGTERM after its graceful shutdown: the code is -15 either way)
    if sig == signal.SIGTERM:  # the clean path: rank 0 broadcast the stop op and the worker left its loop
        assert "[tp rank 1]: rank 1 stopped" in tp2_server.log_path.read_text(), tp2_server.log_tail()
    assert _gone(pid, timeout=10), f"worker pid {pid} still running after the server got {sig.name}"


def test_a_worker_dying_during_startup_makes_serve_exit(tiny_llama_dir, tmp_path):
    """Rank 0 waits for its workers to join the group: a worker lost before then must not leave it waiting."""
    import subprocess
    import sys

    from tests.e2e.conftest import free_port

    cmd = [sys.executable, "-m", "tinkerbell", "serve", "--model", str(tiny_llama_dir), "--tp", "2", "--no-auth",
           "--host", "127.0.0.1", "--port", str(free_port()), "--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"tensor-parallel worker rank 1 started \(pid (\d+)\)", line)
            if m:
                pid = int(m.group(1))
                os.kill(pid, signal.SIGKILL)
                break
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode != 0
        assert f"rank 1 (pid {pid}) exited with code -9" in rest, "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
