"""A thin TestClient wrapper speaking the Tinker wire protocol by hand (for tests that need control the SDK
does not give: out-of-order seq_ids, duplicates, malformed bodies)."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto

from tests.api.conftest import KEY_A, MODEL


def fb_body(model_id: str, seq_id: int, n: int = 4, loss_fn: str = "cross_entropy", first_token: int = 1) -> bytes:
    datum = types.Datum(model_input=types.ModelInput.from_ints(list(range(first_token, first_token + n))),
                        loss_fn_inputs={"target_tokens": np.arange(2, n + 2, dtype=np.int64),
                                        "weights": np.ones(n, dtype=np.float32)})
    req = types.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id,
                                       forward_backward_input=types.ForwardBackwardInput(data=[datum],
                                                                                         loss_fn=loss_fn))
    return forward_backward_request_to_proto(req).SerializeToString()


class Wire:
    def __init__(self, client: TestClient, key: str = KEY_A):
        self.c = client
        self.h = {"X-API-Key": key}

    def post(self, path: str, body: dict[str, Any] | None = None, **kw):
        return self.c.post("/api/v1/" + path, json=body if body is not None else {}, headers=self.h, **kw)

    def get(self, path: str, **kw):
        return self.c.get("/api/v1/" + path, headers=self.h, **kw)

    def session(self) -> str:
        r = self.post("create_session", {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"})
        assert r.status_code == 200, r.text
        return r.json()["session_id"]

    def model(self, session_id: str | None = None, seq: int = 0, rank: int = 4) -> str:
        sid = session_id or self.session()
        r = self.post("create_model", {"session_id": sid, "model_seq_id": seq, "base_model": MODEL,
                                       "lora_config": {"rank": rank}})
        assert r.status_code == 200, r.text
        self.result(r.json()["request_id"])
        return r.json()["model_id"]

    def fb(self, model_id: str, seq_id: int, **kw) -> str:
        r = self.c.post("/api/v1/forward_backward", content=fb_body(model_id, seq_id, **kw),
                        headers={**self.h, "Content-Type": "application/x-protobuf"})
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    def optim(self, model_id: str, seq_id: int, lr: float = 1e-3) -> str:
        r = self.post("optim_step", {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": lr}})
        assert r.status_code == 200, r.text
        return r.json()["request_id"]

    def retrieve(self, request_id: str):
        return self.post("retrieve_future", {"request_id": request_id, "allow_metadata_only": True})

    def result(self, request_id: str, tries: int = 20):
        for _ in range(tries):
            r = self.retrieve(request_id)
            if r.status_code != 408:
                return r
        raise AssertionError(f"{request_id} never finished")

    def json_result(self, request_id: str) -> dict[str, Any]:
        r = self.result(request_id)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
        return r.json()
