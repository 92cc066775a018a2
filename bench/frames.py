"""The one raw frame builder: Ethernet + IPv4/IPv6 + TCP/UDP with valid checksums, packed
with struct (no scapy: the tests' bulk flows and the benchmarks build many). The benchmarks
and the tests (tests/packets.py) both use it; scapy stays for parsing and for rows checked
field by field.

Offsets below are what bench_restore's vary/vary2 fields and bench_gen's fields point at.
Templates of bench_restore are a multiple of 8 bytes (it copies 8 at a time) and at most
TMPL_MAX bytes (the size of the bench template); CostBench checks that.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Optional

ETH_HLEN = 14
TMPL_MAX = 256

# IPv4 frame offsets
V4_SADDR = ETH_HLEN + 12
V4_SADDR_LO = ETH_HLEN + 14   # low half of the source address (vary2)
V4_L4 = ETH_HLEN + 20         # source port (vary)
V6_L4 = ETH_HLEN + 40
# the 16-bit fields bench_gen varies, per family
V4 = {"ip_csum": 24, "saddr_hi": V4_SADDR, "saddr_lo": V4_SADDR_LO, "daddr_hi": 30,
      "daddr_lo": 32, "l4": V4_L4}
V6 = {"saddr_hi": 34, "saddr_lo": 36, "daddr_lo": 52, "l4": V6_L4}

TCP_SYN, TCP_ACK = 0x02, 0x10

SRC_MAC = bytes.fromhex("02000000aa01")
DST_MAC = bytes.fromhex("02000000aa02")


def checksum(data: bytes) -> int:
    """RFC 1071 Internet checksum (0 over data that carries a valid one)."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The TCP/UDP pseudo header of packed IPv4 (4-byte) or IPv6 (16-byte) addresses."""
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def with_l4_csum(proto: int, seg: bytes, pseudo: bytes) -> bytes:
    """`seg` with its TCP/UDP checksum set (the field must hold 0)."""
    c = checksum(pseudo + seg)
    if proto == 17 and c == 0:
        c = 0xFFFF
    off = 16 if proto == 6 else 6
    return seg[:off] + struct.pack("!H", c) + seg[off + 2:]


def _l4(proto: int, sport: int, dport: int, payload: bytes, flags: int) -> bytes:
    if proto == 6:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def frame(proto: int, src, sport: int, dst, dport: int, size: int = 64,
          flags: int = TCP_ACK, smac: bytes = SRC_MAC, dmac: bytes = DST_MAC,
          payload: Optional[bytes] = None) -> bytes:
    """A TCP (proto 6) or UDP (17) frame with IP lengths matching it and checksums valid.
    Without `payload` it is exactly `size` bytes (payload bytes 'x' fill it, any size from
    the headers up); with `payload`, `size` is ignored."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError("source and destination of one family")
    if payload is None:
        hdrs = ETH_HLEN + (20 if s.version == 4 else 40) + (20 if proto == 6 else 8)
        if size < hdrs:
            raise ValueError(f"frame size {size} too small for the headers ({hdrs})")
        payload = b"x" * (size - hdrs)
    seg = _l4(proto, sport, dport, payload, flags)
    seg = with_l4_csum(proto, seg, pseudo_header(s.packed, d.packed, proto, len(seg)))
    if s.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 0, 0x4000, 64, proto, 0,
                         s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        etype = 0x0800
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(seg), proto, 64, s.packed, d.packed)
        etype = 0x86DD
    return dmac + smac + struct.pack("!H", etype) + ip + seg


def icmp(src: str, dst: str, typ: int, code: int, rest: bytes, body: bytes,
         size: int) -> bytes:
    """An ICMP (IPv4) or ICMPv6 frame of exactly `size` bytes (multiple of 8, <= 256):
    type, code, the 4 bytes after the checksum, then `body` cut or padded with 'x' to fit.
    Checksums valid."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if size % 8 or size > TMPL_MAX:
        raise ValueError(f"frame size {size}: must be a multiple of 8 and <= {TMPL_MAX}")
    l3 = 20 if s.version == 4 else 40
    n = size - ETH_HLEN - l3 - 8
    if n < 0:
        raise ValueError(f"frame size {size} too small for the headers")
    msg = struct.pack("!BBH", typ, code, 0) + rest + body[:n].ljust(n, b"x")
    if s.version == 4:
        msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(msg), 0, 0, 64, 1, 0,
                         s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        etype = 0x0800
    else:
        pseudo = pseudo_header(s.packed, d.packed, 58, len(msg))
        msg = msg[:2] + struct.pack("!H", checksum(pseudo + msg)) + msg[4:]
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(msg), 58, 64, s.packed, d.packed)
        etype = 0x86DD
    out = DST_MAC + SRC_MAC + struct.pack("!H", etype) + ip + msg
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
