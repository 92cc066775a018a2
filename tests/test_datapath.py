"""The XDP data path, run through BPF_PROG_TEST_RUN on the real lb.bpf.o.

Table-driven: every row is (id, input frame, expected verdict, expected output check,
expected counter deltas). Forwarded frames are checked field by field against values
computed here (tests/packets.py: check_encap), and the backend against the Python
reference (lb.flowhash + the installed ring). Then: truncation at every length, and
backend agreement over 10,000 random flows per VIP.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, IPOption_NOP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt,
                                IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.layers.l2 import ARP, Dot1Q

from lb import layout
from lb.datapath import Limits
from lb.errors import BpfError
from lb.specs import VipSpec

from packets import (A, LB_MAC, TCP_P, UDP_P, Flow, LbEnv, assert_globals, be, check_encap,
                     eth, fast_frame, frame, mac_for, ones_sum, outer_dst, parse_input, pkt,
                     prefilter_collider, pseudo_header)

RING = 1009
GUE_PORT = 6635
GUE = dict(encap=layout.ENCAP_GUE, gue_port=GUE_PORT)
NO_ANSWERS = {"too_big_per_sec": 0}

B4 = (be("10.1.0.11"), be("10.1.0.12", weight=2), be("10.1.0.13"))
B4_P0 = (be("10.1.1.21"), be("10.1.1.22"))
B6 = (be("fd00:1::11"), be("fd00:1::12"), be("fd00:1::13", weight=3))

V4, V4_6, V6, V6_4 = "192.0.2.10", "192.0.2.20", "2001:db8::10", "2001:db8::20"
V4_P0, V6_P0 = "192.0.2.30", "2001:db8::30"
V4_NB, V4_DR, V6_NB, V4_NH = "192.0.2.40", "192.0.2.41", "2001:db8::40", "192.0.2.50"
C4, C6 = "198.51.100.7", "2001:db8:c::7"          # clients
OTHER4, OTHER6 = "198.18.0.1", "2001:db8:ff::1"     # not VIPs (prefilter miss, normally)
UDPP = 8053


def vip(addr, port, proto, backends, **kw):
    return VipSpec(A(addr), port, proto, tuple(backends), ring_size=kw.pop("ring_size", RING),
                   **kw)


SPECS = [
    vip(V4, 80, TCP_P, B4), vip(V4, UDPP, UDP_P, B4), vip(V4, 0, UDP_P, B4_P0),
    vip(V4_6, 80, TCP_P, B6), vip(V4_6, UDPP, UDP_P, B6),
    vip(V6, 80, TCP_P, B6), vip(V6, UDPP, UDP_P, B6),
    vip(V6_4, 80, TCP_P, B4), vip(V6_4, UDPP, UDP_P, B4),
    vip(V4_P0, 0, TCP_P, B4), vip(V6_P0, 0, UDP_P, B6),
    vip(V4_NB, 80, TCP_P, (be("10.1.0.11", state="maint"), be("10.1.0.12", state="down"))),
    vip(V4_DR, 80, TCP_P, (be("10.1.0.11", state="drain"),)),
    vip(V6_NB, 80, TCP_P, (be("fd00:1::11", state="maint"),)),
    vip(V4_NH, 80, TCP_P, (be("10.1.0.50", nexthop="unresolved"),)),
    vip(V4_NH, 81, TCP_P, (be("10.1.0.51", nexthop="zero-mac"),)),
]
VIP_ADDRS = {s.address for s in SPECS}
COLL4 = str(prefilter_collider(A(V4), VIP_ADDRS))
COLL6 = str(prefilter_collider(A(V6), VIP_ADDRS))


@pytest.fixture(scope="module")
def env():
    e = LbEnv()
    try:
        macs = {}
        for s in SPECS:
            for b in s.backends:
                if b.nexthop == str(b.address):
                    macs[b.nexthop] = mac_for(b.nexthop)
        macs["zero-mac"] = bytes(6)  # "unresolved" deliberately has no entry
        e.apply(SPECS, macs)
        yield e
    finally:
        e.close()


# --------------------------------------------------------------------------- rows

@dataclass
class Row:
    id: str
    data: bytes
    verdict: str                 # "tx" | "pass" | "drop" | "redirect"
    check: str                   # "encap": full outer check; "same": bytes unchanged
    counters: dict
    cfg: dict = field(default_factory=dict)
    vip_hit: bool = False        # the VIP's packet/byte counters move
    flow_entry: bool = False     # a flow-table entry for the expected backend appears
    zero_csum: bool = False


def fwd(id, data, cfg=None, zero_csum=False, verdict="tx"):
    c = {"rx": 1, "flow_miss": 1, ("tx" if verdict == "tx" else "redirect"): 1}
    if zero_csum:
        c["gue_zero_csum"] = 1
    return Row(id, data, verdict, "encap", c, cfg or {}, True, True, zero_csum)


def passes(id, data, cfg=None):
    return Row(id, data, "pass", "same", {"rx": 1, "pass": 1}, cfg or {})


def drops(id, data, reason, cfg=None, vip_hit=False, flow_entry=False, miss=False,
          limited=False):
    c = {"rx": 1, "drop": 1, reason: 1}
    if miss:
        c["flow_miss"] = 1
    if limited:
        c["too_big_limited"] = 1
    return Row(id, data, "drop", "same", c, cfg or {}, vip_hit, flow_entry)


OTHER_MAC = bytes.fromhex("0200000000aa")
OURS = {"if_mac": LB_MAC}  # the receiving interface's MAC, as the daemon sets it


def other_host(id, data, cfg=None):
    return Row(id, data, "pass", "same", {"rx": 1, "pass": 1, "other_host_passed": 1},
               dict(OURS, **(cfg or {})))


def to_mac(data: bytes, mac: bytes) -> bytes:
    return mac + data[6:]


def t4(dst, dport=80, src=C4, sport=40001, payload=b"hello", ip=None, l4=None):
    return pkt("tcp", src, dst, sport, dport, payload, ip, l4)


def u4(dst, dport=UDPP, src=C4, sport=40002, payload=b"hello", ip=None, l4=None):
    return pkt("udp", src, dst, sport, dport, payload, ip, l4)


def t6(dst, dport=80, src=C6, sport=40003, payload=b"hello", ip=None, l4=None):
    return pkt("tcp", src, dst, sport, dport, payload, ip, l4)


def u6(dst, dport=UDPP, src=C6, sport=40004, payload=b"hello", ip=None, l4=None):
    return pkt("udp", src, dst, sport, dport, payload, ip, l4)


def patch(data: bytes, off: int, new: bytes) -> bytes:
    return data[:off] + new + data[off + len(new):]


def sized(builder, dst, inner_len, **kw):
    """A packet whose inner IP packet is exactly inner_len bytes."""
    probe = builder(dst, payload=b"", **kw)
    return builder(dst, payload=b"x" * (inner_len - (len(probe) - 14)), **kw)


ENCAP_CASES = [  # (name, builder, dst)
    ("4in4-tcp", t4, V4), ("4in4-udp", u4, V4),
    ("4in6-tcp", t4, V4_6), ("4in6-udp", u4, V4_6),
    ("6in6-tcp", t6, V6), ("6in6-udp", u6, V6),
    ("6in4-tcp", t6, V6_4), ("6in4-udp", u6, V6_4),
]

ROWS: list[Row] = []
for name, b, dst in ENCAP_CASES:
    ROWS.append(fwd(f"ipip-{name}", b(dst)))
    ROWS.append(fwd(f"gue-{name}", b(dst), GUE))
    ROWS.append(fwd(f"gue-{name}-odd-payload", b(dst, payload=b"abcdefg"), GUE))
    ROWS.append(fwd(f"ipip-{name}-empty-payload", b(dst, payload=b"")))
ROWS += [
    # ToS / traffic class copied out (ECN bits included); the inner flow label is not used
    fwd("tos-4in4", t4(V4, ip={"tos": 0xB9})),
    fwd("tos-4in6", u4(V4_6, ip={"tos": 0x2B})),
    fwd("tc-6in6", t6(V6, ip={"tc": 0xB9, "fl": 0x12345})),
    fwd("tc-6in4", u6(V6_4, ip={"tc": 0x46, "fl": 0xFFFFF})),
    fwd("tc-gue-6in6", u6(V6, ip={"tc": 0xFD, "fl": 1}), GUE),
    fwd("tos-gue-4in4", t4(V4, ip={"tos": 0x03}), GUE),
    # DF copied from an inner IPv4, and only DF (not MF/evil bits, not the offset)
    fwd("df-4in4", t4(V4, ip={"flags": "DF"})),
    fwd("no-df-4in4", t4(V4, ip={"flags": 0})),
    fwd("evil-bit-4in4", u4(V4, ip={"flags": "evil"})),
    fwd("df-gue-4in4", u4(V4, ip={"flags": "DF"}), GUE),
    fwd("no-df-gue-4in4", u4(V4, ip={"flags": 0}), GUE),
    # inner IPv4 UDP without checksum: GUE checksum 0, counted
    fwd("gue-zero-csum-4in4", u4(V4, l4={"chksum": 0}), GUE, zero_csum=True),
    fwd("gue-zero-csum-4in6", u4(V4_6, l4={"chksum": 0}), GUE, zero_csum=True),
    # Ethernet padding after the IP packet: lengths come from the IP header
    fwd("padded-4in4-udp", u4(V4, payload=b"") + b"\0" * 18),
    fwd("padded-gue-4in6-udp", u4(V4_6, payload=b"") + b"\xee" * 18, GUE),
    fwd("padded-6in6", u6(V6, payload=b"z") + b"\0" * 9),
    # port-0 VIPs; an exact (addr, port, proto) wins over port 0 on the same address
    fwd("port0-v4-tcp", t4(V4_P0, dport=4242)),
    fwd("port0-v4-tcp-port0", t4(V4_P0, dport=0)),
    fwd("port0-v6-udp", u6(V6_P0, dport=9999)),
    fwd("port0-v4-udp-fallback", u4(V4, dport=5000)),
    fwd("exact-beats-port0", u4(V4, dport=UDPP)),
    # MTU: inner length + outer headers == mtu goes, one more byte is too big
    fwd("mtu-exact-ipip-v4", sized(t4, V4, 1480)),
    fwd("mtu-exact-ipip-v6", sized(t6, V6, 1460)),
    fwd("mtu-exact-gue-v4", sized(u4, V4, 1472), GUE),
    fwd("mtu-exact-gue-v6", sized(u6, V6, 1452), GUE),
    fwd("mtu-exact-gue-4in6", sized(u4, V4_6, 1452), GUE),
    fwd("mtu-small-exact-6in4", sized(t6, V6_4, 556), {"mtu": 576}),
    drops("too-big-ipip-v4", sized(t4, V4, 1481), "drop_too_big", None, True, True, True),
    # (IPv6 and IPv4 with DF are answered with ICMP, tests/test_icmp.py; here without a
    # budget for answers: dropped as without DF)
    drops("too-big-ipip-v6", sized(t6, V6, 1461), "drop_too_big", NO_ANSWERS, True, True, True,
          limited=True),
    drops("too-big-ipip-v4-df", sized(t4, V4, 1481, ip={"flags": "DF"}), "drop_too_big",
          NO_ANSWERS, True, True, True, limited=True),
    drops("too-big-gue-v4", sized(u4, V4, 1473), "drop_too_big", GUE, True, True, True),
    drops("too-big-gue-v6", sized(u6, V6, 1453), "drop_too_big", dict(GUE, **NO_ANSWERS), True,
          True, True, limited=True),
    drops("too-big-gue-4in6", sized(t4, V4_6, 1453), "drop_too_big", GUE, True, True, True),
    # an MTU below IPv6's minimum after encapsulation cannot be advertised: dropped
    drops("too-big-small-mtu-6in4", sized(t6, V6_4, 557), "drop_too_big", {"mtu": 576},
          True, True, True),
    drops("too-big-mtu-0", t4(V4), "drop_too_big", {"mtu": 0}, True, True, True),
    # XDP_REDIRECT toward tx_port (slot set to lo by the test)
    fwd("redirect-4in4", t4(V4), {"tx_mode": layout.TX_REDIRECT}, verdict="redirect"),
    fwd("redirect-gue-zero-csum", u4(V4_6, l4={"chksum": 0}),
        dict(GUE, tx_mode=layout.TX_REDIRECT), zero_csum=True, verdict="redirect"),
    fwd("redirect-gue-6in6", u6(V6), dict(GUE, tx_mode=layout.TX_REDIRECT), verdict="redirect"),
    # redirect mode but no egress port in tx_port (not set yet, or the device went away):
    # a drop, counted as one (egress unresolved), not as a redirect
    Row("redirect-no-tx-port", t4(V4), "drop", "encap",
        {"rx": 1, "drop": 1, "drop_no_nexthop": 1, "flow_miss": 1},
        {"tx_mode": layout.TX_REDIRECT}, vip_hit=True, flow_entry=True),
    Row("redirect-no-tx-port-gue-zero-csum", u4(V4, l4={"chksum": 0}), "drop", "encap",
        {"rx": 1, "drop": 1, "drop_no_nexthop": 1, "flow_miss": 1},
        dict(GUE, tx_mode=layout.TX_REDIRECT), vip_hit=True, flow_entry=True, zero_csum=True),
    # VIP with no usable backend; unresolved next hop
    drops("no-backend-maint-down", t4(V4_NB), "drop_no_backend", None, True, False, True),
    drops("no-backend-drain-only", t4(V4_DR), "drop_no_backend", None, True, False, True),
    drops("no-backend-v6", t6(V6_NB), "drop_no_backend", None, True, False, True),
    drops("no-nexthop-missing", t4(V4_NH, 80), "drop_no_nexthop", None, True, True, True),
    drops("no-nexthop-zero-mac", t4(V4_NH, 81), "drop_no_nexthop", None, True, True, True),
    # not for a VIP: passes untouched
    passes("non-vip-v4", t4(OTHER4)),
    passes("non-vip-v6", u6(OTHER6)),
    passes("prefilter-collider-v4", t4(COLL4)),
    passes("prefilter-collider-v6", t6(COLL6)),
    passes("vip-addr-other-port", t4(V4, dport=81)),
    passes("vip-addr-other-proto-v6", u6(V6, dport=80)),
    passes("vip-addr-tcp-no-port0", t4(V4_6, dport=443)),
    # echo requests to a VIP are answered unless answer_ping is off (tests/test_icmp.py)
    passes("icmp-to-vip", frame(IP(src=C4, dst=V4) / ICMP()), {"answer_ping": False}),
    passes("icmpv6-to-vip", frame(IPv6(src=C6, dst=V6) / ICMPv6EchoRequest()),
           {"answer_ping": False}),
    passes("arp", bytes(eth() / ARP(psrc=C4, pdst=V4, hwsrc="02:00:00:00:00:99"))),
    passes("vlan-tagged-to-vip", bytes(eth() / Dot1Q(vlan=5) / IP(src=C4, dst=V4) /
                                       TCP(sport=1, dport=80))),
    passes("ipv6-ethertype-short", bytes(eth(0x86DD) / (b"\x60" + b"\0" * 30))),
    # IPv4 options, bad ihl / version
    drops("ip-options-vip", t4(V4, ip={"options": [IPOption_NOP()] * 4}), "drop_ip_options"),
    drops("ip-options-vip-udp", u4(V4_6, ip={"options": [IPOption_NOP()] * 8}),
          "drop_ip_options"),
    passes("ip-options-collider", t4(COLL4, ip={"options": [IPOption_NOP()] * 4})),
    passes("ip-options-non-vip", t4(OTHER4, ip={"options": [IPOption_NOP()] * 4})),
    drops("ihl-4-vip", patch(t4(V4), 14, b"\x44"), "drop_malformed"),
    drops("version-6-in-ipv4-frame", patch(t4(V4), 14, b"\x65"), "drop_malformed"),
    passes("ihl-4-non-vip", patch(t4(OTHER4), 14, b"\x44")),
    # IPv4 fragments
    drops("frag-mf-vip", u4(V4, ip={"flags": "MF"}), "drop_fragment"),
    drops("frag-offset-vip", u4(V4, ip={"frag": 100}, payload=b""), "drop_fragment"),
    drops("frag-last-tcp-vip", t4(V4_6, ip={"frag": 1}), "drop_fragment"),
    drops("frag-mf-df-vip", t4(V4, ip={"flags": "MF+DF"}), "drop_fragment"),
    drops("frag-icmp-vip", frame(IP(src=C4, dst=V4, flags="MF") / ICMP()), "drop_fragment"),
    passes("frag-mf-collider", u4(COLL4, ip={"flags": "MF"})),
    passes("frag-offset-collider", u4(COLL4, ip={"frag": 100})),
    passes("frag-mf-non-vip", u4(OTHER4, ip={"flags": "MF"})),
    # IPv6 fragment / extension headers
    drops("v6-frag-vip", frame(IPv6(src=C6, dst=V6) / IPv6ExtHdrFragment(m=1) /
                               UDP(sport=1, dport=UDPP) / b"x"), "drop_fragment"),
    drops("v6-atomic-frag-vip", frame(IPv6(src=C6, dst=V6_4) / IPv6ExtHdrFragment() /
                                      TCP(sport=1, dport=80)), "drop_fragment"),
    passes("v6-frag-collider", frame(IPv6(src=C6, dst=COLL6) / IPv6ExtHdrFragment(m=1) /
                                     UDP(sport=1, dport=UDPP))),
    passes("v6-frag-non-vip", frame(IPv6(src=C6, dst=OTHER6) / IPv6ExtHdrFragment(m=1) /
                                    UDP(sport=1, dport=UDPP))),
    drops("v6-hbh-vip", frame(IPv6(src=C6, dst=V6) / IPv6ExtHdrHopByHop() /
                              TCP(sport=1, dport=80)), "drop_ip_options"),
    drops("v6-routing-vip", frame(IPv6(src=C6, dst=V6) / IPv6ExtHdrRouting() /
                                  TCP(sport=1, dport=80)), "drop_ip_options"),
    drops("v6-dstopt-vip", frame(IPv6(src=C6, dst=V6_P0) / IPv6ExtHdrDestOpt() /
                                 UDP(sport=1, dport=5)), "drop_ip_options"),
    passes("v6-hbh-collider", frame(IPv6(src=C6, dst=COLL6) / IPv6ExtHdrHopByHop() /
                                    TCP(sport=1, dport=80))),
    # inconsistent lengths
    drops("v4-udp-tot-len-short", patch(u4(V4), 16, struct.pack("!H", 27)), "drop_malformed"),
    drops("v4-tcp-tot-len-short", patch(t4(V4), 16, struct.pack("!H", 39)), "drop_malformed"),
    drops("v4-tot-len-beyond-frame", patch(t4(V4), 16, struct.pack("!H", 46)),
          "drop_malformed"),
    drops("v6-udp-plen-short", patch(u6(V6), 18, struct.pack("!H", 7)), "drop_malformed"),
    drops("v6-plen-beyond-frame", patch(t6(V6), 18, struct.pack("!H", 26)), "drop_malformed"),
    drops("v6-version-4", patch(t6(V6), 14, b"\x40"), "drop_malformed"),
    passes("v4-tot-len-beyond-frame-non-vip", patch(t4(COLL4), 16, struct.pack("!H", 46))),
    # a frame to another host's MAC (a flooding switch): passed, never forwarded or
    # answered; broadcast and multicast destinations are ours; no MAC set: no check
    other_host("other-host-v4-tcp", to_mac(t4(V4), OTHER_MAC)),
    other_host("other-host-v6-udp-gue", to_mac(u6(V6), OTHER_MAC), GUE),
    other_host("other-host-one-bit-off", to_mac(t4(V4_6), LB_MAC[:5] + b"\x00")),
    other_host("other-host-echo", to_mac(frame(IP(src=C4, dst=V4) / ICMP()), OTHER_MAC)),
    other_host("other-host-no-backend", to_mac(t4(V4_NB), OTHER_MAC)),
    fwd("our-mac-v4", t4(V4), OURS),
    fwd("our-mac-v6-redirect", t6(V6), dict(OURS, tx_mode=layout.TX_REDIRECT),
        verdict="redirect"),
    fwd("broadcast-mac", to_mac(u4(V4), b"\xff" * 6), OURS),
    fwd("multicast-mac", to_mac(t6(V6_4), bytes.fromhex("333300000001")), OURS),
    fwd("other-mac-no-check", to_mac(t4(V4), OTHER_MAC)),
    passes("other-host-non-vip", to_mac(t4(OTHER4), OTHER_MAC), OURS),
]
assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.fixture
def tx_port(env):
    env.dp.set_tx_port(1)  # lo: the redirect target only has to exist
    yield
    env.dp.maps["tx_port"].delete(struct.pack("I", 0))


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_row(env, row, request):
    if row.verdict == "redirect":
        request.getfixturevalue("tx_port")
    env.configure(**row.cfg)
    env.flush_flows()
    data = row.data
    before = env.snapshot()
    r = env.run(data)
    d = env.delta(before)

    assert r.verdict == row.verdict
    assert_globals(d.glob, row.counters)
    exp = None
    if row.vip_hit:
        flow = parse_input(data)[0]
        exp = env.expect(flow)
        assert d.vips == {exp.vip_id: (1, len(data))}
    else:
        assert d.vips == {}, "a VIP counter moved for a packet that matches no VIP"
    if row.check == "same":
        assert r.data == data, "a frame that is not forwarded was modified"
        assert d.backends == {}
    else:
        assert exp.backend is not None
        check_encap(r.data, data, backend_addr=exp.backend.address,
                    nh_mac=env.macs[exp.backend.nexthop], hash_=exp.hash, cfg=env.cfg,
                    expect_zero_csum=row.zero_csum, ip_id=d.outer_ip_id(exp.hash))
        sent = row.verdict in ("tx", "redirect")
        assert d.backends == ({exp.backend_id: (1, len(data))} if sent else {})
    if row.flow_entry:
        assert env.dp.flow_backend(flow.key()) == exp.backend_id
        assert env.flow_count() == 1
    else:
        assert env.flow_count() == 0, "flow-table entry created for a packet not forwarded"

    if row.check == "encap" and row.verdict != "drop":
        # the same flow again: a flow-table hit (in the flow's own slot, where the insert
        # put it), the same output (but for the outer IPv4 ID of a packet without DF);
        # then found by the scan of its bucket, moved out of its own slot
        for cached in (1, 0):
            if not cached:
                env.dp.flows.relocate(flow.key())
            before = env.snapshot()
            r2 = env.run(data)
            d2 = env.delta(before)
            assert r2.verdict == row.verdict
            check_encap(r2.data, data, backend_addr=exp.backend.address,
                        nh_mac=env.macs[exp.backend.nexthop], hash_=exp.hash, cfg=env.cfg,
                        expect_zero_csum=row.zero_csum, ip_id=d2.outer_ip_id(exp.hash))
            c = dict(row.counters, flow_miss=0, flow_hit=1, flow_cache_hit=cached)
            assert_globals(d2.glob, c)
            assert d2.backends == {exp.backend_id: (1, len(data))}


def test_rows_cover_every_backend_family_and_encap(env):
    """Guard against the table silently losing cases: each outer family x inner family x
    protocol x encapsulation appears among the forwarded rows."""
    seen = set()
    for row in ROWS:
        if row.check != "encap":
            continue
        flow = parse_input(row.data)[0]
        exp = env.expect(flow)
        seen.add((flow.dst.version, exp.backend.address.version, flow.proto,
                  row.cfg.get("encap", layout.ENCAP_IPIP)))
    want = {(i, o, p, e) for i in (4, 6) for o in (4, 6) for p in (TCP_P, UDP_P)
            for e in (layout.ENCAP_IPIP, layout.ENCAP_GUE)}
    assert want <= seen, f"missing {want - seen}"


def test_forward_rows_spread_over_backends(env):
    """Two flows to the same VIP that the reference sends to different backends really
    reach different backends (the check would pass trivially with one backend)."""
    env.configure()
    env.flush_flows()
    got = {}
    for sport in range(1000, 1200):
        data = t4(V4, sport=sport)
        flow = parse_input(data)[0]
        exp = env.expect(flow)
        r = env.run(data)
        assert r.verdict == "tx"
        assert outer_dst(r.data) == exp.backend.address
        got[exp.backend.address] = got.get(exp.backend.address, 0) + 1
    assert set(got) == {b.address for b in B4}


# --------------------------------------------------------------------------- truncation

TRUNC_CASES = [  # (id, frame, config); frames to VIPs are forwarded when whole
    ("v4-tcp-ipip", t4(V4, payload=b"0123456789"), {}),
    ("v4-udp-gue-v6", u4(V4_6, payload=b"0123456789"), GUE),
    ("v6-tcp-ipip", t6(V6, payload=b"abc"), {}),
    ("v6-udp-gue-v4", u6(V6_4, payload=b"abc"), GUE),
    ("v6-udp-port0-gue", u6(V6_P0, payload=b"abc"), GUE),
    ("v4-tcp-collider", t4(COLL4, payload=b"0123456789"), {}),
    ("v6-udp-non-vip", u6(OTHER6, payload=b"abc"), {}),
]


@pytest.mark.parametrize("case", TRUNC_CASES, ids=lambda c: c[0])
def test_truncated_frames_never_leave(env, case):
    """Cut the frame at every length: PASS or DROP with the data unchanged, never TX, and
    exactly the counters the length implies (IP header incomplete: pass; IP header whole
    but its length field points past the end: malformed, dropped if for a VIP)."""
    _, full, cfg = case
    env.configure(**cfg)
    env.flush_flows()
    flow = parse_input(full)[0]
    is_vip = flow.dst in VIP_ADDRS
    iphl = 20 if flow.dst.version == 4 else 40
    for n in range(0, len(full)):
        data = full[:n]
        before = env.snapshot()
        try:
            r = env.run(data)
        except BpfError as e:
            # the kernel refuses test frames shorter than an Ethernet header
            assert n < 14, f"length {n}: {e}"
            continue
        assert n >= 14, f"length {n}: kernel accepted a frame shorter than Ethernet"
        d = env.delta(before)
        assert r.data == data, f"length {n}: data changed"
        if n < 14 + iphl or not is_vip:
            assert r.verdict == "pass", f"length {n}: {r.verdict}"
            assert_globals(d.glob, {"rx": 1, "pass": 1})
        else:
            assert r.verdict == "drop", f"length {n}: {r.verdict}"
            assert_globals(d.glob, {"rx": 1, "drop": 1, "drop_malformed": 1})
        assert d.vips == {} and d.backends == {}
    assert env.flow_count() == 0
    r = env.run(full)
    assert r.verdict == ("tx" if is_vip else "pass")


# --------------------------------------------------------------------------- agreement

N_FLOWS = 10_000
AGREE_SPECS = [
    ("v4-tcp", vip("203.0.113.10", 443, TCP_P,
                   [be(f"10.2.0.{i}", weight=1 + i % 3) for i in range(1, 8)], ring_size=65537)),
    ("v4-udp-v6-backends", vip("203.0.113.10", 4789, UDP_P,
                               [be(f"fd00:2::{i}") for i in range(1, 6)], ring_size=65537)),
    ("v6-tcp", vip("2001:db8:5::10", 443, TCP_P,
                   [be(f"fd00:3::{i}", weight=i) for i in range(1, 7)], ring_size=65537)),
    ("v4-src-hash", vip("203.0.113.20", 80, TCP_P,
                        [be(f"10.3.0.{i}") for i in range(1, 5)], hash_src_only=True,
                        ring_size=65537)),
    ("v6-udp-src-hash-v4-backends", vip("2001:db8:5::20", 53, UDP_P,
                                        [be(f"10.3.1.{i}") for i in range(1, 4)],
                                        hash_src_only=True, ring_size=65537)),
]


@pytest.fixture(scope="module")
def agree_env():
    e = LbEnv(Limits(max_vips=16, max_backends=256, max_nexthops=64, flow_table_size=32768))
    try:
        e.apply([s for _, s in AGREE_SPECS])
        yield e
    finally:
        e.close()


def _rand_addr(rng, v6):
    if v6:
        return ipaddress.IPv6Address(rng.getrandbits(128))
    return ipaddress.IPv4Address(rng.getrandbits(32))


@pytest.mark.parametrize("name,spec", AGREE_SPECS, ids=[n for n, _ in AGREE_SPECS])
def test_backend_agreement(agree_env, name, spec):
    """10,000 random flows: the backend the data path picks (outer destination) is the
    one the Python reference picks (flow_hash % ring_size -> ring -> backend address),
    the flow table records it, and the per-backend counters add up."""
    env = agree_env
    env.configure()
    env.flush_flows()
    ring = env.ring(spec)
    v = env.vip_state(spec)
    addr_of = {i: a for a, i in v.backends.items()}
    rng = random.Random(hash(name) & 0xFFFF ^ 0x5EED)
    before = env.snapshot()
    v6 = spec.address.version == 6
    per_backend = Counter()
    flows = []
    for _ in range(N_FLOWS):
        f = Flow(spec.proto, _rand_addr(rng, v6), rng.randrange(1, 65536), spec.address,
                 spec.port)
        exp = env.expect(f, ring=ring)
        r = env.run(fast_frame(f.proto, f.src, f.sport, f.dst, f.dport))
        assert r.verdict == "tx", f"{f}: {r.verdict}"
        got = outer_dst(r.data)
        want = addr_of[exp.backend_id]
        assert got == want, f"{f}: data path chose {got}, reference {want} (slot {exp.slot})"
        per_backend[exp.backend_id] += 1
        flows.append((f, exp.backend_id))
    d = env.delta(before)
    assert d.glob["tx"] == N_FLOWS and d.glob["rx"] == N_FLOWS
    assert d.glob["flow_miss"] + d.glob["flow_hit"] == N_FLOWS
    assert d.glob["flow_hit"] < 10  # random 5-tuples: essentially all new
    assert {b: p for b, (p, _) in d.backends.items()} == dict(per_backend)
    for f, bid in flows[-2000:]:
        assert env.dp.flow_backend(f.key()) == bid
    # every backend with ring slots got flows, in proportion to its slots
    slots = Counter(ring)
    assert set(per_backend) == set(slots) - {0}
    for bid, n in slots.items():
        p = n / len(ring)
        mean, sd = N_FLOWS * p, (N_FLOWS * p * (1 - p)) ** 0.5
        assert abs(per_backend[bid] - mean) <= 5 * sd + 1, (bid, per_backend[bid], mean)
    if spec.hash_src_only:
        # same source, any port: same backend
        src = _rand_addr(rng, v6)
        seen = set()
        for sport in range(2000, 2200):
            r = env.run(fast_frame(spec.proto, src, sport, spec.address, spec.port))
            seen.add(outer_dst(r.data))
        assert len(seen) == 1


# --------------------------------------------------------------------------- the checker

@pytest.mark.parametrize("rid", ["ipip-4in4-tcp", "ipip-6in6-udp", "gue-4in6-udp",
                                 "gue-6in4-tcp-odd-payload", "padded-gue-4in6-udp",
                                 "gue-zero-csum-4in4"])
def test_check_encap_catches_every_byte(env, rid):
    """check_encap is strict: flipping any single bit pattern in any byte of a correct
    output frame (outer headers, inner packet, padding) makes it fail."""
    row = next(r for r in ROWS if r.id == rid)
    env.configure(**row.cfg)
    env.flush_flows()
    data = row.data
    exp = env.expect(parse_input(data)[0])
    before = env.snapshot()
    out = env.run(data).data
    kw = dict(backend_addr=exp.backend.address, nh_mac=env.macs[exp.backend.nexthop],
              hash_=exp.hash, cfg=env.cfg, expect_zero_csum=row.zero_csum,
              ip_id=env.delta(before).outer_ip_id(exp.hash))
    check_encap(out, data, **kw)
    for i in range(len(out)):
        for mask in (0x01, 0x80, 0xFF):
            bad = out[:i] + bytes([out[i] ^ mask]) + out[i + 1:]
            with pytest.raises(AssertionError):
                check_encap(bad, data, **kw)
    with pytest.raises(AssertionError):
        check_encap(out + b"\0", data, **kw)
    with pytest.raises(AssertionError):
        check_encap(out[:-1], data, **kw)
    # a different expected hash is noticed wherever the hash shows (flow label, GUE sport)
    if exp.backend.address.version == 6 or row.cfg.get("encap") == layout.ENCAP_GUE:
        with pytest.raises(AssertionError):
            check_encap(out, data, **dict(kw, hash_=kw["hash_"] ^ 1))


@pytest.mark.parametrize("dst", [V6, V6_4], ids=["gue-v6-outer", "gue-v4-outer"])
def test_gue_checksum_that_computes_to_zero_is_sent_as_ffff(env, dst):
    """A UDP checksum that computes to 0 must go out as 0xFFFF (0 means "none"). The inner
    IPv6 flow label is summed into the GUE checksum but is in neither the flow hash nor the
    inner L4 checksum, so it can be chosen to make the computed checksum exactly 0."""
    env.configure(**GUE)
    env.flush_flows()
    base = u6(dst, ip={"fl": 0})
    flow, inner, _, _ = parse_input(base)
    exp = env.expect(flow)
    outer_v6 = exp.backend.address.version == 6
    osrc = env.cfg["source_v6"] if outer_v6 else env.cfg["source_v4"]
    ulen = 8 + len(inner)
    sport = 0xC000 | (exp.hash & 0x3FFF)
    s0 = ones_sum(pseudo_header(osrc, exp.backend.address, UDP_P, ulen) +
                  struct.pack("!HHHH", sport, GUE_PORT, ulen, 0) + inner)
    label = (0xFFFF - s0) & 0xFFFF  # low 16 bits of the label: one more 16-bit word
    data = u6(dst, ip={"fl": label})
    r = env.run(data)
    assert r.verdict == "tx"
    ipl = 40 if outer_v6 else 20
    assert r.data[14 + ipl + 6:14 + ipl + 8] == b"\xff\xff"
    check_encap(r.data, data, backend_addr=exp.backend.address,
                nh_mac=env.macs[exp.backend.nexthop], hash_=exp.hash, cfg=env.cfg)
