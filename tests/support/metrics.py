"""Reading the controller's Prometheus registry in tests. A sample that does not exist is an
error, never 0: a test asserting `== 0` must fail when it asks for a wrong name or label."""
from __future__ import annotations

from prometheus_client import CollectorRegistry


def _series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    return [dict(s.labels) for family in registry.collect() for s in family.samples if s.name == name]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The value of one sample; AssertionError (saying which series exist) when there is none."""
    value = registry.get_sample_value(name, labels)
    if value is None:
        raise AssertionError(f"no metric {name}{labels or ''}; series of that name: {_series(registry, name) or 'none'}")
    return value


def sample_or_zero(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """For a series that may not exist *yet* (a label value only known once it happens, like a
    rule name): 0 when absent, but the metric must exist with exactly these label names. Read
    the same series again with sample() once it must exist."""
    for collector, names in registry._collector_to_names.items():  # no public way to a metric's label names
        if name in names:
            label_names = tuple(getattr(collector, "_labelnames", ()))
            assert set(label_names) == set(labels), f"{name} has labels {label_names}, asked for {tuple(labels)}"
            return registry.get_sample_value(name, labels) or 0.0
    raise AssertionError(f"no metric named {name}")
