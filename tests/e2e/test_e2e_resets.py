"""No connection outlives its peers: a reset or error on either side tears
the pair down at once and reaches the other side as a reset; a half-closed
pair is closed after node.fin_timeout_ms without traffic. Backends here are
scripted per connection (greet and hold, stay silent, send then reset)."""
from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest
from e2e_support import free_port, service, wait_until

ABORTIVE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class ScriptedBackend:
    """A listener on 127.0.0.1 that hands each accepted connection to
    ``script`` in a thread of its own; sockets stay open until ``close``."""

    made: list[ScriptedBackend] = []

    def __init__(self, script: Callable[[socket.socket], None]) -> None:
        ScriptedBackend.made.append(self)
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.ends: list[str] = []  # how each stream ended, as the script says
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.held.append(sock)
            threading.Thread(target=self.script, args=(sock,), daemon=True).start()

    def close(self) -> None:
        ScriptedBackend.made.remove(self)
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        for sock in self.held:
            sock.close()


@pytest.fixture
def scripted():
    made: list[ScriptedBackend] = []

    def make(script: Callable[[socket.socket], None]) -> ScriptedBackend:
        made.append(ScriptedBackend(script))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def behind_a_node(lbproxy, backend: ScriptedBackend, **settings):
    """One node with one worker in front of ``backend``: (node, host, port)."""
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("b1", backend.address, 1)])], workers=1, **settings)
    host, port = listen.split(":")
    return node, host, int(port)


def read_to_the_end(sock: socket.socket) -> None:
    """A backend's script: read until the stream ends, and say how it ended."""
    ends = next(b.ends for b in ScriptedBackend.made if sock in b.held)
    sock.settimeout(20)
    try:
        while sock.recv(1 << 16):
            pass
        ends.append("eof")
    except ConnectionResetError:
        ends.append("reset")
    except OSError as exc:
        ends.append(repr(exc))


def active(node) -> int:
    return sum(b["active"] for s in node.stats()["services"] for b in s["backends"])


@pytest.mark.timeout(120)
def test_a_client_gone_before_the_greeting_frees_its_pair_at_once(lbproxy, scripted):
    """Connect and close before the backend greets (a port scanner, a
    readiness probe): the greeting meets the client's reset. The pair once
    stayed open, counted active, until idle_timeout_ms (300 s)."""

    def greet_and_hold(sock: socket.socket) -> None:
        time.sleep(0.05)  # the client is gone by now
        try:
            sock.sendall(b"hello\n")
        except OSError:
            pass

    backend = scripted(greet_and_hold)
    node, host, port = behind_a_node(lbproxy, backend)
    for _ in range(200):
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    wait_until(lambda: len(backend.held) == 200, 15, message=lambda: f"{len(backend.held)} of 200 reached it")
    wait_until(lambda: active(node) == 0, 5, message=lambda: f"still active: {active(node)}")
    assert node.stats()["workers"][0]["active"] == 0


@pytest.mark.timeout(120)
def test_a_half_closed_pair_closes_after_fin_timeout_without_traffic(lbproxy, scripted):
    """The client has sent all it will (shutdown) and the backend says
    nothing: closed after fin_timeout_ms, not idle_timeout_ms. A half-closed
    pair whose other direction still moves stays open."""

    def silent(sock: socket.socket) -> None:
        pass

    def trickle(sock: socket.socket) -> None:
        for _ in range(12):  # a byte every 0.2 s: 2.4 s of traffic, past the 0.5 s fin timeout
            time.sleep(0.2)
            try:
                sock.sendall(b".")
            except OSError:
                return
        sock.close()

    quiet, busy = scripted(silent), scripted(trickle)
    listens = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    node = lbproxy([service("quiet", listens[0], [("q", quiet.address, 1)]),
                    service("busy", listens[1], [("b", busy.address, 1)])],
                   workers=1, fin_timeout_ms=500)

    def half_closed(listen: str) -> socket.socket:
        host, port = listen.split(":")
        client = socket.create_connection((host, int(port)), timeout=10)
        client.shutdown(socket.SHUT_WR)
        return client

    quiet_client, busy_client = half_closed(listens[0]), half_closed(listens[1])
    try:
        start = time.monotonic()
        assert quiet_client.recv(1) == b"", "the node sent something"
        took = time.monotonic() - start
        assert 0.4 <= took < 5, f"closed after {took:.2f} s, fin_timeout_ms = 500"
        received = b""
        while chunk := busy_client.recv(64):
            received += chunk
        assert received == b"." * 12, f"the moving direction was cut: {received!r}"
    finally:
        quiet_client.close()
        busy_client.close()
    wait_until(lambda: active(node) == 0, 5, message=lambda: f"still active: {active(node)}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("relay", ["auto", "splice", "copy"])
def test_a_backend_reset_reaches_the_client_as_a_reset(lbproxy, scripted, relay):
    """A backend that resets after 10 MB: directly the client sees
    ConnectionResetError; through the node it once saw a clean end of
    stream, so a truncated response looked complete."""
    size = 10 << 20

    def send_then_reset(sock: socket.socket) -> None:
        try:
            sock.sendall(b"x" * size)
        except OSError:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE)
        sock.close()

    backend = scripted(send_then_reset)
    node, host, port = behind_a_node(lbproxy, backend, relay=relay)
    received = 0
    with socket.create_connection((host, int(port)), timeout=10) as client:
        with pytest.raises(ConnectionResetError):
            while chunk := client.recv(1 << 16):
                received += len(chunk)
            raise AssertionError(f"a clean end of stream after {received} of {size} bytes")
    wait_until(lambda: active(node) == 0, 5, message=lambda: f"still active: {active(node)}")


