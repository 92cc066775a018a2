"""The one Python mirror of bpf/lb_structs.h (and the bench template of bench.bpf.c).

Field for field, same widths, same explicit padding; tests/test_layout.py compares every
struct here with the BTF of the built object. Addresses and ports are stored as they lie
in packets (network byte order); helpers below convert.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
import struct
from typing import NamedTuple, Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

AF_NONE, AF_INET, AF_INET6 = 0, 1, 2
VIP_F_HASH_SRC_ONLY = 1 << 0
VIP_F_QUIC = 1 << 1
BE_F_FLOWS_STAY = 1 << 0
ENCAP_IPIP, ENCAP_GUE = 0, 1
TX_XDP_TX, TX_REDIRECT = 0, 1
GLOBAL_SLOTS = 32
FLOW_WAYS = 8  # LB_FLOW_WAYS: slots per bucket of the connection table
RING_CHUNK = 16  # LB_RING_CHUNK: backend ids per element of a ring
RING_CHUNK16 = 64  # LB_RING_CHUNK16: the same, 16-bit ids
PREFILTER_WORDS = 1024
QUIC_FILTER_WORDS = 4096
QUIC_CACHE_SLOTS = 1024  # per CPU


class Stat(enum.IntEnum):
    """Indexes into lb_global.c (enum lb_stat)."""

    RX = 0
    TX = 1
    REDIRECT = 2
    PASS = 3
    DROP = 4
    FLOW_HIT = 5
    FLOW_MISS = 6
    FLOW_MOVED = 7
    DROP_NO_BACKEND = 8
    DROP_MALFORMED = 9
    DROP_TOO_BIG = 10
    DROP_FRAGMENT = 11
    DROP_IP_OPTIONS = 12
    DROP_NO_NEXTHOP = 13
    DROP_ADJUST_FAIL = 14
    GUE_ZERO_CSUM = 15
    FLOW_CACHE_HIT = 16
    FLOW_INSERT_LIMITED = 17
    ICMP_FORWARDED = 18
    TOO_BIG_ANSWERED = 19
    TOO_BIG_LIMITED = 20
    ECHO_ANSWERED = 21
    FLOW_EVICTED = 22
    FLOW_INSERT_RACED = 23
    OTHER_HOST_PASSED = 24
    QUIC_ROUTED_BY_CID = 25
    QUIC_FALLBACK = 26


class _S(ctypes.Structure):
    @classmethod
    def unpack(cls, data: bytes):
        return cls.from_buffer_copy(data[: ctypes.sizeof(cls)])


class VipKey(_S):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("proto", u8), ("family", u8)]


class VipMeta(_S):
    _fields_ = [("vip_id", u32), ("flags", u32), ("ring_size", u32), ("ring_id", u32)]


class RingChunk(_S):
    _fields_ = [("id", u32 * RING_CHUNK)]


class RingChunk16(_S):
    _fields_ = [("id", u16 * RING_CHUNK16)]


class RingLayout(NamedTuple):
    """How a ring's inner map holds its ids: `chunk` elements of `ids` ids each (array
    typecode `typecode`), the last one's unused slots `pad`; with `sized`, one more
    element after them holds the ring's size as its first u32 (struct ring_chunk16)."""

    chunk: type
    ids: int
    typecode: str
    pad: int
    sized: bool
    bits: int

    def elements(self, ring_size: int) -> int:
        return -(-ring_size // self.ids) + self.sized

    def ring_bytes(self, ring_size: int) -> int:
        return self.elements(ring_size) * ctypes.sizeof(self.chunk)


RING32 = RingLayout(RingChunk, RING_CHUNK, "I", 0xFFFFFFFF, False, 32)
RING16 = RingLayout(RingChunk16, RING_CHUNK16, "H", 0xFFFF, True, 16)
RING_LAYOUTS = (RING16, RING32)


def ring_layout(max_backends: int) -> RingLayout:
    """16-bit ids when every backend id (below max_backends) fits them."""
    return RING16 if max_backends <= 1 << 16 else RING32


class VipSlot(_S):
    _fields_ = [("seq", u32), ("key", VipKey), ("meta", VipMeta)]


class AddrKey(_S):
    _fields_ = [("addr", u32 * 4), ("family", u8), ("pad", u8 * 3)]


class Backend(_S):
    _fields_ = [("addr", u32 * 4), ("family", u8), ("pad0", u8), ("gen", u16),
                ("flags", u32), ("vip_id", u32), ("nexthop_id", u32)]


class Nexthop(_S):
    _fields_ = [("dmac", u8 * 6), ("pad", u16)]


class FlowKey(_S):
    _fields_ = [("src", u32 * 4), ("dst", u32 * 4), ("sport", u16), ("dport", u16),
                ("proto", u8), ("family", u8), ("pad", u16)]


class FlowVal(_S):
    _fields_ = [("backend_id", u32), ("vip_id", u32), ("hash", u32), ("gen", u32)]


class FlowSlot(_S):
    _fields_ = [("key", FlowKey), ("val", FlowVal), ("seq", u32), ("age", u8),
                ("touch", u8), ("pad", u8 * 2)]


class FlowBucket(_S):
    _fields_ = [("slot", FlowSlot * FLOW_WAYS)]


class QuicServerKey(_S):
    _fields_ = [("addr", u32 * 4), ("port", u16), ("family", u8), ("sid_len", u8),
                ("server_id", u32)]


class QuicServer(_S):
    _fields_ = [("backend_id", u32), ("vip_id", u32), ("cid_len", u8), ("pad", u8 * 3)]


class QuicCacheSlot(_S):
    _fields_ = [("key", QuicServerKey), ("val", QuicServer), ("epoch", u32),
                ("pad", u64 * 3)]


class LbConfig(_S):
    _fields_ = [("smac", u8 * 6), ("encap", u8), ("tx_mode", u8), ("src_v4", u32),
                ("src_v6", u32 * 4), ("gue_port", u16), ("mtu", u16),
                ("flow_insert_limit", u32), ("too_big_per_sec", u32), ("answer_ping", u8),
                ("pad", u8), ("if_mac", u8 * 6)]


class FlowRate(_S):
    _fields_ = [("window_start_ns", u64), ("events", u64)]


class Counters(_S):
    _fields_ = [("packets", u64), ("bytes", u64)]


class BackendSlot(_S):
    _fields_ = [("be", Backend), ("c", Counters), ("pad", u64 * 2)]


class Global(_S):
    _fields_ = [("c", u64 * GLOBAL_SLOTS)]


class BenchTemplate(_S):
    _fields_ = [("len", u32), ("vary_off", u16), ("vary", u16), ("vary2_off", u16),
                ("vary2", u16), ("pad", u32), ("data", u8 * 256)]


# name in BTF -> mirror; checked by tests/test_layout.py
MIRRORS = {
    "vip_key": VipKey, "vip_meta": VipMeta, "ring_chunk": RingChunk,
    "ring_chunk16": RingChunk16, "vip_slot": VipSlot,
    "addr_key": AddrKey,
    "backend": Backend, "nexthop": Nexthop, "flow_key": FlowKey, "flow_val": FlowVal,
    "flow_slot": FlowSlot, "flow_bucket": FlowBucket, "lb_config": LbConfig,
    "lb_counters": Counters, "lb_global": Global, "flow_rate": FlowRate,
    "backend_slot": BackendSlot, "quic_server_key": QuicServerKey,
    "quic_server": QuicServer, "quic_cache_slot": QuicCacheSlot,
}


def family_of(addr: IPAddress) -> int:
    return AF_INET6 if addr.version == 6 else AF_INET


def addr_words(addr: IPAddress) -> tuple[int, int, int, int]:
    """The address as the data path stores it: four u32 read natively from network-order
    bytes, IPv4 in the first word and zeros after."""
    raw = addr.packed.ljust(16, b"\0")
    return struct.unpack("=4I", raw)


def words_addr(words, family: int) -> IPAddress:
    raw = struct.pack("=4I", *words)
    if family == AF_INET6:
        return ipaddress.IPv6Address(raw)
    return ipaddress.IPv4Address(raw[:4])


def port_be(port: int) -> int:
    """A port as the u16 field holds it (network byte order)."""
    return socket.htons(port)


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def vip_key(addr: IPAddress, port: int, proto: int) -> VipKey:
    k = VipKey()
    k.addr[:] = addr_words(addr)
    k.port = port_be(port)
    k.proto = proto
    k.family = family_of(addr)
    return k


def addr_key(addr: IPAddress) -> AddrKey:
    k = AddrKey()
    k.addr[:] = addr_words(addr)
    k.family = family_of(addr)
    return k


def flow_key(proto: int, src: IPAddress, sport: int, dst: IPAddress, dport: int) -> FlowKey:
    k = FlowKey()
    k.src[:] = addr_words(src)
    k.dst[:] = addr_words(dst)
    k.sport = port_be(sport)
    k.dport = port_be(dport)
    k.proto = proto
    k.family = family_of(dst)
    return k


class VipEntry(NamedTuple):
    """A `vips` entry, decoded."""

    vip_id: int
    ring_id: int
    ring_size: int
    hash_src_only: bool


class BackendEntry(NamedTuple):
    """A `backends` entry, decoded."""

    addr: IPAddress
    vip_id: int
    nexthop_id: int
    keep_flows: bool  # flows already on it stay (BE_F_FLOWS_STAY)
    gen: int


def vip_ident(raw: bytes) -> tuple:
    """(address, port, proto) of a raw `vips` key."""
    key = VipKey.unpack(raw)
    return words_addr(key.addr, key.family), socket.ntohs(key.port), key.proto


def vip_entry(raw: bytes) -> VipEntry:
    meta = VipMeta.unpack(raw)
    return VipEntry(meta.vip_id, meta.ring_id, meta.ring_size,
                    bool(meta.flags & VIP_F_HASH_SRC_ONLY))


def backend_entry(b: Backend) -> BackendEntry:
    return BackendEntry(words_addr(b.addr, b.family), b.vip_id, b.nexthop_id,
                        bool(b.flags & BE_F_FLOWS_STAY), b.gen)
