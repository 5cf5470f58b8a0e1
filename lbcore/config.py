"""The node's TOML configuration, each setting declared once.

A setting is a name, a kind, a default (``REQUIRED`` when there is none), a
check and a line of help; parsing, validation, defaults and the reference in
the README come from these tables. Every error names the file, the key (as a
path such as ``service[0].backend[1].weight``) and the reason.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

from lbcore._layout import lib
from lbcore.balance import ALGORITHMS

# The layout's limits (fulcrum_layout.h), from the compiled declaration
# rather than lbcore.layout: reading a config file (lbctl does) needs no numpy.
MAX_SERVICES, MAX_BACKENDS = lib.FLC_MAX_SERVICES, lib.FLC_MAX_BACKENDS
MAX_WORKERS, NAME_LEN = lib.FLC_MAX_WORKERS, lib.FLC_NAME_LEN

REQUIRED = object()
# [orchestrator] is read by the control plane (orchestrator.settings)
TOP_LEVEL_TABLES = ("node", "service", "orchestrator")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
MAX_WEIGHT = 256
RELAY_MODES = {"auto": 0, "splice": 1, "copy": 2}  # FLC_RELAY_* in fulcrum_layout.h
# The longest time, in ms, that every consumer of a setting holds: a C int
# (the worker's drain time, poll timeouts) and the image header's uint32
# timeouts. About 24.8 days.
MAX_MS = (1 << 31) - 1


class ConfigError(Exception):
    """A configuration refused: ``FILE: key: reason``."""

    def __init__(self, file: str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file, self.key, self.reason = file, key, reason


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type
    default: Any
    check: Callable[[Any], str | None]
    help: str


def between(low: int, high: int) -> Callable[[Any], str | None]:
    """The check of a number's range, as every setting states it."""
    return lambda v: None if low <= v <= high else f"must be {low}..{high} (got {v})"


@functools.lru_cache(maxsize=1 << 16)
def check_name(v: str) -> str | None:
    if len(v.encode()) >= NAME_LEN:
        return f"must be shorter than {NAME_LEN} bytes"
    if not NAME_PATTERN.fullmatch(v):
        return f"{v!r} is not a name (letters, digits, '_', '.', ':', '-')"
    return None


@functools.lru_cache(maxsize=1 << 16)
def parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:8080"`` -> ``("127.0.0.1", 8080)``, or ValueError.
    Cached: every snapshot from the control plane repeats the addresses of
    the one before, and re-validating them dominated applying it."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 address") from None
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not 1..65535")
    return str(ip), int(port)


def refusal(parse: Callable[[str], object]) -> Callable[[str], str | None]:
    """The check of a setting that a parser reads: why it refuses, or None."""
    def check(v: str) -> str | None:
        try:
            parse(v)
        except ValueError as exc:
            return str(exc)
        return None
    return check


_address = refusal(parse_address)