@pytest.mark.timeout(120)
def test_a_client_reset_reaches_the_backend_as_a_reset(lbproxy, scripted):
    """The other way: a client that resets mid-upload is a reset at the backend."""

    backend = scripted(read_to_the_end)
    node, host, port = behind_a_node(lbproxy, backend)
    client = socket.create_connection((host, int(port)), timeout=10)
    client.sendall(b"y" * (1 << 20))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE)
    client.close()
    wait_until(lambda: backend.ends, 10, message=lambda: "the backend to see the end")
    assert backend.ends == ["reset"]
    wait_until(lambda: active(node) == 0, 5, message=lambda: f"still active: {active(node)}")


@pytest.mark.timeout(120)
def test_a_client_reset_while_the_backend_is_being_reached_is_a_reset_there_too(lbproxy, scripted):
    """Clients that reset at once: the node is still connecting to the
    backend when the reset comes. A backend that gets the connection must
    see it reset, never a clean end of stream."""

    backend = scripted(read_to_the_end)
    node, host, port = behind_a_node(lbproxy, backend)
    for _ in range(50):
        client = socket.create_connection((host, int(port)), timeout=10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE)
        client.close()
    wait_until(lambda: active(node) == 0, 10, message=lambda: f"still active: {active(node)}")
    wait_until(lambda: len(backend.ends) == len(backend.held), 10,
               message=lambda: f"{len(backend.ends)} of {len(backend.held)} ended")
    assert backend.held, "no connection reached the backend"
    assert "eof" not in backend.ends, backend.ends


