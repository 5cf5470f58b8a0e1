"""Processes for the load benchmarks: tools, nginx backends and the proxies under test.

Shared by ``bench/sidebyside.py`` and the pytest-benchmark fixtures in
``bench/conftest.py``. Everything listens on 127.0.0.1 only. A :class:`Fleet`
records every process it starts and every temp dir it makes; ``Fleet.close``
stops the processes by PID (SIGTERM, then SIGKILL) and removes the dirs.

Importing this module starts nothing and needs none of the tools.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SMALL = "fulcrum-bench-64-byte-body-" + "x" * 36 + "\n"  # exactly 64 bytes, served at /small
BIG_BYTES = 1 << 20  # served at /big
POOL_SIZE = 10_000  # backend ports for W4, spread over the 3 nginx backends
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROXIES = ("lbproxy", "haproxy", "haproxy-splice", "nginx")
TARGETS = (*PROXIES, "direct")
# Splice both ways on every connection. "option splice-auto" spliced too little here to matter
# (W3 CPU per request within 5% of plain HAProxy); forced splice cuts it by ~55% and costs ~25% more
# on small requests, as BENCH-NOTES.md describes: the strongest HAProxy for bulk transfers.
SPLICE = "    option splice-request\n    option splice-response\n"
LABELS = {"lbproxy": "lbproxy", "haproxy": "HAProxy", "haproxy-splice": "HAProxy+splice",
          "nginx": "nginx stream", "direct": "direct"}


class MissingToolError(RuntimeError):
    """A tool is missing and cannot be installed here (not root, or apt-get failed)."""


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN)


# Tool name -> (is it there?, Debian package that provides it)
TOOLS = {
    "haproxy": (lambda: which("haproxy") is not None, "haproxy"),
    "nginx": (lambda: which("nginx") is not None, "nginx"),
    "nginx-stream": (STREAM_MODULE.exists, "libnginx-mod-stream"),
    "wrk": (lambda: which("wrk") is not None, "wrk"),
    "perf": (lambda: which("perf") is not None, "linux-perf"),
}


def tools_for(targets: Iterable[str]) -> list[str]:
    """The tools a run over ``targets`` needs (wrk and nginx backends always)."""
    targets = set(targets)
    needed = ["wrk", "nginx", "perf"]
    if targets & {"haproxy", "haproxy-splice"}:
        needed.append("haproxy")
    if "nginx" in targets:
        needed.append("nginx-stream")
    return needed


def ensure_tools(tools: Iterable[str]) -> None:
    """apt-get install the packages of missing ``tools`` without starting any system service.

    A temporary /usr/sbin/policy-rc.d that exits 101 refuses every service start
    during the install; it is removed afterwards. Raises MissingToolError.
    """
    packages = [TOOLS[t][1] for t in tools if not TOOLS[t][0]()]
    if not packages:
        return
    if os.geteuid() != 0 or which("apt-get") is None:
        raise MissingToolError(f"missing {' '.join(packages)}: apt-get install -y {' '.join(packages)}")
    print(f"installing {' '.join(packages)} ...", flush=True)
    policy_rc = Path("/usr/sbin/policy-rc.d")
    ours = not policy_rc.exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    try:
        if ours:
            policy_rc.write_text("#!/bin/sh\nexit 101\n")
            policy_rc.chmod(0o755)
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
            if subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                raise MissingToolError(f"apt-get install {' '.join(packages)} failed")
    finally:
        if ours:
            policy_rc.unlink(missing_ok=True)
    still = [t for t in tools if not TOOLS[t][0]()]
    if still:
        raise MissingToolError(f"still missing after install: {', '.join(still)}")


def _sockets() -> list[tuple[int, str]]:
    """(local port, state) of every TCP socket on the host, from /proc/net/tcp{,6}."""
    sockets = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        sockets += [(int(f[1].rsplit(":", 1)[1], 16), f[3]) for f in map(str.split, lines)]
    return sockets


def listening(ports: Iterable[int]) -> set[int]:
    """Which of ``ports`` have a listening socket (read from /proc: no connect reaches anyone)."""
    wanted = set(ports)
    return {port for port, state in _sockets() if state == "0A" and port in wanted}  # 0A: TCP_LISTEN


def free_ports(count: int, low: int, taken: set[int]) -> list[int]:
    """``count`` ports below the ephemeral range (W2 needs that for clients) that no socket uses
    now and that are not in ``taken``."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    used = {port for port, _ in _sockets()} | taken
    ports = [p for p in range(low, ephemeral) if p not in used][:count]
    if len(ports) < count:
        raise RuntimeError(f"only {len(ports)} free ports in {low}..{ephemeral - 1}, need {count}")
    return ports


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: a process we started, by PID."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Fleet:
    """Every process and temp dir a benchmark makes, so that all of it can be stopped by PID."""

    work: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fulcrum-bench-")))
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    taken: set[int] = field(default_factory=set)

    def spawn(self, command: list[str], log: Path, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``command`` in its own session (Ctrl-C reaches only us), stderr+stdout to ``log``."""
        with log.open("ab") as out:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                       start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def ports(self, count: int, low: int = 10_000) -> list[int]:
        """``count`` free ports, none handed out before by this fleet."""
        ports = free_ports(count, low, self.taken)
        self.taken.update(ports)
        return ports

    def port(self) -> int:
        """A port for a proxy listener."""
        return self.ports(1, low=30_000)[0]

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        stop_process(process, timeout)

    def close(self) -> None:
        """Stop every process started here (newest first) and remove the temp dir."""
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for process in reversed(self.processes):
                self.stop(process)
            self.processes.clear()
            for segment in Path("/dev/shm").glob(f"fulcrum-bench-{os.getpid()}-*"):
                segment.unlink(missing_ok=True)  # left only by an lbproxy that had to be killed
            shutil.rmtree(self.work, ignore_errors=True)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


@dataclass
class Target:
    """Something wrk can be pointed at: a proxy (with its processes) or a backend (direct)."""

    name: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    config: Path | None = None
    log: Path | None = None

    @property
    def kind(self) -> str:
        return self.name.split("-")[0]

    def pids(self) -> list[int]:
        """The processes whose CPU time is the proxy's: lbproxy's workers, HAProxy, nginx master+workers."""
        if self.process is None or self.process.poll() is not None:
            return []
        if self.kind == "lbproxy":
            return children(self.process.pid)
        if self.kind == "nginx":
            return [self.process.pid, *children(self.process.pid)]
        return [self.process.pid]


def wait_listening(ports: list[int], process: subprocess.Popen[bytes], log: Path,
                   timeout: float = 30) -> None:
    """Wait until ``process`` listens on all ``ports`` (read from /proc: no connect reaches it)."""
    deadline = time.monotonic() + timeout
    while listening(ports) != set(ports):
        if process.poll() is not None or time.monotonic() > deadline:
            state = f"exited {process.returncode}" if process.poll() is not None else "timed out"
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"pid {process.pid} {state} before listening:\n{text}")
        time.sleep(0.05)


def http_get(port: int, path: str, timeout: float = 10) -> tuple[bytes, int]:
    """One ``GET path`` with Connection: close: (status line, body length)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        reply = b"".join(iter(lambda: sock.recv(1 << 20), b""))
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0], len(body)


