"""Context headers for the legs we call out through the edge (a human, an outbound call)."""
from __future__ import annotations

from controller.actions import header_name_problem, sanitize_header_value
from controller.media.feature import MediaError
from controller.state.calls import CallStore

MAX_CONTEXT_HEADER_BYTES = 256  # a longer summary travels as a reference to the API


async def context_headers(store: CallStore, api_base_url: str, call_id: str,
                          context: dict[str, str]) -> dict[str, str]:
    """Validated, size-capped X- headers; a long value travels as a reference to the API."""
    headers: dict[str, str] = {"X-Callfabric-Call-Id": call_id}
    for key, value in context.items():
        name = key if key.lower().startswith("x-") else f"X-{key.replace('_', '-').title()}"
        problem = header_name_problem(name)
        if problem:
            raise MediaError(problem, 422)
        text = sanitize_header_value(str(value))
        if len(text.encode()) > MAX_CONTEXT_HEADER_BYTES:
            await store.set_fields(call_id, {f"context_{name[2:].lower()}": text})
            text = f"{api_base_url}/v1/calls/{call_id}/context/{name[2:].lower()}"
            name = f"{name}-Ref"
        headers[name] = text
    return headers
