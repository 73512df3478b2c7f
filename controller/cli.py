"""`callfabric` command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence
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


# ---------------------------------------------------------------------- settings and output
def _settings(args: argparse.Namespace):
    """The settings of --config, else $CALLFABRIC_CONFIG or ./callfabric.yaml, else defaults;
    CALLFABRIC_* environment variables win (ConfigError: one line)."""
    from controller.config import default_config_path, load_settings

    path = getattr(args, "config", None) or default_config_path()
    return load_settings(path)


def _fail(message: str, code: int = EXIT_FAIL) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _when(ms: object) -> str:
    """Epoch milliseconds as ISO 8601 in local time with its offset (2026-12-07T16:02:11.042+01:00)."""
    from datetime import datetime, timezone

    if not isinstance(ms, int) or isinstance(ms, bool):
        return "-"
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).astimezone().isoformat(timespec="milliseconds")


def _is_epoch_ms(key: str, value: object) -> bool:
    """A time field of a record (durations in ms never reach 10^12, i.e. 2001)."""
    return (key.endswith("_ms") or key == "ts") and isinstance(value, int) and not isinstance(value, bool) \
        and value >= 10**12


def _human(key: str, value: object) -> str:
    if _is_epoch_ms(key, value):
        return _when(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "-" if value is None else str(value)


def _table(headers: Sequence[str], rows: list[Sequence[object]]) -> None:
    """Columns as wide as their content; the last one unpadded."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + ("  " if len(row) > 1 else "") + row[-1])


def _print_json(document: object) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False))


# ---------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from controller.app import serve
    from controller.config import ConfigError, check_settings
    from controller.logs import setup_logging

    try:
        settings = _settings(args)
        check_settings(settings)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    levels = dict(entry.partition("=")[::2] for entry in settings.log_levels)
    setup_logging(settings.log_level, settings.log_format, levels)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(settings))
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except OSError as exc:       # e.g. http_listen's port taken
        return _fail(f"{exc.strerror or exc} (http_listen {settings.http_listen})")
    return EXIT_OK


