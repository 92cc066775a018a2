"""ICMP on VIP addresses, run through BPF_PROG_TEST_RUN on the real lb.bpf.o.

* Errors about a VIP flow's reply (ICMPv4 destination unreachable / time exceeded, ICMPv6
  destination unreachable / packet too big / time exceeded) are encapsulated to the backend
  that flow maps to: its connection-table entry, else the ring's choice (no entry created).
* A packet too big to encapsulate is answered with "fragmentation needed" / "packet too
  big" from the VIP (with DF, or IPv6), within a per-CPU budget.
* Echo requests to a VIP address are answered from it, unless answer_ping is off.
* The outer IPv4 ID varies when the inner packet has no DF.

Counter deltas prove which path each packet took; answers are parsed field by field here
(own checksums, scapy as a second opinion).
"""

from __future__ import annotations

import ctypes
import struct
import time
from dataclasses import asdict, dataclass, field

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6NDOptSrcLLAddr,
                                ICMPv6ND_NS, ICMPv6PacketTooBig, ICMPv6ParamProblem,
                                ICMPv6TimeExceeded, IPv6)
from scapy.layers.l2 import Ether

from lb import layout
from lb.config import parse_config
from lb.egress import egress_config
from lb.nexthop import Interface
from lb.specs import VipSpec
from lb.stats import global_section

from packets import (A, CLIENT_MAC, LB_MAC, MTU, SOURCE_V4, SOURCE_V6, TCP_P, UDP_P, Flow,
                     LbEnv, assert_globals, be, check_encap, frame, ones_sum, parse_input, pkt,
                     prefilter_collider, pseudo_header)

import configtext

RING = 1009
GUE = dict(encap=layout.ENCAP_GUE, gue_port=6635)
B4 = (be("10.1.0.11"), be("10.1.0.12", weight=2), be("10.1.0.13"))
B6 = (be("fd00:1::11"), be("fd00:1::12"), be("fd00:1::13", weight=3))
V4, V4_6, V6, V6_4 = "192.0.2.10", "192.0.2.20", "2001:db8::10", "2001:db8::20"
V4_SRC, V4_NB = "192.0.2.30", "192.0.2.40"
C4, C6 = "198.51.100.7", "2001:db8:c::7"
ROUTER4, ROUTER6 = "203.0.113.1", "2001:db8:e::1"
OTHER4 = "198.18.0.1"
UDPP = 8053
CLOCK_MONOTONIC_COARSE = 6  # Linux; bpf_ktime_get_coarse_ns() reads this clock


def vip(addr, port, proto, backends, **kw):
    return VipSpec(A(addr), port, proto, tuple(backends), ring_size=RING, **kw)


SPECS = [
    vip(V4, 80, TCP_P, B4), vip(V4, UDPP, UDP_P, B4), vip(V4_6, 80, TCP_P, B6),
    vip(V4_6, UDPP, UDP_P, B6), vip(V6, 80, TCP_P, B6), vip(V6, UDPP, UDP_P, B6),
    vip(V6_4, 80, TCP_P, B4), vip(V6_4, UDPP, UDP_P, B4),
    vip(V4_SRC, 80, TCP_P, B4, hash_src_only=True),
    vip(V4_NB, 80, TCP_P, (be("10.1.0.11", state="maint"),)),
]
COLL4 = str(prefilter_collider(A(V4), {s.address for s in SPECS}))


@pytest.fixture(scope="module")
def env():
    e = LbEnv()
    try:
        e.apply(SPECS)
        yield e
    finally:
        e.close()


def ip_of(src, dst, **kw):
    return IPv6(src=src, dst=dst, **kw) if ":" in dst else IP(src=src, dst=dst, **kw)


def reply(proto, vip_addr, vport, client, cport, payload=b"data"):
    """The IP packet a backend sends back for a flow (source = VIP), as bytes."""
    l4 = (TCP(sport=vport, dport=cport, flags="PA") if proto == TCP_P
          else UDP(sport=vport, dport=cport))
    return bytes(ip_of(vip_addr, client) / l4 / payload)


