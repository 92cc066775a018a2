"""Health checks in the daemon's asyncio loop (no thread per backend).

A probe is identified by what it checks (type, address, port, path, status, timeout), so a
backend serving several VIPs with the same check is probed once per interval. Each
VIP/backend pair keeps its own rise/fall counters (`Verdict`): it starts down (never
checked = no traffic), goes up after `rise` consecutive successes and down after `fall`
consecutive failures.

Probes go to the backend's own address, never the VIP:
  tcp   a connect that completes within the timeout;
  http  GET path (HTTP/1.0, Connection: close) on the health port; the status code must
        equal expect_status; at most READ_CAP bytes of the answer are read (the status
        line), redirects are not followed (a 301 is just a status that is not expected).

Cost. 1,000 checks a second must take well under a tenth of a core, which rules out a
task, a stream and a few futures per check (asyncio.open_connection: ~200 us of CPU per
check here). `Checker` keeps its sockets in an epoll set of its own, registered in the
loop as one reader (edge-triggered, one epoll_ctl per socket), so one wake-up serves every
ready socket; `Scheduler` keeps due checks in a heap behind one timer and starts those due
within a few milliseconds of each other together. Sockets close with an RST (SO_LINGER
0): a thousand checks a second leave no TIME_WAIT sockets behind on either side.
bench/health.py measures it (python -m bench health).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import heapq
import os
import random
import resource
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

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


@dataclass
class Verdict:
    """Health of one VIP/backend pair."""

    rise: int
    fall: int
    up: bool = False
    checked: bool = False
    ok_run: int = 0
    fail_run: int = 0
    checks: int = 0          # results recorded
    transitions: int = 0
    last: Optional[ProbeResult] = None

    def record(self, r: ProbeResult) -> Optional[tuple[bool, bool]]:
        """Count a result; returns (was_up, is_up) when the state flips."""
        self.last, self.checked = r, True
        self.checks += 1
        if r.ok:
            self.ok_run, self.fail_run = self.ok_run + 1, 0
            if not self.up and self.ok_run >= self.rise:
                self.up = True
                self.transitions += 1
                return False, True
        else:
            self.fail_run, self.ok_run = self.fail_run + 1, 0
            if self.up and self.fail_run >= self.fall:
                self.up = False
                self.transitions += 1
                return True, False
        return None

    @property
    def run(self) -> int:
        """Consecutive results of the current kind (successes or failures)."""
        return self.ok_run or self.fail_run


Callback = Callable[[Probe, ProbeResult], Optional[Awaitable[None]]]
ErrorCallback = Callable[[Probe, BaseException], None]
FaultCallback = Callable[[Optional[str]], None]


def ensure_fd_budget(n: int) -> None:
    """Raise the soft open-files limit so n probes in flight (plus the daemon's own maps
    and sockets) cannot run out of descriptors under a 1024 default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 1024
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class Scheduler:
    """Runs every distinct probe at its interval, each interval jittered by up to `jitter`
    (10%) either way, the first check of a new probe within `jitter` x interval.

    One loop timer serves a heap of due checks; checks due within a batch window of each
    other start together (at most BATCH_S early, and never more than a quarter of the
    smallest jitter): their sockets then become ready together and one wake-up of the
    loop serves several (a third less CPU at 1,000 checks/s). A probe's next check
    is planned when its current one ends, so a probe never overlaps itself.

    probes_run counts checks; lag_max is the largest delay (seconds) between when a check
    was due and when it started (an overloaded loop shows here); errors counts callbacks
    that raised (the checks go on)."""

    BATCH_S = 0.02

    def __init__(self, on_result: Callback, jitter: float = 0.1,
                 on_error: Optional[ErrorCallback] = None,
                 on_fault: Optional[FaultCallback] = None):
        self.on_result = on_result
        self.on_error = on_error
        # on_fault(reason) when checks stop being possible (ProbeResult.fault: such a
        # result is not passed on), on_fault(None) when they are again
        self.on_fault = on_fault
        self.fault: Optional[str] = None
        self.jitter = jitter
        self.intervals: dict[Probe, float] = {}
        self.lag_max = 0.0
        self.probes_run = 0
        self.errors = 0
        self.in_flight = 0
        self._token: dict[Probe, int] = {}  # current generation of each wanted probe
        self._due: list[tuple[float, int, Probe]] = []  # (due, token, probe)
        self._next_token = 0
        self._checker: Optional[Checker] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = 0.0
        self._tasks: set = set()
        self._batch = self.BATCH_S
        self._rand = random.random

    def configure(self, wanted: dict[Probe, float]) -> None:
        """wanted: probe -> interval (the smallest interval of the VIPs using it). Probes
        no longer wanted stop (a check in flight ends unreported). A probe whose interval
        changed starts over like a new one (its first check within jitter x interval),
        so a shorter interval does not wait out the longer one."""
        loop = asyncio.get_running_loop()
        if self._checker is None:
            self._checker = Checker(loop)
        for p in [p for p in self.intervals if p not in wanted]:
            del self.intervals[p]
            del self._token[p]
        ensure_fd_budget(len(wanted))
        now = loop.time()
        for p, interval in wanted.items():
            if interval <= 0:
                raise ValueError(f"interval of {p} must be positive")
            old = self.intervals.get(p)
            self.intervals[p] = interval
            if p not in self._token or old != interval:
                self._next_token += 1
                self._token[p] = self._next_token
                self._push(now + self._rand() * interval * self.jitter, p)
        if self.intervals:
            self._batch = min(self.BATCH_S, min(self.intervals.values()) * self.jitter / 4)

    def interval_after(self, interval: float) -> float:
        """Time from one check's due time to the next one's: interval +- jitter."""
        return interval * (1.0 + self.jitter * (2.0 * self._rand() - 1.0))

    def _push(self, due: float, p: Probe) -> None:
        heapq.heappush(self._due, (due, self._token[p], p))
        if self._timer is None or due < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due
            self._timer = self._checker.loop.call_at(due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        loop = self._checker.loop
        now = loop.time()
        due = self._due
        started = []
        horizon = now + self._batch
        while due and due[0][0] <= horizon:
            when, token, p = heapq.heappop(due)
            if self._token.get(p) != token:
                continue  # removed (or removed and added again) since
            lag = now - when
            if lag > self.lag_max:
                self.lag_max = lag
            started.append((when, token, p))
        for when, token, p in started:
            self.in_flight += 1
            self._checker.start(p, lambda r, w=when, t=token, p=p: self._done(p, t, w, r))
        while due and self._token.get(due[0][2]) != due[0][1]:
            heapq.heappop(due)
        # a check that failed at once (inside connect) planned its next run already and
        # may have armed the timer for it: the heap's head decides, not that check
        if due and (self._timer is None or due[0][0] < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = due[0][0]
            self._timer = loop.call_at(self._timer_at, self._tick)

    def _done(self, p: Probe, token: int, when: float, r: ProbeResult) -> None:
        self.in_flight -= 1
        if self._token.get(p) != token:
            return  # no longer wanted
        self.probes_run += 1
        if r.fault != (self.fault is not None):
            self.fault = r.reason if r.fault else None
            if self.on_fault is not None:
                try:
                    self.on_fault(self.fault)
                except Exception as e:  # the checks must go on
                    self._failed(p, e)
        try:
            res = None if r.fault else self.on_result(p, r)
            if asyncio.iscoroutine(res):
                t = self._checker.loop.create_task(res)
                self._tasks.add(t)
                t.add_done_callback(self._task_done(p))
        except Exception as e:  # the checks must go on
            self._failed(p, e)
        if self._token.get(p) != token:
            return  # the callback reconfigured
        nxt = when + self.interval_after(self.intervals[p])
        now = self._checker.loop.time()
        if nxt < now:  # this check overran the interval (a slow loop): next one now
            self.lag_max = max(self.lag_max, now - nxt)
            nxt = now
        self._push(nxt, p)

    def _task_done(self, p: Probe):
        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._failed(p, t.exception())
        return done

    def _failed(self, p: Probe, e: BaseException) -> None:
        self.errors += 1
        if self.on_error is not None:
            try:
                self.on_error(p, e)
            except Exception:
                pass

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.intervals.clear()
        self._token.clear()
        self._due.clear()
        for t in self._tasks:
            t.cancel()
        if self._checker is not None:
            self._checker.close()
            self._checker = None
