"""`callfabric` command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence
from urllib.parse import quote

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _print_issues(issues) -> None:
    for issue in issues:
        print(issue, file=sys.stderr)


def cmd_policy_check(args: argparse.Namespace) -> int:
    from controller.policy import PolicyInvalid, load_policy

    try:
        policy = load_policy(args.directory)
    except PolicyInvalid as exc:
        _print_issues(exc.issues)
        errors = sum(1 for i in exc.issues if i.severity == "error")
        print(f"{args.directory}: {errors} error(s); policy refused", file=sys.stderr)
        return EXIT_FAIL
    _print_issues(policy.warnings)
    source = policy.source
    print(f"{args.directory}: OK, version {policy.version}: {len(source.files)} file(s), {len(source.rules)} rule(s), "
          f"{len(source.agents)} agent(s), {len(source.destinations)} destination(s)")
    return EXIT_OK


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from controller.policy.schema import policy_file_schema

    print(json.dumps(policy_file_schema(), indent=2))
    return EXIT_OK


def _call_from_args(args: argparse.Namespace, default_tz: str):
    from controller.policy.testing import build_call

    headers: dict[str, list[str]] = {}
    for item in args.header or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--header {item!r} must look like 'Name: value'")
        headers.setdefault(name.strip(), []).append(value.strip())
    counters: dict[str, int] = {}
    for item in args.counter or []:
        key, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"--counter {item!r} must look like 'window:source:60=12' or 'live:tenant=40'")
        counters[key.strip()] = int(value)
    spec = {"from": args.from_, "to": args.to, "src": args.src, "transport": args.transport,
            "headers": headers, "counters": counters, "call_id": args.call_id, "trunk": args.trunk}
    if args.ruri:
        spec["ruri"] = args.ruri
    if args.at:
        spec["at"] = args.at
    return build_call(spec, default_tz)


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from controller.policy import PolicyInvalid, load_policy

    try:
        policy = load_policy(args.directory)
    except PolicyInvalid as exc:
        _print_issues(exc.issues)
        return EXIT_FAIL
    try:
        call = _call_from_args(args, policy.source.settings.timezone)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    explanation = policy.explain(call)
    decision = policy.decide(call)
    if decision != explanation.decision:  # an engine bug; say it loudly rather than explain the wrong thing
        print("error: the compiled engine and the reference evaluator disagree on this call", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps({"decision": decision.to_dict(), "rules": [
            {"rule": t.rule, "at": str(t.position), "matched": t.matched, "applied": t.applied, "why": t.reason}
            for t in explanation.traces]}, indent=2))
        return EXIT_OK
    f = explanation.facts
    print(f"call: caller={f.caller!r} callee={f.callee!r} ruri={f.ruri!r} source={f.src_ip} "
          f"transport={f.transport} trunk={f.trunk!r} tenant={f.tenant!r} at={f.at.isoformat()}")
    print(f"policy {policy.version}\n")
    width = max(len(t.rule) for t in explanation.traces)
    for trace in explanation.traces:
        mark = "→" if trace.applied and trace is explanation.traces[-1] else ("+" if trace.applied else "✗")
        if trace.matched and not trace.applied:
            mark = "·"
        print(f"  {mark} {trace.rule:<{width}}  {trace.position}  {trace.reason}")
    print("\ndecision:")
    print(json.dumps(decision.to_dict(), indent=2))
    return EXIT_OK


def cmd_policy_test(args: argparse.Namespace) -> int:
    from controller.policy import PolicyInvalid, load_policy
    from controller.policy.testing import run_policy_tests

    try:
        policy = load_policy(args.directory)
    except PolicyInvalid as exc:
        _print_issues(exc.issues)
        return EXIT_FAIL
    results, problems = run_policy_tests(policy, args.directory)
    _print_issues(problems)
    for result in results:
        if result.passed:
            if args.verbose:
                print(f"PASS {result.name}  ({result.position})")
            continue
        print(f"FAIL {result.name}  ({result.position})")
        print("  " + result.diff.replace("\n", "\n  "))
    failed = sum(1 for r in results if not r.passed)
    print(f"{len(results) - failed} passed, {failed} failed" + (f", {len(problems)} test file problem(s)" if problems else ""))
    if not results and not problems:
        print(f"no test cases found in {args.directory}/tests/*.yaml", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_FAIL if failed or problems else EXIT_OK


def _settings(args: argparse.Namespace):
    from controller.config import load_settings

    return load_settings(getattr(args, "config", None))


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from controller.app import serve
    from controller.config import ConfigError
    from controller.logs import setup_logging

    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.log_format not in ("json", "text"):
        print("error: setting log_format: expected json or text", file=sys.stderr)
        return EXIT_USAGE
    levels = dict(entry.partition("=")[::2] for entry in settings.log_levels)
    setup_logging(settings.log_level, settings.log_format, levels)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(settings))
    return EXIT_OK


def _loop_factory():
    """uvloop when installed (a faster event loop for the decision path), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _with_store(args: argparse.Namespace, work) -> int:
    """Run `work(store)` against the configured Redis; clear message when it is unreachable."""
    import asyncio

    from redis.exceptions import RedisError

    from controller.config import ConfigError, redis_target
    from controller.state.calls import CallStore

    try:
        settings = _settings(args)
        redis_target(settings)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def main() -> int:
        target = redis_target(settings)
        store = CallStore(target, timeout_s=5.0)
        try:
            return await work(store)
        except (RedisError, OSError) as exc:
            print(f"error: {target.describe()}: {exc}", file=sys.stderr)
            return EXIT_FAIL
        finally:
            await store.aclose()
    return asyncio.run(main())


