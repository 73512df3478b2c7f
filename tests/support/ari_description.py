"""callfabric's own description of the part of ARI it uses, and where a full one is found.

``ari_description.json`` (next to this file) is data written by us: the ARI operations the
controller and the fake ARI use (path, method, parameters with their types, allowed values
and defaults, error statuses) and the models their requests, answers and events carry (every
field of each, with types and allowed values). ``tests/support/ari_spec.py`` validates the
fake ARI's requests and events against it, so the tests need nothing outside the clone.

It is extracted from a full ARI description (Swagger 1.1: ``resources.json`` +
``api-docs/*.json``), found by :func:`find_full_description` in this order:

1. ``CALLFABRIC_ARI_SPEC_DIR``: a folder holding ``resources.json`` and ``api-docs/``;
2. ``CALLFABRIC_ARI_SPEC_URL``: a running node's ARI, ``http://user:password@host:8088/ari``
   (its ``/ari/api-docs/resources.json``);
3. an Asterisk install's ``rest-api/`` folder (``CALLFABRIC_ASTERISK``, ``/opt/asterisk``,
   ``asterisk`` on PATH, ``/var/lib/asterisk``, ``/usr/share/asterisk``);
4. ``shared/asterisk-ari-spec`` in a folder above the clone (CI).

Refresh it (after using a new operation or event, or for a new Asterisk) with::

    python3 -m tests.support.ari_description [--add channels.mute] [--add-event ChannelHold]

which keeps every operation and event already described and re-extracts them all.
``tests/media/test_ari_description.py`` checks that the stored description agrees with the
full one wherever one is found, and says why it skipped otherwise.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DESCRIPTION_FILE = Path(__file__).with_name("ari_description.json")
ABOUT = ("callfabric's description of the part of Asterisk's REST Interface (ARI) it uses: operations, "
         "parameters, allowed values, and the models of answers and events. Extracted from a full ARI "
         "description by tests/support/ari_description.py, which also says how to refresh it.")


class FullDescription:
    """A full ARI description (Swagger 1.1 documents) and where it came from."""

    def __init__(self, where: str, resources: dict, api_docs: dict[str, dict]):
        self.where, self.resources, self.api_docs = where, resources, api_docs

    @classmethod
    def from_dir(cls, folder: Path) -> FullDescription:
        """``resources.json`` with the per-resource documents in ``api-docs/`` (Asterisk's source
        tree) or beside it (an install's ``rest-api/``)."""
        resources = json.loads((folder / "resources.json").read_text())
        docs = {}
        for name in _doc_names(resources):
            nested = folder / "api-docs" / f"{name}.json"
            docs[name] = json.loads((nested if nested.is_file() else folder / f"{name}.json").read_text())
        return cls(str(folder), resources, docs)

    @classmethod
    def from_url(cls, url: str, timeout: float = 5.0) -> FullDescription:
        parts = urlsplit(url)
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        base = f"{parts.scheme}://{netloc}{parts.path.rstrip('/') or '/ari'}"
        headers = {}
        if parts.username:
            token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"

        def get(path: str) -> dict:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=timeout) as r:
                return json.loads(r.read())
        resources = get("/api-docs/resources.json")
        docs = {name: get(f"/api-docs/{name}.json") for name in _doc_names(resources)}
        return cls(base + "/api-docs/resources.json", resources, docs)


def _doc_names(resources: dict) -> list[str]:
    return [api["path"].rsplit("/", 1)[-1].replace(".{format}", "") for api in resources["apis"]]


def _install_dirs() -> Iterable[Path]:
    binaries = [os.environ.get("CALLFABRIC_ASTERISK"), "/opt/asterisk/sbin/asterisk", shutil.which("asterisk")]
    for binary in filter(None, binaries):
        prefix = Path(binary).resolve().parent.parent
        yield prefix / "var" / "lib" / "asterisk" / "rest-api"
        yield prefix / "share" / "asterisk" / "rest-api"
    yield Path("/var/lib/asterisk/rest-api")
    yield Path("/usr/share/asterisk/rest-api")


