"""Helpers of the end-to-end tests: clients, backend processes
(backend_server.py), lbproxy nodes as real processes, configs.

Importing this module raises the open-file limit of the test process (and so
of the processes it starts) to 20000: the tests hold a thousand connections.
"""
from __future__ import annotations

import itertools
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BACKEND_SCRIPT = Path(__file__).with_name("backend_server.py")
SHM_DIR = Path("/dev/shm")
READY_TIMEOUT_S = 15.0
LBPROXY = [sys.executable, "-m", "lbcore.cli"]

_node_counter = itertools.count(1)


def _raise_fd_limit(wanted: int = 20000) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


_raise_fd_limit()


# ---------------------------------------------------------------- helpers


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05,
               message: str | Callable[[], str] = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), at
    most ``timeout`` seconds; AssertionError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bound to 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def dead_address(host: str = "127.0.0.1") -> str:
    """An address where nothing listens: a port we bound and closed."""
    return f"{host}:{free_port(host)}"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            continue
    return found


def descendants_of(pid: int) -> list[int]:
    seen: list[int] = []
    todo = children_of(pid)
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo.extend(children_of(p))
    return seen


def shm_path(node_id: str) -> Path:
    return SHM_DIR / f"fulcrum-{node_id}"


def connection_refused(address: tuple[str, int], timeout: float = 2.0) -> bool:
    """True if a connect to ``address`` is refused (nothing listens)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(address)
    except ConnectionRefusedError:
        return True
    finally:
        s.close()
    return False


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Client:
    """A blocking client connection with a read buffer."""

    def __init__(self, address: str | tuple[str, int], source: str | None = None,
                 timeout: float = 10.0) -> None:
        host, port = parse_address(address) if isinstance(address, str) else address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            if source is not None:
                self.sock.bind((source, 0))
            self.sock.connect((host, port))
        except BaseException:
            self.sock.close()
            raise
        self.buf = bytearray()

    def readline(self, limit: int = 4096) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > limit:
                raise AssertionError(f"no line in {bytes(self.buf[:100])!r}...")
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"EOF before a full line (have {bytes(self.buf)!r})")
            self.buf += data
        i = self.buf.index(b"\n") + 1
        line = bytes(self.buf[:i])
        del self.buf[:i]
        return line

    def ident(self) -> str:
        """The backend's id line, which every backend sends first."""
        return self.readline().decode().strip()

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(max(65536, n - len(self.buf)))
            if not data:
                raise EOFError(f"EOF after {len(self.buf)} of {n} bytes")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_to_eof(self, limit: int = 1 << 26) -> bytes:
        while True:
            data = self.sock.recv(65536)
            if not data:
                break
            self.buf += data
            if len(self.buf) > limit:
                raise AssertionError("more data than expected")
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def echo(self, payload: bytes) -> bytes:
        self.sock.sendall(payload)
        return self.recv_exact(len(payload))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- backends


class Backends:
    """A backend_server.py process serving several listeners."""

    def __init__(self, specs: dict[str, str]) -> None:
        args = [f"{ident}={host}:0" if ":" not in host else f"{ident}={host}"
                for ident, host in specs.items()]
        self.process = subprocess.Popen(
            [sys.executable, str(BACKEND_SCRIPT), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=child_env(),
        )
        self.pid = self.process.pid
        line = self._read_ports_line()
        self.addresses: dict[str, str] = {k: f"{h}:{p}" for k, (h, p) in json.loads(line).items()}

    def _read_ports_line(self) -> bytes:
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(self.process.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(15)
        if not result or not result[0]:
            self.stop()
            raise RuntimeError("backend server did not report its ports")
        return result[0]

    def __getitem__(self, ident: str) -> str:
        return self.addresses[ident]

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(5)
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


# ---------------------------------------------------------------- lbproxy


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))


