"""The live half of streaming: LiveText (a choice's text as token batches arrive, stop strings held back across
flushes) and LiveFeed (tokens handed from the engine thread to the event loop, one wake-up per burst)."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest
from transformers import AutoTokenizer

from tinkerbell.service import openai_text as text
from tinkerbell.service.openai_completions import LiveFeed, LiveText, SamplingOptions, _Waker


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def _stream(tok, prompt: list[int], output: list[int], opts: SamplingOptions, seed: int) -> tuple[list[str], LiveText]:
    """What a stream sends: the output appended in random batches, `take` after each."""
    rng = random.Random(seed)
    live = LiveText(text.PieceDecoder(tok, prompt), opts)
    sent, i = [], 0
    while i < len(output):
        k = rng.choice([1, 2, 5, 13])
        live.append(output[i:i + k])
        i += k
        sent.append(live.take())
    return sent, live


def test_stop_string_never_streams_whatever_the_flush_boundaries(tok):
    prompt = tok.encode("Hello")
    output = tok.encode(" one, two, three, four, five, six, seven, eight")
    full = text.output_text(tok, prompt, output)
    for stop in (", four", "e", "x, s", "eight"):
        cut = full[:full.index(stop)]
        for seed in range(20):
            sent, _ = _stream(tok, prompt, output, SamplingOptions(stop=[stop]), seed)
            assert "".join(sent) == cut, (stop, seed, sent)


def test_include_stop_ends_right_after_the_stop_string(tok):
    prompt = tok.encode("Hello")
    output = tok.encode(" one, two, three, four, five")
    for seed in range(10):
        sent, _ = _stream(tok, prompt, output, SamplingOptions(stop=["two", "four"], include_stop=True),
                          seed)
        assert "".join(sent) == " one, two"


def test_the_tail_a_stop_string_could_still_complete_is_held_back(tok):
    live = LiveText(text.PieceDecoder(tok, tok.encode("a")), SamplingOptions(stop=["three four"]))
    live.append(tok.encode(" one two three"))
    assert live.take() == " one "  # the last len("three four") - 1 = 9 characters could begin the stop string
    live.append(tok.encode(" five six seven"))
    assert live.take() == "two three five "  # " five" ruled it out: released up to the new 9-character tail
    live.append(tok.encode(" three four eight"))
    assert live.take() == "six seven "
    assert live.certain() == " one two three five six seven " and live.take() == ""


def test_without_stop_strings_the_stream_adds_up_to_the_whole_text(tok):
    for seed in range(10):
        output = [random.Random(seed).randrange(len(tok)) for _ in range(50)]
        sent, live = _stream(tok, [], output, SamplingOptions(), seed)
        # Bytes of an unfinished character at the very end come out only when the output is finished.
        assert "".join(sent) + live.decoder.flush() == text.output_text(tok, [], output)


def test_a_burst_from_the_engine_thread_wakes_the_loop_once_for_every_request():
    async def main() -> tuple[int, list[dict[int, list[int]]]]:
        loop = asyncio.get_running_loop()
        waker = _Waker(loop)
        runs = 0
        inner = waker.run

        def counted() -> None:
            nonlocal runs
            runs += 1
            inner()

        waker.run = counted  # type: ignore[method-assign]
        feeds = [LiveFeed(waker) for _ in range(8)]

        def engine_step() -> None:  # one decode step: a token for two choices of every request
            for t in range(3):
                for f in feeds:
                    f.on_token(0, 0, 100 + t, -1.0)
                    f.on_token(2, 1, 200 + t, -1.0)

        th = threading.Thread(target=engine_step)
        th.start()
        th.join()  # the loop is not running meanwhile: every token is buffered before it wakes
        await asyncio.gather(*(f.event.wait() for f in feeds))
        return runs, [f.take() for f in feeds]

    runs, taken = asyncio.run(main())
    assert runs == 1
    assert all(t == {0: [100, 101, 102], 3: [200, 201, 202]} for t in taken)


def test_tokens_after_a_take_wake_the_stream_again():
    async def main() -> list[dict[int, list[int]]]:
        feed = LiveFeed(_Waker(asyncio.get_running_loop()))
        got = []
        for block in ([1, 2], [3], [4, 5, 6]):
            threading.Thread(target=feed.on_block, args=(0, 0, block, False)).start()
            await asyncio.wait_for(feed.event.wait(), 5)
            got.append(feed.take())
        return got

    assert asyncio.run(main()) == [{0: [1, 2]}, {0: [3]}, {0: [4, 5, 6]}]
