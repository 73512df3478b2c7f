"""Fixtures for the Kamailio edge tests: a fake decider speaking the evapi decision
protocol (netstring JSON, see kamailio/PROTOCOL.md), Kamailio and SIPp factories that
always clean up, and the Kamailio log tail on failure."""
from __future__ import annotations

from typing import Any

import pytest

from controller.localstack.kamailio import Kamailio
from controller.state.calls import CallStore
from tests.support.kamailio import FakeDecider, Policy, wait_clients
from controller.localstack.sipp import SippUAS


@pytest.fixture
async def store(redis_url):
    """The call store the controller under test writes to (read it to check records)."""
    store = CallStore(redis_url)
    yield store
    await store.aclose()


@pytest.fixture
def procs(tmp_path, request):
    """Factory registry: everything created through it is stopped at teardown."""
    created: list[Any] = []

    class Factory:
        def uas(self, scenario: str = "uas_answer.xml", name: str | None = None) -> SippUAS:
            u = SippUAS(tmp_path, scenario, name)
            created.append(u)
            return u.start()

        def kamailio(self, ds_sets: dict[int, list[str]], **kw) -> Kamailio:
            k = Kamailio(tmp_path, ds_sets, name=f"kamailio-{len(created)}", **kw)
            created.append(k)
            return k.start()

        def decider(self, k: Kamailio, policy: Policy | None = None, wait: bool = True) -> FakeDecider:
            d = FakeDecider(k.evapi_port, policy)
            created.append(d)
            d.start()
            if wait:
                wait_clients(k, sum(1 for c in created if isinstance(c, FakeDecider)
                                    and not c.closed.is_set()))
            return d

        def add(self, obj: Any) -> Any:
            created.append(obj)
            return obj

    yield Factory()

    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for obj in reversed(created):
        if failed and isinstance(obj, Kamailio):
            print(f"\n----- {obj.workdir.name} log tail -----\n{obj.log_tail(120)}")
        try:
            obj.stop()
        except Exception as exc:  # noqa: BLE001 - teardown must go on
            print(f"teardown of {obj!r} failed: {exc}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
