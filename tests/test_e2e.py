"""End to end: the real daemon (`python -m lb.cli --config ...`) in labs this file builds
(lb/lab/topology.py), real clients in the client namespace, real backends (lb/lab/server.py)
answering straight to the client (DSR).

Four setups, each a daemon of its own: the lab's "tx" variant (one interface, XDP_TX)
and its "redirect" variant (lb0 in, lb1 out, XDP_REDIRECT), each with IPIP and with GUE
encapsulation. Every scenario runs IPv4 and IPv6 at once: HTTP over TCP (VIP port 80),
a UDP echo (5353) and long-lived TCP line-echo connections (7000).

Every client request uses a source port of its own, never reused while the lab lives:
a new 5-tuple has no connection-table entry, so the Maglev ring alone decides where it
goes, and a failed request can be traced to the backend the ring gave it (read from the
pinned maps with the data path's hash).
"""

from __future__ import annotations

import collections
import copy
import ctypes
import ipaddress
import itertools
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest

from lb import layout, maglev
from lb.lab import netns, topology
from lb.config import load_config
from lb.control import NoInstance, request
from lb.flowhash import flow_hash
from lb.native import Map, lib
from lb.specs import backend_key

VIP4, VIP6 = topology.VIP4, topology.VIP6
PREFIXES = {"tx": "xe-", "redirect": "xr-"}
SETUPS = [("tx", "ipip"), ("tx", "gue"), ("redirect", "ipip"), ("redirect", "gue")]
RING = 65537
INTERVAL, TIMEOUT, RISE, FALL = 0.25, 0.2, 2, 3
PORT_LO, PORT_HI = 1025, 60999          # client source ports we pick ourselves
DIST_N = 3000                           # new connections per VIP for the distribution
# The distribution of each setup uses a fixed block of source ports (ports PORT_LO +
# DIST_N * DIST_BLOCK[encap] on): its sample of 5-tuples, hence its outcome, is the same
# on every run. Every other request takes the next port above both blocks.
DIST_BLOCK = {"ipip": 0, "gue": 1}
DYN_LO = PORT_LO + DIST_N * len(DIST_BLOCK)
EPHEMERAL = "61000 65535"               # the client's own ephemeral range, apart from ours
SHARE_TOLERANCE = 0.10                  # relative: |observed / expected - 1|
RELOADS = 20
WAIT = 20.0                             # upper bound of every wait; never reached when well

# name: (family, port, protocol, weights of be1..be3). Unequal weights on three VIPs.
BASE_VIPS = {
    "web": (4, topology.HTTP_PORT, "tcp", (1, 2, 3)),
    "web6": (6, topology.HTTP_PORT, "tcp", (3, 1, 2)),
    "echo": (4, topology.UDP_PORT, "udp", (1, 1, 1)),
    "echo6": (6, topology.UDP_PORT, "udp", (1, 2, 1)),
    "long": (4, topology.ECHO_PORT, "tcp", (1, 1, 1)),
    "long6": (6, topology.ECHO_PORT, "tcp", (1, 1, 1)),
}
# short-request kinds: the VIP each goes to
KINDS = {"http4": "web", "http6": "web6", "udp4": "echo", "udp6": "echo6"}


def report(line: str) -> None:
    """What a scenario measured (shown with pytest -s)."""
    print(line)


# --- labs --------------------------------------------------------------------------------

class E2ELab(topology.Lab):
    """A lab plus the bookkeeping of this file: source ports handed out, in namespaces."""

    def __init__(self, variant: str):
        super().__init__(prefix=PREFIXES[variant], variant=variant)
        self._ports: dict = {}
        self._lock = threading.Lock()

    def up(self) -> "E2ELab":
        super().up()
        netns.Netns(self.client, create=False, owned=False).sysctl(
            "net.ipv4.ip_local_port_range", EPHEMERAL)
        return self

    def port(self, key) -> int:
        with self._lock:
            p = self._ports.get(key, DYN_LO)
            assert p <= PORT_HI, f"lab {self.prefix}: out of client source ports for {key}"
            self._ports[key] = p + 1
            return p

    def sock(self, family: int, kind: int) -> socket.socket:
        with netns.entered(self.client):
            return socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, kind)

    def src(self, family: int) -> str:
        h = self.hosts()["client"]
        return h.v6 if family == 6 else h.v4

    def addr(self, i: int, family: int) -> str:
        h = self.hosts()[self.backends[i - 1]]
        return h.v6 if family == 6 else h.v4


