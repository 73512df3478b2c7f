"""A validated policy as data: canonical JSON of a PolicySource, and back. The edges get the
policy this way (controller/edge/bundle.py) and the controllers keep the last one they served
(controller/policy/lastgood.py). Data, never code: decoding builds only the policy model's own
dataclasses, field by field, each value checked against the model's type for it, so a
document that does not describe a valid model is refused (DocumentInvalid, with the path of
the first bad value), never half-loaded. Standard library only (Kamailio's embedded Python
decodes it).

Canonical: every field written, keys sorted, no spaces, UTF-8, sets sorted; the same policy
always gives the same bytes. `encode` checks that decoding its output gives the policy back,
so a value the model holds but JSON cannot carry (a YAML date in a condition …) is refused
where the document is made, not where it is read."""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from controller.policy import actionset, model, numbers

FORMAT = 1
_MODULES = (model, actionset, numbers)
_NAMESPACE = {name: value for module in _MODULES for name, value in vars(module).items()}
_NETWORK_TYPES = (ipaddress.IPv4Network, ipaddress.IPv6Network)


class DocumentInvalid(ValueError):
    """The document is not a policy of this model (the message says where and why)."""


def _is_model_class(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind) and \
        any(kind.__module__ == m.__name__ for m in _MODULES)


_HINTS: dict[type, dict[str, Any]] = {}


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> type, for a dataclass of the policy model (resolved once)."""
    hints = _HINTS.get(cls)
    if hints is None:
        resolved = typing.get_type_hints(cls, globalns=_NAMESPACE)
        hints = _HINTS[cls] = {f.name: resolved[f.name] for f in dataclasses.fields(cls)}
    return hints


# -- encoding ---------------------------------------------------------------------------------
def _encode(value: Any, kind: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return _plain(value, path)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(kind):
            if arm is type(None) and value is None:
                return None
            if arm is not type(None) and _instance(value, arm):
                return _encode(value, arm, path)
        raise DocumentInvalid(f"{path}: {type(value).__name__} is not {kind}")
    if _is_model_class(kind):
        if type(value) is not kind:
            raise DocumentInvalid(f"{path}: expected {kind.__name__}, found {type(value).__name__}")
        return {name: _encode(getattr(value, name), hint, f"{path}.{name}") for name, hint in _fields(kind).items()}
    if kind in _NETWORK_TYPES:
        return str(value)
    if origin is tuple:
        args = typing.get_args(kind)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise DocumentInvalid(f"{path}: expected {len(items)} items")
        return [_encode(v, k, f"{path}[{i}]") for i, (v, k) in enumerate(zip(value, items))]
    if origin is frozenset:
        (item,) = typing.get_args(kind)
        return sorted(_encode(v, item, f"{path}[]") for v in value)
    if origin in (dict, Mapping):
        _, item = typing.get_args(kind)
        return {_key(k, path): _encode(v, item, f"{path}.{k}") for k, v in value.items()}
    return _plain(value, path)


def _instance(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind) or kind
    if origin is Mapping:
        origin = dict
    return isinstance(value, origin) and not (origin is int and isinstance(value, bool))


def _key(key: Any, path: str) -> str:
    if not isinstance(key, str):
        raise DocumentInvalid(f"{path}: key {key!r} is not a string")
    return key


def _plain(value: Any, path: str) -> Any:
    """A value JSON carries as it is (conditions as written: str, numbers, lists, mappings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DocumentInvalid(f"{path}: {value} has no JSON form")
        return value
    if isinstance(value, list):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {_key(k, path): _plain(v, f"{path}.{k}") for k, v in value.items()}
    raise DocumentInvalid(f"{path}: a {type(value).__name__} has no JSON form")


def encode(source: model.PolicySource) -> bytes:
    """The canonical JSON document of a validated policy (DocumentInvalid if it has none)."""
    document = {"format": FORMAT, "policy": _encode(source, model.PolicySource, "policy")}
    data = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
    if decode(data) != source:
        raise DocumentInvalid("the policy does not survive its JSON form (a value JSON cannot carry exactly)")
    return data


# -- decoding ---------------------------------------------------------------------------------
def _decode(value: Any, kind: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return value  # json.loads gave JSON values only
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(kind)
        if value is None:
            if type(None) in arms:
                return None
            raise DocumentInvalid(f"{path}: null where a value is needed")
        if any(arm in _NETWORK_TYPES for arm in arms):
            return _network(value, path)
        problems = []
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _decode(value, arm, path)
            except DocumentInvalid as exc:
                problems.append(str(exc))
        raise DocumentInvalid(problems[0] if len(problems) == 1 else f"{path}: fits none of {kind}")
    if _is_model_class(kind):
        if not isinstance(value, dict):
            raise DocumentInvalid(f"{path}: expected an object ({kind.__name__})")
        hints = _fields(kind)
        if set(value) != set(hints):
            missing, extra = sorted(set(hints) - set(value)), sorted(set(value) - set(hints))
            raise DocumentInvalid(f"{path}: {kind.__name__} " + "; ".join(
                part for part in (f"missing {', '.join(missing)}" if missing else "",
                                  f"unknown {', '.join(extra)}" if extra else "") if part))
        return kind(**{name: _decode(value[name], hint, f"{path}.{name}") for name, hint in hints.items()})
    if kind in _NETWORK_TYPES:
        return _network(value, path)
    if origin is tuple or origin is frozenset:
        if not isinstance(value, list):
            raise DocumentInvalid(f"{path}: expected a list")
        args = typing.get_args(kind)
        if origin is frozenset:
            return frozenset(_decode(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise DocumentInvalid(f"{path}: expected {len(items)} items")
        return tuple(_decode(v, k, f"{path}[{i}]") for i, (v, k) in enumerate(zip(value, items)))
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise DocumentInvalid(f"{path}: expected an object")
        _, item = typing.get_args(kind)
        return {k: _decode(v, item, f"{path}.{k}") for k, v in value.items()}
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind in (int, str, bool) and type(value) is kind:
        return value
    raise DocumentInvalid(f"{path}: expected {getattr(kind, '__name__', kind)}, found {type(value).__name__}")


def _network(value: Any, path: str) -> Any:
    if not isinstance(value, str):
        raise DocumentInvalid(f"{path}: expected a network")
    try:
        return ipaddress.ip_network(value)
    except ValueError:
        raise DocumentInvalid(f"{path}: {value[:64]!r} is not a network") from None


def decode(data: bytes) -> model.PolicySource:
    """A PolicySource from its canonical JSON document (DocumentInvalid otherwise)."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DocumentInvalid(f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(document, dict) or set(document) != {"format", "policy"}:
        raise DocumentInvalid("not a policy document")
    if document["format"] != FORMAT:
        raise DocumentInvalid(f"format {document['format']!r}, this code reads format {FORMAT}")
    try:
        return _decode(document["policy"], model.PolicySource, "policy")
    except RecursionError:
        raise DocumentInvalid("nested too deeply") from None


