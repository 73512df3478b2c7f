"""Where the call state lives: one Redis, a Redis Cluster, or a Sentinel-managed master, as
configured. Everything that talks to Redis gets its connections from a RedisTarget, so the
rest of the code does not care which one it is."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from controller.state.batch import Address, Batcher, RespConnection
from controller.state.cluster import ClusterBatcher

MODES = ("single", "cluster", "sentinel")


def _retry() -> dict[str, Any]:
    """A pooled connection that died with its server (a restart, a failover) is retried on a
    new one at once, rather than failing the first request after Redis is back."""
    return {"retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            "retry_on_error": [RedisConnectionError, TimeoutError]}


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """`single`: the Redis at `url`. `cluster`: the Redis Cluster that `nodes` belong to.
    `sentinel`: the master the Sentinels at `nodes` name `master_name`. In the last two,
    `url` only gives the credentials (user, password) and, for Sentinel, the database."""

    mode: str = "single"
    url: str = "redis://127.0.0.1:6379/0"
    nodes: tuple[str, ...] = ()
    master_name: str = "callfabric"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"redis_mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode != "single" and not self.nodes:
            raise ValueError(f"redis_mode {self.mode} needs redis_nodes (host:port, a list)")
        for node in self.nodes:
            host_port(node)
        if self.mode == "cluster" and int(parse_url(self.url).get("db", 0) or 0):
            raise ValueError("Redis Cluster has only database 0: remove the /db from redis_url")

    @classmethod
    def of(cls, target: "RedisTarget | str") -> "RedisTarget":
        return target if isinstance(target, RedisTarget) else cls(url=target)

    def describe(self) -> str:
        """For log lines and errors (any password masked)."""
        if self.mode == "cluster":
            return f"Redis Cluster at {','.join(self.nodes)}"
        if self.mode == "sentinel":
            return f"Redis master {self.master_name!r} of the Sentinels at {','.join(self.nodes)}"
        return "Redis at " + re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", self.url)

    def _credentials(self) -> dict[str, Any]:
        p = parse_url(self.url)
        return {k: p[k] for k in ("username", "password") if p.get(k)}

    def client(self, timeout_s: float = 2.0) -> Any:
        """A redis-py client for what does not ride the pipelines (listings, admin, blocking
        reads). No per-reply socket timeout: BLPOP waits on purpose."""
        if self.mode == "cluster":
            return RedisCluster(startup_nodes=[ClusterNode(*host_port(n)) for n in self.nodes],
                                socket_connect_timeout=timeout_s, socket_timeout=None, **self._credentials())
        if self.mode == "sentinel":
            return self._sentinel(timeout_s).master_for(self.master_name, socket_connect_timeout=timeout_s,
                                                        db=int(parse_url(self.url).get("db", 0) or 0),
                                                        **self._credentials(), **_retry())
        return Redis.from_url(self.url, socket_connect_timeout=timeout_s, **_retry())

    def subscriber(self, timeout_s: float = 2.0) -> Redis:
        """A client for SUBSCRIBE. In a cluster any node hears every PUBLISH; a random one
        spreads the subscribers and survives the loss of one (the caller reconnects)."""
        if self.mode == "cluster":
            host, port = host_port(random.choice(self.nodes))
            return Redis(host=host, port=port, socket_connect_timeout=timeout_s, **self._credentials(), **_retry())
        return self.client(timeout_s)

    def batcher(self, timeout_s: float = 2.0) -> Batcher:
        """The pipelining connection of the call path (batch.py, cluster.py)."""
        if self.mode == "cluster":
            return ClusterBatcher(self.url, [host_port(n) for n in self.nodes], timeout_s=timeout_s)
        if self.mode == "sentinel":
            return Batcher(self.url, timeout_s=timeout_s, address=self._master_address(timeout_s))
        return Batcher(self.url, timeout_s=timeout_s)

    def _sentinel(self, timeout_s: float) -> Sentinel:
        return Sentinel([host_port(n) for n in self.nodes], socket_connect_timeout=timeout_s)

    def _master_address(self, timeout_s: float) -> Address:
        sentinels = [host_port(n) for n in self.nodes]

        async def address() -> tuple[str, int]:
            problems = []
            for host, port in sentinels:
                connection = RespConnection(f"redis://{host}:{port}/0", connect_timeout=timeout_s)
                try:
                    (reply,) = await connection.execute([("SENTINEL", "get-master-addr-by-name", self.master_name)],
                                                        timeout_s)
                except RedisError as exc:
                    problems.append(f"{host}:{port}: {exc}")
                    continue
                finally:
                    connection.close()
                if isinstance(reply, list) and len(reply) == 2:
                    return reply[0].decode(), int(reply[1])
                problems.append(f"{host}:{port}: no master named {self.master_name!r}")
            raise RedisConnectionError("no Sentinel named the master: " + "; ".join(problems))
        return address
