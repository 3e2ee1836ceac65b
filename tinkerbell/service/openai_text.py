"""Tokens → text for the OpenAI face: per-token text pieces, stop-string truncation, token strings for logprobs.

The engine returns token ids; OpenAI clients want text. Text is built from per-token *pieces* (the text each
token adds, decoded in a short window the way vLLM's incremental detokenizer does), and a response's text is
always the concatenation of its pieces. So a streamed response, which sends the pieces one by one, adds up to
exactly the non-streamed text, and a multi-byte character split over tokens goes out whole with the token that
completes it. Special tokens (EOS, chat markers) decode to nothing, as in vLLM's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

# Prompt tokens decoded before the first output token so that the first piece gets its leading space right
# (SentencePiece tokenizers drop a leading space at the start of a decode).
_CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], **kw: Any) -> str: ...


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def token_pieces(tok: Tokenizer, context: Sequence[int], output: Sequence[int]) -> list[str]:
    """The text each of `output`'s tokens adds after `context`; ''.join(result) is the output's text."""
    ids = list(context[-_CONTEXT_TOKENS:]) + list(output)
    prefix, read = 0, len(ids) - len(output)
    pieces: list[str] = []
    for end in range(read + 1, len(ids) + 1):
        before = decode(tok, ids[prefix:read])
        now = decode(tok, ids[prefix:end])
        # A trailing U+FFFD is an incomplete UTF-8 sequence: wait for the token that completes it.
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before):])
            prefix, read = read, end
        else:
            pieces.append("")
    if pieces and read < len(ids):  # bytes that never formed a character: flush what they decode to
        pieces[-1] += decode(tok, ids[prefix:])[len(decode(tok, ids[prefix:read])):]
    return pieces


def token_string(tok: Tokenizer, token_id: int) -> str:
    """One token on its own, as logprobs name it (vLLM's convention: the token decoded alone)."""
    return tok.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in `text`, or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
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