def _loop_factory():
    """uvloop when installed (a faster event loop for the decision path), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# ---------------------------------------------------------------------- the REST API's clients
class ApiError(Exception):
    """A request the API refused or could not be made; one line for the user."""


def api_base(url: str) -> str:
    """The API's base URL, `/v1` added when the user gave the server's address."""
    base = url.strip().rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    return base if base.endswith("/v1") else f"{base}/v1"


def _api_target(args: argparse.Namespace, scope: str) -> tuple[str, str]:
    """(base URL, token) from --api/--token, CALLFABRIC_API/CALLFABRIC_TOKEN, then the settings:
    http_listen, and the first of api_tokens that holds `scope`."""
    import os

    from controller.api.auth import parse_tokens
    from controller.config import split_host_port

    settings = None
    api, token = getattr(args, "api", None) or os.environ.get("CALLFABRIC_API"), \
        getattr(args, "token", None) or os.environ.get("CALLFABRIC_TOKEN")
    if not api or not token:
        settings = _settings(args)
    if not api:
        host, port = split_host_port(settings.http_listen, "http_listen")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        api = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if not token:
        try:
            usable = [t for t in parse_tokens(settings.api_tokens) if t.allows(scope)]
        except ValueError as exc:
            raise ApiError(f"setting {exc}") from None
        if not usable:
            raise ApiError(f"an API token with the {scope} scope is needed: --token, CALLFABRIC_TOKEN, or api_tokens "
                           f"in the config file")
        token = usable[0].secret.decode()
    return api_base(api), token


def _api_call(args: argparse.Namespace, scope: str, method: str, path: str, body: dict | None = None,
              ok: tuple[int, ...] = (200, 201, 202, 204)) -> dict:
    """One request to the REST API (as any application makes it); its JSON answer, or ApiError."""
    import asyncio

    import aiohttp

    base, token = _api_target(args, scope)
    url = base + path

    async def send() -> tuple[int, str]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            async with http.request(method, url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as response:
                return response.status, await response.text()
    try:
        status, text = asyncio.run(send())
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise ApiError(f"{url}: {exc or type(exc).__name__} (is the controller running? --api, or http_listen in "
                       f"the config)") from None
    try:
        answer = json.loads(text) if text else {}
    except ValueError:
        raise ApiError(f"{method} {url} answered {status} without JSON: is this a callfabric API?") from None
    if status not in ok:
        problem = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(problem, dict):
            raise ApiError(f"{method} {url} answered {status}: {text[:200]}")
        details = "; ".join(f"{e.get('path')}: {e.get('message')}" for e in problem.get("errors") or [])
        raise ApiError(f"{status} {problem.get('message')}" + (f" ({details})" if details else ""))
    return answer


def _api_command(work) -> Callable[[argparse.Namespace], int]:
    """A command built on _api_call: ApiError and ConfigError are one line on stderr, exit 1 / 2."""
    import functools

    @functools.wraps(work)
    def command(args: argparse.Namespace) -> int:
        from controller.config import ConfigError
        try:
            return work(args)
        except ApiError as exc:
            return _fail(str(exc))
        except ConfigError as exc:
            return _fail(str(exc), EXIT_USAGE)
    return command


# ---------------------------------------------------------------------- calls
def _with_store(args: argparse.Namespace, work) -> int:
    """Run `work(store)` against the configured Redis; clear message when it is unreachable."""
    import asyncio

    from redis.exceptions import RedisError

    from controller.config import ConfigError, redis_target
    from controller.state.calls import CallStore

    try:
        target = redis_target(_settings(args))
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)

    async def main() -> int:
        store = CallStore(target, timeout_s=5.0)
        try:
            return await work(store)
        except BrokenPipeError:
            raise
        except (RedisError, OSError) as exc:
            return _fail(f"{target.describe()}: {exc}")
        finally:
            await store.aclose()
    return asyncio.run(main())


def _read_calls(args: argparse.Namespace, read_store, read_api) -> int:
    """Calls are read from the call store the settings name (Redis), or through the REST API
    (read scope) when --api is given."""
    if getattr(args, "api", None):
        return _api_command(read_api)(args)
    return _with_store(args, read_store)


def _age(ms: object) -> str:
    import time

    if not isinstance(ms, int):
        return "?"
    seconds = max(0, int(time.time() - ms / 1000))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _print_calls(args: argparse.Namespace, records: list[dict]) -> int:
    if args.json:
        _print_json(records)
        return EXIT_OK
    rows = [(r.get("call_id", "?"), r.get("state", "?"), _when(r.get("created_at_ms")), _age(r.get("created_at_ms")),
             r.get("outcome", r.get("fallback", "-")), r.get("target", "-"), r.get("rule", "-"),
             f"{r.get('caller', '?')} -> {r.get('dialled', '?')}") for r in records]
    _table(("CALL-ID", "STATE", "STARTED", "AGE", "OUTCOME", "TARGET", "RULE", "FROM -> TO"), rows)
    print(f"{len(records)} {'recent' if args.recent else 'live'} call(s)")
    return EXIT_OK


def cmd_calls_list(args: argparse.Namespace) -> int:
    async def from_store(store) -> int:
        ids = await (store.recent_calls(args.limit) if args.recent else store.live_calls(args.limit))
        records = await store.get_many(ids) if ids else []
        return _print_calls(args, [{"call_id": i, **r} for i, r in zip(ids, records) if r])

    def from_api(args: argparse.Namespace) -> int:
        answer = _api_call(args, "read", "GET", f"/calls?state={'recent' if args.recent else 'live'}"
                                                f"&limit={args.limit}")
        return _print_calls(args, answer.get("calls", []))
    return _read_calls(args, from_store, from_api)


def _print_call(args: argparse.Namespace, record: dict, timeline: list[dict]) -> int:
    if args.json:
        _print_json({"call": record, "timeline": timeline})
        return EXIT_OK
    width = max(map(len, record), default=0)
    for key in sorted(record):
        print(f"{key:>{width}}: {_human(key, record[key])}")
    print("timeline:")
    for event in timeline:
        rest = {k: v for k, v in event.items() if k not in ("event", "ts", "id", "call_id") and v is not None}
        print(f"  {_when(event.get('ts'))}  {str(event.get('event', '?')):<16} {json.dumps(rest, ensure_ascii=False)}")
    return EXIT_OK


def cmd_calls_show(args: argparse.Namespace) -> int:
    async def from_store(store) -> int:
        record = await store.get(args.call_id)
        if record is None:
            return _fail(f"no call {args.call_id!r} in the call store")
        return _print_call(args, record, await store.timeline(args.call_id))

    def from_api(args: argparse.Namespace) -> int:
        path = f"/calls/{quote(args.call_id, safe='')}"
        record = _api_call(args, "read", "GET", path)["call"]
        return _print_call(args, record, _api_call(args, "read", "GET", path + "/timeline")["events"])
    return _read_calls(args, from_store, from_api)


def _print_trace(args: argparse.Namespace, timeline: list[dict]) -> int:
    if not timeline:
        return _fail(f"no call {args.call_id!r} in the call store")
    if args.json:
        _print_json(timeline)
        return EXIT_OK
    # in time order: steps are written by several writers (edge, controller, media plane); a
    # step without a time stays behind the step written before it
    placed, last = [], 0
    for event in timeline:
        last = event["ts"] if isinstance(event.get("ts"), int) else last
        placed.append((last, event))
    timeline = [event for _, event in sorted(placed, key=lambda pair: pair[0])]
    start = next((e["ts"] for e in timeline if isinstance(e.get("ts"), int)), 0)
    print(f"{args.call_id}: started {_when(start)}")
    for event in timeline:
        rest = {k: v for k, v in event.items() if k not in ("event", "ts", "id", "call_id") and v is not None}
        offset = f"+{(event['ts'] - start) / 1000:8.3f}s" if isinstance(event.get("ts"), int) else " " * 10
        print(f"{offset}  {event.get('event', '?'):<20} {json.dumps(rest, ensure_ascii=False)[:160]}")
    return EXIT_OK


def cmd_calls_trace(args: argparse.Namespace) -> int:
    """A call's timeline, each step with its time since the first."""
    async def from_store(store) -> int:
        return _print_trace(args, await store.timeline(args.call_id))

    def from_api(args: argparse.Namespace) -> int:
        try:
            events = _api_call(args, "read", "GET", f"/calls/{quote(args.call_id, safe='')}/timeline")["events"]
        except ApiError as exc:
            if not str(exc).startswith("404 "):
                raise
            events = []
        return _print_trace(args, events)
    return _read_calls(args, from_store, from_api)


