"""Wiring: the only module that knows every boundary. An aiohttp application whose
long-lived parts (Redis, the policy, the edge channels, housekeeping) are started and
stopped by `cleanup_ctx`, with typed state under AppKeys."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import AsyncIterator

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from controller.api import routes as api
from controller.api.commands import CallControl, Forwarding
from controller.api.events import EventHub, matches, public_event
from controller.api.phone import PhonePage, phone_routes
from controller.media.rtpengine import RtpengineClient
from controller.api.webhooks import WebhookSender
from controller.config import ConfigError, Settings, parse_ari_node, redis_target, split_host_port, trusted_networks
from controller.edge.channel import EdgeChannel
from controller.edge.decisions import STATE_UNAVAILABLE_MODES, EdgeDecisions
from controller.edge.publish import EdgePolicyPublisher
from controller.edge.reconcile import DialogReconciler
from controller.edge.recorder import EdgeRecorder
from controller.edge.rpc import KamailioRpc
from controller.edge.trunks import EdgeTrunkPublisher
from controller.media.ami import AmiWatcher, parse_ami_node
from controller.media.ari import AriClient
from controller.lifecycle import Lifecycle
from controller.media.health import MediaHealth
from controller.media.ownership import NodeOwnership
from controller.media.features.recording import prune as prune_recordings
from controller.media.plane import Endpoint, MediaPlane
from controller.metrics import Metrics
from controller.policy.lastgood import LastGood
from controller.policy.reload import PolicyHolder, ReloadOutcome, reload_on_sighup
from controller.security.bans import BanList
from controller.security.hot import HotScopes
from controller.security.guard import SecurityGuard
from controller.security.trust import TrustedPeers
from controller.state.calls import CallStore, now_ms
from controller.state.policycopy import PolicyCopy
from controller.state.inbox import NodeInbox
from controller.state.journal import Journal
from controller.state.leases import NodeLeases

log = logging.getLogger("callfabric")

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", CallStore)
POLICIES = web.AppKey("policies", PolicyHolder)
EDGES = web.AppKey("edges", list)
RECORDER = web.AppKey("recorder", EdgeRecorder)
EDGE_RPCS = web.AppKey("edge_rpcs", list)  # KamailioRpc per edge_rpc endpoint
MEDIA = web.AppKey("media", MediaPlane)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)
BANS = web.AppKey("bans", BanList)
HOT = web.AppKey("hot", HotScopes)
GUARD = web.AppKey("guard", SecurityGuard)
LEASES = web.AppKey("leases", NodeLeases)
INBOX = web.AppKey("inbox", NodeInbox)
OWNERSHIPS = web.AppKey("ownerships", list)  # NodeOwnership per configured media node
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
DRAINED = web.AppKey("drained", asyncio.Event)  # set when a drain is over: the process may exit
POLICY_LISTENERS = web.AppKey("policy_listeners", list)  # called with each ReloadOutcome, on the loop
EDGE_RPCS = web.AppKey("edge_rpcs", list)  # KamailioRpc per edge_rpc endpoint

HOUSEKEEPING_INTERVAL_S = 5.0
LIVE_RECONCILE_AGE_MS = 60_000
RECORDING_RETENTION_INTERVAL_S = 3600
DIALOG_RECONCILE_S = 60.0


async def cancel_tasks(*tasks: asyncio.Task) -> None:
    """Cancel background loops and wait until they are over. A cancellation can be lost on
    Python 3.11 (asyncio.wait_for swallows it when its inner future finishes at the same
    moment, e.g. inside a Redis call): then the loop would run on, and the controller never
    stop. So it is repeated until each task is done."""
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.5)


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    target = redis_target(settings)
    store = CallStore(target, timeline_max_events=settings.timeline_max_events,
                      call_retention_s=settings.call_retention_s, live_call_ttl_s=settings.live_call_ttl_s,
                      outage_queue_max=settings.redis_outage_queue_max, observe_outage=app[METRICS].redis_outage)
    app[STORE] = store
    app[LEASES] = NodeLeases(store.batch, settings.instance_id, settings.lease_ttl_s)
    app[INBOX] = NodeInbox(store.batch, store.redis)
    try:
        await store.ping()
    except (RedisError, OSError) as exc:
        log.error("%s is unreachable (%s): decisions are %s until it is back", target.describe(), exc,
                  settings.redis_outage_decisions)
    yield
    await store.aclose()


async def _policy_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    publisher: EdgePolicyPublisher | None = None

    listeners: list = []
    app[POLICY_LISTENERS] = listeners

    copy = PolicyCopy(app[STORE].redis)
    last_good = LastGood(settings.instance_id, settings.policy_last_good_file, redis_save=copy.save,
                         redis_load=copy.load,
                         on_write=lambda where, ok: metrics.policy_last_good_writes.labels(where, "ok" if ok else
                                                                                           "error").inc())
    keeping: set[asyncio.Task] = set()

    def on_outcome(outcome: ReloadOutcome) -> None:
        metrics.policy_outcome(outcome)
        metrics.policy_last_good.set(1 if holder.policy is not None and holder.origin != "files" else 0)
        if publisher is not None:
            publisher.outcome(outcome)
        if outcome.accepted and holder.origin == "files" and holder.policy is not None:
            task = asyncio.get_running_loop().create_task(last_good.keep(holder.policy))
            keeping.add(task)
            task.add_done_callback(keeping.discard)
        for listener in listeners:
            listener(outcome)

    holder = PolicyHolder(settings.policy_dir, on_outcome)
    if settings.edge_policy_file:
        publisher = EdgePolicyPublisher(settings.edge_policy_file, settings.edge_policy_key_file, holder, metrics)
    app[POLICIES] = holder
    outcome = await holder.reload("start")
    if not outcome.accepted:
        await _restore_last_good(holder, last_good, settings)
    reload_on_sighup(holder)
    watcher = asyncio.create_task(holder.watch(settings.policy_poll_s))
    yield
    await cancel_tasks(watcher)
    if keeping:
        await asyncio.gather(*list(keeping), return_exceptions=True)
    if publisher is not None:
        await publisher.close()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


async def _restore_last_good(holder: PolicyHolder, last_good: LastGood, settings: Settings) -> None:
    """The files are refused at start: serve the last policy this deployment served, never
    nothing (with nothing, every call would get the edge's fallback, rejects included)."""
    errors = "; ".join(str(i) for i in holder.files_issues[:3]) + (" …" if len(holder.files_issues) > 3 else "")
    restored = await last_good.restore()
    if restored is None:
        log.error("the policy files in %s are refused (%s) and no policy was served before (no last good copy in "
                  "Redis%s): NO POLICY — every call gets the edge's fallback until valid files load",
                  settings.policy_dir, errors, f" nor {settings.policy_last_good_file}"
                  if settings.policy_last_good_file else "")
        return
    saved, policy = restored
    await holder.restore(policy, f"last-good ({saved.where})")
    log.error("the policy files in %s are refused (%s): SERVING THE LAST GOOD POLICY %s, kept by %s at %s from %s, "
              "until valid files load", settings.policy_dir, errors, policy.version, saved.by,
              time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved.saved_ms / 1000)), saved.where)


