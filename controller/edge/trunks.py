"""The edges' trunk table: what Kamailio needs to recognise inbound trunks before any controller
work (source addresses, digest credentials as HA1, transports, media and SRTP modes) and to
send calls out through outbound trunks (credentials for `uac`, From host, caller IDs).

Written by the controller, whenever a policy version starts serving, as a db_text table
(`cftrunk`, loaded by Kamailio's htable module at start and on `htable.reload cftrunk`) in
`edge_trunks_dir`, and pushed to every edge in `edge_rpc`. Passwords are read here, from the
environment variable or file the policy names; inbound ones reach the edge only as
MD5(user:realm:password). A refused policy writes nothing: the edges keep their last table."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Mapping

from controller.edge.rpc import KamailioRpc, RpcError
from controller.metrics import Metrics
from controller.policy.model import Digest, PolicySource
from controller.policy.reload import PolicyHolder, ReloadOutcome

log = logging.getLogger("callfabric.edge")

TABLE = "cftrunk"
_HEADER = "key_name(str) key_type(int) value_type(int) key_value(str) expires(int)\n"
_VERSION = "table_name(str) table_version(int)\ncftrunk:2\n"
RESYNC_S = 30.0


class SecretMissing(Exception):
    pass


def read_secret(digest: Digest, environ: Mapping[str, str], read_file: Callable[[str], str]) -> str:
    """The password a digest names (environment variable or file; one trailing newline dropped)."""
    secret = digest.secret
    if secret.env:
        value = environ.get(secret.env)
        if not value:
            raise SecretMissing(f"environment variable {secret.env} is not set")
        return value
    try:
        value = read_file(secret.file or "")
    except OSError as exc:
        raise SecretMissing(f"cannot read {secret.file}: {exc.strerror or exc}") from None
    value = value[:-1] if value.endswith("\n") else value
    if not value:
        raise SecretMissing(f"{secret.file} is empty")
    return value


def _escape(value: str) -> str:
    if any(ord(c) < 32 for c in value):
        raise ValueError("control characters cannot be stored in the trunk table")
    return value.replace("\\", "\\\\").replace(":", "\\:")


@dataclass(frozen=True, slots=True)
class TrunkTable:
    rows: dict[str, str]
    problems: list[str]  # trunks written without their credentials (they then refuse every attempt)

    def text(self) -> str:
        return _HEADER + "".join(f"{_escape(k)}:0:0:{_escape(v)}:0\n" for k, v in sorted(self.rows.items()))


def build_table(source: PolicySource, realm: str, environ: Mapping[str, str] | None = None,
                read_file: Callable[[str], str] | None = None) -> TrunkTable:
    """The rows of the cftrunk table for a policy (see kamailio/trunks.cfg for how they are read)."""
    environ = os.environ if environ is None else environ
    read_file = read_file or (lambda path: open(path, encoding="utf-8").read())
    rows: dict[str, str] = {"v": source.version, "realm": realm}
    problems: list[str] = []
    sources: dict[str, list[str]] = {}
    nets: list[str] = []

    def password(trunk: str, direction: str, digest: Digest) -> str | None:
        try:
            value = read_secret(digest, environ, read_file)
            _escape(value)
            return value
        except (SecretMissing, ValueError) as exc:
            problems.append(f"trunk {trunk} ({direction}): {exc}")
            return None

    for trunk in source.trunks.values():
        name, inbound, outbound = trunk.name, trunk.inbound, trunk.outbound
        if inbound is not None:
            rows["enforce"] = "1"
            rows[f"media|{name}"] = inbound.media
            rows[f"srtp|{name}"] = inbound.srtp
            if inbound.transports:
                rows[f"tr|{name}"] = "," + ",".join(inbound.transports) + ","
            for net in inbound.sources:
                if net.num_addresses == 1:
                    sources.setdefault(str(net.network_address), []).append(name)
                else:
                    nets.append(f"{net} {name}")
            if inbound.digest is not None:
                user = inbound.digest.username
                rows[f"auth|{name}"] = "1"
                rows[f"user|{user}"] = name
                if not inbound.sources:
                    rows[f"any|{name}"] = "1"
                    rows["digest_any"] = "1"
                secret = password(name, "inbound", inbound.digest)
                if secret is not None:  # no HA1: every attempt fails (closed), and the controller says why
                    rows[f"ha1|{user}"] = hashlib.md5(f"{user}:{realm}:{secret}".encode()).hexdigest()
        if outbound is not None:
            rows[f"out|{name}"] = outbound.transport
            rows[f"oaddr|{name}"] = outbound.address
            if outbound.failover:
                rows[f"ofail|{name}"] = ",".join(outbound.failover)
            rows[f"omedia|{name}"] = outbound.media
            rows[f"osrtp|{name}"] = outbound.srtp
            if outbound.from_host:
                rows[f"ofrom|{name}"] = outbound.from_host
            if outbound.tls_identity():
                rows[f"otls|{name}"] = outbound.tls_identity()
            if outbound.caller_ids:
                rows[f"ocid|{name}"] = ",".join(outbound.caller_ids)
            if outbound.digest is not None:
                user, realm_out = outbound.digest.username, outbound.digest.realm
                rows[f"ouser|{name}"] = user
                secret = password(name, "outbound", outbound.digest)
                if realm_out:  # the carrier's realm is known: the edge keeps only HA1
                    rows[f"orealm|{name}"] = realm_out
                    if secret is not None:
                        rows[f"oha1|{name}"] = hashlib.md5(f"{user}:{realm_out}:{secret}".encode()).hexdigest()
                elif secret is not None:
                    rows[f"opw|{name}"] = secret
    for address, names in sources.items():
        rows[f"ip|{address}"] = "," + ",".join(names) + ","
    for i, net in enumerate(nets):
        rows[f"net|{i}"] = net
    rows["nets"] = str(len(nets))
    return TrunkTable(rows, problems)


def closed_table() -> TrunkTable:
    """What an edge starts with before any controller wrote its table: every source refused
    (Kamailio cannot start without the file; kamailio/docker-entrypoint.sh writes the same)."""
    return TrunkTable({"v": "none", "realm": "callfabric", "enforce": "1", "nets": "0"}, [])


def seed_table(directory: str) -> None:
    """Write the closed table unless a table is there already."""
    if not os.path.exists(os.path.join(directory, TABLE)):
        write_table(directory, closed_table())


def write_table(directory: str, table: TrunkTable) -> None:
    """Atomically replace the db_text files (the table and db_text's version table)."""
    os.makedirs(directory, exist_ok=True)
    for name, text in ((TABLE, table.text()), ("version", _VERSION)):
        target = os.path.join(directory, name)
        try:  # db_text sees a change by the file's mtime in whole seconds: the new one must differ
            previous = int(os.stat(target).st_mtime)
        except OSError:
            previous = None
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            os.chmod(tmp, 0o640)  # inbound secrets are hashes, outbound ones are not: the edge's eyes only
            if previous is not None and int(os.stat(tmp).st_mtime) <= previous:
                os.utime(tmp, (previous + 1, previous + 1))
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class EdgeTrunkPublisher:
    """Keeps every edge's trunk table at the serving policy's version."""

    def __init__(self, directory: str, realm: str, holder: PolicyHolder, metrics: Metrics,
                 rpcs: list[KamailioRpc]):
        self.directory = directory
        self.realm = realm
        self.holder = holder
        self.metrics = metrics
        self.rpcs = rpcs
        self.written: str | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def outcome(self, outcome: ReloadOutcome) -> None:
        if outcome.accepted and outcome.version != self.written:
            self._spawn(self.publish())

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish(self) -> None:
        async with self._lock:
            policy = self.holder.policy
            if policy is None or policy.version == self.written:
                return
            try:
                table = await asyncio.to_thread(build_table, policy.source, self.realm)
                await asyncio.to_thread(write_table, self.directory, table)
            except (OSError, ValueError) as exc:
                self.metrics.edge_trunk_writes.labels("error").inc()
                log.error("could not write the edge trunk table in %s (the edges keep their last one): %s",
                          self.directory, exc)
                return
            for problem in table.problems:
                log.error("%s: its credentials are not in the edge trunk table, so every attempt with them is "
                          "refused", problem)
            self.written = policy.version
            self.metrics.edge_trunk_writes.labels("problems" if table.problems else "ok").inc()
            log.info("edge trunk table %s written to %s (%d trunks)", policy.version, self.directory,
                     len(policy.source.trunks))
        await self.reload_edges()

    async def reload_edges(self, only_stale: bool = False) -> None:
        """Ask every edge to load the table (only those holding another version, when `only_stale`)."""
        for rpc in self.rpcs:
            try:
                if only_stale and self.written is not None:
                    current = await rpc.call("htable.get", TABLE, "v")
                    if isinstance(current, dict) and current.get("item", {}).get("value") == self.written:
                        continue
                await rpc.call("htable.reload", TABLE)
            except (RpcError, OSError, asyncio.TimeoutError) as exc:
                self.metrics.edge_rpc_errors.labels("htable.reload").inc()
                log.warning("edge %s did not reload its trunk table: %s", rpc.url, exc)

    async def run(self) -> None:
        """An edge that restarted loads the file by itself; one that missed a reload is caught here."""
        while True:
            await asyncio.sleep(RESYNC_S)
            await self.reload_edges(only_stale=True)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
