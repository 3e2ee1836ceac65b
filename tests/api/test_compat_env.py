"""The original launch scripts' environment: PORT is the port; the backend switches get one log line saying
what the built-in engine does in their place."""

from __future__ import annotations

from tinkerbell import cli
from tinkerbell.legacy_env import REPLACED, notice


def test_port_is_honoured_and_tinkerbell_port_wins():
    assert cli.config_from_args([], {"PORT": "8123"}).port == 8123
    assert cli.config_from_args([], {"PORT": "8123", "TINKERBELL_PORT": "9000"}).port == 9000
    assert cli.config_from_args(["--port", "7000"], {"PORT": "8123"}).port == 7000


def test_backend_switches_get_one_line():
    assert notice({}) is None and notice({"USE_VLLM": ""}) is None
    env = {"TRAINING_BACKEND": "megatron", "USE_MEGATRON": "true", "USE_MEGATRON_BRIDGE": "true", "USE_VLLM": "true",
           "VLLM_ENABLE_LORA": "true", "VLLM_DTYPE": "bfloat16", "VLLM_TRUST_REMOTE_CODE": "true",
           "VLLM_MAX_MODEL_LEN": "4096"}
    line = notice(env)
    assert line is not None and "\n" not in line
    for k, v in env.items():
        assert f"{k}={v}" in line
    assert set(env) == set(REPLACED)


def test_serve_logs_the_line(monkeypatch, caplog):
    import sys
    import types

    from tinkerbell.router import ports

    seen = []
    monkeypatch.setitem(sys.modules, "tinkerbell.api.app", types.SimpleNamespace(serve=seen.append))
    monkeypatch.setattr(ports, "in_use", lambda host, port: False)
    monkeypatch.setenv("USE_VLLM", "true")
    monkeypatch.setenv("PORT", "8124")
    with caplog.at_level("INFO", logger="tinkerbell"):
        assert cli.main(["serve", "--model", "/m/tiny"]) == 0
    assert seen[0].port == 8124
    assert sum("USE_VLLM=true" in r.getMessage() for r in caplog.records) == 1