# ---------------------------------------------------------------------- call (live-call actions)
def _call_action(args: argparse.Namespace) -> dict:
    """The action document a `callfabric call …` command stands for."""
    if args.call_command == "transfer":
        if sum(map(bool, (args.agent, args.destination, args.to))) != 1:
            raise ValueError("give --agent (AI agent), --destination (SIP destination) or --to (cold transfer)")
        if args.to:
            headers = dict(h.split("=", 1) for h in args.header if "=" in h)
            if len(headers) != len(args.header):
                raise ValueError("--header takes NAME=VALUE")
            return {"transfer": {"to": args.to, "method": args.method, **({"headers": headers} if headers else {}),
                                 **({"fallback": False} if args.no_fallback else {})}}
        return {"route_agent": args.agent} if args.agent else {"route_sip": args.destination}
    if args.call_command == "human":
        context = {k: v for k, v in (("summary", args.summary), ("intent", args.intent),
                                     ("sentiment", args.sentiment)) if v}
        return {"add_human": {"destination": args.destination, "mode": "handoff" if args.handoff else "listen" if args.listen else "conference",
                              **({"context": context} if context else {}),
                              **({"caller_id": args.caller_id} if args.caller_id else {})}}
    if args.call_command == "fork":
        return {"fork": {"target": args.target, "direction": args.direction}}
    if args.call_command == "stop-fork":
        return {"stop_fork": {"fork_id": args.fork_id}}
    if args.call_command == "play":
        return {"play": args.media}
    if args.call_command == "hangup":
        return {"hangup": True}
    if args.call_command == "record":
        options = {"channels": args.channels, **({"beep": True} if args.beep else {}),
                   **({"announcement": args.announcement} if args.announcement else {}),
                   **({"max_duration": args.max_duration} if args.max_duration else {})}
        return {"record": options}
    if args.call_command == "stop-record":
        return {"stop_record": {"recording_id": args.recording_id} if args.recording_id else True}
    if args.call_command == "dtmf":
        return {"send_dtmf": {"digits": args.digits, "to": args.to}}
    if args.call_command == "gather":
        if args.webhook and args.then:
            raise ValueError("give --webhook or --then, not both")
        try:
            then = json.loads(args.then) if args.then else None
        except ValueError as exc:
            raise ValueError(f"--then is not JSON: {exc}") from None
        return {"gather": {"max_digits": args.max_digits, "finish_key": args.finish_key, "timeout": args.timeout,
                           **({"prompt": args.prompt} if args.prompt else {}),
                           **({"webhook": args.webhook} if args.webhook else {}),
                           **({"then": then} if then is not None else {})}}
    try:
        return json.loads(args.document)
    except ValueError as exc:
        raise ValueError(f"the action document is not JSON: {exc}") from None


