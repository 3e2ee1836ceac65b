"""Request bodies of the OpenAI face, as pydantic models (the boundary check), and their mapping onto the
service's `SamplingOptions`.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send `user`, `metadata`, ...). Fields that
would change the output but that this server cannot honour (penalties, logit_bias, tools, best_of > n,
json response formats) are refused with a 400 naming the field rather than silently dropped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tinkerbell.service.errors import BadRequest
from tinkerbell.service.openai_adapters import param_error
from tinkerbell.service.openai_completions import SamplingOptions

MAX_N = 128  # the engine's num_samples limit
MAX_LOGPROBS = 20  # the engine's top-k logprobs limit
MAX_STOP = 16
DIFFUSION_FIELDS = ("generation_algorithm", "steps", "block_length", "remasking", "threshold", "factor", "cfg_scale")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Sampling(_Body):
    model: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    # Diffusion LMs (LLaDA) only; checked by the engine, which names a bad field. Ignored by autoregressive models.
    generation_algorithm: str | None = None
    steps: int | None = Field(None, ge=1)
    block_length: int | None = Field(None, ge=1)
    remasking: str | None = None
    threshold: float | None = Field(None, gt=0, le=1)
    factor: float | None = Field(None, gt=0)
    cfg_scale: float = Field(0.0, ge=0)

    def diffusion(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in DIFFUSION_FIELDS}

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise param_error(BadRequest, name, "is not supported by this server; send 0 or leave it out")
        if self.logit_bias:
            raise param_error(BadRequest, "logit_bias", "is not supported by this server")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise param_error(BadRequest, "stop", "contains an empty string")
        if len(stops) > MAX_STOP:
            raise param_error(BadRequest, "stop", f"has {len(stops)} stop strings; at most {MAX_STOP}")
        return stops

    def options(self, max_tokens: int | None, default_max_tokens: int | None, logprobs: int | None,
                prompt_field: str, echo: bool = False) -> SamplingOptions:
        self.check_unsupported()
        top_k = self.top_k if self.top_k not in (None, 0) else -1  # vLLM: 0 and -1 both mean no limit
        return SamplingOptions(
            n=self.n, max_tokens=max_tokens, default_max_tokens=default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=top_k, seed=self.seed, stop=self.stops(),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            include_stop=self.include_stop_str_in_output, logprobs=logprobs, echo=echo, prompt_field=prompt_field,
            diffusion=self.diffusion())

    def include_usage(self) -> bool:
        # Our choice: the final usage chunk is sent unless the client explicitly turns it off.
        return self.stream_options is None or self.stream_options.include_usage is not False


# Default for /v1/completions without max_tokens: OpenAI's legacy default.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def sampling_options(self) -> SamplingOptions:
        if self.best_of is not None and self.best_of != self.n:
            raise param_error(BadRequest, "best_of", "is not supported by this server (only best_of == n)")
        if self.suffix:
            raise param_error(BadRequest, "suffix", "is not supported by this server")
        if self.stream and self.echo and self.max_tokens == 0:
            raise param_error(BadRequest, "stream", "cannot be combined with echo and max_tokens=0")
        return self.options(self.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, self.logprobs, "prompt", self.echo)


class TextPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None
    name: str | None = None


class ResponseFormat(_Body):
    type: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def sampling_options(self) -> SamplingOptions:
        if self.tools:
            raise param_error(BadRequest, "tools", "tool calling is not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise param_error(BadRequest, "response_format", f"type {self.response_format.type!r} is not supported "
                                                             "by this server; only 'text'")
        if self.top_logprobs and not self.logprobs:
            raise param_error(BadRequest, "top_logprobs", "requires logprobs: true")
        if self.max_tokens == 0:
            raise param_error(BadRequest, "max_tokens", "must be at least 1")
        # max_completion_tokens is the newer name; it wins when both are sent, as in OpenAI's API.
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.options(max_tokens, None, logprobs, "messages")

    def template_messages(self) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise param_error(BadRequest, f"messages[{i}].content[{j}]",
                                          f"only text parts are supported (got type {part.type!r})")
                    texts.append(part.text)
                content = "".join(texts)
            msg: dict[str, Any] = {"role": m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            out.append(msg)
        return out


class LoadLoraRequest(_Body):
    lora_name: Any = None
    lora_path: Any = None


class UnloadLoraRequest(_Body):
    lora_name: Any = None
    lora_int_id: int | None = None