def _webhook_target(settings: Settings, holder: PolicyHolder):
    """Where a call's events go: its agent's webhook, else the controller's webhook_url;
    decided at the call's first event and kept for the call (an agent change mid-call does
    not split a call's events across applications)."""
    sticky: dict[str, str] = {}
    patterns = tuple(settings.webhook_events)

    def url_for(event: dict) -> str | None:
        call_id = event["call_id"]
        if call_id not in sticky:
            agent_name = event["data"].get("agent") or (event["data"].get("target")
                                                        if event["data"].get("outcome") == "agent" else None)
            policy = holder.policy
            agent = policy.source.agents.get(agent_name) if policy and agent_name else None
            sticky[call_id] = (agent.webhook if agent and agent.webhook else None) or settings.webhook_url
        url = sticky[call_id]
        if event["type"] == "call.ended":
            sticky.pop(call_id, None)
        return url if url and matches(event, None, patterns) else None
    return url_for


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    sender = WebhookSender(settings.webhook_secret, metrics, _webhook_target(settings, app[POLICIES]))
    app[WEBHOOKS] = sender

    def on_event(raw: dict) -> None:
        event = public_event(raw)
        if event is not None:
            sender.publish(event)
    app[STORE].listeners.append(on_event)
    holder = app[POLICIES]
    agent_webhooks = ["", False]  # (policy version, whether an agent of it has a webhook)

    def wants_events() -> bool:
        """A webhook can be sent: a controller-wide URL, or an agent of the policy has one."""
        policy = holder.policy
        if settings.webhook_url or policy is None:
            return bool(settings.webhook_url)
        if agent_webhooks[0] != policy.version:
            agent_webhooks[:] = [policy.version, any(a.webhook for a in policy.source.agents.values())]
        return agent_webhooks[1]
    app[STORE].wants_events = wants_events
    if (settings.webhook_url or settings.webhook_events) and not settings.webhook_secret:
        log.warning("webhook_secret is empty: webhooks are sent with a signature nobody can trust")
    yield
    await sender.close()


