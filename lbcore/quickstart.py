"""``lbproxy quickstart``: three demo HTTP backends and a node in front of them.

The backends (127.0.0.1:9001-9003, threads of this process) answer
``hello from web-N``; the node listens on 127.0.0.1:PORT with weighted round
robin, so repeated ``curl http://127.0.0.1:8080/`` rotate through them. The
node runs in embedded mode: its control plane (a child lborch on a SQLite file
in a temporary directory, control tcp://127.0.0.1:7700) takes lbctl commands.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lbcore.agent import serve
from lbcore.config import load_config

BACKEND_PORTS = (9001, 9002, 9003)

CONFIG = """\
[node]
id = "quickstart"
control = "embedded"
{workers}

[orchestrator]
store = "sqlite:///{store}"
control = "tcp://127.0.0.1:7700"
publish = "tcp://127.0.0.1:7701"

[[service]]
name = "web"
listen = "127.0.0.1:{port}"
algorithm = "wrr"
{backends}
"""

BACKEND = """
[[service.backend]]
id = "web-{n}"
address = "127.0.0.1:{port}"
weight = 1
"""


def demo_backend(name: str, port: int) -> ThreadingHTTPServer:
    body = f"hello from {name}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def quickstart(port: int, workers: int | None) -> int:
    servers = [demo_backend(f"web-{n}", p) for n, p in enumerate(BACKEND_PORTS, 1)]
    text = CONFIG.format(
        store="{store}",
        port=port,
        workers=f"workers = {workers}" if workers else "",
        backends="".join(BACKEND.format(n=n, port=p) for n, p in enumerate(BACKEND_PORTS, 1)),
    )
    work = tempfile.mkdtemp(prefix="fulcrum-quickstart-")
    path = os.path.join(work, "quickstart.toml")
    with open(path, "w") as f:
        f.write(text.replace("{store}", os.path.join(work, "state.db")))
    try:
        config = load_config(path)

        def announce(_agent: object) -> None:
            print(f"quickstart: try  curl http://127.0.0.1:{port}/  and  "
                  "lbctl backend set-weight web web-1 3  (Ctrl-C stops)", flush=True)

        return serve(config, on_ready=announce)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for server in servers:
            server.shutdown()
            server.server_close()
