"""Token streaming (`SampleJob.on_token`): every generated token reaches the callback in order, stop tokens
included, before the future resolves; both forward paths; a raising callback is switched off, not fatal."""

from __future__ import annotations

import pytest

from tinkerbell.engine.types import SampleJob
from tests.engine.test_sampler import PROMPTS, greedy, make_sampler, run, submit


@pytest.mark.parametrize("fast", [False, True])
def test_streamed_tokens_equal_the_result(tiny_llama_dir, fast):
    full = run(make_sampler(tiny_llama_dir, eos=[]), [greedy(PROMPTS[0], 12)])[0].sequences[0].tokens
    stop = next(t for i, t in enumerate(full) if i >= 3 and t not in full[:i])
    seen: dict[int, list[tuple[int, float]]] = {0: [], 1: []}
    sampler = make_sampler(tiny_llama_dir, eos=[], fast=fast)
    done_before_last_token = []

    def on_token(index: int, token: int, logprob: float) -> None:
        done_before_last_token.append(fut.done())
        seen[index].append((token, logprob))

    fut = submit(sampler, SampleJob(prompt=PROMPTS[0], max_tokens=12, temperature=0.0, num_samples=2,
                                    stop_token_ids=[stop], on_token=on_token))
    # A request beside it without a callback is unaffected.
    other = submit(sampler, greedy(PROMPTS[1], 6))
    while sampler.has_work():
        sampler.step()
    res = fut.result(timeout=0)
    for i, seq in enumerate(res.sequences):
        assert [t for t, _ in seen[i]] == seq.tokens and seq.tokens[-1] == stop and seq.stop_reason == "stop"
        assert [lp for _, lp in seen[i]] == seq.logprobs
    assert not any(done_before_last_token)
    assert len(other.result(timeout=0).sequences[0].tokens) == 6


def test_raising_callback_is_turned_off_and_the_request_completes(tiny_llama_dir):
    calls = []

    def broken(index: int, token: int, logprob: float) -> None:
        calls.append(token)
        raise RuntimeError("consumer went away")

    job = SampleJob(prompt=PROMPTS[2], max_tokens=5, temperature=0.0, stop_at_eos=False, on_token=broken)
    res = run(make_sampler(tiny_llama_dir), [job])[0]
    assert len(calls) == 1 and len(res.sequences[0].tokens) == 5
