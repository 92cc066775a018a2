"""Real traffic through xdplb in network namespaces: UDP datagrams from a client socket
to a VIP, load-balanced by the XDP program, encapsulated, decapsulated by bpf/decap on
the backend's interface and delivered to a socket bound to the VIP there; the backend's
reply goes straight back to the client (DSR).

Two topologies, each built once per module in namespaces with unique names and removed
in a finalizer:

  redirect (two-armed, tx_mode redirect):
      client --veth-- [cin  LB  lout] --veth-- backend
      xdplb on cin (ingress), bpf_redirect_map into lout, decap on the backend's end.
      Replies: backend -> LB namespace's kernel routing -> client (not through XDP).

  tx (one-armed, XDP_TX): client, LB and backend each on a bridge in a 'switch' ns;
      xdplb on the LB's only interface sends encapsulated frames back out of it.
      Replies: backend -> bridge -> client, never seen by the LB.

Every frame XDP sends into a veth needs an XDP program on the receiving peer (else the
veth drops it, counting xdp_tx_errors): decap on the backend ends, xdp_pass (from the
decap object) on the switch's LB port.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import select
import socket
import time
from dataclasses import dataclass
from typing import Optional

import pytest

from lb import layout
from lb.lab import namespaces, netns
from lb.datapath import Datapath, EgressConfig, Limits
from lb.flowhash import flow_hash
from lb.lab.decap import decap_stats, load_decap
from lb.native import BpfError, Skeleton
from lb.programmer import Programmer
from lb.specs import BackendSpec, VipSpec

ip = ipaddress.ip_address

VIP_PORT = 5000
GUE_PORT = 6080
RING = 1009
PAYLOAD = 64
SO_NO_CHECK = 11
# <linux/in.h>: IP_MTU_DISCOVER and its values (DONT: no DF; DO: DF, never fragment)
IP_MTU_DISCOVER, IP_PMTUDISC_DONT, IP_PMTUDISC_DO = 10, 0, 2
DEADLINE = 5.0  # seconds to wait for a burst to arrive; never reached when all is well


def _attach(ns: netns.Netns, ifname: str, prog_fd: int) -> str:
    """Native XDP if the driver takes it (veth does), else generic."""
    try:
        ns.xdp_attach(ifname, prog_fd, "native")
        return "native"
    except BpfError:
        ns.xdp_attach(ifname, prog_fd, "generic")
        return "generic"


@dataclass
class Lab:
    kind: str
    client: netns.Netns
    lb: netns.Netns
    backend: netns.Netns
    dp: Datapath
    programmer: Programmer
    decap: Skeleton
    client_v4: ipaddress.IPv4Address
    client_v6: ipaddress.IPv6Address
    backends_v4: tuple
    backends_v6: tuple
    vip4: ipaddress.IPv4Address
    vip6: ipaddress.IPv6Address
    smac: bytes
    nexthop_mac: bytes
    source_v4: ipaddress.IPv4Address
    source_v6: ipaddress.IPv6Address
    tx_mode: int
    lb_mode: str = ""
    tx_port: Optional[int] = None  # XDP_REDIRECT's target

    def configure(self, encap: int, vip: ipaddress._BaseAddress, backends: tuple) -> None:
        self.dp.set_config(EgressConfig(
            smac=self.smac, encap=encap, tx_mode=self.tx_mode, source_v4=self.source_v4,
            source_v6=self.source_v6, gue_port=GUE_PORT, mtu=1500, tx_port=self.tx_port))
        self.programmer.apply([VipSpec(vip, VIP_PORT, socket.IPPROTO_UDP,
                                 backends=tuple(BackendSpec(b, nexthop="nh")
                                                for b in backends),
                                 ring_size=RING)],
                        macs={"nh": self.nexthop_mac})


def _mac(n: int) -> bytes:
    return bytes([0x02, 0x00, 0x5E, 0x10, 0x00, n])


@contextlib.contextmanager
def _namespaces(*roles: str):
    made: list[netns.Netns] = []
    try:
        for r in roles:
            made.append(netns.Netns(namespaces.unique_name(f"xr{r}")))
        yield made
    finally:
        for ns in reversed(made):
            ns.remove()


def _load_dp() -> Datapath:
    return Datapath(Limits(max_vips=64, max_backends=64, max_nexthops=16,
                           flow_table_size=4096))


def _plumb(cl: netns.Netns, be: netns.Netns, addresses, neighbours, routes) -> None:
    """Addresses (ns, ifname, prefixes), static neighbours (ns, ifname, mac, addresses:
    no ARP/NDP races in the first burst) and routes (ns, dst, via); the backend accepts
    packets for addresses it owns from anywhere, and neither client nor backend leaves
    a UDP checksum to an offload (XDP handles their frames on the way)."""
    for ns, ifname, prefixes in addresses:
        for prefix in prefixes:
            ns.add_address(ifname, prefix)
    for ns, ifname, mac, addrs in neighbours:
        for addr in addrs:
            ns.add_neighbor(ifname, addr, mac)
    for ns, dst, via in routes:
        ns.add_route(dst, via=via)
    be.relaxed(["b0"])
    cl.set_tx_checksum("c0", False)
    be.set_tx_checksum("b0", False)


@pytest.fixture(scope="module")
def redirect_lab():
    with contextlib.ExitStack() as stack:
        cl, lbn, be = stack.enter_context(_namespaces("c", "l", "b"))
        netns.add_veth("c0", cl, "cin", lbn, mac_a=_mac(1), mac_b=_mac(2))
        netns.add_veth("lout", lbn, "b0", be, mac_a=_mac(3), mac_b=_mac(4))
        _plumb(cl, be,
               addresses=[(cl, "c0", ("10.11.0.1/24", "fd11::1/64")),
                          (lbn, "cin", ("10.11.0.2/24", "fd11::2/64")),
                          (lbn, "lout", ("10.12.0.1/24", "fd12::1/64")),
                          (be, "b0", ("10.12.0.2/24", "10.12.0.3/24", "fd12::2/64",
                                      "fd12::3/64")),
                          (be, "lo", ("10.100.0.1/32", "fd00:100::1/128"))],
               neighbours=[(cl, "c0", _mac(2), ("10.11.0.2", "fd11::2")),
                           (lbn, "cin", _mac(1), ("10.11.0.1", "fd11::1")),
                           (be, "b0", _mac(3), ("10.12.0.1", "fd12::1"))],
               routes=[(cl, "10.100.0.0/24", "10.11.0.2"), (cl, "fd00:100::/64", "fd11::2"),
                       (be, "default", "10.12.0.1"), (be, "default", "fd12::1")])
        lbn.router()

        dp = stack.enter_context(_load_dp())
        decap = stack.enter_context(load_decap(GUE_PORT))
        with lbn.entered():  # the devmap resolves the ifindex in the caller's netns
            dp.set_tx_port(lbn.ifindex("lout"))
        lab = Lab("redirect", cl, lbn, be, dp, Programmer(dp), decap,
                  ip("10.11.0.1"), ip("fd11::1"),
                  (ip("10.12.0.2"), ip("10.12.0.3")), (ip("fd12::2"), ip("fd12::3")),
                  ip("10.100.0.1"), ip("fd00:100::1"), _mac(3), _mac(4),
                  ip("10.12.0.1"), ip("fd12::1"), layout.TX_REDIRECT,
                  tx_port=lbn.ifindex("lout"))
        _attach(be, "b0", decap.prog_fd("xdp_decap"))
        lab.lb_mode = _attach(lbn, "cin", dp.prog_fd)
        # Tests close their sockets (an open one would keep its namespace alive); the
        # ExitStack unloads the programs (attached ones stay referenced by their
        # interfaces) and removes the namespaces, taking the interfaces along.
        yield lab


@pytest.fixture(scope="module")
def tx_lab():
    with contextlib.ExitStack() as stack:
        sw, cl, lbn, be = stack.enter_context(_namespaces("s", "c", "l", "b"))
        sw.add_bridge("br0")
        for name, ns, peer, n in (("c0", cl, "swc", 0x21), ("l0", lbn, "swl", 0x22),
                                  ("b0", be, "swb", 0x23)):
            netns.add_veth(name, ns, peer, sw, mac_a=_mac(n))
            sw.set_link(peer, master="br0", up=True)
        _plumb(cl, be,
               addresses=[(cl, "c0", ("10.21.0.1/24", "fd21::1/64")),
                          (lbn, "l0", ("10.21.0.2/24", "fd21::2/64")),
                          (be, "b0", ("10.21.0.3/24", "10.21.0.4/24", "fd21::3/64",
                                      "fd21::4/64")),
                          (be, "lo", ("10.100.1.1/32", "fd00:101::1/128"))],
               neighbours=[(cl, "c0", _mac(0x22), ("10.21.0.2", "fd21::2")),
                           (be, "b0", _mac(0x21), ("10.21.0.1", "fd21::1"))],
               routes=[(cl, "10.100.1.0/24", "10.21.0.2"), (cl, "fd00:101::/64", "fd21::2")])

        dp = stack.enter_context(_load_dp())
        decap = stack.enter_context(load_decap(GUE_PORT))
        lab = Lab("tx", cl, lbn, be, dp, Programmer(dp), decap,
                  ip("10.21.0.1"), ip("fd21::1"),
                  (ip("10.21.0.3"), ip("10.21.0.4")), (ip("fd21::3"), ip("fd21::4")),
                  ip("10.100.1.1"), ip("fd00:101::1"), _mac(0x22), _mac(0x23),
                  ip("10.21.0.2"), ip("fd21::2"), layout.TX_XDP_TX)
        _attach(sw, "swl", decap.prog_fd("xdp_pass"))  # receives the LB's XDP_TX frames
        _attach(be, "b0", decap.prog_fd("xdp_decap"))
        lab.lb_mode = _attach(lbn, "l0", dp.prog_fd)
        yield lab


def _recv_all(sock: socket.socket, n: int, deadline: float) -> list:
    """Up to n datagrams, each as (data, addr), waiting at most until deadline."""
    got = []
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([sock], [], [], min(left, 0.2))
        if r:
            got.append(sock.recvfrom(4096))
    return got


def _burst(lab: Lab, vip, n: int, *, no_check: bool = False, reply: bool = True) -> dict:
    """n datagrams from n client sockets (n flows) to vip:VIP_PORT; checks that the
    backend's socket gets them all and (reply=True) that each client gets an answer from
    the VIP. Returns the client (addr, port) -> payload seen by the backend."""
    fam = socket.AF_INET6 if vip.version == 6 else socket.AF_INET
    with contextlib.ExitStack() as closing:
        srv = closing.enter_context(lab.backend.socket(fam))
        srv.bind((str(vip), VIP_PORT))
        clients = []
        for i in range(n):
            c = closing.enter_context(lab.client.socket(fam))
            if no_check:
                c.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            c.sendto(f"req {i:03d} ".encode().ljust(PAYLOAD, b"."), (str(vip), VIP_PORT))
            clients.append(c)
        got = _recv_all(srv, n, time.monotonic() + DEADLINE)
        seen = {addr[:2]: data for data, addr in got}
        assert len(got) == n, f"backend received {len(got)} of {n} datagrams"
        assert len(seen) == n
        for data in seen.values():
            assert len(data) == PAYLOAD and data.startswith(b"req ")
        if reply:
            for addr, data in seen.items():
                srv.sendto(b"rep" + data[3:], addr)
            deadline = time.monotonic() + DEADLINE
            for c in clients:
                r = _recv_all(c, 1, deadline)
                assert r, f"client {c.getsockname()} got no reply"
                data, frm = r[0]
                assert ip(frm[0].split("%")[0]) == vip and frm[1] == VIP_PORT, frm
                assert data.startswith(b"rep ")
    return seen


def _expected_backends(lab: Lab, vip, seen: dict) -> collections.Counter:
    """Backend id per flow, computed in Python from the installed ring and the hash."""
    ring = lab.dp.read_ring(lab.programmer.installed((vip, VIP_PORT, socket.IPPROTO_UDP)).ring_id)
    assert ring is not None and len(ring) == RING
    want = collections.Counter()
    for src, sport in seen:
        h = flow_hash(socket.IPPROTO_UDP, ip(src), sport, vip, VIP_PORT)
        want[ring[h % RING]] += 1
    return want


CASES = [
    # id, vip family, backend family, encap
    ("ipip", 4, 4, layout.ENCAP_IPIP),
    ("ip6ip6", 6, 6, layout.ENCAP_IPIP),
    ("4in6", 4, 6, layout.ENCAP_IPIP),
    ("6in4", 6, 4, layout.ENCAP_IPIP),
    ("gue4", 4, 4, layout.ENCAP_GUE),
    ("gue6", 6, 6, layout.ENCAP_GUE),
    ("gue6in4", 6, 4, layout.ENCAP_GUE),
]


def _run_case(lab: Lab, vfam: int, bfam: int, encap: int, n: int = 24) -> None:
    vip = lab.vip4 if vfam == 4 else lab.vip6
    backends = lab.backends_v4 if bfam == 4 else lab.backends_v6
    lab.configure(encap, vip, backends)
    g0 = lab.dp.global_counters()
    d0 = decap_stats(lab.decap)
    installed = lab.programmer.installed((vip, VIP_PORT, socket.IPPROTO_UDP))
    bids = installed.backends
    b0 = {bid: lab.dp.backend_counters(bid) for bid in bids.values()}
    v0 = lab.dp.vip_counters(installed.vip_id, bids.values())[0]

    seen = _burst(lab, vip, n)

    g1 = lab.dp.global_counters()
    d1 = decap_stats(lab.decap)
    delta = {k: g1[k] - g0[k] for k in g1}
    sent_kind = "redirect" if lab.tx_mode == layout.TX_REDIRECT else "tx"
    other_kind = "tx" if sent_kind == "redirect" else "redirect"
    assert delta[sent_kind] == n, delta
    assert delta[other_kind] == 0, delta
    assert delta["drop"] == 0, delta
    # a client port reused from an earlier case may find its old entry (hit, or moved
    # when that case's backends are gone); either way the ring decides as below
    assert delta["flow_miss"] + delta["flow_hit"] + delta["flow_moved"] == n, delta
    assert d1[1] - d0[1] == n, "decap stripped count"

    frame = 14 + (20 if vfam == 4 else 40) + 8 + PAYLOAD
    vid = installed.vip_id
    vp, vb = lab.dp.vip_counters(vid, bids.values())[0]
    assert (vp - v0[0], vb - v0[1]) == (n, n * frame)
    want = _expected_backends(lab, vip, seen)
    got = {}
    for bid in bids.values():
        p, b = lab.dp.backend_counters(bid)
        got[bid] = (p - b0[bid][0], b - b0[bid][1])
    assert {bid: pb for bid, pb in got.items() if pb[0]} == \
        {bid: (cnt, cnt * frame) for bid, cnt in want.items()}
    assert len(want) == 2, f"{n} flows all went to one of two backends: {want}"


@pytest.mark.parametrize("vfam,bfam,encap", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_redirect_path(redirect_lab, vfam, bfam, encap):
    _run_case(redirect_lab, vfam, bfam, encap)


@pytest.mark.parametrize("vfam,bfam,encap", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_xdp_tx_path(tx_lab, vfam, bfam, encap):
    _run_case(tx_lab, vfam, bfam, encap)


def test_redirect_lab_uses_native_xdp(redirect_lab, tx_lab):
    """veth takes native XDP; a fallback to generic would hide the native veth paths
    (XDP_TX into a peer, ndo_xdp_xmit) these tests are meant to cover."""
    assert redirect_lab.lb_mode == "native"
    assert tx_lab.lb_mode == "native"
    q = redirect_lab.lb.xdp_query("cin")
    assert q["drv"] and not q["skb"]


def test_gue_zero_checksum_inner(redirect_lab):
    """An inner IPv4 UDP datagram sent without checksum (SO_NO_CHECK) is carried in GUE
    with UDP checksum 0 (counted) and still delivered."""
    lab = redirect_lab
    lab.configure(layout.ENCAP_GUE, lab.vip4, lab.backends_v4)
    g0 = lab.dp.global_counters()
    _burst(lab, lab.vip4, 8, no_check=True, reply=False)
    g1 = lab.dp.global_counters()
    assert g1["gue_zero_csum"] - g0["gue_zero_csum"] == 8
    assert g1["redirect"] - g0["redirect"] == 8


def test_replies_bypass_the_lb(tx_lab):
    """DSR on the one-armed lab: the LB namespace does not forward (ip_forward 0), so a
    reply from the VIP that reaches the client came backend -> bridge -> client. The
    LB's program handled exactly the requests (other frames it saw, IPv6 multicast
    chatter on the bridge, were passed)."""
    lab = tx_lab
    assert lab.lb.sysctl_get("net.ipv4.ip_forward") == "0"
    lab.configure(layout.ENCAP_IPIP, lab.vip4, lab.backends_v4)
    g0 = lab.dp.global_counters()
    _burst(lab, lab.vip4, 16, reply=True)
    g1 = lab.dp.global_counters()
    d = {k: g1[k] - g0[k] for k in g1}
    assert d["tx"] == 16 and d["drop"] == 0
    assert d["rx"] == d["tx"] + d["pass"]


def test_non_vip_traffic_passes(redirect_lab):
    """A datagram to an LB-namespace address (not a VIP) is passed to the LB's stack."""
    lab = redirect_lab
    with lab.lb.socket() as srv, lab.client.socket() as c:
        srv.bind(("10.11.0.2", 7000))
        g0 = lab.dp.global_counters()
        c.sendto(b"hello", ("10.11.0.2", 7000))
        got = _recv_all(srv, 1, time.monotonic() + DEADLINE)
    assert got and got[0][0] == b"hello"
    g1 = lab.dp.global_counters()
    assert g1["pass"] - g0["pass"] >= 1
    assert g1["redirect"] == g0["redirect"]