def check(target: Target) -> None:
    """/small and /big through ``target`` must return 200 with the right body size."""
    for path, size in (("/small", len(SMALL)), ("/big", BIG_BYTES)):
        status, length = http_get(target.port, path)
        if not status.startswith(b"HTTP/1.1 200") or length != size:
            raise RuntimeError(f"{target.name} on {HOST}:{target.port}{path}: {status!r}, {length} bytes")


@dataclass
class Backends:
    """3 nginx backends; ``ports`` holds one port each, ``pool`` every port they listen on."""

    ports: list[int]
    pool: list[int]
    processes: list[subprocess.Popen[bytes]]

    def direct(self) -> Target:
        return Target("direct", self.ports[0])


def start_backends(fleet: Fleet, pool: int = 0, count: int = 3) -> Backends:
    """Start ``count`` nginx backends; with ``pool``, together they listen on ``pool`` ports."""
    nginx = which("nginx")
    if nginx is None:
        raise MissingToolError("nginx is not installed")
    fleet.work.chmod(0o755)  # nginx workers run as www-data and must read /big
    www = fleet.work / "www"
    www.mkdir(mode=0o755, exist_ok=True)
    (www / "big").write_bytes(b"b" * BIG_BYTES)
    all_ports = fleet.ports(max(pool, count))
    shares = [all_ports[i::count] for i in range(count)]
    processes, logs = [], []
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")  # keep nginx out of /var/lib/nginx
    for index, ports in enumerate(shares, 1):
        prefix = fleet.work / f"backend{index}"
        (prefix / "logs").mkdir(parents=True)
        temp = "".join(f"    {kind}_temp_path {prefix}/{kind};\n" for kind in kinds)
        listens = "".join(f"        listen {HOST}:{port};\n" for port in ports)
        conf, err = prefix / "nginx.conf", prefix / "error.log"
        conf.write_text(f"""daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 19000;
error_log {err} warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    sendfile on;
    tcp_nopush on;
{temp}    server {{
{listens}        root {www};
        location = /small {{ default_type text/plain; return 200 "{SMALL[:-1]}\\n"; }}
        location = /big {{ default_type application/octet-stream; }}
    }}
}}
""")
        command = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(err)]
        process = fleet.spawn(command, prefix / "stderr.log")
        processes.append(process)
        logs.append(err)
    for process, ports, err in zip(processes, shares, logs, strict=True):
        wait_listening(ports, process, err)
    backends = Backends([ports[0] for ports in shares], all_ports, processes)
    for port in backends.ports:
        check(Target("backend", port))
    return backends


