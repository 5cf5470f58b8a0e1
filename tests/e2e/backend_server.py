"""Backend servers for the end-to-end tests, run as a separate process.

    python backend_server.py ID=HOST:PORT [ID=HOST:PORT ...]

Each ``ID=HOST:PORT`` is a listener (PORT 0 picks a free port). Once every
listener is bound, one JSON line goes to stdout: {"ID": [host, port], ...}.

Every accepted connection first receives ``ID\\n``; everything the client sends
is echoed back. When the client shuts down its write side (EOF), the backend
finishes echoing what it read, sends ``EOF\\n`` and closes. The process exits
on SIGTERM or when stdin reaches EOF (the test process went away).

One thread, one selector, nonblocking sockets: thousands of connections and
bulk transfers with backpressure (reading stops while a connection has more
than HIGH_WATER bytes not yet sent back).
"""
from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import socket
import sys

HIGH_WATER = 1 << 20
CHUNK = 1 << 16


class Conn:
    __slots__ = ("sock", "out", "eof", "reading")

    def __init__(self, sock: socket.socket, ident: str) -> None:
        self.sock = sock
        self.out = bytearray(f"{ident}\n".encode())
        self.eof = False
        self.reading = True


def main(specs: list[str]) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    sel = selectors.DefaultSelector()
    bound: dict[str, list] = {}
    for spec in specs:
        ident, _, address = spec.partition("=")
        host, _, port = address.rpartition(":")
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, int(port)))
        lsock.listen(4096)
        lsock.setblocking(False)
        sel.register(lsock, selectors.EVENT_READ, ("listen", ident))
        bound[ident] = [host, lsock.getsockname()[1]]
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    signal.set_wakeup_fd(stop_w)
    signal.signal(signal.SIGTERM, lambda *_: None)
    sel.register(stop_r, selectors.EVENT_READ, ("stop", None))
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, ("stdin", None))
    print(json.dumps(bound), flush=True)

    def update(conn: Conn) -> None:
        events = selectors.EVENT_READ if conn.reading else 0
        if conn.out:
            events |= selectors.EVENT_WRITE
        if events:
            sel.modify(conn.sock, events, ("conn", conn))
        else:
            sel.modify(conn.sock, selectors.EVENT_READ, ("conn", conn))

    def close(conn: Conn) -> None:
        sel.unregister(conn.sock)
        conn.sock.close()

    while True:
        for key, mask in sel.select():
            kind, obj = key.data
            if kind in ("stop", "stdin"):
                return 0
            if kind == "listen":
                for _ in range(64):
                    try:
                        sock, _addr = key.fileobj.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    sock.setblocking(False)
                    conn = Conn(sock, obj)
                    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, ("conn", conn))
                continue
            conn = obj
            try:
                if mask & selectors.EVENT_READ and conn.reading:
                    data = conn.sock.recv(CHUNK)
                    if data:
                        conn.out += data
                        if len(conn.out) > HIGH_WATER:
                            conn.reading = False
                    else:
                        conn.eof = True
                        conn.reading = False
                        conn.out += b"EOF\n"
                if conn.out:  # try at once: usually the socket is writable
                    try:
                        sent = conn.sock.send(conn.out)
                        del conn.out[:sent]
                    except BlockingIOError:
                        pass
                    if not conn.eof and len(conn.out) <= HIGH_WATER // 2:
                        conn.reading = True
                if conn.eof and not conn.out:
                    close(conn)
                    continue
                update(conn)
            except (ConnectionResetError, BrokenPipeError, OSError):
                close(conn)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