@pytest.fixture(scope="module")
def labs():
    made: dict[str, E2ELab] = {}

    def get(variant: str) -> E2ELab:
        if variant not in made:
            made[variant] = E2ELab(variant)
            made[variant].up()
        return made[variant]
    try:
        yield get
    finally:
        for lab in made.values():
            lab.down()


# --- config ------------------------------------------------------------------------------

def base_conf(encap: str) -> dict:
    return {"encap": encap, "interval": INTERVAL, "extra": "",
            "vips": {name: {"family": f, "port": port, "protocol": proto,
                            "backends": {i + 1: [w, "active"] for i, w in enumerate(ws)}}
                     for name, (f, port, proto, ws) in BASE_VIPS.items()}}


def render(setup: "Setup", conf: dict) -> str:
    """The lab config's interfaces, this file's everything else."""
    lab = setup.lab
    lb = load_config(topology.CONFIGS[lab.variant]).lb
    out = ["[lb]", f'interface = "{lb.interface}"']
    if lb.egress_interface:
        out.append(f'egress_interface = "{lb.egress_interface}"')
    out += [f'encap = "{conf["encap"]}"', f"gue_port = {topology.GUE_PORT}",
            f"ring_size = {RING}", "flow_table_size = 65536",
            f'bpf_pin_path = "{setup.pin}"', f'control_socket = "{setup.sock}"',
            f'state_file = "{setup.state}"', 'log_format = "json"', "",
            "[health]", 'type = "http"', 'path = "/healthz"',
            f"interval = {conf['interval']}", f"timeout = {TIMEOUT}", f"rise = {RISE}",
            f"fall = {FALL}"]
    for name, v in conf["vips"].items():
        out += ["", "[[vip]]", f'name = "{name}"',
                f'address = "{VIP6 if v["family"] == 6 else VIP4}"', f"port = {v['port']}",
                f'protocol = "{v["protocol"]}"']
        if v["port"] != topology.HTTP_PORT:
            out += ["[vip.health]", f"port = {topology.HTTP_PORT}"]
        for i, (w, state) in sorted(v["backends"].items()):
            out += ["[[vip.backend]]", f'address = "{lab.addr(i, v["family"])}"',
                    f"weight = {w}", f'state = "{state}"']
    return "\n".join(out) + "\n" + conf["extra"]


# --- the daemon --------------------------------------------------------------------------

def _rm_pins(pin: str) -> None:
    if os.path.isdir(pin):
        for name in os.listdir(pin):
            os.unlink(os.path.join(pin, name))
        os.rmdir(pin)


