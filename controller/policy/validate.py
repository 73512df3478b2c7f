"""Policy loading and validation: every problem, at once, with file:line:column and the path
of the offending key. Structure is checked against the JSON Schema; meaning (references,
regexes, addresses, time zones, header safety, one terminal action per rule …) here."""
from __future__ import annotations

import difflib
import hashlib
import os
import re
from pathlib import Path as FsPath
from typing import Any, Callable, Iterable

from controller.actions import (
    TERMINAL_VERBS, canonical_action, header_name_problem,
    header_value_problem, parse_duration_ms, reason_problem,
)
from controller.policy import conditions as cond
from controller.json_schema import SchemaValidator
from controller.schema_errors import TYPE_WORDS, describe, json_type, show
from controller.policy.gathered import media_action_problems
from controller.policy.actionset import PLACEHOLDER, PLACEHOLDERS, REASON_PHRASES, ActionSet, build_action_set
from controller.policy.model import (
    Agent, Destination, Detector, Digest, ForkTarget, InboundTrunk, NodeSet, OutboundTrunk, PolicyInvalid, PolicyIssue,
    PolicySource, Position, RuleSource, Secret, SecurityPolicy, Settings, Tenant, Trunk,
)
from controller.policy.numbers import Numbering
from controller.policy.schema import policy_file_schema
from controller.policy.yamlpos import Path, PositionedDocument, YamlSyntaxError, load_yaml

POLICY_SUFFIXES = (".yaml", ".yml")
MAX_POLICY_FILE_BYTES = 8 * 1024 * 1024
DECLARATION_SECTIONS = {
    "node_sets": "node set", "agents": "agent", "destinations": "destination", "fork_targets": "fork target",
    "number_lists": "number list", "risk_lists": "risk list", "tenants": "tenant", "trunks": "trunk",
}
_SIP_URI = re.compile(r"^sips?:(?:[^@\s<>\"]+@)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::[0-9]{1,5})?(?:;[^\s<>\"]*)?$")
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::[0-9]{1,5})?$")
_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):([0-9]{1,5})$")
_CONNECTION_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_policy_dir(directory: str | os.PathLike[str]) -> "PolicySource":
    """Read and validate every *.yaml / *.yml file of `directory` (not its sub-folders)."""
    root = FsPath(directory)
    if not root.is_dir():
        raise PolicyInvalid([PolicyIssue(Position(str(directory), 1, 1), "", "policy directory does not exist")])
    names = sorted(p.name for p in root.iterdir()
                   if p.is_file() and p.suffix in POLICY_SUFFIXES and not p.name.startswith("."))
    texts: dict[str, str] = {}
    issues: list[PolicyIssue] = []
    for name in names:
        text = _read_text(root / name, name, issues)
        if text is not None:
            texts[name] = text

    def read_extra(relative: str) -> str:
        path = _inside(root, relative)
        try:
            if path.stat().st_size > MAX_POLICY_FILE_BYTES:
                raise ValueError(f"{relative!r} is larger than {MAX_POLICY_FILE_BYTES} bytes")
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{relative!r} is not UTF-8 (byte {exc.start})") from None
        except OSError as exc:
            raise ValueError(f"cannot read file {relative!r}: {exc.strerror or exc}") from None

    return build_policy_source(texts, read_extra, early_issues=issues, label=str(root))


def _read_text(path: FsPath, name: str, issues: list[PolicyIssue]) -> str | None:
    try:
        if path.stat().st_size > MAX_POLICY_FILE_BYTES:
            issues.append(PolicyIssue(Position(name, 1, 1), "", f"file is larger than {MAX_POLICY_FILE_BYTES} bytes"))
            return None
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        issues.append(PolicyIssue(Position(name, 1, 1), "", f"file is not UTF-8 (byte {exc.start})"))
    except OSError as exc:
        issues.append(PolicyIssue(Position(name, 1, 1), "", f"cannot read file: {exc.strerror or exc}"))
    return None


def _inside(root: FsPath, relative: str) -> FsPath:
    if not isinstance(relative, str) or os.path.isabs(relative):
        raise ValueError(f"{relative!r} must be a path relative to the policy directory")
    path = (root / relative).resolve()
    if root.resolve() not in path.parents:
        raise ValueError(f"{relative!r} points outside the policy directory")
    return path


def build_policy_source(texts: dict[str, str], read_extra: Callable[[str], str] | None = None, *,
                        early_issues: list[PolicyIssue] | None = None, label: str = "<memory>") -> PolicySource:
    """Validate policy files given as {file name: text}; raise PolicyInvalid with every issue."""
    builder = _Builder(texts, read_extra or _no_extra_files, list(early_issues or []))
    return builder.build()


def _no_extra_files(relative: str) -> str:
    raise ValueError(f"cannot read {relative!r}: no policy directory")


