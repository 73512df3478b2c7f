"""callfabric's ARI description (tests/support/ari_description.json): the fake ARI serves
exactly it, the controller calls nothing outside it, and it agrees with Asterisk's full
description wherever one is found (an install's rest-api/, a running node,
CALLFABRIC_ARI_SPEC_DIR, ../shared/asterisk-ari-spec)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support import ari_description
from tests.support.ari_spec import SPEC, SpecError
from tests.support.fake_ari import FakeAri

ROOT = Path(__file__).resolve().parents[2]


def test_the_fake_serves_exactly_the_described_operations():
    handlers = {f"{resource}.{nick}" for resource, nick in FakeAri()._handler_table()}
    described = {f"{op.resource}.{op.nickname}" for op in SPEC.operations if not op.is_websocket}
    assert handlers - described == set(), "handlers for operations the description lacks: refresh it with --add"
    assert described - handlers == set(), "described operations the fake does not serve"


def test_the_controller_calls_only_described_operations():
    calls = []
    for path in (ROOT / "controller" / "media").rglob("*.py"):
        calls += re.findall(r'request\(\s*"\w+",\s*"(GET|POST|PUT|DELETE)",\s*f?"(/[^"?]*)"', path.read_text())
    assert len(calls) >= 14, calls
    for method, template in calls:
        path = re.sub(r"\{[^}]+\}", "x", template)
        try:
            SPEC.resolve(method, path)
        except SpecError as exc:
            pytest.fail(f"the controller calls {method} {template}, which the description lacks: {exc.reason}")


def test_an_undescribed_operation_is_refused_like_an_unknown_resource():
    assert "bridges.record" not in {f"{op.resource}.{op.nickname}" for op in SPEC.operations}
    with pytest.raises(SpecError) as err:
        SPEC.resolve("POST", "/ari/bridges/b1/record")
    assert err.value.status == 404


def test_nothing_outside_the_clone_is_needed(monkeypatch, tmp_path):
    """The description is loaded from the repository; looking for a full one says where it looked."""
    source = (ROOT / "tests" / "support" / "ari_spec.py").read_text()
    assert "shared" not in source and "ari_description.json" in source
    for name in ("CALLFABRIC_ARI_SPEC_DIR", "CALLFABRIC_ARI_SPEC_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ari_description, "_install_dirs", lambda: iter(()))
    full, why = ari_description.find_full_description(start=tmp_path / "clone" / "tests" / "x.py")
    assert full is None and "shared/asterisk-ari-spec" in why and "rest-api" in why


def test_the_description_agrees_with_the_full_one():
    full, where = ari_description.find_full_description()
    if full is None:
        pytest.skip(where)
    ours = json.loads(ari_description.DESCRIPTION_FILE.read_text())
    operations, events = ari_description.described_names(ours)
    theirs = ari_description.extract(full, operations, events)
    problems = ari_description.differences(ours, theirs)
    assert not problems, f"tests/support/ari_description.json disagrees with {where}:\n" + "\n".join(problems[:40])
    assert sorted(theirs["models"]) == sorted(ours["models"]), "models reached by the described operations and events"
    assert full.resources.get("apiVersion") == ours["api_version"] or not problems


def test_a_changed_full_description_is_reported_precisely(tmp_path):
    """What the agreement check prints when Asterisk changes a parameter or a model field."""
    ours = json.loads(ari_description.DESCRIPTION_FILE.read_text())
    theirs = json.loads(json.dumps(ours))
    snoop = next(op for op in theirs["operations"] if op["nickname"] == "snoopChannelWithId")
    next(p for p in snoop["params"] if p["name"] == "spy")["values"].remove("both")
    theirs["models"]["Channel"]["fields"]["state"]["required"] = False
    del theirs["models"]["RTPstat"]
    problems = ari_description.differences(ours, theirs)
    assert any("/snoop/{snoopId}: params" in p for p in problems), problems
    assert any(p.startswith("model Channel.state:") for p in problems), problems
    assert "model RTPstat: not in the full description" in problems
