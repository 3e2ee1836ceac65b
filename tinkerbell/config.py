"""Server configuration: one dataclass, filled from the command line, then environment variables, then defaults.

Every flag reads `TINKERBELL_<FLAG>`; the names existing deployments use are honoured as aliases (DESIGN.md,
Configuration). The command line always wins over the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# flag -> environment variables, first one set wins
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "model": ("TINKERBELL_MODEL", "VLLM_MODEL"),
    "served_model_name": ("TINKERBELL_SERVED_MODEL_NAME",),
    "host": ("TINKERBELL_HOST",),
    "port": ("TINKERBELL_PORT", "PORT"),
    "data_dir": ("TINKERBELL_DATA_DIR",),
    "dtype": ("TINKERBELL_DTYPE",),
    "api_keys": ("TINKERBELL_API_KEYS",),
    "no_auth": ("TINKERBELL_NO_AUTH",),
    "tp": ("TINKERBELL_TP", "VLLM_TENSOR_PARALLEL_SIZE"),
    "dp": ("TINKERBELL_DP",),
    "health_check_interval": ("TINKERBELL_HEALTH_CHECK_INTERVAL",),
    "gpu_memory_util": ("TINKERBELL_GPU_MEMORY_UTIL", "VLLM_GPU_MEMORY_UTIL"),
    "max_loras": ("TINKERBELL_MAX_LORAS", "MAX_LORAS", "VLLM_MAX_LORAS"),
    "max_lora_rank": ("TINKERBELL_MAX_LORA_RANK", "MAX_LORA_RANK", "VLLM_MAX_LORA_RANK"),
    "max_queued_requests": ("TINKERBELL_MAX_QUEUED_REQUESTS",),
    "algorithm": ("TINKERBELL_ALGORITHM",),
    "batch_size": ("TINKERBELL_BATCH_SIZE",),
    "max_wait_time": ("TINKERBELL_MAX_WAIT_TIME",),
    "dcp_path": ("TINKERBELL_DCP_PATH",),
    "base_model": ("TINKERBELL_BASE_MODEL",),
}

DTYPES = ("auto", "bfloat16", "float16", "float32")
# engine/diffusion.py's algorithms and aliases (a test keeps the two in step; this module stays torch-free).
DIFFUSION_ALGORITHMS = ("basic", "no_cache", "simple", "prefix_cache", "dual_cache")


class ConfigError(ValueError):
    """A flag or environment variable has a value the server cannot use; the message names it."""


@dataclass
class ServeConfig:
    model: str | None = None  # None: the default model if resolvable, else the built-in demo model
    served_model_name: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    data_dir: Path = field(default_factory=lambda: Path("data"))
    dtype: str = "auto"
    api_keys: list[str] = field(default_factory=list)
    no_auth: bool = False
    tp: int = 1
    dp: int = 1
    health_check_interval: float = 10.0  # seconds; the router's, with dp > 1
    gpu_memory_util: float = 0.4
    max_loras: int = 8
    max_lora_rank: int = 64
    # Sampling requests admitted but not finished; beyond it a new one gets 429 + Retry-After (0: no limit).
    max_queued_requests: int = 4096
    # Diffusion LMs (LLaDA): default generation algorithm, sequences per forward, seconds an idle batch waits.
    algorithm: str = "basic"
    batch_size: int = 16
    max_wait_time: float = 0.0
    dcp_path: Path | None = None  # weights from a torch.distributed.checkpoint folder
    base_model: str | None = None  # the architecture and tokenizer for --dcp-path (same as --model)
    # Not on the command line: knobs tests and embedders set directly.
    long_poll_seconds: float = 25.0
    allow_download: bool = True

    @property
    def model_name(self) -> str:
        """The name clients use for the base model: exactly --model unless --served-model-name."""
        assert self.model is not None, "resolve the model first (resolve_default_model)"
        return self.served_model_name or self.model

    def validate(self) -> "ServeConfig":
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535 (got {self.port})")
        if self.tp < 1 or self.dp < 1:
            raise ConfigError(f"--tp and --dp must be >= 1 (got tp={self.tp}, dp={self.dp})")
        if self.tp > 1 and self.dcp_path is not None:
            raise ConfigError("--dcp-path is not supported with --tp > 1; use --dp to run more replicas")
        if not self.health_check_interval > 0:
            raise ConfigError(f"--health-check-interval must be > 0 seconds (got {self.health_check_interval})")
        if not 0 < self.gpu_memory_util <= 1:
            raise ConfigError(f"--gpu-memory-util must be in (0, 1] (got {self.gpu_memory_util})")
        if self.max_loras < 1:
            raise ConfigError(f"--max-loras must be >= 1 (got {self.max_loras})")
        if self.max_lora_rank < 1:
            raise ConfigError(f"--max-lora-rank must be >= 1 (got {self.max_lora_rank})")
        if self.max_queued_requests < 0:
            raise ConfigError(f"--max-queued-requests must be >= 0 (got {self.max_queued_requests})")
        if self.algorithm not in DIFFUSION_ALGORITHMS:
            raise ConfigError(f"--algorithm must be one of {', '.join(DIFFUSION_ALGORITHMS)} (got {self.algorithm!r})")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if not 0 <= self.max_wait_time < 3600:
            raise ConfigError(f"--max-wait-time must be in [0, 3600) seconds (got {self.max_wait_time})")
        if self.base_model and self.model and self.base_model != self.model:
            raise ConfigError("--base-model and --model name different models; give one")
        if self.dcp_path is not None and not (self.base_model or self.model):
            raise ConfigError("--dcp-path needs --base-model (the architecture and tokenizer to load it onto)")
        if self.base_model and not self.model:
            self.model = self.base_model
        for k in self.api_keys:
            if not k.startswith("tml-"):
                raise ConfigError(f"API keys must start with 'tml-' (the tinker SDK refuses others): {k[:8]}...")
        return self


def env_value(flag: str, environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    for name in ENV_ALIASES.get(flag, ()):
        v = env.get(name)
        if v not in (None, ""):
            return v
    return None


def _parse_bool(name: str, v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true/false (got {v!r})")


def from_env(environ: dict[str, str] | None = None) -> dict[str, object]:
    """Values the environment sets, converted to the dataclass' types (flag name -> value)."""
    out: dict[str, object] = {}
    conv = {"port": int, "tp": int, "dp": int, "max_loras": int, "max_lora_rank": int, "gpu_memory_util": float,
            "max_queued_requests": int}
    conv["health_check_interval"] = float
    conv |= {"batch_size": int, "max_wait_time": float}
    for flag, names in ENV_ALIASES.items():
        v = env_value(flag, environ)
        if v is None:
            continue
        try:
            if flag in conv:
                out[flag] = conv[flag](v)
            elif flag == "no_auth":
                out[flag] = _parse_bool(names[0], v)
            elif flag == "api_keys":
                out[flag] = [k.strip() for k in v.split(",") if k.strip()]
            elif flag == "data_dir":
                out[flag] = Path(v)
            else:
                out[flag] = v
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"environment variable {' / '.join(names)} has a bad value {v!r}: {e}") from None
    return out