_SCHEMA = policy_file_schema()
_VALIDATOR = SchemaValidator(_SCHEMA)
class _Builder:
    def __init__(self, texts: dict[str, str], read_extra: Callable[[str], str], issues: list[PolicyIssue]):
        self.texts = texts
        self.read_extra = read_extra
        self.issues = issues
        self.extra_texts: dict[str, str] = {}
        self.docs: list[PositionedDocument] = []
        self.broken: set[tuple[int, Path]] = set()  # (doc id, item path) with structural errors

    # -- reporting ---------------------------------------------------------------------------
    def error(self, doc: PositionedDocument, path: Path, message: str, *, key: bool = False,
              severity: str = "error") -> None:
        self.issues.append(PolicyIssue(doc.position(path, key=key), dotted(path), message, severity))

    # -- pipeline ----------------------------------------------------------------------------
    def build(self) -> PolicySource:
        for name, text in self.texts.items():
            try:
                doc = load_yaml(text, name)
            except YamlSyntaxError as exc:
                self.issues.append(PolicyIssue(exc.position, "", exc.message))
                continue
            if doc.data is None:
                doc.data = {}
            self.docs.append(doc)
            self._check_schema(doc)
        decls = self._merge()
        source = self._semantics(decls)
        errors = [i for i in self.issues if i.severity == "error"]
        if errors or source is None:
            raise PolicyInvalid(sorted(self.issues, key=_issue_order))
        source.warnings = tuple(sorted(self.issues, key=_issue_order))
        return source

    # -- structure ---------------------------------------------------------------------------
    def _check_schema(self, doc: PositionedDocument) -> None:
        if not isinstance(doc.data, dict):
            self.error(doc, (), f"a policy file must be a mapping of sections, got {TYPE_WORDS[json_type(doc.data)]}")
            return
        for error in _VALIDATOR.iter_errors(doc.data):
            self.broken.add((id(doc), _item_path(tuple(error.absolute_path))))
            for path, message, key in describe(error):
                self.error(doc, path, message, key=key)

    def valid(self, doc: PositionedDocument, path: Path) -> bool:
        """Whether the item at `path` (a declaration, a rule, settings, default) passed the schema."""
        return isinstance(doc.data, dict) and not any((id(doc), path[:k]) in self.broken for k in range(len(path) + 1))

    # -- merge -------------------------------------------------------------------------------
    def _merge(self) -> dict[str, dict[str, tuple[PositionedDocument, Path, Any]]]:
        decls: dict[str, dict[str, tuple[PositionedDocument, Path, Any]]] = {s: {} for s in DECLARATION_SECTIONS}
        for doc in self.docs:
            if not isinstance(doc.data, dict):
                continue
            for section, noun in DECLARATION_SECTIONS.items():
                entries = doc.data.get(section)
                if not isinstance(entries, dict):
                    continue
                for name, body in entries.items():
                    path = (section, name)
                    if name in decls[section]:
                        first_doc, first_path, _ = decls[section][name]
                        self.error(doc, path, f"{noun} {name!r} is already declared at {first_doc.position(first_path, key=True)}",
                                   key=True)
                        continue
                    decls[section][name] = (doc, path, body)
        return decls

    # -- meaning -----------------------------------------------------------------------------
    def _semantics(self, decls: dict[str, dict[str, tuple[PositionedDocument, Path, Any]]]) -> PolicySource | None:
        settings = self._settings()
        numbering = settings.numbering if settings else Numbering()
        self.decl_names = {section: set(entries) for section, entries in decls.items()}

        node_sets = {name: NodeSet(name, body["dispatcher_set"])
                     for name, (doc, path, body) in decls["node_sets"].items() if self.valid(doc, path)}
        agents: dict[str, Agent] = {}
        for name, (doc, path, body) in decls["agents"].items():
            if not self.valid(doc, path):
                continue
            transport = body.get("transport", "rtp")
            self._check_endpoint(doc, path + ("endpoint",), body["endpoint"], transport)
            if body["node_set"] not in self.decl_names["node_sets"]:
                self._unknown(doc, path + ("node_set",), "node set", body["node_set"])
            elif body["node_set"] in node_sets:
                agents[name] = Agent(name, node_sets[body["node_set"]], body["endpoint"], transport,
                                     body.get("codec", "ulaw" if transport == "rtp" else "slin16"), body.get("webhook"))
        trunks = {name: self._trunk(name, doc, path, body, numbering)
                  for name, (doc, path, body) in decls["trunks"].items() if self.valid(doc, path)}
        self._trunk_failover(decls["trunks"], trunks)
        destinations: dict[str, Destination] = {}
        for name, (doc, path, body) in decls["destinations"].items():
            if not self.valid(doc, path):
                continue
            if ("uri" in body) == ("trunk" in body) or ("trunk" in body) != ("number" in body):
                self.error(doc, path, "a destination is either a SIP `uri` (with its `failover` URIs) or a phone "
                                      "`number` called through an outbound `trunk`")
                continue
            if "trunk" in body:
                destination = self._trunk_destination(name, doc, path, body, trunks, numbering)
                if destination is not None:
                    destinations[name] = destination
                continue
            uris = [body["uri"]] + list(body.get("failover", []))
            for i, uri in enumerate(uris):
                sub = path + (("uri",) if i == 0 else ("failover", i - 1))
                if not isinstance(uri, str) or not _SIP_URI.match(uri):
                    self.error(doc, sub, f"{show(uri)} is not a SIP URI (e.g. 'sip:desk@pbx.example.com:5060')")
            destinations[name] = Destination(name, tuple(uris), body.get("attempt_timeout_ms"),
                                             caller_id=body.get("caller_id"))
        fork_targets: dict[str, ForkTarget] = {}
        for name, (doc, path, body) in decls["fork_targets"].items():
            if not self.valid(doc, path):
                continue
            transport = body.get("transport", "rtp")
            self._check_endpoint(doc, path + ("endpoint",), body["endpoint"], transport)
            fork_targets[name] = ForkTarget(name, body["endpoint"], transport,
                                            body.get("codec", "slin16"), body.get("direction", "in"))
        number_lists = {name: self._number_list(doc, path, body, numbering)
                        for name, (doc, path, body) in decls["number_lists"].items() if self.valid(doc, path)}
        risk_lists = {name: self._risk_list(doc, path, body)
                      for name, (doc, path, body) in decls["risk_lists"].items() if self.valid(doc, path)}
        tenants = tuple(self._tenant(name, doc, path, body)
                        for name, (doc, path, body) in decls["tenants"].items() if self.valid(doc, path))

        self.context = dict(agents=agents, destinations=destinations, fork_targets=fork_targets)
        rules: list[RuleSource] = []
        seen_rules: dict[str, Position] = {}
        default: tuple[PositionedDocument, Path, Any] | None = None
        for doc in self.docs:
            if not isinstance(doc.data, dict):
                continue
            if "default" in doc.data:
                if default is not None:
                    self.error(doc, ("default",), f"the default is already given at {default[0].position(('default',), key=True)}",
                               key=True)
                else:
                    default = (doc, ("default",), doc.data["default"])
            raw_rules = doc.data.get("rules")
            if not isinstance(raw_rules, list):
                continue
            for i, raw in enumerate(raw_rules):
                path = ("rules", i)
                if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                    continue
                name = raw["name"]
                if name in seen_rules:
                    self.error(doc, path + ("name",), f"rule {name!r} is already defined at {seen_rules[name]}")
                    continue
                seen_rules[name] = doc.position(path)
                if not self.valid(doc, path):
                    continue
                if name in ("default", "security", "trunk"):
                    self.error(doc, path + ("name",), f"{name!r} is reserved: it names decisions made by the "
                                                      f"policy's {name}")
                if raw.get("match") is not None and self.valid(doc, path + ("match",)):
                    self._condition(doc, path + ("match",), raw["match"], settings, numbering, number_lists,
                                    risk_lists, tenants)
                actions = self._actions(doc, path + ("actions",), raw["actions"], "rule")
                rules.append(RuleSource(name, len(rules), doc.position(path), raw.get("match"), actions,
                                        raw.get("enabled", True)))
        if default is None:
            first = self.docs[0] if self.docs else None
            position = first.position(()) if first else Position("<policy>", 1, 1)
            self.issues.append(PolicyIssue(position, "default",
                                           "the policy has no default: add a `default:` section with actions to one file"))
            return None
        doc, path, body = default
        if not self.valid(doc, path):
            return None
        default_actions = self._actions(doc, path + ("actions",), body["actions"], "default")
        self._reachability(rules)
        security = self._security(settings, numbering, number_lists, risk_lists, tenants)
        if any(i.severity == "error" for i in self.issues) or settings is None:
            return None
        return PolicySource(
            version=self._version(), files=tuple(sorted(self.texts)), settings=settings, node_sets=node_sets,
            agents=agents, destinations=destinations, fork_targets=fork_targets, number_lists=number_lists,
            risk_lists=risk_lists, tenants=tenants, rules=tuple(rules), default=default_actions,
            default_position=doc.position(path), security=security, trunks=trunks,
        )

    def _version(self) -> str:
        digest = hashlib.sha256()
        for name, text in sorted({**self.texts, **self.extra_texts}.items()):
            digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        return digest.hexdigest()[:12]

    def _unknown(self, doc: PositionedDocument, path: Path, noun: str, name: Any) -> None:
        section = next(s for s, n in DECLARATION_SECTIONS.items() if n == noun)
        known = sorted(self.decl_names.get(section, ())) if hasattr(self, "decl_names") else []
        hint = difflib.get_close_matches(str(name), known, n=1)
        tail = f" (did you mean {hint[0]!r}?)" if hint else (f" (declared: {', '.join(known)})" if known else
                                                          f" (none declared under `{section}`)")
        self.error(doc, path, f"unknown {noun} {name!r}{tail}")

    def _settings(self) -> Settings | None:
        found: tuple[PositionedDocument, dict[str, Any]] | None = None
        for doc in self.docs:
            if isinstance(doc.data, dict) and "settings" in doc.data:
                if found is not None:
                    self.error(doc, ("settings",), f"settings are already given at {found[0].position(('settings',), key=True)}",
                               key=True)
                    continue
                found = (doc, doc.data["settings"])
        if found is None:
            return Settings(Numbering(), "UTC")
        doc, body = found
        if not self.valid(doc, ("settings",)) or not isinstance(body, dict):
            return None
        tz = body.get("timezone", "UTC")
        try:
            cond.zone(tz)
        except ValueError as exc:
            self.error(doc, ("settings", "timezone"), str(exc))
            return None
        numbering = body.get("numbering", {})
        intl = cond.as_list(numbering.get("international_prefix", ["00"]))
        return Settings(
            Numbering(country_code=numbering.get("country_code"),
                      international_prefixes=tuple(sorted(intl, key=len, reverse=True)),
                      national_prefix=numbering.get("national_prefix"),
                      min_national_length=numbering.get("min_national_length", 7)),
            tz,
            body.get("limits_without_counters", "open"),
        )

    def _check_endpoint(self, doc: PositionedDocument, path: Path, endpoint: str, transport: str) -> None:
        if transport == "websocket":
            if not _CONNECTION_ID.match(endpoint):
                self.error(doc, path, f"{show(endpoint)}: a websocket endpoint is the id of a connection in "
                                      "Asterisk's websocket_client.conf (letters, digits, '_', '.', '-')")
            return
        match = _HOST_PORT.match(endpoint)
        if not match or not 0 < int(match.group(1)) < 65536:
            self.error(doc, path, f"{show(endpoint)} is not host:port (e.g. '10.0.0.5:4000' or '[2001:db8::5]:4000')")

    def _number_list(self, doc: PositionedDocument, path: Path, body: Any, numbering: Numbering) -> frozenset[str]:
        numbers: set[str] = set()
        if isinstance(body, list):
            for i, entry in enumerate(body):
                try:
                    numbers.add(cond.number_pattern(entry, numbering))
                except ValueError as exc:
                    self.error(doc, path + (i,), str(exc))
            return frozenset(numbers)
        for line_no, entry in self._list_file(doc, path + ("file",), body["file"]):
            try:
                numbers.add(cond.number_pattern(entry, numbering))
            except ValueError as exc:
                self.issues.append(PolicyIssue(Position(body["file"], line_no, 1), "", str(exc)))
        return frozenset(numbers)

    def _risk_list(self, doc: PositionedDocument, path: Path, body: Any) -> tuple[str, ...]:
        prefixes: set[str] = set()
        entries: list[tuple[Path | Position, Any]] = []
        if isinstance(body, list):
            entries = [(path + (i,), e) for i, e in enumerate(body)]
        else:
            entries = [(path + ("prefixes", i), e) for i, e in enumerate(body.get("prefixes", []))]
            if "file" in body:
                entries += [(Position(body["file"], n, 1), e) for n, e in self._list_file(doc, path + ("file",), body["file"])]
            if not entries and "file" not in body:
                self.error(doc, path, "a risk list needs `prefixes` or a `file`")
        for where, entry in entries:
            try:
                prefixes.add(cond.risk_prefix(entry))
            except ValueError as exc:
                if isinstance(where, Position):
                    self.issues.append(PolicyIssue(where, "", str(exc)))
                else:
                    self.error(doc, where, str(exc))
        return tuple(sorted(prefixes))

    def _list_file(self, doc: PositionedDocument, path: Path, relative: str) -> list[tuple[int, str]]:
        try:
            text = self.read_extra(relative)
        except ValueError as exc:
            self.error(doc, path, str(exc))
            return []
        self.extra_texts[relative] = text
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                out.append((n, entry))
        return out

    def _tenant(self, name: str, doc: PositionedDocument, path: Path, body: dict[str, Any]) -> Tenant:
        trunks = []
        for i, text in enumerate(body.get("trunks", [])):
            try:
                trunks.append(cond.parse_network(text))
            except ValueError as exc:
                self.error(doc, path + ("trunks", i), str(exc))
        header = body.get("header")
        if header:
            problem = header_name_problem(header["name"]) if not header["name"].lower().startswith("x-callfabric-") else None
            if problem and "token" in problem:
                self.error(doc, path + ("header", "name"), problem)
        return Tenant(name, tuple(trunks), header["name"].lower() if header else None, header["equals"] if header else None)

    # -- trunks --------------------------------------------------------------------------------
    def _digest(self, doc: PositionedDocument, path: Path, body: dict[str, Any] | None) -> Digest | None:
        if body is None:
            return None
        if ("password_env" in body) == ("password_file" in body):
            self.error(doc, path, "give the password's source: exactly one of `password_env` (an environment "
                                  "variable) or `password_file` (a secret file); never the password itself")
        file = body.get("password_file")
        if file is not None and not os.path.isabs(file):
            self.error(doc, path + ("password_file",), f"{show(file)}: give the secret file's absolute path")
        return Digest(body["username"], Secret(env=body.get("password_env"), file=file), body.get("realm"))

    def _trunk(self, name: str, doc: PositionedDocument, path: Path, body: dict[str, Any],
               numbering: Numbering) -> Trunk:
        inbound = outbound = None
        raw_in = body.get("inbound")
        if raw_in is not None:
            sub = path + ("inbound",)
            sources = []
            for i, text in enumerate(raw_in.get("sources", [])):
                try:
                    sources.append(cond.parse_network(text))
                except ValueError as exc:
                    self.error(doc, sub + ("sources", i), str(exc))
            if not raw_in.get("sources") and "digest" not in raw_in:
                self.error(doc, sub, "an inbound trunk needs `sources` (addresses / CIDRs), `digest` credentials, "
                                     "or both: otherwise nobody could be recognised as this trunk")
            numbers = raw_in.get("numbers")
            if isinstance(numbers, list):
                numbers = {"exact": numbers}
            if numbers is not None:
                self._number_match(doc, sub + ("numbers",), numbers, numbering)
            tenant = raw_in.get("tenant")
            if tenant is not None and tenant not in self.decl_names["tenants"]:
                self._unknown(doc, sub + ("tenant",), "tenant", tenant)
            inbound = InboundTrunk(tuple(sources), self._digest(doc, sub + ("digest",), raw_in.get("digest")),
                                   numbers, tenant, tuple(cond.as_list(raw_in.get("transports", []))),
                                   raw_in.get("media", "always"), raw_in.get("srtp", "optional"))
            if inbound.srtp != "off" and inbound.media == "never":
                self.error(doc, sub + ("srtp",), "SRTP ends at the edge's rtpengine: a trunk with `srtp: "
                                                 f"{inbound.srtp}` needs `media: always` or `nat-only`")
        raw_out = body.get("outbound")
        if raw_out is not None:
            sub = path + ("outbound",)
            address = raw_out["address"]
            if not _HOST.match(address):
                self.error(doc, sub + ("address",), f"{show(address)} is not host[:port] (e.g. 'sip.carrier.example:5061')")
            caller_ids = []
            for i, number in enumerate(raw_out.get("caller_ids", [])):
                normalised = numbering.normalise(str(number))
                if not normalised.startswith("+"):
                    self.error(doc, sub + ("caller_ids", i), f"{show(number)} is not a phone number (E.164 after "
                                                             "normalisation)")
                caller_ids.append(normalised)
            outbound = OutboundTrunk(address, raw_out.get("transport", "udp"),
                                     self._digest(doc, sub + ("digest",), raw_out.get("digest")),
                                     raw_out.get("from_host"), tuple(caller_ids), tuple(raw_out.get("failover", [])),
                                     raw_out.get("media", "always"), raw_out.get("srtp", "off"), raw_out.get("tls_name"))
            if outbound.tls_name and outbound.transport != "tls":
                self.error(doc, sub + ("tls_name",), "`tls_name` is the name the carrier's TLS certificate must carry: "
                                                     "it needs `transport: tls`")
            if outbound.srtp == "required" and outbound.media != "always":
                self.error(doc, sub + ("srtp",), "SRTP toward the carrier is made by the edge's rtpengine: a trunk "
                                                 "with `srtp: required` needs `media: always`")
        return Trunk(name, inbound, outbound, doc.position(path, key=True))

    def _trunk_failover(self, decls: dict[str, tuple[PositionedDocument, Path, Any]], trunks: dict[str, Trunk]) -> None:
        """An outbound trunk's failover names other outbound trunks, never itself."""
        self.inbound_trunks = {n for n, t in trunks.items() if t.inbound is not None}
        for name, trunk in trunks.items():
            if trunk.outbound is None:
                continue
            doc, path, _ = decls[name]
            for i, other in enumerate(trunk.outbound.failover):
                where = path + ("outbound", "failover", i)
                if other not in self.decl_names["trunks"]:
                    self._unknown(doc, where, "trunk", other)
                elif other == name:
                    self.error(doc, where, "a trunk cannot fail over to itself")
                elif other in trunks and trunks[other].outbound is None:
                    self.error(doc, where, f"trunk {other!r} has no `outbound` part")

    def _trunk_destination(self, name: str, doc: PositionedDocument, path: Path, body: dict[str, Any],
                           trunks: dict[str, Trunk], numbering: Numbering) -> Destination | None:
        """A phone number reached through an outbound trunk (then its failover trunks)."""
        trunk_name = body["trunk"]
        if "failover" in body:
            self.error(doc, path + ("failover",), "a destination through a trunk fails over to the trunk's own "
                                                  "`failover` trunks")
        if trunk_name not in self.decl_names["trunks"]:
            self._unknown(doc, path + ("trunk",), "trunk", trunk_name)
            return None
        trunk = trunks.get(trunk_name)
        if trunk is None:
            return None
        if trunk.outbound is None:
            self.error(doc, path + ("trunk",), f"trunk {trunk_name!r} has no `outbound` part")
            return None
        number = numbering.normalise(str(body["number"]))
        if not number.startswith("+"):
            self.error(doc, path + ("number",), f"{show(body['number'])} is not a phone number (E.164 after normalisation)")
        chain_ = [trunk_name] + [t for t in trunk.outbound.failover if t in trunks and trunks[t].outbound is not None]
        return Destination(name, tuple(trunks[t].outbound.uri(number, t) for t in chain_), body.get("attempt_timeout_ms"),
                           tuple(chain_), caller_id=body.get("caller_id"))

    # -- conditions ----------------------------------------------------------------------------
    def _condition(self, doc, path, node, settings, numbering, number_lists, risk_lists, tenants) -> None:
        recurse = lambda p, n: self._condition(doc, p, n, settings, numbering, number_lists, risk_lists, tenants)  # noqa: E731
        for kind, value in node.items():
            sub = path + (kind,)
            try:
                if kind in ("all", "any"):
                    for i, item in enumerate(value):
                        recurse(sub + (i,), item)
                elif kind == "not":
                    recurse(sub, value)
                elif kind in ("caller", "callee", "ruri"):
                    self._number_match(doc, sub, value, numbering)
                elif kind == "source_ip":
                    for i, text in enumerate(cond.as_list(value)):
                        try:
                            cond.parse_network(text)
                        except ValueError as exc:
                            self.error(doc, sub + (i,) if isinstance(value, list) else sub, str(exc))
                elif kind == "header":
                    modes = [m for m in ("present", "equals", "regex") if m in value]
                    if len(modes) != 1:
                        self.error(doc, sub, "a header condition takes exactly one of `present`, `equals`, `regex`"
                                             + (f" (found {', '.join(modes)})" if modes else ""))
                    if not re.match(r"^[A-Za-z0-9\-.!%*_+`'~]+$", value["name"]):
                        self.error(doc, sub + ("name",), f"{value['name']!r} is not a SIP header name")
                    if "regex" in value:
                        self._regex(doc, sub + ("regex",), value["regex"])
                elif kind == "tenant":
                    for i, name in enumerate(cond.as_list(value)):
                        if name not in self.decl_names["tenants"]:
                            self._unknown(doc, sub + (i,) if isinstance(value, list) else sub, "tenant", name)
                elif kind == "trunk":
                    for i, name in enumerate(cond.as_list(value)):
                        where = sub + (i,) if isinstance(value, list) else sub
                        if name not in self.decl_names["trunks"]:
                            self._unknown(doc, where, "trunk", name)
                        elif name not in self.inbound_trunks:
                            self.error(doc, where, f"trunk {name!r} has no `inbound` part: no call comes in on it")
                elif kind == "time":
                    self._time(doc, sub, value)
                elif kind == "split":
                    try:
                        cond.split_bounds(value["percent"], value.get("offset", 0))
                    except ValueError as exc:
                        self.error(doc, sub, str(exc))
                elif kind == "destination_risk":
                    for i, name in enumerate(cond.as_list(value)):
                        if name not in self.decl_names["risk_lists"]:
                            self._unknown(doc, sub + (i,) if isinstance(value, list) else sub, "risk list", name)
                elif kind == "calls_in_window":
                    try:
                        cond.window_seconds(value["window"])
                    except ValueError as exc:
                        self.error(doc, sub + ("window",), str(exc))
            except (KeyError, TypeError, AttributeError):
                continue  # structure already reported by the schema

    def _number_match(self, doc, path, value, numbering) -> None:
        if not isinstance(value, dict):
            value = {"exact": value}
            path_of = lambda key, i=None: path  # noqa: E731
        else:
            path_of = lambda key, i=None: path + ((key, i) if i is not None else (key,))  # noqa: E731
        for key, items in value.items():
            many = isinstance(items, list)
            for i, item in enumerate(cond.as_list(items)):
                where = path_of(key, i if many else None)
                try:
                    if key == "exact":
                        cond.number_pattern(item, numbering)
                    elif key == "prefix":
                        cond.number_prefix(item)
                    elif key == "regex":
                        self._regex(doc, where, item)
                    elif key == "in_list" and item not in self.decl_names["number_lists"]:
                        self._unknown(doc, where, "number list", item)
                except ValueError as exc:
                    self.error(doc, where, str(exc))

    def _regex(self, doc, path, pattern) -> None:
        try:
            cond.compile_regex(pattern)
        except ValueError as exc:
            self.error(doc, path, str(exc))

    def _time(self, doc, path, value) -> None:
        checks = {"tz": cond.zone, "days": cond.parse_days, "hours": cond.parse_hours, "dates": cond.parse_dates}
        for key, parse in checks.items():
            if key in value:
                try:
                    parse(value[key])
                except ValueError as exc:
                    self.error(doc, path + (key,), str(exc))

    # -- security --------------------------------------------------------------------------------
    # Which optional fields each detector kind reads (the rest would be silently ignored: refused).
    _DETECTOR_FIELDS = {
        "match": {"when"},
        "rate_spike": {"when", "scope", "window", "baseline", "factor", "min_calls"},
        "concurrent_calls": {"when", "scope", "max"},
        "destination_rate": {"when", "lists", "window", "max"},
        "short_calls": {"when", "shorter_than", "window", "max"},
        "distinct_callees": {"when", "scope", "window", "max"},
        "asterisk_security": {"window", "max"},
    }
    _DETECTOR_REQUIRED = {"match": ("when",), "concurrent_calls": ("max",), "destination_rate": ("lists", "max"),
                          "short_calls": ("max",), "distinct_callees": ("max",), "asterisk_security": ("max",)}
    _DETECTOR_SCOPES = {"rate_spike": ("source", "tenant"), "concurrent_calls": ("source", "tenant", "global"),
                        "distinct_callees": ("source", "tenant")}

    def _security(self, settings, numbering, number_lists, risk_lists, tenants) -> SecurityPolicy | None:
        found: tuple[PositionedDocument, Any] | None = None
        for doc in self.docs:
            if isinstance(doc.data, dict) and "security" in doc.data:
                if found is not None:
                    self.error(doc, ("security",), "the security section is already given at "
                                                   f"{found[0].position(('security',), key=True)}", key=True)
                    continue
                found = (doc, doc.data["security"])
        if found is None:
            return None
        doc, body = found
        if not self.valid(doc, ("security",)) or not isinstance(body, dict):
            return None
        check = lambda p, node: self._condition(doc, p, node, settings, numbering, number_lists,  # noqa: E731
                                                risk_lists, tenants)
        if body.get("exempt") is not None:
            check(("security", "exempt"), body["exempt"])
        detectors: list[Detector] = []
        seen: dict[str, Path] = {}
        for i, raw in enumerate(body.get("detectors") or []):
            path = ("security", "detectors", i)
            detector = self._detector(doc, path, raw, check, seen)
            if detector is not None:
                detectors.append(detector)
        outcomes = body.get("outcomes") or {}
        fields: dict[str, Any] = {}
        if "challenge" in outcomes:
            fields.update(challenge_at=outcomes["challenge"]["at_least"],
                          challenge=self._actions(doc, ("security", "outcomes", "challenge", "actions"),
                                                  outcomes["challenge"]["actions"], "challenge"))
        if "reject" in outcomes:
            reject = outcomes["reject"]
            fields.update(reject_at=reject["at_least"], reject_code=reject.get("code", 403))
            reason = reject.get("reason")
            if reason is not None and (problem := reason_problem(reason)):
                self.error(doc, ("security", "outcomes", "reject", "reason"), problem)
            fields["reject_reason"] = reason or REASON_PHRASES.get(fields["reject_code"], "Rejected")
        if "ban" in outcomes:
            ban = outcomes["ban"]
            fields.update(ban_at=ban["at_least"], ban_code=ban.get("code", 403))
            fields["ban_s"] = self._duration_s(doc, ("security", "outcomes", "ban", "for"), ban["for"])
        thresholds = [(k, fields.get(f"{k}_at")) for k in ("challenge", "reject", "ban")]
        present = [(k, v) for k, v in thresholds if v is not None]
        for (low, low_at), (high, high_at) in zip(present, present[1:]):
            if high_at <= low_at:
                self.error(doc, ("security", "outcomes", high, "at_least"),
                           f"{high} must need a higher score than {low} ({high_at} ≤ {low_at})")
        if detectors and not present:
            self.error(doc, ("security",), "detectors score calls but no outcome uses the score: add "
                                           "`outcomes:` (challenge, reject and/or ban with `at_least`)")
        if "max_call_duration" in body:
            fields["max_call_duration_s"] = self._duration_s(doc, ("security", "max_call_duration"),
                                                             body["max_call_duration"])
        return SecurityPolicy(detectors=tuple(detectors), position=doc.position(("security",), key=True),
                              exempt=body.get("exempt"), **fields)

    def _duration_s(self, doc: PositionedDocument, path: Path, value: Any) -> int:
        try:
            parse_duration_ms(value)
        except ValueError:
            return 1  # the schema has said so
        try:
            return cond.window_seconds(value)
        except ValueError as exc:
            self.error(doc, path, str(exc))
            return 1

    def _detector(self, doc, path, raw, check, seen) -> Detector | None:
        if not self.valid(doc, path) or not isinstance(raw, dict):
            return None
        name, kind = raw["name"], raw["kind"]
        if name in seen:
            self.error(doc, path + ("name",), f"detector {name!r} is already defined at {doc.position(seen[name])}")
            return None
        seen[name] = path
        allowed = self._DETECTOR_FIELDS[kind] | {"name", "kind", "score", "description"}
        for key in raw:
            if key not in allowed:
                self.error(doc, path + (key,), f"a {kind} detector does not use {key!r} (it reads: "
                                               f"{', '.join(sorted(self._DETECTOR_FIELDS[kind]))})", key=True)
        for key in self._DETECTOR_REQUIRED.get(kind, ()):
            if key not in raw:
                self.error(doc, path, f"a {kind} detector needs {key!r}")
        if kind in ("short_calls", "asterisk_security") and raw.get("max") == 0:
            self.error(doc, path + ("max",), f"a {kind} detector with max 0 would fire on every call (use ≥ 1)")
        scope = raw.get("scope", "source")
        if kind in self._DETECTOR_SCOPES and scope not in self._DETECTOR_SCOPES[kind]:
            self.error(doc, path + ("scope",), f"a {kind} detector counts per "
                                               f"{' / '.join(self._DETECTOR_SCOPES[kind])}, not {scope!r}")
        if raw.get("when") is not None:
            check(path + ("when",), raw["when"])
        lists = tuple(cond.as_list(raw.get("lists", [])))
        for i, list_name in enumerate(lists):
            if list_name not in self.decl_names["risk_lists"]:
                self._unknown(doc, path + ("lists",) + ((i,) if isinstance(raw["lists"], list) else ()), "risk list",
                              list_name)
        window_s = self._duration_s(doc, path + ("window",), raw["window"]) if "window" in raw else 60
        baseline_s = self._duration_s(doc, path + ("baseline",), raw["baseline"]) if "baseline" in raw else 3600
        if kind == "rate_spike" and baseline_s < 2 * window_s:
            self.error(doc, path + ("baseline",), f"the baseline ({baseline_s}s) must be at least twice the window "
                                                  f"({window_s}s) to learn from")
        shorter_ms = 5000
        if "shorter_than" in raw:
            try:
                shorter_ms = parse_duration_ms(raw["shorter_than"])
            except ValueError as exc:
                self.error(doc, path + ("shorter_than",), str(exc))
        return Detector(name=name, kind=kind, score=raw["score"], when=raw.get("when"), scope=scope,
                        window_s=window_s, baseline_s=baseline_s, factor=float(raw.get("factor", 5)),
                        min_calls=raw.get("min_calls", 20), max=raw.get("max", 0), lists=lists,
                        shorter_than_ms=shorter_ms)

    # -- actions ---------------------------------------------------------------------------------
    def _actions(self, doc: PositionedDocument, path: Path, actions: list[dict[str, Any]], context: str) -> ActionSet:
        terminals, continues, durations, anchors, header_names = [], [], [], [], {}
        complete = True
        for i, action in enumerate(actions):
            if not self.valid(doc, path + (i,)):
                complete = False
                continue
            verb, arg = canonical_action(action)
            sub = path + (i, verb)
            if verb in TERMINAL_VERBS:
                terminals.append((i, verb))
            elif verb == "continue":
                continues.append(i)
            elif verb == "max_duration":
                durations.append(i)
            elif verb == "anchor_media":
                anchors.append(i)
            if verb == "route_agent" and arg["agent"] not in self.decl_names["agents"]:
                self._unknown(doc, sub, "agent", arg["agent"])
            elif verb == "route_sip" and arg["destination"] not in self.decl_names["destinations"]:
                self._unknown(doc, sub, "destination", arg["destination"])
            elif verb == "fork" and arg["target"] not in self.decl_names["fork_targets"]:
                self._unknown(doc, sub, "fork target", arg["target"])
            elif verb == "reject" and "reason" in arg and (problem := reason_problem(arg["reason"])):
                self.error(doc, sub + ("reason",), problem)
            elif verb == "add_headers":
                for name, value in arg.items():
                    problem = header_name_problem(name)
                    if problem:
                        self.error(doc, sub + (name,), problem, key=True)
                    elif name.lower() in header_names:
                        self.error(doc, sub + (name,), f"header {name!r} is set twice in this rule", key=True)
                    header_names[name.lower()] = name
                    problem = header_value_problem(value)
                    unknown = [p for p in PLACEHOLDER.findall(value) if p not in PLACEHOLDERS]
                    if problem:
                        self.error(doc, sub + (name,), problem)
                    elif unknown:
                        self.error(doc, sub + (name,), f"unknown placeholder ${{{unknown[0]}}} "
                                                       f"(available: {', '.join('${%s}' % p for p in PLACEHOLDERS)})")
            elif verb == "max_duration":
                try:
                    if parse_duration_ms(arg) < 1000:
                        self.error(doc, sub, "max_duration must be at least 1 second")
                except ValueError as exc:
                    self.error(doc, sub, str(exc))
            elif verb in ("record", "gather"):
                for sub_path, message in media_action_problems(verb, arg, self.decl_names):
                    self.error(doc, sub + sub_path, message)
            elif verb == "ask_webhook":
                if context in ("fallback", "challenge"):
                    self.error(doc, sub, "a webhook's fallback cannot ask another webhook" if context == "fallback"
                               else "a challenge routes the call (to an IVR, a human); it cannot ask a webhook")
                else:
                    self._actions(doc, sub + ("fallback",), arg["fallback"], "fallback")
        where = {"rule": "a rule", "default": "the default", "fallback": "a webhook fallback",
                 "challenge": "the challenge"}[context]
        if not complete:
            return ActionSet(terminal=None)  # counting verbs among broken actions would only add noise
        if len(terminals) > 1:
            names = ", ".join(v for _, v in terminals)
            self.error(doc, path + (terminals[1][0],), f"{where} has one terminal action, found {len(terminals)}: {names}")
        if continues and (terminals or context != "rule"):
            reason = "`continue` cannot be combined with a terminal action" if terminals else \
                f"`continue` is not allowed in {where}"
            self.error(doc, path + (continues[0],), reason)
        if not terminals and not (continues and context == "rule"):
            options = "route_agent, route_sip, reject" + (", ask_webhook" if context in ("rule", "default") else "")
            extra = " or `continue: true`" if context == "rule" else ""
            self.error(doc, path, f"{where} needs a terminal action ({options}){extra}")
        if len(durations) > 1:
            self.error(doc, path + (durations[1],), "max_duration is given twice")
        if len(anchors) > 1:
            self.error(doc, path + (anchors[1],), "anchor_media is given twice")
        try:
            return build_action_set(actions, **self.context)
        except (KeyError, ValueError, TypeError):
            return ActionSet(terminal=None)  # only reached when errors were reported above

    def _reachability(self, rules: list[RuleSource]) -> None:
        for rule in rules:
            if rule.enabled and rule.match is None and rule.actions.terminal is not None:
                later = [r.name for r in rules[rule.index + 1:] if r.enabled]
                if later:
                    doc_position = rule.position
                    self.issues.append(PolicyIssue(
                        doc_position, f"rules[{rule.name}]",
                        f"rule {rule.name!r} matches every call, so these rules are never reached: {', '.join(later)}",
                        "warning"))
                break


def _item_path(path: Path) -> Path:
    """The item an error belongs to: ('agents', 'x'), ('rules', 3), ('settings',) or ('default',)."""
    if not path:
        return ()
    if path[0] == "settings":
        return path[:1]
    if path[0] == "default":
        return path[:3]  # ('default', 'actions', i)
    if path[0] == "rules" and len(path) > 2:
        return path[:4] if path[2] == "actions" else path[:3]  # one action, or the whole match
    if path[0] == "security" and len(path) > 2:
        # one detector; one outcome, or one of the challenge's actions
        return path[:5] if path[1:4] == ("outcomes", "challenge", "actions") else path[:3]
    return path[:2]


def _issue_order(issue: PolicyIssue) -> tuple[str, int, int]:
    return issue.position.file, issue.position.line, issue.position.column


