"""Named LoRA adapters for the OpenAI face (vLLM's `/v1/load_lora_adapter` convention).

A name maps a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`) to something OpenAI clients can
pass as `model`. Names are per tenant (each API key's tenant sees only its own; with `--no-auth` everyone is the
one tenant "local", so names act globally) and persist in the store, so they survive a restart; the engine
learns them again lazily, on first use.

Which folders may be named: a `tinker://` checkpoint path readable by the caller (its own, or a published
one), or an absolute folder on the server's disk outside the data dir. A folder inside the data dir is accepted
only when it is a checkpoint the caller may read (then it is recorded as that checkpoint's tinker:// path), so
no tenant can reach another tenant's weights, the key database or the signing secret by path.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from tinkerbell.engine.adapter_io import CONFIG_FILE, WEIGHTS_FILE
from tinkerbell.engine.lora import ATTN_MODULES, MLP_MODULES, UNEMBED_KEY
from tinkerbell.service.checkpoints import CheckpointManager, tinker_path
from tinkerbell.service.errors import BadRequest, NotFound, ServiceError
from tinkerbell.service.samplers import SamplerManager
from tinkerbell.service.store import Store

if TYPE_CHECKING:
    from tinkerbell.engine.engine import Engine

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:@+/-]{0,199}$")
_SUPPORTED_TARGETS = (*ATTN_MODULES, *MLP_MODULES, UNEMBED_KEY)
_GROUPS = (("attention", ATTN_MODULES), ("MLP", MLP_MODULES))


def param_error(cls: type[ServiceError], param: str, message: str) -> ServiceError:
    """A service error that tells the API which request field (`param`) it is about."""
    err = cls(f"{param}: {message}")
    err.param = param  # type: ignore[attr-defined]
    return err


class AdapterRegistry:
    def __init__(self, store: Store, checkpoints: CheckpointManager, samplers: SamplerManager, engine: "Engine",
                 data_dir: Path, max_lora_rank: int, base_model: str):
        self.store, self.checkpoints, self.samplers, self.engine = store, checkpoints, samplers, engine
        self.data_dir = Path(data_dir).resolve()
        self.max_lora_rank = max_lora_rank
        self.base_model = base_model
        self._registered: dict[tuple[str, str], str] = {}  # (tenant, name) -> folder the engine has, this process

    @staticmethod
    def engine_key(tenant: str, name: str) -> str:
        return f"openai-lora:{tenant}:{name}"

    # ------------------------------------------------------------------------------------------- validation

    def validate_name(self, name: Any) -> str:
        if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
            raise param_error(BadRequest, "lora_name", "must be 1-200 characters of letters, digits and . _ : @ + "
                                                       f"/ - (not starting with a symbol, no '..'); got {name!r}")
        if name == self.base_model or name.startswith("tinker:"):
            raise param_error(BadRequest, "lora_name", f"{name!r} would shadow the base model or a tinker:// path; "
                                                       "choose another name")
        return name

    def _folder_of(self, tenant: str, lora_path: Any) -> tuple[str, Path]:
        """(what to record, folder) for a lora_path: a tinker:// path, or an absolute folder on the server."""
        if not isinstance(lora_path, str) or not lora_path.strip() or "\x00" in lora_path:
            raise param_error(BadRequest, "lora_path", f"must be a folder path or a tinker:// path; got {lora_path!r}")
        if lora_path.startswith("tinker://"):
            _, folder = self.checkpoints.resolve(tenant, lora_path, "lora_path", kinds=("sampler_weights", "weights"))
            return lora_path, folder
        if ".." in PurePosixPath(lora_path).parts:
            raise param_error(BadRequest, "lora_path", f"must not contain '..' segments; got {lora_path!r}")
        if not Path(lora_path).is_absolute():
            raise param_error(BadRequest, "lora_path", f"must be an absolute path on the server (or a tinker:// "
                                                       f"path); got {lora_path!r}")
        real = Path(lora_path).resolve()  # symlinks resolved: the data-dir rule must see where it really leads
        if real == self.data_dir or self.data_dir in real.parents:
            return self._data_dir_checkpoint(tenant, real, lora_path)
        if not real.is_dir():
            raise param_error(BadRequest, "lora_path", f"{lora_path} is not a folder on the server")
        return str(real), real

    def _data_dir_checkpoint(self, tenant: str, real: Path, given: str) -> tuple[str, Path]:
        root = self.checkpoints.root.resolve()
        rel = real.relative_to(root).parts if root in real.parents else ()
        if len(rel) != 3:
            raise param_error(BadRequest, "lora_path", f"{given} lies in the server's data directory but is not a "
                                                       "checkpoint folder; pass the checkpoint's tinker:// path")
        path = tinker_path(*rel)
        _, folder = self.checkpoints.resolve(tenant, path, "lora_path", kinds=("sampler_weights", "weights"))
        return path, folder

    def _check_files(self, folder: Path) -> None:
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / f).is_file():
                raise param_error(BadRequest, "lora_path", f"{folder} has no {f} (a PEFT LoRA adapter folder has "
                                                           f"{CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            cfg = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError) as e:
            raise param_error(BadRequest, "lora_path", f"{folder / CONFIG_FILE} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise param_error(BadRequest, "lora_path", f"{folder / CONFIG_FILE} must hold a JSON object")
        self._check_config(folder, cfg)

    def _check_config(self, folder: Path, cfg: dict[str, Any]) -> None:
        def bad(msg: str) -> ServiceError:
            return param_error(BadRequest, "lora_path", f"{folder / CONFIG_FILE}: {msg}")

        if cfg.get("peft_type", "LORA") != "LORA":
            raise bad(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
        rank = cfg.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise bad(f"r (the LoRA rank) must be a positive integer; got {rank!r}")
        if rank > self.max_lora_rank:
            raise bad(f"rank {rank} exceeds this server's --max-lora-rank {self.max_lora_rank}")
        for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
            if cfg.get(flag):
                raise bad(f"{flag} is set; this server applies plain LoRA (scale lora_alpha / r) only")
        if cfg.get("modules_to_save"):
            raise bad("modules_to_save is set; fully trained modules are not supported, only LoRA weights")
        targets = cfg.get("target_modules")
        if isinstance(targets, str) or not isinstance(targets, list) or not targets:
            raise bad(f"target_modules must be a list of module names from {list(_SUPPORTED_TARGETS)}; "
                      f"got {targets!r}")
        short = {str(t).rsplit(".", 1)[-1] for t in targets}
        unknown = sorted(short - set(_SUPPORTED_TARGETS))
        if unknown:
            raise bad(f"target_modules {unknown} are not supported; supported: {list(_SUPPORTED_TARGETS)}")
        for group, names in _GROUPS:
            # The engine applies LoRA per module group (all attention or all MLP projections).
            if short & set(names) and not set(names) <= short:
                raise bad(f"target_modules must cover all {group} projections {list(names)} or none of them; "
                          f"got {sorted(short & set(names))}")

    # ------------------------------------------------------------------------------------------- changes

    async def load(self, tenant: str, name: Any, lora_path: Any) -> dict[str, Any]:
        """Validate and register `lora_path` under `name` (replacing what the name pointed at)."""
        name = self.validate_name(name)
        recorded, folder = self._folder_of(tenant, lora_path)
        self._check_files(folder)
        await self._register(tenant, name, recorded, folder)
        self.store.put_lora_adapter(tenant, name, recorded)
        return {"lora_name": name, "lora_path": recorded}

    async def unload(self, tenant: str, name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise param_error(BadRequest, "lora_name", f"must be the name of a loaded adapter; got {name!r}")
        if not self.store.delete_lora_adapter(tenant, name):
            raise param_error(NotFound, "lora_name", f"no adapter named {name!r} is loaded for this API key")
        if self._registered.pop((tenant, name), None) is not None:
            await asyncio.wrap_future(self.engine.unregister_adapter(self.engine_key(tenant, name)))

    async def _register(self, tenant: str, name: str, recorded: str, folder: Path) -> None:
        if recorded.startswith("tinker://"):
            return  # served under the checkpoint's own key (shared with the Tinker face), registered on use
        try:
            await asyncio.wrap_future(self.engine.register_checkpoint(self.engine_key(tenant, name), folder))
        except ValueError as e:  # EngineUserError: shapes that do not fit the model, unreadable weights
            raise param_error(BadRequest, "lora_path", str(e)) from None
        self._registered[(tenant, name)] = str(folder)

    # ------------------------------------------------------------------------------------------- lookup

    def list(self, tenant: str) -> list[dict[str, Any]]:
        return self.store.list_lora_adapters(tenant)

    async def adapter_key(self, tenant: str, name: str) -> str | None:
        """The engine key serving adapter `name`, registering it on first use in this process; None if the
        tenant has no adapter of that name."""
        row = self.store.get_lora_adapter(tenant, name)
        if row is None:
            return None
        path = row["path"]
        if path.startswith("tinker://"):
            try:
                _, key = self.samplers.resolve_adapter(tenant, {"model_path": path})
            except NotFound as e:
                raise param_error(NotFound, "model", f"adapter {name!r} points at {path}, which is gone ({e.detail}); "
                                                     "unload it or load it again") from None
            return key
        if (tenant, name) not in self._registered:
            folder = Path(path)
            if not folder.is_dir():
                raise param_error(NotFound, "model", f"adapter {name!r} points at {path}, which no longer exists "
                                                     "on the server; unload it or load it again")
            try:
                await self._register(tenant, name, path, folder)
            except ServiceError as e:
                raise param_error(BadRequest, "model", f"adapter {name!r} cannot be loaded any more: {e.detail}")
        return self.engine_key(tenant, name)
