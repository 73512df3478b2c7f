"""What ARI does not give, from each node's AMI (panoramisk): security events (failed
authentication, requests from unexpected addresses, bad requests …) counted and handed to a
listener (the security module), and the reachability of PJSIP contacts."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote, urlsplit

from panoramisk import Manager

from controller.metrics import Metrics

log = logging.getLogger("callfabric.media.ami")

# Asterisk's security framework events that mean "someone is trying something".
SECURITY_FAILURES = frozenset({
    "FailedACL", "InvalidAccountID", "SessionLimit", "MemoryLimit", "LoadAverageLimit", "RequestNotSupported",
    "AuthMethodNotAllowed", "RequestNotAllowed", "RequestBadFormat", "InvalidPassword", "ChallengeResponseFailed",
    "UnexpectedAddress", "InvalidTransport",
})


@dataclass(frozen=True, slots=True)
class AmiNode:
    name: str
    host: str
    port: int
    username: str
    secret: str


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    node: str
    event: str  # e.g. InvalidAccountID
    service: str  # e.g. PJSIP
    account: str
    remote_ip: str
    remote_port: str


def parse_ami_node(text: str) -> AmiNode:
    """'name=tcp://user:secret@host:5038' → AmiNode (ValueError with a clear message)."""
    name, sep, url = text.partition("=")
    parts = urlsplit(url.strip())
    if not sep or not name.strip() or parts.scheme != "tcp" or not parts.hostname or not parts.username:
        raise ValueError(f"{text!r} is not 'name=tcp://user:secret@host:5038'")
    return AmiNode(name.strip(), parts.hostname, parts.port or 5038, unquote(parts.username),
                   unquote(parts.password or ""))


def _remote(address: str) -> tuple[str, str]:
    """'IPV4/UDP/203.0.113.5/5060' → ('203.0.113.5', '5060')."""
    parts = (address or "").split("/")
    return (parts[2], parts[3]) if len(parts) >= 4 else ("", "")


class _Manager(Manager):
    """panoramisk's Manager reconnects forever, also after close(): not once we are stopping."""

    stopping = False

    def connect(self, *args, **kwargs):
        if self.stopping:
            return None
        return super().connect(*args, **kwargs)


class AmiWatcher:
    def __init__(self, node: AmiNode, metrics: Metrics, on_security: Callable[[SecurityEvent], None] | None = None,
                 reconnect_s: int = 2):
        self.node = node
        self.metrics = metrics
        self.on_security = on_security
        self.connected = asyncio.Event()
        self.manager = _Manager(host=node.host, port=node.port, username=node.username, secret=node.secret,
                               ping_delay=10, ping_interval=10, reconnect_timeout=reconnect_s,
                               loop=asyncio.get_running_loop(), log=log,
                               on_login=self._logged_in, on_disconnect=self._disconnected)
        self.manager.register_event("*", self._event)

    def start(self) -> None:
        self.manager.connect()

    def close(self) -> None:
        self.manager.stopping = True
        self.manager.close()

    def _logged_in(self, manager: Manager) -> None:
        log.info("AMI %s: logged in", self.node.name)
        self.metrics.ami_connected.labels(self.node.name).set(1)
        self.connected.set()

    def _disconnected(self, manager: Manager, exc: Exception | None) -> None:
        log.warning("AMI %s: disconnected (%s); panoramisk reconnects", self.node.name, exc)
        self.metrics.ami_connected.labels(self.node.name).set(0)
        self.connected.clear()

    def _event(self, manager: Manager, message) -> None:
        name = message.get("Event", "")
        if name in SECURITY_FAILURES:
            ip, port = _remote(message.get("RemoteAddress", ""))
            event = SecurityEvent(self.node.name, name, message.get("Service", ""), message.get("AccountID", ""),
                                  ip, port)
            self.metrics.asterisk_security_events.labels(self.node.name, name).inc()
            log.info("AMI %s: security event %s from %s (account %r)", self.node.name, name, ip or "?",
                     event.account)
            if self.on_security is not None:
                self.on_security(event)
        elif name == "ContactStatus":
            endpoint = message.get("EndpointName") or message.get("AOR") or "?"
            status = message.get("ContactStatus", "")
            reachable = status in ("Reachable", "Created", "Updated", "NonQualified")
            if status in ("Removed",):
                return
            self.metrics.pjsip_contact_reachable.labels(self.node.name, endpoint).set(1 if reachable else 0)
