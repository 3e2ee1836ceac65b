"""Chat text -> token ids for the original client API, with the served model's own chat template.

The original Tinkerbell server took training data as chat conversations and prompts as text; the engine takes
token ids. A conversation is rendered turn by turn so that exactly the assistant turns (their content and the
template's end-of-turn marker) carry loss weight 1, and a prompt is rendered the way a conversation's assistant
turn is introduced, so what training teaches is what sampling continues. Tokenizers without a chat template
get a plain `User: ... / Assistant: ...` layout.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pydantic

from tinkerbell.engine.types import TrainDatum
from tinkerbell.service.errors import BadRequest

Role = Literal["system", "user", "assistant", "tool"]


class Message(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")
    role: Role
    content: str


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatRenderer:
    def __init__(self, tokenizer: Any, max_context: int):
        self.tok = tokenizer
        self.max_context = max_context
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    # ----------------------------------------------------------------------------------------- text

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if not messages and not add_generation_prompt:
            return ""
        if self.has_template:
            return self.tok.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
        eos = self.tok.eos_token or ""
        text = "".join(f"{m.role.capitalize()}: {m.content}{eos if m.role == 'assistant' else ''}\n"
                       for m in messages)
        return text + ("Assistant: " if add_generation_prompt else "")

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False)) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    # ----------------------------------------------------------------------------------------- parsing

    @staticmethod
    def messages(raw: Any, field: str) -> list[Message]:
        if isinstance(raw, dict) and isinstance(raw.get("messages"), list):
            raw = raw["messages"]
        if not isinstance(raw, list) or not raw:
            raise BadRequest(f"{field} must be a non-empty list of chat messages "
                             "[{\"role\": \"user\", \"content\": \"...\"}, {\"role\": \"assistant\", ...}]")
        out = []
        for j, m in enumerate(raw):
            try:
                out.append(Message.model_validate(m))
            except pydantic.ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err.get("loc", ()))
                raise BadRequest(f"{field}[{j}]{'.' + loc if loc else ''}: {err.get('msg', 'invalid')} (a message "
                                 "is {\"role\": \"system\"|\"user\"|\"assistant\"|\"tool\", \"content\": \"...\"})") from None
        return out

    # ----------------------------------------------------------------------------------------- training

    def conversation_tokens(self, messages: list[Message], field: str) -> tuple[list[int], list[float]]:
        """Token ids of the rendered conversation and a weight per token: 1 on assistant turns, else 0.

        Each assistant turn i is the text between the conversation up to turn i-1 with the generation prompt
        and the conversation up to turn i; pieces are tokenized separately, so the prompt part is tokenized
        exactly as `prompt_tokens` tokenizes it when sampling."""
        pieces: list[tuple[str, float]] = []
        done = ""
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            after = self.render(messages[: i + 1], add_generation_prompt=False)
            if not after.startswith(done):
                raise BadRequest(f"{field}: the model's chat template does not render this conversation turn by "
                                 f"turn (turn {i} rewrites earlier text), so its assistant tokens cannot be located")
            start = max(len(done), _common_prefix(before, after))
            pieces += [(after[len(done):start], 0.0), (after[start:], 1.0)]
            done = after
        if not any(w for _, w in pieces):
            raise BadRequest(f"{field} has no assistant message: the loss is computed on assistant turns only")
        full = self.render(messages, add_generation_prompt=False)
        if full.startswith(done):
            pieces.append((full[len(done):], 0.0))
        ids: list[int] = []
        weights: list[float] = []
        for text, w in pieces:
            toks = self.encode(text)
            ids += toks
            weights += [w] * len(toks)
        return ids, weights

    def datum(self, raw: Any, field: str) -> tuple[TrainDatum, int]:
        """One training datum (next-token targets) and the number of tokens that carry loss."""
        ids, weights = self.conversation_tokens(self.messages(raw, field), field)
        if len(ids) - 1 > self.max_context:
            raise BadRequest(f"{field} renders to {len(ids)} tokens; the model's context is {self.max_context}")
        target_weights = np.asarray(weights[1:], dtype=np.float32)
        datum = TrainDatum(tokens=np.asarray(ids[:-1], dtype=np.int64),
                           inputs={"target_tokens": np.asarray(ids[1:], dtype=np.int64), "weights": target_weights})
        return datum, int(target_weights.sum())

    # ----------------------------------------------------------------------------------------- sampling

    def prompt_tokens(self, raw: Any, field: str, chat_template: bool = True) -> list[int]:
        """A prompt as the original clients send it: text (a user turn, or raw text with chat_template=false),
        a list of chat messages, or a tinker ModelInput (`{"chunks": [{"tokens": [...]}]}`)."""
        if isinstance(raw, dict) and isinstance(raw.get("chunks"), list):
            ids: list[int] = []
            for i, chunk in enumerate(raw["chunks"]):
                toks = chunk.get("tokens") if isinstance(chunk, dict) else None
                if not isinstance(toks, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
                    raise BadRequest(f"{field}.chunks[{i}].tokens must be a list of integer token ids")
                ids += toks
            return ids
        if isinstance(raw, str):
            if not raw:
                raise BadRequest(f"{field} is empty")
            if not chat_template:
                return self.encode(raw)
            return self.encode(self.render([Message(role="user", content=raw)], add_generation_prompt=True))
        if isinstance(raw, (list, dict)):
            return self.encode(self.render(self.messages(raw, field), add_generation_prompt=True))
        raise BadRequest(f"{field} must be a string, a list of chat messages or {{\"chunks\": [{{\"tokens\": "
                         f"[...]}}]}}; got {type(raw).__name__}")