def test_too_big_is_dropped(redirect_lab):
    """Inner 1500-byte IPv4 packet without DF + 20-byte outer header exceeds mtu 1500:
    dropped and counted, nothing reaches the backend. (With DF it is answered with ICMP
    fragmentation needed: test_too_big_with_df_is_answered.)"""
    lab = redirect_lab
    lab.configure(layout.ENCAP_IPIP, lab.vip4, lab.backends_v4)
    with lab.backend.socket() as srv, lab.client.socket() as c:
        c.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)  # no DF
        srv.bind((str(lab.vip4), VIP_PORT))
        g0 = lab.dp.global_counters()
        c.sendto(b"x" * (1500 - 28), (str(lab.vip4), VIP_PORT))
        c.sendto(b"small", (str(lab.vip4), VIP_PORT))  # same flow, fits: the path works
        got = _recv_all(srv, 1, time.monotonic() + DEADLINE)
    assert [d for d, _ in got] == [b"small"]  # one flow keeps its order: big was first
    g1 = lab.dp.global_counters()
    assert g1["drop_too_big"] - g0["drop_too_big"] == 1
    assert g1["redirect"] - g0["redirect"] == 1


def test_too_big_with_df_is_answered(redirect_lab):
    """The same with DF (Linux's default for UDP): not sent to the backend either, but
    answered with ICMP fragmentation needed (counted; its delivery is tests/test_pmtu_lab)."""
    lab = redirect_lab
    lab.configure(layout.ENCAP_IPIP, lab.vip4, lab.backends_v4)
    with lab.backend.socket() as srv, lab.client.socket() as c:
        c.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        srv.bind((str(lab.vip4), VIP_PORT))
        g0 = lab.dp.global_counters()
        c.sendto(b"x" * (1500 - 28), (str(lab.vip4), VIP_PORT))
        c.sendto(b"small", (str(lab.vip4), VIP_PORT))
        got = _recv_all(srv, 1, time.monotonic() + DEADLINE)
    assert [d for d, _ in got] == [b"small"]
    g1 = lab.dp.global_counters()
    assert g1["too_big_answered"] - g0["too_big_answered"] == 1
    assert g1["drop_too_big"] == g0["drop_too_big"]
    assert g1["redirect"] - g0["redirect"] == 1


