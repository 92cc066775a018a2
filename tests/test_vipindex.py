"""vip_index, the data path's direct-mapped copy of `vips`: a VIP whose slot another VIP
holds is still found (through `vips`), and no change, removal or restart leaves a slot
that answers for a VIP `vips` does not hold as it does. Packets through
BPF_PROG_TEST_RUN, counter deltas."""

from __future__ import annotations

import ctypes
import os
import random

import pytest

from lb import layout
from lb.native import Map

from packets import (A, TCP_P, TCP_SYN, Flow, LbEnv, assert_globals, be, fast_frame,
                     outer_dst)
from lb.specs import VipSpec

PIN = "/sys/fs/bpf/xdplb-vipindex-test"
CLIENT = A("198.51.100.7")
BACKENDS = {"a": (be("10.1.0.11"), be("10.1.0.12")), "b": (be("10.1.0.21"),),
            "c": (be("10.1.0.31"), be("10.1.0.32"))}


def spec(addr, port=80, name="a", ring_size=1009, **kw) -> VipSpec:
    return VipSpec(A(addr), port, TCP_P, BACKENDS[name], ring_size=ring_size, **kw)


def key_of(s: VipSpec) -> bytes:
    return bytes(layout.vip_key(s.address, s.port, s.proto))


def colliding(env: LbEnv, first: str, n: int) -> list[str]:
    """`first` and n - 1 other addresses whose port-80 TCP keys share its index slot."""
    index = env.dp.vip_index
    want = index.slot_of(key_of(spec(first)))
    out = [first]
    for i in range(1, 1 << 16):
        addr = f"192.0.{2 + (i >> 8)}.{i & 255}"
        if addr != first and index.slot_of(key_of(spec(addr))) == want:
            out.append(addr)
            if len(out) == n:
                return out
    raise AssertionError("no colliding VIP addresses found")


def slots(env: LbEnv) -> dict[int, layout.VipSlot]:
    """Every non-empty slot as the map holds it."""
    m = env.dp.maps["vip_index"]
    out = {}
    for i in range(m.max_entries):
        s = layout.VipSlot.unpack(m.lookup(ctypes.c_uint32(i)))
        assert s.seq % 2 == 0, f"slot {i} left mid-write (seq {s.seq})"
        if any(bytes(s)[4:]):
            out[i] = s
    return out


def assert_index_answers_for_vips(env: LbEnv) -> None:
    """Every slot holds a key of `vips` that hashes there, with its entry as `vips` has
    it; every key of `vips` has a non-empty slot (else the data path would pass it)."""
    vips = dict(env.dp.maps["vips"].items())
    held = slots(env)
    for i, s in held.items():
        key = bytes(s.key)
        assert key in vips, f"slot {i} holds a key `vips` does not"
        assert bytes(s.meta) == vips[key], f"slot {i} holds a stale entry"
        assert env.dp.vip_index.slot_of(key) == i
    for key in vips:
        assert env.dp.vip_index.slot_of(key) in held, "a VIP's slot is empty"


def syn(dst, sport: int) -> bytes:
    return fast_frame(TCP_P, CLIENT, sport, A(dst), 80, tcp_flags=TCP_SYN)


def assert_forwarded_to(env: LbEnv, s: VipSpec, sport: int) -> None:
    before = env.snapshot()
    res = env.run(syn(s.address, sport))
    assert res.verdict == "tx", res.verdict
    assert outer_dst(res.data) == env.expect(Flow(TCP_P, CLIENT, sport, s.address, 80)).backend.address
    d = env.delta(before)
    assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_miss": 1})
    assert sum(p for p, _ in d.backends.values()) == 1


def assert_passes(env: LbEnv, addr: str, sport: int) -> None:
    before = env.snapshot()
    res = env.run(syn(addr, sport))
    assert res.verdict == "pass", res.verdict
    assert_globals(env.delta(before).glob, {"rx": 1, "pass": 1})


@pytest.fixture
def env():
    e = LbEnv()
    yield e
    e.close()