def _one_of(choices: Collection[str]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"{v!r} is not one of: {', '.join(choices)}"


def _algorithm(v: str) -> str | None:
    if v in ALGORITHMS:
        return None
    return f"unknown algorithm {v!r} (one of: {', '.join(ALGORITHMS)})"


_TCP_ENDPOINT = re.compile(r"tcp://(\*|[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


def endpoint_problem(v: str, transports: tuple[str, ...] = ("tcp",)) -> str | None:
    """Why ``v`` is not one ZeroMQ endpoint of these transports, or None:
    tcp://HOST:PORT (HOST a name, an IPv4 address, [IPv6] or *), ipc://PATH,
    inproc://NAME."""
    transport = v.partition("://")[0] if "://" in v else ""
    if transport not in transports:
        return f"{v!r} is not a ZeroMQ endpoint ({', '.join(t + '://' for t in transports)}...)"
    if transport == "tcp":
        match = _TCP_ENDPOINT.fullmatch(v)
        if match is None or not 1 <= int(match[2]) <= 65535:
            return f"{v!r} is not one endpoint tcp://HOST:PORT"
    elif len(v) == len(transport) + 3 or "," in v:
        return f"{v!r} is not one endpoint {transport}://NAME"
    return None


def _control(v: str) -> str | None:
    if v in ("static", "embedded"):
        return None
    if not v.startswith("tcp://"):
        return f"{v!r}: one of \"static\" (services from this file), \"embedded\", tcp://HOST:PORT"
    return endpoint_problem(v)


def _subscribe(v: str) -> str | None:
    return None if v == "" else endpoint_problem(v)


def _optional_address(v: str) -> str | None:
    return None if v == "" else _address(v)


def _optional_ip(v: str) -> str | None:
    if v == "":
        return None
    try:
        ipaddress.IPv4Address(v)
    except ValueError:
        return f"{v!r} is not an IPv4 address"
    return None


NODE_SETTINGS = [
    Setting("id", str, REQUIRED, check_name, "node name; names the shared-memory segment"),
    Setting("workers", int, None, between(1, MAX_WORKERS),
            "worker processes (default: number of cores)"),
    Setting("control", str, "static", _control,
            "static (this file), embedded (a control plane in this process tree), or tcp://HOST:PORT"),
    Setting("subscribe", str, "", _subscribe, "tcp://HOST:PORT of the control plane's snapshot PUB"),
    Setting("max_staleness_ms", int, 5_000, between(1, MAX_MS),
            "past this without word from the control plane the node says so (and keeps serving)"),
    Setting("address", str, "", _optional_ip, "local address for every listener (replaces each listen host)"),
    Setting("drain_timeout_ms", int, 10_000, between(0, MAX_MS),
            "on SIGTERM, how long open connections may finish"),
    Setting("connect_timeout_ms", int, 2_000, between(1, MAX_MS),
            "a backend connect slower than this fails over to another"),
    Setting("idle_timeout_ms", int, 300_000, between(1, MAX_MS),
            "a connection with no traffic either way for this long is closed"),
    Setting("fin_timeout_ms", int, 30_000, between(1, MAX_MS),
            "once one direction has ended (half-closed), the pair is closed after this long without traffic"),
    Setting("retries", int, 3, between(0, 7),
            "further backends tried after a failed connect"),
    Setting("max_connections", int, 4096, between(1, 100_000),
            "open client connections per worker"),
    Setting("relay", str, "auto", _one_of(RELAY_MODES),
            "auto: read/write, splice once a read fills 16 KiB; splice; copy"),
    Setting("metrics", str, "", _optional_address,
            "IPv4 HOST:PORT serving Prometheus metrics at /metrics (\"\": off)"),
]

SERVICE_SETTINGS = [
    Setting("name", str, REQUIRED, check_name, "service name, unique on the node"),
    Setting("listen", str, REQUIRED, _address, "IPv4 address:port clients connect to"),
    Setting("algorithm", str, "wrr", _algorithm, " | ".join(ALGORITHMS)),
]

SERVICE_TABLES = ("backend", "health", "outlier")

ON_DRAIN_TIMEOUT = ("close", "keep")
MAX_QUEUE = 1_000_000       # waiting connections per service and node (a node holds 100,000 per worker)
MAX_BACKEND_CONNS = 1_000_000


def _aggression(v: float) -> str | None:
    if not math.isfinite(v) or not 0 < v <= 100:
        return f"must be more than 0 and at most 100 (got {v})"
    return None


# A backend's life on the nodes, per service ([[service]] keys): its drain,
# its slow start when it becomes eligible, the queue at its max_conns
LIFECYCLE_SETTINGS = [
    Setting("drain_timeout_ms", int, 300_000, between(0, MAX_MS),
            "a drain still open after this ends as on_drain_timeout says (lbctl backend drain --timeout-ms)"),
    Setting("on_drain_timeout", str, "close", _one_of(ON_DRAIN_TIMEOUT),
            "at the drain timeout: close (reset the connections left) or keep them; drained either way"),
    Setting("slow_start_ms", int, 0, between(0, MAX_MS),
            "a backend that becomes eligible ramps up over this long (0: at once; not with maglev)"),
    Setting("slow_start_aggression", float, 1.0, _aggression,
            "the ramp's curve: weight x (t / slow_start_ms) ^ (1 / aggression)"),
    Setting("slow_start_min_weight_percent", int, 10, between(0, 100),
            "the ramp starts at this share of the weight"),
    Setting("max_queue", int, 0, between(0, MAX_QUEUE),
            "connections that wait, per node, when every backend is at its max_conns (0: closed at once)"),
    Setting("queue_timeout_ms", int, 1_000, between(1, MAX_MS), "a connection waits this long at most"),
]

# A file's backends: ``up`` is the health verdict's and ``state`` the
# membership's (draining), carried by snapshots; an operator says them with
# lbctl (health report, backend drain) or lets the checks decide
BACKEND_STATES = ("active", "draining", "closing")

BACKEND_SETTINGS = [
    Setting("id", str, REQUIRED, check_name, "backend id, unique in its service"),
    Setting("address", str, REQUIRED, _address, "IPv4 address:port of the backend"),
    Setting("weight", int, 1, between(0, MAX_WEIGHT), "share of new connections; 0 takes none"),
    Setting("max_conns", int, 0, between(0, MAX_BACKEND_CONNS),
            "open connections at most, per node (0: no limit); past it new ones wait (max_queue)"),
    Setting("up", bool, True, lambda v: None,
            "false: held out as down (in a snapshot: the health verdict; nodes keep probing it)"),
    Setting("state", str, "active", _one_of(BACKEND_STATES),
            "in a snapshot: draining (no new connections) or closing (its drain timed out: close them)"),
]

FILE_BACKEND_SETTINGS = [s for s in BACKEND_SETTINGS if s.name not in ("up", "state")]

HEALTH_KINDS = ("none", "tcp", "http")
MAX_PROBERS = 64
_STATUS_RANGE = re.compile(r"([1-5][0-9][0-9])(?:-([1-5][0-9][0-9]))?")
_HTTP_PATH = re.compile(r"/[!-~]*")


def parse_expect(text: str) -> tuple[tuple[int, int], ...]:
    """``"200-399"``, ``"200,204"``: the HTTP statuses that pass, as ranges;
    ValueError saying why not."""
    ranges = []
    for part in text.split(","):
        match = _STATUS_RANGE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a list of HTTP statuses (100..599) or ranges, "
                             'like "200-399"')
        low, high = int(match[1]), int(match[2] or match[1])
        if low > high:
            raise ValueError(f"{part.strip()!r}: the range ends before it starts")
        ranges.append((low, high))
    return tuple(ranges)


_expect = refusal(parse_expect)


def _http_path(v: str) -> str | None:
    if len(v) > 1024 or not _HTTP_PATH.fullmatch(v):
        return f"{v!r} is not an HTTP path (starts with '/', visible ASCII, at most 1024 bytes)"
    return None


# [service.health]: the active checks, run by the nodes (DESIGN, "Health")
HEALTH_SETTINGS = [
    Setting("kind", str, "none", lambda v: None if v in HEALTH_KINDS else
            f"{v!r} is not one of: {', '.join(HEALTH_KINDS)}",
            "tcp (connect), http (GET path, status in expect), none (only lbctl health report)"),
    Setting("interval_ms", int, 1000, between(50, 3_600_000), "each prober checks each backend this often"),
    Setting("timeout_ms", int, 500, between(1, 3_600_000), "a check slower than this fails (< interval_ms)"),
    Setting("rise", int, 2, between(1, 100), "consecutive good verdicts to go up"),
    Setting("fall", int, 3, between(1, 100), "consecutive bad verdicts to go down"),
    Setting("probers", int, 3, between(1, MAX_PROBERS),
            "nodes that probe each backend (all nodes when fewer are alive)"),
    Setting("jitter_percent", int, 10, between(0, 50), "each interval is shortened by up to this share"),
    Setting("path", str, "/", _http_path, "http: the path to GET"),
    Setting("expect", str, "200-399", _expect, "http: the statuses that pass (\"200-399\", \"200,204\")"),
    Setting("port", int, 0, between(0, 65535), "0: the backend's own port"),
]

# [service.outlier]: passive ejection, decided by each node on its own
OUTLIER_SETTINGS = [
    Setting("consecutive_failures", int, 5, between(0, 1_000_000),
            "refused or timed-out connects in a row that eject a backend from this node (0: never)"),
    Setting("base_ejection_ms", int, 30_000, between(1, MAX_MS),
            "the first ejection's length, doubled on each repeat up to max_ejection_ms"),
    Setting("max_ejection_ms", int, 300_000, between(1, MAX_MS), "the longest ejection"),
    Setting("max_ejection_percent", int, 50, between(0, 100),
            "a node never ejects more than this share of a service's backends"),
]


@dataclass(frozen=True)
class Backend:
    id: str
    address: str
    weight: int
    up: bool = True  # False: down by the health verdict (kept in the snapshot so nodes still probe it)
    max_conns: int = 0  # open connections at most per node (0: no limit)
    state: str = "active"  # draining, closing: in the snapshot while nodes still hold its connections


@dataclass(frozen=True)
class HealthCheck:
    kind: str = "none"
    interval_ms: int = 1000
    timeout_ms: int = 500
    rise: int = 2
    fall: int = 3
    probers: int = 3
    jitter_percent: int = 10
    path: str = "/"
    expect: str = "200-399"
    port: int = 0


@dataclass(frozen=True)
class Outlier:
    consecutive_failures: int = 5
    base_ejection_ms: int = 30_000
    max_ejection_ms: int = 300_000
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class Lifecycle:
    drain_timeout_ms: int = 300_000
    on_drain_timeout: str = "close"
    slow_start_ms: int = 0
    slow_start_aggression: float = 1.0
    slow_start_min_weight_percent: int = 10
    max_queue: int = 0
    queue_timeout_ms: int = 1_000


DEFAULT_HEALTH, DEFAULT_OUTLIER, DEFAULT_LIFECYCLE = HealthCheck(), Outlier(), Lifecycle()
_DEFAULTS = {HealthCheck: DEFAULT_HEALTH, Outlier: DEFAULT_OUTLIER, Lifecycle: DEFAULT_LIFECYCLE}
LIFECYCLE_NAMES = tuple(s.name for s in LIFECYCLE_SETTINGS)
LIFECYCLE_KEYS = frozenset(LIFECYCLE_NAMES)


def changed_settings(value: HealthCheck | Outlier | Lifecycle) -> dict[str, Any]:
    """The settings that differ from their defaults: how a snapshot, a
    delta and the store write a table (the same value, the same bytes)."""
    default = _DEFAULTS[type(value)]
    return {k: v for k, v in vars(value).items() if getattr(default, k) != v}


def read_lifecycle(file: str, where: str, table: Any, algorithm: str) -> Lifecycle:
    """A service's lifecycle keys (``table`` may hold others: not read
    here), with the check across keys: slow start moves a hashed flow's
    backend, so maglev refuses it."""
    values = read_table(file, where, {k: v for k, v in table.items() if k in LIFECYCLE_KEYS},
                        LIFECYCLE_SETTINGS)
    lifecycle = Lifecycle(**values)
    if lifecycle.slow_start_ms and algorithm == "maglev":
        raise ConfigError(file, f"{where}.slow_start_ms", "maglev keeps each client on its backend: "
                          "slow start would move them (use 0, or another algorithm)")
    return lifecycle


def read_health(file: str, where: str, table: Any) -> HealthCheck:
    """[service.health], with its checks across keys."""
    health = HealthCheck(**read_table(file, where, table, HEALTH_SETTINGS))
    if health.timeout_ms >= health.interval_ms:
        raise ConfigError(file, f"{where}.timeout_ms",
                          f"must be less than interval_ms ({health.timeout_ms} >= {health.interval_ms})")
    return health


def read_outlier(file: str, where: str, table: Any) -> Outlier:
    """[service.outlier], with its checks across keys."""
    outlier = Outlier(**read_table(file, where, table, OUTLIER_SETTINGS))
    if outlier.max_ejection_ms < outlier.base_ejection_ms:
        raise ConfigError(file, f"{where}.max_ejection_ms", f"must be at least base_ejection_ms "
                          f"({outlier.max_ejection_ms} < {outlier.base_ejection_ms})")
    return outlier


@dataclass(frozen=True)
class Service:
    name: str
    listen: str
    algorithm: str
    backends: tuple[Backend, ...]
    health: HealthCheck = DEFAULT_HEALTH
    outlier: Outlier = DEFAULT_OUTLIER
    lifecycle: Lifecycle = DEFAULT_LIFECYCLE


@dataclass(frozen=True)
class NodeSettings:
    id: str
    workers: int
    control: str
    drain_timeout_ms: int
    connect_timeout_ms: int
    idle_timeout_ms: int
    fin_timeout_ms: int
    retries: int
    max_connections: int
    relay: str
    subscribe: str
    max_staleness_ms: int
    address: str
    metrics: str


@dataclass(frozen=True)
class Config:
    path: str
    node: NodeSettings
    services: tuple[Service, ...] = field(default=())


def read_table(file: str, where: str, table: Any, settings: list[Setting],
                nested: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(file, where, "must be a table")
    known = {s.name for s in settings} | set(nested)
    for key in table:
        if key not in known:
            raise ConfigError(file, f"{where}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for s in settings:
        key = f"{where}.{s.name}"
        if s.name not in table:
            if s.default is REQUIRED:
                raise ConfigError(file, key, "required")
            values[s.name] = s.default
            continue
        value = table[s.name]
        if s.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # 2 is 2.0: one value, one spelling in snapshots
        # bool is an int in Python; a TOML boolean is never a valid number here
        if not isinstance(value, s.kind) or (isinstance(value, bool) and s.kind is not bool):
            kind = "a number" if s.kind is float else s.kind.__name__
            raise ConfigError(file, key, f"must be {kind}, got {type(value).__name__}")
        problem = s.check(value)
        if problem:
            raise ConfigError(file, key, problem)
        values[s.name] = value
    return values


def _read_backends(file: str, where: str, raw: Any, snapshot: bool = False) -> tuple[Backend, ...]:
    if not isinstance(raw, list):
        raise ConfigError(file, where, "must be an array of tables ([[service.backend]])")
    backends: list[Backend] = []
    seen: set[str] = set()
    for j, table in enumerate(raw):
        settings = BACKEND_SETTINGS if snapshot else FILE_BACKEND_SETTINGS
        values = read_table(file, f"{where}[{j}]", table, settings)
        if values["id"] in seen:
            raise ConfigError(file, f"{where}[{j}].id", f"duplicate backend id {values['id']!r}")
        seen.add(values["id"])
        backends.append(Backend(**values))
    return tuple(backends)


def _read_services(file: str, raw: Any, snapshot: bool = False) -> tuple[Service, ...]:
    if not isinstance(raw, list):
        raise ConfigError(file, "service", "must be an array of tables ([[service]])")
    if len(raw) > MAX_SERVICES:
        raise ConfigError(file, "service", f"at most {MAX_SERVICES} services per node")
    services: list[Service] = []
    names: set[str] = set()
    listens: set[tuple[str, int]] = set()
    total_backends = 0
    for i, table in enumerate(raw):
        where = f"service[{i}]"
        values = read_table(file, where, table, SERVICE_SETTINGS, nested=SERVICE_TABLES + LIFECYCLE_NAMES)
        lifecycle = read_lifecycle(file, where, table, values["algorithm"])
        if values["name"] in names:
            raise ConfigError(file, f"{where}.name", f"duplicate service name {values['name']!r}")
        names.add(values["name"])
        listen = parse_address(values["listen"])
        if listen in listens:
            raise ConfigError(file, f"{where}.listen",
                              f"{values['listen']} is already a listener of another service")
        listens.add(listen)
        backends = _read_backends(file, f"{where}.backend", table.get("backend", []), snapshot)
        total_backends += len(backends)
        if total_backends > MAX_BACKENDS:
            raise ConfigError(file, f"{where}.backend", f"at most {MAX_BACKENDS} backends per node")
        health = read_health(file, f"{where}.health", table.get("health", {}))
        outlier = read_outlier(file, f"{where}.outlier", table.get("outlier", {}))
        services.append(Service(backends=backends, health=health, outlier=outlier, lifecycle=lifecycle,
                                **values))
    return tuple(services)


def parse_config(text: str, file: str = "<config>") -> Config:
    """Validate a TOML document; ConfigError names what was wrong and where."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", str(exc)) from None
    return parse_document(document, file)


def parse_document(document: dict[str, Any], file: str, snapshot: bool = False) -> Config:
    """Validate a decoded document (TOML, or with ``snapshot`` one off the
    wire, whose backends may say ``up``: the health verdict)."""
    _check_tables(document, file)
    node_values = read_table(file, "node", document.get("node", {}), NODE_SETTINGS)
    if node_values["control"].startswith("tcp://") and not node_values["subscribe"]:
        raise ConfigError(file, "node.subscribe", "required when node.control is tcp://HOST:PORT")
    if node_values["workers"] is None:
        node_values["workers"] = min(os.cpu_count() or 1, MAX_WORKERS)
    services = _read_services(file, document.get("service", []), snapshot)
    return Config(path=file, node=NodeSettings(**node_values), services=services)


def _check_tables(document: Any, file: str) -> None:
    if not isinstance(document, dict):
        raise ConfigError(file, "(document)", "must be a table")
    for key in document:
        if key not in TOP_LEVEL_TABLES:
            raise ConfigError(file, key, f"unknown table (known: {', '.join(TOP_LEVEL_TABLES)})")


def read_node_id(path: str | os.PathLike[str]) -> str:
    """Only ``node.id`` of a config file: enough to find a running node,
    even while the rest of the file holds an edit not yet applied."""
    file = str(path)
    try:
        document = tomllib.loads(Path(file).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(file, "(file)", str(exc)) from None
    node = document.get("node")
    if not isinstance(node, dict) or not isinstance(node.get("id"), str):
        raise ConfigError(file, "node.id", "required")
    return node["id"]


def read_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file's TOML document; ConfigError if it cannot be read."""
    file = str(path)
    try:
        text = Path(file).read_text()
    except OSError as exc:
        raise ConfigError(file, "(file)", exc.strerror or str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "(file)", f"not UTF-8: {exc.reason}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", str(exc)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a node's config file."""
    return parse_document(read_document(path), str(path))


def services_of_document(document: dict[str, Any], file: str) -> tuple[Service, ...]:
    """The services of a file that need not be a node's (a control plane's,
    one for ``lbctl apply``): a [node] table is checked when there is one."""
    _check_tables(document, file)
    if "node" in document:
        return parse_document(document, file).services
    return _read_services(file, document.get("service", []))
