"""`xdplb lab up|down`: the demo topology, in network namespaces, built with pyroute2.

variant "tx" (one-armed, XDP_TX), config/lab.toml:

    xl-client ---+                     all on bridge br0 in xl-sw, 10.200.0.0/24, fd00:200::/64
    xl-lb     ---+-- br0 (xl-sw)       LB 10.200.0.2 runs xdplb on lb0
    xl-be1..3 ---+                     backends 10.200.0.11-13, VIPs on their lo, decap XDP

variant "redirect" (XDP_REDIRECT, two LB interfaces), config/lab-redirect.toml:

    xl-client -- brc (xl-sw, 10.200.0.254) -- lb0 [xl-lb] lb1 -- brb (xl-sw, 10.200.2.254) -- xl-be1..3

xl-sw routes between the two segments, so backends answer clients directly (DSR).

variant "fleet": three xdplb nodes behind a router running BIRD, lb/lab/fleet.py.
VIPs: 10.200.1.10 and fd00:201::10, HTTP on 80, a UDP echo on 5353 and a TCP line echo on
7000 (long-lived connections); the client routes
them via the LB. Veth traps handled: every peer that receives XDP_TX/REDIRECT frames has
an XDP program; TX checksum offload is off on the client.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from . import namespaces, netns
from .decap import attach_decap, attach_pass

VIP4, VIP6 = "10.200.1.10", "fd00:201::10"
HTTP_PORT, UDP_PORT = 80, 5353
ECHO_PORT = 7000  # TCP line echo on every backend, for long-lived connections
GUE_PORT = 6080
DEFAULT_PREFIX = "xl-"
CONFIGS = {"tx": "config/lab.toml", "redirect": "config/lab-redirect.toml"}  # per variant


@dataclass(frozen=True)
class Host:
    ns: str
    v4: str
    v6: str


def lab_netns(name: str) -> netns.Netns:
    """A lab namespace whose interfaces skip IPv6 duplicate address detection: while
    an interface's link-local address is tentative (about a second after it comes up),
    the kernel cannot resolve neighbours from it, so a backend's first IPv6 answers
    to the client were lost."""
    ns = netns.Netns(name, owned=False)
    for conf in ("all", "default"):
        ns.sysctl(f"net.ipv6.conf.{conf}.accept_dad", 0)
    return ns


class Lab:
    """One lab, its namespaces named PREFIX + client/lb/sw/be1..3 (labs with different
    prefixes coexist: tests build their own)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, variant: str = "tx"):
        self.prefix, self.variant = prefix, variant
        self.client, self.lb, self.sw = f"{prefix}client", f"{prefix}lb", f"{prefix}sw"
        self.backends = tuple(f"{prefix}be{i}" for i in (1, 2, 3))
        self.piddir = f"/run/xdplb-lab/{prefix.rstrip('-')}"

    def hosts(self) -> dict[str, Host]:
        n4, n6 = ("10.200.0", "fd00:200") if self.variant == "tx" else ("10.200.2", "fd00:202")
        h = {"client": Host(self.client, "10.200.0.1", "fd00:200::1"),
             "lb": Host(self.lb, "10.200.0.2", "fd00:200::2")}
        for i, ns in enumerate(self.backends, start=1):
            h[ns] = Host(ns, f"{n4}.1{i}", f"{n6}::1{i}")
        return h

    def name_of(self) -> dict[str, str]:
        """Backend address (v4 and v6) -> its namespace name."""
        out = {}
        for name in self.backends:
            h = self.hosts()[name]
            out[h.v4] = out[h.v6] = name
        return out

    def plug_lb0(self, segment: str = "br0") -> None:
        """The LB's interface lb0 on the client segment (up() makes it; tests that
        delete it make it again with this)."""
        sw, lb = lab_netns(self.sw), lab_netns(self.lb)
        h = self.hosts()
        netns.add_veth("lb0", lb, "sw-lb0", sw)
        sw.set_link("sw-lb0", master=segment, up=True)
        lb.add_address("lb0", f"{h['lb'].v4}/24")
        lb.add_address("lb0", f"{h['lb'].v6}/64")
        attach_pass(sw, "sw-lb0")

    def up(self) -> "Lab":
        self.down(quiet=True)
        sw = lab_netns(self.sw)
        sw.set_link("lo", up=True)
        sw.router()
        h = self.hosts()
        client = lab_netns(self.client)
        lb = lab_netns(self.lb)
        for ns in (client, lb):
            ns.set_link("lo", up=True)
        if self.variant == "tx":
            sw.add_bridge("br0")
            seg_c = seg_b = "br0"
        else:
            seg_c, seg_b = "brc", "brb"
            for br, a4, a6 in (("brc", "10.200.0.254/24", "fd00:200::254/64"),
                               ("brb", "10.200.2.254/24", "fd00:202::254/64")):
                sw.add_bridge(br)
                sw.add_address(br, a4)
                sw.add_address(br, a6)

        netns.add_veth("c0", client, "sw-c", sw)
        sw.set_link("sw-c", master=seg_c, up=True)
        client.add_address("c0", f"{h['client'].v4}/24")
        client.add_address("c0", f"{h['client'].v6}/64")
        client.set_tx_checksum("c0", False)
        client.add_route("10.200.1.0/24", via=h["lb"].v4)
        client.add_route("fd00:201::/64", via=h["lb"].v6)
        if self.variant != "tx":
            client.add_route("default", via="10.200.0.254")
            client.add_route("default", via="fd00:200::254")

        self.plug_lb0(seg_c)
        if self.variant != "tx":
            netns.add_veth("lb1", lb, "sw-lb1", sw)
            sw.set_link("sw-lb1", master=seg_b, up=True)
            lb.add_address("lb1", "10.200.2.2/24")
            lb.add_address("lb1", "fd00:202::2/64")
            attach_pass(sw, "sw-lb1")

        for i, name in enumerate(self.backends, start=1):
            ns = lab_netns(name)
            netns.add_veth("eth0", ns, f"sw-be{i}", sw)
            sw.set_link(f"sw-be{i}", master=seg_b, up=True)
            b = h[name]
            ns.set_link("lo", up=True)
            ns.add_address("eth0", f"{b.v4}/24")
            ns.add_address("eth0", f"{b.v6}/64")
            ns.add_address("lo", f"{VIP4}/32")
            ns.add_address("lo", f"{VIP6}/128")
            ns.relaxed(["eth0"])
            if self.variant != "tx":
                ns.add_route("default", via="10.200.2.254")
                ns.add_route("default", via="fd00:202::254")
            attach_decap(ns, "eth0", GUE_PORT)
            self.start_server(name)
        return self

    def start_server(self, name: str) -> None:
        os.makedirs(self.piddir, exist_ok=True)
        log = open(os.path.join(self.piddir, f"{name}.log"), "ab")
        p = namespaces.spawn_in(name, [sys.executable, "-m", "lb.lab.server", name, "--http",
                              str(HTTP_PORT), "--udp", str(UDP_PORT), "--echo",
                              str(ECHO_PORT), "--vip", VIP4,
                              "--vip", VIP6], stdout=log, stderr=log, start_new_session=True)
        with open(os.path.join(self.piddir, f"{name}.pid"), "w") as f:
            f.write(str(p.pid))

    def stop_server(self, name: str, timeout: float = 5.0) -> bool:
        """Stop a backend's server and wait (up to `timeout` s) until it has exited, so
        its ports are closed and free when this returns. False if none was running."""
        path = os.path.join(self.piddir, f"{name}.pid")
        try:
            pid = int(open(path).read())
            os.killpg(pid, signal.SIGTERM)
        except (OSError, ValueError):
            return False
        finally:
            if os.path.exists(path):
                os.unlink(path)
        deadline = time.monotonic() + timeout
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        return True

    def down(self, quiet: bool = True) -> None:
        """Remove everything `up` made, whatever state it is in."""
        for name in self.backends:
            self.stop_server(name)
        for name in namespaces.list_namespaces():
            if name in (self.client, self.lb, self.sw, *self.backends):
                namespaces.remove(name)
        if not quiet:
            print("lab down")

    def client_http(self, host: str, n: int, port: int = HTTP_PORT
                    ) -> tuple[collections.Counter, int]:
        """n HTTP GETs from the client namespace: (answers per backend name, failures)."""
        return namespaces.run_in(self.client, _http_work, host, port, n, timeout=120)

    def client_udp(self, host: str, n: int) -> tuple[collections.Counter, int]:
        """n UDP echo requests from the client namespace, likewise."""
        return namespaces.run_in(self.client, _udp_work, host, n, timeout=120)


