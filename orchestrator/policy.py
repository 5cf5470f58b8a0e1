"""A service's health and outlier settings as the store keeps them: the
canonical JSON of the settings that differ from their defaults (the same
value, the same text), read back through the config file's own rules."""
from __future__ import annotations

import functools
import json
from typing import Any

from lbcore.config import (
    ConfigError,
    HealthCheck,
    Outlier,
    changed_settings,
    read_health,
    read_outlier,
)
from lbcore.wire import canonical_json
from orchestrator.errors import BadRequestError


def settings_text(value: HealthCheck | Outlier) -> str:
    return canonical_json(changed_settings(value)).decode()


@functools.lru_cache(maxsize=1024)
def health_of(text: str) -> HealthCheck:
    return read_health("store", "health", json.loads(text))


@functools.lru_cache(maxsize=1024)
def outlier_of(text: str) -> Outlier:
    return read_outlier("store", "outlier", json.loads(text))


def merged_health(current: HealthCheck, changes: Any) -> HealthCheck:
    """``current`` with ``changes`` (a table of settings) over it, checked as
    a file's [service.health] is: BadRequestError saying which key and why."""
    return _merged(read_health, "health", current, changes)


def merged_outlier(current: Outlier, changes: Any) -> Outlier:
    return _merged(read_outlier, "outlier", current, changes)


def _merged(read: Any, key: str, current: HealthCheck | Outlier, changes: Any) -> Any:
    if not isinstance(changes, dict):
        raise BadRequestError(f"{key}: must be an object of settings")
    try:
        return read("policy.set", key, {**vars(current), **changes})
    except ConfigError as exc:
        raise BadRequestError(f"{exc.key}: {exc.reason}") from None
