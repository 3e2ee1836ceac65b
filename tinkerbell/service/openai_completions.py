"""Completions for the OpenAI face: model name → adapter, prompt → tokens, engine jobs, tokens → choices.

The API layer hands in already type-checked options; this module checks what needs the model (vocabulary,
context length), submits one engine job per prompt (`n` samples each, sharing the prompt's KV blocks) and turns
the finished `SampleResult`s into choices of text pieces (see openai_text.py). It knows nothing of HTTP or of
the OpenAI JSON shapes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from tinkerbell.engine.types import SampledSequence, SampleJob, SampleResult
from tinkerbell.service import openai_text as text
from tinkerbell.service.errors import BadRequest, NotFound, ServiceError
from tinkerbell.service.openai_adapters import AdapterRegistry, param_error
from tinkerbell.service.samplers import SamplerManager

if TYPE_CHECKING:
    from tinkerbell.engine.engine import Engine

log = logging.getLogger("tinkerbell.openai")

_SAMPLER_ID = re.compile(r"^.+:sample:\d+$")
# Engine validation messages start with the engine's field name; OpenAI clients know these fields by other names.
_ENGINE_FIELDS = {"prompt": "prompt", "num_samples": "n", "max_tokens": "max_tokens", "temperature": "temperature",
                  "top_p": "top_p", "top_k": "top_k", "topk_sample_logprobs": "logprobs", "stop_strings": "stop",
                  "topk_prompt_logprobs": "logprobs", "adapter_key": "model"}


@dataclass
class SamplingOptions:
    """OpenAI's knobs, type-checked by the API layer. `max_tokens` None: `default_max_tokens`, itself None for
    the remaining context (chat) — both capped at what the context leaves."""

    n: int = 1
    max_tokens: int | None = None
    default_max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop: bool = False
    logprobs: int | None = None  # alternatives per token; None: no logprobs at all
    echo: bool = False
    prompt_field: str = "prompt"  # what a prompt error names: "prompt" or "messages"
    diffusion: dict[str, Any] = field(default_factory=dict)  # SampleJob's diffusion-LM fields, passed through


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Choice:
    index: int
    pieces: list[str]  # visible text of each returned token: ''.join(pieces) is the completion text
    finish_reason: str  # "stop" | "length"
    logprobs: list[TokenLogprob] | None = None  # aligned with pieces
    echo_pieces: list[str] = field(default_factory=list)  # the prompt's text, when echoed
    echo_logprobs: list[TokenLogprob] | None = None

    @property
    def text(self) -> str:
        return "".join(self.echo_pieces) + "".join(self.pieces)


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Submitted:
    """Jobs on the engine: one per prompt. Cancel them if the client goes away."""

    prompts: list[list[int]]
    options: SamplingOptions
    futures: list[Future]
    discard_output: bool  # echo with max_tokens=0: the engine ran one token we do not return
    # Streaming: the engine's tokens per choice as it keeps them; None when the stream is built from the
    # finished result instead (echo or logprobs, whose chunks need the whole result).
    live: "LiveFeed | None" = None

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


class LiveText:
    """One choice's text as its tokens arrive, and how much of it is certain to begin the final text: not what a
    stop string still being completed could cut, nor anything from a stop string on.

    `append` takes any number of tokens at once (whatever arrived since the last flush: the sampler's tokens of
    one or more steps, a diffusion LM's finished block) and decodes them together; how the tokens are split
    into appends does not change the text. The stop-string search resumes where the last one left off, so a
    long output costs linear time, not a rescan per flush."""

    def __init__(self, decoder: text.PieceDecoder, opts: SamplingOptions):
        self.decoder, self.opts = decoder, opts
        self.text = ""  # pieces so far; bytes still waiting for their character are not in it yet
        self.sent = 0  # characters of the certain text already handed out by `take`
        self._hold = max((len(s) for s in opts.stop), default=1) - 1  # a stop string's length - 1
        self._scanned = 0  # no stop string begins before this index
        self._cut: int | None = None  # the text's final length, once a stop string was found

    def append(self, tokens: Sequence[int]) -> None:
        if self._cut is None:  # past a stop string nothing more is returned
            self.text += self.decoder.add_many(tokens)

    def add(self, token: int) -> None:
        self.append((token,))

    def certain(self) -> str:
        if self._cut is None and self.opts.stop:
            hit = text.find_stop(self.text, self.opts.stop, self._scanned)
            if hit is not None:
                self._cut = hit[0] + (len(hit[1]) if self.opts.include_stop else 0)
            else:
                # A stop string beginning before this point would lie wholly inside the text: it was not there.
                self._scanned = max(self._scanned, len(self.text) - self._hold)
        if self._cut is not None:
            return self.text[:self._cut]
        return self.text[: len(self.text) - self._hold] if self._hold else self.text

    def take(self) -> str:
        """The certain text not taken before (empty when nothing new is certain)."""
        safe = self.certain()
        new = safe[self.sent:]
        self.sent = max(self.sent, len(safe))
        return new


class _Waker:
    """One per event loop: the engine thread's way in. However many requests got tokens in a step, the loop is
    woken once (one call_soon_threadsafe, one self-pipe write) and sets the event of every feed that got some."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()  # guards every feed's buffer of this loop and the fields below
        self.ready: list[LiveFeed] = []
        self.scheduled = False

    def run(self) -> None:  # on the loop
        with self.lock:
            ready, self.ready, self.scheduled = self.ready, [], False
        for feed in ready:
            feed.event.set()


class LiveFeed:
    """One streamed request's tokens on their way from the engine thread to its SSE generator.

    The engine calls `on_token` once per token (or `on_block` once per finished block of a diffusion LM); the
    tokens go into a per-choice buffer, and only the first arrival since the stream last took them wakes the
    loop. The stream takes everything buffered at once (`take`), so per-token Python on the loop is a list
    append; decoding, stop-string checks and the SSE chunk happen once per flush per choice."""

    def __init__(self, waker: _Waker):
        self.waker = waker
        self.event = asyncio.Event()  # set when tokens arrived (or the request settled)
        self.buffers: dict[int, list[int]] = {}  # choice index -> tokens not taken yet
        self.pending = False  # this feed is on the waker's ready list

    def _push(self, index: int, tokens: Sequence[int]) -> None:  # on the engine thread
        w = self.waker
        with w.lock:
            buf = self.buffers.get(index)
            if buf is None:
                self.buffers[index] = list(tokens)
            else:
                buf.extend(tokens)
            if self.pending:
                return
            self.pending = True
            w.ready.append(self)
            if w.scheduled:
                return
            w.scheduled = True
        w.loop.call_soon_threadsafe(w.run)

    def on_token(self, base: int, index: int, token: int, _logprob: float) -> None:
        self._push(base + index, (token,))

    def on_block(self, base: int, index: int, tokens: Sequence[int], _finished: bool) -> None:
        self._push(base + index, tokens)

    def take(self) -> dict[int, list[int]]:
        """Every token that arrived since the last take, per choice index (on the loop)."""
        self.event.clear()
        with self.waker.lock:
            out, self.buffers, self.pending = self.buffers, {}, False
        return out


class CompletionService:
    def __init__(self, engine: "Engine", samplers: SamplerManager, adapters: AdapterRegistry, model_name: str):
        self.engine, self.samplers, self.adapters = engine, samplers, adapters
        self.model_name = model_name
        self._wakers: dict[asyncio.AbstractEventLoop, _Waker] = {}  # one loop in a server; tests may run more

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ------------------------------------------------------------------------------------------- inputs

    async def resolve_model(self, tenant: str, model: str) -> str | None:
        """The engine adapter key for `model` (None: the base model)."""
        if model == self.model_name:
            return None
        try:
            if model.startswith("tinker://"):
                return self.samplers.resolve_adapter(tenant, {"model_path": model})[1]
            if _SAMPLER_ID.match(model) and self.samplers.store.get_sampler(model) is not None:
                return self.samplers.resolve_adapter(tenant, {"sampling_session_id": model})[1]
        except ServiceError as e:
            raise param_error(type(e), "model", e.detail) from None
        key = await self.adapters.adapter_key(tenant, model)
        if key is None:
            raise param_error(NotFound, "model", f"the model {model!r} does not exist on this server: use the base "
                                                 f"model {self.model_name!r}, a tinker:// sampler checkpoint path, or "
                                                 "an adapter loaded with /v1/load_lora_adapter (see GET /v1/models)")
        return key

    def encode_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Completions' `prompt`: a string, strings, token ids, or lists of token ids (one job each)."""
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [list(prompt)]  # type: ignore[arg-type]
        else:
            items = list(prompt)
        if not items:
            raise param_error(BadRequest, "prompt", "must not be empty")
        out = []
        for i, item in enumerate(items):
            ids = self.tokenizer.encode(item, add_special_tokens=True) if isinstance(item, str) else list(item)
            self._check_tokens(ids, "prompt" if len(items) == 1 else f"prompt[{i}]")
            out.append([int(t) for t in ids])
        return out

    def render_chat(self, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise param_error(BadRequest, "messages", f"the model {self.model_name!r} has no chat template in its "
                                                      "tokenizer; use /v1/completions with a formatted prompt")
        try:
            rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                               **(template_kwargs or {}))
        except Exception as e:  # noqa: BLE001 - a template may raise anything (jinja errors, raise_exception)
            raise param_error(BadRequest, "messages", f"the chat template rejected these messages: {e}") from None
        ids = tok.encode(rendered, add_special_tokens=False)
        self._check_tokens(ids, "messages")
        return [int(t) for t in ids]

    def _check_tokens(self, ids: Sequence[int], param: str) -> None:
        vocab = self.engine.vocab_size
        if not ids:
            raise param_error(BadRequest, param, "has no tokens")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise param_error(BadRequest, param, f"token id {bad} is outside the vocabulary [0, {vocab})")

    # ------------------------------------------------------------------------------------------- jobs

    def _max_tokens(self, prompt: list[int], opts: SamplingOptions) -> int:
        room = self.engine.max_context - len(prompt)
        if room < 1:
            raise param_error(BadRequest, opts.prompt_field, f"is {len(prompt)} tokens; the model's context is "
                                                             f"{self.engine.max_context}, leaving no room to generate")
        if opts.max_tokens is None:
            return room if opts.default_max_tokens is None else min(opts.default_max_tokens, room)
        if opts.max_tokens > room:
            raise param_error(BadRequest, "max_tokens", f"{opts.max_tokens} plus the {len(prompt)} prompt tokens "
                                                        f"exceeds the model's context of {self.engine.max_context} "
                                                        f"tokens; ask for at most {room}")
        return opts.max_tokens

    def submit(self, prompts: list[list[int]], opts: SamplingOptions, adapter_key: str | None,
               stream: bool = False) -> Submitted:
        discard = opts.max_tokens == 0
        if discard and not opts.echo:
            raise param_error(BadRequest, "max_tokens", "must be at least 1 (0 only with echo, to score a prompt)")
        admit = getattr(self.samplers, "admit", None)  # the shared queue bound (429 when full), where present
        if admit is not None:
            admit()
        jobs = []
        for prompt in prompts:
            max_tokens = 1 if discard else self._max_tokens(prompt, opts)
            if discard:
                self._max_tokens(prompt, SamplingOptions(max_tokens=1, prompt_field=opts.prompt_field))
            k = opts.logprobs or 0
            jobs.append(SampleJob(
                prompt=prompt, num_samples=opts.n, max_tokens=max_tokens, temperature=opts.temperature,
                top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed, stop_token_ids=list(opts.stop_token_ids),
                stop_strings=list(opts.stop), stop_at_eos=not opts.ignore_eos, adapter_key=adapter_key,
                prompt_logprobs=opts.echo and opts.logprobs is not None,
                topk_prompt_logprobs=k if opts.echo else 0, topk_sample_logprobs=k, **opts.diffusion))
        live: LiveFeed | None = None
        if stream and opts.logprobs is None and not opts.echo:
            loop = asyncio.get_running_loop()
            waker = self._wakers.get(loop)
            if waker is None:
                waker = self._wakers[loop] = _Waker(loop)
            live = LiveFeed(waker)
            for j, job in enumerate(jobs):
                # Run on the engine thread. A diffusion LM finishes a block of tokens at once: the same
                # per-choice buffer, so the stream sends the block in one chunk.
                job.on_token = functools.partial(live.on_token, j * opts.n)
                job.on_block = functools.partial(live.on_block, j * opts.n)
        futures = []
        for job in jobs:
            self.samplers.samples_requested += job.num_samples
            self.samplers.in_flight += 1
            fut = self.engine.sample(job)
            # Counted when the job settles, however it ends (done, failed, cancelled, or never awaited because
            # the client left before its stream started): the callback hops back onto the event loop.
            fut.add_done_callback(lambda f, loop=asyncio.get_running_loop(): loop.call_soon_threadsafe(
                self._settled, f))
            futures.append(fut)
        return Submitted(prompts, opts, futures, discard, live)

    def _settled(self, fut: Future) -> None:
        self.samplers.in_flight -= 1
        if not fut.cancelled() and fut.exception() is None:
            self.samplers.tokens_sampled += sum(len(s.tokens) for s in fut.result().sequences)

    async def results(self, sub: Submitted) -> Completion:
        """Wait for every job (cancelling the rest if this wait is cancelled) and build the choices."""
        try:
            results = await asyncio.gather(*(asyncio.wrap_future(f) for f in sub.futures))
        except ValueError as e:  # EngineUserError: the engine's own admission checks
            sub.cancel()
            msg = str(e)
            param = _ENGINE_FIELDS.get(msg.split(":", 1)[0].strip(), None)
            if param == "prompt":
                param = sub.options.prompt_field
            err = BadRequest(msg)
            err.param = param  # type: ignore[attr-defined]
            raise err from None
        except BaseException:
            sub.cancel()
            raise
        return self.build(sub, results)

    # ------------------------------------------------------------------------------------------- outputs

    def build(self, sub: Submitted, results: list[SampleResult]) -> Completion:
        opts = sub.options
        choices: list[Choice] = []
        completion_tokens = 0
        for prompt, result in zip(sub.prompts, results):
            echo_pieces, echo_lps = self._echo(prompt, result) if opts.echo else ([], None)
            for seq in result.sequences:
                if sub.discard_output:
                    choice = Choice(len(choices), [], "length", [] if opts.logprobs is not None else None)
                else:
                    completion_tokens += len(seq.tokens)
                    choice = self._choice(len(choices), prompt, seq, opts)
                choice.echo_pieces = echo_pieces
                choice.echo_logprobs = echo_lps
                choices.append(choice)
        return Completion(choices, sum(len(p) for p in sub.prompts), completion_tokens)

    def live_text(self, prompt: list[int], opts: SamplingOptions) -> "LiveText":
        return LiveText(text.PieceDecoder(self.tokenizer, prompt), opts)

    def _choice(self, index: int, prompt: list[int], seq: SampledSequence, opts: SamplingOptions) -> Choice:
        tok = self.tokenizer
        if opts.logprobs is None:
            # No per-token figures to align with the text: two decodes for the whole output, not two per token.
            full = text.output_text(tok, prompt, seq.tokens)
            hit = text.find_stop(full, opts.stop) if opts.stop else None
            if hit is not None:
                full = full[:hit[0] + (len(hit[1]) if opts.include_stop else 0)]
            return Choice(index, [full] if full else [], "stop" if hit else seq.stop_reason)
        pieces, stopped = text.apply_stop(text.token_pieces(tok, prompt, seq.tokens), opts.stop, opts.include_stop)
        finish = "stop" if stopped else seq.stop_reason
        logprobs = None
        if opts.logprobs is not None:
            logprobs = []
            for i in range(len(pieces)):
                top: list[tuple[str, float]] = []
                if seq.topk_ids is not None and seq.topk_logprobs is not None:
                    top = [(text.token_string(tok, int(t)), float(lp))
                           for t, lp in zip(seq.topk_ids[i], seq.topk_logprobs[i])]
                logprobs.append(TokenLogprob(text.token_string(tok, seq.tokens[i]), float(seq.logprobs[i]), top))
        return Choice(index, pieces, finish, logprobs)

    def _echo(self, prompt: list[int], result: SampleResult) -> tuple[list[str], list[TokenLogprob] | None]:
        tok = self.tokenizer
        if result.prompt_logprobs is None:
            return [text.output_text(tok, [], prompt)], None
        pieces = text.token_pieces(tok, [], prompt)
        lps: list[TokenLogprob] = []
        for i, t in enumerate(prompt):
            lp = None if i == 0 else float(result.prompt_logprobs[i])
            top: list[tuple[str, float]] = []
            if i > 0 and result.topk_prompt_ids is not None and result.topk_prompt_logprobs is not None:
                top = [(text.token_string(tok, int(a)), float(b))
                       for a, b in zip(result.topk_prompt_ids[i], result.topk_prompt_logprobs[i])]
            lps.append(TokenLogprob(text.token_string(tok, t), lp, top))
        return pieces, lps
