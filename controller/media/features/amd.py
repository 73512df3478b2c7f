"""Answering-machine detection for outbound calls: the called party's first seconds are
analysed by Asterisk's AMD() in the node's dialplan (`[callfabric-amd]` in
asterisk/extensions.conf) before the call enters our application with the verdict — `human`,
`machine` or `unknown` — which becomes the call's `call.amd` event, so the agent that joins
knows whether to speak or to leave a message."""
from __future__ import annotations

from typing import Any

from controller.media.feature import Feature
from controller.media.model import CallMedia

CONTEXT = "callfabric-amd"  # asterisk/extensions.conf
CALL_VARIABLE, TOTAL_VARIABLE = "CALLFABRIC_CALL", "CALLFABRIC_AMD_MS"
RESULTS = {"HUMAN": "human", "MACHINE": "machine", "NOTSURE": "unknown", "HANGUP": "unknown"}
MIN_MS, MAX_MS = 1000, 30_000


class Amd(Feature):
    def dialplan(self, call_id: str, total_ms: int) -> tuple[dict[str, Any], dict[str, str]]:
        """Where an outbound call with detection goes when answered (ARI originate parameters)
        and the channel variables AMD() and the way back into the application read."""
        return ({"context": CONTEXT, "extension": "amd", "priority": 1},
                {CALL_VARIABLE: call_id, TOTAL_VARIABLE: str(max(MIN_MS, min(MAX_MS, total_ms)))})

    async def detected(self, media: CallMedia, args: list[str]) -> None:
        """The call entered the application after AMD(): `outbound,<call>,amd,<AMDSTATUS>,<AMDCAUSE>`."""
        if len(args) < 3 or args[2] != "amd":
            return
        status = args[3] if len(args) > 3 else ""
        cause = args[4] if len(args) > 4 else ""
        result = RESULTS.get(status, "unknown")
        self.plane.metrics.amd.labels(result).inc()
        async with self.plane.lock(media.call_id):
            await self.plane.timeline(media, "amd", result=result, status=status or None, cause=cause or None)
