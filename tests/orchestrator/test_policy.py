"""A service's health and outlier settings as the store keeps them
(orchestrator/policy.py): the same value is the same text, and a change is
checked by the config file's own rules."""
from __future__ import annotations

import pytest

from lbcore.config import DEFAULT_HEALTH, DEFAULT_OUTLIER, HealthCheck
from orchestrator.errors import BadRequestError
from orchestrator.policy import health_of, merged_health, merged_outlier, outlier_of, settings_text


def test_only_what_differs_from_the_defaults_is_kept_and_reads_back():
    assert settings_text(DEFAULT_HEALTH) == "{}"
    health = HealthCheck(kind="http", path="/ready")
    assert settings_text(health) == '{"kind":"http","path":"/ready"}'
    assert health_of(settings_text(health)) == health
    assert outlier_of(settings_text(DEFAULT_OUTLIER)) == DEFAULT_OUTLIER


def test_a_change_goes_over_the_current_settings():
    current = HealthCheck(kind="tcp", interval_ms=2000, timeout_ms=1000)
    merged = merged_health(current, {"rise": 4})
    assert (merged.kind, merged.interval_ms, merged.rise) == ("tcp", 2000, 4)


@pytest.mark.parametrize("changes, message", [
    ({"rise": 0}, "health.rise: must be 1..100 (got 0)"),
    ({"timeout_ms": 2000}, "health.timeout_ms: must be less than interval_ms (2000 >= 1000)"),
    ({"kind": "grpc"}, "health.kind: 'grpc' is not one of: none, tcp, http"),
    ({"expect": "abc"}, "health.expect: 'abc' is not a list of HTTP statuses"),
    ({"colour": "red"}, "health.colour: unknown key"),
    ("tcp", "health: must be an object of settings"),
])
def test_a_bad_change_is_refused_saying_which_key_and_why(changes, message):
    with pytest.raises(BadRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merged_health(DEFAULT_HEALTH, changes)


def test_an_outlier_change_is_checked_across_keys():
    with pytest.raises(BadRequestError, match="outlier.max_ejection_ms: must be at least base_ejection_ms"):
        merged_outlier(DEFAULT_OUTLIER, {"base_ejection_ms": 600_000})
