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
from lbcore.config import Config, ConfigError, Setting, load_config, read_table, tomllib

__all__ = ["ALGORITHM_NAMES", "Config", "ConfigError", "Endpoints", "OrchestratorConfig", "control_endpoint",
           "load_orchestrator_config", "load_services"]

ALGORITHM_NAMES = tuple(ALGORITHMS)  # as a service's ``algorithm`` names them


def _endpoint(value: str) -> str | None:
    if not value.startswith(("tcp://", "ipc://", "inproc://")):
        return f"{value!r} is not a ZeroMQ endpoint (tcp://HOST:PORT)"
    return None


def _store(value: str) -> str | None:
    if not value.startswith("sqlite:///") or len(value) <= len("sqlite:///"):
        return f"{value!r}: only sqlite:///PATH is supported"
    return None


def _positive(value: int) -> str | None:
    return None if value > 0 else f"must be > 0 (got {value})"


ORCHESTRATOR_SETTINGS = [
    Setting("store", str, "sqlite:///fulcrum-state.db", _store, "where the authoritative state lives"),
    Setting("control", str, "tcp://127.0.0.1:7700", _endpoint, "ROUTER: ctl verbs, snapshot fetch"),
    Setting("publish", str, "tcp://127.0.0.1:7701", _endpoint, "PUB: snapshots and heartbeats"),
    Setting("heartbeat_ms", int, 500, _positive, "interval of heartbeats carrying the current version"),
]


@dataclass(frozen=True)
class Endpoints:
    control: str
    publish: str
    heartbeat_ms: int


@dataclass(frozen=True)
class OrchestratorConfig:
    config: Config               # services in the file seed an empty store
    store_path: Path
    endpoints: Endpoints


def load_orchestrator_config(path: str) -> OrchestratorConfig:
    config = load_config(path)
    document: dict[str, Any] = tomllib.loads(Path(path).read_text())
    values = read_table(path, "orchestrator", document.get("orchestrator", {}), ORCHESTRATOR_SETTINGS)
    store_path = Path(values["store"][len("sqlite:///"):])
    if not store_path.is_absolute():
        store_path = Path(path).resolve().parent / store_path
    if values["control"] == values["publish"]:
        raise ConfigError(path, "orchestrator.publish", "must differ from orchestrator.control")
    return OrchestratorConfig(config, store_path,
                              Endpoints(values["control"], values["publish"], values["heartbeat_ms"]))


def load_services(path: str) -> Config:
    """A file's services (and node table), checked by the node's own rules."""
    return load_config(path)


def control_endpoint(path: str) -> str:
    """The control plane a config file names: its [orchestrator] control, or
    a node file's tcp:// node.control. ConfigError if it names none."""
    try:
        document = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(path, "(file)", str(exc)) from None
    if "orchestrator" in document:
        return load_orchestrator_config(path).endpoints.control
    control = load_config(path).node.control
    if not control.startswith("tcp://"):
        raise ConfigError(path, "node.control", f"names no control plane (no [orchestrator] table, "
                                                f"node.control = {control!r})")
    return control
