"""A controller never starts without a policy it served before (controller/policy/lastgood.py):
every version served from the files is kept in Redis and in a local file; a controller whose
files are refused at start serves the newest copy, says so (log, metric, /healthz), and goes
back to its files once they load. Real Redis."""
from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from controller.app import METRICS, POLICIES, build_app
from controller.config import Settings
from controller.localstack.kamailio import free_port
from controller.policy import policy_from_texts
from controller.policy.canonical import DocumentInvalid
from controller.policy.lastgood import LastGood, Saved, unpack
from controller.state.policycopy import LAST_GOOD_KEY, PolicyCopy
from tests.policy.helpers import DECLARATIONS, call

RULES = textwrap.dedent("""\
    rules:
      - name: premium
        match: {destination_risk: premium}
        actions: [reject: {code: 403, reason: Destination Blocked}]
    """)


@pytest.fixture
async def redis_client(redis_url):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


def policy(rules: str = RULES):
    return policy_from_texts({"00-decl.yaml": DECLARATIONS, "10-rules.yaml": rules})


async def test_kept_in_redis_and_in_a_file_and_the_newest_copy_is_restored(tmp_path, redis_client):
    copy = PolicyCopy(redis_client)
    path = tmp_path / "last-good.json"
    writes = []
    keeper = LastGood("c1", str(path), redis_save=copy.save, redis_load=copy.load,
                      on_write=lambda where, ok: writes.append((where, ok)))
    first = await asyncio.to_thread(policy)
    await keeper.keep(first)
    await keeper.keep(first)  # the same version: kept once
    assert writes == [("redis", True), ("file", True)]
    stored = unpack(await redis_client.get(LAST_GOOD_KEY), "redis")
    assert stored.version == first.version and stored.by == "c1"
    assert await asyncio.to_thread(path.read_bytes) == stored.pack()

    saved, restored = await LastGood("c2", str(path), redis_save=copy.save, redis_load=copy.load).restore()
    assert restored.version == first.version and restored.source == first.source
    assert restored.decide(call(to_user="09090000000")).reject_code == 403

    # another controller kept a newer version in Redis only (its file is elsewhere)
    second = await asyncio.to_thread(policy, RULES.replace("403", "480"))
    await LastGood("c3", "", redis_save=copy.save, redis_load=copy.load).keep(second)
    saved, restored = await LastGood("c2", str(path), redis_save=copy.save, redis_load=copy.load).restore()
    assert (saved.where, restored.version) == ("redis", second.version)
    # Redis emptied (a new Redis): the file still has one
    await redis_client.flushall()
    saved, restored = await LastGood("c2", str(path), redis_save=copy.save, redis_load=copy.load).restore()
    assert saved.where == f"file {path}" and restored.version == first.version


async def test_damaged_copies_are_skipped_and_none_means_none(tmp_path, redis_client, caplog):
    copy = PolicyCopy(redis_client)
    path = tmp_path / "last-good.json"
    good = await asyncio.to_thread(policy)
    await LastGood("c1", str(path), redis_save=copy.save, redis_load=copy.load).keep(good)
    data = await redis_client.get(LAST_GOOD_KEY)
    await redis_client.set(LAST_GOOD_KEY, data.replace(b"Destination Blocked", b"Destination Opened"))
    saved, restored = await LastGood("c2", str(path), redis_save=copy.save, redis_load=copy.load).restore()
    assert saved.where.startswith("file")  # the damaged Redis copy was passed over
    assert "checksum does not match" in caplog.text
    await asyncio.to_thread(path.write_bytes, b"garbage")
    assert await LastGood("c2", str(path), redis_save=copy.save, redis_load=copy.load).restore() is None
    await redis_client.delete(LAST_GOOD_KEY)
    assert await LastGood("c2", "", redis_save=copy.save, redis_load=copy.load).restore() is None


def test_a_copy_names_its_version():
    good = policy()
    from controller.policy.canonical import encode
    saved = Saved("not-" + good.version, 1, "c", encode(good.source))
    with pytest.raises(DocumentInvalid, match="version"):
        unpack(saved.pack(), "x").source()