def _age(ms: object) -> str:
    import time

    if not isinstance(ms, int):
        return "?"
    seconds = max(0, int(time.time() - ms / 1000))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def cmd_calls_list(args: argparse.Namespace) -> int:
    async def work(store) -> int:
        ids = await (store.recent_calls(args.limit) if args.recent else store.live_calls(args.limit))
        records = await store.get_many(ids) if ids else []
        if args.json:
            print(json.dumps([r for r in records if r], indent=2))
            return EXIT_OK
        print(f"{'CALL-ID':<40} {'STATE':<9} {'AGE':>7} {'OUTCOME':<7} {'TARGET':<16} {'RULE':<24} FROM -> TO")
        for call_id, r in zip(ids, records):
            if not r:
                continue
            print(f"{call_id[:40]:<40} {str(r.get('state', '?')):<9} {_age(r.get('created_at_ms')):>7} "
                  f"{str(r.get('outcome', r.get('fallback', '-'))):<7} {str(r.get('target', '-'))[:16]:<16} "
                  f"{str(r.get('rule', '-'))[:24]:<24} {r.get('caller', '?')} -> {r.get('dialled', '?')}")
        print(f"{len(ids)} {'recent' if args.recent else 'live'} call(s)")
        return EXIT_OK
    return _with_store(args, work)


