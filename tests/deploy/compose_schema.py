"""The part of the Compose Specification's JSON Schema that ``compose.yaml`` uses, kept in the
repository (``compose-schema.json`` next to this file) so that a clone checks its compose file
with nothing beside it.

It is the full schema (github.com/compose-spec/compose-spec, ``schema/compose-spec.json``,
Apache-2.0) with only the top-level keys and service keys ``compose.yaml`` uses, the
definitions they reach, and no descriptions. The full schema is looked for in
``CALLFABRIC_COMPOSE_SPEC`` (a file) and in ``shared/compose-spec/compose-spec.json`` above
the clone; ``tests/deploy/test_deploy.py`` checks that this subset is what the full one says,
and skips that one check, with its reason, when none is found. After using a new compose key,
refresh it with::

    python3 -m tests.deploy.compose_schema [--from compose-spec.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SUBSET_FILE = Path(__file__).with_name("compose-schema.json")
COMMENT = ("callfabric's subset of the Compose Specification JSON Schema (Apache-2.0): the keys compose.yaml "
           "uses. Refresh: python3 -m tests.deploy.compose_schema (see tests/deploy/compose_schema.py).")


def find_full_schema(start: Path | None = None) -> tuple[dict | None, str]:
    """(the full Compose schema, where) or (None, where it was looked for)."""
    named = os.environ.get("CALLFABRIC_COMPOSE_SPEC")
    if named and Path(named).is_file():
        return json.loads(Path(named).read_text()), named
    for parent in (start or Path(__file__)).resolve().parents:
        candidate = parent / "shared" / "compose-spec" / "compose-spec.json"
        if candidate.is_file():
            return json.loads(candidate.read_text()), str(candidate)
    return None, ("the Compose Specification schema is not here (looked at CALLFABRIC_COMPOSE_SPEC"
                  f"{'=' + named if named else ''} and shared/compose-spec/compose-spec.json above the clone)")


def used_keys(compose: dict) -> tuple[list[str], list[str]]:
    """(top-level keys, service keys) a compose document uses (``x-`` extensions excepted)."""
    top = sorted(k for k in compose if not k.startswith("x-"))
    service = sorted({k for s in (compose.get("services") or {}).values() for k in s if not k.startswith("x-")})
    return top, service


def kept_keys(subset: dict) -> tuple[list[str], list[str]]:
    return sorted(subset["properties"]), sorted(subset["definitions"]["service"]["properties"])


def _strip_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_descriptions(v) for k, v in node.items()
                if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [_strip_descriptions(v) for v in node]
    return node


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        out = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
        for value in node.values():
            out |= _refs(value)
        return out
    if isinstance(node, list):
        return set().union(*map(_refs, node)) if node else set()
    return set()


def extract(full: dict, top: list[str], service: list[str]) -> dict:
    """The full schema cut down to the top-level and service keys named, with what they reach."""
    missing = [k for k in top if k not in full["properties"]] + \
        [k for k in service if k not in full["definitions"]["service"]["properties"]]
    if missing:
        raise ValueError(f"not in the Compose Specification: {', '.join(missing)}")
    schema = copy.deepcopy(full)
    schema["properties"] = {k: v for k, v in schema["properties"].items() if k in top}
    props = schema["definitions"]["service"]["properties"]
    schema["definitions"]["service"]["properties"] = {k: v for k, v in props.items() if k in service}
    definitions = schema.pop("definitions")
    keep: set[str] = set()
    todo = _refs(schema) | {"service"}
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo |= _refs(definitions[name]) - keep
    schema["definitions"] = {k: v for k, v in definitions.items() if k in keep}
    schema = _strip_descriptions(schema)
    schema["$comment"] = COMMENT
    return schema


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.deploy.compose_schema",
                                     description="Refresh callfabric's subset of the Compose schema.")
    parser.add_argument("--from", dest="source", help="compose-spec.json (default: the first one found)")
    args = parser.parse_args(argv)
    if args.source:
        full, where = json.loads(Path(args.source).read_text()), args.source
    else:
        full, where = find_full_schema()
        if full is None:
            print(f"error: {where}", file=sys.stderr)
            return 1
    top, service = used_keys(yaml.safe_load((ROOT / "compose.yaml").read_text()))
    if SUBSET_FILE.exists():
        old_top, old_service = kept_keys(json.loads(SUBSET_FILE.read_text()))
        top, service = sorted(set(top) | set(old_top)), sorted(set(service) | set(old_service))
    SUBSET_FILE.write_text(json.dumps(extract(full, top, service), indent=1) + "\n")
    print(f"{SUBSET_FILE}: top-level {', '.join(top)}; services: {', '.join(service)} (from {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
