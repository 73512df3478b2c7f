"""Wiring: the only module that knows every boundary. An aiohttp application whose
long-lived parts (Redis, the policy, the edge channels, housekeeping) are started and
stopped by `cleanup_ctx`, with typed state under AppKeys."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from typing import AsyncIterator

from aiohttp import web
from redis.exceptions import RedisError

from controller.api import routes as api
from controller.api.commands import CallControl
from controller.api.events import EventHub, matches, public_event
from controller.api.webhooks import WebhookSender
from controller.config import ConfigError, Settings, parse_ari_node, split_host_port
from controller.edge.channel import EdgeChannel
from controller.edge.decisions import EdgeDecisions
from controller.media.ami import AmiWatcher, parse_ami_node
from controller.media.ari import AriClient
from controller.media.health import MediaHealth
from controller.media.plane import Endpoint, MediaPlane
from controller.metrics import Metrics
from controller.policy.reload import PolicyHolder, reload_on_sighup
from controller.state.calls import CallStore, now_ms

log = logging.getLogger("callfabric")

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", CallStore)
POLICIES = web.AppKey("policies", PolicyHolder)
EDGES = web.AppKey("edges", list)
MEDIA = web.AppKey("media", MediaPlane)
WEBHOOKS = web.AppKey("webhooks", WebhookSender)

HOUSEKEEPING_INTERVAL_S = 5.0
LIVE_RECONCILE_AGE_MS = 60_000


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = CallStore(settings.redis_url, timeline_max_events=settings.timeline_max_events,
                      call_retention_s=settings.call_retention_s, live_call_ttl_s=settings.live_call_ttl_s)
    app[STORE] = store
    try:
        await store.ping()
    except (RedisError, OSError) as exc:
        log.error("Redis at %s is unreachable (%s): calls get the edge fallback until it is back",
                  settings.redis_url, exc)
    yield
    await store.aclose()


async def _policy_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    holder = PolicyHolder(settings.policy_dir, metrics.policy_outcome)
    app[POLICIES] = holder
    outcome = await holder.reload("start")
    if not outcome.accepted:
        log.error("no valid policy in %s: every call gets the edge fallback until one loads", settings.policy_dir)
    reload_on_sighup(holder)
    watcher = asyncio.create_task(holder.watch(settings.policy_poll_s))
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    with contextlib.suppress(NotImplementedError, RuntimeError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


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
    if (settings.webhook_url or settings.webhook_events) and not settings.webhook_secret:
        log.warning("webhook_secret is empty: webhooks are sent with a signature nobody can trust")
    yield
    await sender.close()


async def _edge_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, metrics, holder = app[SETTINGS], app[METRICS], app[POLICIES]
    decisions = EdgeDecisions(lambda: holder.policy, app[STORE], metrics, settings.instance_id,
                              ask_webhook=app[WEBHOOKS].ask, decision_budget_ms=settings.edge_decision_budget_ms)
    channels = []
    for endpoint in settings.edge_evapi:
        host, port = split_host_port(endpoint, "edge_evapi")
        channels.append(EdgeChannel(host, port, decisions, metrics, max_in_flight=settings.edge_max_in_flight,
                                    reconnect_max_s=settings.edge_reconnect_max_s))
    app[EDGES] = channels
    tasks = [asyncio.create_task(c.run(), name=f"edge {c.name}") for c in channels]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
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
                       api_base_url=settings.api_base_url)
    app[MEDIA] = plane
    tasks = []
    if clients:
        try:
            await plane.recover()
        except RedisError as exc:
            log.error("media: could not recover live calls from Redis: %s", exc)
        tasks = [asyncio.create_task(plane.serve_node(name), name=f"ari {name}") for name in clients]
        tasks.append(asyncio.create_task(MediaHealth(plane, settings.media_health_interval_s).run()))
    watchers = []
    for text in settings.ami_nodes:
        try:
            watchers.append(AmiWatcher(parse_ami_node(text), metrics))
        except ValueError as exc:
            raise ConfigError(f"setting ami_nodes: {exc}") from None
    for watcher in watchers:
        watcher.start()
    yield
    for watcher in watchers:
        watcher.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in clients.values()), return_exceptions=True)


async def _api_ctx(app: web.Application) -> AsyncIterator[None]:
    """Services behind the /v1 API: call control over the media plane, the events hub."""
    hub = EventHub(app[SETTINGS].redis_url)
    app[api.CONTROL] = CallControl(app[MEDIA], app[STORE], lambda: app[POLICIES].policy,
                                   outbound_trunk=app[SETTINGS].outbound_trunk)
    app[api.HUB] = hub
    app[api.STORE] = app[STORE]
    app[api.POLICIES] = app[POLICIES]
    yield
    await hub.close()


async def _housekeeping_ctx(app: web.Application) -> AsyncIterator[None]:
    """Live-call gauge, and live-index entries whose call is over or gone removed."""
    store, metrics = app[STORE], app[METRICS]

    async def loop() -> None:
        while True:
            try:
                await store.reconcile_live(now_ms() - LIVE_RECONCILE_AGE_MS)
                metrics.live_calls.set(await store.live_count())
            except RedisError as exc:
                metrics.redis_errors.labels("housekeeping").inc()
                log.debug("housekeeping: %s", exc)
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


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
    media_nodes = {name: bool(metrics.registry.get_sample_value("callfabric_ari_connected", {"node": name}))
                   for name in app[MEDIA].nodes}
    healthy = policy is not None and redis_ok and all(edges.values()) and all(media_nodes.values())
    body = {"status": "ok" if healthy else "degraded", "instance": app[SETTINGS].instance_id,
            "policy_version": policy.version if policy else None, "redis": redis_ok, "edges": edges,
            "media_nodes": media_nodes}
    return web.json_response(body, status=200 if healthy else 503, dumps=json.dumps)


def build_app(settings: Settings) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app.cleanup_ctx.extend([_store_ctx, _policy_ctx, _webhooks_ctx, _edge_ctx, _media_ctx, _api_ctx,
                             _housekeeping_ctx])
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", health_view)
    try:
        app.add_subapp("/v1", api.api_app(settings.api_tokens))
    except ValueError as exc:
        raise ConfigError(f"setting {exc}") from None
    if not settings.api_tokens:
        log.warning("no api_tokens configured: the /v1 API refuses every request")
    return app


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the controller until SIGTERM / SIGINT (or `stop` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_host_port(settings.http_listen, "http_listen")
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("controller %s up: http %s:%d, edges %s, policy %s", settings.instance_id, host, port,
             ", ".join(settings.edge_evapi), app[POLICIES].policy.version if app[POLICIES].policy else "none")
    try:
        await stop.wait()
    finally:
        log.info("controller %s stopping", settings.instance_id)
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
