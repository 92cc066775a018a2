"""Shared helpers for the data-path tests (test_datapath, test_flowtable).

* `LbEnv`: the real lb.bpf.o loaded with small limits, egress config set, VIPs programmed
  with lb.programmer; runs frames through BPF_PROG_TEST_RUN and snapshots counters.
* Packet builders: scapy for rows that are checked field by field; for the bulk flows of
  the agreement test (where scapy would cost ~400 us per packet) bench/frames.py, the
  benchmarks' struct builder.
* `check_encap`: verifies every outer header field of a forwarded frame against values
  computed here, independently of the data path (own RFC 1071 checksums, own parsing).

The Python reference for "which backend" is lb.flowhash.flow_hash plus the ring the data
path has installed (Datapath.read_ring), which the tests also compare with the spec's
Maglev ring and the programmer's own copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed

from bench import frames  # noqa: E402
from lb import layout, native  # noqa: E402
from lb.datapath import Datapath, EgressConfig, Limits  # noqa: E402
from lb.flowhash import flow_hash, prefilter_index  # noqa: E402
from lb.programmer import InstalledVip, Programmer  # noqa: E402
from lb.specs import BackendSpec, VipSpec, ring_for  # noqa: E402

A = ipaddress.ip_address
TCP_P, UDP_P = socket.IPPROTO_TCP, socket.IPPROTO_UDP
TCP_SYN, TCP_ACK, TCP_SYN_ACK = frames.TCP_SYN, frames.TCP_ACK, 0x12

SMAC = bytes.fromhex("020000000001")
SOURCE_V4 = A("10.0.0.2")
SOURCE_V6 = A("fd00::2")
MTU = 1500
CLIENT_MAC = bytes.fromhex("020000000099")  # input frames: src
LB_MAC = bytes.fromhex("020000000001")      # input frames: dst

DEFAULT_CONFIG = dict(smac=SMAC, encap=layout.ENCAP_IPIP, tx_mode=layout.TX_XDP_TX,
                      source_v4=SOURCE_V4, source_v6=SOURCE_V6, gue_port=6080, mtu=MTU)

COUNTER_NAMES = ("rx", "tx", "redirect", "pass", "drop", "flow_hit", "flow_miss",
                 "flow_moved", "drop_no_backend", "drop_malformed", "drop_too_big",
                 "drop_fragment", "drop_ip_options", "drop_no_nexthop", "drop_adjust_fail",
                 "gue_zero_csum", "flow_cache_hit", "flow_insert_limited", "icmp_forwarded",
                 "too_big_answered", "too_big_limited", "echo_answered", "flow_evicted",
                 "flow_insert_raced", "other_host_passed", "quic_routed_by_cid",
                 "quic_fallback")


def mac_for(key: str) -> bytes:
    """A distinct, locally administered next-hop MAC per key (deterministic)."""
    h = sum((i + 1) * b for i, b in enumerate(key.encode())) & 0xFFFFFFFF
    return bytes([0x02, 0xAA]) + struct.pack("!I", h)


def be(addr: str, weight: int = 1, state: str = "active", nexthop: Optional[str] = None
       ) -> BackendSpec:
    """A BackendSpec in one of the admin/health states of the interface contract."""
    in_ring, keep = {"active": (True, True), "drain": (False, True),
                     "maint": (False, False), "down": (False, False)}[state]
    return BackendSpec(A(addr), weight, in_ring, keep, addr if nexthop is None else nexthop)


# --------------------------------------------------------------------------- checksums

def ones_sum(data: bytes) -> int:
    """RFC 1071 one's-complement sum of 16-bit big-endian words (odd length zero-padded),
    folded to 16 bits."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo_header(src: ipaddress._BaseAddress, dst: ipaddress._BaseAddress, proto: int,
                  length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!IxxxB", length, proto)


def l4_checksum_ok(src, dst, proto: int, segment: bytes) -> bool:
    return ones_sum(pseudo_header(src, dst, proto, len(segment)) + segment) == 0xFFFF


# --------------------------------------------------------------------------- packets

def eth(ethertype: Optional[int] = None):
    e = Ether(src=CLIENT_MAC.hex(":"), dst=LB_MAC.hex(":"))
    if ethertype is not None:
        e.type = ethertype
    return e


