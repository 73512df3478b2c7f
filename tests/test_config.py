"""Settings: defaults, a YAML file, CALLFABRIC_* environment variables (which win)."""
import pytest

from controller.config import ConfigError, Settings, describe, load_settings, split_host_port


def test_defaults():
    s = load_settings(None, environ={})
    assert s.redis_url == "redis://127.0.0.1:6379/0" and s.edge_evapi == ["127.0.0.1:8448"]
    assert s.instance_id  # hostname:pid


def test_file_then_environment(tmp_path):
    (tmp_path / "policies").mkdir()
    config = tmp_path / "callfabric.yaml"
    config.write_text("redis_url: redis://10.0.0.5:6380/1\nedge_evapi: [127.0.0.1:9000, 127.0.0.1:9001]\n"
                      "policy_dir: policies\nedge_max_in_flight: 50\npolicy_poll_s: 2\n")
    s = load_settings(config, environ={"CALLFABRIC_EDGE_MAX_IN_FLIGHT": "70", "CALLFABRIC_LOG_LEVEL": "DEBUG"})
    assert s.redis_url == "redis://10.0.0.5:6380/1"
    assert s.edge_evapi == ["127.0.0.1:9000", "127.0.0.1:9001"]
    assert s.edge_max_in_flight == 70 and s.log_level == "DEBUG" and s.policy_poll_s == 2.0
    assert s.policy_dir == str((tmp_path / "policies").resolve())  # relative to the config file
    s = load_settings(config, environ={"CALLFABRIC_EDGE_EVAPI": "10.1.1.1:8448, 10.1.1.2:8448",
                                       "CALLFABRIC_POLICY_DIR": "/srv/policies"})
    assert s.edge_evapi == ["10.1.1.1:8448", "10.1.1.2:8448"] and s.policy_dir == "/srv/policies"


@pytest.mark.parametrize("text, message", [
    ("redis_ulr: x\n", "unknown setting 'redis_ulr'"),
    ("edge_max_in_flight: lots\n", "edge_max_in_flight"),
    ("edge_max_in_flight: true\n", "expected an integer"),
    ("edge_evapi: 5\n", "expected a list of strings"),
    ("- a\n", "must be a mapping"),
    ("a: [\n", "cannot read config file"),
])
def test_bad_config_files_are_clear_errors(tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, environ={})


def test_bad_environment_value():
    with pytest.raises(ConfigError, match="CALLFABRIC|edge_reconnect_max_s"):
        load_settings(None, environ={"CALLFABRIC_EDGE_RECONNECT_MAX_S": "soon"})


def test_describe_lists_every_setting():
    names = {name for name, env, default, doc in describe()}
    assert names == set(Settings.__dataclass_fields__)
    assert all(env == f"CALLFABRIC_{name.upper()}" and doc for name, env, default, doc in describe())


@pytest.mark.parametrize("text, expected", [("127.0.0.1:8448", ("127.0.0.1", 8448)), ("[::1]:9090", ("::1", 9090)),
                                            (":9090", ("127.0.0.1", 9090))])
def test_split_host_port(text, expected):
    assert split_host_port(text, "x") == expected


@pytest.mark.parametrize("text", ["localhost", "h:0", "h:70000", "h:x"])
def test_split_host_port_rejects(text):
    with pytest.raises(ConfigError):
        split_host_port(text, "x")


def test_metric_names_follow_prometheus_conventions():
    from controller.metrics import Metrics
    described = Metrics().describe()
    assert len(described) >= 25
    for name, kind, labels, doc in described:
        assert name.startswith("callfabric_") and doc, name
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        assert not {"call_id", "caller", "callee", "number"} & set(labels), f"{name}: unbounded label"


def test_counters_with_known_label_values_start_at_zero_and_the_code_uses_only_those():
    """Series of known label values exist from the start; a literal label value in the code
    that is not declared would appear only once it happens (and a reader of the declared
    name would see nothing) — so every literal must be declared."""
    import re
    from pathlib import Path
    from controller.metrics import KNOWN_LABEL_VALUES, Metrics
    metrics = Metrics()
    for attr, values in KNOWN_LABEL_VALUES.items():
        name = getattr(metrics, attr)._name + "_total"
        for value in values:
            labels = dict(zip(getattr(metrics, attr)._labelnames, (value,) if isinstance(value, str) else value))
            assert metrics.registry.get_sample_value(name, labels) == 0, (name, value)
    root = Path(__file__).resolve().parents[1] / "controller"
    pattern = re.compile(r"\.(%s)\.labels\(\s*f?\"([^\"]*)\"" % "|".join(KNOWN_LABEL_VALUES))
    seen = 0
    for path in root.rglob("*.py"):
        for attr, value in pattern.findall(path.read_text()):
            seen += 1
            if "{" in value:  # f"bad-{kind}-event": every kind it is formatted with is declared below
                prefix, suffix = value.split("{")[0], value.split("}")[-1]
                assert any(v.startswith(prefix) and v.endswith(suffix) for v in KNOWN_LABEL_VALUES[attr]), value
            else:
                assert value in KNOWN_LABEL_VALUES[attr], f"{path.name}: {attr} label {value!r} is not declared"
    assert seen >= 20


def test_json_logs_carry_the_call_id(capsys):
    import json
    import logging
    from controller.logs import setup_logging
    setup_logging("INFO", "json", {"callfabric.quiet": "ERROR"})
    logging.getLogger("callfabric.edge").warning("call abc@host: could not record %s", "x")
    logging.getLogger("callfabric.quiet").warning("not shown")
    logging.getLogger("callfabric").error("no valid policy in %s: every call gets the edge fallback", "policies")
    logging.getLogger("callfabric.state").error("call %s (decided by the edge): could not record it", "k:1@h")
    logging.getLogger("callfabric.api").warning("webhooks: %s of call %s not delivered", "call.ended", "w-9")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 4 and lines[0]["call_id"] == "abc@host" and lines[0]["level"] == "warning"
    assert "call_id" not in lines[1]  # prose, not a call ("call gets")
    assert lines[2]["call_id"] == "k:1@h" and lines[3]["call_id"] == "w-9"
    logging.getLogger().handlers.clear()


def test_outbound_trunk_names_a_trunk_and_an_old_host_port_says_how_to_migrate():
    from controller.config import check_settings

    check_settings(Settings(outbound_trunk="carrier-a"))
    with pytest.raises(ConfigError) as refused:
        check_settings(Settings(outbound_trunk="10.0.0.9:5060"))
    message = str(refused.value)
    assert "\n" not in message and message.startswith("setting outbound_trunk: '10.0.0.9:5060' is not a trunk name")
    assert 'trunks: {carrier: {outbound: {address: "10.0.0.9:5060"}}}, and set outbound_trunk: carrier' in message


@pytest.mark.parametrize("fields, refused", [
    ({"edge_streams": ["edge 1"]}, "setting edge_streams: 'edge 1' is not an edge name"),
    ({"edge_streams": ["{x}"]}, "setting edge_streams: '{x}' is not an edge name"),
    ({"edge_events_batch": 0}, "setting edge_events_batch: 0: expected 1 or more events"),
    ({"edge_events_linger_ms": -1}, "setting edge_events_linger_ms: -1: expected 0 to 1000"),
])
def test_edge_event_settings_are_checked_before_start(fields, refused):
    from controller.config import check_settings

    check_settings(Settings(edge_streams=["edge-1", "edge.2"], edge_events_batch=1, edge_events_linger_ms=0))
    with pytest.raises(ConfigError) as caught:
        check_settings(Settings(**fields))
    assert str(caught.value).startswith(refused) and "\n" not in str(caught.value)
