"""Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016), computed in user space.

Each backend has a preference list over the M slots, a permutation fixed by its own
identity alone: slot_j = (offset + j * skip) mod M with offset = h1(id) mod M and
skip = h2(id) mod (M - 1) + 1 (M prime, so every skip visits every slot). Backends take
turns; a turn claims the backend's next preferred slot that is still empty.

Weights. Katran's first weighted variant lets a heavy backend take extra turns without a
quota, which can leave shares off by more than a slot. Here each backend gets an exact
quota first (largest-remainder apportionment of M by weight, so every quota is within one
slot of M * w / sum(w)), and turns come in rounds r = 1, 2, ...: in round r a backend of
weight w takes a turn when floor(r * w / W) > floor((r - 1) * w / W), W the largest weight,
in index order, so heavier backends choose proportionally more often from the start.
Backends drop out at their quota; the quotas sum to M, so the table fills exactly. Equal
weights make this plain round robin, the original Maglev. Because preference lists do not
depend on the other backends, removing one moves few slots besides its own (measured by
`python -m bench maglev`, bench/maglev.py).

`build_reference` is the readable version used by tests; `build` runs the same algorithm
in C (lb/_native) and returns backend ids ready for the ring map (tests/test_maglev.py
checks that both make the same table).
"""

from __future__ import annotations

import array
import struct
from dataclasses import dataclass
from typing import Sequence

from .flowhash import murmur3_words

SEED_OFFSET = 0x2C6B7A31
SEED_SKIP = 0x7F4A7C15


@dataclass(frozen=True)
class Slotholder:
    """A backend as Maglev sees it: a stable identity and a weight (0 = no slots)."""

    key: bytes
    weight: int = 1


def permutation(key: bytes, m: int) -> tuple[int, int]:
    words = struct.unpack(f"={(len(key) + 3) // 4}I", key.ljust((len(key) + 3) // 4 * 4, b"\0"))
    offset = murmur3_words(words, SEED_OFFSET) % m
    skip = murmur3_words(words, SEED_SKIP) % (m - 1) + 1
    return offset, skip


def quotas(weights: Sequence[int], m: int) -> list[int]:
    """Largest-remainder apportionment of m slots by weight; ties go to lower indexes."""
    total = sum(w for w in weights if w > 0)
    if total == 0:
        return [0] * len(weights)
    base = [m * w // total if w > 0 else 0 for w in weights]
    rema = [(m * w % total if w > 0 else -1, -i) for i, w in enumerate(weights)]
    left = m - sum(base)
    for _, negi in sorted(rema, reverse=True)[:left]:
        base[-negi] += 1
    return base


def build_reference(backends: Sequence[Slotholder], m: int) -> list[int]:
    """The table as indexes into `backends` (-1 where no backend has weight)."""
    table = [-1] * m
    perms = [permutation(b.key, m) for b in backends]
    quota = quotas([b.weight for b in backends], m)
    nxt = [p[0] for p in perms]
    taken = [0] * len(backends)
    live = [i for i, b in enumerate(backends) if b.weight > 0 and quota[i]]
    wmax = max((backends[i].weight for i in live), default=1)
    filled, r = 0, 0
    while live and filled < m:
        r += 1
        still = []
        for b in live:
            w = backends[b].weight
            if (r * w) // wmax > ((r - 1) * w) // wmax:
                pos, skip = nxt[b], perms[b][1]
                while table[pos] >= 0:
                    pos = (pos + skip) % m
                table[pos] = b
                nxt[b] = (pos + skip) % m
                filled += 1
                taken[b] += 1
                if taken[b] >= quota[b]:
                    continue
            still.append(b)
        live = still
    return table


def build(backends: Sequence[Slotholder], m: int, ids: Sequence[int]) -> array.array:
    """The table as backend ids (array of u32; 0 where no backend has weight), computed in
    C (lb/_native: permutations, quotas and fill), equal to build_reference."""
    from .native import ffi, lib

    n = len(backends)
    if len(ids) != n or any(i <= 0 for i in ids):
        raise ValueError("every backend needs a nonzero id")
    klen = len(backends[0].key) if n else 4
    if klen % 4 or any(len(b.key) != klen for b in backends):
        raise ValueError("backend keys must share one length, a multiple of 4")
    table = array.array("I", bytes(4 * m))
    keys = ffi.from_buffer("uint32_t[]", b"".join(b.key for b in backends) or bytes(4))
    weights = ffi.new("uint64_t[]", [max(b.weight, 0) for b in backends] or [0])
    cids = ffi.new("uint32_t[]", list(ids) or [0])
    ret = lib.xdplb_maglev_build(m, n, keys, klen // 4, weights, cids,
                                 ffi.from_buffer("uint32_t[]", table))
    if ret < 0:
        raise MemoryError("maglev build: out of memory")
    return table
