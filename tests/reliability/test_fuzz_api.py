"""Property-based fuzzing of every Tinker endpoint's body over the FakeEngine app (milliseconds per request).

Each example sends one hostile body built from the SDK's request shape; the answer must be a clean 4xx naming
the problem, or an accepted request whose future then fails as a *user* error (a numbered training request
must consume its seq_id, tinker_api.md 6.1, so its rejection travels through the future). Never a 5xx, never a
"server" failure for bad input, and a good request still works afterwards.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.api.conftest import MODEL
from tests.api.helpers import Wire
from tests.reliability.conftest import assert_clean_answer, fuzz_settings
from tests.reliability.strategies import mutated_fb, mutated_json


class Ctx:
    """One tenant's live objects, so mutated bodies start from ids that exist."""

    def __init__(self, w: Wire):
        self.w = w
        self.sid = w.session()
        self.model = w.model(self.sid)
        self.seq = 1
        r = w.post("create_sampling_session", {"session_id": self.sid, "sampling_session_seq_id": 0,
                                               "base_model": MODEL})
        self.sampler = r.json()["sampling_session_id"]
        r = w.post("save_weights", {"model_id": self.model, "seq_id": self.next_seq(), "path": "fuzz-base"})
        self.ckpt = w.json_result(r.json()["request_id"])["path"]

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1

    def bodies(self) -> dict[str, dict[str, Any]]:
        s = self.next_seq()
        prompt = {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}
        return {
            "create_session": {"tags": ["a"], "user_metadata": {"k": "v"}, "sdk_version": "0.38.0"},
            "session_heartbeat": {"session_id": self.sid},
            "create_model": {"session_id": self.sid, "model_seq_id": 1000 + s, "base_model": MODEL,
                             "lora_config": {"rank": 4, "seed": 0, "train_attn": True, "train_mlp": True,
                                             "train_unembed": True},
                             "optimizer_config": {"type": "adamw"}},
            "get_info": {"model_id": self.model},
            "optim_step": {"model_id": self.model, "seq_id": s, "adam_params": {
                "learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12, "weight_decay": 0.0,
                "grad_clip_norm": 0.0}},
            "save_weights": {"model_id": self.model, "seq_id": s, "path": f"c{s}", "ttl_seconds": 3600},
            "save_weights_for_sampler": {"model_id": self.model, "seq_id": s, "path": f"s{s}"},
            "load_weights": {"model_id": self.model, "seq_id": s, "path": self.ckpt, "optimizer": True},
            "create_sampling_session": {"session_id": self.sid, "sampling_session_seq_id": 1000 + s,
                                        "model_path": self.ckpt},
            "asample": {"sampling_session_id": self.sampler, "seq_id": s, "num_samples": 2, "prompt": prompt,
                        "sampling_params": {"max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
                                            "seed": 1, "stop": [7]},
                        "prompt_logprobs": True, "topk_prompt_logprobs": 2},
            "retrieve_future": {"request_id": "req-nothing", "allow_metadata_only": True},
            "cancel_future": {"request_id": "req-nothing"},
            "weights_info": {"tinker_path": self.ckpt},
            "copy_weights": {"source_path": self.ckpt},
            "telemetry": {"events": [], "session_id": self.sid, "platform": "x", "sdk_version": "0.38.0"},
        }


def _check_future(w: Wire, r, what: str) -> None:
    """An accepted request's future: finished cleanly (result or user failure) or still waiting its turn."""
    rid = r.json().get("request_id") if r.status_code == 200 else None
    if not isinstance(rid, str):
        return
    ans = w.retrieve(rid)
    assert_clean_answer(ans, what + " (future)")
    if ans.status_code == 200 and ans.headers["content-type"].startswith("application/json"):
        out = ans.json()
        if "error" in out:
            assert out["category"] == "user", f"{what}: bad input failed as a server error: {out}"
            assert len(out["error"]) >= 8


@pytest.fixture
def ctx(wire) -> Ctx:
    return Ctx(wire)


def _good_request_still_works(c: Ctx) -> None:
    r = c.w.post("asample", {"sampling_session_id": c.sampler, "num_samples": 1,
                             "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                             "sampling_params": {"max_tokens": 2}})
    assert r.status_code == 200, r.text
    assert c.w.result(r.json()["request_id"]).headers["content-type"] == "application/x-protobuf"


ENDPOINTS = ["create_session", "session_heartbeat", "create_model", "get_info", "optim_step", "save_weights",
             "save_weights_for_sampler", "load_weights", "create_sampling_session", "asample", "retrieve_future",
             "cancel_future", "weights_info", "copy_weights", "telemetry"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_json_endpoints_answer_bad_bodies_cleanly(ctx, endpoint):
    @fuzz_settings(25)
    @given(data=st.data())
    def prop(data):
        body = data.draw(mutated_json(ctx.bodies()[endpoint]))
        r = ctx.w.c.post(f"/api/v1/{endpoint}", content=body,
                         headers={**ctx.w.h, "Content-Type": "application/json"})
        assert_clean_answer(r, f"{endpoint} {body[:300]!r}")
        _check_future(ctx.w, r, endpoint)

    prop()
    _good_request_still_works(ctx)


def test_forward_backward_answers_bad_protobuf_cleanly(ctx):
    @fuzz_settings(80)
    @given(data=st.data())
    def prop(data):
        # A seq_id is consumed only when the server could read it and accepted the request (200); a body it
        # refused with a 4xx (unreadable ids) leaves that seq_id for the next request.
        body, encoding = data.draw(mutated_fb(ctx.model, ctx.seq))
        headers = {**ctx.w.h, "Content-Type": "application/x-protobuf"}
        if encoding:
            headers["Content-Encoding"] = encoding
        r = ctx.w.c.post("/api/v1/forward_backward", content=body, headers=headers)
        assert_clean_answer(r, f"forward_backward {body[:200]!r}")
        if r.status_code == 200:
            ctx.seq += 1
        _check_future(ctx.w, r, "forward_backward")

    prop()
    # The model is not wedged: its next seq_id trains.
    rid = ctx.w.fb(ctx.model, ctx.next_seq())
    assert ctx.w.result(rid).headers["content-type"] == "application/x-protobuf"
    _good_request_still_works(ctx)


def test_non_json_and_oversized_bodies(ctx):
    w = ctx.w
    for body in (b"\xff\xfe\x00", b"{", b"[1,2]", b"\"str\"", b"NaN", b"{\"a\": 1e999}"):
        assert_clean_answer(w.c.post("/api/v1/create_session", content=body, headers=w.h), repr(body))
    # Declared too large: refused before reading.
    r = w.c.post("/api/v1/asample", content=b"{}", headers={**w.h, "Content-Length": str(1 << 40)})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    # Chunked (no Content-Length): refused while streaming, not after buffering it all.
    def chunks():
        for _ in range(70):
            yield b" " * (1 << 20)

    r = w.c.post("/api/v1/create_session", content=chunks(), headers=w.h)
    assert r.status_code == 413 and "limit" in r.json()["detail"], r.text
    _good_request_still_works(ctx)
