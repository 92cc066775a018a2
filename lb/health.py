"""Health checks in the daemon's asyncio loop (no thread per backend).

A probe is identified by what it checks (type, address, port, path, status, timeout), so a
backend serving several VIPs with the same check is probed once per interval. What a
result means for a VIP/backend pair (`Verdict`, rise/fall) is kept in healthstate.py; when
checks run, in scheduler.py.

Probes go to the backend's own address, never the VIP:
  tcp   a connect that completes within the timeout;
  http  GET path (HTTP/1.0, Connection: close) on the health port; the status code must
        equal expect_status; at most READ_CAP bytes of the answer are read (the status
        line), redirects are not followed (a 301 is just a status that is not expected).

Cost. 1,000 checks a second must take well under a tenth of a core, which rules out a
task, a stream and a few futures per check (asyncio.open_connection: ~200 us of CPU per
check here). `Checker` keeps its sockets in an epoll set of its own, registered in the
loop as one reader (edge-triggered, one epoll_ctl per socket), so one wake-up serves every
ready socket (scheduler.Scheduler starts checks due close together at once). Sockets close with an RST (SO_LINGER
0): a thousand checks a second leave no TIME_WAIT sockets behind on either side.
bench/health.py measures it (python -m bench health).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import heapq
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

READ_CAP = 4096  # bytes of an HTTP response we read at most
_LINGER_RST = struct.pack("ii", 1, 0)
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


@dataclass(frozen=True)
class Probe:
    type: str            # tcp | http
    address: str
    port: int
    timeout: float
    path: str = "/"
    expect_status: int = 200

    def __post_init__(self) -> None:
        if self.type not in ("tcp", "http"):
            raise ValueError(f"unknown health check type {self.type!r}")
        if self.type == "tcp":  # path and status mean nothing to a tcp check: one probe
            object.__setattr__(self, "path", "/")
            object.__setattr__(self, "expect_status", 200)
        object.__setattr__(self, "_hash", hash((self.type, self.address, self.port,
                                                self.timeout, self.path,
                                                self.expect_status)))
        object.__setattr__(self, "_request", self._make_request())
        object.__setattr__(self, "family",
                           socket.AF_INET6 if ":" in self.address else socket.AF_INET)
        object.__setattr__(self, "sockaddr", (self.address, self.port))

    def __hash__(self) -> int:  # probes key several dicts per check: hash once
        return self._hash

    def request(self) -> bytes:
        return self._request

    def _make_request(self) -> bytes:
        host = f"[{self.address}]" if ":" in self.address else self.address
        if self.port != 80:
            host = f"{host}:{self.port}"
        return (f"GET {self.path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: xdplb-health\r\n"
                f"Connection: close\r\n\r\n").encode()


@dataclass(slots=True)
class ProbeResult:
    ok: bool
    reason: str          # e.g. "http status 500", "connect timeout after 1.0s"
    latency_s: float
    at: float = field(default_factory=time.time)
    fault: bool = False  # the checker could not check (e.g. EMFILE): no verdict at all


# this host, not the backend, is short of something: a fault of the checker
_LOCAL_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


def _local_fault(err: int, t0: float) -> ProbeResult:
    return ProbeResult(False, f"checker: {os.strerror(err).lower()}",
                       time.perf_counter() - t0, fault=True)


def _status(buf: bytes, eof: bool) -> tuple[Optional[int], str]:
    """(status, "") from the start of an HTTP response, or (None, why not)."""
    if not buf:
        return None, "http: connection closed without a response"
    line = buf.split(b"\n", 1)[0]
    if b"\n" not in buf and not eof:
        return None, f"http: no status line in the first {READ_CAP} bytes"
    parts = line.decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (
            len(parts[1]) == 3 and parts[1].isdigit()):
        return None, "http: malformed status line"
    return int(parts[1]), ""


def _os_reason(stage: str, err: int) -> str:
    if err == errno.ECONNREFUSED:
        return "connection refused"
    if err in (errno.ECONNRESET, errno.EPIPE):
        return f"connection reset during {stage}"
    what = os.strerror(err) if err else "error"
    return f"{stage}: {what[:1].lower()}{what[1:]}"


_CONNECT, _RESPONSE = "connect", "http response"
# one edge-triggered registration per socket for its whole life: EPOLLOUT once the
# connect completes, EPOLLIN when (more of) the answer arrives; no epoll_ctl in between
_EVENTS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_BAD = select.EPOLLERR | select.EPOLLHUP


class _Flight:
    """One check in progress."""

    __slots__ = ("probe", "sock", "fd", "stage", "t0", "deadline", "buf", "done", "seq")

    def __init__(self, probe: Probe, sock: socket.socket, t0: float, deadline: float,
                 done: Callable[[ProbeResult], None], seq: int):
        self.probe, self.sock, self.fd = probe, sock, sock.fileno()
        self.stage, self.t0, self.deadline = _CONNECT, t0, deadline
        self.buf, self.done, self.seq = b"", done, seq


class Checker:
    """Runs checks in the asyncio loop with one epoll set of its own, registered in the
    loop as a single reader: a wake-up serves every socket that is ready, with no future,
    task or selector key per socket (a check costs a few syscalls and little Python).
    Timeouts are a heap served by one loop timer."""

    def __init__(self, loop: Optional[asyncio.AbstractEventLoop] = None):
        self.loop = loop or asyncio.get_running_loop()
        self.ep = select.epoll()
        self.flights: dict[int, _Flight] = {}
        self.deadlines: list[tuple[float, int, int]] = []  # (deadline, seq, fd)
        self._seq = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = 0.0
        self.loop.add_reader(self.ep.fileno(), self._ready)

    def close(self) -> None:
        if self.ep.closed:
            return
        self.loop.remove_reader(self.ep.fileno())
        if self._timer:
            self._timer.cancel()
        for f in list(self.flights.values()):
            f.sock.close()
        self.flights.clear()
        self.ep.close()

    # --- start -----------------------------------------------------------------------
    def start(self, p: Probe, done: Callable[[ProbeResult], None]) -> None:
        """Begin a check of p; done(result) is called exactly once, from the loop (or
        now, for a check that fails at once)."""
        t0 = time.perf_counter()
        try:
            # the C socket type: no Python-level __init__/close per check
            sock = _socket.socket(p.family, _STREAM_NONBLOCK)
        except OSError as e:
            done(_local_fault(e.errno, t0) if e.errno in _LOCAL_ERRNOS else
                 ProbeResult(False, _os_reason(_CONNECT, e.errno or 0), 0.0))
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            err = sock.connect_ex(p.sockaddr)
            if err in (0, errno.EINPROGRESS, errno.EAGAIN):
                self.ep.register(sock.fileno(), _EVENTS)
        except (OSError, ValueError, OverflowError) as e:
            sock.close()
            if isinstance(e, OSError) and e.errno in _LOCAL_ERRNOS:
                done(_local_fault(e.errno, t0))
                return
            reason = (_os_reason(_CONNECT, e.errno or 0) if isinstance(e, OSError)
                      else f"connect: {e}")
            done(ProbeResult(False, reason, time.perf_counter() - t0))
            return
        if err in _LOCAL_ERRNOS:
            sock.close()
            done(_local_fault(err, t0))
            return
        self._seq += 1
        f = _Flight(p, sock, t0, self.loop.time() + p.timeout, done, self._seq)
        if err in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.flights[f.fd] = f
            if err == 0:
                self._connected(f)
        else:
            self._finish(f, False, _os_reason(_CONNECT, err), registered=False)
            return
        if f.fd in self.flights:
            heapq.heappush(self.deadlines, (f.deadline, f.seq, f.fd))
            self._arm(f.deadline)

    # --- progress --------------------------------------------------------------------
    def _ready(self) -> None:
        for fd, ev in self.ep.poll(0, 256):
            f = self.flights.get(fd)
            if f is None:
                continue
            try:
                if f.stage is _CONNECT:
                    if ev & _BAD:
                        err = f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        self._finish(f, False, _os_reason(_CONNECT, err or errno.ECONNRESET))
                    elif ev & select.EPOLLOUT:
                        self._connected(f)
                elif ev & (select.EPOLLIN | select.EPOLLRDHUP | _BAD):
                    self._read(f)
            except OSError as e:
                self._finish(f, False, _os_reason(f.stage, e.errno or 0))
            except Exception as e:  # a bug here must not stop the checks
                self._finish(f, False, f"probe error: {type(e).__name__}: {e}")

    def _connected(self, f: _Flight) -> None:
        p = f.probe
        if p.type == "tcp":
            self._finish(f, True, "connected")
            return
        f.stage = _RESPONSE
        req = p.request()
        if f.sock.send(req) != len(req):  # a fresh socket takes a few hundred bytes
            self._finish(f, False, "http: request not sent at once")

    def _read(self, f: _Flight) -> None:
        # edge-triggered: one event may stand for data and the peer's FIN together, so
        # read until the kernel has nothing more (EAGAIN), the end, or enough
        while True:
            try:
                chunk = f.sock.recv(READ_CAP - len(f.buf))
            except BlockingIOError:
                return  # the status line is not complete yet: the next edge brings more
            eof = not chunk
            f.buf += chunk
            if eof or b"\n" in f.buf or len(f.buf) >= READ_CAP:
                break
        status, why = _status(f.buf, eof)
        if status is None:
            self._finish(f, False, why)
        else:
            self._finish(f, status == f.probe.expect_status, f"http status {status}")

    def _finish(self, f: _Flight, ok: bool, reason: str, registered: bool = True) -> None:
        done, f.done = f.done, None
        if done is None:
            return  # finished already
        r = ProbeResult(ok, reason, time.perf_counter() - f.t0)
        if registered and self.flights.get(f.fd) is f:
            del self.flights[f.fd]
        f.sock.close()  # leaves the epoll set with its last descriptor: no epoll_ctl
        done(r)

    # --- timeouts --------------------------------------------------------------------
    def _arm(self, when: float) -> None:
        if self._timer is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time()
        dl = self.deadlines
        while dl and dl[0][0] <= now:
            _, seq, fd = heapq.heappop(dl)
            f = self.flights.get(fd)
            if f is not None and f.seq == seq:
                self._finish(f, False, f"{f.stage} timeout after {float(f.probe.timeout)}s")
        while dl and (dl[0][2] not in self.flights or self.flights[dl[0][2]].seq != dl[0][1]):
            heapq.heappop(dl)  # finished before their deadline
        if dl:
            self._arm(dl[0][0])


async def run_probe(p: Probe) -> ProbeResult:
    """One check, outside any Scheduler (the same code path). Never raises."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()
    checker = Checker(loop)
    try:
        checker.start(p, lambda r: fut.done() or fut.set_result(r))
        return await fut
    finally:
        checker.close()
