"""The health checker's own faults, against servers on loopback (ephemeral ports): its
scheduling when a check fails inside connect, reading an answer that ends at once, and
running out of descriptors (an error of the checker, not a verdict on the backend)."""

from __future__ import annotations

import asyncio
import os
import random
import resource
import socket
import threading

import pytest

from lb import health
from lb import scheduler

from healthserver import read_request

# connect() to the limited broadcast address fails at once with ENETUNREACH
INSTANT_FAIL = "255.255.255.255"


class Server:
    """A loopback TCP listener served by a thread: each connection gets `answer(conn)`."""

    def __init__(self, answer):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self.answer(conn)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(2)


def status_then_close(conn: socket.socket) -> None:
    """A status line without its newline, and the FIN in the same segment (corked), so
    the checker sees one edge for both."""
    read_request(conn)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    conn.sendall(b"HTTP/1.1 200")


@pytest.fixture
def accepting():
    srv = Server(lambda conn: None)
    yield srv
    srv.close()


def test_instant_connect_failure_does_not_delay_other_checks(accepting):
    """A check failing inside connect plans its next run at once; the checks due before
    that run still start when they are due: every other probe's first result comes
    before the failing probe's second."""
    order: list[tuple[str, bool]] = []

    async def main():
        bad = health.Probe("tcp", INSTANT_FAIL, 80, 0.5)
        good = {health.Probe("tcp", "127.0.0.1", accepting.port, 0.5 + i / 100): f"good{i}"
                for i in range(5)}
        names = {bad: "bad", **good}
        s = scheduler.Scheduler(lambda p, r: order.append((names[p], r.ok)))
        # the failing probe first (now), the others 90% into the first-check window
        firsts = iter([0.0] + [0.9] * len(good))
        s._rand = lambda: next(firsts, None) or random.random()
        s.configure({bad: 1.0, **{p: 1.0 for p in good}})
        while sum(1 for n, _ in order if n == "bad") < 2:
            await asyncio.sleep(0.02)
        s.stop()
    asyncio.run(main())
    second_bad = [i for i, (n, _) in enumerate(order) if n == "bad"][1]
    firsts = {n for n, _ in order[:second_bad] if n != "bad"}
    assert firsts == {f"good{i}" for i in range(5)}, order
    assert ("bad", False) in order and all(ok for n, ok in order if n != "bad")


def test_http_status_line_then_close_in_one_edge():
    """The answer and the end of the connection in one event: read to EAGAIN, so the
    status is seen (it used to wait for an edge that never came, and time out)."""
    srv = Server(status_then_close)
    try:
        p = health.Probe("http", "127.0.0.1", srv.port, 1.0)
        results = [asyncio.run(health.run_probe(p)) for _ in range(5)]
    finally:
        srv.close()
    assert [(r.ok, r.reason) for r in results] == [(True, "http status 200")] * 5


def test_descriptor_shortage_is_a_fault_of_the_checker_not_a_verdict(accepting):
    """Out of descriptors (EMFILE), no check can run: nothing is reported about the
    backend, the fault is reported once, and once when it is over."""
    results: list = []
    faults: list = []

    async def main() -> int:
        p = health.Probe("tcp", "127.0.0.1", accepting.port, 0.5)
        s = scheduler.Scheduler(lambda p, r: results.append(r), on_fault=faults.append)
        s.configure({p: 0.05})  # the checker's own descriptors exist from here
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        hog: list[int] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (len(os.listdir("/proc/self/fd")) + 8, hard))
            try:
                while True:
                    hog.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            while not faults:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # several checks' worth
            during = len(results)
        finally:
            for fd in hog:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        while faults[-1] is not None or not results:
            await asyncio.sleep(0.02)
        s.stop()
        return during
    during = asyncio.run(main())
    assert during == 0
    assert faults == ["checker: too many open files", None]
    assert results and all(r.ok for r in results)
