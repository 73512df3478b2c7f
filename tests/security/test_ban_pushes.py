"""What bans ask of the edges, through security's own Edge protocol (security/edges.py): every
edge gets the same block with the seconds the ban has (left), an unblock when it is lifted,
an edge that fails (EdgeError) is counted and keeps no other edge from it, anything else an
edge raises is a bug and is not swallowed. Real Redis; the edges here record what they were
asked. That Kamailio's blocklist does what these calls say is tested against a real Kamailio
(tests/integration/test_security_edge.py)."""
from __future__ import annotations

import pytest

from controller.metrics import Metrics
from controller.security.bans import BANS_INDEX, MAX_BAN_S, BanList, ban_key, normalise_ip
from controller.security.edges import EdgeError
from controller.security.trust import BanRefused, TrustedPeers
from controller.state.calls import CallStore
from tests.support.metrics import sample

NOW = 1_800_000_000_000


class RecordingEdge:
    """An Edge (security/edges.py) that records what it is asked, and fails with `fail` if set."""

    def __init__(self, url: str, media: list[str] | None = None, fail: BaseException | None = None):
        self.url = url
        self.media = media or []
        self.fail = fail
        self.calls: list[tuple] = []

    def _answer(self, call: tuple) -> None:
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    async def block(self, ip: str, seconds: int) -> None:
        self._answer(("block", ip, seconds))

    async def unblock(self, ip: str) -> None:
        self._answer(("unblock", ip))

    async def mark_hot(self, key: str, seconds: int) -> None:
        self._answer(("mark_hot", key, seconds))

    async def media_nodes(self) -> list[str]:
        self._answer(("media_nodes",))
        return self.media


@pytest.fixture
async def store(redis_url):
    store = CallStore(redis_url)
    yield store
    await store.aclose()


def pushes(edge: RecordingEdge) -> list[tuple]:
    return [call for call in edge.calls if call[0] != "media_nodes"]


async def test_a_ban_is_pushed_to_every_edge_with_its_address_and_seconds(store):
    edges = [RecordingEdge("http://a"), RecordingEdge("http://b")]
    banlist = BanList(store.batch, Metrics(), edges)
    await banlist.add(" 2001:db8::0001 ", MAX_BAN_S + 5, "x", origin="api", detector="manual", now_ms=NOW)
    await banlist.add("192.0.2.7", 90, "x", origin="api", detector="manual", now_ms=NOW)
    for edge in edges:
        assert pushes(edge) == [("block", "2001:db8::1", MAX_BAN_S), ("block", "192.0.2.7", 90)]


async def test_an_edge_that_fails_is_counted_and_the_others_still_get_the_ban(store):
    metrics = Metrics()
    down = [RecordingEdge("http://down-1", fail=EdgeError("connection refused")),
            RecordingEdge("http://down-2", fail=EdgeError("timeout"))]
    up = RecordingEdge("http://up")
    banlist = BanList(store.batch, metrics, [down[0], up, down[1]])
    ban = await banlist.add("192.0.2.8", 60, "x", origin="api", detector="manual", now_ms=NOW)
    assert await banlist.get("192.0.2.8") == ban  # recorded: the next resync pushes it again
    assert pushes(up) == [("block", "192.0.2.8", 60)]
    assert sample(metrics.registry, "callfabric_edge_rpc_errors_total", method="block") == 2
    assert await banlist.remove("192.0.2.8") is True
    assert pushes(up)[-1] == ("unblock", "192.0.2.8")
    assert sample(metrics.registry, "callfabric_edge_rpc_errors_total", method="unblock") == 2
    assert sample(metrics.registry, "callfabric_edge_rpc_errors_total", method="block") == 2


async def test_an_edge_raising_anything_but_an_edge_error_is_a_bug_that_is_not_swallowed(store):
    banlist = BanList(store.batch, Metrics(), [RecordingEdge("http://a", fail=RuntimeError("bug"))])
    with pytest.raises(RuntimeError, match="bug"):
        await banlist.add("192.0.2.9", 60, "x", origin="api", detector="manual", now_ms=NOW)
    with pytest.raises(RuntimeError, match="bug"):
        await banlist.remove("192.0.2.9")


async def test_lifting_a_ban_unblocks_at_every_edge_even_one_redis_never_had(store):
    edges = [RecordingEdge("http://a"), RecordingEdge("http://b")]
    banlist = BanList(store.batch, Metrics(), edges)
    assert await banlist.remove("2001:DB8::7") is False  # the edge may have banned it by itself
    for edge in edges:
        assert pushes(edge) == [("unblock", "2001:db8::7")]


@pytest.mark.parametrize("left_ms, pushed_s", [
    (59_000, 59),          # whole seconds stay as they are
    (59_001, 60),          # a started second counts
    (300, 1),              # less than a second: still one
    (2_000_000, 2000),
])
async def test_a_resync_pushes_each_ban_with_the_whole_seconds_it_has_left(store, left_ms, pushed_s):
    edge = RecordingEdge("http://a")
    banlist = BanList(store.batch, Metrics(), [edge])
    await banlist.add("192.0.2.10", 3000, "x", origin="api", detector="manual", now_ms=NOW)
    now = NOW + 3_000_000 - left_ms
    assert await banlist.resync(now) == 1
    assert edge.calls[-1] == ("block", "192.0.2.10", pushed_s)
    assert type(edge.calls[-1][2]) is int


