"""Health checks and backend lifecycle, against real servers in namespaces this file makes.

Part 1 (namespace xh-unit): run_probe, Verdict and Scheduler against real TCP/HTTP
servers: healthy, refusing, answering 500, accepting and never answering, flapping,
redirecting, babbling, closing; and a black-holed address (connect timeout).

Part 2 (lab xh-*): the real daemon. Every transition's log event, exactly when it happens
in checks (counted by the backend's own server), the rings after each transition, drain vs
maint vs down on existing flows, admin states across SIGHUP and restart, a backend never
checked, all_down drop vs spread.

Times here are generous timeouts only; what is asserted is counts and contents.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import os
import select
import signal
import socket
import threading
import time

import pytest

from lb import health, layout, maglev
from lb.lab import netns, topology
from lb.native import Map
from lb.specs import backend_key

import daemonctl

UNIT_NS = "xh-unit"


# --- a controllable health endpoint --------------------------------------------------------

class HealthServer:
    """A TCP listener in namespace `ns` on (addr, port), served by a thread of this process.
    Each accepted connection takes the next entry of `script`, else `mode`:
      an int (HTTP status), "hang" (accept, never answer), "close" (read the request,
      close without answering),
      "garbage" (16 KiB without a newline), "redirect" (301 to another path).
    "refuse" closes the listener (the kernel answers SYNs with RST).
    accepted counts connections in accept order; decisions are taken under one lock with
    the counting, so a test knows exactly which check got which answer."""

    def __init__(self, ns: str, addr: str, port: int, mode="ok"):
        self.ns, self.addr, self.port = ns, addr, port
        self.lock = threading.Lock()
        self.mode, self.script = 200, []
        self.accepted = 0
        self.given: list = []        # what each accepted connection got
        self.requests: list[bytes] = []
        self.hung: list[socket.socket] = []
        self.sock = None
        self.stop_flag = False
        self.set_mode(mode)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        fam = socket.AF_INET6 if ":" in self.addr else socket.AF_INET
        with netns.entered(self.ns):
            s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.addr, self.port))
        s.listen(64)
        s.setblocking(False)
        self.sock = s

    def set_mode(self, mode, script=()) -> int:
        """Switch; returns how many connections were accepted before the switch."""
        mode = 200 if mode == "ok" else mode
        with self.lock:
            if mode == "refuse":
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
            elif self.sock is None:
                self._listen()
            self.mode, self.script = mode, list(script)
            return self.accepted

    def count(self) -> int:
        with self.lock:
            return self.accepted

    def _run(self) -> None:
        while not self.stop_flag:
            s = self.sock
            if s is None:
                time.sleep(0.01)
                continue
            try:
                ready, _, _ = select.select([s], [], [], 0.05)
            except (OSError, ValueError):
                continue
            if not ready:
                continue
            with self.lock:
                if self.sock is not s:
                    continue
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                what = self.script.pop(0) if self.script else self.mode
                self.accepted += 1
                self.given.append(what)
            try:
                self._serve(conn, what)
            except OSError:
                conn.close()

    def _serve(self, conn: socket.socket, what) -> None:
        if what == "hang":
            self.hung.append(conn)
            return
        conn.setblocking(True)
        conn.settimeout(2)
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = conn.recv(4096)
            if not chunk:
                break
            req += chunk
        self.requests.append(req)
        if what == "close":
            pass
        elif what == "garbage":
            conn.sendall(b"x" * 16384)
        elif what == "redirect":
            conn.sendall(b"HTTP/1.1 301 Moved\r\nLocation: /elsewhere\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            conn.sendall(f"HTTP/1.1 {what} X\r\nContent-Length: 0\r\nConnection: close"
                         f"\r\n\r\n".encode())
        conn.close()

    def close(self) -> None:
        self.stop_flag = True
        self.thread.join(2)
        with self.lock:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
        for c in self.hung:
            c.close()


# --- part 1: probes, verdicts, the scheduler ----------------------------------------------

BLACKHOLE = "10.77.0.2"  # on-link, nobody answers ARP: a connect never completes

PORTS = {"ok": 18001, "500": 18002, "hang": 18003, "flap": 18004, "redirect": 18005,
         "garbage": 18006, "close": 18007, "refused": 18009, "ok6": 18001}


@pytest.fixture(scope="module")
def unit():
    netns.remove(UNIT_NS)
    ns = netns.Netns(UNIT_NS, owned=False)
    servers = {}
    try:
        ns.set_link("lo", up=True)
        netns.add_veth("hb0", ns, "hb1", ns)
        ns.add_address("hb0", "10.77.0.1/24")
        for name, mode in (("ok", 200), ("500", 500), ("hang", "hang"), ("flap", 200),
                           ("redirect", "redirect"), ("garbage", "garbage"),
                           ("close", "close")):
            servers[name] = HealthServer(UNIT_NS, "127.0.0.1", PORTS[name], mode)
        servers["ok6"] = HealthServer(UNIT_NS, "::1", PORTS["ok6"], 200)
        yield servers
    finally:
        for s in servers.values():
            s.close()
        netns.remove(UNIT_NS)


def in_ns(coro):
    """Run a coroutine on a fresh loop with this thread in the unit namespace (its sockets
    are created there)."""
    with netns.entered(UNIT_NS):
        return asyncio.run(coro)


def probe(kind: str, target: str, timeout: float = 0.3, **kw) -> health.Probe:
    addr = "::1" if target == "ok6" else (BLACKHOLE if target == "blackhole" else "127.0.0.1")
    port = 80 if target == "blackhole" else PORTS[target]
    return health.Probe(kind, addr, port, timeout, kw.pop("path", "/healthz"), **kw)


@pytest.mark.parametrize("kind,target,ok,reason", [
    ("http", "ok", True, "http status 200"),
    ("http", "ok6", True, "http status 200"),
    ("http", "500", False, "http status 500"),
    ("http", "refused", False, "connection refused"),
    ("http", "hang", False, "http response timeout after 0.3s"),
    ("http", "blackhole", False, "connect timeout after 0.3s"),
    ("http", "redirect", False, "http status 301"),
    ("http", "garbage", False, f"http: no status line in the first {health.READ_CAP} bytes"),
    ("http", "close", False, "http: connection closed without a response"),
    ("tcp", "ok", True, "connected"),
    ("tcp", "hang", True, "connected"),  # a tcp check only needs the connect
    ("tcp", "refused", False, "connection refused"),
    ("tcp", "blackhole", False, "connect timeout after 0.3s"),
])
def test_probe_results(unit, kind, target, ok, reason):
    r = in_ns(health.run_probe(probe(kind, target)))
    assert (r.ok, r.reason) == (ok, reason)
    assert 0 <= r.latency_s < 5


def test_http_probe_request_and_read_cap(unit):
    """GET path to the backend's own address and the health port; redirects are not
    followed; at most READ_CAP bytes are read of an endless answer."""
    red = unit["redirect"]
    n0 = red.count()
    r = in_ns(health.run_probe(probe("http", "redirect", path="/status/x?y=1")))
    assert r.reason == "http status 301" and red.count() == n0 + 1  # no second request
    req = red.requests[-1].decode()
    assert req.startswith("GET /status/x?y=1 HTTP/1.0\r\n")
    assert f"\r\nHost: 127.0.0.1:{PORTS['redirect']}\r\n" in req
    r = in_ns(health.run_probe(probe("http", "500", expect_status=500)))
    assert r.ok and r.reason == "http status 500"
    r6 = unit["ok6"]
    in_ns(health.run_probe(probe("http", "ok6")))
    assert f"\r\nHost: [::1]:{PORTS['ok6']}\r\n" in r6.requests[-1].decode()


def test_probe_identity():
    """One probe per distinct check: a tcp check ignores path/status, so VIPs that differ
    only there share it; any difference in what is checked makes another probe."""
    a = health.Probe("tcp", "10.0.0.1", 80, 1.0, "/a", 500)
    b = health.Probe("tcp", "10.0.0.1", 80, 1.0)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert len({health.Probe("http", "10.0.0.1", 80, 1.0, "/a"),
                health.Probe("http", "10.0.0.1", 80, 1.0, "/b"),
                health.Probe("http", "10.0.0.1", 81, 1.0, "/a"),
                health.Probe("http", "10.0.0.2", 80, 1.0, "/a")}) == 4
    with pytest.raises(ValueError):
        health.Probe("ping", "10.0.0.1", 80, 1.0)


def _simulate(rise: int, fall: int, oks: list[bool], up: bool = False):
    """(check number, new state) of each flip a Verdict reports for the results `oks`."""
    v = health.Verdict(rise, fall, up=up)
    out = []
    for i, ok in enumerate(oks, start=1):
        flip = v.record(health.ProbeResult(ok, "x", 0.0))
        if flip:
            assert flip[0] != flip[1]
            out.append((i, "up" if flip[1] else "down"))
    return out, v


def test_verdict_rise_fall():
    T, F = True, False
    # starts down: failures change nothing, `rise` consecutive successes bring it up
    flips, v = _simulate(2, 3, [F, F, F, F])
    assert flips == [] and not v.up and v.fail_run == 4
    assert _simulate(2, 3, [T, T])[0] == [(2, "up")]
    assert _simulate(3, 2, [T, T, F, T, T, T])[0] == [(6, "up")]  # a failure resets rise
    # up: `fall` consecutive failures bring it down; a success in between resets
    assert _simulate(2, 3, [T, T, F, F, T, F, F, F])[0] == [(2, "up"), (8, "down")]
    assert _simulate(1, 1, [T, F, T, F])[0] == [(1, "up"), (2, "down"), (3, "up"),
                                                 (4, "down")]
    assert _simulate(2, 2, [F, F], up=True)[0] == [(2, "down")]  # seeded up (adopted)
    _, v = _simulate(2, 3, [T, T, F])
    assert v.up and v.checked and v.checks == 3 and v.fail_run == 1 and v.run == 1
    assert health.Verdict(2, 3).checked is False  # never checked: down, no traffic


def test_scheduler_transitions_against_servers(unit):
    """Five backends in one loop: healthy, refusing, 500, never answering, flapping. Each
    transition happens at exactly the check the rise/fall counts say, and every check is
    one request on the server."""
    rise, fall, interval, timeout = 2, 3, 0.1, 0.08
    flap = unit["flap"]
    # flapping script (1 = 200, 0 = 500): up at check 5, down at 13, up at 17
    script = [0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 1]
    n_flap0 = flap.set_mode(200, [200 if s else 500 for s in script])
    targets = {"ok": "ok", "refused": "refused", "500": "500", "hang": "hang",
               "flap": "flap"}
    probes = {name: probe("http", t, timeout=timeout) for name, t in targets.items()}
    by_probe = {p: name for name, p in probes.items()}
    seen = {name: [] for name in probes}
    flips = {name: [] for name in probes}
    verdicts = {name: health.Verdict(rise, fall) for name in probes}
    counts0 = {name: unit[t].count() for name, t in targets.items() if t in unit}

    async def main():
        done = asyncio.Event()

        def cb(p, r):
            name = by_probe[p]
            seen[name].append(r)
            flip = verdicts[name].record(r)
            if flip:
                flips[name].append((verdicts[name].checks, "up" if flip[1] else "down"))
            if all(len(v) >= len(script) for v in seen.values()):
                done.set()

        sched = health.Scheduler(cb)
        sched.configure({p: interval for p in probes.values()})
        assert len(sched.intervals) == 5
        await asyncio.wait_for(done.wait(), 30)
        sched.stop()
        return sched

    sched = in_ns(main())
    assert sched.errors == 0 and sched.probes_run >= 5 * len(script)
    assert sched.lag_max < interval  # generous: nothing blocked the loop for an interval
    n = len(script)
    assert flips["ok"][:1] == [(rise, "up")] and len(flips["ok"]) == 1
    for name, reason in (("refused", "connection refused"), ("500", "http status 500"),
                         ("hang", f"http response timeout after {timeout}s")):
        assert flips[name] == [], name  # never up, so never a transition
        assert {r.reason for r in seen[name]} == {reason}
    assert flips["flap"][:3] == [(5, "up"), (13, "down"), (17, "up")]
    # every result one request, in order: the server's answers are the results seen
    given = flap.given[n_flap0:n_flap0 + n]
    assert [r.reason for r in seen["flap"][:n]] == [f"http status {g}" for g in given]
    for name in ("ok", "500", "hang"):
        got = unit[targets[name]].count() - counts0[name]
        assert len(seen[name]) <= got <= len(seen[name]) + 1  # + one in flight at stop


def test_scheduler_jitter_and_spread():
    """First checks spread over the first 10% of the interval; each next one 90-110% of the
    interval after the previous one was due (planned times, read from the heap)."""
    async def main():
        s = health.Scheduler(lambda p, r: None)
        ps = {health.Probe("tcp", f"127.0.1.{i}", 9, 0.5): 10.0 for i in range(1, 201)}
        t0 = asyncio.get_running_loop().time()
        s.configure(ps)
        offsets = sorted(due - t0 for due, _, _ in s._due)
        s.stop()
        return offsets
    offsets = asyncio.run(main())
    assert len(offsets) == 200 and 0 <= offsets[0] and offsets[-1] <= 1.0 + 0.01
    assert offsets[-1] - offsets[0] > 0.5  # spread, not all at once
    s = health.Scheduler(lambda p, r: None)
    gaps = [s.interval_after(2.0) for _ in range(2000)]
    assert 1.8 <= min(gaps) < 1.85 and 2.15 < max(gaps) <= 2.2


def test_scheduler_survives_callback_errors_and_reconfigures(unit):
    """A callback that raises does not stop the checks; a probe no longer wanted stops; a
    probe added later starts."""
    errors = []
    results: dict[str, int] = {"ok": 0, "500": 0}

    async def main():
        p_ok, p_500 = probe("tcp", "ok"), probe("http", "500")
        name = {p_ok: "ok", p_500: "500"}
        phase = {"n": 0}

        def cb(p, r):
            results[name[p]] += 1
            if name[p] == "ok" and results["ok"] % 2:
                raise RuntimeError("boom")

        s = health.Scheduler(cb, on_error=lambda p, e: errors.append((p, str(e))))
        s.configure({p_ok: 0.05})
        while results["ok"] < 6:
            await asyncio.sleep(0.02)
        s.configure({p_500: 0.05})  # p_ok no longer wanted
        frozen = results["ok"]
        while results["500"] < 4:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        phase["n"] = results["ok"] - frozen
        s.stop()
        return s, phase["n"]
    s, after_removal = in_ns(main())
    assert after_removal <= 1  # at most the check in flight when it was removed
    assert s.errors == len(errors) >= 3 and errors[0][1] == "boom"
    assert results["500"] >= 4


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_moved_flow_stays_moved_on_every_cpu():
    """maint moves a flow; after `activate` the flow must stay where it was moved, on
    every CPU (else one connection is split between two backends)."""
    from packets import A, UDP_P, LbEnv, be, fast_frame, outer_dst
    from lb.specs import VipSpec

    vip = A("192.0.2.100")
    cpus = sorted(os.sched_getaffinity(0))[:2]
    keep = os.sched_getaffinity(0)
    env = LbEnv()

    def spec(first_state):
        return VipSpec(vip, 53, UDP_P, (be("10.0.0.1", state=first_state),
                                        be("10.0.0.2")), ring_size=RING)

    def send(cpu, sport):
        os.sched_setaffinity(0, {cpu})
        r = env.run(fast_frame(UDP_P, A("198.51.100.7"), sport, vip, 53))
        return str(outer_dst(r.data)) if r.verdict == "tx" else r.verdict
    try:
        env.apply([spec("active")])
        sport = next(p for p in range(1000, 3000) if send(cpus[0], p) == "10.0.0.1")
        env.apply([spec("maint")])
        assert send(cpus[1], sport) == "10.0.0.2"  # moved (the table says so)
        env.apply([spec("active")])
        assert [send(c, sport) for c in (cpus[1], cpus[0])] == ["10.0.0.2", "10.0.0.2"]
    finally:
        os.sched_setaffinity(0, keep)
        env.close()


# --- part 2: the daemon in a lab ------------------------------------------------------------

LAB = topology.Lab(prefix="xh-")
PIN = "/sys/fs/bpf/xdplb-health"
SOCK = "/run/xdplb/health.sock"
STATE = "/run/xdplb/health-state.json"
RING = 1009
HPORT = 8080            # health endpoint (HealthServer) on every backend
SLOW_PORT = 8081        # a health endpoint that never answers (one slow VIP)
B = {"xh-be1": "10.200.0.11", "xh-be2": "10.200.0.12", "xh-be3": "10.200.0.13"}
NAME = {a: n for n, a in B.items()}
V6 = ["fd00:200::11", "fd00:200::12", "fd00:200::13"]
RISE, FALL = 2, 3


def config_text(web_states: dict[str, str] | None = None) -> str:
    web_states = web_states or {}

    def backends(addrs, states=None):
        out = ""
        for a in addrs:
            out += f'[[vip.backend]]\naddress = "{a}"\n'
            if states and a in states:
                out += f'state = "{states[a]}"\n'
        return out
    v4 = list(B.values())
    return f"""
