"""A ring's inner map packs RING_CHUNK backend ids per element (struct ring_chunk), or
RING_CHUNK16 16-bit ids (struct ring_chunk16, then one more element with the ring's size)
when lb.max_backends <= 65536: ring sizes are primes, so the last element of ids is
always partly padding. read_ring gives back exactly the ring's ids in either layout, and
the data path finds every slot's id, the last element's too."""

from __future__ import annotations

import array
import ctypes

import pytest

from lb import capacity, layout
from lb.config import parse_config
from lb.datapath import Datapath, Limits
from lb.flowhash import flow_hash
from lb.native import Map, lib
from lb.rings import PAD_ID

from lb.specs import VipSpec

from configtext import MINIMAL
from packets import TCP_P, TCP_SYN, A, assert_globals, be, fast_frame, lb_env, outer_dst

CHUNK = layout.RING_CHUNK
LIMITS = Limits(max_vips=16, max_backends=64, max_nexthops=64, flow_table_size=1024)
# 32-bit ids: more backends than 16 bits can name
LIMITS32 = Limits(max_vips=16, max_backends=70000, max_nexthops=64, flow_table_size=1024)
SIZES = [101, 127, 1009, 1019, 65537, 16, 112]


def _inner(dp: Datapath, ring_id: int) -> Map:
    raw = dp.maps["rings"].lookup(ctypes.c_uint32(ring_id))
    fd = lib.bpf_map_get_fd_by_id(ctypes.c_uint32.from_buffer_copy(raw).value)
    assert fd >= 0
    return Map.from_fd(fd)


@pytest.mark.parametrize("m", SIZES)
def test_read_ring_returns_exactly_the_ring(m):
    """Sizes with 5, 15, 1, 11 and 1 ids in the last element, and whole elements (no
    padding to strip: ids that end a ring are never taken for padding)."""
    ids = array.array("I", [(i * 7919) % (1 << 24) for i in range(m)])
    ids[-1] = (1 << 24) - 1  # the largest id lb.max_backends allows (the rings map
    # does not check ids against this instance's limits)
    with Datapath(LIMITS32) as dp:
        assert dp.ring_layout is layout.RING32
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


@pytest.mark.parametrize("m", SIZES + [128, 64 * 1024])
def test_read_ring_returns_exactly_the_16bit_ring(m):
    """The same with 16-bit ids: 0xffff, the largest id lb.max_backends 65536 allows, is
    also the padding, so the ring's size comes from the element after the ids."""
    ids = array.array("I", [(i * 7919) % (1 << 16) for i in range(m)])
    ids[-1] = 0xFFFF
    with Datapath(Limits(max_vips=16, max_backends=1 << 16, flow_table_size=1024)) as dp:
        assert dp.ring_layout is layout.RING16
        dp.install_rings([(1, ids)])
        got = dp.read_ring(1)
        assert got == ids and len(got) == m
        with _inner(dp, 1) as inner:
            assert inner.value_size == ctypes.sizeof(layout.RingChunk16) == 128
            n = inner.max_entries
            assert n == -(-m // layout.RING_CHUNK16) + 1
            last = layout.RingChunk16.unpack(inner.lookup(ctypes.c_uint32(n - 2)))
            used = m - (n - 2) * layout.RING_CHUNK16
            assert list(last.id[:used]) == list(ids[-used:])
            assert list(last.id[used:]) == [0xFFFF] * (layout.RING_CHUNK16 - used)
            assert inner.lookup(ctypes.c_uint32(n - 1)) == m.to_bytes(4, "little") + bytes(124)
        zeros = array.array("I", [0] * m)
        dp.install_rings([(2, zeros)])
        assert dp.read_ring(2) == zeros


RING = 1019  # 1019 = 63 * 16 + 11 = 15 * 64 + 59: the last element holds slots
# 1008..1018 (960..1018 with 16-bit ids)
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


@pytest.mark.parametrize("limits,ring_layout,tail_len", [(LIMITS, layout.RING16, 59),
                                                         (LIMITS32, layout.RING32, 11)],
                         ids=["16bit", "32bit"])
def test_every_slot_of_the_last_partial_chunk_routes_to_its_backend(limits, ring_layout,
                                                                    tail_len):
    """A SYN whose hash lands in the last element (and, for comparison, the first two)
    goes to the backend the Maglev ring names at that slot, counted as that backend's."""
    chunk = ring_layout.ids
    tail = set(range(RING // chunk * chunk, RING))
    assert len(tail) == RING % chunk == tail_len
    slots = tail | set(range(0, 2 * chunk))
    with lb_env(limits=limits) as env:
        assert env.dp.ring_layout is ring_layout
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


@pytest.mark.parametrize("max_backends", [1 << 16, 70000])
def test_capacity_estimate_is_what_a_ring_takes(max_backends):
    """lb/capacity.py's ring cost is the inner map a ring really gets, in either layout:
    two per VIP (old and new while one is swapped)."""
    cfg = parse_config(MINIMAL.replace("[lb]\n", f"[lb]\nmax_backends = {max_backends}\n"))
    assert cfg.lb.ring_size == 65537
    with Datapath(Limits(max_vips=16, max_backends=max_backends, flow_table_size=1024)) as dp:
        dp.install_rings([(1, array.array("I", [1] * cfg.lb.ring_size))])
        with _inner(dp, 1) as inner:
            size = inner.max_entries * inner.value_size
    # 1025 + 1 elements of 128 bytes, or 4097 of 64
    assert size == {1 << 16: 1026 * 128, 70000: 4097 * 64}[max_backends]
    assert capacity.estimate(cfg.lb, vips=3, ncpus=2)["ring_size"] == 2 * 3 * size
