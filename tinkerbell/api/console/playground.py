"""The playground's model picker: every model the tenant can chat with, for the OpenAI face to serve.

The chat itself goes to `POST /v1/chat/completions` with `stream: true` (tinkerbell/api/openai.py), so the
playground samples exactly as any OpenAI client would; this route only gathers the names `model` accepts there:
the base model, the tenant's checkpoints, the adapters registered with `/v1/load_lora_adapter`, and the
in-memory samplers of the tenant's recent sessions (save_weights_and_get_sampling_client).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from tinkerbell.api.console.common import services, tenant

router = APIRouter(prefix="/console/api/playground")

# Samplers of the most recent sessions only: an RL loop makes one per step, and the picker must stay short.
RECENT_SESSIONS = 10
MAX_SAMPLERS = 20
MAX_CHECKPOINTS = 200


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    t = tenant(request)
    s = services(request)
    out: list[dict[str, str]] = [{"id": s.model_name, "label": f"{s.model_name} (base model)", "group": "base"}]
    ckpts, _ = s.checkpoints.list_for_tenant(t, MAX_CHECKPOINTS, 0)
    for c in ckpts:
        if c["checkpoint_type"] in ("sampler", "training"):
            out.append({"id": c["tinker_path"], "label": c["tinker_path"], "group": "checkpoint"})
    openai = getattr(request.app.state, "openai", None)
    if openai is not None:
        for row in openai.adapters.list(t):
            out.append({"id": row["name"], "label": f"{row['name']} (adapter: {row['path']})", "group": "adapter"})
    samplers: list[str] = []
    for sid in s.sessions.list(t, RECENT_SESSIONS, 0):
        samplers.extend(s.store.samplers_of_session(sid))
    for sampler_id in samplers[-MAX_SAMPLERS:][::-1]:
        row = s.store.get_sampler(sampler_id)
        if row is not None and row["adapter_key"] is not None and not row["model_path"]:
            out.append({"id": sampler_id, "label": f"sampler {sampler_id}", "group": "sampler"})
    return {"models": out, "max_context": s.engine.max_context}
