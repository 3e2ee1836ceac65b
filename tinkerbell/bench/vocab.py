"""A tokenizer that covers a random-weight checkpoint's whole vocabulary, for benchmarking real model shapes
without their real tokenizer.

`bench/make_random_checkpoint.py` writes a real-size model (Llama-3.2-1B: 128,256 ids) with the small demo
tokenizer (a few hundred ids). A random model samples ids from the whole vocabulary, and ids the tokenizer does
not know decode to nothing: over 99% of the output would be invisible to a streaming client, so TTFT and ITL
would time the rare known ids, and the server's detokenisation and SSE work would be a fraction of a real
model's. This writes, over the checkpoint's tokenizer files, a byte-level BPE with exactly `vocab_size` ids:
the demo tokenizer's special tokens at their ids, the 256 byte symbols, then merges building ' a'…' z', two-,
three- and four-letter words (with and without a leading space) until the vocabulary is full. Every id decodes
to text, as with a real tokenizer, and decoding costs what a real BPE decode costs.

    python -m tinkerbell.bench.vocab /tmp/llama-3.2-1b-random
"""

from __future__ import annotations

import argparse
import itertools
import json
import string
from pathlib import Path
from typing import Any, Iterator

_LETTERS = string.ascii_lowercase
_SPACE = "Ġ"  # the byte-level alphabet's symbol for " "


def _merges() -> Iterator[tuple[str, str]]:
    """BPE merges in an order where both halves of each merge already exist."""
    yield from ((_SPACE, c) for c in _LETTERS)
    for n in range(2, 5):
        for letters in itertools.product(_LETTERS, repeat=n):
            word = "".join(letters)
            yield word[:-1], word[-1]
            yield _SPACE + word[:-1], word[-1]


def build(vocab_size: int, special: list[str]) -> Any:
    """A PreTrainedTokenizerFast of exactly `vocab_size` ids; `special` take ids 0, 1, …"""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for s in special:
        vocab[s] = len(vocab)
    for sym in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(sym, len(vocab))
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(vocab)} special and byte tokens")
    merges: list[tuple[str, str]] = []
    for a, b in _merges():
        if len(vocab) >= vocab_size:
            break
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    if len(vocab) < vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is more than this builder makes ({len(vocab)})")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def rewrite(model_dir: Path) -> int:
    """Replace `model_dir`'s tokenizer with a full-vocabulary one keeping its special tokens, chat template and
    roles. Returns the vocabulary size."""
    from transformers import AutoTokenizer

    vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    old = AutoTokenizer.from_pretrained(str(model_dir))
    added = old.added_tokens_decoder  # id -> AddedToken: the special and chat-marker tokens
    ids = sorted(added)
    if ids != list(range(len(ids))):
        raise ValueError(f"added token ids {ids} are not 0..{len(ids) - 1}: this builder puts them first")
    special = [added[i].content for i in ids]
    new = build(vocab_size, special)
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(old, role, None)
        if value is not None:
            setattr(new, role, value)
    new.chat_template = old.chat_template
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (model_dir / name).unlink(missing_ok=True)
    new.save_pretrained(str(model_dir))
    return len(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    args = ap.parse_args(argv)
    n = rewrite(args.model_dir)
    print(f"wrote a {n:,}-id byte-level BPE tokenizer to {args.model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
