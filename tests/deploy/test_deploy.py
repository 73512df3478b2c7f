"""The operators' stack (no docker engine here): compose.yaml against the Compose
Specification's JSON Schema and against the repository (files, ports, variables), the
images' files, Prometheus scrape config and alert rules (promtool when Debian's is
installed), and the Grafana dashboard: current, well-formed, valid for Grafana's own schema
types (tsc), every metric a panel uses exported by the controller or a real Kamailio."""
from __future__ import annotations

import fnmatch
import html
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

from controller.metrics import Metrics
from tests.deploy import compose_schema

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_SCHEMA = json.loads(compose_schema.SUBSET_FILE.read_text())
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
ENV_EXAMPLE = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
CONTAINER_PORTS = {"controller": 8460, "kamailio": 8090, "asterisk": 8088}


def _schema_errors(schema: dict, document: dict) -> list[str]:
    errors = sorted(Draft7Validator(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_compose_file_is_valid_against_our_compose_schema():
    """tests/deploy/compose-schema.json: the Compose schema's part compose.yaml uses (in the clone)."""
    errors = _schema_errors(COMPOSE_SCHEMA, COMPOSE)
    assert not errors, "\n".join(errors) + "\n(a new compose key? python3 -m tests.deploy.compose_schema)"
    broken = {**COMPOSE, "services": {**COMPOSE["services"], "redis": {**COMPOSE["services"]["redis"], "restart": 3,
                                                                          "ports": "6379"}}}
    assert len(_schema_errors(COMPOSE_SCHEMA, broken)) == 2


def test_our_compose_schema_agrees_with_the_compose_specification():
    full, where = compose_schema.find_full_schema()
    if full is None:
        pytest.skip(where)
    errors = _schema_errors(full, COMPOSE)
    assert not errors, "\n".join(errors)
    top, service = compose_schema.kept_keys(COMPOSE_SCHEMA)
    assert compose_schema.extract(full, top, service) == COMPOSE_SCHEMA, \
        f"tests/deploy/compose-schema.json is not {where}'s: python3 -m tests.deploy.compose_schema"


def build_of(service: dict) -> tuple[Path, Path]:
    """(context, Dockerfile) of a service built by compose."""
    build = service["build"]
    if isinstance(build, str):
        return ROOT / build, ROOT / build / "Dockerfile"
    context = ROOT / build["context"]
    return context, context / build.get("dockerfile", "Dockerfile")


BUILT = {name: build_of(service) for name, service in COMPOSE["services"].items() if "build" in service}


def test_every_build_context_and_mounted_file_exists():
    for name, service in COMPOSE["services"].items():
        if "build" in service:
            context, dockerfile = BUILT[name]
            assert context.is_dir() and dockerfile.is_file(), f"{name}: no {dockerfile} for context {context}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: mounted {source} does not exist"
            else:
                assert source in COMPOSE.get("volumes", {}), f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in COMPOSE["services"], f"{name}: depends on unknown service {dependency}"
        for network in service.get("networks", []):
            assert network in COMPOSE["networks"]


def test_every_variable_has_an_example_or_a_default():
    text = (ROOT / "compose.yaml").read_text()
    for name, operator in re.findall(r"\$\{([A-Z_]+)(:-|:\?|\})", text):
        if operator != ":-":
            assert name in ENV_EXAMPLE, f"${{{name}}} is required by compose.yaml but missing from .env.example"
    assert not re.search(r"(?i)(password|secret)\s*[:=]\s*['\"]?[a-z0-9]{6,}", text), "a secret is committed"


def test_published_host_ports_do_not_collide():
    seen = {}
    for name, service in COMPOSE["services"].items():
        for port in service.get("ports", []):
            host = re.sub(r"\$\{[A-Z_]+:-([0-9-]+)\}", r"\1", port.rsplit(":", 1)[0])
            proto = port.rsplit("/", 1)[1] if "/" in port else "tcp"
            key = (host, proto)
            assert key not in seen, f"{name} and {seen.get(key)} both publish {host}/{proto}"
            seen[key] = name


def copied(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of every COPY line from the build context (not from another stage)."""
    out = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and not line.startswith("COPY --from="):
            *sources, destination = line.split()[1:]
            out += [(source, destination) for source in sources]
    return out


@pytest.mark.parametrize("service", sorted(BUILT))
def test_dockerfiles_copy_files_that_exist(service):
    context, dockerfile = BUILT[service]
    ignore = context / ".dockerignore"
    ignored = [line for line in ignore.read_text().splitlines() if line and not line.startswith("#")] \
        if ignore.exists() else []
    sources = list(copied(dockerfile))
    assert sources, f"{dockerfile}: no COPY found"
    for source, _ in sources:
        assert (list(context.glob(source)) if "*" in source else (context / source).exists()), \
            f"{dockerfile}: COPY {source} not in {context}"
        parts = Path(source).parts
        hit = [p for p in ignored if any(fnmatch.fnmatch("/".join(parts[:n]), p.removeprefix("**/"))
                                         for n in range(1, len(parts) + 1))]
        assert not hit, f"{dockerfile}: COPY {source} is excluded from the build context by {hit}"
    assert "\nUSER " in dockerfile.read_text(), f"{dockerfile}: the image must not run as root"


def test_the_controller_image_builds_the_phone_page_from_the_committed_lock():
    text = (ROOT / "Dockerfile").read_text()
    assert "COPY controller/api/phone/package.json controller/api/phone/package-lock.json" in text
    assert "npm ci" in text and "COPY --from=phone /phone/dist/phone.js ./controller/api/phone/dist/phone.js" in text
    lock = json.loads((ROOT / "controller" / "api" / "phone" / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/jssip"]["version"] == json.loads(
        (ROOT / "controller" / "api" / "phone" / "package.json").read_text())["dependencies"]["jssip"]


def test_the_edge_image_has_every_file_its_config_includes():
    context, dockerfile = BUILT["kamailio"]
    main = ROOT / "kamailio" / "kamailio.cfg"
    needed = {main, ROOT / "kamailio" / "tls.cfg"} | {
        main.parent / name for name in re.findall(r'^include_file "([^"]+)"', main.read_text(), re.M)}
    sources = [path for source, _ in copied(dockerfile) for path in context.glob(source)]
    assert len(needed) > 4 and not needed - set(sources), f"kamailio image lacks {sorted(needed - set(sources))}"


def test_the_edge_image_runs_the_deciding_code_and_reads_the_controllers_policy_file():
    """Kamailio's embedded Python decides with the same code as the controller (the policy
    file carries that code's fingerprint) and reads the file the controller writes."""
    from controller.edge import bundle
    context, dockerfile = BUILT["kamailio"]
    assert context == ROOT
    sources = [ROOT / source for source, _ in copied(dockerfile)]
    for path in bundle._DECIDING_CODE + [ROOT / "kamailio" / "edge_decide.py"]:
        assert any(path == s or s in path.parents for s in sources), f"kamailio image lacks {path.relative_to(ROOT)}"
    assert "kamailio-python3-modules" in dockerfile.read_text() and "tzdata" in dockerfile.read_text()
    written = COMPOSE["services"]["controller"]["environment"]["CALLFABRIC_EDGE_POLICY_FILE"]
    read = COMPOSE["services"]["kamailio"]["environment"]["EDGE_POLICY"]

    def mount(service: str, path: str) -> str:
        for volume in COMPOSE["services"][service]["volumes"]:
            name, target = volume.split(":")[:2]
            if path.startswith(target + "/"):
                return name
        raise AssertionError(f"{service}: {path} is on no volume")
    assert mount("controller", written) == mount("kamailio", read) == "edge-policy"
    assert written.rsplit("/", 1)[1] == read.rsplit("/", 1)[1]

    # the key that file is signed with: made by the one-shot edge-key service on a volume of its
    # own, which the controller and Kamailio only read (writing the policy volume is not enough
    # to replace it)
    signer = COMPOSE["services"]["controller"]["environment"]["CALLFABRIC_EDGE_POLICY_KEY_FILE"]
    checker = COMPOSE["services"]["kamailio"]["environment"]["EDGE_POLICY_KEY"]
    assert mount("controller", signer) == mount("kamailio", checker) == "edge-key"
    assert signer.rsplit("/", 1)[1] == checker.rsplit("/", 1)[1]
    maker = COMPOSE["services"]["edge-key"]
    assert maker["command"][:3] == ["callfabric", "edge", "key"] and maker["command"][-1].endswith(signer.rsplit("/", 1)[1])
    for service in ("controller", "kamailio"):
        assert [v for v in COMPOSE["services"][service]["volumes"] if v.startswith("edge-key:")][0].endswith(":ro")
        assert COMPOSE["services"][service]["depends_on"]["edge-key"]["condition"] == "service_completed_successfully"


def test_the_controller_image_checks_its_health():
    assert "HEALTHCHECK" in (ROOT / "Dockerfile").read_text() and "/healthz" in (ROOT / "Dockerfile").read_text()


def test_asterisk_placeholders_are_all_filled_by_the_entrypoint_and_the_local_runner():
    used = set()
    for conf in (ROOT / "asterisk").glob("*.conf"):
        used |= set(re.findall(r"@@([A-Z_]+)@@", conf.read_text()))
    entrypoint = (ROOT / "asterisk" / "bin" / "docker-entrypoint.sh").read_text()
    runner = (ROOT / "controller" / "localstack" / "asterisk.py").read_text()
    assert used
    for name in used:
        assert f"@@{name}@@" in entrypoint, f"docker-entrypoint.sh does not fill @@{name}@@"
        assert f'"{name}"' in runner, f"localstack/asterisk.py does not fill @@{name}@@"


def test_kamailio_entrypoint_uses_defines_the_config_knows():
    config = (ROOT / "kamailio" / "kamailio.cfg").read_text()
    entrypoint = (ROOT / "kamailio" / "docker-entrypoint.sh").read_text()
    for define in set(re.findall(r'-A "([A-Z_]+)=', entrypoint)):
        assert re.search(rf"#!(try)?def(ine)? {define}\b|#!ifdef {define}\b", config), f"kamailio.cfg has no {define}"


def test_the_controller_and_prometheus_may_use_kamailios_management_port():
    """Kamailio answers /RPC and /metrics only from RPC_ALLOWED_NET / HTTP_ALLOWED_NET (loopback
    by default): in compose, the controller (bans) and Prometheus come from the core network."""
    entrypoint = (ROOT / "kamailio" / "docker-entrypoint.sh").read_text()
    kamailio = COMPOSE["services"]["kamailio"]["environment"]
    for variable in ("HTTP_ALLOWED_NET", "RPC_ALLOWED_NET", "EVAPI_ALLOWED_NET"):
        assert f'-A "{variable}=' in entrypoint and f"${{{variable}:-" in entrypoint, variable
        assert kamailio[variable] == "${CORE_SUBNET:-172.28.0.0/16}", variable
    subnet = COMPOSE["networks"]["core"]["ipam"]["config"][0]["subnet"]
    assert subnet == "${CORE_SUBNET:-172.28.0.0/16}"
    controller = COMPOSE["services"]["controller"]["environment"]
    assert controller["CALLFABRIC_EDGE_RPC"] == f"http://kamailio:{kamailio['HTTP_PORT']}/RPC"
    assert controller["CALLFABRIC_EDGE_EVAPI"] == f"kamailio:{kamailio['EVAPI_BIND'].split(':')[1]}"


def test_prometheus_scrapes_every_service_on_its_port():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for service, port in CONTAINER_PORTS.items():
        assert f"{service}:{port}" in targets
        assert service in COMPOSE["services"]
    assert COMPOSE["services"]["controller"]["environment"]["CALLFABRIC_HTTP_LISTEN"].endswith(":8460")
    assert COMPOSE["services"]["kamailio"]["environment"]["HTTP_PORT"] == "8090"


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:callfabric|kamailio)_[a-z0-9_]+)\b", expr))


def _controller_metrics() -> set[str]:
    names = set()
    for name, kind, _, _ in Metrics().describe():
        names.add(name)
        if kind == "histogram":
            names |= {name + "_bucket", name + "_sum", name + "_count"}
    return names


def test_alert_rules(tmp_path):
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    controller = _controller_metrics()
    # what kamailio.cfg declares to xhttp_prom (exported with the kamailio_ prefix; counters as declared)
    config = "".join(path.read_text() for path in sorted((ROOT / "kamailio").glob("*.cfg")))  # includes too
    kamailio = {f"kamailio_{n}" for n in re.findall(r'"prom_(?:counter|gauge)", "name=(\w+)', config)}
    assert kamailio
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
        for name in _metric_names(rule["expr"]):
            assert name in controller or name in kamailio, f"{rule['alert']}: {name} is exported by nobody"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed: "
                    "the alert rules and the Prometheus config are not checked by Prometheus itself")
