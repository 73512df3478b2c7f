"""callfabric's ARI description (the part of Asterisk 22.10.1's ARI it uses) as a strict validator.

Loaded once, synchronously, at import time (never on the event loop) from
``tests/support/ari_description.json``: our own data, extracted from Asterisk's full ARI
description and checked against it where one is found (``tests/support/ari_description.py``
says where it looks and how to refresh it). An operation or event outside it is refused like
an unknown resource: describe it first.

Request validation mirrors how Asterisk's res_ari reads a request (res/res_ari.c,
res/res_ari_*.c, res/ari/resource_*.c at tag 22.10.1), but is deliberately *stricter* where
Asterisk is silently lenient, so that a client bug shows up as a clear error in tests:

- routing is segment by segment, an explicit segment beats a ``{wildcard}`` and there is no
  backtracking (``GET /channels/externalMedia`` is 405, not "channel not found"); unknown
  path -> 404 "Resource not found", no callback for the method -> 405 "Invalid method",
  trailing slash -> 404 (all as ast_ari_invoke());
- Asterisk *ignores* unknown query parameters and keeps only the *last* occurrence of a
  repeated one (``channel=a&channel=b`` adds only b): both are rejected here;
- ints are parsed with atoi() and booleans with ast_true() by Asterisk: here an int must be
  an integer literal (RANGE checked) and a boolean one of ast_true()/ast_false()'s words;
- ``allowMultiple`` values are one comma-separated string (ast_app_separate_args) or, in a
  JSON body, a JSON array of strings;
- a JSON body is an object; its keys may be the operation's body parameters (``variables``
  is ``{"variables": {...}}``, ``filter`` is the whole body) *and* its query parameters
  (the generated ``*_parse_body()`` reads them, typed: JSON string / integer / true|false);
  any other key is rejected (Asterisk ignores it);
- ``required`` from the spec is enforced for every parameter (Asterisk checks it only in
  some handlers).

Model validation mirrors res/ari/ari_model_validators.c: every required field present, no
undocumented field, JSON types exact (``double`` must be a JSON real, ``int`` 32-bit,
``Date`` ISO-8601), ``Message``/``Event`` dispatched on the ``type`` discriminator; in
addition ``allowableValues`` of model fields are enforced.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

__all__ = [
    "SPEC",
    "AriSpec",
    "Model",
    "Operation",
    "Param",
    "SpecError",
    "request_args",
    "validate_model",
    "validate_request",
    "validate_value",
]

_TRUE_WORDS = {"yes", "true", "y", "t", "1", "on"}      # ast_true()
_FALSE_WORDS = {"no", "false", "n", "f", "0", "off"}    # ast_false()
# res/res_ari_model.c ISO8601_PATTERN
_DATE_RE = re.compile(r"^[0-9]{4}-[01][0-9]-[0-3][0-9]"
                      r"(T[0-2][0-9]:[0-5][0-9](:[0-6][0-9](.[0-9]+)?)?(Z|[-+][0-2][0-9](:?[0-5][0-9])?))?$",
                      re.IGNORECASE)
_INT_RE = re.compile(r"^[+-]?[0-9]+$")
DESCRIPTION = Path(__file__).with_name("ari_description.json")
_PRIMITIVES = {"string", "int", "long", "double", "boolean", "Date", "object", "void", "binary"}


class SpecError(ValueError):
    """A request or model that the ARI description does not allow.

    ``status`` is the HTTP status Asterisk would answer with (400 bad parameter, 404 unknown
    resource, 405 method not allowed); ``where`` is the offending JSON path for models.
    """

    def __init__(self, reason: str, status: int = 400, where: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.where = where


@dataclass(frozen=True)
class Param:
    name: str
    param_type: str            # path | query | body
    required: bool
    data_type: str             # string | int | long | boolean | containers | object
    allow_multiple: bool = False
    allowable: tuple | None = None   # ("LIST", values) | ("RANGE", min, max)
    default: Any = None


@dataclass
class Operation:
    method: str
    path: str                  # template, e.g. /channels/{channelId}/snoop
    nickname: str
    resource: str              # channels, bridges, ...
    response_class: str
    params: tuple[Param, ...]
    error_codes: dict[int, str]
    is_websocket: bool = False

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"

    @property
    def path_params(self) -> dict[str, Param]:
        return {p.name: p for p in self.params if p.param_type == "path"}

    @property
    def query_params(self) -> dict[str, Param]:
        return {p.name: p for p in self.params if p.param_type == "query"}

    @property
    def body_params(self) -> dict[str, Param]:
        return {p.name: p for p in self.params if p.param_type == "body"}

    def __repr__(self) -> str:
        return f"<Operation {self.resource}.{self.nickname} {self.key}>"


@dataclass(frozen=True)
class Prop:
    name: str
    type: str
    required: bool
    allowable: tuple | None = None


@dataclass
class Model:
    name: str
    properties: dict[str, Prop]
    sub_types: tuple[str, ...] = ()
    discriminator: str | None = None
    parent: str | None = None


@dataclass
class _Node:
    segment: str
    ops: dict[str, Operation] = field(default_factory=dict)
    literals: dict[str, _Node] = field(default_factory=dict)
    wildcard: _Node | None = None
    wildcard_name: str | None = None


def _allowable(raw: Mapping) -> tuple | None:
    if "values" in raw:
        return ("LIST", tuple(raw["values"]))
    if "range" in raw:
        return ("RANGE", *raw["range"])
    return None


def _param(raw: Mapping) -> Param:
    return Param(name=raw["name"], param_type=raw["in"], required=raw["required"], data_type=raw["type"],
                 allow_multiple=bool(raw.get("multiple")), allowable=_allowable(raw), default=raw.get("default"))


def _list_item(type_str: str) -> str | None:
    m = re.fullmatch(r"List\[(.+)\]", type_str)
    return m.group(1) if m else None


def _jtype(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "real"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


class AriSpec:
    """Routes, operations and models of one ARI description."""

    def __init__(self, description: dict):
        self.api_version: str = description.get("api_version", "")
        self.operations: list[Operation] = []
        self.models: dict[str, Model] = {}
        self._root = _Node("")
        for raw in description["operations"]:
            op = Operation(
                method=raw["method"], path=raw["path"], nickname=raw["nickname"], resource=raw["resource"],
                response_class=raw["response"], params=tuple(_param(p) for p in raw["params"]),
                error_codes={int(code): reason for code, reason in raw["errors"].items()},
                is_websocket=bool(raw.get("websocket")))
            self.operations.append(op)
            self._add_route(op)
        for name, raw in description["models"].items():
            props = {fn: Prop(fn, fd["type"], fd["required"], _allowable(fd)) for fn, fd in raw["fields"].items()}
            self.models[name] = Model(name=name, properties=props, sub_types=tuple(raw.get("subtypes", ())),
                                      discriminator=raw.get("discriminator"))
        for model in list(self.models.values()):
            for sub in model.sub_types:
                if sub not in self.models:
                    raise ValueError(f"model {model.name}: unknown subType {sub}")
                self.models[sub].parent = model.name
        for model in self.models.values():
            for prop in model.properties.values():
                self._check_type_known(prop.type, f"{model.name}.{prop.name}")
        for op in self.operations:
            if op.response_class not in ("void", "binary"):
                self._check_type_known(op.response_class, op.key)

    @classmethod
    def load(cls, path: Path | str = DESCRIPTION) -> AriSpec:
        """Synchronous load: call from sync code or a thread, never on the event loop."""
        return cls(json.loads(Path(path).read_text()))

    def _check_type_known(self, type_str: str, where: str) -> None:
        item = _list_item(type_str)
        if item:
            return self._check_type_known(item, where)
        if type_str not in _PRIMITIVES and type_str not in self.models:
            raise ValueError(f"{where}: unknown type {type_str}")

    def _add_route(self, op: Operation) -> None:
        node = self._root
        for seg in op.path.strip("/").split("/"):
            if seg.startswith("{") and seg.endswith("}"):
                name = seg[1:-1]
                if node.wildcard is None:
                    node.wildcard, node.wildcard_name = _Node(seg), name
                elif node.wildcard_name != name:
                    raise ValueError(f"{op.key}: two wildcards under one segment")
                node = node.wildcard
            else:
                node = node.literals.setdefault(seg, _Node(seg))
        if op.method in node.ops:
            raise ValueError(f"duplicate operation {op.key}")
        node.ops[op.method] = op

    # ------------------------------------------------------------------ routing
    def resolve(self, method: str, path: str) -> tuple[Operation, dict[str, str]]:
        """(operation, path params) for ``method`` ``path`` (with or without the /ari prefix)."""
        method = method.upper()
        if path.startswith("/ari/") or path == "/ari":
            path = path[4:]
        rel = path.lstrip("/")
        if rel.endswith("/"):
            raise SpecError(f"ARI URLs do not end with a slash. Try /ari/{rel.rstrip('/')}", 404)
        node, params = self._root, {}
        for raw_seg in rel.split("/"):
            if not raw_seg:          # strsep loop stops at the first empty segment
                break
            seg = unquote(raw_seg)
            child = node.literals.get(seg)
            if child is None and node.wildcard is not None:
                params[node.wildcard_name] = seg
                child = node.wildcard
            if child is None:
                raise SpecError(f"Resource not found: no ARI resource /{rel} (at segment '{seg}')", 404)
            node = child
        op = node.ops.get(method)
        if op is None:
            allowed = ", ".join(sorted(node.ops)) or "none"
            raise SpecError(f"Invalid method: {method} not allowed on /{rel} (allowed: {allowed})", 405)
        return op, params

    def operation(self, method: str, template: str) -> Operation:
        for op in self.operations:
            if op.method == method.upper() and op.path == template:
                return op
        raise KeyError(f"{method} {template}")

    # ------------------------------------------------------------------ requests
    def validate_request(self, method: str, path: str, query: Any = None, body: Any = None
                         ) -> tuple[Operation, dict[str, str]]:
        """Check a request against the description; (operation, path params) or SpecError."""
        op, path_params = self.resolve(method, path)
        self._parse_args(op, path_params, query, body)
        return op, path_params

    def request_args(self, op: Operation, path_params: Mapping[str, str], query: Any = None,
                     body: Any = None, *, defaults: bool = True) -> dict[str, Any]:
        """Typed arguments as the handler sees them (query, then JSON body keys, then defaults)."""
        return self._parse_args(op, path_params, query, body, defaults=defaults)

    def _parse_args(self, op: Operation, path_params: Mapping[str, str], query: Any, body: Any,
                    defaults: bool = False) -> dict[str, Any]:
        args: dict[str, Any] = dict(path_params)
        qparams, bparams = op.query_params, op.body_params
        pairs = _query_pairs(query)
        seen: dict[str, int] = {}
        for name, _ in pairs:
            seen[name] = seen.get(name, 0) + 1
        for name, count in seen.items():
            if name == "api_key":
                continue
            if name not in qparams:
                known = ", ".join(sorted(qparams)) or "none"
                raise SpecError(f"unknown query parameter '{name}' for {op.key} (known: {known})")
            if count > 1:
                raise SpecError(f"query parameter '{name}' given {count} times; Asterisk keeps only the last "
                                f"one" + (" (pass one comma-separated value)" if qparams[name].allow_multiple else ""))
        for name, raw in pairs:
            if name == "api_key":
                continue
            args[name] = _parse_query_value(qparams[name], raw)

        if body is not None:
            if not isinstance(body, dict):
                raise SpecError(f"request body must be a JSON object, got {_jtype(body)}")
            whole = [p for p in bparams.values() if p.name == "filter"]
            if whole:
                _check_filter(body)
                args["filter"] = body
            else:
                for key, value in body.items():
                    if key in bparams:
                        args[key] = _parse_body_param(bparams[key], value)
                    elif key in qparams:
                        args[key] = _parse_json_value(qparams[key], value)
                    elif key in op.path_params:
                        raise SpecError(f"'{key}' is a path parameter of {op.key}; it cannot come in the body")
                    else:
                        known = ", ".join(sorted(set(qparams) | set(bparams))) or "none"
                        raise SpecError(f"unknown JSON body field '{key}' for {op.key} (known: {known})")

        for p in op.params:
            if p.required and p.name not in args:
                where = {"query": "query parameter", "body": "JSON body field", "path": "path parameter"}
                raise SpecError(f"missing required {where[p.param_type]} '{p.name}' for {op.key}")
        if defaults:
            for p in op.params:
                if p.name not in args and p.default is not None:
                    args[p.name] = p.default
        return args

    # ------------------------------------------------------------------ models
    def descendants(self, name: str) -> set[str]:
        out = set()
        for sub in self.models[name].sub_types:
            out.add(sub)
            out |= self.descendants(sub)
        return out

    def ancestors(self, name: str) -> list[str]:
        chain, cur = [], self.models[name].parent
        while cur:
            chain.append(cur)
            cur = self.models[cur].parent
        return chain

    def all_properties(self, name: str) -> dict[str, Prop]:
        props: dict[str, Prop] = {}
        for anc in reversed(self.ancestors(name)):
            props.update(self.models[anc].properties)
        props.update(self.models[name].properties)
        return props

    def _discriminator(self, name: str) -> str | None:
        for n in [name, *self.ancestors(name)]:
            if self.models[n].discriminator:
                return self.models[n].discriminator
        return None

    @property
    def event_types(self) -> list[str]:
        return sorted(self.descendants("Event"))

    def validate_model(self, name: str, obj: Any, where: str = "$") -> None:
        if name not in self.models:
            raise SpecError(f"{where}: unknown model '{name}'", where=where)
        if not isinstance(obj, dict):
            raise SpecError(f"{where}: {name} must be a JSON object, got {_jtype(obj)}", where=where)
        disc = self._discriminator(name)
        if disc is not None:
            actual = obj.get(disc)
            if not isinstance(actual, str):
                raise SpecError(f"{where}.{disc}: {name} requires string field '{disc}'", where=f"{where}.{disc}")
            if actual != name:
                if actual not in self.descendants(name):
                    raise SpecError(f"{where}.{disc}: unknown {name} type '{actual}'", where=f"{where}.{disc}")
                name = actual
        props = self.all_properties(name)
        for key in obj:
            if key not in props:
                raise SpecError(f"{where}.{key}: undocumented field '{key}' in {name}", where=f"{where}.{key}")
        for prop in props.values():
            if prop.required and prop.name not in obj:
                raise SpecError(f"{where}.{prop.name}: missing required field '{prop.name}' of {name}",
                                where=f"{where}.{prop.name}")
        for key, value in obj.items():
            prop = props[key]
            self.validate_value(prop.type, value, f"{where}.{key}")
            if prop.allowable:
                _check_allowable(prop.allowable, value, f"{where}.{key}")

    def validate_value(self, type_str: str, value: Any, where: str = "$") -> None:
        item = _list_item(type_str)
        if item is not None:
            if not isinstance(value, list):
                raise SpecError(f"{where}: expected {type_str} (array), got {_jtype(value)}", where=where)
            for i, v in enumerate(value):
                self.validate_value(item, v, f"{where}[{i}]")
            return
        ok = True
        if type_str == "string":
            ok = isinstance(value, str)
        elif type_str == "int":
            ok = _jtype(value) == "integer" and -2**31 <= value <= 2**31 - 1
        elif type_str == "long":
            ok = _jtype(value) == "integer"
        elif type_str == "double":
            ok = _jtype(value) == "real" and math.isfinite(value)
        elif type_str == "boolean":
            ok = isinstance(value, bool)
        elif type_str == "Date":
            ok = isinstance(value, str) and bool(_DATE_RE.match(value))
        elif type_str == "object":
            ok = isinstance(value, dict)
        elif type_str == "void":
            ok = value is None
        elif type_str == "binary":
            ok = True
        elif type_str in self.models:
            return self.validate_model(type_str, value, where)
        else:
            raise SpecError(f"{where}: unknown type '{type_str}'", where=where)
        if not ok:
            shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
            raise SpecError(f"{where}: expected {type_str}, got {_jtype(value)} {shown}", where=where)


# ---------------------------------------------------------------------- helpers
def _query_pairs(query: Any) -> list[tuple[str, str]]:
    if query is None:
        return []
    if hasattr(query, "items") and hasattr(query, "getall"):       # MultiDict / MultiDictProxy
        return [(str(k), str(v)) for k, v in query.items()]
    if isinstance(query, Mapping):
        out = []
        for k, v in query.items():
            if isinstance(v, (list, tuple)):
                out.extend((str(k), _scalar(x)) for x in v)
            else:
                out.append((str(k), _scalar(v)))
        return out
    return [(str(k), _scalar(v)) for k, v in query]


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _check_allowable(allowable: tuple, value: Any, what: str) -> None:
    if allowable[0] == "LIST":
        if value not in allowable[1]:
            raise SpecError(f"{what}: value {value!r} not in allowed values {list(allowable[1])}", where=what)
    else:
        _, lo, hi = allowable
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise SpecError(f"{what}: value {value!r} out of range [{lo}, {hi if hi is not None else '...'}]",
                            where=what)


def _parse_scalar(p: Param, raw: str, what: str) -> Any:
    if p.data_type in ("int", "long"):
        if not _INT_RE.match(raw.strip()):
            raise SpecError(f"{what}: expected {p.data_type}, got {raw!r}")
        value: Any = int(raw)
        if p.data_type == "int" and not -2**31 <= value <= 2**31 - 1:
            raise SpecError(f"{what}: {raw} does not fit a 32-bit int")
    elif p.data_type == "boolean":
        word = raw.strip().lower()
        if word in _TRUE_WORDS:
            value = True
        elif word in _FALSE_WORDS:
            value = False
        else:
            raise SpecError(f"{what}: expected boolean (true/false), got {raw!r}")
    elif p.data_type == "string":
        value = raw
    else:
        raise SpecError(f"{what}: a {p.data_type} parameter cannot be given in the query string")
    if p.allowable:
        _check_allowable(p.allowable, value, what)
    return value


def _parse_query_value(p: Param, raw: str) -> Any:
    what = f"query parameter '{p.name}'"
    if p.allow_multiple:
        items = raw.split(",") if raw else [""]
        return [_parse_scalar(p, item.strip(), what) for item in items]
    return _parse_scalar(p, raw, what)


def _parse_json_value(p: Param, value: Any) -> Any:
    what = f"JSON body field '{p.name}'"
    if p.allow_multiple:
        if isinstance(value, list):
            out = [_parse_json_scalar(p, v, f"{what}[{i}]") for i, v in enumerate(value)]
            if not out:
                raise SpecError(f"{what}: empty array")
            return out
        return [_parse_json_scalar(p, value, what)]
    return _parse_json_scalar(p, value, what)


def _parse_json_scalar(p: Param, value: Any, what: str) -> Any:
    want = {"string": "string", "int": "integer", "long": "integer", "boolean": "boolean"}.get(p.data_type)
    if want is None or _jtype(value) != want:
        raise SpecError(f"{what}: expected JSON {want or p.data_type} for {p.data_type} parameter, "
                        f"got {_jtype(value)} {value!r} (Asterisk would read it as "
                        f"{'NULL' if p.data_type == 'string' else '0/false'})")
    if p.data_type == "int" and not -2**31 <= value <= 2**31 - 1:
        raise SpecError(f"{what}: {value} does not fit a 32-bit int")
    if p.allowable:
        _check_allowable(p.allowable, value, what)
    return value


def _parse_body_param(p: Param, value: Any) -> Any:
    what = f"JSON body field '{p.name}'"
    if p.name in ("variables",):
        if not isinstance(value, dict):
            raise SpecError(f"{what}: must be an object of name -> value, got {_jtype(value)}")
        for k, v in value.items():
            if isinstance(v, str):
                continue
            if isinstance(v, dict):
                if not isinstance(v.get("value"), str):
                    raise SpecError(f"{what}.{k}: Each object value in 'variables' must include string field "
                                    f"'value'")
                if "report_events" in v and not isinstance(v["report_events"], bool):
                    raise SpecError(f"{what}.{k}: Field 'report_events' in 'variables' entries must be boolean")
                extra = set(v) - {"value", "report_events"}
                if extra:
                    raise SpecError(f"{what}.{k}: unknown key(s) {sorted(extra)} (only 'value', 'report_events')")
                continue
            raise SpecError(f"{what}.{k}: Each value in 'variables' must be a string or an object with 'value' "
                            f"and optional 'report_events', got {_jtype(v)}")
        return value
    if p.name == "fields":
        if not isinstance(value, list) or not all(
                isinstance(t, dict) and set(t) == {"attribute", "value"} and all(isinstance(x, str) for x in t.values())
                for t in value):
            raise SpecError(f"{what}: must be a list of {{\"attribute\": str, \"value\": str}}")
        return value
    if p.data_type == "containers" and not isinstance(value, (dict, list)):
        raise SpecError(f"{what}: expected a JSON container, got {_jtype(value)}")
    return value


def _check_filter(body: dict) -> None:
    extra = set(body) - {"allowed", "disallowed"}
    if extra:
        raise SpecError(f"event filter: unknown key(s) {sorted(extra)} (only 'allowed', 'disallowed')")
    for key in ("allowed", "disallowed"):
        if key in body and not (isinstance(body[key], list) and all(isinstance(x, dict) for x in body[key])):
            raise SpecError(f"event filter: '{key}' must be a list of objects like {{\"type\": \"StasisStart\"}}")


# ---------------------------------------------------------------------- module API
SPEC = AriSpec.load()


def validate_request(method: str, path: str, query: Any = None, body: Any = None
                     ) -> tuple[Operation, dict[str, str]]:
    """(operation, path params) for a valid request, else SpecError (with .status 400/404/405)."""
    return SPEC.validate_request(method, path, query, body)


def request_args(op: Operation, path_params: Mapping[str, str], query: Any = None, body: Any = None,
                 *, defaults: bool = True) -> dict[str, Any]:
    """Typed arguments of a valid request (query, JSON body keys, spec defaults)."""
    return SPEC.request_args(op, path_params, query, body, defaults=defaults)


def validate_model(name: str, obj: Any) -> None:
    """SpecError naming the first offending JSON path unless ``obj`` is a valid ``name``."""
    SPEC.validate_model(name, obj)


def validate_value(type_str: str, value: Any) -> None:
    """Like validate_model for any type string: ``List[Channel]``, ``Playback``, ``void``..."""
    SPEC.validate_value(type_str, value)
