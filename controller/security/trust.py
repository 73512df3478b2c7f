"""Trusted peers: addresses no ban may ever hit. A ban by IP on a media node or a carrier's SBC
would drop their BYEs and new calls alike (a spoofed scanner User-Agent from a media node's
address was enough): the media nodes every edge routes to (its dispatcher destinations, read
over JSON-RPC) and the subnets of the `trusted_peers` setting are refused by BanList.add,
whoever asks. kamailio.cfg keeps the same rule on its side (route[TRUSTED_SRC]: dispatcher
destinations and TRUSTED_NET)."""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Iterable

from controller.security.edges import Edge, EdgeError

log = logging.getLogger("callfabric.security")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class BanRefused(ValueError):
    """A ban that would hit a trusted peer (the message says which and why)."""


def parse_networks(texts: Iterable[str], setting: str = "trusted_peers") -> tuple[IPNetwork, ...]:
    """'10.0.0.5', '10.0.0.0/24', '2001:db8::/32' → networks; ValueError naming the bad one."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{setting}: {text!r} is not an IP address or subnet") from None
    return tuple(networks)


def _sip_host(uri: str) -> str | None:
    """'sip:10.0.0.5:5060;transport=udp' → '10.0.0.5' ('[::1]' forms too)."""
    rest = uri.split(":", 1)[1] if ":" in uri else uri
    rest = rest.split(";", 1)[0].rsplit("@", 1)[-1]
    if rest.startswith("["):
        return rest[1:rest.find("]")] if "]" in rest else None
    return rest.split(":", 1)[0] or None


class TrustedPeers:
    def __init__(self, networks: Iterable[IPNetwork], edges: list[Edge]):
        self.networks = tuple(networks)
        self.edges = edges
        self.media: dict[str, str] = {}  # media node IP -> where it was seen ("sip:… at <edge>")
        self.complete = not edges  # every edge's media nodes were read at least once

    def why(self, ip: str) -> str | None:
        """Why `ip` may never be banned, or None when it may."""
        address = ipaddress.ip_address(ip)
        if ip in self.media:
            return f"it is a media node ({self.media[ip]})"
        for network in self.networks:
            if address in network:
                return f"it is a trusted peer (trusted_peers {network})"
        return None

    def check(self, ip: str) -> None:
        reason = self.why(ip)
        if reason is not None:
            raise BanRefused(f"{ip} cannot be banned: {reason}; bans would cut its calls")

    async def refresh(self) -> None:
        """Read every edge's media nodes (dispatcher destinations), names resolved. An edge
        that does not answer keeps what was read from it before."""
        found: dict[str, str] = {}
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(edge.media_nodes() for edge in self.edges), return_exceptions=True)
        reachable = 0
        for edge, result in zip(self.edges, results):
            if isinstance(result, EdgeError):
                log.warning("trusted peers: media nodes of %s unknown: %s", edge.url, result)
                continue
            if isinstance(result, BaseException):
                raise result
            reachable += 1
            for uri in result:
                host = _sip_host(uri)
                if not host:
                    continue
                try:
                    addresses = [str(ipaddress.ip_address(host))]
                except ValueError:
                    try:
                        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
                    except OSError as exc:
                        log.warning("trusted peers: cannot resolve media node %s: %s", uri, exc)
                        continue
                    addresses = [str(ipaddress.ip_address(info[4][0])) for info in infos]
                for address in addresses:
                    found.setdefault(address, f"{uri} at {edge.url}")
        if reachable == len(self.edges):
            self.media, self.complete = found, True
        elif reachable:
            self.media = {**self.media, **found}