@_api_command
def cmd_call(args: argparse.Namespace) -> int:
    """Send an action on a live call through the REST API (control scope), or place an outbound call."""
    if args.call_command == "originate":
        body = {"to": args.to, "agent": args.agent, **({"caller_id": args.caller_id} if args.caller_id else {}),
                **({"amd": {"timeout": args.amd}} if args.amd else {})}
        answer = _api_call(args, "control", "POST", "/calls", body)
        if args.json:
            _print_json(answer)
        else:
            print(f"{answer.get('call_id')}: calling {args.to} (agent {answer.get('agent', args.agent)})")
        return EXIT_OK
    try:
        action = _call_action(args)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    answer = _api_call(args, "control", "POST", f"/calls/{quote(args.call_id, safe='')}/actions", {"action": action})
    if args.json:
        _print_json(answer)
    else:
        result = answer.get("result")
        shown = ", ".join(f"{k}={_human(k, v)}" for k, v in result.items()) if isinstance(result, dict) else \
            _human("result", result)
        print(f"{answer.get('call_id', args.call_id)}: {answer.get('action', args.call_command)} done"
              + (f": {shown}" if shown and shown != "-" else ""))
    return EXIT_OK


# ---------------------------------------------------------------------- bans
def _print_bans(bans: list[dict]) -> None:
    _table(("IP", "ORIGIN", "DETECTOR", "SINCE", "UNTIL", "REASON"),
           [(b.get("ip"), b.get("origin"), b.get("detector") or "-", _when(b.get("created_ms")),
             _when(b.get("expires_ms")), b.get("reason") or "-") for b in bans])


