"""The node's Prometheus metrics as the tests expect them: every family
with its type and labels, a scrape parsed with prometheus_client's own
parser, and the values ``lbproxy stats --json`` says they must have."""
from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

BACKEND = ("backend", "service")
# family (as the parser names it: a counter without "_total") -> (type, label names)
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fulcrum_backend_connections_active": ("gauge", BACKEND),
    "fulcrum_backend_connections": ("counter", BACKEND),
    "fulcrum_backend_connect_failures": ("counter", BACKEND),
    "fulcrum_backend_bytes": ("counter", ("backend", "direction", "service")),
    "fulcrum_backend_eligible": ("gauge", BACKEND),
    "fulcrum_backend_ejected": ("gauge", BACKEND),
    "fulcrum_service_accepted": ("counter", ("service",)),
    "fulcrum_service_queue_waiting": ("gauge", ("service",)),
    "fulcrum_service_queued": ("counter", ("service",)),
    "fulcrum_service_queue_timeouts": ("counter", ("service",)),
    "fulcrum_service_rejected": ("counter", ("service",)),
    "fulcrum_worker_accepted": ("counter", ("worker",)),
    "fulcrum_accept_pauses": ("counter", ()),
    "fulcrum_snapshot_version": ("gauge", ()),
    "fulcrum_snapshot_age_seconds": ("gauge", ()),
    "fulcrum_stale": ("gauge", ()),
}

Key = tuple[str, frozenset[tuple[str, str]]]


def parse_scrape(text: str) -> dict[Key, float]:
    """Sample name and labels -> value; AssertionError unless every family
    is there, once, with its type and label names, and nothing else is."""
    samples: dict[Key, float] = {}
    seen = set()
    for family in text_string_to_metric_families(text):
        assert family.name in FAMILIES, f"unexpected family {family.name}"
        assert family.name not in seen, f"{family.name} twice"
        seen.add(family.name)
        kind, labels = FAMILIES[family.name]
        assert family.type == kind, (family.name, family.type)
        suffix = "_total" if kind == "counter" else ""
        for sample in family.samples:
            assert sample.name == family.name + suffix, sample
            assert tuple(sorted(sample.labels)) == labels, sample
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    assert seen == set(FAMILIES), f"missing: {set(FAMILIES) - seen}"
    return samples


def _key(name: str, **labels: str) -> Key:
    return name, frozenset(labels.items())


def expected_samples(stats: dict[str, Any], stale: bool = False) -> dict[Key, float]:
    """The samples ``stats`` (``lbproxy stats --json``) says a scrape holds,
    all but the snapshot's age (a time)."""
    out: dict[Key, float] = {}
    for s in stats["services"]:
        service = s["name"]
        for b in s["backends"]:
            labels = {"service": service, "backend": b["id"]}
            out[_key("fulcrum_backend_connections_active", **labels)] = b["active"]
            out[_key("fulcrum_backend_connections_total", **labels)] = b["total"]
            out[_key("fulcrum_backend_connect_failures_total", **labels)] = b["failed"]
            out[_key("fulcrum_backend_bytes_total", direction="to_backend", **labels)] = b["bytes_to_backend"]
            out[_key("fulcrum_backend_bytes_total", direction="to_client", **labels)] = b["bytes_to_client"]
            out[_key("fulcrum_backend_eligible", **labels)] = int(b["eligible"])
            out[_key("fulcrum_backend_ejected", **labels)] = int(b["ejected_ms"] > 0)
        out[_key("fulcrum_service_accepted_total", service=service)] = s["accepted"]
        out[_key("fulcrum_service_queue_waiting", service=service)] = s["waiting"]
        out[_key("fulcrum_service_queued_total", service=service)] = s["queued"]
        out[_key("fulcrum_service_queue_timeouts_total", service=service)] = s["queue_timeouts"]
        out[_key("fulcrum_service_rejected_total", service=service)] = s["rejected"]
    for w in stats["workers"]:
        out[_key("fulcrum_worker_accepted_total", worker=str(w["index"]))] = w["accepted"]
    out[_key("fulcrum_accept_pauses_total")] = sum(w["accept_pauses"] for w in stats["workers"])
    out[_key("fulcrum_snapshot_version")] = stats["version"]
    out[_key("fulcrum_stale")] = int(stale)
    return out


def without_age(samples: dict[Key, float]) -> tuple[dict[Key, float], float]:
    """(the samples but the snapshot's age, the age in seconds)."""
    rest = dict(samples)
    return rest, rest.pop(_key("fulcrum_snapshot_age_seconds"))
