"""Small real servers and waits for the tests."""
from __future__ import annotations

import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np


def image_bytes(image: Any) -> bytes:
    """An image (lbcore.image.Image) as bytes: equal images, equal bytes."""
    limits = image.limits
    head = np.array([image.version, limits.connect_timeout_ms, limits.idle_timeout_ms, limits.retries,
                     limits.relay_mode, len(image.services), len(image.backends), len(image.table)],
                    dtype="<u8")
    return head.tobytes() + image.services.tobytes() + image.backends.tobytes() + image.table.tobytes()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


class BackendPool:
    """Listeners on 127.0.0.1 that answer each connection with their port
    number and a newline, then close; one selector thread serves them all."""

    def __init__(self, count: int) -> None:
        self._selector = selectors.DefaultSelector()
        self._sockets = []
        self._accepted: Counter[int] = Counter()
        self._stop = threading.Event()
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(1024)
            s.setblocking(False)
            self._selector.register(s, selectors.EVENT_READ)
            self._sockets.append(s)
        self.ports = [s.getsockname()[1] for s in self._sockets]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                listener = key.fileobj
                port = listener.getsockname()[1]
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    self._accepted[port] += 1
                    try:
                        conn.setblocking(True)
                        conn.sendall(f"{port}\n".encode())
                    except OSError:
                        pass
                    conn.close()

    def accepted(self, port: int) -> int:
        return self._accepted[port]

    def __enter__(self) -> BackendPool:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self._sockets:
            self._selector.unregister(s)
            s.close()
        self._selector.close()