def icmp_error(vip_addr, quote: bytes, kind=("unreach", 4), router=None, **ip_kw):
    """An ICMP error from a router to `vip_addr` quoting `quote` (bytes of an IP packet).
    kind: (type name, code); "unreach" with code 4 / "too_big" carry an MTU."""
    name, code = kind
    if ":" in vip_addr:
        msg = {"unreach": lambda: ICMPv6DestUnreach(code=code),
               "too_big": lambda: ICMPv6PacketTooBig(mtu=1400),
               "time": lambda: ICMPv6TimeExceeded(code=code),
               "param": lambda: ICMPv6ParamProblem(code=code)}[name]()
        return frame(IPv6(src=router or ROUTER6, dst=vip_addr, **ip_kw) / msg / quote)
    types = {"unreach": 3, "time": 11, "param": 12, "redirect": 5, "quench": 4}
    msg = ICMP(type=types[name], code=code)
    if (name, code) == ("unreach", 4):
        msg.nexthopmtu = 1400
    return frame(IP(src=router or ROUTER4, dst=vip_addr, **ip_kw) / msg / quote)


def set_rate_window(env, events: int, start_ns: int = 0) -> None:
    """Every CPU's too-big window (start 0: over, the next answer starts a new one)."""
    m = env.dp.skel.map("too_big_rate")
    r = layout.FlowRate()
    r.window_start_ns = start_ns
    r.events = events
    m.update(ctypes.c_uint32(0), r)


# --------------------------------------------------------------------------- errors

@dataclass
class ErrRow:
    id: str
    vip: str
    proto: int
    kind: tuple
    cfg: dict = field(default_factory=dict)
    entry: bool = True           # the flow has a connection-table entry (else: the ring)
    quote_len: int = 0           # bytes of the reply quoted (0: all of it)


V4_KINDS = [("unreach", c) for c in range(16)] + [("time", 0), ("time", 1)]
V6_KINDS = [("unreach", c) for c in range(7)] + [("too_big", 0), ("time", 0), ("time", 1)]
ERR_ROWS = [ErrRow(f"v4-{k[0]}-{k[1]}", V4, TCP_P, k) for k in V4_KINDS]
ERR_ROWS += [ErrRow(f"v6-{k[0]}-{k[1]}", V6, TCP_P, k) for k in V6_KINDS]
for _vip, _name in ((V4, "4in4"), (V4_6, "4in6"), (V6, "6in6"), (V6_4, "6in4")):
    _kind = ("too_big", 0) if ":" in _vip else ("unreach", 4)
    for _proto, _pn in ((TCP_P, "tcp"), (UDP_P, "udp")):
        for _cfg, _en in (({}, "ipip"), (GUE, "gue")):
            for _entry in (True, False):
                ERR_ROWS.append(ErrRow(f"{_en}-{_name}-{_pn}-{'entry' if _entry else 'ring'}",
                                       _vip, _proto, _kind, _cfg, _entry))
ERR_ROWS += [
    ErrRow("src-hash-vip-ring", V4_SRC, TCP_P, ("unreach", 4), entry=False),
    # the shortest quotes that still hold the ports: IP header + 4 bytes
    ErrRow("v4-quote-ip-and-ports", V4, TCP_P, ("unreach", 4), quote_len=24),
    ErrRow("v6-quote-ip-and-ports", V6, UDP_P, ("too_big", 0), quote_len=44),
    ErrRow("v4-quote-ip-and-8", V4, UDP_P, ("time", 0), quote_len=28, entry=False),
]


def _client_flow(row: ErrRow, sport: int = 40100):
    client = C6 if ":" in row.vip else C4
    port = 80 if row.proto == TCP_P else UDPP
    return Flow(row.proto, A(client), sport, A(row.vip), port)


