"""Cold transfer by SIP REFER: the far end (the caller's carrier or phone) is asked to call
`to` itself, and the call leaves our node. The caller is sent to the node's dialplan
(`[callfabric-refer]` in asterisk/extensions.conf), where Transfer() sends the REFER — its
custom headers inside the Refer-To URI, so the far end copies them into the INVITE it sends
— and waits for the NOTIFY's final status; the caller then comes back into our application
with that status. Accepted: `transfer.completed` and the caller's leg is hung up. Refused (or
failed): `transfer.failed` with the status, the caller rejoins the call, and with `fallback`
the target is called through the edge and bridged with the caller instead (a handoff)."""
from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote, unquote

from controller.actions import header_name_problem, sanitize_header_value
from controller.media.ari import AriError
from controller.media.feature import Feature, FollowUp, MediaError
from controller.media.model import CallMedia, ReferLeg
from controller.state.calls import now_ms

log = logging.getLogger("callfabric.media.refer")

CONTEXT = "callfabric-refer"  # asterisk/extensions.conf
TO_VARIABLE, ID_VARIABLE = "CALLFABRIC_REFER_TO", "CALLFABRIC_TRANSFER"
STATUS_VARIABLES = ("TRANSFERSTATUS", "TRANSFERSTATUSPROTOCOL")  # set by app_transfer


def refer_to(uri: str, headers: dict[str, str] | None = None) -> str:
    """The Refer-To value: `<uri?Name=value&…>` (RFC 3515: the far end puts these headers in
    the INVITE it sends to the target). Values are escaped; a comma would end the dialplan
    application's argument, so it is escaped too."""
    if any(c in uri for c in ' <>"\r\n\x00,?'):
        raise MediaError(f"{uri!r} is not a SIP URI a transfer can be sent to", 422)
    parts = []
    for name, value in (headers or {}).items():
        problem = header_name_problem(name)
        if problem:
            raise MediaError(problem, 422)
        parts.append(f"{name}={quote(sanitize_header_value(str(value)), safe='')}")
    return f"<{uri}{'?' + '&'.join(parts) if parts else ''}>"


