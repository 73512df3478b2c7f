"""One settings object for the controller: defaults, then a YAML file, then environment
variables (`CALLFABRIC_<NAME>`), later ones winning. Every setting is documented here and
listed in the README by `callfabric config describe`."""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(Exception):
    pass


def _setting(default: Any, doc: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(slots=True)
class Settings:
    policy_dir: str = _setting("policies", "Directory of routing policy YAML files (hot-reloaded).")
    policy_last_good_file: str = _setting("", "A local copy of the last policy served (besides the one in Redis): "
                                              "at start, when the files are refused, the newest copy serves, so a "
                                              "controller never starts without a policy it served before. Empty: "
                                              "Redis only.")
    policy_poll_s: float = _setting(1.0, "How often the policy directory is checked for changes (seconds).")
    redis_url: str = _setting("redis://127.0.0.1:6379/0", "Redis holding call state (redis:// or unix://); with "
                                                          "redis_mode cluster or sentinel, only its user, password "
                                                          "(and Sentinel: database) are used.")
    redis_mode: str = _setting("single", "single (redis_url), cluster (Redis Cluster: redis_nodes are seed nodes) or "
                                         "sentinel (redis_nodes are Sentinels watching redis_master_name).")
    redis_nodes: list = _setting([], "Redis Cluster seed nodes or Sentinels, host:port (list).")
    redis_master_name: str = _setting("callfabric", "The master's name the Sentinels know (redis_mode sentinel).")
    redis_outage_queue_max: int = _setting(10000, "State changes kept in memory, in order, while Redis is "
                                                  "unreachable; beyond, they are refused with a log line and a "
                                                  "metric.")
    redis_outage_decisions: str = _setting("open", "Decisions while Redis is unreachable: open (the policy decides, "
                                                   "counters read as 0, the record is queued), closed (503 + "
                                                   "Retry-After) or edge (the edge's own fallback).")
    lease_ttl_s: float = _setting(1.5, "Lifetime of a media node's ownership lease; renewed every third of it. A "
                                       "dead owner's node is taken over within about lease_ttl_s + lease_poll_s.")
    lease_poll_s: float = _setting(0.2, "How often a standby controller tries to take a media node's lease.")
    drain_timeout_s: float = _setting(30.0, "Longest a drain (SIGTERM, callfabric drain) waits for each of its "
                                            "steps before the controller exits anyway.")
    edge_evapi: list = _setting(["127.0.0.1:8448"], "Kamailio evapi endpoints (host:port) the controller connects to.")
    edge_max_in_flight: int = _setting(2000, "Decisions in progress at once per Kamailio; beyond, requests are "
                                             "shed and Kamailio applies its fallback.")
    edge_reconnect_max_s: float = _setting(5.0, "Longest wait between reconnection attempts to Kamailio (backoff).")
    edge_policy_file: str = _setting("", "Where the policy is written for the edges' own decisions (Kamailio's "
                                         "EDGE_POLICY: the same file, e.g. on a shared volume). Empty: the edges "
                                         "ask a controller for every call.")
    edge_trunks_dir: str = _setting("", "Where the trunk table is written for the edges (Kamailio's TRUNKS_DB: "
                                        "text://<this directory>, e.g. a volume shared with the edges only). Empty: "
                                        "the edges do not check trunks (every source may call).")
    edge_realm: str = _setting("callfabric", "Digest realm the edges challenge inbound trunks with.")
    edge_policy_key_file: str = _setting("", "The key file the edge policy file is signed with (HMAC-SHA256, at least "
                                             "32 bytes; `callfabric edge key PATH` makes one). Needed with "
                                             "edge_policy_file; Kamailio's EDGE_POLICY_KEY names the same key, and "
                                             "refuses a policy file that does not verify. Keep it where only you "
                                             "write (not beside the policy file).")
    edge_streams: list = _setting(["edge"], "Names of the edges (Kamailio's EDGE_NAME) whose event streams in Redis "
                                            "(cf:edge:{name}:events, Kamailio's EVENTS_REDIS) the controllers record; "
                                            "one controller consumes each at a time.")
    edge_events_batch: int = _setting(500, "Edge events applied per batch (two Redis pipelines a batch).")
    edge_events_linger_ms: int = _setting(50, "After a batch of edge events that was not full, wait this long for "
                                              "more (bigger batches cost less per call; records land that much "
                                              "later).")
    edge_rpc: list = _setting([], "Kamailio JSON-RPC endpoints (http://host:port/RPC) bans are pushed to; empty: "
                                  "bans are recorded but no edge enforces them.")
    trusted_peers: list = _setting([], "Addresses or subnets of trusted peers (carriers' SBCs, the media nodes if "
                                       "you want them listed) that are never banned: a ban on one is refused (API "
                                       "422, logged and counted for the policy's, Asterisk's and the edge's bans). "
                                       "The media nodes in the edges' dispatcher lists are trusted without being "
                                       "listed. Give Kamailio the same subnets (TRUSTED_NET).")
    ban_resync_s: float = _setting(30.0, "How often every ban in force is pushed to every edge again (an edge "
                                         "that restarted gets them back).")
    http_listen: str = _setting("127.0.0.1:8460", "host:port of the controller's HTTP server (/metrics, /healthz).")
    call_retention_s: int = _setting(7 * 86400, "How long a finished call's record and timeline stay in Redis.")
    live_call_ttl_s: int = _setting(6 * 3600, "Safety expiry of a live call's record if its end is never seen.")
    timeline_max_events: int = _setting(500, "Per-call timeline cap (oldest events trimmed).")
    ari_nodes: list = _setting([], "Asterisk media nodes, each 'name=http://user:password@host:8088/ari' "
                                   "(empty: no media plane).")
    ari_app: str = _setting("callfabric", "Stasis application name (the dialplan sends calls to it).")
    ari_edge_endpoint: str = _setting("edge", "PJSIP endpoint on the media nodes that reaches the Kamailio edge "
                                              "(calls to humans go out through it).")
    ami_nodes: list = _setting([], "AMI of the media nodes, each 'name=tcp://user:secret@host:5038' (security events, "
                                   "PJSIP contact status).")
    media_health_interval_s: float = _setting(5.0, "How often the RTP statistics of callers' channels are read.")
    one_way_audio_after_s: float = _setting(10.0, "Audio flowing one way only this long flags the call "
                                                  "(media.one_way_audio).")
    recording_dir: str = _setting("", "Where call recordings are fetched to from the media nodes (then removed from "
                                      "them); shared by the controllers for high availability. Empty: recordings "
                                      "stay on the node and are downloaded through ARI.")
    recording_retention_days: int = _setting(30, "Recordings in recording_dir older than this are deleted (0: kept).")
    rtpengine_ng: list = _setting([], "The edges' rtpengines (NG control: 'host:port', Kamailio's RTPENGINE_SOCK): "
                                      "forks of calls they anchor are copied there (fork_mode edge).")
    fork_mode: str = _setting("edge", "How forks are made: edge (the edge's rtpengine copies the party's RTP to the "
                                      "target; when the call is anchored there, the target is rtp in ulaw/alaw and "
                                      "one direction) or snoop (Asterisk snoop + ExternalMedia; also the fallback).")
    api_base_url: str = _setting("", "Public base URL of this controller's API (references in context headers).")
    outbound_trunk: str = _setting("", "The policy's outbound trunk that calls to phone numbers placed with POST "
                                       "/v1/calls leave through when the request names none (empty: the policy's "
                                       "only outbound trunk, if it declares exactly one).")
    phone_ws_url: str = _setting("", "The edge's secure WebSocket URL browsers reach (wss://sip.example.com:8443/, "
                                     "Kamailio WSS_PORT): /phone calls through it; empty: no /phone.")
    phone_token_secret: str = _setting("", "HMAC key of the browsers' phone tokens (the edge checks them with the same "
                                           "value, Kamailio PHONE_SECRET; set it through the environment, at least 16 "
                                           "characters).")
    phone_token_ttl_s: int = _setting(600, "Longest life of a phone token POST /v1/phone/tokens makes (seconds).")
    webhook_url: str = _setting("", "Where call events are POSTed (an agent's own `webhook` in the policy wins).")
    webhook_events: list = _setting([], "Event types sent to webhooks (e.g. call.*, fork.started); empty: all.")
    webhook_secret: str = _setting("", "HMAC-SHA256 key of the Callfabric-Signature header (set it through the "
                                       "environment).")
    edge_decision_budget_ms: int = _setting(200, "The edge's decision budget (Kamailio DECISION_TIMEOUT_MS): a "
                                                 "decision webhook gets this minus 40 ms at most.")
    api_tokens: list = _setting([], "API tokens, each 'name:scope[,scope]:secret' (scopes: read, control, admin; "
                                    "the secret: letters, digits and -._~+/ as in any Bearer token, at least 16). "
                                    "In the environment, tokens are separated by spaces: "
                                    "'ops:read,control,admin:S3cret... app:control:An0ther...'.")
    instance_id: str = _setting("", "Name of this controller instance (default: hostname:pid).")
    log_level: str = _setting("INFO", "Log level (DEBUG, INFO, WARNING, ERROR).")
    log_format: str = _setting("json", "json (one object per line, with call_id) or text.")
    log_levels: list = _setting([], "Per-module levels, e.g. 'callfabric.edge=DEBUG' (list).")

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = f"{socket.gethostname()}:{os.getpid()}"


def describe() -> list[tuple[str, str, Any, str]]:
    """(name, environment variable, default, doc) for every setting."""
    defaults = Settings(instance_id="-")
    return [(f.name, f"CALLFABRIC_{f.name.upper()}", getattr(defaults, f.name) if f.name != "instance_id" else "",
             f.metadata["doc"]) for f in fields(Settings)]


# Lists in the environment are comma-separated, except where an entry holds commas itself:
# an API token's scopes (`ops:read,control:secret`), so tokens are separated by whitespace
# (which no Bearer token can contain).
_WHITESPACE_LISTS = {"api_tokens"}


def _coerce(name: str, kind: Any, value: Any) -> Any:
    kind = {"str": str, "int": int, "float": float, "list": list}.get(kind, kind) if isinstance(kind, str) else kind
    try:
        if kind is list:
            if isinstance(value, str):
                if name in _WHITESPACE_LISTS:
                    return value.split()
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
            raise ValueError("expected a list of strings")
        if kind is int and isinstance(value, bool):
            raise ValueError("expected an integer")
        if kind in (int, float) and isinstance(value, str):
            return kind(value.strip())
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise ValueError(f"expected {kind.__name__}")
        return value
    except ValueError as exc:
        raise ConfigError(f"setting {name}: {value!r}: {exc}") from None


def default_config_path(environ: Mapping[str, str] | None = None) -> str | None:
    """The settings file used without --config: $CALLFABRIC_CONFIG, else ./callfabric.yaml
    when there is one (what `callfabric up` writes), else none (defaults + environment)."""
    environ = os.environ if environ is None else environ
    if environ.get("CALLFABRIC_CONFIG"):
        return environ["CALLFABRIC_CONFIG"]
    return "callfabric.yaml" if Path("callfabric.yaml").is_file() else None


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    known = {f.name: f for f in fields(Settings)}
    if path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must be a mapping of settings")
        for key, value in data.items():
            if isinstance(key, str) and key.startswith("x-"):   # other tools' sections (`callfabric up`'s x-up)
                continue
            if key not in known:
                raise ConfigError(f"config file {path}: unknown setting {key!r} (known: {', '.join(known)})")
            values[key] = _coerce(key, known[key].type, value)
    for name, f in known.items():
        env = environ.get(f"CALLFABRIC_{name.upper()}")
        if env is not None:
            values[name] = _coerce(name, f.type, env)
    settings = Settings(**values)
    if path and not os.path.isabs(settings.policy_dir) and "policy_dir" in values and \
            "CALLFABRIC_POLICY_DIR" not in environ:
        settings.policy_dir = str((Path(path).parent / settings.policy_dir).resolve())
    return settings


def split_host_port(text: str, setting: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"setting {setting}: {text!r} is not host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_ari_node(text: str):
    """'name=http://user:password@host:port/ari' → AriNode."""
    from urllib.parse import unquote, urlsplit

    from controller.media.ari import AriNode

    name, sep, url = text.partition("=")
    parts = urlsplit(url.strip())
    if not sep or not name.strip() or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"setting ari_nodes: {text!r} is not 'name=http://user:password@host:port/ari'")
    if not parts.username or not parts.password:
        raise ConfigError(f"setting ari_nodes: {name.strip()}: the URL needs the ARI user and password")
    netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    if ":" in parts.hostname:
        netloc = f"[{parts.hostname}]" + (f":{parts.port}" if parts.port else "")
    base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/') or '/ari'}"
    return AriNode(name.strip(), base, unquote(parts.username), unquote(parts.password))


def redis_target(settings: Settings):
    """Where the call state lives (a state.connect.RedisTarget), or ConfigError."""
    from controller.state.connect import RedisTarget

    try:
        return RedisTarget(settings.redis_mode, settings.redis_url, tuple(settings.redis_nodes),
                           settings.redis_master_name)
    except ValueError as exc:
        raise ConfigError(f"setting {exc}") from None


def trusted_networks(settings: Settings):
    """The trusted_peers setting as networks, or ConfigError."""
    from controller.security.trust import parse_networks

    try:
        return parse_networks(settings.trusted_peers)
    except ValueError as exc:
        raise ConfigError(f"setting {exc}") from None


LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def check_settings(settings: Settings) -> None:
    """Everything the controller would refuse later, refused now with one line (ConfigError)."""
    from controller.api.auth import parse_tokens
    from controller.edge.decisions import STATE_UNAVAILABLE_MODES
    from controller.media.ami import parse_ami_node

    split_host_port(settings.http_listen, "http_listen")
    for endpoint in settings.edge_evapi:
        split_host_port(endpoint, "edge_evapi")
    for url in settings.edge_rpc:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"setting edge_rpc: {url!r} is not http://host:port/RPC")
    for text in settings.ari_nodes:
        parse_ari_node(text)
    for text in settings.ami_nodes:
        try:
            parse_ami_node(text)
        except ValueError as exc:
            raise ConfigError(f"setting ami_nodes: {exc}") from None
    try:
        parse_tokens(settings.api_tokens)
    except ValueError as exc:
        raise ConfigError(f"setting {exc}") from None
    trusted_networks(settings)
    if settings.edge_policy_file and not settings.edge_policy_key_file:
        raise ConfigError("setting edge_policy_key_file: needed with edge_policy_file (the edges refuse unsigned "
                          "policy files); `callfabric edge key PATH` writes one")
    redis_target(settings)
    if settings.redis_outage_decisions not in STATE_UNAVAILABLE_MODES:
        raise ConfigError(f"setting redis_outage_decisions: {settings.redis_outage_decisions!r}: expected one of "
                          f"{', '.join(STATE_UNAVAILABLE_MODES)}")
    for edge in settings.edge_streams:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", edge):
            raise ConfigError(f"setting edge_streams: {edge!r} is not an edge name (Kamailio's EDGE_NAME: letters, "
                              "digits, - _ .)")
    if settings.edge_events_batch < 1:
        raise ConfigError(f"setting edge_events_batch: {settings.edge_events_batch}: expected 1 or more events")
    if not 0 <= settings.edge_events_linger_ms <= 1000:
        raise ConfigError(f"setting edge_events_linger_ms: {settings.edge_events_linger_ms}: expected 0 to 1000")
    if settings.recording_retention_days < 0:
        raise ConfigError(f"setting recording_retention_days: {settings.recording_retention_days}: 0 (keep) or more")
    if settings.recording_dir and os.path.exists(settings.recording_dir) and not os.path.isdir(settings.recording_dir):
        raise ConfigError(f"setting recording_dir: {settings.recording_dir!r} is not a directory")
    if settings.phone_ws_url and not re.fullmatch(r"wss://[^/\s]+(/\S*)?", settings.phone_ws_url):
        raise ConfigError(f"setting phone_ws_url: {settings.phone_ws_url!r} is not a wss:// URL (browsers only call "
                          "over a secure WebSocket)")
    if settings.phone_token_secret and len(settings.phone_token_secret) < 16:
        raise ConfigError("setting phone_token_secret: at least 16 characters (anyone who guesses it can make phone "
                          "tokens)")
    if not 10 <= settings.phone_token_ttl_s <= 86400:
        raise ConfigError(f"setting phone_token_ttl_s: {settings.phone_token_ttl_s}: 10 to 86400 seconds")
    if settings.fork_mode not in ("edge", "snoop"):
        raise ConfigError(f"setting fork_mode: {settings.fork_mode!r}: expected edge or snoop")
    for address in settings.rtpengine_ng:
        try:
            split_host_port(address, "rtpengine_ng")
        except ConfigError:
            raise ConfigError(f"setting rtpengine_ng: {address!r} is not host:port (rtpengine's --listen-ng)") from None
    if settings.outbound_trunk and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", settings.outbound_trunk):
        raise ConfigError(f"setting outbound_trunk: {settings.outbound_trunk!r} is not a trunk name: it now names an "
                          "outbound trunk of the policy (declare the carrier there, e.g. trunks: {carrier: {outbound: "
                          f"{{address: \"{settings.outbound_trunk}\"}}}}}}, and set outbound_trunk: carrier)")
    if settings.log_format not in LOG_FORMATS:
        raise ConfigError(f"setting log_format: {settings.log_format!r}: expected json or text")
    for entry in [f"={settings.log_level}", *settings.log_levels]:
        logger, sep, level = entry.partition("=")
        if not sep or level.upper() not in LOG_LEVELS or (entry[0] != "=" and not logger.strip()):
            raise ConfigError(f"setting log_level(s): {entry.lstrip('=')!r}: expected [module=]"
                              f"{'|'.join(LOG_LEVELS)}")