@pytest.mark.parametrize("row", ERR_ROWS, ids=lambda r: r.id)
def test_error_goes_to_the_flow_backend(env, row):
    env.configure(**row.cfg)
    env.flush_flows()
    flow = _client_flow(row)
    exp = env.expect(flow)
    if row.entry:
        r = env.run(pkt("tcp" if row.proto == TCP_P else "udp", str(flow.src), str(flow.dst),
                        flow.sport, flow.dport))
        assert r.verdict == "tx"
        assert env.dp.flow_backend(flow.key()) == exp.backend_id
    flows_before = env.flow_count()
    quote = reply(row.proto, row.vip, flow.dport, str(flow.src), flow.sport)
    if row.quote_len:
        quote = quote[:row.quote_len]
    data = icmp_error(row.vip, quote, row.kind)
    before = env.snapshot()
    r = env.run(data)
    d = env.delta(before)
    assert r.verdict == "tx"
    assert_globals(d.glob, {"rx": 1, "tx": 1, "icmp_forwarded": 1})
    check_encap(r.data, data, backend_addr=exp.backend.address,
                nh_mac=env.macs[exp.backend.nexthop], hash_=exp.hash, cfg=env.cfg,
                ip_id=d.outer_ip_id(exp.hash))
    assert d.backends == {exp.backend_id: (1, len(data))}
    assert d.vips == {exp.vip_id: (1, len(data))}  # a VIP's total includes its backends'
    assert env.flow_count() == flows_before, "an ICMP error created a connection-table entry"


def test_error_follows_the_entry_not_the_ring(env):
    """A flow whose backend was drained keeps its entry: errors about it go to that backend,
    not to the backend a new flow would get now."""
    env.configure()
    env.flush_flows()
    flow = Flow(TCP_P, A(C4), 40200, A(V4), 80)
    assert env.run(pkt("tcp", C4, V4, 40200, 80)).verdict == "tx"
    first = env.expect(flow)
    drained = [be(str(b.address), b.weight, "drain" if b.address == first.backend.address
                  else "active") for b in B4]
    try:
        env.apply([vip(V4, 80, TCP_P, drained)] + SPECS[1:])
        now = env.expect(flow)
        assert now.backend.address != first.backend.address
        data = icmp_error(V4, reply(TCP_P, V4, 80, C4, 40200))
        before = env.snapshot()
        r = env.run(data)
        d = env.delta(before)
        assert r.verdict == "tx" and d.glob["icmp_forwarded"] == 1
        bid = env.bid_of(env.specs[0], first.backend.address)
        check_encap(r.data, data, backend_addr=first.backend.address,
                    nh_mac=env.macs[str(first.backend.address)], hash_=first.hash,
                    cfg=env.cfg, ip_id=d.outer_ip_id(first.hash))
        assert d.backends == {bid: (1, len(data))}
    finally:
        env.apply(SPECS)


PASS_ROWS = [  # (id, frame): not an error about a VIP flow's reply: to the kernel, untouched
    ("v4-not-a-vip-port", icmp_error(V4, reply(TCP_P, V4, 81, C4, 40100))),
    ("v4-not-a-vip-proto", icmp_error(V4, reply(UDP_P, V4, 80, C4, 40100))),
    ("v6-not-a-vip-port", icmp_error(V6, reply(UDP_P, V6, 5353, C6, 40100), ("too_big", 0))),
    ("v4-quote-to-the-vip", icmp_error(V4, bytes(IP(src=C4, dst=V4) / TCP(sport=40100, dport=80)))),
    ("v4-quote-from-another-vip", icmp_error(V4, reply(TCP_P, V4_6, 80, C4, 40100))),
    ("v6-quote-from-another-vip", icmp_error(V6, reply(TCP_P, V6_4, 80, C6, 40100),
                                             ("too_big", 0))),
    ("v4-quote-of-icmp", icmp_error(V4, bytes(IP(src=V4, dst=C4) / ICMP(type=0)))),
    ("v4-quote-ports-cut", icmp_error(V4, reply(TCP_P, V4, 80, C4, 40100)[:23])),
    ("v4-quote-ip-header-cut", icmp_error(V4, reply(TCP_P, V4, 80, C4, 40100)[:19])),
    ("v4-no-quote", icmp_error(V4, b"")),
    ("v6-quote-ports-cut", icmp_error(V6, reply(TCP_P, V6, 80, C6, 40100)[:43], ("too_big", 0))),
    ("v6-quote-ip-header-cut", icmp_error(V6, reply(TCP_P, V6, 80, C6, 40100)[:39],
                                          ("unreach", 1))),
    ("v4-quote-with-options", icmp_error(V4, bytes(IP(src=V4, dst=C4, options=b"\x01\x01\x01\x00") /
                                                   TCP(sport=80, dport=40100)))),
    ("v4-quote-later-fragment", icmp_error(V4, bytes(IP(src=V4, dst=C4, frag=10, proto=6)) +
                                           b"\0" * 20)),
    ("v4-parameter-problem", icmp_error(V4, reply(TCP_P, V4, 80, C4, 40100), ("param", 0))),
    ("v4-redirect", icmp_error(V4, reply(TCP_P, V4, 80, C4, 40100), ("redirect", 1))),
    ("v4-source-quench", icmp_error(V4, reply(TCP_P, V4, 80, C4, 40100), ("quench", 0))),
    ("v6-parameter-problem", icmp_error(V6, reply(TCP_P, V6, 80, C6, 40100), ("param", 0))),
    ("v4-echo-reply-to-vip", frame(IP(src=C4, dst=V4) / ICMP(type=0))),
    ("v6-neighbour-solicitation", frame(IPv6(src=C6, dst=V6) / ICMPv6ND_NS(tgt=V6) /
                                        ICMPv6NDOptSrcLLAddr(lladdr=CLIENT_MAC))),
    ("v4-error-to-non-vip", icmp_error(OTHER4, reply(TCP_P, OTHER4, 80, C4, 40100))),
    ("v4-error-to-collider", icmp_error(COLL4, reply(TCP_P, COLL4, 80, C4, 40100))),
    ("v4-echo-to-collider", frame(IP(src=C4, dst=COLL4) / ICMP())),
    ("v4-tot-len-beyond-frame", icmp_error(V4, reply(TCP_P, V4, 80, C4, 40100), len=200)),
    ("v6-plen-beyond-frame", icmp_error(V6, reply(TCP_P, V6, 80, C6, 40100), ("too_big", 0),
                                        plen=300)),
]