class Refer(Feature):
    events = ("ChannelVarset",)

    # -- actions ---------------------------------------------------------------------------------
    async def start(self, call_id: str, uri: str, *, headers: dict[str, str] | None = None,
                    fallback: bool = True) -> dict[str, Any]:
        """Ask the far end to transfer the caller to `uri` (a REFER); the outcome follows as
        `transfer.completed` / `transfer.failed` (then the fallback, when asked)."""
        plane = self.plane
        target = refer_to(uri, headers)
        async with plane.lock(call_id):
            media = plane.live(call_id)
            if media.state != "active":
                raise MediaError(f"call {call_id!r} is {media.state}: one transfer at a time", 409)
            media.sequence += 1
            leg = ReferLeg(transfer_id=f"t{media.sequence}", to=target, fallback=fallback, started_ms=now_ms())
            media.refers[leg.transfer_id] = leg
            media.state = "referring"  # from now on the caller's StasisEnd is expected
            await plane.save(media, "transfer_started", method="refer", transfer=leg.transfer_id, to=target)
            client = plane.nodes[media.node]
            caller = media.caller_channel
            try:
                # Its events after it leaves the application: the status variables, its end.
                await client.request("subscribe", "POST", f"/applications/{client.app}/subscription",
                                     params={"eventSource": f"channel:{caller}"})
                for name, value in ((TO_VARIABLE, target), (ID_VARIABLE, leg.transfer_id)):
                    await client.request("setChannelVar", "POST", f"/channels/{caller}/variable",
                                         params={"variable": name, "value": value})
                await client.request("continueInDialplan", "POST", f"/channels/{caller}/continue",
                                     params={"context": CONTEXT, "extension": "refer", "priority": 1})
            except AriError as exc:
                media.state = "active"
                await self._unsubscribe(media)
                await self._failed(media, leg, 0, f"the node refused: {exc}")
                raise MediaError(f"transfer by REFER failed: {exc}", 502) from None
            return {"transfer_id": leg.transfer_id, "to": target, "method": "refer", "state": leg.state}

    # -- ARI events ------------------------------------------------------------------------------
    async def on_event(self, media: CallMedia, channel_id: str, event: dict[str, Any]) -> None:
        """Transfer() sets the outcome before the caller comes back (or is hung up by the far end)."""
        leg = self._current(media)
        if leg is None or channel_id != media.caller_channel or event.get("variable") not in STATUS_VARIABLES:
            return
        value = str(event.get("value") or "")
        if event["variable"] == "TRANSFERSTATUS":
            leg.reason = value
        elif value.isdigit() and int(value):
            leg.status = int(value)

    async def returned(self, media: CallMedia, args: list[str]) -> bool:
        """The caller is back from the dialplan: `refer,<id>,<TRANSFERSTATUS>,<protocol code>`."""
        leg = self._current(media)
        if leg is None or not args or args[0] != "refer":
            return False
        status_text = args[2] if len(args) > 2 else leg.reason
        code = int(args[3]) if len(args) > 3 and args[3].isdigit() and int(args[3]) else leg.status
        await self._unsubscribe(media)
        if status_text == "SUCCESS":
            await self._completed(media, leg, code or 200)
            await self.plane.teardown(media, "transferred", hang_up_caller=True)
            return True
        media.state = "active"
        client = self.plane.nodes[media.node]
        try:
            await client.add_channel(media.bridge, media.caller_channel)
        except AriError as exc:
            log.error("call %s: the caller could not rejoin after a failed transfer: %s", media.call_id, exc)
        why = {"FAILURE": "refused" if code else "failed", "UNSUPPORTED": "the caller's channel cannot transfer"}
        await self._failed(media, leg, code, why.get(status_text, status_text or "no outcome"))
        return True

    async def gone(self, media: CallMedia, channel_id: str, cause: str) -> bool:
        """The caller's channel ended while it was being transferred: the far end took the
        call away (or the caller hung up)."""
        leg = self._current(media)
        if leg is None or channel_id != media.caller_channel:
            return False
        if leg.reason == "SUCCESS":
            await self._completed(media, leg, leg.status or 200)
        else:
            leg.state, leg.ended_ms, leg.reason = "completed", now_ms(), "the far end ended the call before the outcome"
            self.plane.metrics.transfers.labels("refer", "completed").inc()
            await self.plane.save(media, "transfer_completed", method="refer", transfer=leg.transfer_id, to=leg.to,
                                  confirmed=False, reason=leg.reason, cause=cause)
        await self.plane.teardown(media, "transferred")
        return True

    # -- outcomes --------------------------------------------------------------------------------
    def _current(self, media: CallMedia) -> ReferLeg | None:
        if media.state != "referring":
            return None
        return next((leg for leg in media.refers.values() if leg.state == "referring"), None)

    async def _completed(self, media: CallMedia, leg: ReferLeg, status: int) -> None:
        leg.state, leg.status, leg.ended_ms = "completed", status, now_ms()
        self.plane.metrics.transfers.labels("refer", "completed").inc()
        await self.plane.save(media, "transfer_completed", method="refer", transfer=leg.transfer_id, to=leg.to,
                              status=status, confirmed=True)

    async def _failed(self, media: CallMedia, leg: ReferLeg, status: int, reason: str) -> None:
        """Lock held: recorded; with `fallback`, the target is called and bridged instead."""
        leg.state, leg.status, leg.reason, leg.ended_ms = "failed", status, reason, now_ms()
        self.plane.metrics.transfers.labels("refer", "failed").inc()
        await self.plane.save(media, "transfer_failed", method="refer", transfer=leg.transfer_id, to=leg.to,
                              status=status or None, reason=reason, fallback=leg.fallback)
        if leg.fallback:
            self.plane.spawn(media.node, self._bridge_instead(media, leg), "transfer fallback")

    async def _bridge_instead(self, media: CallMedia, leg: ReferLeg) -> None:
        """The fallback: the target called through the edge; on answer it replaces the agent."""
        uri, _, query = leg.to.strip("<>").partition("?")
        headers = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
        context = {name: unquote(value) for name, value in headers.items()}
        try:
            result = await self.plane.humans.add(media.call_id, uri, uri, mode="handoff", context=context)
        except MediaError as exc:
            async with self.plane.lock(media.call_id):
                await self.plane.save(media, "transfer_fallback_failed", transfer=leg.transfer_id, reason=str(exc))
            return
        async with self.plane.lock(media.call_id):
            leg.fallback_leg = result["leg_id"]
            await self.plane.save(media, "transfer_fallback", transfer=leg.transfer_id, leg=result["leg_id"], to=uri)

    async def _unsubscribe(self, media: CallMedia) -> None:
        client = self.plane.nodes[media.node]
        await self.plane.quietly(client.request("unsubscribe", "DELETE", f"/applications/{client.app}/subscription",
                                                params={"eventSource": f"channel:{media.caller_channel}"}))

    # -- record keeping --------------------------------------------------------------------------
    def missing(self, media: CallMedia, channels: dict[str, dict]) -> bool:
        """The caller came back while nobody listened: its outcome is in its Stasis arguments."""
        args = self.plane.stasis_args(self.plane.nodes[media.node], channels.get(media.caller_channel, {}))
        if self._current(media) is not None and args and args[0] == "refer":
            self.plane.spawn(media.node, self._returned_locked(media, args), "transfer outcome")
        return False

    async def _returned_locked(self, media: CallMedia, args: list[str]) -> None:
        async with self.plane.lock(media.call_id):
            await self.returned(media, args)

    async def take_over(self, media: CallMedia, channels: dict[str, dict], bridges: set[str]) -> list[FollowUp]:
        """A transfer in progress: the caller may have come back meanwhile (its outcome in its
        Stasis arguments); else its events are subscribed to again."""
        if self._current(media) is None:
            return []
        args = self.plane.stasis_args(self.plane.nodes[media.node], channels.get(media.caller_channel, {}))
        if args and args[0] == "refer":
            await self.returned(media, args)
            return []
        client = self.plane.nodes[media.node]
        await self.plane.quietly(client.request("subscribe", "POST", f"/applications/{client.app}/subscription",
                                                params={"eventSource": f"channel:{media.caller_channel}"}))
        return []
