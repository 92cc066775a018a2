"""The data path's flow hash and VIP prefilter index, bit for bit (bpf/flowhash.h).

MurmurHash3 x86_32 over 32-bit words read in host byte order from the packet's
network-order fields, so `xdplb explain` predicts exactly what the data path picks.
"""

from __future__ import annotations

import struct

from .layout import IPAddress, addr_words

FLOW_HASH_SEED = 0x8F0A5C31
PREFILTER_MULT = 0x9E3779B1
MASK = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & MASK


def _step(h: int, k: int) -> int:
    k = (k * 0xCC9E2D51) & MASK
    k = _rotl(k, 15)
    k = (k * 0x1B873593) & MASK
    h ^= k
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & MASK


def murmur3_words(words, seed: int) -> int:
    h = seed & MASK
    n = 0
    for w in words:
        h = _step(h, w & MASK)
        n += 1
    h ^= n * 4
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK
    h ^= h >> 16
    return h


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


def prefilter_index(addr: IPAddress) -> int:
    w = addr_words(addr)
    folded = w[0] ^ w[1] ^ w[2] ^ w[3] if addr.version == 6 else w[0]
    return ((folded * PREFILTER_MULT) & MASK) >> 16
