"""A service's health, outlier and lifecycle settings as the store keeps
them: the canonical JSON of the settings that differ from their defaults
(the same value, the same text), read back through the config file's own
rules."""
from __future__ import annotations

import functools
import json
from typing import Any

from lbcore.config import (
    ConfigError,
    HealthCheck,
    Lifecycle,
    Outlier,
    changed_settings,
    read_health,
    read_lifecycle,
    read_outlier,
)
from lbcore.wire import canonical_json
from orchestrator.errors import BadRequestError


def settings_text(value: HealthCheck | Outlier | Lifecycle) -> str:
    return canonical_json(changed_settings(value)).decode()


@functools.lru_cache(maxsize=1024)
def health_of(text: str) -> HealthCheck:
    return read_health("store", "health", json.loads(text))


@functools.lru_cache(maxsize=1024)
def outlier_of(text: str) -> Outlier:
    return read_outlier("store", "outlier", json.loads(text))


@functools.lru_cache(maxsize=1024)
def lifecycle_of(text: str, algorithm: str) -> Lifecycle:
    return read_lifecycle("store", "lifecycle", json.loads(text), algorithm)


def merged_lifecycle(current: Lifecycle, changes: Any, algorithm: str) -> Lifecycle:
    """``current`` with ``changes`` over it, checked as a file's
    [[service]] keys are, for a service of ``algorithm``."""
    if not isinstance(changes, dict):
        raise BadRequestError("lifecycle: must be an object of settings")
    unknown = sorted(set(changes) - set(vars(current)))
    if unknown:
        raise BadRequestError(f"lifecycle.{unknown[0]}: unknown key (known: {', '.join(vars(current))})")
    try:
        return read_lifecycle("policy.set", "lifecycle", {**vars(current), **changes}, algorithm)
    except ConfigError as exc:
        raise BadRequestError(f"{exc.key}: {exc.reason}") from None


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