def frame(l3) -> bytes:
    """Ethernet (fixed MACs, never ARP-resolved by scapy) + an L3 packet, as bytes."""
    return bytes(eth() / l3)


def ip_layer(src: str, dst: str, **kw):
    return IPv6(src=src, dst=dst, **kw) if ":" in dst else IP(src=src, dst=dst, **kw)


def l4(proto: str, sport: int, dport: int, **kw):
    """TCP segments are ACKs unless `flags` says otherwise: a SYN skips the connection
    table (it opens a new connection), so repeat-and-hit checks need non-SYN packets."""
    if proto == "tcp":
        return TCP(sport=sport, dport=dport, **{"flags": "A", **kw})
    return UDP(sport=sport, dport=dport, **kw)


def pkt(proto: str, src: str, dst: str, sport: int, dport: int, payload: bytes = b"hello",
        ip_kw: Optional[dict] = None, l4_kw: Optional[dict] = None) -> bytes:
    return frame(ip_layer(src, dst, **(ip_kw or {})) / l4(proto, sport, dport, **(l4_kw or {}))
                 / payload)


@dataclass(frozen=True)
class Flow:
    proto: int
    src: ipaddress._BaseAddress
    sport: int
    dst: ipaddress._BaseAddress
    dport: int

    def key(self) -> layout.FlowKey:
        return layout.flow_key(self.proto, self.src, self.sport, self.dst, self.dport)


def parse_input(data: bytes) -> tuple[Optional[Flow], bytes, bytes, int]:
    """(flow, inner IP packet as its header sizes it, trailing padding, ToS/TC byte) of an
    input frame, parsed with scapy (not with anything the data path shares); flow is None
    for a packet without ports (ICMP)."""
    p = Ether(data)
    if IP in p:
        ip = p[IP]
        n = ip.len
        tos = ip.tos
    else:
        ip = p[IPv6]
        n = 40 + ip.plen
        tos = ip.tc
    l4p = ip.payload
    flow = None  # ICMP: no ports
    if hasattr(l4p, "sport"):
        flow = Flow(ip.proto if IP in p else ip.nh, A(ip.src), l4p.sport, A(ip.dst), l4p.dport)
    inner = data[14:14 + n]
    return flow, inner, data[14 + n:], tos


def fast_frame(proto: int, src: ipaddress._BaseAddress, sport: int,
               dst: ipaddress._BaseAddress, dport: int, payload: bytes = b"0123456789",
               tcp_flags: int = TCP_ACK) -> bytes:
    """A TCP/UDP frame from client to LB built with bench/frames.py (struct packing, for
    bulk flows). TCP: an ACK by default."""
    return frames.frame(proto, src, sport, dst, dport, flags=tcp_flags, payload=payload,
                        smac=CLIENT_MAC, dmac=LB_MAC)


def outer_dst(out: bytes) -> ipaddress._BaseAddress:
    et = out[12:14]
    if et == b"\x08\x00":
        return ipaddress.IPv4Address(out[30:34])
    assert et == b"\x86\xdd", f"outer ethertype {et.hex()}"
    return ipaddress.IPv6Address(out[38:54])


def prefilter_collider(vip: ipaddress._BaseAddress, avoid: Iterable = ()) -> ipaddress._BaseAddress:
    """An address of the same family that is NOT a VIP but sets the same prefilter bit as
    `vip`, so packets to it get past the prefilter and exercise the exact checks."""
    want = prefilter_index(vip)
    avoid = set(avoid)
    base = 0x0A630000 if vip.version == 4 else int(A("2001:db8:ffff::"))
    for i in range(1, 1 << 22):
        c = ipaddress.IPv6Address(base + i) if vip.version == 6 else ipaddress.IPv4Address(base + i)
        if c != vip and c not in avoid and prefilter_index(c) == want:
            return c
    raise AssertionError("no prefilter collider found")


# --------------------------------------------------------------------------- environment

@dataclass
class Snapshot:
    glob: dict
    vips: dict
    backends: dict
    cpu_rx: tuple = ()  # per CPU rx counts; in a delta, the new count of each CPU that moved

    def outer_ip_id(self, hash_: int) -> int:
        """(delta of one run) The outer IPv4 ID the data path gives a packet without DF:
        the flow hash plus the rx count of the CPU that ran it, low 16 bits."""
        assert len(self.cpu_rx) == 1, f"not one run on one CPU: {self.cpu_rx}"
        return (hash_ + self.cpu_rx[0]) & 0xFFFF


