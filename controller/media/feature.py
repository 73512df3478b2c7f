"""What every feature of the media plane shares: the errors an action raises, where a leg's
audio goes, and the anatomy a feature has (see `Feature`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from controller.media.model import CallMedia

if TYPE_CHECKING:
    from controller.media.plane import MediaPlane

LEG_UP_TIMEOUT_S = 5.0


class MediaError(Exception):
    """An action that could not be carried out (unknown call, ended call, ARI refused …)."""

    def __init__(self, message: str, status: int = 409, **detail: Any):
        super().__init__(message)
        self.status = status
        self.detail = detail  # what the API's error adds for programs (e.g. the failed playback_id)


class MediaNodeError(Exception):
    """A media node refused or did not answer an operation, passed on as is (ARI's error,
    controller/media/ari.py): callers of the media plane catch this, not the wire client's."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an agent or fork target's audio goes, and how."""

    name: str
    endpoint: str
    transport: str  # rtp | audiosocket | websocket
    codec: str


def external_media_params(target: Endpoint) -> dict[str, str]:
    """ExternalMedia parameters for an endpoint (see POST /channels/externalMedia)."""
    if target.transport == "audiosocket":
        return {"encapsulation": "audiosocket", "transport": "tcp", "external_host": target.endpoint}
    if target.transport == "websocket":
        return {"encapsulation": "none", "transport": "websocket", "external_host": target.endpoint}
    return {"encapsulation": "rtp", "transport": "udp", "external_host": target.endpoint}


# A step to run once the record of a taken-over call is saved: (what, coroutine factory).
FollowUp = tuple[str, Callable[[], Awaitable[Any]]]


class Feature:
    """One feature of the media plane. Every feature has the same anatomy:

    - its actions: public coroutines that take the call's lock (`plane.lock`) and record each
      change (`plane.save`: media record + timeline step) before the next step;
    - its ARI events: `entered` (one of its channels entered our application), `returned` (the
      caller came back from the dialplan), `gone` (one of its channels left), and the other
      event types it names in `events` (`on_event`);
    - its steps in the plane's record keeping: `missing` (a resync found its legs gone),
      `take_over` (a call adopted from another controller), `ending` (the call's teardown),
      `adopted` / `released` (the call's legs are counted by this controller, or not any more).

    The plane keeps node sync, event dispatch and the per-call lock; a feature owns its legs."""

    events: tuple[str, ...] = ()  # ARI event types (besides StasisStart/End) this feature handles

    def __init__(self, plane: "MediaPlane"):
        self.plane = plane

    # -- ARI events ------------------------------------------------------------------------------
    def owns(self, media: CallMedia, channel_id: str) -> bool:
        """Whether `channel_id`, a channel we created for the call, is one of this feature's."""
        return False

    async def entered(self, media: CallMedia, channel_id: str, channel: dict[str, Any]) -> None:
        """One of its channels entered our application (StasisStart). Takes the lock itself."""

    async def returned(self, media: CallMedia, args: list[str]) -> bool:
        """The caller came back into our application from the dialplan (Stasis with `args`),
        lock held: True when this feature had sent it there (handled)."""
        return False

    async def gone(self, media: CallMedia, channel_id: str, cause: str) -> bool:
        """A channel of the call left (StasisEnd / ChannelDestroyed), lock held: True when it
        was this feature's (handled)."""
        return False

    async def on_event(self, media: CallMedia, channel_id: str, event: dict[str, Any]) -> None:
        """An event of a type named in `events` about one of the call's channels or bridges
        (`channel_id` is that object's id), lock held."""

    # -- record keeping --------------------------------------------------------------------------
    def missing(self, media: CallMedia, channels: dict[str, dict]) -> bool:
        """Resync, lock held: mark the legs Asterisk no longer has; True when any changed."""
        return False

    async def take_over(self, media: CallMedia, channels: dict[str, dict], bridges: set[str]) -> list[FollowUp]:
        """A call adopted from another controller, lock held: settle what it left half done;
        returns steps to run once the call's record is saved."""
        return []

    def ending(self, media: CallMedia) -> None:
        """The call's teardown begins, lock held: its legs are about to be removed."""

    def adopted(self, media: CallMedia) -> None:
        """The call's record was taken from Redis: count its live legs."""

    def released(self, media: CallMedia) -> None:
        """A call not ended goes to another controller: stop counting its legs."""