def find_full_description(start: Path | None = None) -> tuple[FullDescription | None, str]:
    """(the first full description found, where) or (None, every place that was looked at);
    ``shared/`` is looked for above ``start`` (default: this file)."""
    looked: list[str] = []
    named = os.environ.get("CALLFABRIC_ARI_SPEC_DIR")
    if named:
        if (Path(named) / "resources.json").is_file():
            return FullDescription.from_dir(Path(named)), named
        looked.append(f"CALLFABRIC_ARI_SPEC_DIR={named} (no resources.json)")
    url = os.environ.get("CALLFABRIC_ARI_SPEC_URL")
    if url:
        try:
            return FullDescription.from_url(url), url
        except (OSError, ValueError) as exc:
            looked.append(f"CALLFABRIC_ARI_SPEC_URL ({exc})")
    for folder in _install_dirs():
        if (folder / "resources.json").is_file():
            return FullDescription.from_dir(folder), str(folder)
    looked.append("an Asterisk install's rest-api/ (CALLFABRIC_ASTERISK, /opt/asterisk, PATH, /var/lib/asterisk)")
    for parent in (start or Path(__file__)).resolve().parents:
        folder = parent / "shared" / "asterisk-ari-spec"
        if (folder / "resources.json").is_file():
            return FullDescription.from_dir(folder), str(folder)
    looked.append("shared/asterisk-ari-spec above the clone")
    return None, "no full ARI description found: looked at " + "; ".join(looked)


# ---------------------------------------------------------------------- extraction
def _allowed(raw: dict | None) -> dict:
    if not raw:
        return {}
    if raw.get("valueType") == "LIST":
        return {"values": list(raw["values"])}
    if raw.get("valueType") == "RANGE":
        return {"range": [raw.get("min"), raw.get("max")]}
    raise ValueError(f"unknown allowableValues {raw!r}")


def _param(raw: dict) -> dict:
    out = {"name": raw["name"], "in": raw["paramType"], "type": raw["dataType"], "required": bool(raw.get("required"))}
    if raw.get("allowMultiple"):
        out["multiple"] = True
    out.update(_allowed(raw.get("allowableValues")))
    if raw.get("defaultValue") is not None:
        out["default"] = raw["defaultValue"]
    return out


def _field(raw: dict) -> dict:
    return {"type": raw["type"], "required": bool(raw.get("required")), **_allowed(raw.get("allowableValues"))}


def _type_names(type_str: str) -> list[str]:
    item = re.fullmatch(r"List\[(.+)\]", type_str)
    return _type_names(item.group(1)) if item else [type_str]


def extract(full: FullDescription, operations: Iterable[str] | None = None,
            events: Iterable[str] | None = None) -> dict:
    """Our description from a full one: the named operations (``resource.nickname``; None: all)
    and events (None: all), with every model they reach and each model's every field."""
    ops: list[dict] = []
    raw_models: dict[str, dict] = {}
    wanted = None if operations is None else set(operations)
    for resource, doc in full.api_docs.items():
        for name, model in doc.get("models", {}).items():
            raw_models[name] = model
        for api in doc.get("apis", []):
            for raw in api.get("operations", []):
                if wanted is not None and f"{resource}.{raw['nickname']}" not in wanted:
                    continue
                op = {"method": raw["httpMethod"].upper(), "path": api["path"], "resource": resource,
                      "nickname": raw["nickname"], "response": raw.get("responseClass", "void"),
                      "params": [_param(p) for p in raw.get("parameters", [])],
                      "errors": {str(e["code"]): e.get("reason", "") for e in raw.get("errorResponses", [])}}
                if raw.get("upgrade") == "websocket":
                    op["websocket"] = True
                ops.append(op)
    found = {f"{op['resource']}.{op['nickname']}" for op in ops}
    if wanted is not None and wanted - found:
        raise ValueError(f"not in {full.where}: {', '.join(sorted(wanted - found))}")
    parent = {sub: name for name, model in raw_models.items() for sub in model.get("subTypes", ())}

    def descendants(name: str) -> set[str]:
        out = set()
        for sub in raw_models[name].get("subTypes", ()):
            out |= {sub} | descendants(sub)
        return out
    event_names = descendants("Event") if events is None else set(events)
    unknown = event_names - descendants("Event")
    if unknown:
        raise ValueError(f"not events in {full.where}: {', '.join(sorted(unknown))}")

    keep: set[str] = set()
    todo = [t for op in ops for t in _type_names(op["response"])] + sorted(event_names) + ["Message", "Event"]
    while todo:
        name = todo.pop()
        if name in keep or name not in raw_models:
            continue
        keep.add(name)
        todo.extend(t for prop in raw_models[name].get("properties", {}).values() for t in _type_names(prop["type"]))
        if name in parent:
            todo.append(parent[name])
    models = {}
    for name in sorted(keep):
        raw = raw_models[name]
        model: dict[str, Any] = {"fields": {fn: _field(fd) for fn, fd in raw.get("properties", {}).items()}}
        subtypes = [s for s in raw.get("subTypes", ()) if s in keep]
        if subtypes:
            model["subtypes"] = subtypes
        if raw.get("discriminator"):
            model["discriminator"] = raw["discriminator"]
        models[name] = model
    ops.sort(key=lambda o: (o["path"], o["method"]))
    return {"about": ABOUT, "api_version": full.resources.get("apiVersion", ""),
            "extracted_from": _source_label(full), "operations": ops, "models": models}