[lb]
interface = "lb0"
encap = "ipip"
ring_size = {RING}
flow_table_size = 65536
bpf_pin_path = "{PIN}"
control_socket = "{SOCK}"
state_file = "{STATE}"
log_format = "json"

[health]
type = "http"
port = {HPORT}
path = "/healthz"
interval = 0.2
timeout = 0.15
rise = {RISE}
fall = {FALL}

[[vip]]
name = "web"
address = "{topology.VIP4}"
port = 80
protocol = "tcp"
{backends(v4, web_states)}
[[vip]]
name = "echo"
address = "{topology.VIP4}"
port = {topology.UDP_PORT}
protocol = "udp"
{backends(v4)}
[[vip]]
name = "slow"
address = "{topology.VIP4}"
port = 8443
protocol = "tcp"
[vip.health]
port = {SLOW_PORT}
interval = 60.0
timeout = 50.0
{backends(v4[2:])}
[[vip]]
name = "open"
address = "{topology.VIP4}"
port = 9000
protocol = "udp"
[vip.health]
type = "none"
{backends(v4)}
[[vip]]
name = "spread"
address = "{topology.VIP6}"
port = {topology.UDP_PORT}
protocol = "udp"
all_down = "spread"
[vip.health]
type = "tcp"
port = 9
{backends(V6)}
[[vip]]
name = "dropper"
address = "{topology.VIP6}"
port = 80
protocol = "tcp"
all_down = "drop"
[vip.health]
type = "tcp"
port = 9
{backends(V6)}
"""


def Daemon(config: str, log: str) -> daemonctl.Daemon:
    return daemonctl.Daemon(LAB, config, log)


cli, stats = daemonctl.cli, daemonctl.stats


def backend_rows(doc: dict, vip: str) -> dict[str, dict]:
    v = next(v for v in doc["vips"] if v["name"] == vip)
    return {b["address"]: b for b in v["backends"]}


def ring_addresses(vip_addr: str, port: int, proto: int) -> list:
    return daemonctl.pinned_ring(PIN, vip_addr, port, proto)


def expected_ring(addresses) -> list:
    if not addresses:
        return [None] * RING
    addrs = sorted((ipaddress.ip_address(a) for a in addresses), key=backend_key)
    table = maglev.build_reference([maglev.Slotholder(backend_key(a)) for a in addrs], RING)
    return [str(addrs[i]) for i in table]


def assert_rings(in_ring, vips=(("web", 80, 6), ("echo", topology.UDP_PORT, 17))):
    want = expected_ring(in_ring)
    for name, port, proto in vips:
        assert ring_addresses(topology.VIP4, port, proto) == want, name


def flow_backend(sport: int) -> str | None:
    """The backend the pinned connection table holds for client:sport -> echo VIP."""
    key = layout.flow_key(17, ipaddress.ip_address(LAB.hosts()["client"].v4), sport,
                     ipaddress.ip_address(topology.VIP4), topology.UDP_PORT)
    with Map.from_pin(f"{PIN}/flows") as flows:
        raw = flows.lookup(key)
    if raw is None:
        return None
    bid = layout.FlowVal.unpack(raw).backend_id
    with Map.from_pin(f"{PIN}/backends") as bes:
        b = layout.Backend.unpack(bes.lookup(ctypes.c_uint32(bid)))
    return str(layout.words_addr(b.addr, b.family))


def udp_from_ports(ports, host: str = topology.VIP4, cpu: int = 0) -> dict[int, str | None]:
    """One datagram to the echo VIP from each client source port: who answered (None:
    nobody). The client runs on one CPU, and so does the data path for its packets (veth
    receive runs on the sender's CPU): see test_moved_flow_stays_moved_on_every_cpu for
    why that matters."""
    def work(ports, client, host):
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
    h = LAB.hosts()["client"]
    return netns.run_in(LAB.client, work, list(ports), h.v6 if ":" in host else h.v4, host,
                    timeout=60)


def tcp_connects(host: str, port: int, n: int) -> int:
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
    return netns.run_in(LAB.client, work, host, port, n, timeout=60)


def wait_for(pred, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("health")
    if os.path.exists(STATE):
        os.unlink(STATE)
    servers: dict[str, HealthServer] = {}
    state: dict = {}
    try:
        LAB.up()
        for name, addr in B.items():
            servers[name] = HealthServer(name, addr, HPORT, 200)
        servers["slow"] = HealthServer("xh-be3", B["xh-be3"], SLOW_PORT, "hang")
        cfg = tmp / "lb.toml"
        cfg.write_text(config_text())
        state.update(cfg=str(cfg), servers=servers, tmp=tmp, skew={},
                     d=Daemon(str(cfg), str(tmp / "daemon.log")))
        state["d"].wait("datapath_attached")
        yield state
    finally:
        if "d" in state:
            state["d"].stop()
        for s in servers.values():
            s.close()
        LAB.down()
        for name in os.listdir(PIN) if os.path.isdir(PIN) else []:
            os.unlink(os.path.join(PIN, name))
        if os.path.isdir(PIN):
            os.rmdir(PIN)
        if os.path.exists(STATE):
            os.unlink(STATE)


def wait_state(env, vip: str, addr: str, to: str, after: int, **match) -> dict:
    return env["d"].wait("backend_state_changed", after, vip=vip, backend=addr, to=to,
                         **match)


def test_never_checked_backend_gets_no_slot(env):
    """`slow`'s only backend has a check that is still running (its endpoint never
    answers, timeout 50 s): never checked, so no slot; the VIP drops and counts."""
    doc = stats(env["cfg"])
    row = backend_rows(doc, "slow")[B["xh-be3"]]
    assert row["last_check"] == "not checked" and row["checks"] == 0
    assert row["healthy"] is False and row["state"] == "down"
    assert ring_addresses(topology.VIP4, 8443, 6) == [None] * RING
    before = doc["global"]["drops"]["no_backend"]
    assert tcp_connects(topology.VIP4, 8443, 3) == 0
    assert stats(env["cfg"])["global"]["drops"]["no_backend"] >= before + 3
    assert env["d"].events("backend_state_changed", vip="slow") == []


def test_health_type_none_serves_at_once(env):
    """With health checks off every backend takes traffic from the start, unchecked."""
    assert ring_addresses(topology.VIP4, 9000, 17) == expected_ring(list(B.values()))
    for row in backend_rows(stats(env["cfg"]), "open").values():
        assert (row["state"], row["healthy"], row["last_check"], row["checks"]) == (
            "active", True, "health checks off", 0)
    assert env["d"].events("backend_state_changed", vip="open") == []


def test_startup_transitions_and_shared_probe(env):
    """Every backend starts down and goes up after exactly `rise` checks, one event each;
    web and echo use the same check, so each backend's server sees one request per check,
    not two."""
    d, servers = env["d"], env["servers"]
    for vip in ("web", "echo"):
        for addr in B.values():
            ev = wait_state(env, vip, addr, "active", 0)
            assert ev["from"] == "down" and ev["reason"] == "http status 200"
            assert ev["consecutive"] == RISE and ev["check_count"] == RISE
            assert len(d.events("backend_state_changed", vip=vip, backend=addr)) == 1
    assert_rings(list(B.values()))
    before = {name: s.count() for name, s in servers.items()}
    doc = stats(env["cfg"])
    for name, addr in B.items():
        web, echo = backend_rows(doc, "web")[addr], backend_rows(doc, "echo")[addr]
        assert web["checks"] == echo["checks"]  # one probe, two VIPs
        # one request per check (two VIPs probing apart would make it twice as many)
        assert before[name] - 1 <= web["checks"] <= servers[name].count()
        assert web["latency_ms"] is not None and web["last_check_ok"] is True
        assert web["admin_state"] == "active" and web["healthy"] is True
    got = udp_from_ports(range(41000, 41030))
    assert set(got.values()) == set(B)


def test_all_down_drop_and_spread(env):
    """Both v6 VIPs' checks are refused (nothing on port 9): `spread` still uses every
    backend, `dropper` has an empty ring and drops, counted."""
    doc = stats(env["cfg"])
    for vip in ("spread", "dropper"):
        rows = backend_rows(doc, vip)
        wait_for(lambda: all(r["last_check"] == "connection refused" for r in
                             backend_rows(stats(env["cfg"]), vip).values()), "checks")
        assert all(r["state"] == "down" and not r["healthy"] for r in rows.values())
    assert ring_addresses(topology.VIP6, topology.UDP_PORT, 17) == expected_ring(V6)
    assert ring_addresses(topology.VIP6, 80, 6) == [None] * RING
    got = udp_from_ports(range(41100, 41120), host=topology.VIP6)
    assert None not in got.values() and len(set(got.values())) == 3
    before = stats(env["cfg"])["global"]["drops"]["no_backend"]
    assert tcp_connects(topology.VIP6, 80, 3) == 0
    assert stats(env["cfg"])["global"]["drops"]["no_backend"] >= before + 3


@pytest.mark.parametrize("mode,reason", [
    (500, "http status 500"),
    ("refuse", "connection refused"),
    ("hang", "http response timeout after 0.15s"),
])
def test_failure_and_recovery_exact_checks(env, mode, reason):
    """be2's endpoint starts failing after check c: down at exactly check c + fall (for
    both VIPs that use it), ring without be2; back up after `rise` good checks."""
    d, srv, addr = env["d"], env["servers"]["xh-be2"], B["xh-be2"]
    skew = env["skew"].setdefault("xh-be2", 0)  # checks the server could not count
    n = d.mark()
    c = srv.set_mode(mode)
    for vip in ("web", "echo"):
        ev = wait_state(env, vip, addr, "down", n)
        assert (ev["from"], ev["reason"], ev["consecutive"]) == ("active", reason, FALL)
        assert ev["check_count"] == c + skew + FALL
        assert len(d.events("backend_state_changed", n, vip=vip, backend=addr)) == 1
    assert_rings([B["xh-be1"], B["xh-be3"]])
    row = backend_rows(stats(env["cfg"]), "web")[addr]
    assert (row["state"], row["healthy"], row["last_check"]) == ("down", False, reason)
    n = d.mark()
    c = srv.set_mode(200)
    for vip in ("web", "echo"):
        ev = wait_state(env, vip, addr, "active", n)
        assert (ev["from"], ev["reason"], ev["consecutive"]) == ("down", "http status 200",
                                                                 RISE)
    # up at the second request answered after the switch; refused connections never
    # reached the server, every other check did
    new_skew = ev["check_count"] - (c + RISE)
    assert new_skew > skew if mode == "refuse" else new_skew == skew
    env["skew"]["xh-be2"] = new_skew
    assert_rings(list(B.values()))
    # nothing else moved meanwhile
    others = [e for e in d.events("backend_state_changed", n) if e["backend"] != addr]
    assert others == []


def test_flapping_backend(env):
    """A backend flapping under its rise/fall counts produces exactly the transitions the
    counts say, at the checks they say."""
    d, srv, addr = env["d"], env["servers"]["xh-be3"], B["xh-be3"]
    # from up (fall 3, rise 2): 500s in runs of 1 and 2 change nothing; the third
    # consecutive one is check 8 (down); 200, 500, then two 200s: up at check 12
    script = [500, 200, 500, 500, 200, 500, 500, 500, 200, 500, 200, 200]
    n = d.mark()
    c = srv.set_mode(200, script)
    ev = wait_state(env, "web", addr, "active", n)
    evs = d.events("backend_state_changed", n, vip="web", backend=addr)
    assert [(e["to"], e["check_count"] - c, e["reason"]) for e in evs] == [
        ("down", 8, "http status 500"), ("active", 12, "http status 200")]
    assert ev["check_count"] == c + 12
    assert [(e["to"], e["check_count"] - c) for e in d.events(
        "backend_state_changed", n, vip="echo", backend=addr)] == [("down", 8), ("active", 12)]
    assert_rings(list(B.values()))


def wait_all_up(env) -> None:
    def up():
        doc = stats(env["cfg"])
        return all(r["state"] == "active" for vip in ("web", "echo")
                   for r in backend_rows(doc, vip).values())
    wait_for(up, "web and echo backends all active")


def test_drain_keeps_flows_maint_and_down_move_them(env):
    d, cfg, servers = env["d"], env["cfg"], env["servers"]
    wait_all_up(env)
    ports = list(range(42000, 42060))
    first = udp_from_ports(ports)
    assert None not in first.values() and set(first.values()) == set(B)
    on = {name: [p for p in ports if first[p] == name] for name in B}
    for p in ports:
        assert flow_backend(p) == B[first[p]]

    # drain be1 (echo only): out of echo's ring, its flows stay on it
    n = d.mark()
    assert cli("backend", "drain", "echo", B["xh-be1"], "--config", cfg).returncode == 0
    ev = wait_state(env, "echo", B["xh-be1"], "drain", n)
    assert ev["from"] == "active" and ev["reason"] == "admin drain"
    assert ring_addresses(topology.VIP4, topology.UDP_PORT, 17) == expected_ring(
        [B["xh-be2"], B["xh-be3"]])
    assert ring_addresses(topology.VIP4, 80, 6) == expected_ring(list(B.values()))
    assert udp_from_ports(ports) == first
    for p in on["xh-be1"]:
        assert flow_backend(p) == B["xh-be1"]
    fresh = udp_from_ports(range(43000, 43040))
    assert "xh-be1" not in fresh.values() and None not in fresh.values()

    # maint be1: its flows move, the others stay where they are
    n = d.mark()
    assert cli("backend", "maint", "echo", B["xh-be1"], "--config", cfg).returncode == 0
    ev = wait_state(env, "echo", B["xh-be1"], "maint", n)
    assert ev["from"] == "drain" and ev["reason"] == "admin maint"
    again = udp_from_ports(ports)
    for p in ports:
        if first[p] == "xh-be1":
            assert again[p] in ("xh-be2", "xh-be3") and flow_backend(p) == B[again[p]]
        else:
            assert again[p] == first[p]
    n = d.mark()
    assert cli("backend", "activate", "echo", B["xh-be1"], "--config", cfg).returncode == 0
    ev = wait_state(env, "echo", B["xh-be1"], "active", n)
    assert ev["from"] == "maint" and ev["reason"] == "admin active"
    assert_rings(list(B.values()))

    # down (health): be2's flows move, the others stay (new flows for this part)
    ports = list(range(44000, 44060))
    current = udp_from_ports(ports)
    assert "xh-be2" in current.values() and None not in current.values()
    n = d.mark()
    servers["xh-be2"].set_mode(500)
    wait_state(env, "echo", B["xh-be2"], "down", n)
    moved = udp_from_ports(ports)
    for p in ports:
        if current[p] == "xh-be2":
            assert moved[p] != "xh-be2" and moved[p] is not None
            assert flow_backend(p) == B[moved[p]]
        else:
            assert moved[p] == current[p]
    n = d.mark()
    servers["xh-be2"].set_mode(200)
    wait_state(env, "echo", B["xh-be2"], "active", n)

    # drain and down: down wins, the drained backend's flows move too
    on3 = [p for p, b in udp_from_ports(ports).items() if b == "xh-be3"]
    assert on3
    n = d.mark()
    assert cli("backend", "drain", "echo", B["xh-be3"], "--config", cfg).returncode == 0
    wait_state(env, "echo", B["xh-be3"], "drain", n)
    n = d.mark()
    servers["xh-be3"].set_mode("refuse")
    ev = wait_state(env, "echo", B["xh-be3"], "down", n)
    assert ev["from"] == "drain"
    assert all(b not in ("xh-be3", None) for b in udp_from_ports(on3).values())
    n = d.mark()
    servers["xh-be3"].set_mode(200)
    wait_state(env, "echo", B["xh-be3"], "drain", n)  # healthy again, still drained
    assert cli("backend", "activate", "echo", B["xh-be3"], "--config", cfg).returncode == 0
    assert_rings(list(B.values()))


def test_admin_states_survive_sighup_and_restart(env):
    d, cfg = env["d"], env["cfg"]
    wait_all_up(env)
    # maint from the control socket, drain from the config
    n = d.mark()
    assert cli("backend", "maint", "web", B["xh-be3"], "--config", cfg).returncode == 0
    wait_state(env, "web", B["xh-be3"], "maint", n)
    saved = json.load(open(STATE))["backends"]
    assert {"vip": "web", "backend": B["xh-be3"], "state": "maint"} in saved
    open(cfg, "w").write(config_text({B["xh-be2"]: "drain"}))
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    d.wait("config_reloaded", n)
    ev = wait_state(env, "web", B["xh-be2"], "drain", n)
    assert ev["from"] == "active" and ev["reason"] == "config reload"
    web = backend_rows(stats(cfg), "web")
    assert web[B["xh-be3"]]["state"] == "maint" and web[B["xh-be2"]]["state"] == "drain"
    assert ring_addresses(topology.VIP4, 80, 6) == expected_ring([B["xh-be1"]])
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)  # again, nothing changes
    d.wait("config_reloaded", n)
    assert d.events("backend_state_changed", n) == []
    assert ring_addresses(topology.VIP4, 80, 6) == expected_ring([B["xh-be1"]])

    # restart: a new daemon reads the state file and the config
    d.stop()
    assert d.proc.returncode == 0
    n = d.mark()
    d2 = Daemon(cfg, d.logpath)
    env["d"] = d2
    d2.wait("datapath_attached", n)
    ev = wait_state(env, "web", B["xh-be2"], "drain", n)  # once healthy: drained, not active
    assert ev["from"] == "down"
    wait_state(env, "web", B["xh-be1"], "active", n)
    hidden = d2.wait("backend_health_changed", n, vip="web", backend=B["xh-be3"])
    assert hidden["from"] == hidden["to"] == "maint" and hidden["health"] == "up"
    assert d2.events("backend_state_changed", n, vip="web", backend=B["xh-be3"]) == []
    web = backend_rows(stats(cfg), "web")
    assert web[B["xh-be3"]]["state"] == "maint" and web[B["xh-be3"]]["admin_state"] == "maint"
    assert web[B["xh-be3"]]["healthy"] is True
    assert web[B["xh-be2"]]["state"] == "drain"
    assert ring_addresses(topology.VIP4, 80, 6) == expected_ring([B["xh-be1"]])
    wait_for(lambda: ring_addresses(topology.VIP4, topology.UDP_PORT, 17) == expected_ring(
        list(B.values())), "echo ring with every backend")