def start_lbproxy(fleet: Fleet, name: str, workers: int, ports: list[int], relay: str = "auto") -> Target:
    """lbproxy (``python -m lbcore.cli -c CONFIG``), wrr over ``ports``; ready when its log says so."""
    port = fleet.port()
    # per worker count: a log left by an earlier run must not read as "ready"
    config, log = fleet.work / f"{name}-{workers}w.toml", fleet.work / f"{name}-{workers}w.log"
    log.unlink(missing_ok=True)
    backends = "".join(f'\n[[service.backend]]\nid = "b{i}"\naddress = "{HOST}:{p}"\n'
                       for i, p in enumerate(ports, 1))
    config.write_text(f'[node]\nid = "bench-{os.getpid()}-{name}"\nworkers = {workers}\nrelay = "{relay}"\n\n'
                      f'[[service]]\nname = "web"\nlisten = "{HOST}:{port}"\nalgorithm = "wrr"\n{backends}')
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    process = fleet.spawn([sys.executable, "-m", "lbcore.cli", "-c", str(config)], log, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path})
    deadline = time.monotonic() + 60
    while "]: ready" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"lbproxy {name} did not become ready:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return Target(name, port, process, config, log)


def start_haproxy(fleet: Fleet, name: str, workers: int, ports: list[int], splice: bool) -> Target:
    """HAProxy in TCP mode, ``balance roundrobin``, ``nbthread workers``, foreground (-db);
    with ``splice``, ``option splice-request`` and ``splice-response``."""
    haproxy = which("haproxy")
    if haproxy is None:
        raise MissingToolError("haproxy is not installed")
    port = fleet.port()
    config, log = fleet.work / f"{name}.cfg", fleet.work / f"{name}.log"
    servers = "".join(f"    server b{i} {HOST}:{p}\n" for i, p in enumerate(ports, 1))
    config.write_text(f"""global
    nbthread {workers}
    maxconn 4096
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind {HOST}:{port}
    default_backend be
backend be
    balance roundrobin
{SPLICE if splice else ""}{servers}""")
    process = fleet.spawn([haproxy, "-db", "-f", str(config)], log)
    wait_listening([port], process, log)
    return Target(name, port, process, config, log)


def start_nginx_stream(fleet: Fleet, name: str, workers: int, ports: list[int]) -> Target:
    """nginx stream proxy (round robin is its default), ``worker_processes workers``, daemon off."""
    nginx = which("nginx")
    if nginx is None or not STREAM_MODULE.exists():
        raise MissingToolError("nginx with the stream module (libnginx-mod-stream) is not installed")
    port = fleet.port()
    prefix = fleet.work / f"{name}-{workers}w"
    (prefix / "logs").mkdir(parents=True)
    config, log = prefix / "nginx.conf", prefix / "error.log"
    servers = "".join(f"        server {HOST}:{p};\n" for p in ports)
    config.write_text(f"""load_module {STREAM_MODULE};
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 19000;
error_log {log} warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 8192; }}
stream {{
    upstream be {{
{servers}    }}
    server {{
        listen {HOST}:{port};
        proxy_pass be;
    }}
}}
""")
    command = [nginx, "-p", str(prefix), "-c", str(config), "-e", str(log)]
    process = fleet.spawn(command, prefix / "stderr.log")
    wait_listening([port], process, log)
    return Target(name, port, process, config, log)


def start_target(fleet: Fleet, name: str, workers: int, backends: Backends, pool: bool = False) -> Target:
    """Start target ``name`` (one of TARGETS) over the 3 backends, or over the whole pool."""
    ports = backends.pool if pool else backends.ports
    label = f"{name}-pool" if pool else name
    if name == "direct":
        return backends.direct()
    if name == "lbproxy":
        target = start_lbproxy(fleet, label, workers, ports)
    elif name in ("haproxy", "haproxy-splice"):
        target = start_haproxy(fleet, label, workers, ports, splice=name == "haproxy-splice")
    elif name == "nginx":
        target = start_nginx_stream(fleet, label, workers, ports)
    else:
        raise ValueError(f"unknown target {name!r} (one of {', '.join(TARGETS)})")
    check(target)
    return target


def stop_target(fleet: Fleet, target: Target) -> None:
    if target.process is not None:
        fleet.stop(target.process)