def _source_label(full: FullDescription) -> str:
    """Where it came from, without a password or a machine-specific path."""
    parent = Path(full.where)
    if full.where.startswith("http"):
        return "a running node's /ari/api-docs"
    return f"{parent.parent.name}/{parent.name}" if parent.name else full.where


def described_names(description: dict) -> tuple[list[str], list[str]]:
    """(operations as resource.nickname, event types) of a description."""
    ops = sorted(f"{op['resource']}.{op['nickname']}" for op in description["operations"])

    def descendants(name: str) -> list[str]:
        out = []
        for sub in description["models"].get(name, {}).get("subtypes", ()):
            out += [sub, *descendants(sub)]
        return out
    return ops, sorted(descendants("Event"))


def differences(ours: dict, theirs: dict) -> list[str]:
    """Where our description disagrees with one extracted from a full description."""
    out = []
    their_ops = {(o["resource"], o["nickname"]): o for o in theirs["operations"]}
    for op in ours["operations"]:
        other = their_ops.get((op["resource"], op["nickname"]))
        if other is None:
            out.append(f"operation {op['resource']}.{op['nickname']}: not in the full description")
        elif other != op:
            for key in sorted(set(op) | set(other)):
                if op.get(key) != other.get(key):
                    out.append(f"operation {op['method']} {op['path']}: {key}: ours {op.get(key)!r}, "
                               f"full {other.get(key)!r}")
    for name, model in ours["models"].items():
        other = theirs["models"].get(name)
        if other is None:
            out.append(f"model {name}: not in the full description")
            continue
        for field_name in sorted(set(model["fields"]) | set(other["fields"])):
            a, b = model["fields"].get(field_name), other["fields"].get(field_name)
            if a != b:
                out.append(f"model {name}.{field_name}: ours {a!r}, full {b!r}")
        for key in ("subtypes", "discriminator"):
            if model.get(key) != other.get(key):
                out.append(f"model {name}: {key}: ours {model.get(key)!r}, full {other.get(key)!r}")
    return out


def dumps(description: dict) -> str:
    """JSON with one parameter or field per line (readable diffs)."""
    def leaf(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)
    lines = ["{", f' "about": {leaf(description["about"])},', f' "api_version": {leaf(description["api_version"])},',
             f' "extracted_from": {leaf(description["extracted_from"])},', ' "operations": [']
    for i, op in enumerate(description["operations"]):
        head = {k: v for k, v in op.items() if k not in ("params", "errors")}
        lines.append("  {" + leaf(head)[1:-1] + ",")
        lines.append('   "params": [' + ("" if op["params"] else "],"))
        for j, p in enumerate(op["params"]):
            lines.append("    " + leaf(p) + ("," if j < len(op["params"]) - 1 else ""))
        if op["params"]:
            lines.append("   ],")
        lines.append(f'   "errors": {leaf(op["errors"])}' + "}" + ("," if i < len(description["operations"]) - 1 else ""))
    lines += [" ],", ' "models": {']
    names = list(description["models"])
    for i, name in enumerate(names):
        model = description["models"][name]
        lines.append(f"  {leaf(name)}: {{")
        extra = {k: v for k, v in model.items() if k != "fields"}
        for key, value in extra.items():
            lines.append(f"   {leaf(key)}: {leaf(value)},")
        lines.append('   "fields": {')
        fields = list(model["fields"].items())
        for j, (fn, fd) in enumerate(fields):
            lines.append(f"    {leaf(fn)}: {leaf(fd)}" + ("," if j < len(fields) - 1 else ""))
        lines.append("   }}" + ("," if i < len(names) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.support.ari_description",
                                     description="Refresh callfabric's ARI description from a full one.")
    parser.add_argument("--from", dest="source", help="a folder with resources.json + api-docs/, or a node's ARI URL "
                                                      "(default: the first one found, see this module's docstring)")
    parser.add_argument("--add", action="append", default=[], help="another operation, resource.nickname")
    parser.add_argument("--add-event", action="append", default=[], help="another event type")
    args = parser.parse_args(argv)
    if args.source:
        full = FullDescription.from_url(args.source) if args.source.startswith("http") else \
            FullDescription.from_dir(Path(args.source))
    else:
        full, why = find_full_description()
        if full is None:
            print(f"error: {why}", file=sys.stderr)
            return 1
    ours = json.loads(DESCRIPTION_FILE.read_text()) if DESCRIPTION_FILE.exists() else None
    ops, events = described_names(ours) if ours else ([], [])
    description = extract(full, sorted(set(ops) | set(args.add)), sorted(set(events) | set(args.add_event)))
    DESCRIPTION_FILE.write_text(dumps(description))
    print(f"{DESCRIPTION_FILE}: {len(description['operations'])} operations, {len(description['models'])} models "
          f"from {full.where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