async def _security_ctx(app: web.Application) -> AsyncIterator[None]:
    """Bans (Redis + every edge's blocklist, resynced periodically) and the guard the edge
    and the AMI watchers report to."""
    settings, metrics, store = app[SETTINGS], app[METRICS], app[STORE]
    for url in settings.edge_rpc:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"setting edge_rpc: {url!r} is not http://host:port/RPC")
    trusted = trusted_networks(settings)
    session = aiohttp.ClientSession()
    edges = [KamailioRpc(url, session) for url in settings.edge_rpc]
    app[EDGE_RPCS] = edges
    bans = BanList(store.batch, metrics, edges, TrustedPeers(trusted, edges))
    app[HOT] = HotScopes(edges, metrics)
    guard = SecurityGuard(store, bans, metrics, lambda: app[POLICIES].policy, settings.instance_id, hot=app[HOT])
    app[BANS], app[GUARD] = bans, guard
    if not settings.edge_rpc:
        log.warning("edge_rpc is empty: bans are recorded but no edge enforces them")

    async def resync() -> None:
        while True:
            try:
                await bans.resync(now_ms())
            except (RedisError, OSError) as exc:
                log.warning("bans: resync failed: %s", exc)
            await asyncio.sleep(settings.ban_resync_s)

    task = asyncio.create_task(resync())
    yield
    await cancel_tasks(task)
    await guard.close()
    await app[HOT].close()
    await session.close()