@pytest.mark.parametrize("case", PASS_ROWS, ids=lambda c: c[0])
def test_other_icmp_passes(env, case):
    _, data = case
    env.configure()
    env.flush_flows()
    assert env.run(pkt("tcp", C4, V4, 40100, 80)).verdict == "tx"  # a flow that exists
    before = env.snapshot()
    r = env.run(data)
    d = env.delta(before)
    assert r.verdict == "pass" and r.data == data
    assert_globals(d.glob, {"rx": 1, "pass": 1})
    assert d.vips == {} and d.backends == {}


def test_error_for_vip_without_backend_is_dropped(env):
    env.configure()
    env.flush_flows()
    data = icmp_error(V4_NB, reply(TCP_P, V4_NB, 80, C4, 40100))
    before = env.snapshot()
    r = env.run(data)
    d = env.delta(before)
    assert r.verdict == "drop"
    assert_globals(d.glob, {"rx": 1, "drop": 1, "drop_no_backend": 1})
    assert d.vips == {env.vip_state(SPECS[-1]).vip_id: (1, len(data))}


@pytest.mark.parametrize("dst", [V4, V6], ids=["v4", "v6"])
def test_error_too_big_to_relay_is_dropped_not_answered(env, dst):
    """An ICMP error that does not fit once encapsulated is dropped: never an ICMP error
    about an ICMP error."""
    env.configure(mtu=600)
    env.flush_flows()
    client = C6 if ":" in dst else C4
    quote = reply(TCP_P, dst, 80, client, 40100, payload=b"z" * 600)
    data = icmp_error(dst, quote, ("too_big", 0) if ":" in dst else ("unreach", 4))
    before = env.snapshot()
    r = env.run(data)
    d = env.delta(before)
    assert r.verdict == "drop" and r.data == data
    assert_globals(d.glob, {"rx": 1, "drop": 1, "drop_too_big": 1})
    env.configure()


# --------------------------------------------------------------------------- too big

def _check_ipv4_header(ip: bytes, src, dst, proto: int, total: int) -> None:
    vihl, tos, tot_len, ident, frag, ttl, p, _csum, s, d = struct.unpack("!BBHHHBBH4s4s",
                                                                        ip[:20])
    assert (vihl, tot_len, frag, ttl, p) == (0x45, total, 0x4000, 64, proto)
    assert ones_sum(ip[:20]) == 0xFFFF, "IPv4 header checksum"
    assert (A(s), A(d)) == (A(src), A(dst))