def check_tp(config: ServeConfig, gpus: list[str]) -> None:
    """With --tp > 1: the model must split into `tp` shards and (on a GPU machine) each rank needs its own GPU.
    `gpus` are the visible GPU ids ([]: a CPU machine, where the ranks run on gloo). Reads only the model's
    config.json, so a bad --tp fails at startup, before any weights load. Raises ConfigError."""
    if config.tp <= 1:
        return
    if gpus and config.tp > len(gpus):
        raise ConfigError(f"--tp {config.tp} needs {config.tp} GPUs per replica but {len(gpus)} are visible "
                          f"(CUDA_VISIBLE_DEVICES / nvidia-smi); lower --tp")
    from tinkerbell.engine.models.loader import ModelNotFoundError, read_config, resolve_model_path
    from tinkerbell.engine.tp.shard import plan_shard

    assert config.model is not None, "resolve the model first (resolve_default_model)"
    try:
        cfg = read_config(resolve_model_path(config.model, allow_download=config.allow_download))
    except ModelNotFoundError:
        return  # the engine reports a missing model in its own words
    if cfg.is_diffusion:
        raise ConfigError("--tp > 1 is not supported with diffusion models (LLaDA); use --dp to run more replicas")
    try:
        plan_shard(cfg, 0, config.tp)
    except ValueError as e:
        raise ConfigError(f"{e} (model {config.model}); or use --dp to spread replicas over the GPUs") from None


def resolve_default_model(config: ServeConfig, log=None) -> ServeConfig:
    """No --model: serve DEFAULT_MODEL when it is cached or downloadable, else the built-in demo model."""
    if config.model:
        return config
    from tinkerbell.engine.models.loader import ModelNotFoundError, resolve_model_path
    from tinkerbell.engine.models.tiny import ensure_demo_model

    try:
        resolve_model_path(DEFAULT_MODEL, allow_download=config.allow_download)
        config.model = DEFAULT_MODEL
    except ModelNotFoundError as e:
        demo = ensure_demo_model()
        if log:
            reason = (str(e).splitlines() or [""])[0].split(";")[0]
            log.warning("default model %s unavailable (%s); serving the built-in demo model at %s",
                        DEFAULT_MODEL, reason, demo)
        config.model = str(demo)
    return config