@dataclass
class Expected:
    """What the Python model says a VIP packet should get."""
    vip: VipSpec
    vip_id: int
    hash: int
    slot: int
    backend_id: int                  # 0: the ring slot is empty
    backend: Optional[BackendSpec]


class LbEnv:
    """One loaded data path, programmed through lb.programmer."""

    def __init__(self, limits: Limits = Limits(max_vips=64, max_backends=1024,
                                                max_nexthops=256, flow_table_size=4096),
                 pin_dir: Optional[str] = None):
        self.limits, self.pin_dir = limits, pin_dir
        self.dp = Datapath(limits, pin_dir=pin_dir)
        self.programmer = Programmer(self.dp)
        self.specs: list[VipSpec] = []
        self.macs: dict[str, bytes] = {}
        self.cfg: dict = {}
        self.configure()

    def close(self) -> None:
        self.dp.close()

    def restart(self) -> None:
        """What a daemon restart does: a new data path adopting the maps pinned in
        pin_dir (its own flow cache starts empty), a new programmer rebuilt from them."""
        assert self.pin_dir, "restart needs pin_dir"
        self.dp.close()
        self.dp = Datapath(self.limits, pin_dir=self.pin_dir)
        assert "backends" in self.dp.adopted and "flows" in self.dp.adopted, self.dp.replaced
        self.programmer = Programmer(self.dp)
        self.programmer.adopt()
        self._ring_cache = {}

    # -- programming
    def configure(self, **over) -> None:
        cfg = dict(DEFAULT_CONFIG, **over)
        if cfg["tx_mode"] == layout.TX_REDIRECT:
            cfg.setdefault("tx_port", 1)  # lo: BPF_PROG_TEST_RUN only reports the verdict
        if cfg != self.cfg:
            self.programmer.apply(self.specs, self.macs, egress=EgressConfig(**cfg))
            self.cfg = cfg

    def apply(self, specs: Sequence[VipSpec], macs: Optional[dict] = None):
        """Program `specs`. Next hops default to one MAC per backend address (key = the
        address text) so every frame's Ethernet destination identifies its backend."""
        self.specs = list(specs)
        if macs is None:
            macs = dict(self.macs)
            for s in specs:
                for b in s.backends:
                    if b.nexthop == str(b.address):
                        macs.setdefault(b.nexthop, mac_for(b.nexthop))
        self.macs = dict(macs)
        return self.programmer.apply(self.specs, self.macs)

    def vip_state(self, spec: VipSpec) -> InstalledVip:
        v = self.programmer.installed(spec.ident)
        assert v is not None, f"{spec.ident} is not installed"
        return v

    def ring(self, spec: VipSpec):
        """The ring the data path really holds (Datapath.read_ring, what `explain` uses),
        cross-checked against the spec's Maglev ring and the programmer's copy."""
        v = self.vip_state(spec)
        got = self.dp.read_ring(v.ring_id)
        assert got is not None, f"no ring installed for {spec.ident}"
        assert len(got) == spec.ring_size
        assert got == ring_for(spec, v.backends), "installed ring is not the spec's Maglev ring"
        assert got == self.programmer.ring(spec.ident), "installed ring differs from the programmer's"
        return got

    def find_vip(self, flow: Flow) -> Optional[VipSpec]:
        by = {s.ident: s for s in self.specs}
        return by.get((flow.dst, flow.dport, flow.proto)) or by.get((flow.dst, 0, flow.proto))

    def expect(self, flow: Flow, ring=None) -> Expected:
        spec = self.find_vip(flow)
        assert spec is not None, f"{flow} is not for a VIP"
        v = self.vip_state(spec)
        ring = self.ring(spec) if ring is None else ring
        h = flow_hash(flow.proto, flow.src, flow.sport, flow.dst, flow.dport,
                      src_only=spec.hash_src_only)
        slot = h % spec.ring_size
        bid = ring[slot]
        by_id = {i: a for a, i in v.backends.items()}
        b = None
        if bid:
            b = next(x for x in spec.backends if x.address == by_id[bid])
        return Expected(spec, v.vip_id, h, slot, bid, b)

    def bid_of(self, spec: VipSpec, addr) -> int:
        return self.vip_state(spec).backends[A(str(addr))]

    def addr_of_bid(self, spec: VipSpec, bid: int):
        return {i: a for a, i in self.vip_state(spec).backends.items()}[bid]

    # -- running
    def run(self, data: bytes) -> native.RunResult:
        return native.test_run(self.dp.prog_fd, data)

    def flush_flows(self) -> None:
        self.dp.flows.clear()

    def flow_count(self) -> int:
        return self.dp.flows.count()

    # -- counters
    def snapshot(self) -> Snapshot:
        vips, bids = {}, {}
        for s in self.specs:
            v = self.vip_state(s)
            vips[v.vip_id], per = self.dp.vip_counters(v.vip_id, v.backends.values())
            bids.update(per)
        rx = tuple(layout.Global.unpack(raw).c[layout.Stat.RX]
                   for raw in self.dp.maps["stats"].lookup_percpu(ctypes.c_uint32(0)))
        return Snapshot(self.dp.global_counters(), vips, bids, rx)

    def delta(self, before: Snapshot) -> Snapshot:
        now = self.snapshot()
        g = {k: now.glob[k] - before.glob.get(k, 0) for k in now.glob}
        vd = {}
        for k, (p, b) in now.vips.items():
            p0, b0 = before.vips.get(k, (0, 0))
            if (p - p0, b - b0) != (0, 0):
                vd[k] = (p - p0, b - b0)
        bd = {}
        for k, (p, b) in now.backends.items():
            p0, b0 = before.backends.get(k, (0, 0))
            if (p - p0, b - b0) != (0, 0):
                bd[k] = (p - p0, b - b0)
        moved = tuple(n for n, n0 in zip(now.cpu_rx, before.cpu_rx) if n != n0)
        return Snapshot(g, vd, bd, moved)


