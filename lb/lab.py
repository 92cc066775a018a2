"""`xdplb lab up|down`: the demo topology, in network namespaces, built with pyroute2.

variant "tx" (one-armed, XDP_TX), config/lab.toml:

    xl-client ---+                     all on bridge br0 in xl-sw, 10.200.0.0/24, fd00:200::/64
    xl-lb     ---+-- br0 (xl-sw)       LB 10.200.0.2 runs xdplb on lb0
    xl-be1..3 ---+                     backends 10.200.0.11-13, VIPs on their lo, decap XDP

variant "redirect" (XDP_REDIRECT, two LB interfaces), config/lab-redirect.toml:

    xl-client -- brc (xl-sw, 10.200.0.254) -- lb0 [xl-lb] lb1 -- brb (xl-sw, 10.200.2.254) -- xl-be1..3

xl-sw routes between the two segments, so backends answer clients directly (DSR).
VIPs: 10.200.1.10 and fd00:201::10, HTTP on 80 and a UDP echo on 5353; the client routes
them via the LB. Veth traps handled: every peer that receives XDP_TX/REDIRECT frames has
an XDP program; TX checksum offload is off on the client.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from . import netns as N
from .native import Skeleton

PREFIX = "xl-"
CLIENT, LB, SW = "xl-client", "xl-lb", "xl-sw"
BACKENDS = ("xl-be1", "xl-be2", "xl-be3")
VIP4, VIP6 = "10.200.1.10", "fd00:201::10"
HTTP_PORT, UDP_PORT = 80, 5353
PIDDIR = "/run/xdplb-lab"
GUE_PORT = 6080


@dataclass(frozen=True)
class Host:
    ns: str
    v4: str
    v6: str


def hosts(variant: str) -> dict[str, Host]:
    be_net4, be_net6 = ("10.200.0", "fd00:200") if variant == "tx" else ("10.200.2", "fd00:202")
    h = {"client": Host(CLIENT, "10.200.0.1", "fd00:200::1"),
         "lb": Host(LB, "10.200.0.2", "fd00:200::2")}
    for i, ns in enumerate(BACKENDS, start=1):
        h[ns] = Host(ns, f"{be_net4}.1{i}", f"{be_net6}::1{i}")
    return h


def _attach_pass(ns: N.Netns, ifname: str) -> None:
    """An XDP_PASS program on a veth end that must receive XDP_TX/REDIRECT frames."""
    with Skeleton("bench") as sk:
        sk.load()
        ns.xdp_attach(ifname, sk.prog_fd("xdp_pass"), "native")


def _attach_decap(ns: N.Netns, ifname: str) -> None:
    from ._native import lib
    import socket

    with Skeleton("decap") as sk:
        lib.xdplb_decap_set_gue_port(sk.raw, socket.htons(GUE_PORT))
        sk.load()
        ns.xdp_attach(ifname, sk.prog_fd("xdp_decap"), "native")


def _backend(ns: N.Netns, ifname: str, h: Host, gw4: str | None, gw6: str | None) -> None:
    ns.set_link("lo", up=True)
    ns.add_address(ifname, f"{h.v4}/24")
    ns.add_address(ifname, f"{h.v6}/64")
    ns.add_address("lo", f"{VIP4}/32")
    ns.add_address("lo", f"{VIP6}/128")
    ns.relaxed([ifname])
    if gw4:
        ns.add_route("default", via=gw4)
        ns.add_route("default", via=gw6)
    _attach_decap(ns, ifname)


def up(variant: str = "tx") -> int:
    down(quiet=True)
    sw = N.Netns(SW, owned=False)
    sw.set_link("lo", up=True)
    sw.router()
    h = hosts(variant)
    client = N.Netns(CLIENT, owned=False)
    lb = N.Netns(LB, owned=False)
    for ns in (client, lb):
        ns.set_link("lo", up=True)
    if variant == "tx":
        sw.add_bridge("br0")
        segs = {"c": "br0", "b": "br0"}
    else:
        sw.add_bridge("brc")
        sw.add_bridge("brb")
        sw.add_address("brc", "10.200.0.254/24")
        sw.add_address("brc", "fd00:200::254/64")
        sw.add_address("brb", "10.200.2.254/24")
        sw.add_address("brb", "fd00:202::254/64")
        segs = {"c": "brc", "b": "brb"}

    # client
    N.add_veth("c0", client, "sw-c", sw)
    sw.set_link("sw-c", master=segs["c"], up=True)
    client.add_address("c0", f"{h['client'].v4}/24")
    client.add_address("c0", f"{h['client'].v6}/64")
    client.set_tx_checksum("c0", False)
    client.add_route("10.200.1.0/24", via=h["lb"].v4)
    client.add_route("fd00:201::/64", via=h["lb"].v6)
    if variant != "tx":
        client.add_route("default", via="10.200.0.254")
        client.add_route("default", via="fd00:200::254")

    # load balancer
    N.add_veth("lb0", lb, "sw-lb0", sw)
    sw.set_link("sw-lb0", master=segs["c"], up=True)
    lb.add_address("lb0", f"{h['lb'].v4}/24")
    lb.add_address("lb0", f"{h['lb'].v6}/64")
    _attach_pass(sw, "sw-lb0")
    if variant != "tx":
        N.add_veth("lb1", lb, "sw-lb1", sw)
        sw.set_link("sw-lb1", master=segs["b"], up=True)
        lb.add_address("lb1", "10.200.2.2/24")
        lb.add_address("lb1", "fd00:202::2/64")
        _attach_pass(sw, "sw-lb1")

    # backends
    for i, name in enumerate(BACKENDS, start=1):
        ns = N.Netns(name, owned=False)
        N.add_veth("eth0", ns, f"sw-be{i}", sw)
        sw.set_link(f"sw-be{i}", master=segs["b"], up=True)
        gw = (None, None) if variant == "tx" else ("10.200.2.254", "fd00:202::254")
        _backend(ns, "eth0", h[name], *gw)
        _start_server(ns, name)
    print(f"lab up ({variant}): client {h['client'].v4}, LB {h['lb'].v4}, backends "
          f"{', '.join(h[b].v4 for b in BACKENDS)}; VIPs {VIP4} and {VIP6} "
          f"(tcp {HTTP_PORT}, udp {UDP_PORT})")
    return 0


def _start_server(ns: N.Netns, name: str) -> None:
    os.makedirs(PIDDIR, exist_ok=True)
    log = open(os.path.join(PIDDIR, f"{name}.log"), "ab")
    p = ns.spawn([sys.executable, "-m", "lb.labserver", name, "--http", str(HTTP_PORT),
                  "--udp", str(UDP_PORT), "--vip", VIP4, "--vip", VIP6],
                 stdout=log, stderr=log, start_new_session=True)
    with open(os.path.join(PIDDIR, f"{name}.pid"), "w") as f:
        f.write(str(p.pid))


def stop_server(name: str) -> bool:
    path = os.path.join(PIDDIR, f"{name}.pid")
    try:
        pid = int(open(path).read())
        os.killpg(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return False
    finally:
        if os.path.exists(path):
            os.unlink(path)
    return True


def start_server(name: str) -> None:
    _start_server(N.Netns(name, create=False, owned=False), name)


def down(quiet: bool = False) -> int:
    """Remove everything `up` made, whatever state it is in."""
    for name in BACKENDS:
        stop_server(name)
    for name in N.list_namespaces():
        if name.startswith(PREFIX):
            N.remove(name)
    if not quiet:
        print("lab down")
    return 0


def client_http(host: str, n: int) -> tuple[collections.Counter, int]:
    """n HTTP GETs from the client namespace: (answers per backend name, failures)."""
    def work(host: str, n: int):
        got, failed = collections.Counter(), 0
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(n):
            try:
                with socket.socket(fam, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    s.connect((host, HTTP_PORT))
                    s.sendall(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                got[data.split(b"\r\n\r\n", 1)[1].strip().decode()] += 1
            except (OSError, IndexError):
                failed += 1
        return got, failed
    return N.run_in(CLIENT, work, host, n, timeout=120)


def client_udp(host: str, n: int) -> tuple[collections.Counter, int]:
    """n UDP echo requests from the client namespace, likewise."""
    def work(host: str, n: int):
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
    return N.run_in(CLIENT, work, host, n, timeout=120)