def test_a_vip_whose_slot_another_holds_is_found_through_vips(env):
    a, b, c = colliding(env, "192.0.2.10", 3)
    va, vb, vc = spec(a, name="a"), spec(b, name="b"), spec(c, name="c")
    slot = env.dp.vip_index.slot_of(key_of(va))
    env.apply([va, vb, vc])
    assert env.dp.vip_index.held(slot) == min(map(key_of, (va, vb, vc)))
    assert_index_answers_for_vips(env)
    for i, s in enumerate((va, vb, vc)):
        assert_forwarded_to(env, s, 41000 + i)
    # a VIP leaves: the slot goes to the least of the others before its entry goes
    env.apply([vb, vc])
    assert env.dp.vip_index.held(slot) == min(key_of(vb), key_of(vc))
    assert_index_answers_for_vips(env)
    assert_passes(env, a, 41010)
    assert_forwarded_to(env, vb, 41011)
    assert_forwarded_to(env, vc, 41012)
    env.apply([vc])
    assert env.dp.vip_index.held(slot) == key_of(vc)
    assert_passes(env, b, 41020)
    assert_forwarded_to(env, vc, 41021)
    env.apply([])
    assert env.dp.vip_index.held(slot) is None
    assert slots(env) == {}
    assert_passes(env, c, 41030)


def test_port_zero_vip_behind_an_empty_exact_slot(env):
    """The exact key's empty slot says "no VIP" for it; the port-0 key is asked next."""
    any_port = VipSpec(A("192.0.2.77"), 0, TCP_P, BACKENDS["b"], ring_size=1009)
    env.apply([any_port])
    assert_index_answers_for_vips(env)
    assert_forwarded_to(env, any_port, 42000)


def test_changes_never_leave_a_stale_slot(env):
    """Random adds, removals and changes (ring size: a new ring id; hash mode) over
    colliding and other VIPs: after each, the index answers exactly for `vips`, and every
    VIP's packets go to its backends."""
    rng = random.Random(16)
    addrs = colliding(env, "192.0.2.10", 4) + ["192.0.2.99", "192.0.3.5"]
    current: dict[str, VipSpec] = {}
    for step in range(40):
        addr = rng.choice(addrs)
        if addr in current and rng.random() < 0.4:
            del current[addr]
        else:
            current[addr] = spec(addr, name=rng.choice("abc"),
                                 ring_size=rng.choice((1009, 2003)),
                                 hash_src_only=rng.random() < 0.3)
        env.apply(list(current.values()))
        assert_index_answers_for_vips(env)
        for i, s in enumerate(current.values()):
            assert_forwarded_to(env, s, 43000 + step * 8 + i)
        for addr in set(addrs) - set(current):
            assert_passes(env, addr, 44000 + step)


def _clean() -> None:
    if os.path.isdir(PIN):
        for name in os.listdir(PIN):
            os.unlink(os.path.join(PIN, name))
        os.rmdir(PIN)


def test_restart_keeps_or_repairs_the_index():
    """A restart adopts the pinned index and repairs what it holds against the adopted
    `vips` (here: a slot naming a VIP that is gone); with `vips` replaced, the index is
    replaced too (nothing old in the new one, the earlier program's left as it was)."""
    _clean()
    e = LbEnv(pin_dir=PIN)
    try:
        a, b = colliding(e, "192.0.2.10", 2)
        va, vb = spec(a), spec(b, name="b")
        e.apply([va, vb])
        ghost = spec(a, port=81)  # its address passes the prefilter
        stale = layout.VipSlot(seq=2, key=layout.vip_key(ghost.address, 81, TCP_P),
                               meta=layout.VipMeta.unpack(e.dp.maps["vips"].lookup(
                                   layout.vip_key(va.address, 80, TCP_P))))
        e.dp.maps["vip_index"].update(ctypes.c_uint32(e.dp.vip_index.slot_of(key_of(ghost))),
                                      stale)
        e.restart()
        assert "vip_index" in e.dp.adopted, e.dp.replaced
        assert_index_answers_for_vips(e)
        assert_forwarded_to(e, va, 45000)
        assert_forwarded_to(e, vb, 45001)
        before = e.snapshot()
        assert e.run(fast_frame(TCP_P, CLIENT, 45002, A(a), 81, tcp_flags=TCP_SYN)
                     ).verdict == "pass"
        assert_globals(e.delta(before).glob, {"rx": 1, "pass": 1})
        with Map.from_pin(f"{PIN}/vips") as vips:  # a foreign `vips`: replaced, empty
            for key in list(vips.keys()):
                vips.update(key, layout.VipMeta(vip_id=0))
        old = e.dp  # its program may still be attached (a killed daemon): it stays open
        new = type(e.dp)(e.limits, pin_dir=PIN)
        # the earlier program still finds its VIPs in its own index: the new instance
        # emptied a new one, not the index that program reads
        assert_forwarded_to(e, va, 45003)
        assert new.replaced.get("vip_index") == "vips not adopted", new.replaced
        assert "vips" in new.replaced
        old.close()
        e.dp = new
        assert slots(e) == {}
    finally:
        e.dp.unpin_all()
        e.close()
        _clean()