class Setup:
    """One daemon (variant x encap) and the config it runs."""

    def __init__(self, lab: E2ELab, encap: str, tmp):
        self.lab, self.encap = lab, encap
        self.id = f"{lab.variant}-{encap}"
        self.pin = f"/sys/fs/bpf/xdplb-e2e-{self.id}"
        self.sock = f"/run/xdplb/e2e-{self.id}.sock"
        self.state = f"/run/xdplb/e2e-{self.id}-state.json"
        self.cfgpath = str(tmp / f"{self.id}.toml")
        self.logpath = str(tmp / f"{self.id}.log")
        self.conf = base_conf(encap)
        self.procs: list[subprocess.Popen] = []
        self.proc: Optional[subprocess.Popen] = None
        self.events: list[dict] = []
        self._logf = None
        self._partial = b""

    # process
    def _clean(self) -> None:
        try:  # a daemon of an earlier, interrupted run of this file still serving
            pid = request(self.sock, {"cmd": "ping"}, timeout=2)["result"]["pid"]
            os.kill(pid, signal.SIGKILL)
        except (NoInstance, OSError, ValueError, KeyError):
            pass
        for f in (self.state, self.sock):
            if os.path.exists(f):
                os.unlink(f)
        _rm_pins(self.pin)

    def start(self, fresh: bool = True) -> dict:
        if fresh:
            self._clean()
            self.write(self.conf)
        n = len(self.read_events())
        log = open(self.logpath, "a")
        self.proc = self.lab.spawn_lb([sys.executable, "-m", "lb.cli", "--config",
                                       self.cfgpath], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(self.proc)
        ev = self.wait_event("datapath_attached", after=n)
        deadline = time.monotonic() + WAIT  # the control socket comes up right after
        while True:
            try:
                if request(self.sock, {"cmd": "ping"})["result"]["pid"] == self.proc.pid:
                    return ev
            except NoInstance:
                pass
            assert self.proc.poll() is None, f"daemon exited: {self.tail()}"
            assert time.monotonic() < deadline, f"no control socket: {self.tail()}"
            time.sleep(0.02)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        if self._logf:
            self._logf.close()
        self._clean()

    # log events (log_format json: one object per line)
    def read_events(self) -> list[dict]:
        if self._logf is None:
            if not os.path.exists(self.logpath):
                return self.events
            self._logf = open(self.logpath, "rb")
        self._partial += self._logf.read()
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                ev = {"event": "non-json", "line": line.decode(errors="replace")}
            self.events.append(ev if isinstance(ev, dict) else {"event": "non-json"})
        return self.events

    def wait_event(self, name, after: int, timeout: float = WAIT) -> dict:
        names = (name,) if isinstance(name, str) else name
        deadline = time.monotonic() + timeout
        while True:
            for e in self.read_events()[after:]:
                if e.get("event") in names:
                    return e
            assert self.proc.poll() is None, f"daemon exited: {self.tail()}"
            assert time.monotonic() < deadline, f"no {names} event in {timeout}s: {self.tail()}"
            time.sleep(0.02)

    def tail(self) -> str:
        with open(self.logpath) as f:
            return f.read()[-3000:]

    # config and control
    def write(self, conf: dict) -> None:
        tmp = self.cfgpath + ".new"
        with open(tmp, "w") as f:
            f.write(render(self, conf))
        os.replace(tmp, self.cfgpath)

    def hup(self, conf: Optional[dict] = None, broken: bool = False) -> dict:
        """Write conf (or a broken variant of the current one), SIGHUP, wait for the
        verdict; returns the config_reloaded / config_rejected event."""
        if broken:
            with open(self.cfgpath, "a") as f:
                f.write('\n[[vip]]\nname = 1\n')
        else:
            self.write(conf)
        n = len(self.read_events())
        self.proc.send_signal(signal.SIGHUP)
        ev = self.wait_event(("config_reloaded", "config_rejected"), after=n)
        if broken:
            assert ev["event"] == "config_rejected", ev
            self.write(self.conf)  # the file goes back to what runs
        else:
            assert ev["event"] == "config_reloaded", (ev, self.tail())
            self.conf = copy.deepcopy(conf)
        return ev

    def control(self, req: dict) -> dict:
        r = request(self.sock, req)
        assert r["ok"], r
        return r["result"]

    def stats(self) -> dict:
        return self.control({"cmd": "stats"})

    def states(self) -> dict[tuple[str, str], str]:
        return {(v["name"], b["address"]): b["state"] for v in self.stats()["vips"]
                for b in v["backends"]}

    def wait_states(self, want: Callable[[dict], bool], what: str,
                    timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.states()
            if want(st):
                return st
            assert self.proc.poll() is None, f"daemon exited: {self.tail()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {st}"
            time.sleep(0.02)

    def wait_all_active(self) -> None:
        """Every backend of the current config active in the stats, and the maps saying
        so too: every VIP's installed ring is the one its active backends make."""
        self.wait_states(lambda st: all(s == "active" for s in st.values()),
                         "every backend active")
        want = {v: self.expected_ring(v) for v in BASE_VIPS}
        deadline = time.monotonic() + WAIT
        while (got := {v: self.ring(v) for v in BASE_VIPS}) != want:
            assert self.proc.poll() is None, f"daemon exited: {self.tail()}"
            assert time.monotonic() < deadline, \
                f"rings never matched the config: {[v for v in want if want[v] != got[v]]}"
            time.sleep(0.02)

    def expected_ring(self, vip: str) -> list[str]:
        """The ring of a VIP when its backends are up (drained ones out), by the
        reference Maglev, as backend namespace names."""
        v = self.conf["vips"][vip]
        members = sorted(((ipaddress.ip_address(self.lab.addr(i, v["family"])), w, i)
                          for i, (w, st) in v["backends"].items() if st == "active" and w),
                         key=lambda m: backend_key(m[0]))
        ids = maglev.build([maglev.Slotholder(backend_key(a), w) for a, w, _ in members],
                           RING, [i for _, _, i in members])
        return [self.lab.backends[i - 1] for i in ids]

    def set_admin(self, action: str, backend: int, vips=tuple(BASE_VIPS)) -> None:
        for name in vips:
            fam = self.conf["vips"][name]["family"]
            self.control({"cmd": "backend", "action": action, "vip": name,
                          "backend": self.lab.addr(backend, fam)})

    def baseline(self) -> None:
        """Back to the start: daemon running, every server up, base config, all active."""
        if self.proc is None or self.proc.poll() is not None:
            self.start(fresh=False)
        for i, name in enumerate(self.lab.backends, start=1):
            if not os.path.exists(os.path.join(self.lab.piddir, f"{name}.pid")):
                self.lab.start_server(name)
        base = base_conf(self.encap)
        if self.conf != base:
            self.hup(base)
        for (vip, addr), s in self.states().items():
            if s in ("drain", "maint"):
                self.control({"cmd": "backend", "action": "activate", "vip": vip,
                              "backend": addr})
        self.wait_all_active()

    # the data path's choice, read from the pinned maps
    def ring(self, vip: str) -> list[str]:
        """The installed ring of a VIP, as backend namespace names per slot."""
        v = self.conf["vips"][vip]
        addr = ipaddress.ip_address(VIP6 if v["family"] == 6 else VIP4)
        proto = socket.IPPROTO_TCP if v["protocol"] == "tcp" else socket.IPPROTO_UDP
        for _ in range(10):  # a swap between the lookups frees the ring we found
            with Map.from_pin(f"{self.pin}/vips") as vips:
                meta = layout.VipMeta.unpack(vips.lookup(layout.vip_key(addr, v["port"], proto)))
            with Map.from_pin(f"{self.pin}/rings") as rings:
                inner_id = ctypes.c_uint32.from_buffer_copy(
                    rings.lookup(ctypes.c_uint32(meta.ring_id))).value
            fd = lib.bpf_map_get_fd_by_id(inner_id)
            if fd >= 0:
                break
        assert fd >= 0, f"ring map {inner_id} of {vip} is gone"
        with Map.from_fd(fd) as inner:
            m = inner.max_entries
            size = -(-8 * m // mmap.PAGESIZE) * mmap.PAGESIZE
            with mmap.mmap(inner.fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
                ids = struct.unpack(f"={2 * m}I", mm[: 8 * m])[0::2]
        assert m == meta.ring_size == RING
        names = self.lab.name_of()
        by_id = {}
        with Map.from_pin(f"{self.pin}/backends") as bes:
            for bid in set(ids):
                b = layout.Backend.unpack(bes.lookup(ctypes.c_uint32(bid)))
                by_id[bid] = names.get(str(layout.words_addr(b.addr, b.family)), f"#{bid}")
        return [by_id[i] for i in ids]

    def predict(self, ring: list[str], kind: str, sport: int) -> str:
        vip = self.conf["vips"][KINDS.get(kind, kind)]
        fam = vip["family"]
        proto = socket.IPPROTO_TCP if vip["protocol"] == "tcp" else socket.IPPROTO_UDP
        h = flow_hash(proto, ipaddress.ip_address(self.lab.src(fam)), sport,
                      ipaddress.ip_address(VIP6 if fam == 6 else VIP4), vip["port"])
        return ring[h % len(ring)]


@pytest.fixture(scope="module", params=SETUPS, ids=[f"{v}-{e}" for v, e in SETUPS])
def setup(request, labs, tmp_path_factory):
    variant, encap = request.param
    s = Setup(labs(variant), encap, tmp_path_factory.mktemp(f"e2e-{variant}-{encap}"))
    try:
        ev = s.start()
        assert ev["egress"] == ("lb1" if variant == "redirect" else "lb0"), ev
        s.wait_all_active()
        yield s
    finally:
        s.stop()


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
        name, _, rest = self._line(c).partition(b" ")
        assert rest == b"hello\n", rest
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

    @staticmethod
    def _line(c: Conn) -> bytes:
        while b"\n" not in c.buf:
            chunk = c.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed by the peer")
            c.buf += chunk
        line, _, c.buf = c.buf.partition(b"\n")
        return line + b"\n"

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
                        line = self._line(c)
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
        with netns.entered(ns):
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


# --- the tests ---------------------------------------------------------------------------

def test_lab_configs_match_labs():
    """config/lab.toml and config/lab-redirect.toml name the backends their lab builds."""
    for variant, path in topology.CONFIGS.items():
        cfg = load_config(path)
        lab = topology.Lab(variant=variant)
        want = {h.v4 for n, h in lab.hosts().items() if n in lab.backends} | \
               {h.v6 for n, h in lab.hosts().items() if n in lab.backends}
        got = {str(b.address) for v in cfg.vips for b in v.backends}
        assert got == want, (path, got ^ want)
        assert (cfg.lb.egress_interface == "lb1") == (variant == "redirect")
        assert cfg.lb.interface == "lb0"


def test_distribution(setup):
    """3,000 new connections (or datagrams) per VIP: each backend gets its weight's share
    within 10%, each exactly the backend the ring gives its 5-tuple; the encapsulation on
    the wire is the configured one, sent by XDP_TX or XDP_REDIRECT as configured."""
    s = setup
    s.baseline()
    lab = s.lab
    rings = {k: s.ring(v) for k, v in KINDS.items()}
    egress = "lb1" if lab.variant == "redirect" else "lb0"
    smac = netns.Netns(lab.lb, create=False, owned=False).mac(egress)
    caps = [Capture(lab.sw, f"sw-be{i}") for i in (1, 2, 3)]
    g0 = s.stats()["global"]
    recs = burst(lab, tuple(KINDS), DIST_N, PORT_LO + DIST_N * DIST_BLOCK[s.encap])
    g1 = s.stats()["global"]
    wire = collections.Counter()
    for c in caps:
        wire.update(c.collect())

    for kind, rs in recs.items():
        vip = s.conf["vips"][KINDS[kind]]
        assert not failures(rs), (kind, failures(rs)[:5])
        got = by_backend(rs)
        total_w = sum(w for w, _ in vip["backends"].values())
        shares = []
        for i, (w, _) in vip["backends"].items():
            name = lab.backends[i - 1]
            expected = DIST_N * w / total_w
            shares.append(f"{name[-3:]} w{w} {got[name]}/{expected:.0f}")
            assert abs(got[name] / expected - 1) <= SHARE_TOLERANCE, \
                (kind, name, got[name], expected, dict(got))
        predicted = [s.predict(rings[kind], kind, r.sport) for r in rs]
        wrong = [(r.sport, r.backend, p) for r, p in zip(rs, predicted) if r.backend != p]
        assert not wrong, (kind, len(wrong), wrong[:5])
        report(f"[{s.id}] distribution {kind:<5} {DIST_N} new, 0 failed: " + ", ".join(shares))

    want = {"ipip": {"ipip", "ip6ip6"}, "gue": {"gue4", "gue6"}}[s.encap]
    kinds_seen = {k for k, _ in wire}
    assert kinds_seen == want, wire
    assert {m for _, m in wire} == {smac}, (wire, smac)
    d = {k: g1[k] - g0[k] for k in ("tx", "redirect", "drop", "rx_packets")}
    if lab.variant == "redirect":
        assert d["tx"] == 0 and d["redirect"] >= 4 * DIST_N, d
    else:
        assert d["redirect"] == 0 and d["tx"] >= 4 * DIST_N, d
    assert d["drop"] == 0, (d, g1["drops"])
    report(f"[{s.id}] wire: {dict(collections.Counter(k for k, _ in wire.elements()))} "
           f"from {egress}; counters {d}")


def test_drain(setup):
    """A drained backend keeps its long-lived connections working and gets no new ones;
    activated again, it gets new ones."""
    s = setup
    s.baseline()
    lab = s.lab
    be1 = lab.backends[0]
    longs = LongConns(lab).open(4, need=be1, need_n=2).start()
    load = Load(lab).start()
    try:
        load.more(20)
        s.set_admin("drain", 1)
        st = s.states()
        assert all(st[(v, lab.addr(1, s.conf["vips"][v]["family"]))] == "drain"
                   for v in BASE_VIPS), st
        t = load.barrier()
        longs.barrier()
        load.more(150)
        t_end = longs.barrier()
        t_act = time.monotonic()
        s.set_admin("activate", 1)
        t_back = load.barrier()
        load.more(100)
    finally:
        recs = load.stop()
        conns = longs.stop()
    assert not failures(recs), failures(recs)[:5]
    during = [r for r in recs if t < r.t0 and r.t1 < t_act]
    assert len(during) >= 4 * 150
    assert by_backend(during)[be1] == 0, by_backend(during)
    assert not [c for c in conns if c.error], [(c.backend, c.error) for c in conns if c.error]
    on_be1 = [c for c in conns if c.backend == be1]
    assert len(on_be1) >= 4 and all(c.ok_after(t) >= 10 for c in on_be1), \
        [(c.sport, c.ok_after(t)) for c in on_be1]
    after = [r for r in recs if r.t0 > t_back]
    assert by_backend(after)[be1] > 0, by_backend(after)
    report(f"[{s.id}] drain: {len(recs)} requests, 0 failed; {len(during)} while be1 "
           f"drained, none to it; {len(on_be1)} long-lived connections on be1 kept "
           f"working ({min(c.ok_after(t) for c in on_be1)}+ echoes each while drained, "
           f"{t_end - t:.1f}s); be1 back: {by_backend(after)[be1]}/{len(after)} new")


def test_failover(setup):
    """Kill be2's server: after `fall` failed checks new connections avoid it; nothing
    that the ring gave another backend fails. Start it again: back after `rise` checks."""
    s = setup
    s.baseline()
    lab = s.lab
    be2 = lab.backends[1]
    rings = {k: s.ring(v) for k, v in KINDS.items()}
    longs = LongConns(lab).open(4, need=be2, need_n=1).start()
    load = Load(lab).start()
    be2_keys = [(v, lab.addr(2, s.conf["vips"][v]["family"])) for v in BASE_VIPS]
    try:
        load.more(20)
        n_ev = len(s.read_events())
        t_kill = time.monotonic()
        lab.stop_server(be2)
        downs, seen_failing_active = watch_flip(
            s, be2_keys, "down", n_ev,
            lambda b: b["state"] == "active" and b["last_check_ok"] is False)
        t_down = load.barrier()
        longs.barrier()
        load.more(100)

        n_ev = len(s.read_events())
        t_restart = time.monotonic()
        lab.start_server(be2)
        ups, seen_ok_down = watch_flip(
            s, be2_keys, "active", n_ev,
            lambda b: b["state"] == "down" and b["last_check_ok"] is True)
        t_up = load.barrier()
        load.more(100)
    finally:
        recs = load.stop()
        conns = longs.stop()
    # hysteresis: a failed check left it active (fall > 1), a good one left it down
    # (rise > 1); the events count the checks where the daemon reports them
    assert seen_failing_active, f"be2 went down at its first failed check (fall={FALL})"
    assert seen_ok_down, f"be2 came back at its first good check (rise={RISE})"
    for evs, n in ((downs, FALL), (ups, RISE)):
        assert all(e.get("consecutive", n) == n for e in evs), evs

    bad = [r for r in failures(recs) if s.predict(rings[r.kind], r.kind, r.sport) != be2]
    assert not bad, bad[:5]
    assert all(t_kill < r.t1 and r.t0 < t_down for r in failures(recs)), failures(recs)[:5]
    down = [r for r in recs if t_down < r.t0 and r.t1 < t_restart]
    assert by_backend(down)[be2] == 0 and len(down) >= 400, by_backend(down)
    back = [r for r in recs if r.t0 > t_up]
    assert not failures(back) and by_backend(back)[be2] > 0, by_backend(back)
    # long-lived: those on be2 ended with its server, the others never noticed
    assert all(c.error for c in conns if c.backend == be2) and \
        sum(c.backend == be2 for c in conns) >= 2
    assert not [c for c in conns if c.backend != be2 and c.error]
    report(f"[{s.id}] failover: {len(recs)} requests; be2 down {t_down - t_kill:.2f}s after "
           f"the kill (fall={FALL}, interval={INTERVAL}s); {len(failures(recs))} failed, "
           f"all ring-mapped to be2 before it went down; {len(down)} while down, none to "
           f"be2; back after rise={RISE}: {by_backend(back)[be2]}/{len(back)} to be2")


def watch_flip(s: Setup, keys, to: str, after: int, seen: Callable[[dict], bool]
               ) -> tuple[list[dict], bool]:
    """Wait for the backend_state_changed events taking every VIP/backend pair in keys
    to `to` (logged once the maps have it); meanwhile poll the stats for a backend entry
    that satisfies `seen`. Returns (those events, whether one was seen)."""
    was_seen = False
    deadline = time.monotonic() + WAIT
    while True:
        evs = [e for e in s.read_events()[after:] if e.get("event") ==
               "backend_state_changed" and e["to"] == to and (e["vip"], e["backend"]) in keys]
        if {(e["vip"], e["backend"]) for e in evs} == set(keys):
            return evs, was_seen
        doc = s.stats()
        was_seen = was_seen or any(seen(b) for v in doc["vips"] for b in v["backends"]
                                   if (v["name"], b["address"]) in keys)
        assert time.monotonic() < deadline, f"{keys} never {to}: {s.tail()}"
        time.sleep(0.01)


def _reload_steps(s: Setup):
    """(what, new conf or 'broken', barrier first?, wait until every backend is active)"""
    cur = copy.deepcopy(s.conf)
    other = "gue" if s.encap == "ipip" else "ipip"
    steps = []

    def step(what, fn=None, broken=False, barrier=False, settle=False):
        nonlocal cur
        if fn:
            cur = copy.deepcopy(cur)
            fn(cur)
        steps.append((what, "broken" if broken else cur, barrier, settle))

    V = lambda c, n: c["vips"][n]["backends"]  # noqa: E731
    long_vips = ("long", "long6")

    def set_state(c, i, state, vips=tuple(BASE_VIPS)):
        for n in vips:
            V(c, n)[i][1] = state

    def remove(c, i, vips=tuple(BASE_VIPS)):
        for n in vips:
            del V(c, n)[i]

    def add(c, i, vips=tuple(BASE_VIPS)):
        for n in vips:
            V(c, n)[i] = [1, "active"]
    extra = ('\n[[vip]]\nname = "extra"\naddress = "10.200.1.10"\nport = 8080\n'
             'protocol = "tcp"\n[vip.health]\nport = 80\n' +
             "".join(f'[[vip.backend]]\naddress = "{s.lab.addr(i, 4)}"\n' for i in (1, 2)))

    step("web weights 2/2/3", lambda c: V(c, "web")[1].__setitem__(0, 2))
    step("web6 weights 1/1/1", lambda c: [V(c, "web6")[i].__setitem__(0, 1) for i in (1, 2, 3)])
    step("broken config", broken=True)
    step("echo weights 3/1/1", lambda c: V(c, "echo")[1].__setitem__(0, 3))
    step("drain be3 (config)", lambda c: set_state(c, 3, "drain"))
    step("remove be3", lambda c: remove(c, 3), barrier=True)
    step("nothing changed")
    step("add VIP extra", lambda c: c.__setitem__("extra", extra))
    step(f"encap {other}", lambda c: c.__setitem__("encap", other))
    step("add be3 back", lambda c: add(c, 3), settle=True)
    step("health interval 0.2", lambda c: c.__setitem__("interval", 0.2))
    step("remove VIP extra", lambda c: c.__setitem__("extra", ""))
    step(f"encap {s.encap}", lambda c: c.__setitem__("encap", s.encap))
    step("long weights 1/3/1", lambda c: [V(c, n)[2].__setitem__(0, 3) for n in long_vips])
    step("drain be2 on web", lambda c: set_state(c, 2, "drain", ("web",)))
    step("remove be2 from web", lambda c: remove(c, 2, ("web",)), barrier=True)
    step("add be2 to web", lambda c: add(c, 2, ("web",)), settle=True)
    step("health interval back", lambda c: c.__setitem__("interval", INTERVAL))
    step("weights back", lambda c: c["vips"].update(copy.deepcopy(
        {n: v for n, v in base_conf(s.encap)["vips"].items() if n not in long_vips})))
    step("base config", lambda c: c.update(base_conf(s.encap)))
    assert len(steps) == RELOADS and cur == base_conf(s.encap)
    return steps


def test_reload_under_load(setup):
    """20 SIGHUPs (weights, drains, backends and a VIP removed and added, encapsulation
    switched, one broken config) while clients keep opening connections and talking on
    long-lived ones: no request fails; no connection whose backend stayed is reset."""
    s = setup
    s.baseline()
    lab = s.lab
    be3 = lab.backends[2]
    rings0 = {v: s.ring(v) for v in BASE_VIPS}
    longs = LongConns(lab).open(6, need=be3, need_n=2).start()
    load = Load(lab).start()
    evs = []
    try:
        load.more(20)
        for what, conf, barrier, settle in _reload_steps(s):
            if barrier:  # the drain before has let every request in flight finish
                load.barrier()
            if conf == "broken":
                ev = s.hup(broken=True)
            else:
                ev = s.hup(conf)
            evs.append((what, ev))
            if settle:
                s.wait_all_active()
            load.more(5)
        load.barrier()
        longs.barrier()
    finally:
        recs = load.stop()
        conns = longs.stop()
    assert sum(ev["event"] == "config_reloaded" for _, ev in evs) == RELOADS - 1
    assert sum(ev["event"] == "config_rejected" for _, ev in evs) == 1
    counts = dict(evs)
    assert counts["remove be3"]["backends_removed"] == 6
    assert counts["add be3 back"]["backends_added"] == 6
    assert counts["add VIP extra"]["vips_added"] == 1
    assert counts["remove VIP extra"]["vips_removed"] == 1
    assert counts["nothing changed"]["rings_swapped"] == 0
    assert not failures(recs), (len(failures(recs)), failures(recs)[:5])
    stayed = [c for c in conns if c.backend != be3]  # be3 left every VIP once
    assert stayed and not [c for c in stayed if c.error], \
        [(c.backend, c.error) for c in stayed if c.error]
    assert all(len(c.oks) >= RELOADS for c in stayed)
    # back on the base config: every ring is what it was (Maglev is deterministic)
    for v in BASE_VIPS:
        assert s.ring(v) == rings0[v], v
    moved = [c for c in conns if c.backend == be3]
    assert len(moved) >= 4
    report(f"[{s.id}] reload: {RELOADS} SIGHUPs (1 rejected) during {len(recs)} requests "
           f"({dict(collections.Counter(r.kind for r in recs))}), 0 failed; "
           f"{len(stayed)} long-lived connections whose backend stayed: 0 reset, "
           f"{min(len(c.oks) for c in stayed)}+ echoes each; {len(moved)} on be3 "
           f"(removed once): {sum(bool(c.error) for c in moved)} reset; "
           f"reload ms: {[ev.get('duration_ms') for _, ev in evs if 'duration_ms' in ev]}")


def test_restart(setup):
    """SIGKILL the daemon under load: the attached program keeps forwarding, nothing
    fails; a new daemon adopts the pinned maps: connections keep their backends."""
    s = setup
    s.baseline()
    lab = s.lab
    rings0 = {v: s.ring(v) for v in BASE_VIPS}
    longs = LongConns(lab).open(6).start()
    load = Load(lab).start()
    try:
        load.more(20)
        old = s.proc
        old.send_signal(signal.SIGKILL)
        old.wait(10)
        t_dead = load.barrier()
        longs.barrier()
        load.more(100)  # no daemon at all
        ev = s.start(fresh=False)
        t_new = load.barrier()
        assert ev["adopted_vips"] == len(BASE_VIPS), ev
        s.wait_all_active()
        longs.barrier()
        load.more(100)
        t_end = longs.barrier()
    finally:
        recs = load.stop()
        conns = longs.stop()
    assert not failures(recs), failures(recs)[:5]
    assert not [c for c in conns if c.error], [(c.backend, c.error) for c in conns if c.error]
    assert all(c.ok_after(t_new) > 0 for c in conns)
    for v in BASE_VIPS:
        assert s.ring(v) == rings0[v], v
    dead = [r for r in recs if t_dead < r.t0 < t_new]
    assert len(dead) >= 400
    # a backend that a reload adds starts down, even one the killed instance had up:
    # it enters the ring only after `rise` checks
    conf = copy.deepcopy(s.conf)
    del conf["vips"]["echo"]["backends"][3]
    assert s.hup(conf)["rings_swapped"] == 1
    conf = copy.deepcopy(conf)
    conf["vips"]["echo"]["backends"][3] = [1, "active"]
    ev_add = s.hup(conf)
    assert ev_add["backends_added"] == 1 and ev_add["rings_swapped"] == 0, ev_add
    s.wait_all_active()
    assert s.conf == base_conf(s.encap) and s.ring("echo") == rings0["echo"]
    report(f"[{s.id}] restart: {len(recs)} requests, 0 failed ({len(dead)} with no daemon); "
           f"{len(conns)} long-lived connections kept their backends across SIGKILL and "
           f"restart ({min(c.ok_after(t_new) for c in conns)}+ echoes each after it, "
           f"{t_end - t_new:.1f}s); adopted {ev['adopted_maps']} maps, {ev['adopted_vips']} VIPs")
