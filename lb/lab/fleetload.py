"""Client traffic of the fleet scenes (lb/lab/fleetscene.py), sent from the lab client's
namespace by threads of the calling process: long-lived line-echo connections that must
keep their backend whatever happens to the nodes, and new HTTP requests in a loop.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from . import namespaces
from .topology import ECHO_PORT, HTTP_PORT, VIP4, VIP6, http_get


def _family(i: int) -> int:
    return socket.AF_INET6 if i % 2 else socket.AF_INET


def _vip(fam: int) -> str:
    return VIP6 if fam == socket.AF_INET6 else VIP4


def read_line(c) -> bytes:
    """The next line (without its newline) on connection c (its .sock, and .buf holding
    what was read past the last line)."""
    while b"\n" not in c.buf:
        chunk = c.sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the peer")
        c.buf += chunk
    line, _, c.buf = c.buf.partition(b"\n")
    return line


@dataclass
class Conn:
    family: int
    sock: socket.socket
    sport: int
    backend: str = ""
    oks: int = 0
    last_ok: float = 0.0
    error: Optional[str] = None
    buf: bytes = field(default=b"", repr=False)


class Held:
    """n TCP connections to the line echo on the VIPs (IPv4 and IPv6 in turn), a thread
    each sending a line every `period` s and checking that the echo names the backend the
    connection started on. A connection reset, closed, silent for `stall` s or answered
    by another backend fails, once (`error`), and its thread ends."""

    def __init__(self, client_ns: str, n: int, period: float = 0.05, stall: float = 10.0):
        self.ns, self.period, self.stall = client_ns, period, stall
        self.conns: list[Conn] = []
        self.stop_ev = threading.Event()
        self.threads: list[threading.Thread] = []
        for i in range(n):
            fam = _family(i)
            with namespaces.entered(client_ns):
                s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(stall)
            s.connect((_vip(fam), ECHO_PORT))
            c = Conn(fam, s, s.getsockname()[1])
            c.backend = self._echo(c, b"hello")
            self.conns.append(c)

    def _echo(self, c: Conn, msg: bytes) -> str:
        """Send a line, read its echo: the backend's name."""
        c.sock.sendall(msg + b"\n")
        line = read_line(c)
        name, _, rest = line.partition(b" ")
        if rest != msg:
            raise OSError(f"echo {line[:80]!r} for {msg!r}")
        c.oks, c.last_ok = c.oks + 1, time.monotonic()
        return name.decode()

    def _run(self, c: Conn) -> None:
        seq = itertools.count()
        while not self.stop_ev.is_set():
            try:
                name = self._echo(c, str(next(seq)).encode())
            except OSError as e:
                c.error = f"{type(e).__name__}: {e}"
                return
            if name != c.backend:
                c.error = f"moved from {c.backend} to {name}"
                return
            self.stop_ev.wait(self.period)

    def start(self) -> "Held":
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True)
                        for c in self.conns]
        for t in self.threads:
            t.start()
        return self

    def flows(self) -> list[tuple[str, str, int, str, int]]:
        """(protocol, source, source port, VIP, port) of each connection, in order."""
        return [("tcp", c.sock.getsockname()[0], c.sport, _vip(c.family), ECHO_PORT)
                for c in self.conns]

    def failed(self) -> list[Conn]:
        return [c for c in self.conns if c.error]

    def wait_progress(self, since: float, timeout: float = 20.0) -> bool:
        """Until every connection not failed has had an echo after `since` (monotonic);
        False if some had not within `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(c.error or c.last_ok > since for c in self.conns):
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> list[Conn]:
        self.stop_ev.set()
        for t in self.threads:
            t.join(self.stall + 1)
        for c in self.conns:
            c.sock.close()
        return self.conns


@dataclass
class Request:
    t0: float
    t1: float
    backend: Optional[str]
    error: Optional[str]


class Requests:
    """New HTTP requests to the VIPs in a loop, `threads` threads (IPv4 and IPv6 in
    turn), each request on a connection of its own, until stopped."""

    def __init__(self, client_ns: str, threads: int = 2, timeout: float = 5.0):
        self.ns, self.timeout = client_ns, timeout
        self.done: list[Request] = []
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(_family(i),), daemon=True)
                        for i in range(threads)]

    def _run(self, fam: int) -> None:
        while not self.stop_ev.is_set():
            t0, backend, error = time.monotonic(), None, None
            with namespaces.entered(self.ns):
                s = socket.socket(fam, socket.SOCK_STREAM)
            try:
                s.settimeout(self.timeout)
                backend = http_get(s, _vip(fam), HTTP_PORT)
            except OSError as e:
                error = f"{type(e).__name__}: {e}"
            finally:
                s.close()
            self.done.append(Request(t0, time.monotonic(), backend, error))

    def start(self) -> "Requests":
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> list[Request]:
        self.stop_ev.set()
        for t in self.threads:
            t.join(self.timeout + 5)
        return list(self.done)

    def failed(self, after: float = 0.0) -> list[Request]:
        return [r for r in self.done if r.error and r.t0 >= after]