def check_too_big(out: bytes, data: bytes, mtu: int) -> None:
    """`out` is the ICMP answer to the frame `data`: from the VIP to the client, Ethernet
    addresses swapped, the MTU, the quote (RFC 1812: IPv4 datagram <= 576 bytes; RFC 4443:
    <= 1280) and every checksum."""
    assert out[0:6] == data[6:12] and out[6:12] == data[0:6], "Ethernet addresses not swapped"
    assert out[12:14] == data[12:14]
    inner = Ether(data)
    if data[12:14] == b"\x08\x00":
        ip = inner[IP]
        pkt_bytes = data[14:14 + ip.len]
        quote = pkt_bytes[:576 - 28]
        assert len(out) == 14 + 28 + len(quote)
        _check_ipv4_header(out[14:34], ip.dst, ip.src, 1, 28 + len(quote))
        icmp = out[34:]
        typ, code, _c, unused, next_mtu = struct.unpack("!BBHHH", icmp[:8])
        assert (typ, code, unused, next_mtu) == (3, 4, 0, mtu)
        assert ones_sum(icmp) == 0xFFFF, "ICMP checksum"
        assert icmp[8:] == quote
        ref = Ether(out)
        c = ref[ICMP].chksum
        del ref[ICMP].chksum
        assert Ether(bytes(ref))[ICMP].chksum == c, "scapy disagrees on the ICMP checksum"
    else:
        ip6 = inner[IPv6]
        pkt_bytes = data[14:14 + 40 + ip6.plen]
        quote = pkt_bytes[:1280 - 48]
        assert len(out) == 14 + 48 + len(quote)
        w0, plen, nh, hlim, s, d = struct.unpack("!IHBB16s16s", out[14:54])
        assert (w0, plen, nh, hlim) == (6 << 28, 8 + len(quote), 58, 64)
        assert (A(s), A(d)) == (A(ip6.dst), A(ip6.src))
        icmp = out[54:]
        typ, code, _c, next_mtu = struct.unpack("!BBHI", icmp[:8])
        assert (typ, code, next_mtu) == (2, 0, mtu)
        assert ones_sum(pseudo_header(A(s), A(d), 58, len(icmp)) + icmp) == 0xFFFF
        assert icmp[8:] == quote


def sized(proto, src, dst, inner_len, df=True, sport=40300):
    """A frame whose IP packet is exactly inner_len bytes."""
    kw = {"flags": "DF"} if df and ":" not in dst else {}
    probe = pkt(proto, src, dst, sport, 80 if proto == "tcp" else UDPP, b"", kw)
    return pkt(proto, src, dst, sport, 80 if proto == "tcp" else UDPP,
               b"x" * (inner_len - (len(probe) - 14)), kw)


TOO_BIG = [  # (id, frame, cfg, advertised MTU)
    ("ipip-4in4", sized("tcp", C4, V4, 1481), {}, 1480),
    ("ipip-4in4-udp", sized("udp", C4, V4, 1500), {}, 1480),
    ("gue-4in4", sized("tcp", C4, V4, 1473), GUE, 1472),
    ("ipip-4in6", sized("tcp", C4, V4_6, 1461), {}, 1460),
    ("gue-4in6", sized("udp", C4, V4_6, 1500), GUE, 1452),
    ("ipip-6in6", sized("tcp", C6, V6, 1461), {}, 1460),
    ("gue-6in6", sized("udp", C6, V6, 1500), GUE, 1452),
    ("ipip-6in4", sized("tcp", C6, V6_4, 1481), {}, 1480),
    ("gue-6in4", sized("udp", C6, V6_4, 1473), GUE, 1472),
    # small packets are quoted whole (odd length: the checksum's odd byte)
    ("small-mtu-4in4-whole-quote", sized("tcp", C4, V4, 391), {"mtu": 400}, 380),
    ("small-mtu-4in4-even", sized("udp", C4, V4, 390), {"mtu": 400}, 380),
    ("small-mtu-padded", sized("tcp", C4, V4, 381) + b"\xee" * 7, {"mtu": 400}, 380),
    ("v6-mtu-1300", sized("tcp", C6, V6, 1300), {"mtu": 1320}, 1280),
]


