"""Client traffic for the lab tests, sent from the lab's client namespace: short requests
(HTTP GETs, UDP echoes) each from a source port of its own, paced load in threads,
bursts, long-lived line-echo connections that check their backend never changes, a
capture of what the LB puts on the wire, and per-port probes.

The lab given to the request helpers hands out source ports (`port(key)`), makes client
sockets (`sock(family, type)`) and names the client's address (`src(family)`): see
e2e_setup.E2ELab. No source port is used twice: a new 5-tuple has no connection-table
entry, so the Maglev ring alone decides where it goes.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from lb.lab import namespaces, topology
from lb.lab.fleetload import read_line

if TYPE_CHECKING:
    from e2e_setup import E2ELab

VIP4, VIP6 = topology.VIP4, topology.VIP6
PORT_LO, PORT_HI = 1025, 60999          # client source ports we pick ourselves
DIST_N = 3000                           # new connections per VIP for the distribution
# The distribution of each setup uses a fixed block of source ports (ports PORT_LO +
# DIST_N * DIST_BLOCK[encap] on): its sample of 5-tuples, hence its outcome, is the same
# on every run. Every other request takes the next port above both blocks.
DIST_BLOCK = {"ipip": 0, "gue": 1}
DYN_LO = PORT_LO + DIST_N * len(DIST_BLOCK)
WAIT = 20.0                             # upper bound of every wait; never reached when well
# short-request kinds: the VIP each goes to
KINDS = {"http4": "web", "http6": "web6", "udp4": "echo", "udp6": "echo6"}


# --- clients -----------------------------------------------------------------------------

@dataclass
class Rec:
    kind: str
    sport: int
    t0: float
    t1: float
    backend: Optional[str]
    error: Optional[str]


def one_request(lab: E2ELab, kind: str, sport: Optional[int] = None) -> Rec:
    """One short request from a source port of its own: an HTTP GET on a new TCP
    connection, or one UDP datagram and its echo."""
    fam = 6 if kind.endswith("6") else 4
    tcp = kind.startswith("http")
    sport = sport or lab.port((kind, fam))
    vip = VIP6 if fam == 6 else VIP4
    t0 = time.monotonic()
    backend = error = None
    s = lab.sock(fam, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((lab.src(fam), sport))
        s.settimeout(3 if tcp else 1)
        if tcp:
            s.connect((vip, topology.HTTP_PORT))
            s.sendall(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise OSError(f"bad answer {data[:80]!r}")
            backend = body.strip().decode()
        else:
            payload = f"ping {sport}".encode()
            s.connect((vip, topology.UDP_PORT))
            s.send(payload)
            data = s.recv(2048)
            name, _, rest = data.partition(b" ")
            if rest != payload:
                raise OSError(f"bad echo {data[:80]!r}")
            backend = name.decode()
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        s.close()
    return Rec(kind, sport, t0, time.monotonic(), backend, error)


class Load:
    """Short requests of the given kinds, one thread per kind, paced, until stopped."""

    def __init__(self, lab: E2ELab, kinds=tuple(KINDS), period: float = 0.004):
        self.lab, self.kinds, self.period = lab, kinds, period
        self.recs: list[Rec] = []
        self.done_t0 = {k: 0.0 for k in kinds}  # t0 of each worker's last finished request
        self.count = {k: 0 for k in kinds}
        self.stop_ev = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in kinds]

    def _run(self, kind: str) -> None:
        try:
            nxt = time.monotonic()
            while not self.stop_ev.is_set():
                r = one_request(self.lab, kind)
                self.recs.append(r)
                self.done_t0[kind] = r.t0
                self.count[kind] += 1
                nxt += self.period
                delay = nxt - time.monotonic()
                if delay > 0:
                    self.stop_ev.wait(delay)
                else:
                    nxt = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.errors.append(e)

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def _wait(self, cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, f"load: timed out waiting for {what}"
            time.sleep(0.005)

    def barrier(self) -> float:
        """Return once every request started before now has finished (each worker has
        finished one started later); returns that 'now'."""
        t = time.monotonic()
        self._wait(lambda: all(v > t for v in self.done_t0.values()), "a barrier")
        return t

    def more(self, n: int) -> None:
        """Wait until every worker has finished n more requests."""
        goal = {k: c + n for k, c in self.count.items()}
        self._wait(lambda: all(self.count[k] >= goal[k] for k in self.kinds),
                   f"{n} more requests")

    def stop(self) -> list[Rec]:
        self.stop_ev.set()
        for t in self.threads:
            t.join(WAIT)
        assert not self.errors, self.errors
        return list(self.recs)


def burst(lab: E2ELab, kinds, n: int, first_port: int) -> dict[str, list[Rec]]:
    """n requests of each kind from source ports first_port.., the kinds in parallel,
    as fast as they go."""
    out: dict[str, list[Rec]] = {k: [] for k in kinds}
    assert first_port + n <= DYN_LO

    def run(kind):
        out[kind] = [one_request(lab, kind, p) for p in range(first_port, first_port + n)]
    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(len(v) == n for v in out.values()), "a burst thread died"
    return out


@dataclass
class Conn:
    family: int
    sport: int
    sock: socket.socket
    backend: str
    oks: list = field(default_factory=list)   # monotonic times of good echoes
    error: Optional[str] = None
    error_at: float = 0.0
    buf: bytes = b""

    def ok_after(self, t: float) -> int:
        return sum(1 for x in self.oks if x > t)


class LongConns:
    """Long-lived TCP connections to the line-echo VIPs; one thread keeps sending a line
    on each and checks its echo comes from the backend the connection started on."""

    def __init__(self, lab: E2ELab):
        self.lab = lab
        self.conns: list[Conn] = []
        self.rounds = 0
        self.round_t0 = 0.0
        self.stop_ev = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def open_one(self, family: int) -> Conn:
        sport = self.lab.port(("long", family))
        s = self.lab.sock(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.lab.src(family), sport))
        s.settimeout(3)
        s.connect((VIP6 if family == 6 else VIP4, topology.ECHO_PORT))
        s.sendall(b"hello\n")
        c = Conn(family, sport, s, "")
        name, _, rest = read_line(c).partition(b" ")
        assert rest == b"hello", rest
        c.backend = name.decode()
        c.oks.append(time.monotonic())
        self.conns.append(c)
        return c

    def open(self, per_family: int, need: Optional[str] = None, need_n: int = 0
             ) -> "LongConns":
        """per_family connections per family; with `need`, keep opening until need_n of
        each family are on that backend (the others beyond per_family are closed)."""
        for fam in (4, 6):
            mine = [self.open_one(fam) for _ in range(per_family)]
            tries = 0
            while need and sum(c.backend == need for c in mine) < need_n:
                c = self.open_one(fam)
                tries += 1
                assert tries < 200, f"no connection lands on {need}"
                if c.backend != need:
                    self.conns.remove(c)
                    c.sock.close()
                else:
                    mine.append(c)
        return self

    def _run(self) -> None:
        try:
            seq = itertools.count()
            while not self.stop_ev.is_set():
                t0 = time.monotonic()
                for c in self.conns:
                    if c.error:
                        continue
                    msg = f"{next(seq)}\n".encode()
                    try:
                        c.sock.sendall(msg)
                        line = read_line(c) + b"\n"
                        if line != c.backend.encode() + b" " + msg:
                            raise OSError(f"echo {line!r} on a connection to {c.backend}")
                        c.oks.append(time.monotonic())
                    except OSError as e:
                        c.error, c.error_at = f"{type(e).__name__}: {e}", time.monotonic()
                self.round_t0, self.rounds = t0, self.rounds + 1
                self.stop_ev.wait(0.01)
        except BaseException as e:  # noqa: BLE001
            self.errors.append(e)

    def start(self) -> "LongConns":
        self.thread.start()
        return self

    def barrier(self) -> float:
        t = time.monotonic()
        deadline = t + WAIT
        while self.round_t0 <= t:
            assert not self.errors, self.errors
            assert time.monotonic() < deadline, "long-lived connections: no round"
            time.sleep(0.005)
        return t

    def stop(self) -> list[Conn]:
        self.stop_ev.set()
        self.thread.join(WAIT)
        assert not self.errors, self.errors
        for c in self.conns:
            c.sock.close()
        return self.conns


def failures(recs: list[Rec]) -> list[Rec]:
    return [r for r in recs if r.error]


def by_backend(recs) -> collections.Counter:
    return collections.Counter(r.backend for r in recs if r.backend)


# --- capture: what the LB puts on the wire -------------------------------------------------

class Capture:
    """Frames leaving the switch towards a backend (AF_PACKET on the switch port),
    classified by their outer encapsulation."""

    ETH_P_ALL = 0x0003
    PACKET_OUTGOING = 4

    def __init__(self, ns: str, ifname: str):
        with namespaces.entered(ns):
            self.s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                   socket.htons(self.ETH_P_ALL))
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.s.bind((ifname, self.ETH_P_ALL))
        self.s.setblocking(False)

    def collect(self) -> collections.Counter:
        kinds: collections.Counter = collections.Counter()
        while True:
            try:
                frame, addr = self.s.recvfrom(256)
            except BlockingIOError:
                break
            if addr[2] != self.PACKET_OUTGOING:
                continue
            src, etype = frame[6:12], struct.unpack("!H", frame[12:14])[0]
            if etype == 0x0800:
                proto, l4 = frame[23], frame[14 + (frame[14] & 0xF) * 4:]
                name = {4: "ipip", 41: "6in4"}.get(proto)
            elif etype == 0x86DD:
                proto, l4 = frame[20], frame[54:]
                name = {41: "ip6ip6", 4: "4in6"}.get(proto)
            else:
                continue
            if proto == socket.IPPROTO_UDP and len(l4) >= 4 and \
                    struct.unpack("!H", l4[2:4])[0] == topology.GUE_PORT:
                name = "gue6" if etype == 0x86DD else "gue4"
            if name:
                kinds[(name, src)] += 1
        self.s.close()
        return kinds


# --- per-port probes -------------------------------------------------------------------

def udp_from_ports(lab, ports, host: str = VIP4,
                   cpu: Optional[int] = None) -> dict[int, Optional[str]]:
    """One datagram to the UDP echo on `host` from each client source port: who
    answered (None: nobody). With `cpu`, the client runs on that CPU only, and so does
    the data path for its packets (veth receive runs on the sender's CPU)."""
    def work(ports, client, host):
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        out = {}
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        for p in ports:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.bind((client, p))
                s.settimeout(1)
                s.sendto(b"x", (host, topology.UDP_PORT))
                try:
                    out[p] = s.recvfrom(100)[0].split()[0].decode()
                except OSError:
                    out[p] = None
        return out
    h = lab.hosts()["client"]
    return namespaces.run_in(lab.client, work, list(ports), h.v6 if ":" in host else h.v4, host,
                        timeout=60)


def tcp_connects(lab, host: str, port: int, n: int) -> int:
    """How many of n TCP connects from the client to host:port succeed."""
    def work(host, port, n):
        ok = 0
        for _ in range(n):
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.settimeout(0.5)
                try:
                    s.connect((host, port))
                    ok += 1
                except OSError:
                    pass
        return ok
    return namespaces.run_in(lab.client, work, host, port, n, timeout=60)
