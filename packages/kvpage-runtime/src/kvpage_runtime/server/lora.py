"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter, as vLLM's.

They are routed only when ``$KVPAGE_ALLOW_RUNTIME_LORA_UPDATING`` is true (vLLM's
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``; see ``ServerSettings.allow_runtime_lora_updating``):
anyone who may call them can make the server read any folder it can reach.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from kvpage_runtime.server.errors import APIError
from kvpage_runtime.server.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from kvpage_runtime.server.state import ServerState

lora_api = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


@lora_api.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """Loads the PEFT folder ``lora_path`` as model ``lora_name``: 400 if the name is in use,
    the folder cannot be served or LoRA is not enabled."""
    if not body.lora_name or not body.lora_path:
        raise APIError("Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
    await _state(request).load_lora(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@lora_api.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest,
                              request: Request) -> PlainTextResponse:
    """Forgets adapter ``lora_name`` (404 if there is none); requests running with it finish."""
    await _state(request).unload_lora(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
