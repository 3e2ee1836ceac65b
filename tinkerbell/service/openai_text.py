"""Tokens → text for the OpenAI face: per-token text pieces, stop-string truncation, token strings for logprobs.

The engine returns token ids; OpenAI clients want text. Text is built from per-token *pieces* (the text each
token adds, decoded in a short window the way vLLM's incremental detokenizer does), and a response's text is
always the concatenation of its pieces. So a streamed response, which sends the pieces one by one, adds up to
exactly the non-streamed text, and a multi-byte character split over tokens goes out whole with the token that
completes it. Special tokens (EOS, chat markers) decode to nothing, as in vLLM's default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

# Prompt tokens decoded before the first output token so that the first piece gets its leading space right
# (SentencePiece tokenizers drop a leading space at the start of a decode).
_CONTEXT_TOKENS = 5
# Tokens that add no text (special tokens; ids a mismatched tokenizer does not know) keep the window open, as
# an unfinished character does. Past this many in a row with the text complete, the window moves on anyway,
# so a long run of them costs linear time, not a decode of the whole run at every flush.
_EMPTY_RUN = 16


class Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], **kw: Any) -> str: ...


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    fast = _rust_decode(type(tok))
    if fast is not None:
        return fast(tok, list(ids))
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


@functools.lru_cache(maxsize=None)
def _rust_decode(cls: type) -> Callable[[Any, list[int]], str] | None:
    """For a fast (Rust-backed) tokenizer class that keeps transformers' own decode: the Rust decode called
    directly, which is what that decode does with clean-up off, minus its per-id Python (a quarter of the
    cost on short windows, and the stream decodes twice per flush). None: use `tok.decode`."""
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if not issubclass(cls, PreTrainedTokenizerFast):
        return None
    if (getattr(cls, "_decode", None) is not PreTrainedTokenizerFast._decode
            or getattr(cls, "decode", None) is not PreTrainedTokenizerFast.decode):
        return None  # a class with its own decoding: respect it
    return lambda tok, ids: tok.backend_tokenizer.decode(ids, skip_special_tokens=True)


class PieceDecoder:
    """Incremental form of `token_pieces`: `add` returns the text one more token adds and `add_many` the text a
    batch of tokens adds, each in time proportional to the window (the last batch and this one), so a stream
    follows a long output without re-decoding it from the start, and a batch costs two decodes, not two per
    token. Any way of splitting the same tokens into batches yields the same concatenated text: a window only
    ever starts where the previous one's text ended on a complete character."""

    def __init__(self, tok: Tokenizer, context: Sequence[int]):
        self.tok = tok
        self.ids = list(context[-_CONTEXT_TOKENS:])
        self.prefix, self.read = 0, len(self.ids)

    def add(self, token: int) -> str:
        return self.add_many((token,))

    def add_many(self, tokens: Sequence[int]) -> str:
        self.ids.extend(tokens)
        end = len(self.ids)
        before = decode(self.tok, self.ids[self.prefix:self.read])
        now = decode(self.tok, self.ids[self.prefix:end])
        # A trailing U+FFFD is an incomplete UTF-8 sequence: wait for the token that completes it.
        if len(now) > len(before) and not now.endswith("\ufffd"):
            # The next window starts where this one's new text did; drop the ids before it, so `ids` stays
            # short however long the output grows.
            del self.ids[:self.read]
            self.prefix, self.read = 0, len(self.ids)
            return now[len(before):]
        if now == before and end - self.read >= _EMPTY_RUN and not now.endswith("\ufffd"):
            del self.ids[:self.read]  # the run added nothing: the next window starts where it began
            self.prefix, self.read = 0, len(self.ids)
        return ""

    def flush(self) -> str:
        """What bytes that never formed a character decode to (at the end of an output)."""
        if self.read >= len(self.ids):
            return ""
        return decode(self.tok, self.ids[self.prefix:])[len(decode(self.tok, self.ids[self.prefix:self.read])):]


def token_pieces(tok: Tokenizer, context: Sequence[int], output: Sequence[int]) -> list[str]:
    """The text each of `output`'s tokens adds after `context`; ''.join(result) is the output's text."""
    d = PieceDecoder(tok, context)
    pieces = [d.add(t) for t in output]
    if pieces:
        pieces[-1] += d.flush()
    return pieces


def output_text(tok: Tokenizer, context: Sequence[int], output: Sequence[int]) -> str:
    """''.join(token_pieces(...)) in two decodes: what a response without per-token logprobs needs."""
    d = PieceDecoder(tok, context)
    return d.add_many(output) + d.flush()


def token_string(tok: Tokenizer, token_id: int) -> str:
    """One token on its own, as logprobs name it (vLLM's convention: the token decoded alone)."""
    return tok.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in `text` beginning at or after `start`, or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


@dataclass
class Truncation:
    """How many tokens (and which text of the last one) remain once the text is cut at `cut` characters."""

    keep_tokens: int
    pieces: list[str] = field(default_factory=list)


def truncate_pieces(pieces: list[str], cut: int) -> Truncation:
    """Keep the tokens whose text starts before character `cut`, the last one clipped at `cut`."""
    out: list[str] = []
    pos = 0
    for p in pieces:
        if pos >= cut:  # (an empty piece right at the cut belongs after it too)
            break
        out.append(p[: max(0, cut - pos)])
        pos += len(p)
    return Truncation(keep_tokens=len(out), pieces=out)


def apply_stop(pieces: list[str], stops: Sequence[str], include_stop: bool) -> tuple[list[str], bool]:
    """Cut the pieces at the first stop string (OpenAI semantics: the stop string itself is not returned unless
    `include_stop`). Returns (kept pieces, whether a stop string was found)."""
    if not stops:
        return pieces, False
    found = find_stop("".join(pieces), stops)
    if found is None:
        return pieces, False
    index, s = found
    return truncate_pieces(pieces, index + len(s) if include_stop else index).pieces, True
