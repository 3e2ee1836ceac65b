"""Request bodies of the original Tinkerbell client API (pydantic at the boundary), and how a request on a
path shared with the Tinker face is told apart from the official SDK's."""

from __future__ import annotations

from typing import Any

import pydantic

from tinkerbell.api.schemas import format_errors
from tinkerbell.service.errors import BadRequest


class _Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore", allow_inf_nan=False)


class AddLora(_Body):
    base_model: str | None = "base"
    rank: int = pydantic.Field(16, ge=1)
    alpha: float = pydantic.Field(32.0, gt=0)
    target_modules: list[str] | str | None = None
    lora_dropout: float | None = pydantic.Field(None, ge=0, lt=1)
    seed: int | None = None


class ModelRef(_Body):
    model_id: str | None = None
    adapter_id: str | None = None  # the original server accepted either name

    @property
    def ref(self) -> str:
        ref = self.model_id or self.adapter_id
        if not ref:
            raise BadRequest("body.model_id is required (the id /add_lora returned)")
        return ref


class Train(ModelRef):
    data: list[Any] = pydantic.Field(min_length=1)
    loss_fn: str = "cross_entropy"
    loss_config: dict[str, float] | None = None


class Adam(_Body):
    learning_rate: float = pydantic.Field(1e-4, ge=0)
    beta1: float = pydantic.Field(0.9, ge=0, lt=1)
    beta2: float = pydantic.Field(0.95, ge=0, lt=1)
    eps: float = pydantic.Field(1e-12, gt=0)
    weight_decay: float = pydantic.Field(0.0, ge=0)
    grad_clip_norm: float = pydantic.Field(0.0, ge=0)


class OptimStep(ModelRef):
    adam_params: Adam | None = None


class Sample(ModelRef):
    base_model: str | None = None
    model_path: str | None = None
    prompts: list[Any] | str | None = None
    prompt: Any = None
    sampling_params: dict[str, Any] = pydantic.Field(default_factory=dict)
    num_samples: int | None = pydantic.Field(None, ge=1)
    chat_template: bool = True  # false: prompt strings are sent to the model as they are


class Save(ModelRef):
    path: str | None = None
    name: str | None = None
    overwrite: bool = False
    ttl_seconds: int | None = None


class Load(ModelRef):
    path: str
    optimizer: bool = True


def parse(model: type[_Body], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        raise BadRequest(format_errors(list(e.errors()))) from None


def is_original_form(body: dict[str, Any]) -> bool:
    """True for the original client's JSON on a path it shares with the Tinker face: the SDK always sends
    `seq_id` and a `type` discriminator (and samples by `sampling_session_id`), the original client never."""
    if any(k in body for k in ("seq_id", "type", "sampling_session_id")):
        return False
    return any(k in body for k in ("prompts", "model_id", "adapter_id", "data")) or body.get("base_model") == "base"