def assert_globals(delta: dict, expected: dict) -> None:
    """Every global counter moved exactly as `expected` says (absent = unchanged).
    flow_cache_hit, when `expected` does not name it, only has to stay within flow_hit
    (which hits find their entry in its own slot depends on collisions in the bucket)."""
    unknown = set(expected) - set(COUNTER_NAMES)
    assert not unknown, f"unknown counters {unknown}"
    assert set(delta) == set(COUNTER_NAMES), f"counter names changed: {sorted(delta)}"
    if "flow_cache_hit" not in expected:
        assert 0 <= delta["flow_cache_hit"] <= delta["flow_hit"], delta
        delta = {k: v for k, v in delta.items() if k != "flow_cache_hit"}
    got = {k: v for k, v in delta.items() if v}
    want = {k: v for k, v in expected.items() if v}
    assert got == want, f"global counter deltas {got} != expected {want}"


@contextlib.contextmanager
def lb_env(**kw):
    env = LbEnv(**kw)
    try:
        yield env
    finally:
        env.close()


# --------------------------------------------------------------------------- checks

def check_encap(out: bytes, data: bytes, *, backend_addr, nh_mac: bytes, hash_: int,
                cfg: dict, expect_zero_csum: bool = False, ip_id: Optional[int] = None) -> None:
    """Every field of the outer headers of a forwarded frame, and the inner packet.
    ip_id: the outer IPv4 ID expected when the inner packet has no DF (Snapshot.outer_ip_id);
    with DF it is 0."""
    flow, inner, padding, tos = parse_input(data)
    inner_v6 = data[12:14] == b"\x86\xdd"
    gue = cfg["encap"] == layout.ENCAP_GUE
    backend_addr = A(str(backend_addr))
    outer_v6 = backend_addr.version == 6
    ol = (40 if outer_v6 else 20) + (8 if gue else 0)
    assert len(out) == len(data) + ol, f"frame length {len(out)} != {len(data)} + {ol}"

    # Ethernet
    assert out[0:6] == nh_mac, f"eth dst {out[0:6].hex(':')} != next hop {nh_mac.hex(':')}"
    assert out[6:12] == cfg["smac"], f"eth src {out[6:12].hex(':')}"
    assert out[12:14] == (b"\x86\xdd" if outer_v6 else b"\x08\x00"), out[12:14].hex()

    ipproto = UDP_P if gue else (41 if inner_v6 else 4)
    l3 = out[14:]
    if not outer_v6:
        (vihl, otos, tot_len, ident, frag, ttl, proto, csum, src, dst) = struct.unpack(
            "!BBHHHBBH4s4s", l3[:20])
        assert vihl == 0x45, f"version/ihl {vihl:#x}"
        assert otos == tos, f"outer tos {otos:#x} != inner {tos:#x}"
        assert tot_len == ol + len(inner), f"outer tot_len {tot_len} != {ol}+{len(inner)}"
        inner_df = inner_v6 or bool(struct.unpack("!H", inner[6:8])[0] & 0x4000)
        assert ident == (0 if inner_df else ip_id), f"outer id {ident} (inner DF {inner_df})"
        assert frag == (0x4000 if inner_df else 0), f"outer frag_off {frag:#x} (inner DF {inner_df})"
        assert ttl == 64, f"outer ttl {ttl}"
        assert proto == ipproto, f"outer protocol {proto} != {ipproto}"
        assert ones_sum(l3[:20]) == 0xFFFF, f"outer IPv4 checksum {csum:#x} invalid"
        # and the same value computed from scratch
        zeroed = l3[:10] + b"\0\0" + l3[12:20]
        assert csum == 0xFFFF - ones_sum(zeroed)
        assert A(src) == cfg["source_v4"], f"outer src {A(src)}"
        assert A(dst) == backend_addr, f"outer dst {A(dst)} != {backend_addr}"
        osrc, odst = A(src), A(dst)
    else:
        (w0, plen, nh, hlim, src, dst) = struct.unpack("!IHBB16s16s", l3[:40])
        assert w0 >> 28 == 6, f"outer version {w0 >> 28}"
        assert (w0 >> 20) & 0xFF == tos, f"outer traffic class {(w0 >> 20) & 0xFF:#x} != {tos:#x}"
        assert w0 & 0xFFFFF == hash_ & 0xFFFFF, f"flow label {w0 & 0xFFFFF:#x} != {hash_ & 0xFFFFF:#x}"
        assert plen == len(inner) + (8 if gue else 0), f"outer payload_len {plen}"
        assert nh == ipproto, f"outer next header {nh} != {ipproto}"
        assert hlim == 64, f"outer hop limit {hlim}"
        assert A(src) == cfg["source_v6"], f"outer src {A(src)}"
        assert A(dst) == backend_addr, f"outer dst {A(dst)} != {backend_addr}"
        osrc, odst = A(src), A(dst)
    ipl = 40 if outer_v6 else 20
    if gue:
        u = l3[ipl:ipl + 8]
        sport, dport, ulen, ucsum = struct.unpack("!HHHH", u)
        assert sport == 0xC000 | (hash_ & 0x3FFF), f"GUE sport {sport:#x}"
        assert dport == cfg["gue_port"], f"GUE dport {dport} != {cfg['gue_port']}"
        assert ulen == 8 + len(inner), f"UDP length {ulen}"
        datagram = l3[ipl:ipl + ulen]
        if expect_zero_csum:
            assert ucsum == 0, f"GUE UDP checksum {ucsum:#x}, expected 0 (inner had none)"
        else:
            assert ucsum != 0, "GUE UDP checksum 0 although the inner packet has one"
            assert l4_checksum_ok(osrc, odst, UDP_P, datagram), (
                f"GUE UDP checksum {ucsum:#x} does not verify over the datagram")
            # a second opinion: scapy computes it for the same datagram
            ref = (IPv6(src=str(osrc), dst=str(odst), nh=UDP_P) if outer_v6 else
                   IP(src=str(osrc), dst=str(odst), proto=UDP_P))
            ref = ref / UDP(sport=sport, dport=dport, len=ulen) / datagram[8:]
            assert bytes(ref)[ipl + 6:ipl + 8] == struct.pack("!H", ucsum), "scapy disagrees"
    assert out[14 + ol:14 + ol + len(inner)] == inner, "inner packet bytes changed"
    assert out[14 + ol + len(inner):] == padding, "trailing frame bytes changed"
