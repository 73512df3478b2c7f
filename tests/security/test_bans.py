"""Bans in Redis, field by field and at their limits (real Redis): what is stored, for how
long, what the index says, which ban wins, what is lifted, what a damaged entry becomes.
Pushing them to the edges is tested against a real Kamailio (tests/integration/test_security_edge.py,
test_edge_defence.py)."""
from __future__ import annotations

import pytest

from controller.metrics import Metrics
from controller.security.bans import BANS_INDEX, MAX_BAN_S, REASON_LIMIT, Ban, BanList, ban_key, normalise_ip
from controller.security.trust import BanRefused, TrustedPeers
from controller.state.calls import CallStore
from tests.support.metrics import sample

NOW = 1_800_000_000_000


@pytest.fixture
async def bans(redis_url):
    store = CallStore(redis_url)
    metrics = Metrics()
    yield BanList(store.batch, metrics, edges=[]), store
    await store.aclose()


async def stored(store: CallStore, ip: str) -> dict[str, str]:
    (flat,) = await store.batch.run([("HGETALL", ban_key(ip))])
    return {k.decode(): v.decode() for k, v in zip(flat[::2], flat[1::2])}


async def test_a_ban_is_stored_field_by_field_with_its_expiry_and_index_entry(bans):
    banlist, store = bans
    ban = await banlist.add("192.0.2.7", 120, "too many calls", origin="policy", detector="burst", now_ms=NOW,
                            call_id="c-1", by="ctl-1")
    assert ban == Ban("192.0.2.7", "too many calls", "policy", "burst", NOW, NOW + 120_000, "c-1", "ctl-1")
    assert await stored(store, "192.0.2.7") == {
        "ip": "192.0.2.7", "reason": "too many calls", "origin": "policy", "detector": "burst",
        "created_ms": str(NOW), "expires_ms": str(NOW + 120_000), "call_id": "c-1", "by": "ctl-1"}
    (expire_at,) = await store.batch.run([("PEXPIRETIME", ban_key("192.0.2.7"))])
    assert expire_at == NOW + 120_000  # Redis drops it when it ends
    (score,) = await store.batch.run([("ZSCORE", BANS_INDEX, "192.0.2.7")])
    assert float(score) == NOW + 120_000
    assert await banlist.get("192.0.2.7") == ban
    assert sample(banlist.metrics.registry, "callfabric_bans_total", origin="policy", detector="burst") == 1


async def test_optional_fields_left_out_are_not_stored(bans):
    banlist, store = bans
    ban = await banlist.add("192.0.2.8", 60, "manual", origin="api", detector="manual", now_ms=NOW)
    assert (ban.call_id, ban.by) == (None, None)
    assert set(await stored(store, "192.0.2.8")) == {"ip", "reason", "origin", "detector", "created_ms", "expires_ms"}


@pytest.mark.parametrize("seconds, kept_s", [(0, 1), (-5, 1), (1, 1), (MAX_BAN_S, MAX_BAN_S),
                                             (MAX_BAN_S + 1, MAX_BAN_S), (7.9, 7)])
async def test_ban_durations_are_kept_between_1_second_and_30_days(bans, seconds, kept_s):
    banlist, _ = bans
    ban = await banlist.add("192.0.2.9", seconds, "x", origin="api", detector="manual", now_ms=NOW)
    assert ban.expires_ms - ban.created_ms == kept_s * 1000


async def test_reasons_are_cut_at_the_limit(bans):
    banlist, _ = bans
    ban = await banlist.add("192.0.2.10", 60, "r" * (REASON_LIMIT + 5), origin="api", detector="manual", now_ms=NOW)
    assert ban.reason == "r" * REASON_LIMIT and (await banlist.get("192.0.2.10")).reason == "r" * REASON_LIMIT


async def test_a_longer_ban_stays_an_equal_one_too_a_longer_one_replaces(bans):
    banlist, store = bans
    first = await banlist.add("192.0.2.11", 600, "first", origin="policy", detector="a", now_ms=NOW)
    same_end = await banlist.add("192.0.2.11", 300, "shorter", origin="api", detector="b", now_ms=NOW + 300_000)
    assert same_end == first  # ends at the same moment: the first is kept as it was
    assert banlist.metrics.registry.get_sample_value("callfabric_bans_total", {"origin": "api", "detector": "b"}) \
        is None  # not counted: no new ban
    longer = await banlist.add("192.0.2.11", 601, "longer", origin="api", detector="b", now_ms=NOW)
    assert longer.reason == "longer" and longer.expires_ms == NOW + 601_000
    assert (await stored(store, "192.0.2.11"))["reason"] == "longer"


async def test_a_damaged_previous_ban_is_replaced(bans):
    banlist, store = bans
    await store.batch.run([("HSET", ban_key("192.0.2.12"), "expires_ms", "never")])
    ban = await banlist.add("192.0.2.12", 60, "new", origin="api", detector="manual", now_ms=NOW)
    assert ban.reason == "new" and (await stored(store, "192.0.2.12"))["expires_ms"] == str(NOW + 60_000)


