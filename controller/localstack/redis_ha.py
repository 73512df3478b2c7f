"""Redis in the shapes production runs it, on free loopback ports: a Redis Cluster of N
masters (tests run the call store's suite on it) and a master + replica watched by a
Sentinel (failover tests). Every process is ours and stopped at stop()."""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from controller.localstack.kamailio import free_port
from controller.localstack.redis import REDIS_BIN, RedisServer

REDIS_CLI = str(Path(REDIS_BIN).with_name("redis-cli"))


def _command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One inline command to 127.0.0.1:port; the raw reply (first read)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(" ".join(args).encode() + b"\r\n")
        return s.recv(65536)


class LocalRedisCluster:
    """`masters` redis-server processes in cluster mode, joined with `redis-cli --cluster create`."""

    def __init__(self, workdir: Path | str, masters: int = 3, name: str = "redis-cluster"):
        self.workdir = Path(workdir) / name
        self.nodes = [RedisServer(self.workdir, name=f"node{i}",
                                  extra_args=["--cluster-enabled", "yes",
                                              "--cluster-config-file", f"nodes-{i}.conf",
                                              "--cluster-port", str(free_port()),  # else port + 10000
                                              "--cluster-node-timeout", "2000"])
                      for i in range(masters)]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    def start(self, timeout: float = 20.0) -> "LocalRedisCluster":
        try:
            for node in self.nodes:
                node.start()
            create = subprocess.run([REDIS_CLI, "--cluster", "create", *self.addresses, "--cluster-yes"],
                                    capture_output=True, text=True, timeout=timeout)
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-800:]} {create.stderr[-800:]}")
            deadline = time.monotonic() + timeout
            while not all(b"cluster_state:ok" in _command(n.port, "CLUSTER", "INFO") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def flush(self) -> None:
        for node in self.nodes:
            assert _command(node.port, "FLUSHALL").startswith(b"+OK")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "LocalRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalRedisSentinel:
    """A master, one replica and one Sentinel watching them (quorum 1), for failover tests."""

    def __init__(self, workdir: Path | str, master_name: str = "callfabric", name: str = "redis-sentinel"):
        self.workdir = Path(workdir) / name
        self.master_name = master_name
        self.master = RedisServer(self.workdir, name="master")
        self.replica = RedisServer(self.workdir, name="replica",
                                   extra_args=["--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinel = RedisServer(self.workdir, name="sentinel", sentinel_of=(master_name, self.master.port))

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{self.sentinel.port}"]

    def start(self) -> "LocalRedisSentinel":
        try:
            self.master.start()
            self.replica.start()
            self.sentinel.start()
            self.wait_replicated()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_replicated(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while b"master_link_status:up" not in _command(self.replica.port, "INFO", "replication"):
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not sync with the master")
            time.sleep(0.05)

    def master_port(self) -> int:
        reply = _command(self.sentinel.port, "SENTINEL", "get-master-addr-by-name", self.master_name)
        return int(reply.split(b"\r\n")[4])

    def failover(self, timeout: float = 15.0) -> int:
        """Promote the replica (SENTINEL FAILOVER); returns the new master's port."""
        before = self.master_port()
        assert _command(self.sentinel.port, "SENTINEL", "FAILOVER", self.master_name).startswith(b"+OK")
        deadline = time.monotonic() + timeout
        while (port := self.master_port()) == before:
            if time.monotonic() > deadline:
                raise RuntimeError("the Sentinel did not fail over")
            time.sleep(0.05)
        return port

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.stop()
