"""Tokens → text for the OpenAI face: batched incremental decoding gives the same text however the tokens are
split into batches, and the whole-output decode equals the per-token pieces (what logprobs align with)."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from tinkerbell.service import openai_text as text


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def _outputs(tok, n: int, length: int, seed: int) -> list[list[int]]:
    # Random ids over the whole vocabulary: lone UTF-8 lead and continuation bytes (the byte-level tokens) make
    # incomplete and invalid characters, the cases where windows and batch boundaries could disagree.
    rng = random.Random(seed)
    return [[rng.randrange(len(tok)) for _ in range(length)] for _ in range(n)]


def _split(rng: random.Random, ids: list[int]) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        k = rng.choice([1, 1, 2, 3, 7, 20])
        out.append(ids[i:i + k])
        i += k
    return out


def test_batches_of_any_size_decode_to_the_per_token_text(tok):
    rng = random.Random(1)
    context = tok.encode("Hello! My name is")
    for output in _outputs(tok, 40, 60, seed=2):
        per_token = "".join(text.token_pieces(tok, context, output))
        d = text.PieceDecoder(tok, context)
        batched = "".join(d.add_many(b) for b in _split(rng, output)) + d.flush()
        assert batched == per_token
        assert text.output_text(tok, context, output) == per_token


def test_output_text_is_the_plain_decode_for_valid_text(tok):
    ids = tok.encode(" The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
    assert text.output_text(tok, tok.encode("Hello"), ids) == tok.decode(ids)


def test_a_character_split_over_tokens_waits_for_its_last_byte(tok):
    # "é" is the bytes C3 A9; a byte-level vocabulary has a token for each byte (GPT-2's byte alphabet writes
    # them "Ã" and "©"), whether or not it also has a merged token for the pair.
    byte_ids = [tok.convert_tokens_to_ids(t) for t in ("Ã", "©")]
    assert tok.unk_token_id not in byte_ids and tok.decode(byte_ids) == "é"
    d = text.PieceDecoder(tok, tok.encode("a"))
    assert d.add_many(byte_ids[:1]) == ""
    assert d.add_many(byte_ids[1:]) == "é"


def test_find_stop_from_an_offset_skips_earlier_matches():
    assert text.find_stop("ab STOP cd STOP", ["STOP"], start=4) == (11, "STOP")
    assert text.find_stop("ab STOP", ["STOP", "b S"]) == (1, "b S")


def test_the_direct_rust_decode_is_what_the_tokenizer_decodes(tok):
    assert text._rust_decode(type(tok)) is not None  # the fixture's tokenizer takes the fast path
    for ids in _outputs(tok, 50, 12, seed=3) + [tok.encode("<|im_start|>user\nhi<|im_end|>")]:
        assert text.decode(tok, ids) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_a_long_run_of_tokens_without_text_keeps_the_window_short(tok):
    # Ids beyond this tokenizer's vocabulary decode to nothing (a random model with a smaller tokenizer).
    words = tok.encode(" one two three")
    output = [len(tok) + 5] * 300 + words + [len(tok) + 9] * 300 + words
    d = text.PieceDecoder(tok, tok.encode("Hi"))
    got, longest = [], 0
    for t in output:
        got.append(d.add(t))
        longest = max(longest, len(d.ids))
    assert "".join(got) + d.flush() == " one two three one two three"
    assert longest < 40