def cmd_calls_show(args: argparse.Namespace) -> int:
    async def work(store) -> int:
        record = await store.get(args.call_id)
        if record is None:
            print(f"no call {args.call_id!r} in the call store", file=sys.stderr)
            return EXIT_FAIL
        timeline = await store.timeline(args.call_id)
        if args.json:
            print(json.dumps({"call": record, "timeline": timeline}, indent=2))
            return EXIT_OK
        for key in sorted(record):
            value = record[key]
            print(f"{key:>16}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
        print("timeline:")
        for event in timeline:
            rest = {k: v for k, v in event.items() if k not in ("event", "ts", "id") and v is not None}
            print(f"  {event.get('ts')}  {event.get('event'):<10} {json.dumps(rest)}")
        return EXIT_OK
    return _with_store(args, work)


def cmd_calls_trace(args: argparse.Namespace) -> int:
    """A call's timeline, each step with its time since the first."""
    async def work(store) -> int:
        timeline = await store.timeline(args.call_id)
        if not timeline:
            print(f"no call {args.call_id!r} in the call store", file=sys.stderr)
            return EXIT_FAIL
        start = next((e["ts"] for e in timeline if isinstance(e.get("ts"), int)), 0)
        for event in timeline:
            rest = {k: v for k, v in event.items() if k not in ("event", "ts", "id", "call_id") and v is not None}
            offset = f"+{(event['ts'] - start) / 1000:8.3f}s" if isinstance(event.get("ts"), int) else " " * 10
            print(f"{offset}  {event.get('event', '?'):<20} {json.dumps(rest)[:160]}")
        return EXIT_OK
    return _with_store(args, work)


def _call_action(args: argparse.Namespace) -> dict:
    """The action document a `callfabric call …` command stands for."""
    if args.call_command == "transfer":
        if bool(args.agent) == bool(args.destination):
            raise ValueError("give --agent (AI agent) or --destination (SIP destination)")
        return {"route_agent": args.agent} if args.agent else {"route_sip": args.destination}
    if args.call_command == "human":
        context = {k: v for k, v in (("summary", args.summary), ("intent", args.intent),
                                     ("sentiment", args.sentiment)) if v}
        return {"add_human": {"destination": args.destination, "mode": "handoff" if args.handoff else "conference",
                              **({"context": context} if context else {})}}
    if args.call_command == "fork":
        return {"fork": {"target": args.target, "direction": args.direction}}
    if args.call_command == "stop-fork":
        return {"stop_fork": {"fork_id": args.fork_id}}
    if args.call_command == "play":
        return {"play": args.media}
    if args.call_command == "hangup":
        return {"hangup": True}
    return json.loads(args.document)


def _api_request(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> int:
    """One request to the REST API (like any application would make); prints the answer."""
    import asyncio
    import os

    import aiohttp

    token = args.token or os.environ.get("CALLFABRIC_TOKEN", "")
    if not token:
        print("error: an API token is needed (--token or CALLFABRIC_TOKEN)", file=sys.stderr)
        return EXIT_USAGE

    async def send() -> int:
        url = f"{args.api.rstrip('/')}{path}"
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            try:
                async with http.request(method, url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
                    text = await r.text()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                print(f"error: {url}: {exc}", file=sys.stderr)
                return EXIT_FAIL
        print(text)
        return EXIT_OK if status < 300 else EXIT_FAIL
    return asyncio.run(send())


def cmd_call(args: argparse.Namespace) -> int:
    """Send an action on a live call through the REST API."""
    try:
        action = _call_action(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _api_request(args, "POST", f"/calls/{quote(args.call_id, safe='')}/actions", {"action": action})


def cmd_bans(args: argparse.Namespace) -> int:
    """List, add or lift bans of source addresses at the edge (through the REST API, admin scope)."""
    if args.bans_command == "list":
        return _api_request(args, "GET", "/bans")
    if args.bans_command == "add":
        body = {"ip": args.ip, "for": args.duration, **({"reason": args.reason} if args.reason else {})}
        return _api_request(args, "POST", "/bans", body)
    return _api_request(args, "DELETE", f"/bans/{quote(args.ip, safe='')}")


def cmd_drain(args: argparse.Namespace) -> int:
    """Drain one controller for a rolling upgrade: it takes no new calls, hands its media nodes
    over to the others, writes what it queued, then exits. --wait returns once it has exited."""
    import asyncio
    import os
    import time

    import aiohttp

    token = args.token or os.environ.get("CALLFABRIC_TOKEN", "")
    if not token:
        print("error: an API token with the admin scope is needed (--token or CALLFABRIC_TOKEN)", file=sys.stderr)
        return EXIT_USAGE
    base = args.api.rstrip("/")

    async def drain() -> int:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as http:
            try:
                async with http.get(f"{base}/admin/status") as r:
                    status, code = await r.json(content_type=None), r.status
                if code != 200 or not isinstance(status, dict):
                    print(f"error: {base}/admin/status answered {code}: {status}", file=sys.stderr)
                    return EXIT_FAIL
                instance = args.instance or status["instance"]
                async with http.post(f"{base}/admin/drain", json={"instance": instance}) as r:
                    text, code = await r.text(), r.status
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
                print(f"error: {base}: {exc or type(exc).__name__}", file=sys.stderr)
                return EXIT_FAIL
            print(text)
            if code != 202:
                return EXIT_FAIL
            if not args.wait:
                return EXIT_OK
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                try:
                    async with http.get(f"{base}/admin/status") as r:
                        await r.read()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    print(f"controller {instance}: drained and stopped")
                    return EXIT_OK
                await asyncio.sleep(0.2)
            print(f"error: controller {instance} still running after {args.timeout:.0f}s", file=sys.stderr)
            return EXIT_FAIL
    return asyncio.run(drain())


def cmd_demo(args: argparse.Namespace) -> int:
    from controller.localstack.demo import run_demo

    return run_demo(keep=args.keep)


def cmd_metrics_describe(args: argparse.Namespace) -> int:
    """Every metric the controller exports: name, type, labels, help."""
    from controller.metrics import Metrics

    for name, kind, labels, doc in Metrics().describe():
        print(f"{name}  ({kind}{'; labels: ' + ', '.join(labels) if labels else ''})\n    {doc}")
    return EXIT_OK


def cmd_config_describe(args: argparse.Namespace) -> int:
    from controller.config import describe

    for name, env, default, doc in describe():
        print(f"{name}  ({env}, default {default!r})\n    {doc}")
    return EXIT_OK


def cmd_api_openapi(args: argparse.Namespace) -> int:
    from controller.api.openapi import document

    print(json.dumps(document(), indent=2, sort_keys=True))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callfabric", description="Programmable SIP for AI voice agents.")
    commands = parser.add_subparsers(dest="command", required=True)

    policy = commands.add_parser("policy", help="routing policies: check, schema, explain, test")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate a policy directory (every error, with file:line:column)")
    check.add_argument("directory")
    check.set_defaults(func=cmd_policy_check)
    schema = policy_commands.add_parser("schema", help="print the JSON Schema of policy files")
    schema.set_defaults(func=cmd_policy_schema)
    explain = policy_commands.add_parser("explain", help="decide one call and say why each earlier rule did not match")
    explain.add_argument("directory")
    explain.add_argument("--from", dest="from_", default="", help="caller (From user)")
    explain.add_argument("--to", default="", help="callee (To user)")
    explain.add_argument("--ruri", default="", help="Request-URI user (default: --to)")
    explain.add_argument("--src", default="127.0.0.1", help="source IP[:port]")
    explain.add_argument("--transport", default="udp")
    explain.add_argument("--trunk", default="", help="the inbound trunk the edge recognised")
    explain.add_argument("--header", action="append", help="'Name: value' (repeatable)")
    explain.add_argument("--at", help="ISO time, e.g. 2026-11-25T10:00:00-05:00 (no offset: the policy's time zone)")
    explain.add_argument("--call-id", default="explain-call", help="Call-ID (decides percentage splits)")
    explain.add_argument("--counter", action="append", help="counter value, e.g. 'window:source:60=12' (repeatable)")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.set_defaults(func=cmd_policy_explain)
    test = policy_commands.add_parser("test", help="run the test cases in DIR/tests/*.yaml")
    test.add_argument("directory")
    test.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    test.set_defaults(func=cmd_policy_test)

    run = commands.add_parser("run", help="run the controller")
    run.add_argument("--config", help="settings file (YAML); CALLFABRIC_* environment variables override it")
    run.set_defaults(func=cmd_run)

    calls = commands.add_parser("calls", help="calls in the call store")
    calls_commands = calls.add_subparsers(dest="calls_command", required=True)
    listing = calls_commands.add_parser("list", help="live calls (or --recent ones)")
    listing.add_argument("--config")
    listing.add_argument("--recent", action="store_true", help="the latest calls, ended ones included")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_calls_list)
    show = calls_commands.add_parser("show", help="one call's record and timeline")
    show.add_argument("call_id")
    show.add_argument("--config")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_calls_show)

    trace = calls_commands.add_parser("trace", help="a call's timeline with relative times")
    trace.add_argument("call_id")
    trace.add_argument("--config")
    trace.set_defaults(func=cmd_calls_trace)

    call = commands.add_parser("call", help="act on a live call through the REST API")
    call.add_argument("--api", default="http://127.0.0.1:8460/v1", help="the API's base URL")
    call.add_argument("--token", help="API token with the control scope (default: CALLFABRIC_TOKEN)")
    call_commands = call.add_subparsers(dest="call_command", required=True)
    transfer = call_commands.add_parser("transfer", help="to another AI agent or a SIP destination")
    transfer.add_argument("call_id")
    transfer.add_argument("--agent")
    transfer.add_argument("--destination")
    human = call_commands.add_parser("human", help="bring a human in (conference, or --handoff)")
    human.add_argument("call_id")
    human.add_argument("--destination", required=True)
    human.add_argument("--handoff", action="store_true")
    human.add_argument("--summary")
    human.add_argument("--intent")
    human.add_argument("--sentiment")
    fork = call_commands.add_parser("fork", help="start a fork to a fork target")
    fork.add_argument("call_id")
    fork.add_argument("--target", required=True)
    fork.add_argument("--direction", default="in", choices=("in", "out", "both"))
    stop_fork = call_commands.add_parser("stop-fork", help="stop a fork")
    stop_fork.add_argument("call_id")
    stop_fork.add_argument("fork_id")
    play = call_commands.add_parser("play", help="play sound:NAME or a URL into the call")
    play.add_argument("call_id")
    play.add_argument("media")
    hang = call_commands.add_parser("hangup", help="end the call")
    hang.add_argument("call_id")
    raw = call_commands.add_parser("action", help="any action document (JSON)")
    raw.add_argument("call_id")
    raw.add_argument("document")
    call.set_defaults(func=cmd_call)

    bans = commands.add_parser("bans", help="sources banned at the edge: list, add, remove (REST API, admin scope)")
    bans.add_argument("--api", default="http://127.0.0.1:8460/v1", help="the API's base URL")
    bans.add_argument("--token", help="API token with the admin scope (default: CALLFABRIC_TOKEN)")
    bans_commands = bans.add_subparsers(dest="bans_command", required=True)
    bans_commands.add_parser("list", help="bans in force, with why and until when")
    ban_add = bans_commands.add_parser("add", help="ban an address at every edge")
    ban_add.add_argument("ip")
    ban_add.add_argument("--for", dest="duration", default="1h", help="how long: 3600, 90s, 15m, 2h (default 1h)")
    ban_add.add_argument("--reason")
    ban_remove = bans_commands.add_parser("remove", help="lift a ban")
    ban_remove.add_argument("ip")
    bans.set_defaults(func=cmd_bans)

    drain = commands.add_parser("drain", help="drain a controller (rolling upgrade): no new calls, media nodes "
                                              "handed over, then it exits (REST API, admin scope)")
    drain.add_argument("--api", default="http://127.0.0.1:8460/v1", help="that controller's API base URL")
    drain.add_argument("--token", help="API token with the admin scope (default: CALLFABRIC_TOKEN)")
    drain.add_argument("--instance", help="its instance_id (default: whatever controller answers --api)")
    drain.add_argument("--wait", action="store_true", help="return once the controller has exited")
    drain.add_argument("--timeout", type=float, default=60.0, help="how long --wait waits (seconds)")
    drain.set_defaults(func=cmd_drain)

    demo = commands.add_parser("demo", help="start Redis, Kamailio and the controller locally, place calls, report")
    demo.add_argument("--keep", action="store_true", help="keep the working directory (logs, SIPp traces)")
    demo.set_defaults(func=cmd_demo)

    api = commands.add_parser("api", help="the REST API")
    api_commands = api.add_subparsers(dest="api_command", required=True)
    api_commands.add_parser("openapi", help="print the OpenAPI document").set_defaults(func=cmd_api_openapi)

    metrics = commands.add_parser("metrics", help="the controller's Prometheus metrics")
    metrics_commands = metrics.add_subparsers(dest="metrics_command", required=True)
    metrics_commands.add_parser("describe", help="every metric: name, type, labels").set_defaults(
        func=cmd_metrics_describe)

    config = commands.add_parser("config", help="controller settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("describe", help="every setting, its environment variable and default").set_defaults(
        func=cmd_config_describe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
