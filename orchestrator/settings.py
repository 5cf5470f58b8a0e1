"""The [orchestrator] table of a config file, declared once like the node's
settings (lbcore.config), with the same FILE: key: reason errors; and the
settings API lbctl reads config files through (it imports nothing of the
data plane): ``load_services``, ``control_endpoint``, ``ALGORITHM_NAMES``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lbcore.balance import ALGORITHMS
from lbcore.config import (
    HEALTH_SETTINGS,
    LIFECYCLE_SETTINGS,
    MAX_MS,
    OUTLIER_SETTINGS,
    ConfigError,
    Service,
    Setting,
    between,
    endpoint_problem,
    parse_address,
    parse_document,
    read_document,
    read_table,
    services_of_document,
)

__all__ = ["ALGORITHM_NAMES", "DEFAULT_CONTROL", "HEALTH_SETTINGS", "LIFECYCLE_SETTINGS", "OUTLIER_SETTINGS",
           "ConfigError",
           "Endpoints", "OrchestratorConfig", "Service", "control_endpoint", "load_orchestrator_config",
           "load_services"]

ALGORITHM_NAMES = tuple(ALGORITHMS)  # as a service's ``algorithm`` names them


def _endpoint(value: str) -> str | None:
    return endpoint_problem(value, ("tcp", "ipc", "inproc"))


def _store(value: str) -> str | None:
    if not value.startswith("sqlite:///") or len(value) <= len("sqlite:///"):
        return f"{value!r}: only sqlite:///PATH is supported"
    return None


def _metrics(value: str) -> str | None:
    if value == "":
        return None
    try:
        parse_address(value)
    except ValueError as exc:
        return str(exc)
    return None


DEFAULT_CONTROL = "tcp://127.0.0.1:7700"

ORCHESTRATOR_SETTINGS = [
    Setting("store", str, "sqlite:///fulcrum-state.db", _store, "where the authoritative state lives"),
    Setting("control", str, DEFAULT_CONTROL, _endpoint, "ROUTER: ctl verbs, snapshot fetch"),
    Setting("publish", str, "tcp://127.0.0.1:7701", _endpoint, "PUB: snapshots and heartbeats"),
    Setting("heartbeat_ms", int, 500, between(1, MAX_MS),
            "interval of heartbeats carrying the current version"),
    Setting("metrics", str, "", _metrics,
            "IPv4 HOST:PORT serving Prometheus metrics at /metrics (\"\": off)"),
]


@dataclass(frozen=True)
class Endpoints:
    control: str
    publish: str
    heartbeat_ms: int
    metrics: str = ""  # HOST:PORT, or "" (off)


@dataclass(frozen=True)
class OrchestratorConfig:
    services: tuple[Service, ...]  # the file's services seed an empty store
    store_path: Path
    endpoints: Endpoints


def load_orchestrator_config(path: str, embedded: bool = False) -> OrchestratorConfig:
    """A control plane's file: [orchestrator] and the services that seed the
    store; a [node] table is needed only by a node (then it is checked too).
    ``embedded``: the file of a node that starts this control plane, which
    must name both endpoints (the node connects to them)."""
    return _orchestrator_config(read_document(path), path, embedded)


def _orchestrator_config(document: dict[str, Any], path: str, embedded: bool = False) -> OrchestratorConfig:
    services = services_of_document(document, path)
    table = document.get("orchestrator", {})
    if embedded and not (isinstance(table, dict) and "control" in table and "publish" in table):
        raise ConfigError(path, "orchestrator",
                          'control = "embedded" needs an [orchestrator] table with control and publish')
    values = read_table(path, "orchestrator", table, ORCHESTRATOR_SETTINGS)
    store_path = Path(values["store"][len("sqlite:///"):])
    if not store_path.is_absolute():
        store_path = Path(path).resolve().parent / store_path
    if values["control"] == values["publish"]:
        raise ConfigError(path, "orchestrator.publish", "must differ from orchestrator.control")
    return OrchestratorConfig(services, store_path,
                              Endpoints(values["control"], values["publish"], values["heartbeat_ms"],
                                        values["metrics"]))


def load_services(path: str) -> tuple[Service, ...]:
    """A file's services, checked by the node's own rules ([node] optional)."""
    return services_of_document(read_document(path), path)


def control_endpoint(path: str) -> str:
    """The control plane a config file names: its [orchestrator] control, or
    a node file's tcp:// node.control. ConfigError if it names none."""
    document = read_document(path)
    if "orchestrator" in document:
        return _orchestrator_config(document, path).endpoints.control
    control = parse_document(document, path).node.control
    if not control.startswith("tcp://"):
        raise ConfigError(path, "node.control", f"names no control plane (no [orchestrator] table, "
                                                f"node.control = {control!r})")
    return control