@pytest.mark.parametrize("case", TOO_BIG, ids=lambda c: c[0])
def test_too_big_answered(env, case):
    _, data, cfg, mtu = case
    env.configure(**cfg)
    env.flush_flows()
    set_rate_window(env, 0)
    exp = env.expect(parse_input(data)[0])
    before = env.snapshot()
    r = env.run(data)
    d = env.delta(before)
    assert r.verdict == "tx"
    assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_miss": 1, "too_big_answered": 1})
    check_too_big(r.data, data, mtu)
    assert d.vips == {exp.vip_id: (1, len(data))} and d.backends == {}
    env.configure()



TOO_BIG_DROPPED = [  # (id, frame, cfg): too big and not answered: dropped as before
    ("v4-without-df", sized("tcp", C4, V4, 1481, df=False), {}),
    ("v6-mtu-below-1280", sized("tcp", C6, V6, 1300), {"mtu": 1300}),
    ("v4-mtu-below-68", sized("tcp", C4, V4, 100), {"mtu": 80}),
]


@pytest.mark.parametrize("case", TOO_BIG_DROPPED, ids=lambda c: c[0])
def test_too_big_not_answered(env, case):
    _, data, cfg = case
    env.configure(**cfg)
    env.flush_flows()
    set_rate_window(env, 0)
    before = env.snapshot()
    r = env.run(data)
    d = env.delta(before)
    assert r.verdict == "drop" and r.data == data
    assert_globals(d.glob, {"rx": 1, "drop": 1, "drop_too_big": 1, "flow_miss": 1})
    env.configure()


TOO_BIG_V4 = sized("tcp", C4, V4, 1481)


def too_big_burst(env, n: int, **egress) -> tuple[list[str], dict]:
    """n packets too big to forward, in a fresh window, with `egress` configured: their
    verdicts and the global counters' deltas."""
    env.configure(**egress)
    env.flush_flows()
    set_rate_window(env, 0)
    before = env.snapshot()
    verdicts = [env.run(TOO_BIG_V4).verdict for _ in range(n)]
    return verdicts, env.delta(before).glob


def test_too_big_answers_rate_limited_per_cpu(env):
    """Within one window, too_big_per_sec answers; the rest are dropped and counted."""
    verdicts, glob = too_big_burst(env, 5, too_big_per_sec=3)
    data = TOO_BIG_V4
    assert verdicts == ["tx"] * 3 + ["drop"] * 2
    assert_globals(glob, {"rx": 5, "tx": 3, "too_big_answered": 3, "drop": 2,
                          "drop_too_big": 2, "too_big_limited": 2, "flow_miss": 1,
                          "flow_hit": 4})
    # a full window: none; a window that ended long ago: answered again
    env.configure()
    set_rate_window(env, 1000, time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE))
    assert env.run(data).verdict == "drop"
    set_rate_window(env, 1000)  # a window that started at 0: long over
    assert env.run(data).verdict == "tx"


@pytest.mark.parametrize("limit", [2, 0])
def test_too_big_per_sec_from_the_config_file(env, limit):
    """lb.too_big_per_sec budgets the answers: the file's value, through the egress
    settings the daemon derives from it (lb/egress.py); 0 answers none."""
    iface = Interface("eth0", 1, LB_MAC, MTU, (SOURCE_V4,), (SOURCE_V6,))
    cfg = parse_config(configtext.lb(too_big_per_sec=limit) + configtext.vip("web", V4))
    verdicts, glob = too_big_burst(env, 3, **asdict(egress_config(cfg, iface, iface)))
    env.configure()
    assert verdicts == ["tx"] * limit + ["drop"] * (3 - limit)
    answered = {"tx": limit, "too_big_answered": limit} if limit else {}
    assert_globals(glob, {"rx": 3, **answered, "drop": 3 - limit,
                          "drop_too_big": 3 - limit, "too_big_limited": 3 - limit,
                          "flow_miss": 1, "flow_hit": 2})


# --------------------------------------------------------------------------- echo