def test_prometheus_accepts_the_alert_rules_and_its_config(tmp_path):
    promtool = shutil.which("promtool")
    done = subprocess.run([promtool, "check", "rules", str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    config = tmp_path / "prometheus.yml"
    config.write_text((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
                      .replace("/etc/prometheus/alerts.yml", str(ROOT / "deploy" / "prometheus" / "alerts.yml")))
    done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


DASHBOARD = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "callfabric.json").read_text())


def test_the_dashboard_is_current_and_well_formed():
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_dashboard", ROOT / "deploy" / "grafana" / "build_dashboard.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert DASHBOARD == builder.build(), "run: python deploy/grafana/build_dashboard.py > deploy/grafana/dashboards/callfabric.json"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)) and DASHBOARD["uid"] and DASHBOARD["schemaVersion"] >= 36
    datasource = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
                                .read_text())["datasources"][0]["uid"]
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource and panel["targets"]
            assert all(t["expr"] and t["refId"] for t in panel["targets"])
    wanted = {"Calls active", "Calls per second by outcome", "Decision latency", "Rejects by rule", "Forks active",
              "One-way audio alarms", "Transfers", "Webhook latency p95", "Webhook deliveries",
              "Policy version serving", "Policy reloads", "ARI connected per media node", "Redis", "Kamailio edge",
              "Where calls are decided"}
    assert wanted <= {p["title"] for p in DASHBOARD["panels"]}