async def _trunks_ctx(app: web.Application) -> AsyncIterator[None]:
    """The edges' trunk table (controller/edge/trunks.py), rewritten with every policy version."""
    settings = app[SETTINGS]
    if not settings.edge_trunks_dir:
        yield
        return
    publisher = EdgeTrunkPublisher(settings.edge_trunks_dir, settings.edge_realm, app[POLICIES], app[METRICS],
                                   app[EDGE_RPCS])
    await publisher.publish()
    app[POLICY_LISTENERS].append(publisher.outcome)
    task = asyncio.create_task(publisher.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await publisher.close()


async def _edge_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, metrics, holder = app[SETTINGS], app[METRICS], app[POLICIES]
    if settings.redis_outage_decisions not in STATE_UNAVAILABLE_MODES:
        raise ConfigError(f"setting redis_outage_decisions: expected one of {', '.join(STATE_UNAVAILABLE_MODES)}")
    decisions = EdgeDecisions(lambda: holder.policy, app[STORE], metrics, settings.instance_id,
                              ask_webhook=app[WEBHOOKS].ask, decision_budget_ms=settings.edge_decision_budget_ms,
                              security=app[GUARD], state_unavailable=settings.redis_outage_decisions,
                              hot=app[HOT])
    recorder = EdgeRecorder(decisions, Journal(app[STORE]), metrics, leases=app[LEASES], security=app[GUARD],
                            batch_max=settings.edge_events_batch,
                            linger_s=settings.edge_events_linger_ms / 1000)
    app[RECORDER] = recorder
    channels = []
    for endpoint in settings.edge_evapi:
        host, port = split_host_port(endpoint, "edge_evapi")
        channels.append(EdgeChannel(host, port, decisions, recorder, metrics, max_in_flight=settings.edge_max_in_flight,
                                    reconnect_max_s=settings.edge_reconnect_max_s))
    app[EDGES] = channels
    tasks = [asyncio.create_task(c.run(), name=f"edge {c.name}") for c in channels]
    tasks.append(asyncio.create_task(recorder.run_local(), name="edge events (evapi)"))
    for edge in settings.edge_streams:  # (names checked with the other settings: config.check_settings)
        tasks.append(asyncio.create_task(recorder.run_stream(edge, settings.lease_poll_s), name=f"edge events {edge}"))
    yield
    await cancel_tasks(*tasks)
    await asyncio.gather(*(c.drain() for c in channels), return_exceptions=True)


def _endpoint_resolver(holder: PolicyHolder, section: str):
    """Agents and fork targets are declared in the serving policy; look them up by name."""
    def resolve(name: str) -> Endpoint | None:
        policy = holder.policy
        declared = getattr(policy.source, section).get(name) if policy else None
        if declared is None:
            return None
        return Endpoint(declared.name, declared.endpoint, declared.transport, declared.codec)
    return resolve


async def _media_ctx(app: web.Application) -> AsyncIterator[None]:
    """ARI clients for the configured Asterisk nodes and the media plane serving them."""
    settings, metrics = app[SETTINGS], app[METRICS]
    nodes = [parse_ari_node(text) for text in settings.ari_nodes]

    def observe(operation: str, seconds: float, status: int) -> None:
        metrics.ari_request_seconds.labels(operation).observe(seconds)
        if status == 0 or status >= 400:
            metrics.ari_request_errors.labels(operation).inc()

    clients = {n.name: AriClient(n, settings.ari_app, observe=observe) for n in nodes}
    plane = MediaPlane(clients, app[STORE], metrics,
                       resolve_agent=_endpoint_resolver(app[POLICIES], "agents"),
                       resolve_fork_target=_endpoint_resolver(app[POLICIES], "fork_targets"),
                       edge_endpoint=settings.ari_edge_endpoint, instance_id=settings.instance_id,
                       api_base_url=settings.api_base_url, recording_dir=settings.recording_dir,
                       rtpengines=[RtpengineClient(address) for address in settings.rtpengine_ng],
                       fork_mode=settings.fork_mode)
    app[MEDIA] = plane
    # One controller at a time owns each node's events (a lease); any takes commands for any
    # call and has the owner carry them out (api.CONTROL is set up after this context).
    ownerships = [NodeOwnership(name, plane, app[LEASES], metrics, poll_s=settings.lease_poll_s, inbox=app[INBOX],
                                handle_command=lambda request: app[api.CONTROL].run_forwarded(request))
                  for name in clients]
    app[OWNERSHIPS] = ownerships
    tasks = [asyncio.create_task(o.run(), name=f"ownership {o.node}") for o in ownerships]
    if clients:
        tasks.append(asyncio.create_task(MediaHealth(plane, settings.media_health_interval_s,
                                                                settings.one_way_audio_after_s).run()))
    watchers = []
    for text in settings.ami_nodes:
        try:
            watchers.append(AmiWatcher(parse_ami_node(text), metrics, on_security=app[GUARD].asterisk_event))
        except ValueError as exc:
            raise ConfigError(f"setting ami_nodes: {exc}") from None
    for watcher in watchers:
        watcher.start()
    yield
    for watcher in watchers:
        watcher.close()
    await cancel_tasks(*tasks)
    await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)
    for rtpengine in plane.rtpengines:
        rtpengine.close()


