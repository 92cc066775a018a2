"""Test frames for the benchmarks: Ethernet + IPv4/IPv6 + TCP/UDP with valid checksums,
built with struct (no scapy), each a multiple of 8 bytes (bench_restore copies 8 at a time)
and at most 256 bytes (the size of the bench template).

Offsets below are what bench_restore's vary/vary2 fields point at.
"""

from __future__ import annotations

import ipaddress
import struct

ETH_HLEN = 14
TMPL_MAX = 256

# IPv4 frame offsets
V4_SADDR = ETH_HLEN + 12
V4_SADDR_LO = ETH_HLEN + 14   # low half of the source address (vary2)
V4_L4 = ETH_HLEN + 20         # source port (vary)
V6_L4 = ETH_HLEN + 40

TCP_SYN, TCP_ACK = 0x02, 0x10

SRC_MAC = bytes.fromhex("02000000aa01")
DST_MAC = bytes.fromhex("02000000aa02")


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _l4(proto: int, sport: int, dport: int, payload: bytes, flags: int) -> bytes:
    if proto == 6:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def _with_l4_csum(proto: int, seg: bytes, pseudo: bytes) -> bytes:
    c = _csum(pseudo + seg)
    if proto == 17 and c == 0:
        c = 0xFFFF
    off = 16 if proto == 6 else 6
    return seg[:off] + struct.pack("!H", c) + seg[off + 2:]


def frame(proto: int, src: str, sport: int, dst: str, dport: int, size: int = 64,
          flags: int = TCP_ACK) -> bytes:
    """An Ethernet frame of exactly `size` bytes (multiple of 8, <= 256): the IP packet fills
    it (payload bytes 'x'), so IP lengths and frame length agree."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError("source and destination of one family")
    if size % 8 or size > TMPL_MAX:
        raise ValueError(f"frame size {size}: must be a multiple of 8 and <= {TMPL_MAX}")
    l3 = 20 if s.version == 4 else 40
    l4 = 20 if proto == 6 else 8
    plen = size - ETH_HLEN - l3 - l4
    if plen < 0:
        raise ValueError(f"frame size {size} too small for the headers")
    seg = _l4(proto, sport, dport, b"x" * plen, flags)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, proto, len(seg))
        seg = _with_l4_csum(proto, seg, pseudo)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 0, 0x4000, 64, proto, 0,
                         s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        etype = 0x0800
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", len(seg), proto)
        seg = _with_l4_csum(proto, seg, pseudo)
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(seg), proto, 64, s.packed, d.packed)
        etype = 0x86DD
    out = DST_MAC + SRC_MAC + struct.pack("!H", etype) + ip + seg
    assert len(out) == size
    return out


def vary(frame_bytes: bytes, run: int, vary_off: int = -1, vary2_off: int = -1) -> bytes:
    """What bench_restore makes of the template on the run whose counter value is `run`
    (mirror of write_template in bpf/bench.bpf.c: native-order u16 writes)."""
    b = bytearray(frame_bytes)
    if vary_off >= 0:
        b[vary_off:vary_off + 2] = struct.pack("=H", run & 0xFFFF)
    if vary2_off >= 0:
        v = ((run >> 16) ^ (run * 40503)) & 0xFFFF
        b[vary2_off:vary2_off + 2] = struct.pack("=H", v)
    return bytes(b)


def parse_tuple(frame_bytes: bytes) -> tuple:
    """(proto, src, sport, dst, dport) of an IPv4/IPv6 TCP/UDP frame."""
    etype = struct.unpack_from("!H", frame_bytes, 12)[0]
    if etype == 0x0800:
        proto = frame_bytes[ETH_HLEN + 9]
        src = ipaddress.IPv4Address(frame_bytes[26:30])
        dst = ipaddress.IPv4Address(frame_bytes[30:34])
        l4 = V4_L4
    else:
        proto = frame_bytes[ETH_HLEN + 6]
        src = ipaddress.IPv6Address(frame_bytes[22:38])
        dst = ipaddress.IPv6Address(frame_bytes[38:54])
        l4 = V6_L4
    sport, dport = struct.unpack_from("!HH", frame_bytes, l4)
    return proto, src, sport, dst, dport
