"""Every loss function, through the SDK, against a value computed here by hand from the returned logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinker import types

from tests.e2e.conftest import service_client

N = 9


@pytest.fixture(scope="module")
def client(llama_server):
    sc = service_client(llama_server)
    base = sc.get_server_capabilities().supported_models[0].model_name
    tc = sc.create_lora_training_client(base_model=base, rank=4, seed=1).result()
    yield tc
    sc.close("success").result()


def _tokens(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 300, size=N + 1)
    return ids[:-1], ids[1:]


def _lp(tc, inp, tgt) -> np.ndarray:
    """Per-token logprobs of the targets (cross_entropy with zero weights computes them, loss 0)."""
    d = types.Datum(model_input=types.ModelInput.from_ints(inp.tolist()),
                    loss_fn_inputs={"target_tokens": tgt, "weights": np.zeros(N, np.float32)})
    out = tc.forward([d], "cross_entropy").result()
    assert out.metrics["loss:sum"] == 0.0
    return np.asarray(out.loss_fn_outputs[0]["logprobs"].data, dtype=np.float64)


def _rl_datum(inp, tgt, q, adv, **extra) -> types.Datum:
    inputs = {"target_tokens": tgt, "logprobs": q.astype(np.float32), "advantages": adv.astype(np.float32)}
    inputs.update({k: v.astype(np.float32) for k, v in extra.items()})
    return types.Datum(model_input=types.ModelInput.from_ints(inp.tolist()), loss_fn_inputs=inputs)


def test_cross_entropy_with_real_weights_is_the_weighted_nll(client):
    inp, tgt = _tokens(0)
    lp = _lp(client, inp, tgt)
    w = np.linspace(-1.0, 2.0, N).astype(np.float32)  # negative weights occur (forward_backward_custom)
    d = types.Datum(model_input=types.ModelInput.from_ints(inp.tolist()),
                    loss_fn_inputs={"target_tokens": tgt, "weights": w})
    out = client.forward([d], "cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(float(-(w * lp).sum()), rel=1e-4, abs=1e-4)


def test_cross_entropy_with_topk_soft_targets(client):
    inp, tgt = _tokens(1)
    k_tgt = np.stack([tgt, (tgt + 1) % 300, (tgt + 7) % 300], axis=1)
    lps = np.stack([_lp(client, inp, k_tgt[:, j]) for j in range(3)], axis=1)
    w = np.tile(np.array([0.6, 0.3, 0.1], np.float32), (N, 1))
    d = types.Datum(model_input=types.ModelInput.from_ints(inp.tolist()),
                    loss_fn_inputs={"target_tokens": k_tgt, "weights": w})
    out = client.forward([d], "cross_entropy").result()
    assert out.loss_fn_outputs[0]["logprobs"].shape == [N, 3]
    assert out.metrics["loss:sum"] == pytest.approx(float(-(w * lps).sum()), rel=1e-4, abs=1e-4)


def _ratio_case(client, seed):
    inp, tgt = _tokens(seed)
    lp = _lp(client, inp, tgt)
    rng = np.random.default_rng(seed + 100)
    q = lp + rng.normal(0, 0.5, size=N)  # ratios well outside [0.8, 1.2] on some positions
    adv = rng.normal(0, 1, size=N)
    return inp, tgt, lp, q, adv


def test_importance_sampling(client):
    inp, tgt, lp, q, adv = _ratio_case(client, 2)
    out = client.forward([_rl_datum(inp, tgt, q, adv)], "importance_sampling").result()
    expected = -(np.exp(lp - q) * adv).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-3, abs=1e-3)


def test_ppo_with_clip_config(client):
    inp, tgt, lp, q, adv = _ratio_case(client, 3)
    cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    out = client.forward([_rl_datum(inp, tgt, q, adv)], "ppo", cfg).result()
    r = np.exp(lp - q)
    expected = -np.minimum(r * adv, np.clip(r, 0.9, 1.1) * adv).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-3, abs=1e-3)


def test_cispo_defaults_to_0_8_and_1_2(client):
    inp, tgt, lp, q, adv = _ratio_case(client, 4)
    out = client.forward([_rl_datum(inp, tgt, q, adv)], "cispo").result()
    expected = -(np.clip(np.exp(lp - q), 0.8, 1.2) * lp * adv).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-3, abs=1e-3)


def test_dro_with_beta(client):
    inp, tgt, lp, q, adv = _ratio_case(client, 5)
    out = client.forward([_rl_datum(inp, tgt, q, adv)], "dro", {"beta": 0.1}).result()
    expected = -(lp * adv - 0.5 * 0.1 * (lp - q) ** 2).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-3, abs=1e-3)


def test_gspo_uses_the_masked_sequence_ratio(client):
    inp, tgt, lp, q, adv = _ratio_case(client, 6)
    mask = (np.arange(N) >= 3).astype(np.float32)
    out = client.forward([_rl_datum(inp, tgt, q, adv, sequence_ratio_mask=mask)], "gspo").result()
    s = np.exp(np.mean((lp - q)[mask != 0]))
    expected = -np.minimum(s * adv, np.clip(s, 0.8, 1.2) * adv).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-3, abs=1e-3)


def test_stable_reinforce_fails_with_a_user_error_that_says_what_to_use(client):
    import tinker

    inp, tgt, lp, q, adv = _ratio_case(client, 7)
    with pytest.raises(tinker.RequestFailedError, match="ppo"):
        client.forward([_rl_datum(inp, tgt, q, adv)], "stable_reinforce").result()
    # The failure consumed its seq_id: the client keeps working.
    assert _lp(client, inp, tgt).shape == (N,)


def test_forward_backward_custom_matches_its_cross_entropy_equivalent(client):
    inp, tgt = _tokens(8)
    d = types.Datum(model_input=types.ModelInput.from_ints(inp.tolist()),
                    loss_fn_inputs={"target_tokens": tgt, "weights": np.ones(N, np.float32)})

    def neg_mean_lp(data, logprobs_list):
        loss = -torch.stack([lp.mean() for lp in logprobs_list]).sum()
        return loss, {"custom_metric": float(loss)}

    out = client.forward_backward_custom([d], neg_mean_lp).result()
    lp = _lp(client, inp, tgt)
    assert out.metrics["loss:sum"] == pytest.approx(float(-lp.mean()), rel=1e-3, abs=1e-3)