async def test_redis_down_at_start_still_restores_from_the_file(tmp_path, redis_client):
    path = tmp_path / "last-good.json"
    good = await asyncio.to_thread(policy)
    await LastGood("c1", str(path), redis_save=PolicyCopy(redis_client).save).keep(good)
    down = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.3)
    copy = PolicyCopy(down, timeout_s=1.0)
    try:
        keeper = LastGood("c2", str(path), redis_save=copy.save, redis_load=copy.load)
        saved, restored = await keeper.restore()
        assert restored.version == good.version and saved.where.startswith("file")
    finally:
        await down.aclose()


# -- the controller -----------------------------------------------------------------------------
class App:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = build_app(settings)
        self.runner = web.AppRunner(self.app)

    async def __aenter__(self) -> "App":
        await self.runner.setup()
        host, port = self.settings.http_listen.split(":")
        await web.TCPSite(self.runner, host, int(port)).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def health(self) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{self.settings.http_listen}/healthz") as response:
                return response.status, await response.json()

    def metric(self, name: str, **labels) -> float:
        return self.app[METRICS].registry.get_sample_value(name, labels) or 0.0


async def test_a_controller_restarted_with_a_broken_policy_file_serves_the_last_good_one(tmp_path, redis_url,
                                                                                          caplog):
    caplog.set_level(logging.ERROR, "callfabric")
    policies = tmp_path / "policies"
    await asyncio.to_thread(policies.mkdir)
    await asyncio.to_thread((policies / "00-decl.yaml").write_text, DECLARATIONS)
    await asyncio.to_thread((policies / "10-rules.yaml").write_text, RULES)

    def settings() -> Settings:
        return Settings(policy_dir=str(policies), policy_poll_s=0.2, redis_url=redis_url,
                        edge_evapi=[f"127.0.0.1:{free_port()}"], http_listen=f"127.0.0.1:{free_port()}",
                        policy_last_good_file=str(tmp_path / "last-good.json"), instance_id="first")

    async with App(settings()) as first:
        served = first.app[POLICIES].policy.version
        for _ in range(50):  # kept in the background
            if first.metric("callfabric_policy_last_good_writes_total", where="redis", result="ok"):
                break
            await asyncio.sleep(0.05)
        assert first.metric("callfabric_policy_last_good") == 0
        status, body = await first.health()
        assert body["policy"] == {"version": served, "from": "files", "files": "ok", "errors": []}

    # a broken file arrives while no controller runs
    await asyncio.to_thread((policies / "10-rules.yaml").write_text, "rules:\n  - name: x\n    match: [\n")
    async with App(settings()) as second:
        holder = second.app[POLICIES]
        assert holder.policy.version == served and holder.origin == "last-good (redis)"
        assert holder.policy.decide(call(to_user="09090000000")).reject_code == 403
        assert second.metric("callfabric_policy_last_good") == 1
        status, body = await second.health()
        assert status == 503 and body["status"] == "degraded"
        assert body["policy"]["version"] == served and body["policy"]["from"] == "last-good (redis)"
        assert body["policy"]["files"] == "refused" and body["policy"]["errors"][0].startswith("10-rules.yaml:")
        assert f"SERVING THE LAST GOOD POLICY {served}" in caplog.text

        # the files are fixed: they serve again
        fixed = RULES.replace("Destination Blocked", "Premium Blocked")
        await asyncio.to_thread((policies / "10-rules.yaml").write_text, fixed)
        for _ in range(100):
            if holder.origin == "files":
                break
            await asyncio.sleep(0.05)
        assert holder.origin == "files" and holder.policy.version != served
        assert second.metric("callfabric_policy_last_good") == 0
        status, body = await second.health()
        assert body["policy"]["files"] == "ok" and body["policy"]["from"] == "files"


async def test_with_nothing_served_before_a_broken_start_has_no_policy_and_says_so(tmp_path, redis_url, caplog):
    policies = tmp_path / "policies"
    await asyncio.to_thread(policies.mkdir)
    await asyncio.to_thread((policies / "10-rules.yaml").write_text, "rules: [")
    settings = Settings(policy_dir=str(policies), redis_url=redis_url, edge_evapi=[f"127.0.0.1:{free_port()}"],
                        http_listen=f"127.0.0.1:{free_port()}")
    async with App(settings) as app:
        assert app.app[POLICIES].policy is None
        status, body = await app.health()
        assert status == 503 and body["policy"]["version"] is None and body["policy"]["files"] == "refused"
    assert "NO POLICY" in caplog.text
    assert json.loads(json.dumps(body))  # (a JSON body, not a stack trace)