def render_config(node: dict[str, Any], services: list[dict[str, Any]]) -> str:
    """TOML text: ``node`` a table; each service a dict whose "backends" is a
    list of backend tables (other keys are written as they are, so a test
    can add unknown keys or bad values)."""
    lines = ["[node]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in node.items()]
    for service in services:
        lines += ["", "[[service]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in service.items() if k != "backends"]
        for backend in service.get("backends", []):
            lines += ["", "[[service.backend]]"]
            lines += [f"{k} = {toml_value(v)}" for k, v in backend.items()]
    return "\n".join(lines) + "\n"


def new_node_id() -> str:
    return f"e2e-{os.getpid()}-{next(_node_counter)}"


class Node:
    """One lbproxy process (the agent) and its workers."""

    def __init__(self, workdir: Path, node: dict[str, Any], services: list[dict[str, Any]]) -> None:
        self.node_id = node["id"]
        self.node = node
        self.services = services
        self.workdir = workdir
        self.config_path = workdir / f"{self.node_id}.toml"
        self.log_path = workdir / f"{self.node_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.known_pids: set[int] = set()
        self.write_config(node, services)

    # -- config

    def write_config(self, node: dict[str, Any], services: list[dict[str, Any]]) -> None:
        self.write_config_text(render_config(node, services))

    def write_config_text(self, text: str) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    def listen(self, service: int = 0) -> tuple[str, int]:
        return parse_address(self.services[service]["listen"])

    # -- process

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> Node:
        """Start the process; do not wait for it to be ready."""
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*LBPROXY, "-c", str(self.config_path)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(),
            )
        return self

    def wait_ready_or_exit(self, timeout: float = READY_TIMEOUT_S) -> int | None:
        """Wait until the node is ready (None) or has exited (its status)."""
        assert self.process is not None
        wait_until(lambda: "ready: version 1" in self.log() or self.process.poll() is not None,
                   timeout, message=lambda: f"ready or exit; log:\n{self.log()}")
        if self.process.poll() is None:
            self.remember_pids()
        return self.process.poll()

    def start(self) -> Node:
        status = self.launch().wait_ready_or_exit()
        assert status is None, f"lbproxy exited {status}:\n{self.log()}"
        return self

    def remember_pids(self) -> list[int]:
        pids = descendants_of(self.pid)
        self.known_pids.update(pids)
        return pids

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 15.0) -> str:
        wait_until(lambda: self.log().count(text) >= count, timeout,
                   message=lambda: f"{text!r} x{count} in the log:\n{self.log()}")
        return self.log()

    def send(self, signum: int) -> None:
        assert self.process is not None and self.process.poll() is None, "lbproxy is not running"
        os.kill(self.pid, signum)

    # -- stats

    def run_cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*LBPROXY, *args], capture_output=True, text=True, cwd=ROOT,
                              env=child_env(), timeout=timeout)

    def stats(self, config: Path | None = None) -> dict[str, Any]:
        result = self.run_cli("stats", "-c", str(config or self.config_path), "--json")
        assert result.returncode == 0, f"stats failed ({result.returncode}): {result.stderr}"
        return json.loads(result.stdout)

    def backend_stats(self, service: str | None = None) -> dict[str, dict[str, Any]]:
        stats = self.stats()
        svc = stats["services"][0] if service is None else \
            next(s for s in stats["services"] if s["name"] == service)
        return {b["id"]: b for b in svc["backends"]}

    def worker_pids(self) -> dict[int, int]:
        """worker index -> pid, from ``lbproxy stats --json``."""
        pids = {w["index"]: w["pid"] for w in self.stats()["workers"]}
        self.known_pids.update(pids.values())
        return pids

    # -- stop

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; SIGKILL (agent and known workers) if it hangs."""
        assert self.process is not None
        self.remember_pids()
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"lbproxy did not stop within {timeout} s:\n{self.log()}") from None
        return self.process.returncode

    def kill(self) -> None:
        assert self.process is not None
        pids = set(self.remember_pids()) | self.known_pids
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)
        for pid in pids:
            if pid_alive(pid) and _is_ours(pid):
                os.kill(pid, signal.SIGKILL)


def _is_ours(pid: int) -> bool:
    """Only end processes that are lbproxy workers (a pid may be reused)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"lbcore.worker_main" in f.read()
    except OSError:
        return False


def service(name: str, listen: str, backends: list[tuple[str, str, int]] | list[dict[str, Any]],
            algorithm: str = "wrr", **extra: Any) -> dict[str, Any]:
    """A service dict for ``render_config``; backends as (id, address, weight)."""
    rows = [b if isinstance(b, dict) else {"id": b[0], "address": b[1], "weight": b[2]}
            for b in backends]
    return {"name": name, "listen": listen, "algorithm": algorithm, **extra, "backends": rows}


def _proc_net_tcp_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """Inode of the IPv4 TCP socket ``local`` <-> ``remote`` (/proc/net/tcp)."""
    def encode(address: tuple[str, int]) -> str:
        packed = socket.inet_aton(address[0])
        return f"{int.from_bytes(packed, 'little'):08X}:{address[1]:04X}"
    want_local, want_remote = encode(local), encode(remote)
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == want_local and fields[2] == want_remote:
                return int(fields[9])
    return None


def owning_process(client: Client, pids: Iterable[int]) -> int | None:
    """Which of ``pids`` holds the proxy's end of ``client``'s connection."""
    local = client.sock.getpeername()      # the service address, as the proxy sees it
    remote = client.sock.getsockname()     # the client address
    inode = _proc_net_tcp_inode(local, remote)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


# ---------------------------------------------------------------- control plane


class Orchestrator:
    def __init__(self, workdir: Path, services: list[dict]) -> None:
        self.control, self.publish = free_port(), free_port()
        self.config = workdir / "orch.toml"
        table = (f'\n[orchestrator]\nstore = "sqlite:///{workdir / "state.db"}"\n'
                 f'control = "tcp://127.0.0.1:{self.control}"\npublish = "tcp://127.0.0.1:{self.publish}"\n'
                 "heartbeat_ms = 100\n")
        self.config.write_text(render_config({"id": "orch"}, services) + table)
        self.log = workdir / "orch.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.control}"

    def start(self) -> None:
        self.starts += 1
        command = [sys.executable, "-m", "orchestrator.cli", "-c", str(self.config)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env=child_env())
        wait_until(lambda: self.log.read_text().count("ready:") >= self.starts, 15)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)

    def lbctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ctl.lbctl", "--control", self.endpoint, *args],
                              capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=30)


def start_nodes(lbproxy, orch: Orchestrator, count: int, **settings) -> list:
    nodes = []
    for i in range(count):
        node = lbproxy([], start=False, workers=1, control=f"tcp://127.0.0.1:{orch.control}",
                       subscribe=f"tcp://127.0.0.1:{orch.publish}", address=f"127.0.0.{i + 2}",
                       max_staleness_ms=1000, **settings)
        node.launch()
        nodes.append(node)
    for node in nodes:
        node.wait_ready_or_exit()
        node.wait_log("applied: version")
    return nodes


def applied_version(node) -> int:
    return int(node.stats()["version"])
