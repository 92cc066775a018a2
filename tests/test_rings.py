"""A ring's inner map packs RING_CHUNK backend ids per element (struct ring_chunk):
ring sizes are primes, so the last element is always partly padding. read_ring gives
back exactly the ring's ids, and the data path finds every slot's id, the last
element's too."""

from __future__ import annotations

import array
import ctypes

import pytest

from lb import layout
from lb.datapath import Datapath, Limits
from lb.flowhash import flow_hash
from lb.native import Map, lib
from lb.rings import PAD_ID

from lb.specs import VipSpec

from packets import TCP_P, TCP_SYN, A, assert_globals, be, fast_frame, lb_env, outer_dst

CHUNK = layout.RING_CHUNK
LIMITS = Limits(max_vips=16, max_backends=64, max_nexthops=64, flow_table_size=1024)


def _inner(dp: Datapath, ring_id: int) -> Map:
    raw = dp.maps["rings"].lookup(ctypes.c_uint32(ring_id))
    fd = lib.bpf_map_get_fd_by_id(ctypes.c_uint32.from_buffer_copy(raw).value)
    assert fd >= 0
    return Map.from_fd(fd)


@pytest.mark.parametrize("m", [101, 127, 1009, 1019, 65537, 16, 112])
def test_read_ring_returns_exactly_the_ring(m):
    """Sizes with 5, 15, 1, 11 and 1 ids in the last element, and whole elements (no
    padding to strip: ids that end a ring are never taken for padding)."""
    ids = array.array("I", [(i * 7919) % (1 << 24) for i in range(m)])
    ids[-1] = (1 << 24) - 1  # the largest id lb.max_backends allows (the rings map
    # does not check ids against this instance's limits)
    with Datapath(LIMITS) as dp:
        dp.install_rings([(1, ids)])
        got = dp.read_ring(1)
        assert got == ids and len(got) == m
        with _inner(dp, 1) as inner:
            assert inner.value_size == ctypes.sizeof(layout.RingChunk) == 64
            assert inner.max_entries == -(-m // CHUNK)
            n = inner.max_entries
            last = layout.RingChunk.unpack(inner.lookup(ctypes.c_uint32(n - 1)))
            used = m - (n - 1) * CHUNK
            assert list(last.id[:used]) == list(ids[-used:])
            assert list(last.id[used:]) == [PAD_ID] * (CHUNK - used)
        zeros = array.array("I", [0] * m)  # a ring of a VIP without backends
        dp.install_rings([(2, zeros)])
        assert dp.read_ring(2) == zeros


RING = 1019  # 1019 = 63 * 16 + 11: the last element holds slots 1008..1018
SPEC = VipSpec(A("192.0.2.60"), 80, TCP_P, tuple(be(f"10.6.0.{i}") for i in range(1, 8)),
               ring_size=RING)


def _flows_for(slots: set[int]) -> dict[int, tuple]:
    """A (source, port) whose flow hash lands on each slot."""
    found: dict[int, tuple] = {}
    src = A("198.51.100.7")
    for sport in range(1, 1 << 16):
        slot = flow_hash(TCP_P, src, sport, SPEC.address, SPEC.port) % RING
        found.setdefault(slot, (src, sport))
    assert slots <= set(found), f"no flow for slots {slots - set(found)}"
    return {s: found[s] for s in slots}


def test_every_slot_of_the_last_partial_chunk_routes_to_its_backend():
    """A SYN whose hash lands in the last element (and, for comparison, the first two)
    goes to the backend the Maglev ring names at that slot, counted as that backend's."""
    tail = set(range(RING // CHUNK * CHUNK, RING))
    assert len(tail) == RING % CHUNK == 11
    slots = tail | set(range(0, 2 * CHUNK))
    with lb_env(limits=LIMITS) as env:
        env.apply([SPEC])
        ring = env.ring(SPEC)
        assert len({ring[s] for s in tail}) > 1  # a misplaced read would show
        addr_of = {i: a for a, i in env.vip_state(SPEC).backends.items()}
        for slot, (src, sport) in sorted(_flows_for(slots).items()):
            before = env.snapshot()
            r = env.run(fast_frame(TCP_P, src, sport, SPEC.address, SPEC.port,
                                   tcp_flags=TCP_SYN))
            assert r.verdict == "tx", (slot, r.verdict)
            assert outer_dst(r.data) == addr_of[ring[slot]], f"slot {slot}"
            d = env.delta(before)
            assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_miss": 1})
            assert {b: p for b, (p, _) in d.backends.items()} == {ring[slot]: 1}, slot