SCHEMA_CHECK = ROOT / "deploy" / "grafana" / "schema-check"
TSC = SCHEMA_CHECK / "node_modules" / ".bin" / "tsc"


def _grafana_type_errors(tmp_path: Path, dashboards: dict[str, dict]) -> str:
    """tsc's complaints about each dashboard as a literal of Grafana's `Dashboard` type."""
    schema = (SCHEMA_CHECK / "node_modules" / "@grafana" / "schema").as_posix()
    files = []
    for name, dashboard in dashboards.items():
        path = tmp_path / f"{name}.ts"
        path.write_text(f'import type {{ Dashboard }} from "{schema}";\n'
                        f"export const dashboard: Dashboard = {json.dumps(dashboard, indent=1)};\n")
        files.append(str(path))
    done = subprocess.run([str(TSC), "--noEmit", "--strict", "--skipLibCheck", "--moduleResolution", "node",
                           "--module", "commonjs", "--target", "es2020", *files],
                          capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


@pytest.mark.skipif(not TSC.exists(), reason="Grafana's schema types are not installed: "
                                             "npm ci --prefix deploy/grafana/schema-check (.ci/install-system-packages does it)")
def test_the_dashboard_passes_grafanas_own_schema(tmp_path):
    """Grafana publishes its dashboard schema as TypeScript types (@grafana/schema, the version
    of the grafana image in compose.yaml): the dashboard must type-check as a `Dashboard`."""
    image = COMPOSE["services"]["grafana"]["image"].split(":")[1]
    assert json.loads((SCHEMA_CHECK / "package.json").read_text())["devDependencies"]["@grafana/schema"] == image
    broken = json.loads(json.dumps(DASHBOARD))
    broken["panels"][1]["gridPos"]["x"] = "left"  # the check must be able to fail
    errors = _grafana_type_errors(tmp_path, {"callfabric": DASHBOARD, "broken": broken})
    assert "callfabric.ts" not in errors, errors
    assert "broken.ts" in errors and "not assignable" in errors, errors


def test_every_metric_a_panel_uses_is_exported(tmp_path):
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]
    used = set().union(*(_metric_names(e) for e in exprs))
    controller = _controller_metrics()
    missing = {n for n in used if n.startswith("callfabric_") and n not in controller}
    assert not missing, f"panels use metrics the controller does not export: {missing}"
    kamailio_used = {n for n in used if n.startswith("kamailio_")}
    from tests.support.kamailio import HAS_APP_PYTHON3, FakeDecider, wait_clients
    if shutil.which("kamailio") is None or not HAS_APP_PYTHON3:
        pytest.skip("kamailio (with app_python3) is not installed: the panels' Kamailio metrics cannot be checked")
    from controller.localstack.kamailio import Kamailio, free_port
    from controller.localstack.sipp import SippUAS, run_uac
    from controller.edge.trunks import TrunkTable, write_table
    from controller.localstack.tls import LocalCa
    # Kamailio shows its own metrics once they have a value: one decided call, one fallback,
    # calls its edge policy (not written yet) leaves to a controller; with trunks, rtpengine (none
    # answers here), TLS and WSS configured, so every include file's metrics exist too.
    write_table(str(tmp_path / "trunks"), TrunkTable({"v": "open", "realm": "callfabric", "nets": "0"}, []))
    ca = LocalCa.create(tmp_path / "pki")
    features = {"trunks_dir": tmp_path / "trunks", "tls": (*ca.issue("edge"), ca.cert), "extra_defines": {
        "RTPENGINE_SOCK": f'"udp:127.0.0.1:{free_port(socket.SOCK_DGRAM)}"', "WSS_PORT": str(free_port()),
        "PHONE_SECRET": '"dashboard-test"', "MEDIA_DEFAULT": '"never"'}}
    with SippUAS(tmp_path, "uas_answer.xml") as uas, \
            Kamailio(tmp_path, {1: [uas.addr]}, edge_policy=tmp_path / "not-yet.policy", **features) as kamailio:
        decider = FakeDecider(kamailio.evapi_port).start()
        wait_clients(kamailio, 1)
        assert run_uac(tmp_path, kamailio.sip_port, calls=1).successful == 1
        decider.stop()
        wait_clients(kamailio, 0)
        assert run_uac(tmp_path, kamailio.sip_port, calls=1).successful == 1
        exposed = set(re.findall(r"^([a-z_:][a-z0-9_:]*)", kamailio.metrics(), re.M))
    missing = {n for n in kamailio_used if n not in exposed}
    assert not missing, f"panels use metrics Kamailio does not export: {missing}"


def test_the_architecture_picture_is_rendered_from_its_source():
    source = (ROOT / "docs" / "architecture.dot").read_text()
    picture = (ROOT / "docs" / "architecture.svg").read_text()
    labels = re.findall(r"^\s*(\w+) \[label=\"([^\\\"]+)", source, re.M)
    assert labels
    for node, label in labels:
        assert label in html.unescape(picture), f"{node} is not in the SVG: re-render it"


@pytest.mark.skipif(shutil.which("dot") is None, reason="dot (Debian package graphviz) is not installed: the "
                    "architecture picture is not re-rendered to compare")
def test_the_architecture_picture_is_what_dot_renders():
    picture = (ROOT / "docs" / "architecture.svg").read_text()
    rendered = subprocess.run(["dot", "-Tsvg", str(ROOT / "docs" / "architecture.dot")], capture_output=True,
                              text=True, timeout=60, check=True).stdout
    strip = lambda svg: re.sub(r"<!--.*?-->", "", svg, flags=re.S)  # noqa: E731 - generator comments differ
    assert strip(rendered) == strip(picture), "docs/architecture.svg is stale: dot -Tsvg docs/architecture.dot"