ECHO = [  # (id, frame)
    ("v4", frame(IP(src=C4, dst=V4, ttl=7) / ICMP(id=0x1234, seq=9) / b"ping payload")),
    ("v4-odd-payload", frame(IP(src=C4, dst=V4_6) / ICMP(id=1, seq=1) / b"abc")),
    ("v4-padded", frame(IP(src=C4, dst=V4) / ICMP(id=2, seq=3)) + b"\0" * 18),
    ("v4-large", frame(IP(src=C4, dst=V4, flags="DF") / ICMP(id=7, seq=7) / (b"p" * 1400))),
    ("v6", frame(IPv6(src=C6, dst=V6, hlim=3) / ICMPv6EchoRequest(id=0x4321, seq=5,
                                                                 data=b"ping6"))),
    ("v6-other-vip", frame(IPv6(src=C6, dst=V6_4) / ICMPv6EchoRequest(id=1, data=b"x" * 101))),
]


@pytest.mark.parametrize("case", ECHO, ids=lambda c: c[0])
def test_echo_answered_from_the_vip(env, case):
    _, data = case
    env.configure()
    before = env.snapshot()
    r = env.run(data)
    d = env.delta(before)
    assert r.verdict == "tx"
    assert_globals(d.glob, {"rx": 1, "tx": 1, "echo_answered": 1})
    assert d.vips == {} and d.backends == {}
    out = r.data
    assert len(out) == len(data)
    assert out[0:6] == data[6:12] and out[6:12] == data[0:6]
    req, rep = Ether(data), Ether(out)
    if IP in req:
        n = req[IP].len
        assert rep[IP].ttl == 64 and (rep[IP].src, rep[IP].dst) == (req[IP].dst, req[IP].src)
        assert out[14:22] == data[14:22], "version, length, ID, flags changed"
        assert ones_sum(out[14:34]) == 0xFFFF
        icmp = out[34:14 + n]
        assert icmp[0:2] == b"\0\0" and icmp[4:] == data[38:14 + n]
        assert ones_sum(icmp) == 0xFFFF
        assert out[14 + n:] == data[14 + n:]
    else:
        n = 40 + req[IPv6].plen
        assert rep[IPv6].hlim == 64
        assert (rep[IPv6].src, rep[IPv6].dst) == (req[IPv6].dst, req[IPv6].src)
        icmp = out[54:14 + n]
        assert icmp[0:2] == b"\x81\0" and icmp[4:] == data[58:14 + n]
        assert ones_sum(pseudo_header(A(rep[IPv6].src), A(rep[IPv6].dst), 58, len(icmp))
                        + icmp) == 0xFFFF


@pytest.mark.parametrize("case", ECHO[:1] + ECHO[4:5], ids=lambda c: c[0])
def test_echo_passed_when_answer_ping_is_off(env, case):
    _, data = case
    env.configure(answer_ping=False)
    before = env.snapshot()
    r = env.run(data)
    d = env.delta(before)
    assert r.verdict == "pass" and r.data == data
    assert_globals(d.glob, {"rx": 1, "pass": 1})
    env.configure()


# --------------------------------------------------------------------------- outer IPv4 ID

@pytest.mark.parametrize("df", [False, True], ids=["no-df", "df"])
def test_outer_ip_id(env, df):
    """Without DF the outer IPv4 ID changes from packet to packet of a flow (RFC 6864: a
    datagram that may be fragmented needs an ID that identifies it); with DF it stays 0."""
    env.configure()
    env.flush_flows()
    data = pkt("tcp", C4, V4, 40400, 80, b"x", {"flags": "DF" if df else 0})
    exp = env.expect(Flow(TCP_P, A(C4), 40400, A(V4), 80))
    ids = []
    for _ in range(20):
        before = env.snapshot()
        out = env.run(data).data
        d = env.delta(before)
        ident = struct.unpack("!H", out[18:20])[0]
        assert ident == (0 if df else d.outer_ip_id(exp.hash))
        assert ones_sum(out[14:34]) == 0xFFFF
        ids.append(ident)
    assert len(set(ids)) == (1 if df else 20)


# --------------------------------------------------------------------------- contract

def test_new_counters_in_stats_and_metrics(env):
    from lb.metrics import render
    g = global_section(env.dp.global_counters())
    for k in ("icmp_forwarded", "too_big_answered", "too_big_limited", "echo_answered"):
        assert isinstance(g[k], int), k
    text = render({"global": g, "vips": []}).decode()
    for k in ("forwarded", "too_big_answered", "too_big_limited", "echo_answered"):
        assert f'xdplb_icmp_total{{action="{k}"}}' in text, k
