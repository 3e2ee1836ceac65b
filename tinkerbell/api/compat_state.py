"""The translation helpers behind the original client API's routes (compat.py): futures read back in the
original client's terms, prompts rendered and sampled through the sampler service, and the in-memory handoff
of a run's current weights to a sampler.

The only state kept here is an id cache (which in-memory sampler already holds a run's current weights, and
the next sampling-session number of an adapter's session); everything else lives in the service.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable

from fastapi import Request
from tinker.proto.response_conv import deserialize_forward_backward_output, deserialize_sample_response

from tinkerbell.api import codec
from tinkerbell.api.compat_chat import ChatRenderer
from tinkerbell.api.compat_models import Sample
from tinkerbell.api.tinker import Services, svc
from tinkerbell.service.errors import BadRequest, NotFound
from tinkerbell.service.futures import PROTO, Answer

# A sync route holds the request this long, then answers 202 with the request_id to poll.
SYNC_TIMEOUT_SECONDS = 600.0
# The original server's default when sampling_params.max_tokens is absent.
DEFAULT_MAX_TOKENS = 50
REMOVED = "removed"  # finish reason of an adapter's session after remove_lora
BASE_ALIASES = ("base", "", None)


class Compat:
    """Per-app helpers; the only state is a cache of which in-memory sampler holds a run's current weights."""

    def __init__(self, s: Services):
        self.s = s
        self.renderer = ChatRenderer(s.engine.tokenizer, s.engine.max_context) if hasattr(s.engine, "tokenizer") \
            else None
        self.published: dict[str, tuple[int, str]] = {}  # model_id -> (run's next_seq then, sampler id)
        self._sampler_seq: dict[str, int] = {}  # session -> next sampling_session_seq_id
        self._tasks: set[asyncio.Task] = set()

    def chat(self) -> ChatRenderer:
        if self.renderer is None:
            raise BadRequest("this server's engine has no tokenizer, so text prompts and conversations cannot be "
                             "rendered; send token ids through the tinker SDK")
        return self.renderer

    def is_base(self, name: str | None) -> bool:
        return name in BASE_ALIASES or name == self.s.model_name

    def check_base(self, name: str | None, field: str = "base_model") -> None:
        if not self.is_base(name):
            raise NotFound(f"{field} {name!r} is not served by this server; it serves {self.s.model_name!r} "
                           "(\"base\" means the served model)")

    def run(self, tenant: str, model_id: str) -> dict[str, Any]:
        try:
            row = self.s.runs.require(tenant, model_id)
        except NotFound:
            raise NotFound(f"model_id {model_id!r} is not an adapter of this API key (create one with /add_lora)") \
                from None
        session = self.s.store.get_session(row["session_id"]) if row.get("session_id") else None
        if session and session.get("finish_reason") == REMOVED:
            raise NotFound(f"model_id {model_id!r} was removed with remove_lora; create a new one with /add_lora")
        return row

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------------------------------- futures

    async def answer(self, tenant: str, rid: str, timeout: float) -> Answer | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ans = await self.s.futures.wait(rid, tenant, max(0.0, min(left, 25.0)))
            if ans is not None or left <= 0:
                return ans

    async def result(self, tenant: str, rid: str) -> dict[str, Any]:
        """The finished future's result as JSON, or a ServiceError carrying its failure."""
        ans = await self.answer(tenant, rid, SYNC_TIMEOUT_SECONDS)
        if ans is None:
            raise BadRequest(f"request {rid} did not finish in {SYNC_TIMEOUT_SECONDS:.0f}s")
        status, body = self.present(rid, ans)
        if status != 200:
            raise BadRequest(body["error"])
        return body

    def present(self, rid: str, ans: Answer) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of a finished future in the original client's terms."""
        if ans.failed:
            err = json.loads(ans.body)
            status = 500 if err.get("category") == "server" else 422
            return status, {"status": "failed", "request_id": rid, "error": err.get("error"),
                            "category": err.get("category"), "detail": err.get("error")}
        if ans.content_type != PROTO:
            return 200, json.loads(ans.body)
        row = self.s.store.get_future(rid) or {}
        if row.get("kind") == "sample":
            return 200, self.sample_json([ans.body])
        out = deserialize_forward_backward_output(ans.body)
        return 200, fb_json(out.metrics, out.loss_fn_outputs, None, None)

    # ----------------------------------------------------------------------------------------- sampling

    def sample_json(self, bodies: list[bytes]) -> dict[str, Any]:
        sequences = []
        for b in bodies:
            for seq in deserialize_sample_response(b).sequences:
                sequences.append({"tokens": list(seq.tokens), "logprobs": list(seq.logprobs or []),
                                  "stop_reason": str(getattr(seq.stop_reason, "value", seq.stop_reason))})
        texts = [self.chat().decode(q["tokens"]) for q in sequences]
        return {"sequences": sequences, "completions": texts, "generated_text": texts[0] if texts else ""}

    def next_sampler_seq(self, session_id: str) -> int:
        if session_id not in self._sampler_seq:
            used = [int(x.rsplit(":", 1)[-1]) for x in self.s.store.samplers_of_session(session_id)
                    if x.rsplit(":", 1)[-1].isdigit()]
            self._sampler_seq[session_id] = max(used, default=-1) + 1
        seq = self._sampler_seq[session_id]
        self._sampler_seq[session_id] = seq + 1
        return seq

    async def publish(self, tenant: str, model_id: str) -> str:
        """A sampler holding the run's weights as of now (after every request already submitted): the
        in-memory handoff, reused while the run has not changed since."""
        row = self.run(tenant, model_id)
        cached = self.published.get(model_id)
        if cached and cached[0] == row["next_seq"] and self.s.store.get_sampler(cached[1]):
            return cached[1]
        seq = self.next_sampler_seq(row["session_id"])
        runs = self.s.runs
        rid = runs.submit(tenant, model_id, row["next_seq"], "save_weights_for_sampler",
                          lambda: runs.ephemeral_sampler_op(tenant, model_id, seq))
        sampler_id = f"{row['session_id']}:sample:{seq}"
        # Wait for the handoff itself: the engine runs a run's jobs in its own queue, so a sample submitted now
        # could otherwise reach the sampler before the weights do.
        await self.result(tenant, rid)
        after = self.s.store.get_run(model_id) or row
        self.published[model_id] = (after["next_seq"], sampler_id)
        return sampler_id

    async def submit_samples(self, tenant: str, body: Sample) -> list[str]:
        """One Tinker-style asample per prompt through the sampler service; request ids in prompt order."""
        chat = self.chat()
        if body.prompt is not None:
            prompts = [body.prompt]
        elif isinstance(body.prompts, str):
            prompts = [body.prompts]
        else:
            prompts = list(body.prompts or [])
        if not prompts:
            raise BadRequest("body.prompts is required: a list of prompt strings (or send prompt.chunks[0].tokens)")
        field = "prompt" if body.prompt is not None else "prompts"
        ids = [chat.prompt_tokens(p, f"{field}[{i}]" if field == "prompts" else field, body.chat_template)
               for i, p in enumerate(prompts)]
        sp = dict(body.sampling_params)
        for key, neutral in (("min_p", 0.0), ("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                             ("frequency_penalty", 0.0)):
            if sp.get(key) not in (None, neutral):
                raise BadRequest(f"sampling_params.{key} is not supported by this server's sampler; leave it out "
                                 "(supported: max_tokens, temperature, top_p, top_k, seed, stop, n)")
        n = body.num_samples or sp.pop("n", None) or 1
        sp.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        target = await self.sampling_target(tenant, body)
        s = self.s
        rids = []
        for i, toks in enumerate(ids):
            req = {**target, "num_samples": n, "sampling_params": sp,
                   "prompt": {"chunks": [{"type": "encoded_text", "tokens": toks}]}}

            def make_job(r: dict[str, Any], i: int = i):
                try:
                    return codec.sample_job_from_request(r, s.engine.vocab_size, s.engine.max_context)
                except codec.WireError as e:
                    raise BadRequest(f"{field}[{i}]: {e}" if e.field == "prompt" else str(e)) from None

            rids.append(s.samplers.sample(tenant, req, make_job)["request_id"])
        return rids

    async def sampling_target(self, tenant: str, body: Sample) -> dict[str, Any]:
        if body.model_path:
            return {"model_path": body.model_path}
        ref = body.model_id or body.adapter_id
        if isinstance(ref, str) and ref.startswith("tinker://"):
            return {"model_path": ref}
        if self.is_base(ref):
            self.check_base(body.base_model)
            return {"base_model": self.s.model_name}
        assert ref is not None
        return {"sampling_session_id": await self.publish(tenant, ref)}

    async def collect(self, tenant: str, rids: list[str]) -> dict[str, Any]:
        bodies = []
        for rid in rids:
            ans = await self.answer(tenant, rid, SYNC_TIMEOUT_SECONDS)
            if ans is None:
                raise BadRequest(f"sample {rid} did not finish in {SYNC_TIMEOUT_SECONDS:.0f}s")
            if ans.failed:
                _, err = self.present(rid, ans)
                raise BadRequest(err["error"])
            bodies.append(ans.body)
        return self.sample_json(bodies)


def compat(request: Request) -> Compat:
    state = request.app.state
    if getattr(state, "compat", None) is None:
        state.compat = Compat(svc(request))
    return state.compat


def fb_json(metrics: dict[str, float], outputs: list[dict[str, Any]], model_id: str | None,
            loss_tokens: int | None) -> dict[str, Any]:
    """A forward/backward result as the original clients read it: `loss` is the mean per trained token."""
    loss_sum = float(metrics.get("loss:sum", 0.0))
    denom = loss_tokens if loss_tokens else metrics.get("ntokens:sum") or 1.0
    out: dict[str, Any] = {"loss": loss_sum / denom, "loss_sum": loss_sum, "metrics": dict(metrics),
                           "loss_fn_outputs": [{k: v.tolist() for k, v in o.items()} for o in outputs]}
    if model_id is not None:
        out["model_id"] = model_id
    if loss_tokens is not None:
        out["num_loss_tokens"] = loss_tokens
    return out
