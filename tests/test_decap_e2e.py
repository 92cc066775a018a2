"""bpf/decap.bpf.c through BPF_PROG_TEST_RUN: every encapsulation xdplb emits is stripped
to exactly the inner packet behind the original Ethernet addresses; everything else
passes byte for byte untouched. (tests/test_redirect.py runs it on real traffic.)"""

from __future__ import annotations


import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from lb.lab.decap import decap_stats, load_decap
from lb.native import XDP_PASS, Skeleton
from lb.native import test_run as prog_test_run  # not collected as a test

GUE_PORT = 6080
ETH = dict(dst="02:00:00:00:00:0b", src="02:00:00:00:00:0a")

INNER4 = IP(src="192.0.2.1", dst="198.51.100.10", ttl=63) / UDP(sport=40000, dport=80) / \
    Raw(b"inner-v4-payload")
INNER4_TCP = IP(src="192.0.2.1", dst="198.51.100.10") / TCP(sport=40001, dport=443, flags="S")
INNER6 = IPv6(src="2001:db8::1", dst="2001:db8:100::10", hlim=63) / UDP(sport=40002, dport=80) / \
    Raw(b"inner-v6-payload")
INNER6_TCP = IPv6(src="2001:db8::1", dst="2001:db8:100::10") / TCP(sport=40003, dport=443)

O4 = dict(src="10.0.0.2", dst="10.0.1.11", ttl=64, flags="DF")
O6 = dict(src="fd00::2", dst="fd00:1::11", hlim=64)


@pytest.fixture(scope="module")
def decap():
    with load_decap(GUE_PORT) as skel:
        yield skel


@pytest.fixture(scope="module")
def decap_no_gue():
    with load_decap(0) as skel:
        yield skel


def _run(skel: Skeleton, pkt) -> tuple[int, bytes]:
    r = prog_test_run(skel.prog_fd("xdp_decap"), bytes(pkt))
    return r.retval, r.data


STRIPPED = {
    "ipip": (Ether(**ETH) / IP(proto=4, **O4) / INNER4, 0x0800, INNER4),
    "ipip_tcp": (Ether(**ETH) / IP(proto=4, **O4) / INNER4_TCP, 0x0800, INNER4_TCP),
    "6in4": (Ether(**ETH) / IP(proto=41, **O4) / INNER6, 0x86DD, INNER6),
    "ip6ip6": (Ether(**ETH) / IPv6(nh=41, **O6) / INNER6, 0x86DD, INNER6),
    "4in6": (Ether(**ETH) / IPv6(nh=4, **O6) / INNER4, 0x0800, INNER4),
    "gue4_v4": (Ether(**ETH) / IP(**O4) / UDP(sport=0xC123, dport=GUE_PORT) / INNER4,
                0x0800, INNER4),
    "gue4_v6": (Ether(**ETH) / IP(**O4) / UDP(sport=0xC123, dport=GUE_PORT) / INNER6_TCP,
                0x86DD, INNER6_TCP),
    "gue6_v6": (Ether(**ETH) / IPv6(**O6) / UDP(sport=0xC124, dport=GUE_PORT) / INNER6,
                0x86DD, INNER6),
    "gue6_v4": (Ether(**ETH) / IPv6(**O6) / UDP(sport=0xC124, dport=GUE_PORT) / INNER4_TCP,
                0x0800, INNER4_TCP),
}


@pytest.mark.parametrize("name", list(STRIPPED))
def test_stripped_to_inner(decap, name):
    outer, ethertype, inner = STRIPPED[name]
    s0 = decap_stats(decap)
    ret, out = _run(decap, outer)
    assert ret == XDP_PASS
    want = bytes(Ether(type=ethertype, **ETH) / inner)
    assert out == want
    assert Ether(out).type == ethertype
    s1 = decap_stats(decap)
    assert (s1[0] - s0[0], s1[1] - s0[1]) == (1, 1)


UNTOUCHED = {
    "plain_udp4": Ether(**ETH) / INNER4,
    "plain_tcp6": Ether(**ETH) / INNER6_TCP,
    "udp_other_port": Ether(**ETH) / IP(**O4) / UDP(sport=0xC123, dport=GUE_PORT + 1) / INNER4,
    "udp6_other_port": Ether(**ETH) / IPv6(**O6) / UDP(sport=0xC123, dport=4789) / INNER6,
    "gue_not_ip": Ether(**ETH) / IP(**O4) / UDP(dport=GUE_PORT) / Raw(b"\x01" + b"x" * 30),
    "gue_empty": Ether(**ETH) / IP(**O4) / UDP(dport=GUE_PORT),
    "ipip_outer_options": Ether(**ETH) / IP(proto=4, options=b"\x01\x01\x01\x00", **O4) / INNER4,
    "ipip_outer_fragment": Ether(**ETH) / IP(proto=4, frag=0, **dict(O4, flags="MF")) / INNER4,
    "ipip_outer_later_fragment": Ether(**ETH) / IP(proto=4, frag=10, **O4) / INNER4,
    "ip6_ext_then_ipip": Ether(**ETH) / IPv6(**O6) / IPv6ExtHdrHopByHop(nh=4) / INNER4,
    "arp": Ether(dst="ff:ff:ff:ff:ff:ff", src=ETH["src"]) / ARP(pdst="10.0.0.1"),
    "truncated_ip": bytes(Ether(**ETH) / IP(proto=4, **O4))[:14 + 12],
    "truncated_ip6": bytes(Ether(**ETH) / IPv6(nh=41, **O6))[:14 + 30],
    "ethernet_only_ip": bytes(Ether(**ETH, type=0x0800)),
    "ethernet_only_ip6": bytes(Ether(**ETH, type=0x86DD)),
}


@pytest.mark.parametrize("name", list(UNTOUCHED))
def test_passes_untouched(decap, name):
    pkt = bytes(UNTOUCHED[name])
    s0 = decap_stats(decap)
    ret, out = _run(decap, pkt)
    assert ret == XDP_PASS
    assert out == pkt
    assert decap_stats(decap)[1] == s0[1]


def test_gue_off_when_port_unset(decap_no_gue):
    """Loaded with gue_port 0, UDP is never stripped; IPIP still is."""
    gue = bytes(Ether(**ETH) / IP(**O4) / UDP(dport=GUE_PORT) / INNER4)
    ret, out = _run(decap_no_gue, gue)
    assert (ret, out) == (XDP_PASS, gue)
    ret, out = _run(decap_no_gue, Ether(**ETH) / IP(proto=4, **O4) / INNER4)
    assert out == bytes(Ether(type=0x0800, **ETH) / INNER4)


def test_only_one_layer_stripped(decap):
    """IPIP in IPIP: one pass removes the outer header only."""
    middle = IP(proto=4, src="10.9.9.9", dst="10.8.8.8") / INNER4
    ret, out = _run(decap, Ether(**ETH) / IP(proto=4, **O4) / middle)
    assert out == bytes(Ether(type=0x0800, **ETH) / middle)
