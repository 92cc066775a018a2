"""The data path's flow hash, VIP prefilter index and VIP index slot, bit for bit
(bpf/flowhash.h).

MurmurHash3 x86_32 over 32-bit words read in host byte order from the packet's
network-order fields, so `xdplb explain` predicts exactly what the data path picks. The
hash itself is the data path's C (bpf/flowhash.h, compiled into lb._native): this module
only lays out the words as the data path does.
"""

from __future__ import annotations

import struct
from typing import Sequence

from .layout import IPAddress, addr_words
from .native import ffi, lib

FLOW_HASH_SEED = 0x8F0A5C31
PREFILTER_MULT = 0x9E3779B1
MASK = 0xFFFFFFFF


def murmur3_words(words: Sequence[int], seed: int) -> int:
    """MurmurHash3 of a sequence of 32-bit words (bpf/flowhash.h's murmur3_words)."""
    buf = ffi.new("uint32_t[]", [w & MASK for w in words])
    return lib.xdplb_murmur3(buf, len(buf), seed & MASK)


def _u16_raw(port: int) -> int:
    """A port as a u16 read natively from its two network-order bytes."""
    return struct.unpack("=H", struct.pack("!H", port))[0]


def flow_hash(proto: int, src: IPAddress, sport: int, dst: IPAddress, dport: int,
              src_only: bool = False) -> int:
    v6 = src.version == 6
    n = 4 if v6 else 1
    words = list(addr_words(src)[:n])
    if not src_only:
        words += addr_words(dst)[:n]
        words.append(_u16_raw(sport) | (_u16_raw(dport) << 16))
        words.append(proto)
    return murmur3_words(words, FLOW_HASH_SEED)


def vip_slot_hash(key: bytes) -> int:
    """Where a raw `vips` key sits in vip_index, before masking (bpf/flowhash.h)."""
    return lib.xdplb_vip_slot_hash(ffi.from_buffer("uint32_t[]", bytearray(key)))


def prefilter_index(addr: IPAddress) -> int:
    w = addr_words(addr)
    folded = w[0] ^ w[1] ^ w[2] ^ w[3] if addr.version == 6 else w[0]
    return ((folded * PREFILTER_MULT) & MASK) >> 16