async def test_a_resync_goes_on_after_lifting_the_ban_of_an_address_trusted_since(store):
    import ipaddress
    edge = RecordingEdge("http://a")
    trust = TrustedPeers([], [])
    banlist = BanList(store.batch, Metrics(), [edge], trust=trust)
    await banlist.add("10.0.0.9", 60, "x", origin="api", detector="manual", now_ms=NOW)  # ends first
    await banlist.add("192.0.2.11", 120, "x", origin="api", detector="manual", now_ms=NOW)
    trust.networks = (ipaddress.ip_network("10.0.0.0/8"),)
    edge.calls.clear()
    assert await banlist.resync(NOW) == 2
    assert pushes(edge) == [("unblock", "10.0.0.9"), ("block", "192.0.2.11", 120)]


async def test_a_resync_counts_each_block_an_edge_failed_and_still_pushes_to_the_others(store):
    metrics = Metrics()
    down, up = RecordingEdge("http://down", fail=EdgeError("timeout")), RecordingEdge("http://up")
    banlist = BanList(store.batch, metrics, [down, up])
    await banlist.add("192.0.2.15", 60, "x", origin="api", detector="manual", now_ms=NOW)
    await banlist.add("192.0.2.16", 120, "x", origin="api", detector="manual", now_ms=NOW)
    assert sample(metrics.registry, "callfabric_edge_rpc_errors_total", method="block") == 2
    up.calls.clear()
    assert await banlist.resync(NOW) == 2
    assert pushes(up) == [("block", "192.0.2.15", 60), ("block", "192.0.2.16", 120)]
    assert sample(metrics.registry, "callfabric_edge_rpc_errors_total", method="block") == 4


async def test_at_most_10000_bans_are_read_at_once_those_ending_soonest(store):
    """A flood banning more addresses than that: a resync pushes the first 10,000 to end."""
    banlist = BanList(store.batch, Metrics(), [])
    ips = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(10_001)]
    commands: list[tuple] = []
    for i, ip in enumerate(ips):
        expires = NOW + 60_000 + (10_000 - i)  # the last address ends first, the first one last
        commands += [("HSET", ban_key(ip), "ip", ip, "reason", "x", "origin", "edge", "detector", "flood",
                      "created_ms", NOW, "expires_ms", expires), ("ZADD", BANS_INDEX, expires, ip)]
    await store.batch.run(commands)
    active = await banlist.active(NOW)
    assert len(active) == 10_000
    assert active[0].ip == ips[-1] and ips[0] not in {b.ip for b in active}


async def test_a_banlist_without_trusted_peers_resyncs(store):
    edge = RecordingEdge("http://a")
    banlist = BanList(store.batch, Metrics(), [edge])
    await banlist.add("192.0.2.12", 60, "x", origin="api", detector="manual", now_ms=NOW)
    assert await banlist.resync(NOW) == 1
    assert edge.calls[-1] == ("block", "192.0.2.12", 60)


async def test_the_first_ban_reads_the_edges_media_nodes_before_it_is_made(store):
    edge = RecordingEdge("http://a", media=["sip:192.0.2.50:5060"])
    trust = TrustedPeers([], [edge])
    banlist = BanList(store.batch, Metrics(), [edge], trust=trust)
    with pytest.raises(BanRefused, match="media node"):
        await banlist.add("192.0.2.50", 60, "x", origin="policy", detector="d", now_ms=NOW)
    assert edge.calls == [("media_nodes",)]
    assert await banlist.get("192.0.2.50") is None


async def test_the_ban_record_decides_over_its_index_entry(store):
    """An index entry later than its record (a damaged or foreign write): the record's own
    expiry says whether the ban is in force."""
    banlist = BanList(store.batch, Metrics(), [])
    await banlist.add("192.0.2.13", 60, "x", origin="api", detector="manual", now_ms=NOW)
    await store.batch.run([("ZADD", BANS_INDEX, NOW + 600_000, "192.0.2.13")])
    assert [b.ip for b in await banlist.active(NOW + 59_999)] == ["192.0.2.13"]
    assert await banlist.active(NOW + 60_000) == []


async def test_a_ban_field_that_is_not_utf8_is_read_with_replacement_characters(store):
    banlist = BanList(store.batch, Metrics(), [])
    await banlist.add("192.0.2.14", 60, "x", origin="api", detector="manual", now_ms=NOW)
    await store.batch.run([("HSET", ban_key("192.0.2.14"), "reason", b"bad \xff\xfe")])
    assert (await banlist.get("192.0.2.14")).reason == "bad \ufffd\ufffd"
    assert [b.reason for b in await banlist.active(NOW)] == ["bad \ufffd\ufffd"]


def test_an_address_that_is_not_one_is_named_in_the_error_up_to_64_characters():
    with pytest.raises(ValueError) as raised:
        normalise_ip("x" * 100)
    assert str(raised.value) == repr("x" * 64) + " is not an IP address"
