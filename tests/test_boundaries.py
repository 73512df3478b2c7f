"""The dependency rule between the controller's boundaries (DESIGN.md), read from every module's
imports (ast: top-level, inside functions and under TYPE_CHECKING alike), so it cannot erode:

- `policy/` is pure: it imports only itself and the shared model (`controller.actions`,
  `controller.schema_errors`, `controller.json_schema`); Kamailio's embedded Python runs it.
- `state/` is where `edge/` and `media/` meet: it may read the policy model, nothing else.
- `edge/` and `media/` never import each other.
- `security/` is consulted by `edge/` (which also provides the Kamailio side of
  `security.edges.Edge`) and knows nothing of edge, media or api: it may use `state/` (bans
  and counters live in Redis) and `policy/`.
- `media/` imports neither `edge/`, `api/` nor `security/` (its Asterisk security events
  reach security through a callback app.py wires).
- `api/` calls services, never a wire client: not Kamailio's JSON-RPC or evapi protocol, not
  ARI, AMI or rtpengine's NG protocol (WIRE below).
- the shared model (`controller.actions`, `controller.schema_errors`, `controller.json_schema`)
  imports no boundary, and
  no boundary imports the wiring (`app`, `cli`, `config`, `lifecycle`, `localstack`): only
  those put the pieces together.
Tests may import anything."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "controller"

BOUNDARIES = {"policy", "edge", "state", "media", "api", "security"}
SHARED_MODEL = {"actions", "schema_errors", "json_schema"}
WIRING = {"app", "cli", "config", "lifecycle", "localstack"}
WIRE = {"controller.edge.rpc", "controller.edge.channel", "controller.edge.protocol",
        "controller.media.ari", "controller.media.ami", "controller.media.rtpengine"}

# boundary -> the top-level controller packages/modules it must not import
FORBIDDEN = {
    "state": {"edge", "media", "api", "security"},
    "edge": {"media", "api"},
    "media": {"edge", "api", "security"},
    "security": {"edge", "media", "api"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every controller module or name `path` imports; `from a import b`
    gives both `a` and `a.b` (b may be a module)."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(node.lineno, base)] if node.module else []
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "controller"]


def violations(source: str, target: str) -> list[str]:
    """Why `source` (a module) may not import `target` (a dotted name); [] when it may."""
    src, dst = source.split("."), target.split(".")
    if len(src) < 2 or len(dst) < 2 or src[1] == dst[1]:
        return []
    owner, other = src[1], dst[1]
    problems = []
    if owner == "policy" and other not in SHARED_MODEL:
        problems.append("policy/ is pure: it imports only the shared model")
    if owner in SHARED_MODEL and other in BOUNDARIES:
        problems.append("the shared model imports no boundary")
    if owner in BOUNDARIES and other in WIRING:
        problems.append("a boundary never imports the wiring (only app.py wires)")
    if other in FORBIDDEN.get(owner, ()):
        problems.append(f"{owner}/ never imports {other}/")
    if owner == "api" and any(target == w or target.startswith(w + ".") for w in WIRE):
        problems.append("api/ calls services, never a wire client")
    return problems


def import_graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(path): imported(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_boundaries_import_only_what_the_dependency_rule_allows():
    found = {}  # one line per import statement and reason
    for module, targets in import_graph().items():
        for line, target in targets:
            for why in violations(module, target):
                found.setdefault((module, line, why), f"{module} line {line} imports {target}: {why}")
    assert not found, "\n".join(found.values())


def test_the_import_graph_sees_the_imports_the_rule_is_about():
    """The check above reads the real imports (a parser that found none would pass anything)."""
    graph = {module: {target for _, target in targets} for module, targets in import_graph().items()}
    assert set(BOUNDARIES) <= {m.split(".")[1] for m in graph if m.count(".") >= 1}
    assert "controller.security.guard.SecurityGuard" in graph["controller.edge.decisions"]
    assert "controller.security.edges" in graph["controller.edge.rpc"]
    assert "controller.media.plane.MediaPlane" in graph["controller.api.commands"]
    assert "controller.edge.rpc.KamailioRpc" in graph["controller.app"]


def test_every_kind_of_forbidden_import_is_named():
    assert violations("controller.policy.compile", "controller.state.calls")
    assert violations("controller.policy.compile", "controller.metrics")
    assert violations("controller.edge.local", "controller.media.plane")
    assert violations("controller.media.ami", "controller.edge.rpc.KamailioRpc")
    assert violations("controller.security.guard", "controller.media.ami.SecurityEvent")
    assert violations("controller.security.hot", "controller.edge.verdict")
    assert violations("controller.api.commands", "controller.media.ari.AriError")
    assert violations("controller.api.routes", "controller.edge.rpc")
    assert violations("controller.state.calls", "controller.security.bans")
    assert violations("controller.actions", "controller.policy")
    assert violations("controller.edge.decisions", "controller.config")
    # what the rule allows
    assert not violations("controller.edge.decisions", "controller.security.guard")
    assert not violations("controller.security.bans", "controller.state.batch")
    assert not violations("controller.api.commands", "controller.media.plane")
    assert not violations("controller.policy.validate", "controller.actions")
    assert not violations("controller.app", "controller.edge.rpc")


def test_relative_imports_are_resolved(tmp_path, monkeypatch):
    package = tmp_path / "controller" / "security"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from . import guard\n")
    (package / "guard.py").write_text("def f():\n    from ..media.ami import SecurityEvent\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert imported(package / "guard.py") == [(2, "controller.media.ami"), (2, "controller.media.ami.SecurityEvent")]
    assert imported(package / "__init__.py") == [(1, "controller.security.guard")]
