"""The OpenAI face over the real engine on the tiny model: validation errors in OpenAI's shape, the models list,
named adapters (validation, tenants, persistence), stop strings, echo scoring and cancellation on disconnect."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.api.conftest import KEY_A, KEY_B, LiveServer, make_config
from tinkerbell.api.app import build_engine, create_app
from tinkerbell.engine.adapter_io import CONFIG_FILE, WEIGHTS_FILE, save_peft
from tinkerbell.engine.lora import AdapterWeights, LoraSpec

A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.fixture(scope="module")
def env(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    config = make_config(root / "data", model=str(tiny_llama_dir), max_lora_rank=16, max_loras=4)
    engine = build_engine(config)
    try:
        with LiveServer(create_app(config, engine)) as srv:
            srv.model, srv.root, srv.engine, srv.config = str(tiny_llama_dir), root, engine, config
            srv.http = httpx.Client(base_url=srv.url, timeout=60)
            yield srv
            srv.http.close()
    finally:
        engine.shutdown()


def make_adapter(env, name: str, rank: int = 4, targets: tuple[bool, bool, bool] = (True, True, False)) -> Path:
    """A PEFT folder with random (non-zero) B, so the adapter visibly changes the output."""
    spec = LoraSpec(rank=rank, train_attn=targets[0], train_mlp=targets[1], train_unembed=targets[2])
    w = AdapterWeights.init(env.engine.model_config, spec, seed=1)
    gen = torch.Generator().manual_seed(2)
    for k in w.b:
        w.b[k] = torch.randn(w.b[k].shape, generator=gen) * 0.5
    out = env.root / "adapters" / name
    save_peft(w, out, env.model)
    return out


def post(env, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return env.http.post(path, json=body, headers=A if headers is None else headers)


def err(r: httpx.Response, status: int, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if param is not None:
        assert e["param"] == param, e
    return e["message"]


def complete(env, model: str | None = None, headers: dict | None = None, **kw) -> dict:
    body = {"model": model or env.model, "prompt": "Hello! My name", "max_tokens": 8, "temperature": 0, **kw}
    r = post(env, "/v1/completions", body, headers)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("body,param", [
    ({"n": 0}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"logprobs": 50}, "logprobs"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"prompt": [1, 2, 100000]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"model": "no-such-model"}, "model"),
    ({"model": "tinker://nope/sampler_weights/x"}, "model"),
    ({"best_of": 3}, "best_of"),
])
def test_completion_validation_names_the_field(env, body, param):
    full = {"model": env.model, "prompt": "Hello", "max_tokens": 4, **body}
    err(post(env, "/v1/completions", full), 404 if param == "model" else 400, param)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_chat_validation_names_the_field(env, body, param):
    full = {"model": env.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    err(post(env, "/v1/chat/completions", full), 400, param)


def test_auth_bad_json_and_unknown_routes_answer_in_openai_shape(env):
    assert "API key" in err(env.http.get("/v1/models"), 401)
    assert "invalid API key" in err(env.http.get("/v1/models", headers={"Authorization": "Bearer tml-x"}), 401)
    r = env.http.post("/v1/completions", content=b"{not json", headers={**A, "Content-Type": "application/json"})
    assert "JSON" in err(r, 400)
    err(env.http.get("/v1/embeddings", headers=A), 404)
    err(env.http.get("/v1/completions", headers=A), 405)
    # The Tinker face keeps its own error shape.
    assert "detail" in env.http.get("/api/v1/nope", headers=A).json()


def test_chat_without_a_template_is_a_clear_400(env, monkeypatch):
    monkeypatch.setattr(env.engine.tokenizer, "chat_template", None)
    msg = err(post(env, "/v1/chat/completions", {"model": env.model, "messages": [{"role": "user", "content": "x"}]}),
              400, "messages")
    assert "chat template" in msg


def test_models_lists_the_base_model(env):
    r = env.http.get("/v1/models", headers=A)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    base = body["data"][0]
    assert base["id"] == env.model and base["object"] == "model" and isinstance(base["created"], int)
    assert env.http.get(f"/v1/models/{env.model.lstrip('/')}", headers=A).status_code in (200, 404)


def test_completion_shape_usage_and_logprobs(env):
    out = complete(env, logprobs=2, n=2)
    assert out["object"] == "text_completion" and len(out["choices"]) == 2
    c = out["choices"][0]
    assert c["finish_reason"] in ("stop", "length")
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert all(len(t) >= 1 for t in lp["top_logprobs"])
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    assert out["choices"][0]["text"] == out["choices"][1]["text"]  # greedy


def test_stop_string_is_cut_and_not_returned(env):
    full = complete(env, max_tokens=16, stop=[])["choices"][0]["text"]
    stop = next((full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].strip()
                 and full.find(full[i:i + 2]) == i), None)
    if stop is None:
        pytest.skip(f"no usable stop string in {full!r}")
    out = complete(env, max_tokens=16, stop=[stop])["choices"][0]
    assert out["text"] == full[:full.index(stop)] and out["finish_reason"] == "stop"
    out = complete(env, max_tokens=16, stop=stop, include_stop_str_in_output=True)["choices"][0]
    assert out["text"] == full[:full.index(stop) + len(stop)]


def test_echo_scores_the_prompt(env):
    prompt = [5, 6, 7, 8, 9]
    out = complete(env, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = out["choices"][0]
    lp = c["logprobs"]
    assert len(lp["tokens"]) == len(prompt) and lp["token_logprobs"][0] is None
    assert all(x < 0 for x in lp["token_logprobs"][1:])
    assert out["usage"]["completion_tokens"] == 0


def test_several_prompts_give_choices_in_order(env):
    out = complete(env, prompt=["Hello", "The quick"], n=2)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    single = complete(env, prompt="The quick")["choices"][0]["text"]
    assert out["choices"][2]["text"] == single


def test_load_lora_adapter_validates_the_folder(env, tmp_path):
    good = make_adapter(env, "good")
    cases = [
        ({"lora_path": str(good)}, "lora_name"),
        ({"lora_name": "x y", "lora_path": str(good)}, "lora_name"),
        ({"lora_name": env.model, "lora_path": str(good)}, "lora_name"),
        ({"lora_name": "a"}, "lora_path"),
        ({"lora_name": "a", "lora_path": "relative/dir"}, "lora_path"),
        ({"lora_name": "a", "lora_path": str(good) + "/../good"}, "lora_path"),
        ({"lora_name": "a", "lora_path": str(tmp_path / "missing")}, "lora_path"),
        ({"lora_name": "a", "lora_path": str(env.config.data_dir / "tinkerbell.db")}, "lora_path"),
        ({"lora_name": "a", "lora_path": str(env.config.data_dir)}, "lora_path"),
    ]
    for body, param in cases:
        err(post(env, "/v1/load_lora_adapter", body), 400, param)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert WEIGHTS_FILE in err(post(env, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(empty)}),
                               400, "lora_path") or CONFIG_FILE
    big = make_adapter(env, "big", rank=32)
    assert "max-lora-rank" in err(post(env, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(big)}),
                                  400, "lora_path")
    odd = make_adapter(env, "odd")
    cfg = (odd / CONFIG_FILE).read_text().replace('"q_proj"', '"embed_tokens"')
    (odd / CONFIG_FILE).write_text(cfg)
    assert "embed_tokens" in err(post(env, "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": str(odd)}),
                                 400, "lora_path")
    err(post(env, "/v1/unload_lora_adapter", {"lora_name": "never-loaded"}), 404, "lora_name")


def test_adapter_by_name_listing_tenants_and_unload(env):
    folder = make_adapter(env, "named")
    r = post(env, "/v1/load_lora_adapter", {"lora_name": "alice/ad", "lora_path": str(folder)})
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in env.http.get("/v1/models", headers=A).json()["data"]]
    assert "alice/ad" in ids
    assert "alice/ad" not in [m["id"] for m in env.http.get("/v1/models", headers=B).json()["data"]]

    base = complete(env, max_tokens=12, stop=[])["choices"][0]["text"]
    tuned = complete(env, model="alice/ad", max_tokens=12, stop=[])["choices"][0]["text"]
    assert tuned != base
    err(post(env, "/v1/completions", {"model": "alice/ad", "prompt": "x"}, B), 404, "model")

    # Loading again (same or another folder) replaces; the name is served from the new weights.
    assert post(env, "/v1/load_lora_adapter", {"lora_name": "alice/ad", "lora_path": str(folder)}).status_code == 200
    assert complete(env, model="alice/ad", max_tokens=12, stop=[])["choices"][0]["text"] == tuned

    assert post(env, "/v1/unload_lora_adapter", {"lora_name": "alice/ad"}).status_code == 200
    err(post(env, "/v1/completions", {"model": "alice/ad", "prompt": "x"}), 404, "model")
    assert "alice/ad" not in [m["id"] for m in env.http.get("/v1/models", headers=A).json()["data"]]


def test_adapter_names_survive_a_restart(env):
    folder = make_adapter(env, "persist")
    assert post(env, "/v1/load_lora_adapter", {"lora_name": "keep", "lora_path": str(folder)}).status_code == 200
    expected = complete(env, model="keep", max_tokens=10, stop=[])["choices"][0]["text"]
    # A second app on the same data dir: a fresh service layer that knows the name only from the store.
    env.engine.unregister_adapter("openai-lora:" + _tenant(env, KEY_A) + ":keep").result(timeout=30)
    with LiveServer(create_app(env.config, env.engine)) as srv2:
        with httpx.Client(base_url=srv2.url, timeout=60) as http:
            assert "keep" in [m["id"] for m in http.get("/v1/models", headers=A).json()["data"]]
            r = http.post("/v1/completions", headers=A, json={"model": "keep", "prompt": "Hello! My name",
                                                              "max_tokens": 10, "temperature": 0, "stop": []})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == expected


def _tenant(env, key: str) -> str:
    from tinkerbell.service.auth import tenant_for_configured_key

    return tenant_for_configured_key(key)


def test_stream_disconnect_cancels_the_engine_request(env):
    sampler = env.engine.sampler
    before = sampler.stats()["tokens_generated"]
    body = {"model": env.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1500,
            "temperature": 1.0, "stop": [], "ignore_eos": True, "stream": True}
    with env.http.stream("POST", "/v1/chat/completions", json=body, headers=A) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: ") and '"role":"assistant"' in first
    deadline = time.monotonic() + 10
    while sampler.stats()["running_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sampler.stats()["running_requests"] == 0
    assert sampler.stats()["tokens_generated"] - before < 1500
    samplers = env.app.state.services.samplers
    while samplers.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert samplers.in_flight == 0  # /stats counts this face's requests, and the cancelled one settled


def _stream_texts(env, body: dict) -> tuple[list[str], int]:
    """(text of each chunk that has some, usage.completion_tokens) of a streamed /v1/completions."""
    import json

    texts, tokens = [], 0
    with env.http.stream("POST", "/v1/completions", json={**body, "stream": True,
                         "stream_options": {"include_usage": True}}, headers=A) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                d = json.loads(line[6:])
                if d["choices"] and d["choices"][0]["text"]:
                    texts.append(d["choices"][0]["text"])
                if d.get("usage"):
                    tokens = d["usage"]["completion_tokens"]
    return texts, tokens


def test_a_busy_loop_gets_several_tokens_per_chunk_and_the_same_text(env):
    """While the event loop is busy the engine goes on producing tokens; the next flush sends all of them in one
    chunk per choice (not one chunk per token), and the chunks still add up to the non-streamed text, also
    when a stop string falls after the stall (held back across the flushes)."""
    import threading

    body = {"model": env.model, "prompt": "One, two, three", "max_tokens": 400, "temperature": 0.7, "seed": 3,
            "ignore_eos": True}
    plain = post(env, "/v1/completions", body).json()["choices"][0]["text"]
    stop = plain[3 * len(plain) // 4:][:3]
    cut = post(env, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]["text"]
    assert stop and stop not in cut and plain.startswith(cut)
    loop = env.server.servers[0].get_loop()  # the uvicorn server's event loop (in its thread)
    for want, extra in ((plain, {}), (cut, {"stop": [stop]})):
        stall = threading.Timer(0.2, lambda: loop.call_soon_threadsafe(time.sleep, 0.4))
        stall.start()
        texts, tokens = _stream_texts(env, {**body, **extra})
        stall.join()
        assert "".join(texts) == want
        if not extra:
            assert tokens == 400 and max(len(t) for t in texts) > 20, (len(texts), tokens)