async def _lifecycle_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serving, draining (SIGTERM, POST /v1/admin/drain), drained: see lifecycle.py."""
    settings = app[SETTINGS]
    app[DRAINED] = asyncio.Event()
    lifecycle = Lifecycle(settings.instance_id, app[EDGES], app[OWNERSHIPS], app[STORE], app[METRICS],
                          timeout_s=settings.drain_timeout_s, on_drained=app[DRAINED].set)
    app[LIFECYCLE] = lifecycle
    yield
    await lifecycle.close()


async def _api_ctx(app: web.Application) -> AsyncIterator[None]:
    """Services behind the /v1 API: call control over the media plane, the events hub."""
    store = app[STORE]
    hub = EventHub(store.target.subscriber)
    app[api.CONTROL] = CallControl(app[MEDIA], store, lambda: app[POLICIES].policy,
                                   outbound_trunk=app[SETTINGS].outbound_trunk,
                                   forwarding=Forwarding(app[LEASES], app[INBOX], app[METRICS]),
                                   ask_webhook=app[WEBHOOKS].ask)
    app[api.HUB] = hub
    app[api.STORE] = app[STORE]
    app[api.POLICIES] = app[POLICIES]
    app[api.BANS] = app[BANS]
    app[api.ADMIN] = app[LIFECYCLE]
    settings = app[SETTINGS]
    app[api.PHONE] = (settings.phone_token_secret, settings.phone_token_ttl_s,
                      f"{settings.api_base_url.rstrip('/')}/phone" if settings.api_base_url else "")
    yield
    await hub.close()


async def _housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    """Live-call gauge, live-index entries whose call is over or gone removed, and live records
    of calls no edge holds closed (at start, after a Redis outage, then every
    DIALOG_RECONCILE_S; by the controller consuming an edge's events, or by each when the
    edges send their events over evapi)."""
    store, metrics, settings = app[STORE], app[METRICS], app[SETTINGS]
    reconciler = DialogReconciler(app[EDGE_RPCS], store, metrics)
    recorder = app[RECORDER]

    async def loop() -> None:
        last_dialogs = 0.0
        was_degraded = False
        while True:
            try:
                await store.reconcile_live(now_ms() - LIVE_RECONCILE_AGE_MS)
                now = asyncio.get_running_loop().time()
                outage_over = was_degraded and not store.degraded
                was_degraded = store.degraded
                mine = any(recorder.owned.values()) or not settings.edge_streams
                lost = recorder.data_lost_at_ms
                if mine and not store.degraded and (outage_over or lost or now - last_dialogs >= DIALOG_RECONCILE_S):
                    last_dialogs = now
                    await reconciler.run_once(lost_before_ms=lost)
                    if lost is not None and recorder.data_lost_at_ms == lost:
                        recorder.data_lost_at_ms = None
                metrics.live_calls.set(await store.live_count())
                metrics.redis_up.set(1)
            except (RedisError, OSError) as exc:
                metrics.redis_up.set(0)
                metrics.redis_errors.labels("housekeeping").inc()
                log.debug("housekeeping: %s", exc)
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)

    tasks = [asyncio.create_task(loop())]
    if settings.recording_dir and settings.recording_retention_days:
        tasks.append(asyncio.create_task(_recording_retention(Path(settings.recording_dir),
                                                              settings.recording_retention_days * 86400)))
    yield
    await cancel_tasks(*tasks)


async def _recording_retention(directory: Path, max_age_s: float) -> None:
    """Recordings older than the retention are deleted, checked every hour."""
    while True:
        if await asyncio.to_thread(directory.is_dir):
            deleted = await asyncio.to_thread(prune_recordings, directory, max_age_s)
            if deleted:
                log.info("recording retention: %d recording(s) older than %d days deleted", deleted,
                         max_age_s // 86400)
        await asyncio.sleep(RECORDING_RETENTION_INTERVAL_S)


async def metrics_view(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    return web.Response(body=metrics.exposition(), headers={"Content-Type": metrics.content_type})


async def health_view(request: web.Request) -> web.Response:
    app = request.app
    policy = app[POLICIES].policy
    edges = {c.name: c.connected.is_set() for c in app[EDGES]}
    try:
        redis_ok = await asyncio.wait_for(app[STORE].ping(), 1.0)
    except (RedisError, OSError, asyncio.TimeoutError):
        redis_ok = False
    metrics = app[METRICS]
    # A standby controller (another one owns the node's events) is healthy; so is an owner
    # whose websocket is reconnecting (it resyncs when it is back).
    media_nodes = {o.node: {"role": o.state, "connected": bool(metrics.registry.get_sample_value(
        "callfabric_ari_connected", {"node": o.node}))} for o in app[OWNERSHIPS]}
    lifecycle = app[LIFECYCLE].state
    store = app[STORE]
    # "replaying": Redis answers, but state changes queued during its outage are still being
    # written (counters the policy reads may be short until then)
    state = "ok" if not store.degraded else "replaying" if redis_ok and store.available else "unreachable"
    holder = app[POLICIES]
    # the files on disk refused (at start: a last good copy serves, or nothing) is degraded
    files_ok = not holder.files_issues
    healthy = policy is not None and files_ok and redis_ok and state == "ok" and all(edges.values()) \
        and lifecycle == "serving"
    recorder = app[RECORDER]
    body = {"status": "ok" if healthy else "draining" if lifecycle != "serving" else "degraded",
            "instance": app[SETTINGS].instance_id,
            "policy_version": policy.version if policy else None,
            "policy": {"version": policy.version if policy else None, "from": holder.origin or None,
                       "files": "ok" if files_ok else "refused",
                       "errors": [str(i) for i in holder.files_issues[:5]]},
            "redis": redis_ok and store.available,
            "state": state, "queued": store.outage.depth, "edges": edges,
            "edge_events": {edge: "consuming" if owned else "standby" for edge, owned in recorder.owned.items()},
            "media_nodes": media_nodes}
    return web.json_response(body, status=200 if healthy else 503, dumps=json.dumps)


def build_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend([_store_ctx, _policy_ctx, _webhooks_ctx, _security_ctx, _trunks_ctx, _edge_ctx,
                            _media_ctx, _lifecycle_ctx, _api_ctx, _housekeeping_ctx])
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", health_view)
    app.add_routes(phone_routes(PhonePage(settings.phone_ws_url) if settings.phone_ws_url else None))
    try:
        app.add_subapp("/v1", api.api_app(settings.api_tokens))
    except ValueError as exc:
        raise ConfigError(f"setting {exc}") from None
    if not settings.api_tokens:
        log.warning("no api_tokens configured: the /v1 API refuses every request")
    return app


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the controller until it is drained (SIGTERM / SIGINT, or POST /v1/admin/drain; a
    second signal stops it at once) or `stop` is set."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()

    def on_signal(name: str) -> None:
        if not app[LIFECYCLE].drain(name):
            log.warning("%s while draining: stopping now", name)
            stop.set()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    host, port = split_host_port(settings.http_listen, "http_listen")
    waiters = [asyncio.create_task(app[DRAINED].wait()), asyncio.create_task(stop.wait())]
    try:
        await web.TCPSite(runner, host, port).start()     # a port taken: OSError, after the cleanup below
        log.info("controller %s up: http %s:%d, edges %s, policy %s, %s", settings.instance_id, host, port,
                 ", ".join(settings.edge_evapi), app[POLICIES].policy.version if app[POLICIES].policy else "none",
                 app[STORE].target.describe())
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        log.info("controller %s stopping", settings.instance_id)
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