def _udp_csum_errors() -> tuple[int, int]:
    """(Udp InCsumErrors, Udp6InCsumErrors) of the current namespace."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    v4 = int(rows[1][rows[0].index("InCsumErrors")])
    with open("/proc/net/snmp6") as f:
        v6 = next(int(line.split()[1]) for line in f if line.startswith("Udp6InCsumErrors"))
    return v4, v6


@pytest.mark.parametrize("vfam,bfam", [(4, 4), (6, 6), (6, 4), (4, 6)],
                         ids=["v4_in_v4", "v6_in_v6", "v6_in_v4", "v4_in_v6"])
def test_gue_checksum_accepted_by_kernel(redirect_lab, vfam, bfam):
    """Without decap on the backend (xdp_pass instead), GUE datagrams reach a UDP socket
    on gue_port only if the kernel finds their UDP checksum (computed by xdplb from the
    inner packet's sums) valid; what arrives must be exactly the inner packet."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    lab = redirect_lab
    vip = lab.vip4 if vfam == 4 else lab.vip6
    backends = lab.backends_v4 if bfam == 4 else lab.backends_v6
    lab.configure(layout.ENCAP_GUE, vip, backends)
    fam_b = socket.AF_INET6 if bfam == 6 else socket.AF_INET
    fam_v = socket.AF_INET6 if vfam == 6 else socket.AF_INET
    errors0 = lab.backend.run(_udp_csum_errors)
    with lab.backend.socket(fam_b) as gue:
        if fam_b == socket.AF_INET6:
            gue.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        gue.bind(("::" if bfam == 6 else "0.0.0.0", GUE_PORT))
        lab.backend.xdp_attach("b0", lab.decap.prog_fd("xdp_pass"), "native")  # for decap
        try:
            n = 8
            for i in range(n):
                with lab.client.socket(fam_v) as c:
                    c.sendto(f"gue {i}".encode().ljust(PAYLOAD, b"."), (str(vip), VIP_PORT))
            got = _recv_all(gue, n, time.monotonic() + DEADLINE)
        finally:
            lab.backend.xdp_attach("b0", lab.decap.prog_fd("xdp_decap"), "native")
    assert lab.backend.run(_udp_csum_errors) == errors0
    assert len(got) == n, f"{len(got)} of {n} GUE datagrams passed the kernel's checksum"
    for data, frm in got:
        assert ip(frm[0]) in (lab.source_v4, lab.source_v6)
        assert 0xC000 <= frm[1] <= 0xFFFF  # source port from the flow hash
        inner = IP(data) if vfam == 4 else IPv6(data)
        assert ip(inner.dst) == vip and inner.dport == VIP_PORT
        assert bytes(inner.payload.payload).startswith(b"gue ")
        raw_len = inner.len if vfam == 4 else inner.plen + 40
        assert raw_len == len(data)