@_api_command
def cmd_bans(args: argparse.Namespace) -> int:
    """List, add or lift bans of source addresses at the edge (through the REST API, admin scope)."""
    if args.bans_command == "list":
        answer = _api_call(args, "admin", "GET", "/bans")
        if args.json:
            _print_json(answer)
        else:
            _print_bans(answer.get("bans", []))
            print(f"{len(answer.get('bans', []))} ban(s) in force")
        return EXIT_OK
    if args.bans_command == "add":
        body = {"ip": args.ip, "for": args.duration, **({"reason": args.reason} if args.reason else {})}
        answer = _api_call(args, "admin", "POST", "/bans", body)
        if args.json:
            _print_json(answer)
        else:
            ban = answer.get("ban", {})
            print(f"banned {ban.get('ip')} at every edge until {_when(ban.get('expires_ms'))}: {ban.get('reason')}")
        return EXIT_OK
    answer = _api_call(args, "admin", "DELETE", f"/bans/{quote(args.ip, safe='')}")
    if args.json:
        _print_json(answer)
    else:
        print(f"{answer.get('ip')}: {'ban lifted at every edge' if answer.get('removed') else 'was not banned'}")
    return EXIT_OK


# ---------------------------------------------------------------------- phone
@_api_command
def cmd_phone_token(args: argparse.Namespace) -> int:
    """A short-lived phone token and the /phone address that calls `to` with it (REST API, phone scope)."""
    body = {"to": args.to, **({"ttl_s": args.ttl} if args.ttl else {})}
    answer = _api_call(args, "phone", "POST", "/phone/tokens", body)
    if args.json:
        _print_json(answer)
    else:
        print(f"{answer.get('url')}\n(calls {answer.get('to')} until {_when(answer.get('expires_at', 0) * 1000)})")
    return EXIT_OK


# ---------------------------------------------------------------------- drain
@_api_command
def cmd_drain(args: argparse.Namespace) -> int:
    """Drain one controller for a rolling upgrade: it takes no new calls, hands its media nodes
    over to the others, writes what it queued, then exits. --wait returns once it has exited."""
    import time

    status = _api_call(args, "admin", "GET", "/admin/status")
    instance = args.instance or status.get("instance")
    answer = _api_call(args, "admin", "POST", "/admin/drain", {"instance": instance}, ok=(202,))
    if args.json:
        _print_json(answer)
    else:
        print(f"controller {answer.get('instance')}: {answer.get('state')}")
    if not args.wait:
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            _api_call(args, "admin", "GET", "/admin/status")
        except ApiError as exc:
            if "is the controller running" in str(exc):
                print(f"controller {instance}: drained and stopped")
                return EXIT_OK
            raise
        time.sleep(0.2)
    return _fail(f"controller {instance} still running after {args.timeout:.0f}s")


# ---------------------------------------------------------------------- local stacks
def cmd_demo(args: argparse.Namespace) -> int:
    from controller.localstack.demo import run_demo

    return run_demo(keep=args.keep)


def cmd_up(args: argparse.Namespace) -> int:
    from controller.localstack.up import run_up

    return run_up(args.config or "callfabric.yaml", check=args.check, media=args.media)


# ---------------------------------------------------------------------- describing
def cmd_metrics_describe(args: argparse.Namespace) -> int:
    """Every metric the controller exports: name, type, labels, help."""
    from controller.metrics import Metrics

    described = Metrics().describe()
    if args.json:
        _print_json([{"name": n, "type": k, "labels": list(labels), "help": doc} for n, k, labels, doc in described])
        return EXIT_OK
    for name, kind, labels, doc in described:
        print(f"{name}  ({kind}{'; labels: ' + ', '.join(labels) if labels else ''})\n    {doc}")
    return EXIT_OK


def cmd_config_describe(args: argparse.Namespace) -> int:
    from controller.config import describe

    if args.json:
        _print_json([{"name": n, "environment": env, "default": default, "doc": doc}
                     for n, env, default, doc in describe()])
        return EXIT_OK
    for name, env, default, doc in describe():
        print(f"{name}  ({env}, default {default!r})\n    {doc}")
    return EXIT_OK


def _octal_mode(text: str) -> str:
    if not text.isdigit() or any(c > "7" for c in text) or int(text, 8) > 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file mode like 0640")
    return text