@pytest.mark.timeout(120)
def test_a_write_that_fails_in_the_relay_is_a_reset_for_the_other_side(lbproxy, scripted):
    """The relay's own error path: the worker is stopped while the client's
    bytes arrive and then the backend's reset; resumed, it handles the
    client's bytes first (epoll reports in arrival order), and writing them
    to the reset backend fails inside the relay, before the backend's error
    event is handled. The client must see a reset there too, never a clean
    end of stream."""
    resets: list[socket.socket] = []

    def hold_until_told(sock: socket.socket) -> None:
        resets.append(sock)

    backend = scripted(hold_until_told)
    listen = f"127.0.0.1:{free_port()}"
    node = lbproxy([service("web", listen, [("b1", backend.address, 1)])], workers=1)
    (worker,) = node.remember_pids()
    host, port = listen.split(":")
    for attempt in range(3):
        client = socket.create_connection((host, int(port)), timeout=10)
        wait_until(lambda n=attempt: len(resets) > n, 10, message=lambda: "the backend to accept")
        time.sleep(0.1)  # the pair is relaying
        os.kill(worker, signal.SIGSTOP)
        try:
            client.sendall(b"after the backend is gone\n")
            time.sleep(0.1)
            resets[attempt].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE)
            resets[attempt].close()
            time.sleep(0.1)
        finally:
            os.kill(worker, signal.SIGCONT)
        client.settimeout(10)
        with pytest.raises(ConnectionResetError):
            data = client.recv(64)
            raise AssertionError(f"a clean end of stream ({data!r}), not a reset")
        client.close()
    wait_until(lambda: active(node) == 0, 5, message=lambda: f"still active: {active(node)}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("relay", ["auto", "copy"])
def test_what_a_backend_sent_before_its_reset_reaches_the_client_first(lbproxy, scripted, relay):
    """A backend that answers and then resets (an error page sent while the
    request body is still unread): directly, a client reads the answer and
    then the reset. Through the node too: the bytes queued before the
    reset are read and sent on before the reset is passed on."""
    answer = b"HTTP/1.1 413 Payload Too Large\r\n" + b"x" * 5000

    def answer_then_reset(sock: socket.socket) -> None:
        sock.sendall(answer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE)
        sock.close()

    backend = scripted(answer_then_reset)
    node, host, port = behind_a_node(lbproxy, backend, relay=relay)
    for _ in range(5):
        received = b""
        with socket.create_connection((host, int(port)), timeout=10) as client:
            with pytest.raises(ConnectionResetError):
                while chunk := client.recv(65536):
                    received += chunk
                raise AssertionError(f"a clean end of stream after {len(received)} bytes")
        assert received == answer, f"{len(received)} of {len(answer)} bytes before the reset"
    wait_until(lambda: active(node) == 0, 5, message=lambda: f"still active: {active(node)}")


def test_bytes_left_in_a_pipe_by_a_reset_never_reach_the_next_connection(lbproxy, scripted):
    """A client that resets while the node still holds spliced bytes for it:
    those bytes go with it. The pipe that held them is closed, not handed
    to the next connection, whose stream must be exactly its backend's
    (each backend connection sends one byte value, its number, over and over)."""
    served = []

    def pattern(sock: socket.socket) -> None:
        served.append(sock)
        value = bytes([len(served)])
        try:
            sock.sendall(value * (4 << 20))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the first connection is reset by the node

    backend = scripted(pattern)
    _node, host, port = behind_a_node(lbproxy, backend, relay="splice")
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    first.connect((host, port))
    assert first.recv(1) == b"\x01"
    time.sleep(0.5)  # the node fills its pipe for this client, which reads no more
    first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, ABORTIVE)
    first.close()
    time.sleep(0.3)
    with socket.create_connection((host, port), timeout=10) as second:
        got = bytearray()
        while chunk := second.recv(1 << 20):
            got += chunk
    assert len(got) == 4 << 20
    assert set(got) == {2}, f"bytes of another connection: {sorted(set(got))}"


@pytest.mark.timeout(120)
def test_a_client_that_reset_takes_nothing_more_and_its_pair_closes_at_once(lbproxy, scripted):
    """A client closes after its exchange; the backend answers the end of
    its stream with a last line, then holds its side open. The line meets a
    closed socket: the client resets. What was written to it can never be
    delivered (the kernel keeps counting it in the send queue of a reset
    socket), so the pair is torn down at once: it once waited out the 2 s
    given to bytes still on their way, holding the backend's connection
    and its count (and a drain) that long."""

    def answer_then_hold(sock: socket.socket) -> None:
        ends = next(b.ends for b in ScriptedBackend.made if sock in b.held)
        sock.settimeout(20)
        try:
            while sock.recv(1 << 16):
                pass
            sock.sendall(b"bye\n")  # after the client's FIN: into a closed socket
            for _ in range(200):  # then its side stays open until the node tears the pair down
                time.sleep(0.02)
                sock.sendall(b".")
            ends.append("still open")
        except (ConnectionResetError, BrokenPipeError):
            ends.append("reset")
        except OSError as exc:
            ends.append(repr(exc))

    backend = scripted(answer_then_hold)
    node, host, port = behind_a_node(lbproxy, backend)
    for attempt in range(3):
        client = socket.create_connection((host, int(port)), timeout=10)
        client.sendall(b"hello\n")
        time.sleep(0.05)
        closed = time.monotonic()
        client.close()
        ended = attempt + 1
        wait_until(lambda n=ended: len(backend.ends) == n, 10, message=lambda: "the backend to see the end")
        took = time.monotonic() - closed
        assert backend.ends[-1] == "reset", backend.ends
        assert took < 1.0, f"the pair closed {took:.2f} s after the client's reset"
    wait_until(lambda: active(node) == 0, 5, message=lambda: f"still active: {active(node)}")