async def test_lifting_removes_the_record_and_the_index_entry(bans):
    banlist, store = bans
    await banlist.add("192.0.2.13", 60, "x", origin="api", detector="manual", now_ms=NOW)
    assert await banlist.remove("192.0.2.13") is True
    assert await store.batch.run([("EXISTS", ban_key("192.0.2.13")), ("ZSCORE", BANS_INDEX, "192.0.2.13")]) == [0, None]
    assert await banlist.remove("192.0.2.13") is False


async def test_active_bans_soonest_first_expired_entries_dropped(bans):
    banlist, store = bans
    import time
    now = int(time.time() * 1000)
    for ip, seconds in (("192.0.2.20", 300), ("192.0.2.21", 60), ("192.0.2.22", 120)):
        await banlist.add(ip, seconds, "x", origin="api", detector="manual", now_ms=now)
    await store.batch.run([("ZADD", BANS_INDEX, now - 1, "192.0.2.99")])  # an index entry that ended
    active = await banlist.active(now)
    assert [b.ip for b in active] == ["192.0.2.21", "192.0.2.22", "192.0.2.20"]
    assert sample(banlist.metrics.registry, "callfabric_bans_active") == 3
    (left,) = await store.batch.run([("ZSCORE", BANS_INDEX, "192.0.2.99")])
    assert left is None  # dropped from the index
    assert [b.ip for b in await banlist.active(now, limit=2)] == ["192.0.2.21", "192.0.2.22"]
    assert await banlist.active(now + 600_000) == []


async def test_an_index_entry_whose_record_has_ended_is_not_active(bans):
    banlist, store = bans
    await store.batch.run([("ZADD", BANS_INDEX, NOW + 60_000, "192.0.2.30"),
                           ("HSET", ban_key("192.0.2.30"), "ip", "192.0.2.30", "expires_ms", NOW - 1)])
    assert await banlist.active(NOW) == []


@pytest.mark.parametrize("flat, expected", [
    (None, None), ([], None),
    ([b"ip", b"192.0.2.1", b"expires_ms", b"5"], Ban("192.0.2.1", "", "?", "?", 0, 5)),
    ([b"ip", b"192.0.2.1"], None), ([b"expires_ms", b"5"], None), ([b"ip", b"x", b"expires_ms", b"soon"], None),
    ([b"ip", b"x", b"expires_ms", b"5", b"created_ms", b"later"], None),
])
def test_stored_bans_are_read_back_or_refused_as_damaged(flat, expected):
    from controller.security.bans import _ban
    assert _ban(flat) == expected


@pytest.mark.parametrize("text, expected", [("192.0.2.1", "192.0.2.1"), (" 192.0.2.1\n", "192.0.2.1"),
                                            ("2001:0db8:0000::1", "2001:db8::1"), ("::ffff:192.0.2.1", "::ffff:c000:201")])
def test_addresses_are_normalised(text, expected):
    assert normalise_ip(text) == expected


@pytest.mark.parametrize("text", ["example.com", "192.0.2.0/24", "", "999.1.1.1"])
def test_what_is_not_an_address_is_refused_with_a_reason(text):
    with pytest.raises(ValueError, match="is not an IP address"):
        normalise_ip(text)


async def test_a_trusted_peer_is_never_banned_and_the_refusal_is_counted(redis_url):
    import ipaddress
    store = CallStore(redis_url)
    metrics = Metrics()
    banlist = BanList(store.batch, metrics, edges=[], trust=TrustedPeers([ipaddress.ip_network("10.0.0.0/8")], []))
    try:
        with pytest.raises(BanRefused, match="trusted peer"):
            await banlist.add("10.1.2.3", 60, "x", origin="policy", detector="d", now_ms=NOW)
        assert sample(metrics.registry, "callfabric_bans_refused_total", origin="policy") == 1
        assert await banlist.get("10.1.2.3") is None
        assert (await banlist.add("192.0.2.1", 60, "x", origin="policy", detector="d", now_ms=NOW)).ip == "192.0.2.1"
    finally:
        await store.aclose()


async def test_a_resync_lifts_bans_of_addresses_trusted_since_and_counts_the_bans_in_force(redis_url):
    import ipaddress
    import time
    store = CallStore(redis_url)
    trust = TrustedPeers([], [])
    banlist = BanList(store.batch, Metrics(), edges=[], trust=trust)
    try:
        now = int(time.time() * 1000)
        await banlist.add("10.9.9.9", 600, "x", origin="policy", detector="d", now_ms=now)
        await banlist.add("192.0.2.40", 600, "x", origin="policy", detector="d", now_ms=now)
        trust.networks = (ipaddress.ip_network("10.0.0.0/8"),)  # the address became a trusted peer
        assert await banlist.resync(now) == 2  # the bans that were in force
        assert await banlist.get("10.9.9.9") is None and await banlist.get("192.0.2.40") is not None
        assert [b.ip for b in await banlist.active(now)] == ["192.0.2.40"]
    finally:
        await store.aclose()