def cmd_edge_key(args: argparse.Namespace) -> int:
    """Make the key the edge policy file is signed with (edge_policy_key_file, Kamailio's
    EDGE_POLICY_KEY) unless the file exists: 64 random hex digits."""
    from controller.edge.bundle import BundleError, create_key, read_key

    try:
        made = create_key(args.path, int(args.mode, 8))
        read_key(args.path)
    except OSError as exc:
        return _fail(f"{args.path}: {exc.strerror or exc}")
    except BundleError as exc:
        return _fail(str(exc))
    print(f"{args.path}: {'new key written' if made else 'key already there, kept'}")
    return EXIT_OK


def cmd_api_openapi(args: argparse.Namespace) -> int:
    from controller.api.openapi import document

    print(json.dumps(document(), indent=2, sort_keys=True))
    return EXIT_OK


# ---------------------------------------------------------------------- parser
def _client_options(parser: argparse.ArgumentParser, scope: str | None, *, suppress: bool = False) -> None:
    """--config, and for commands speaking to the REST API --api and --token; `suppress` for the
    copies a command group accepts before its subcommand (`call --api URL transfer …`)."""
    default = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--config", help="settings file (default: $CALLFABRIC_CONFIG, else ./callfabric.yaml when "
                                         "present); its http_listen and api_tokens give the API address and token",
                        **default)
    if scope is not None:
        parser.add_argument("--api", help="the API's URL, e.g. http://127.0.0.1:8460 (/v1 optional; default: "
                                          "$CALLFABRIC_API, else the config's http_listen)", **default)
        parser.add_argument("--token", help=f"API token with the {scope} scope (default: $CALLFABRIC_TOKEN, else the "
                                            f"config's first api_tokens entry with that scope)", **default)


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output (times stay epoch milliseconds)")


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
    _json_option(explain)
    explain.set_defaults(func=cmd_policy_explain)
    test = policy_commands.add_parser("test", help="run the test cases in DIR/tests/*.yaml")
    test.add_argument("directory")
    test.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    test.set_defaults(func=cmd_policy_test)

    run = commands.add_parser("run", help="run the controller")
    _client_options(run, None)
    run.set_defaults(func=cmd_run)

    calls = commands.add_parser("calls", help="calls in the call store (Redis of the config, or --api)")
    calls_commands = calls.add_subparsers(dest="calls_command", required=True)
    listing = calls_commands.add_parser("list", help="live calls (or --recent ones)")
    listing.add_argument("--recent", action="store_true", help="the latest calls, ended ones included")
    listing.add_argument("--limit", type=int, default=50)
    show = calls_commands.add_parser("show", help="one call's record and timeline")
    show.add_argument("call_id")
    trace = calls_commands.add_parser("trace", help="a call's timeline with relative times")
    trace.add_argument("call_id")
    for sub, func in ((listing, cmd_calls_list), (show, cmd_calls_show), (trace, cmd_calls_trace)):
        _client_options(sub, "read")
        _json_option(sub)
        sub.set_defaults(func=func)

    call = commands.add_parser("call", help="act on a live call through the REST API (control scope)")
    _client_options(call, "control", suppress=True)
    call_commands = call.add_subparsers(dest="call_command", required=True)
    transfer = call_commands.add_parser("transfer", help="to another AI agent, a SIP destination, or away (--to: "
                                                         "cold transfer by SIP REFER)")
    transfer.add_argument("call_id")
    transfer.add_argument("--agent")
    transfer.add_argument("--destination")
    transfer.add_argument("--to", help="a sip: URI or a number: the far end is asked (REFER) to call it")
    transfer.add_argument("--method", default="refer", choices=("refer", "bridge"),
                          help="bridge: call it through the edge instead of asking the far end")
    transfer.add_argument("--header", action="append", default=[], help="NAME=VALUE carried in the Refer-To URI")
    transfer.add_argument("--no-fallback", action="store_true", help="no bridging when the REFER is refused")
    human = call_commands.add_parser("human", help="bring a human in (conference, --handoff or --listen)")
    human.add_argument("call_id")
    human.add_argument("--destination", required=True)
    human.add_argument("--handoff", action="store_true", help="the AI agent leaves when the human answers")
    human.add_argument("--listen", action="store_true", help="the human only listens (the agent's path stays direct)")
    human.add_argument("--summary")
    human.add_argument("--intent")
    human.add_argument("--sentiment")
    human.add_argument("--caller-id", help="who the human sees calling (default: the caller's number)")
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
    dtmf = call_commands.add_parser("dtmf", help="send DTMF digits (0-9 A-D * #, w/W pauses) to the caller or a human")
    dtmf.add_argument("call_id")
    dtmf.add_argument("digits")
    dtmf.add_argument("--to", default="caller", help="caller, or a human leg id (h3)")
    gather = call_commands.add_parser("gather", help="collect digits from the caller; result to a webhook or branches")
    gather.add_argument("call_id")
    gather.add_argument("--max-digits", type=int, default=32)
    gather.add_argument("--finish-key", default="#", help="'' for none")
    gather.add_argument("--timeout", default="5s", help="without a digit (5s, 1500ms)")
    gather.add_argument("--prompt", help="sound:NAME or a URL played first")
    gather.add_argument("--webhook", help="asked with the result; its answer's actions are carried out")
    gather.add_argument("--then", help='branches as JSON: [{"match": {"digits": "1"}, "actions": [...]}, ...]')
    record = call_commands.add_parser("record", help="record the call (both sides, the caller, or the agent side)")
    record.add_argument("call_id")
    record.add_argument("--channels", default="both", choices=("both", "caller", "agent"))
    record.add_argument("--beep", action="store_true", help="a beep first (consent)")
    record.add_argument("--announcement", help="sound:NAME or a URL played to everyone first (consent)")
    record.add_argument("--max-duration", help="at most this long (90s, 1h)")
    stop_record = call_commands.add_parser("stop-record", help="stop a recording (all of them without an id)")
    stop_record.add_argument("call_id")
    stop_record.add_argument("recording_id", nargs="?")
    originate = call_commands.add_parser("originate", help="call out through the edge; the agent joins on answer")
    originate.add_argument("to", help="sip:… or a number (with the policy's outbound_trunk)")
    originate.add_argument("--agent", required=True)
    originate.add_argument("--caller-id", help="who the callee sees calling (a number or '\"Name\" <number>')")
    originate.add_argument("--amd", type=int, metavar="SECONDS",
                           help="answering-machine detection for at most this long (1-30): call.amd says "
                                "human, machine or unknown before the agent joins")
    raw = call_commands.add_parser("action", help="any action document (JSON)")
    raw.add_argument("call_id")
    raw.add_argument("document")
    for sub in (transfer, human, fork, stop_fork, play, hang, dtmf, gather, record, stop_record, originate, raw):
        _client_options(sub, "control", suppress=True)
        _json_option(sub)
    call.set_defaults(func=cmd_call)

    bans = commands.add_parser("bans", help="sources banned at the edge: list, add, remove (REST API, admin scope)")
    _client_options(bans, "admin", suppress=True)
    bans_commands = bans.add_subparsers(dest="bans_command", required=True)
    ban_list = bans_commands.add_parser("list", help="bans in force, with why and until when")
    ban_add = bans_commands.add_parser("add", help="ban an address at every edge")
    ban_add.add_argument("ip")
    ban_add.add_argument("--for", dest="duration", default="1h", help="how long: 3600, 90s, 15m, 2h (default 1h)")
    ban_add.add_argument("--reason")
    ban_remove = bans_commands.add_parser("remove", help="lift a ban")
    ban_remove.add_argument("ip")
    for sub in (ban_list, ban_add, ban_remove):
        _client_options(sub, "admin", suppress=True)
        _json_option(sub)
    bans.set_defaults(func=cmd_bans)

    phone = commands.add_parser("phone", help="talk to an agent from a browser (/phone)")
    phone_commands = phone.add_subparsers(dest="phone_command", required=True)
    phone_token = phone_commands.add_parser("token", help="a short-lived phone token and the /phone address using it "
                                                          "(REST API, phone scope)")
    phone_token.add_argument("to", help="who the browser may call: the dialled user the policy routes (e.g. intake)")
    phone_token.add_argument("--ttl", type=int, help="life in seconds (default and cap: phone_token_ttl_s)")
    _client_options(phone_token, "phone")
    _json_option(phone_token)
    phone_token.set_defaults(func=cmd_phone_token)

    drain = commands.add_parser("drain", help="drain a controller (rolling upgrade): no new calls, media nodes "
                                              "handed over, then it exits (REST API, admin scope)")
    _client_options(drain, "admin")
    drain.add_argument("--instance", help="its instance_id (default: whatever controller answers --api)")
    drain.add_argument("--wait", action="store_true", help="return once the controller has exited")
    drain.add_argument("--timeout", type=float, default=60.0, help="how long --wait waits (seconds)")
    _json_option(drain)
    drain.set_defaults(func=cmd_drain)

    demo = commands.add_parser("demo", help="start Redis, Kamailio and the controller locally, place calls, report")
    demo.add_argument("--keep", action="store_true", help="keep the working directory (logs, SIPp traces)")
    demo.set_defaults(func=cmd_demo)

    up = commands.add_parser("up", help="the whole stack on this machine until Ctrl-C: Redis, Kamailio, the "
                                        "controller, Prometheus, a media node (Asterisk, or a stand-in)")
    up.add_argument("--config", help="settings file, written on the first run and reused (default: ./callfabric.yaml)")
    up.add_argument("--check", action="store_true", help="place one call through the stack (the running one, or "
                                                         "one started for it) and exit 0 if it did what it should")
    up.add_argument("--media", choices=("auto", "asterisk", "stand-in"), help="the media node (default: the config's "
                                                                             "x-up.media, auto)")
    up.set_defaults(func=cmd_up)

    edge = commands.add_parser("edge", help="the SIP edge's side of the controller")
    edge_commands = edge.add_subparsers(dest="edge_command", required=True)
    edge_key = edge_commands.add_parser("key", help="make the key the edge policy file is signed with (kept if the "
                                                    "file exists)")
    edge_key.add_argument("path", help="the key file (edge_policy_key_file, Kamailio's EDGE_POLICY_KEY)")
    edge_key.add_argument("--mode", default="0640", type=_octal_mode,
                          help="file mode of a new key (default 0640: Kamailio reads it through the group)")
    edge_key.set_defaults(func=cmd_edge_key)

    api = commands.add_parser("api", help="the REST API")
    api_commands = api.add_subparsers(dest="api_command", required=True)
    api_commands.add_parser("openapi", help="print the OpenAPI document (JSON)").set_defaults(func=cmd_api_openapi)

    metrics = commands.add_parser("metrics", help="the controller's Prometheus metrics")
    metrics_commands = metrics.add_subparsers(dest="metrics_command", required=True)
    metrics_describe = metrics_commands.add_parser("describe", help="every metric: name, type, labels")
    _json_option(metrics_describe)
    metrics_describe.set_defaults(func=cmd_metrics_describe)

    config = commands.add_parser("config", help="controller settings")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_describe = config_commands.add_parser("describe", help="every setting, its environment variable and default")
    _json_option(config_describe)
    config_describe.set_defaults(func=cmd_config_describe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A reader that stops reading (`| head`) ends it quietly, exit 141 like
    any Unix tool killed by SIGPIPE."""
    import os

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # the interpreter's own flush at exit must not complain
        return 141


if __name__ == "__main__":
    sys.exit(main())