def running(pid: int) -> bool:
    """pid exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def http_get(sock: socket.socket, host: str, port: int = HTTP_PORT) -> str:
    """One HTTP GET over `sock` (a new TCP socket, its timeout set): the name of the
    backend that answered. OSError if it failed."""
    sock.connect((host, port))
    sock.sendall(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not body.strip():
        raise OSError(f"bad answer {data[:80]!r}")
    return body.strip().decode()


def _http_work(host: str, port: int, n: int):
    got, failed = collections.Counter(), 0
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(n):
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                got[http_get(s, host, port)] += 1
        except OSError:
            failed += 1
    return got, failed


def _udp_work(host: str, n: int):
    got, failed = collections.Counter(), 0
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for i in range(n):
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            try:
                s.sendto(f"ping {i}".encode(), (host, UDP_PORT))
                data, _ = s.recvfrom(2048)
                got[data.split()[0].decode()] += 1
            except OSError:
                failed += 1
    return got, failed


def up(variant: str = "tx") -> int:
    if variant == "fleet":
        from . import fleetscene
        return fleetscene.up()
    lab = Lab(variant=variant).up()
    h = lab.hosts()
    print(f"lab up ({variant}): client {h['client'].v4}, LB {h['lb'].v4}, backends "
          f"{', '.join(h[b].v4 for b in lab.backends)}; VIPs {VIP4} and {VIP6} "
          f"(tcp {HTTP_PORT}, udp {UDP_PORT}); run xdplb in {lab.lb} with {CONFIGS[variant]}")
    return 0


def down() -> int:
    """Whichever variant is up."""
    from . import fleet
    fleet.FleetLab().down()
    Lab().down(quiet=False)
    return 0
