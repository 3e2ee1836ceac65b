"""The command line is a contract (DESIGN.md, Configuration): flags, environment aliases, precedence, exit codes,
and the generated configuration reference."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tinkerbell import cli
from tinkerbell.config import ConfigError, ServeConfig, check_tp

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_every_flag():
    assert cli.config_from_args([], {}) == ServeConfig()
    c = cli.config_from_args(
        ["serve", "--model", "/m/x", "--served-model-name", "nice", "--host", "127.0.0.1", "--port", "9001",
         "--data-dir", "/tmp/d", "--dtype", "bfloat16", "--api-key", "tml-a", "--api-key", "tml-b", "--no-auth",
         "--tp", "1", "--dp", "1", "--gpu-memory-util", "0.7", "--max-loras", "4", "--max-lora-rank", "16"], {})
    assert c == ServeConfig(model="/m/x", served_model_name="nice", host="127.0.0.1", port=9001,
                            data_dir=Path("/tmp/d"), dtype="bfloat16", api_keys=["tml-a", "tml-b"], no_auth=True,
                            gpu_memory_util=0.7, max_loras=4, max_lora_rank=16)
    assert c.model_name == "nice"


def test_env_and_aliases_apply():
    env = {"VLLM_MODEL": "org/model", "MAX_LORAS": "3", "VLLM_MAX_LORA_RANK": "32", "VLLM_GPU_MEMORY_UTIL": "0.5",
           "TINKERBELL_API_KEYS": "tml-x, tml-y,", "TINKERBELL_NO_AUTH": "true", "TINKERBELL_PORT": "7000",
           "TINKERBELL_DATA_DIR": "/srv/tb", "VLLM_TENSOR_PARALLEL_SIZE": "1"}
    c = cli.config_from_args(["serve"], env)
    assert (c.model, c.max_loras, c.max_lora_rank, c.gpu_memory_util) == ("org/model", 3, 32, 0.5)
    assert c.api_keys == ["tml-x", "tml-y"] and c.no_auth and c.port == 7000 and c.data_dir == Path("/srv/tb")
    # the TINKERBELL_ name wins over its aliases
    assert cli.config_from_args([], {"TINKERBELL_MAX_LORAS": "5", "MAX_LORAS": "3"}).max_loras == 5


def test_flags_beat_env():
    env = {"TINKERBELL_MODEL": "env/model", "MAX_LORAS": "3", "TINKERBELL_API_KEYS": "tml-env",
           "TINKERBELL_DTYPE": "float16"}
    c = cli.config_from_args(["--model", "flag/model", "--max-loras", "6", "--api-key", "tml-flag",
                              "--dtype", "float32"], env)
    assert (c.model, c.max_loras, c.api_keys, c.dtype) == ("flag/model", 6, ["tml-flag"], "float32")


def test_bad_values_raise_config_error_naming_the_source():
    with pytest.raises(ConfigError, match="--api-key"):
        cli.config_from_args(["--api-key", "sk-nope"], {})
    with pytest.raises(ConfigError, match="TINKERBELL_API_KEYS"):
        cli.config_from_args([], {"TINKERBELL_API_KEYS": "nope"})
    with pytest.raises(ConfigError, match="--dtype"):
        cli.config_from_args([], {"TINKERBELL_DTYPE": "int8"})
    with pytest.raises(ConfigError, match="MAX_LORAS"):
        cli.config_from_args([], {"MAX_LORAS": "many"})
    with pytest.raises(ConfigError, match="--gpu-memory-util"):
        cli.config_from_args(["--gpu-memory-util", "1.5"], {})
    with pytest.raises(SystemExit) as e:
        cli.config_from_args(["--port", "eighty"], {})
    assert e.value.code == 2


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("TINKERBELL_", "VLLM_", "MAX_LORA"))}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})}, cwd=ROOT)


def test_subprocess_exit_codes_name_the_flag():
    r = _run("tinkerbell.cli", "serve", "--dtype", "bogus")
    assert r.returncode == 2 and "--dtype" in r.stderr
    r = _run("tinkerbell", "serve", "--api-key", "not-a-tml-key")
    assert r.returncode == 2 and "--api-key" in r.stderr and "tml-" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    r = _run("tinkerbell", "serve", env={"VLLM_MAX_LORA_RANK": "0"})
    assert r.returncode == 2 and "--max-lora-rank" in r.stderr
    r = _run("tinkerbell", "bench", "--replica", "http://x:8001")
    assert r.returncode == 2 and "--replica" in r.stderr  # bench exists now: an unknown flag is a usage error
    r = _run("tinkerbell", "bench")
    assert r.returncode == 2 and "--url" in r.stderr and "--model" in r.stderr
    r = _run("tinkerbell", "router")
    assert r.returncode == 2 and "--replica" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _run("tinkerbell", "router", "--replica", "x:8001")
    assert r.returncode == 2 and "http://" in r.stderr
    r = _run("tinkerbell", "serve", "--help")
    assert r.returncode == 0 and "VLLM_MODEL" in r.stdout


def test_serve_calls_the_app(monkeypatch):
    seen: list[ServeConfig] = []
    monkeypatch.setitem(sys.modules, "tinkerbell.api.app", types.SimpleNamespace(serve=seen.append))
    for k in list(os.environ):
        if k.startswith(("TINKERBELL_", "VLLM_", "MAX_LORA")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MAX_LORAS", "2")
    assert cli.main(["serve", "--model", "/m/tiny", "--port", "8123"]) == 0
    assert seen[0].model == "/m/tiny" and seen[0].port == 8123 and seen[0].max_loras == 2
    assert cli.main(["serve", "--tp", "0"]) == 2 and len(seen) == 1


def test_keys_commands(monkeypatch, tmp_path, capsys):
    calls = []

    def create_key(data_dir: Path, tenant: str | None) -> str:
        calls.append((data_dir, tenant))
        return "tml-new"

    def list_keys(data_dir: Path) -> list[dict]:
        return [{"id": 1, "tenant": "alice", "prefix": "tml-ab"}, {"id": 2, "tenant": "bob", "revoked": True}]

    monkeypatch.setitem(sys.modules, "tinkerbell.service.auth",
                        types.SimpleNamespace(create_key=create_key, list_keys=list_keys))
    assert cli.main(["keys", "create", "--data-dir", str(tmp_path), "--tenant", "alice"]) == 0
    assert capsys.readouterr().out.strip() == "tml-new"
    monkeypatch.setenv("TINKERBELL_DATA_DIR", str(tmp_path / "env"))
    assert cli.main(["keys", "create"]) == 0
    assert calls == [(tmp_path, "alice"), (tmp_path / "env", None)]
    assert cli.main(["keys", "list", "--data-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].split() == ["id", "tenant", "prefix", "revoked"]
    assert lines[-1].split() == ["2", "bob", "True"]
    with pytest.raises(SystemExit) as e:
        cli.main(["keys"])
    assert e.value.code == 2


def test_configuration_docs_match_the_parser():
    gen = runpy.run_path(str(ROOT / "scripts" / "gen_config_docs.py"), run_name="gen_config_docs")
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == gen["render"](), "docs/configuration.md is stale: run python scripts/gen_config_docs.py"
    for flag in ("--model", "--max-lora-rank", "--no-auth", "VLLM_MAX_LORAS", "TINKERBELL_API_KEYS"):
        assert flag in committed


def test_launch_scripts_are_thin_wrappers(tmp_path):
    # A stub `tinkerbell` on PATH records the arguments the scripts pass.
    stub = tmp_path / "bin" / "tinkerbell"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "$@"\necho "loras=$TINKERBELL_MAX_LORAS rank=$TINKERBELL_MAX_LORA_RANK"\n')
    stub.chmod(0o755)
    scripts = tmp_path / "repo" / "scripts"  # outside the repo, so the scripts do not find .venv/bin/tinkerbell
    scripts.mkdir(parents=True)
    for name in ("run_server_multigpu.sh", "run_server_2gpu.sh", "run_server_4gpu.sh"):
        (scripts / name).write_bytes((ROOT / "scripts" / name).read_bytes())
        (scripts / name).chmod(0o755)
    env = {"PATH": f"{stub.parent}:/usr/bin:/bin"}

    def run(name, *args, **extra):
        return subprocess.run([str(scripts / name), *args], capture_output=True, text=True, check=True,
                              env={**env, **extra}).stdout.splitlines()

    assert run("run_server_multigpu.sh") == [
        "serve --model HuggingFaceTB/SmolLM2-135M-Instruct --tp 1 --gpu-memory-util 0.4", "loras=8 rank=64"]
    assert run("run_server_2gpu.sh", "/m/x", "0.6", "--port", "9000", MAX_LORAS="4") == [
        "serve --model /m/x --tp 2 --gpu-memory-util 0.6 --port 9000", "loras=4 rank=64"]
    assert run("run_server_4gpu.sh")[0] == "serve --model HuggingFaceTB/SmolLM2-135M-Instruct --tp 4 --gpu-memory-util 0.4"
    # DP= splits the GPUs into replicas behind the router; the seed's VLLM_* names pick model, TP and memory.
    assert run("run_server_4gpu.sh", DP="2")[0] == (
        "serve --model HuggingFaceTB/SmolLM2-135M-Instruct --tp 2 --dp 2 --gpu-memory-util 0.4")
    assert run("run_server_multigpu.sh", "", "4", VLLM_MODEL="/m/v", VLLM_TENSOR_PARALLEL_SIZE="1",
               VLLM_GPU_MEMORY_UTIL="0.3")[0] == "serve --model /m/v --tp 1 --dp 4 --gpu-memory-util 0.3"


def test_dp_and_tp_are_allowed():
    c = cli.config_from_args(["--dp", "3", "--health-check-interval", "0.5"], {})
    assert (c.dp, c.health_check_interval) == (3, 0.5)
    assert cli.config_from_args([], {"TINKERBELL_DP": "2", "TINKERBELL_HEALTH_CHECK_INTERVAL": "2.5"}).dp == 2
    assert cli.config_from_args(["--tp", "2", "--dp", "2"], {}).tp == 2
    assert cli.config_from_args([], {"VLLM_TENSOR_PARALLEL_SIZE": "4"}).tp == 4
    with pytest.raises(ConfigError, match="--health-check-interval"):
        cli.config_from_args(["--health-check-interval", "0"], {})


def test_tp_with_dcp_path_is_refused():
    with pytest.raises(ConfigError, match="--dcp-path is not supported with --tp > 1; use --dp"):
        cli.config_from_args(["--tp", "2", "--dcp-path", "/ckpt", "--base-model", "/m/x"], {})


def test_tp_must_divide_the_heads(tiny_llama_dir):
    c = cli.config_from_args(["--model", str(tiny_llama_dir), "--tp", "3"], {})
    with pytest.raises(ConfigError, match="--tp 3 must divide the model's num_attention_heads"):
        check_tp(c, [])
    check_tp(cli.config_from_args(["--model", str(tiny_llama_dir), "--tp", "2"], {}), [])  # 4 heads, 2 kv heads


def test_tp_above_the_visible_gpus_is_refused(tiny_llama_dir):
    c = cli.config_from_args(["--model", str(tiny_llama_dir), "--tp", "2"], {})
    with pytest.raises(ConfigError, match="--tp 2 needs 2 GPUs per replica but 1 are visible"):
        check_tp(c, ["0"])
    check_tp(c, ["0", "1"])


def test_tp_with_a_diffusion_model_is_refused(tiny_llada_dir):
    c = cli.config_from_args(["--model", str(tiny_llada_dir), "--tp", "2"], {})
    with pytest.raises(ConfigError, match="not supported with diffusion models"):
        check_tp(c, [])


def test_serve_refuses_a_bad_tp_before_loading(monkeypatch, capsys, tiny_llama_dir):
    seen: list[ServeConfig] = []
    monkeypatch.setitem(sys.modules, "tinkerbell.api.app", types.SimpleNamespace(serve=seen.append))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU machine, whatever this one is
    assert cli.main(["serve", "--model", str(tiny_llama_dir), "--tp", "3"]) == 2 and not seen
    assert "--tp 3 must divide" in capsys.readouterr().err


def test_port_in_use_names_the_holder(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        for args in (["serve", "--dp", "2"], ["serve"], ["router", "--replica", "http://127.0.0.1:1"]):
            r = _run("tinkerbell", *args, "--host", "127.0.0.1", "--port", str(port), "--model", "/nonexistent",
                     "--data-dir", str(tmp_path)) if args[0] == "serve" else _run(
                "tinkerbell", *args, "--host", "127.0.0.1", "--port", str(port))
            assert r.returncode == 2, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
            assert f"port {port}" in r.stderr and f"pid {os.getpid()}" in r.stderr and "--port" in r.stderr


def test_bad_gil_switch_interval_is_one_clear_line_before_loading_the_model():
    from tests.ports import free_port

    r = _run("tinkerbell", "serve", "--port", str(free_port()), env={"TINKERBELL_GIL_SWITCH_INTERVAL": "soon"})
    assert r.returncode == 2 and "TINKERBELL_GIL_SWITCH_INTERVAL" in r.stderr
    assert "Traceback" not in r.stderr and "loaded" not in r.stderr
