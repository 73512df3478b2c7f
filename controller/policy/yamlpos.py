"""YAML loading that remembers where every value came from.

Operators must be told *where* a mistake is (file:line:column), so policy files are
composed into PyYAML nodes and converted here, recording the position of every key and
value by its path. Scalars follow YAML 1.2 core rules (only true/false are booleans, no
sexagesimal numbers, no `no`/`on`), because YAML 1.1 turns `17:00` into 1020 and `no`
into False — silent traps in a routing policy. Duplicate keys are errors, not overrides.
"""
from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from controller.policy.model import Position

Path = tuple[str | int, ...]


class YamlSyntaxError(Exception):
    def __init__(self, position: Position, message: str):
        super().__init__(f"{position}: {message}")
        self.position = position
        self.message = message


class _CoreResolver(BaseResolver):
    """YAML 1.2 core schema resolution (a strict subset of what PyYAML does by default)."""


_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:-?(?:0|[1-9][0-9]*))$"), list("-0123456789")
)
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:-?(?:0|[1-9][0-9]*)\.[0-9]+(?:[eE][-+]?[0-9]+)?)$"),
    list("-0123456789"),
)
_CoreResolver.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)


class _NodeLoader(Reader, Scanner, Parser, Composer, _CoreResolver):
    def __init__(self, stream: str):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _CoreResolver.__init__(self)


class PositionedDocument:
    """A loaded YAML document plus the position of each path inside it."""

    def __init__(self, file: str, data: Any, positions: dict[Path, Position], key_positions: dict[Path, Position]):
        self.file = file
        self.data = data
        self._positions = positions
        self._key_positions = key_positions

    def position(self, path: Path, *, key: bool = False) -> Position:
        """Best position for `path`: the key itself if asked and known, else the value, else the nearest parent."""
        path = tuple(path)
        if key and path in self._key_positions:
            return self._key_positions[path]
        while True:
            if path in self._positions:
                return self._positions[path]
            if not path:
                return Position(self.file, 1, 1)
            path = path[:-1]


def _mark(file: str, mark: Any) -> Position:
    return Position(file, mark.line + 1, mark.column + 1)


def load_yaml(text: str, file: str) -> PositionedDocument:
    """Parse one YAML document; raise YamlSyntaxError with a position on any syntax problem."""
    try:
        loader = _NodeLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = _mark(file, mark) if mark else Position(file, 1, 1)
        raise YamlSyntaxError(position, f"YAML syntax: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:  # reader errors (e.g. NUL or non-printable characters)
        raise YamlSyntaxError(Position(file, 1, 1), f"YAML syntax: {exc}") from None

    positions: dict[Path, Position] = {}
    key_positions: dict[Path, Position] = {}

    def convert(node: yaml.Node, path: Path) -> Any:
        positions[path] = _mark(file, node.start_mark)
        if isinstance(node, yaml.MappingNode):
            result: dict[str, Any] = {}
            first_seen: dict[str, Position] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or (key_node.value == "<<" and key_node.style is None):
                    raise YamlSyntaxError(_mark(file, key_node.start_mark), "YAML merge keys (<<) are not supported")
                key = convert(key_node, path + ("<key>",))
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    raise YamlSyntaxError(_mark(file, key_node.start_mark), "mapping keys must be plain scalars")
                key = str(key) if not isinstance(key, str) else key
                key_pos = _mark(file, key_node.start_mark)
                if key in first_seen:
                    raise YamlSyntaxError(key_pos, f"duplicate key {key!r} (first defined at line {first_seen[key].line})")
                first_seen[key] = key_pos
                key_positions[path + (key,)] = key_pos
                result[key] = convert(value_node, path + (key,))
            positions.pop(path + ("<key>",), None)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [convert(item, path + (i,)) for i, item in enumerate(node.value)]
        return _scalar(node, file)

    data = convert(node, ()) if node is not None else None
    return PositionedDocument(file, data, positions, key_positions)


def _scalar(node: yaml.ScalarNode, file: str) -> Any:
    tag, value = node.tag, node.value
    if tag == "tag:yaml.org,2002:str":
        return value
    if tag == "tag:yaml.org,2002:null":
        return None
    if tag == "tag:yaml.org,2002:bool":
        return value.lower() == "true"
    try:
        if tag == "tag:yaml.org,2002:int":
            return int(value)
        if tag == "tag:yaml.org,2002:float":
            return float(value)
    except ValueError:
        raise YamlSyntaxError(_mark(file, node.start_mark), f"{value!r} is not a valid {tag.rsplit(':', 1)[-1]}") from None
    raise YamlSyntaxError(_mark(file, node.start_mark), f"unsupported YAML tag {tag!r}")
