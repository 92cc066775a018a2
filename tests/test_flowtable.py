"""The connection table, run through BPF_PROG_TEST_RUN on the real lb.bpf.o.

Backend-state semantics of the interface contract:
  active: new flows yes, existing stay | drain: no, stay | maint / down: no, moved.
Removing a backend moves only its flows; a backend id reused by another VIP never
captures the old VIP's flows.
"""

from __future__ import annotations

import ipaddress
import os
import random
import time

import pytest

from lb import layout
from lb.datapath import Limits
from lb.specs import VipSpec

from packets import (A, TCP_P, TCP_SYN, UDP_P, Flow, LbEnv, assert_globals, be, fast_frame,
                     outer_dst)

RING = 1009
VIP4 = A("192.0.2.100")
VIP6 = A("2001:db8:100::1")


@pytest.fixture
def env():
    e = LbEnv()
    try:
        yield e
    finally:
        e.close()


def spec(backends, addr=VIP4, port=80, proto=TCP_P, **kw):
    return VipSpec(addr, port, proto, tuple(backends), ring_size=RING, **kw)


def rand_flows(n, vip: VipSpec, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if vip.address.version == 4:
            src = ipaddress.IPv4Address(rng.getrandbits(32))
        else:
            src = ipaddress.IPv6Address(rng.getrandbits(128))
        out.append(Flow(vip.proto, src, rng.randrange(1024, 65536), vip.address, vip.port))
    return out


def send(env, f: Flow):
    r = env.run(fast_frame(f.proto, f.src, f.sport, f.dst, f.dport))
    return r.verdict, (outer_dst(r.data) if r.verdict == "tx" else None)


def establish(env, vip: VipSpec, flows):
    """Send each flow once (all new); returns {flow: backend address} and checks that the
    data path agreed with the reference and recorded every flow."""
    placed = {}
    before = env.snapshot()
    for f in flows:
        exp = env.expect(f)
        verdict, got = send(env, f)
        assert verdict == "tx"
        assert got == exp.backend.address
        assert env.dp.flow_backend(f.key()) == exp.backend_id
        placed[f] = got
    d = env.delta(before)
    assert_globals(d.glob, {"rx": len(flows), "tx": len(flows), "flow_miss": len(flows)})
    return placed


def resend(env, flows):
    before = env.snapshot()
    got = {}
    for f in flows:
        verdict, addr = send(env, f)
        got[f] = (verdict, addr)
    return got, env.delta(before)


def established(env, s0: VipSpec, n: int, seed: int):
    """`s0` applied and n random flows to it established: (flows, {flow: backend})."""
    env.apply([s0])
    flows = rand_flows(n, s0, seed)
    return flows, establish(env, s0, flows)


def grown_after_establish(env, net: str, n: int, seed: int):
    """A VIP on backends net.1 and net.2 with n flows established, then grown to net.1-8:
    (the grown spec, the flows, {flow: backend placed on}, {flow: backend of the new ring})."""
    base = [be(f"{net}.1"), be(f"{net}.2")]
    flows, placed = established(env, spec(base), n, seed)
    s1 = spec(base + [be(f"{net}.{i}") for i in range(3, 9)])
    env.apply([s1])
    ring1 = env.ring(s1)
    return s1, flows, placed, {f: env.expect(f, ring1).backend.address for f in flows}


def test_flow_keeps_backend_when_ring_changes(env):
    s1, flows, placed, now = grown_after_establish(env, "10.5.0", 300, 1)
    redirected = [f for f in flows if now[f] != placed[f]]
    assert len(redirected) > 150, "ring change should re-point most slots"

    got, d = resend(env, flows)
    for f in flows:
        assert got[f] == ("tx", placed[f]), f"{f} left its backend after a ring change"
    assert_globals(d.glob, {"rx": 300, "tx": 300, "flow_hit": 300})
    for f in redirected:
        assert env.addr_of_bid(s1, env.dp.flow_backend(f.key())) == placed[f]

    # new flows follow the new ring, including to the added backends
    fresh = rand_flows(400, s1, 2)
    new_placed = establish(env, s1, fresh)
    assert len(set(new_placed.values())) == 8


@pytest.mark.parametrize("state", ["maint", "down"])
def test_flows_move_off_unusable_backend(env, state):
    names = ["10.6.0.1", "10.6.0.2", "10.6.0.3"]
    s0 = spec([be(n) for n in names])
    flows, placed = established(env, s0, 400, 3)
    victim = A(names[1])
    on_victim = [f for f in flows if placed[f] == victim]
    others = [f for f in flows if placed[f] != victim]
    assert len(on_victim) > 50 and len(others) > 50
    old_bid = env.bid_of(s0, victim)

    s1 = spec([be(n, state=state if n == names[1] else "active") for n in names])
    env.apply([s1])
    ring1 = env.ring(s1)
    assert old_bid not in ring1
    assert env.dp.backend(old_bid).flags == 0

    got, d = resend(env, flows)
    assert_globals(d.glob, {"rx": 400, "tx": 400, "flow_hit": len(others),
                            "flow_moved": len(on_victim)})
    for f in others:
        assert got[f] == ("tx", placed[f])
    for f in on_victim:
        exp = env.expect(f, ring1)
        assert got[f] == ("tx", exp.backend.address), f"{f} not moved to the ring's choice"
        assert exp.backend.address != victim
        assert env.dp.flow_backend(f.key()) == exp.backend_id, "flow entry not rewritten"

    # moved flows are now ordinary hits on their new backend, even after the victim
    # comes back (no flapping back)
    env.apply([s0])
    got2, d2 = resend(env, flows)
    assert_globals(d2.glob, {"rx": 400, "tx": 400, "flow_hit": 400})
    assert got2 == got


def test_flows_stay_on_draining_backend(env):
    names = ["10.7.0.1", "10.7.0.2", "10.7.0.3"]
    s0 = spec([be(n) for n in names])
    flows, placed = established(env, s0, 300, 4)
    victim = A(names[0])
    assert sum(1 for a in placed.values() if a == victim) > 50

    s1 = spec([be(n, state="drain" if n == names[0] else "active") for n in names])
    env.apply([s1])
    vbid = env.bid_of(s1, victim)
    assert vbid not in env.ring(s1)

    got, d = resend(env, flows)
    assert_globals(d.glob, {"rx": 300, "tx": 300, "flow_hit": 300})
    for f in flows:
        assert got[f] == ("tx", placed[f])

    fresh = establish(env, s1, rand_flows(300, s1, 5))
    assert victim not in set(fresh.values()), "a draining backend got a new flow"

    # drain -> maint: now its flows move
    s2 = spec([be(n, state="maint" if n == names[0] else "active") for n in names])
    env.apply([s2])
    got, d = resend(env, flows)
    n_victim = sum(1 for a in placed.values() if a == victim)
    assert d.glob["flow_moved"] == n_victim and d.glob["flow_hit"] == 300 - n_victim
    assert all(got[f][1] != victim for f in flows)


def test_all_draining_keeps_old_flows_drops_new(env):
    names = ["fd00:8::1", "fd00:8::2"]
    s0 = spec([be(n) for n in names], addr=VIP6, proto=UDP_P, port=5000)
    flows, placed = established(env, s0, 100, 6)
    s1 = spec([be(n, state="drain") for n in names], addr=VIP6, proto=UDP_P, port=5000)
    env.apply([s1])
    assert set(env.ring(s1)) == {0}
    got, d = resend(env, flows)
    assert_globals(d.glob, {"rx": 100, "tx": 100, "flow_hit": 100})
    assert all(got[f] == ("tx", placed[f]) for f in flows)
    new = rand_flows(50, s1, 7)
    got, d = resend(env, new)
    assert all(v == ("drop", None) for v in got.values())
    assert_globals(d.glob, {"rx": 50, "drop": 50, "drop_no_backend": 50, "flow_miss": 50})
    # all maint: the old flows have nowhere to go
    s2 = spec([be(n, state="maint") for n in names], addr=VIP6, proto=UDP_P, port=5000)
    env.apply([s2])
    got, d = resend(env, flows)
    assert all(v == ("drop", None) for v in got.values())
    assert_globals(d.glob, {"rx": 100, "drop": 100, "drop_no_backend": 100,
                            "flow_moved": 100})


def test_removed_backend_flows_move_others_stay(env):
    names = [f"10.9.0.{i}" for i in range(1, 6)]
    s0 = spec([be(n) for n in names])
    flows, placed = established(env, s0, 500, 8)
    victim = A(names[2])
    vbid = env.bid_of(s0, victim)
    on_victim = [f for f in flows if placed[f] == victim]
    assert len(on_victim) > 40

    s1 = spec([be(n) for n in names if n != names[2]])
    env.apply([s1])
    assert env.dp.backend(vbid).family == 0, "removed backend entry not cleared"
    ring1 = env.ring(s1)
    got, d = resend(env, flows)
    assert_globals(d.glob, {"rx": 500, "tx": 500, "flow_hit": 500 - len(on_victim),
                            "flow_moved": len(on_victim)})
    for f in flows:
        if f in on_victim:
            exp = env.expect(f, ring1)
            assert got[f] == ("tx", exp.backend.address)
            assert env.dp.flow_backend(f.key()) == exp.backend_id
        else:
            assert got[f] == ("tx", placed[f])


def test_ring_minimal_disruption_on_removal(env):
    names = [f"10.9.1.{i}" for i in range(1, 11)]
    s0 = spec([be(n) for n in names])
    env.apply([s0])
    r0 = [env.addr_of_bid(s0, b) for b in env.ring(s0)]
    s1 = spec([be(n) for n in names if n != names[4]])
    env.apply([s1])
    r1 = [env.addr_of_bid(s1, b) for b in env.ring(s1)]
    changed = sum(1 for a, b in zip(r0, r1) if a != b)
    lost = sum(1 for a in r0 if a == A(names[4]))
    assert changed >= lost
    assert changed <= lost * 1.5 + 20, (changed, lost)


def test_backend_id_reused_by_other_vip_cannot_capture_flows():
    """With 3 backend ids, a removed backend's id is soon given to another VIP's backend.
    The old VIP's flows that pointed at that id must be re-hashed within their own VIP,
    never sent to the other VIP's backend."""
    e = LbEnv(Limits(max_vips=8, max_backends=4, max_nexthops=16, flow_table_size=1024))
    try:
        a, b = be("10.10.0.1"), be("10.10.0.2")
        v1 = spec([a, b])
        e.apply([v1])
        flows = rand_flows(200, v1, 10)
        placed = establish(e, v1, flows)
        on_b = [f for f in flows if placed[f] == b.address]
        assert len(on_b) > 30
        bid_b = e.bid_of(v1, b.address)

        v1b = spec([a])
        c, d_ = be("10.20.0.1"), be("10.20.0.2")
        v2 = spec([c, d_], addr=A("192.0.2.200"))
        e.apply([v1b])        # b's id goes back to the pool (behind the unused id 3)
        e.apply([v1b, v2])
        # the programmer handed b's id to one of v2's backends
        assert bid_b in e.vip_state(v2).backends.values(), e.vip_state(v2).backends
        thief = e.addr_of_bid(v2, bid_b)
        assert e.dp.backend(bid_b).vip_id == e.vip_state(v2).vip_id

        got, dl = resend(e, flows)
        assert_globals(dl.glob, {"rx": 200, "tx": 200, "flow_hit": 200 - len(on_b),
                                 "flow_moved": len(on_b)})
        for f in flows:
            assert got[f] == ("tx", a.address), f"{f} went to {got[f]} (thief {thief})"
        for f in on_b:
            assert e.dp.flow_backend(f.key()) == e.bid_of(v1b, a.address)
        # and v2's own flows are unaffected
        placed2 = establish(e, v2, rand_flows(100, v2, 11))
        assert set(placed2.values()) == {c.address, d_.address}
    finally:
        e.close()


def test_flow_entry_of_other_vip_id_is_not_honoured(env):
    """The same check built directly in the maps: a flow entry naming a backend that
    belongs to another VIP (but otherwise usable) is re-hashed, not followed."""
    v1 = spec([be("10.11.0.1")])
    v2 = spec([be("10.11.0.9")], addr=A("192.0.2.201"))
    env.apply([v1, v2])
    f = rand_flows(1, v1, 12)[0]
    foreign = env.bid_of(v2, A("10.11.0.9"))
    env.dp.flows.put(f.key(), layout.FlowVal(backend_id=foreign))
    before = env.snapshot()
    assert send(env, f) == ("tx", A("10.11.0.1"))
    assert_globals(env.delta(before).glob, {"rx": 1, "tx": 1, "flow_moved": 1})
    assert env.dp.flow_backend(f.key()) == env.bid_of(v1, A("10.11.0.1"))
    # an entry naming a nonexistent id (beyond the table) is re-hashed too
    env.dp.flows.put(f.key(), layout.FlowVal(backend_id=0xFFFFFFF0))
    before = env.snapshot()
    assert send(env, f) == ("tx", A("10.11.0.1"))
    assert_globals(env.delta(before).glob, {"rx": 1, "tx": 1, "flow_moved": 1})


@pytest.fixture
def one_cpu():
    """The insert limit is per CPU: keep every test run on one CPU."""
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(old)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def test_flow_insert_limit_forwards_but_does_not_remember(env, one_cpu):
    """Over lb.flow_insert_limit new flows in one second, a new flow still goes where the
    ring says, but is not written to the table (and counted); a second later the table
    takes flows again."""
    s0 = spec([be("10.12.0.1"), be("10.12.0.2"), be("10.12.0.3")])
    env.apply([s0])
    env.configure(flow_insert_limit=10)
    flows = rand_flows(40, s0, 13)
    before = env.snapshot()
    for f in flows:
        assert send(env, f) == ("tx", env.expect(f).backend.address)
    assert_globals(env.delta(before).glob, {"rx": 40, "tx": 40, "flow_miss": 40,
                                            "flow_insert_limited": 30})
    assert [env.dp.flow_backend(f.key()) is not None for f in flows] == [True] * 10 + [False] * 30
    assert env.flow_count() == 10

    # the remembered ones hit; the others are new flows again, still over the limit
    got, d = resend(env, flows)
    assert all(v == ("tx", env.expect(f).backend.address) for f, v in got.items())
    assert_globals(d.glob, {"rx": 40, "tx": 40, "flow_hit": 10, "flow_miss": 30,
                            "flow_insert_limited": 30})

    time.sleep(1.1)  # next window
    _, d = resend(env, flows[10:15])
    assert_globals(d.glob, {"rx": 5, "tx": 5, "flow_miss": 5})
    assert all(env.dp.flow_backend(f.key()) is not None for f in flows[10:15])


@pytest.mark.parametrize("limit", [0, 50])
def test_flow_insert_limit_keeps_established_flows_through_a_flood(limit, one_cpu):
    """A burst of new flows larger than this CPU's share of the table evicts established
    flows when nothing limits inserts (limit 0: the control), and leaves them in the
    table with a limit."""
    e = LbEnv(Limits(max_vips=8, max_backends=16, max_nexthops=16, flow_table_size=1024))
    try:
        s0 = spec([be("10.13.0.1"), be("10.13.0.2")])
        e.apply([s0])
        established = rand_flows(100, s0, 14)
        establish(e, s0, established)
        e.configure(flow_insert_limit=limit)
        before = e.snapshot()
        flood = rand_flows(3000, s0, 15)
        for f in flood:
            assert send(e, f)[0] == "tx"
        d = e.delta(before).glob
        kept = sum(e.dp.flow_backend(f.key()) is not None for f in established)
        if limit:
            assert d["flow_insert_limited"] >= 3000 - 2 * limit, d
            assert kept == 100
        else:
            assert d["flow_insert_limited"] == 0
            assert kept < 50, f"the control flood should have evicted flows ({kept} kept)"
    finally:
        e.close()


def syn(f: Flow) -> bytes:
    return fast_frame(f.proto, f.src, f.sport, f.dst, f.dport, tcp_flags=TCP_SYN)


def test_syn_takes_the_ring_and_replaces_the_entry(env, one_cpu):
    """A SYN opens a connection: it goes where the ring says now (not where an old entry
    with the same 5-tuple points), and the rest of that connection follows it."""
    _, flows, placed, now = grown_after_establish(env, "10.14.0", 200, 16)
    assert sum(now[f] != placed[f] for f in flows) > 100

    before = env.snapshot()
    for f in flows:
        r = env.run(syn(f))
        assert (r.verdict, outer_dst(r.data)) == ("tx", now[f])
    assert_globals(env.delta(before).glob, {"rx": 200, "tx": 200, "flow_miss": 200})
    got, d = resend(env, flows)  # the ACKs that follow
    assert got == {f: ("tx", now[f]) for f in flows}
    assert_globals(d.glob, {"rx": 200, "tx": 200, "flow_hit": 200})


def test_syn_never_goes_to_a_draining_backend(env):
    """Established flows stay on a draining backend; a new connection reusing one of
    their 5-tuples does not."""
    s0 = spec([be("10.15.0.1"), be("10.15.0.2")])
    flows, placed = established(env, s0, 100, 17)
    on_b = [f for f in flows if placed[f] == A("10.15.0.2")]
    assert on_b
    env.apply([spec([be("10.15.0.1"), be("10.15.0.2", state="drain")])])
    got, _ = resend(env, on_b)
    assert set(got.values()) == {("tx", A("10.15.0.2"))}
    for f in on_b:
        r = env.run(syn(f))
        assert (r.verdict, outer_dst(r.data)) == ("tx", A("10.15.0.1"))


def test_vip_counters_keep_the_counts_of_removed_backends(env):
    """A sent packet is counted for its backend only; the VIP's total adds its backends,
    and a backend removed from the VIP leaves its counts with the VIP."""
    s0 = spec([be("10.16.0.1"), be("10.16.0.2"), be("10.16.0.3")])
    env.apply([s0])
    flows = rand_flows(90, s0, 18)
    establish(env, s0, flows)
    vid = env.vip_state(s0).vip_id
    total = env.dp.vip_counters(vid, env.vip_state(s0).backends.values())[0]
    assert total[0] == 90
    gone = env.bid_of(s0, A("10.16.0.3"))
    assert env.dp.backend_counters(gone)[0] > 0

    s1 = spec([be("10.16.0.1"), be("10.16.0.2")])
    env.apply([s1])
    assert env.dp.vip_counters(vid, env.vip_state(s1).backends.values())[0] == total
    assert env.dp.backend_counters(gone) == (0, 0)  # its id starts from zero if reused
    resend(env, flows)
    p, b = env.dp.vip_counters(vid, env.vip_state(s1).backends.values())[0]
    assert (p, b) == (180, 2 * total[1])


def test_flows_served_from_the_cache_stay_young_in_the_table(one_cpu):
    """A flow whose packets all hit the per-CPU cache still has its table entry looked up
    now and then, so a stream of new flows evicts the idle flow established with it, not
    this one."""
    e = LbEnv(Limits(max_vips=8, max_backends=16, max_nexthops=16, flow_table_size=1024))
    try:
        s0 = spec([be("10.17.0.1"), be("10.17.0.2")])
        e.apply([s0])
        busy, idle = rand_flows(2, s0, 19)
        establish(e, s0, [busy, idle])
        before = e.snapshot()
        for f in rand_flows(3000, s0, 20):
            assert send(e, busy)[0] == "tx"
            assert send(e, f)[0] == "tx"
        d = e.delta(before).glob
        assert d["flow_cache_hit"] >= 2900, d  # the busy flow was served by the cache
        assert e.dp.flow_backend(idle.key()) is None, "the idle flow should have been evicted"
        assert e.dp.flow_backend(busy.key()) is not None
    finally:
        e.close()


def test_full_bucket_evicts_its_least_recently_used_entry():
    """A table of one bucket (8 slots): 8 flows fill it; after 7 of them are used again, a
    9th flow takes the place of the one that was not, and the eviction is counted."""
    e = LbEnv(Limits(max_vips=8, max_backends=16, max_nexthops=16, flow_table_size=8))
    try:
        s0 = spec([be("10.18.0.1"), be("10.18.0.2")])
        e.apply([s0])
        flows = rand_flows(9, s0, 21)
        establish(e, s0, flows[:8])
        assert e.flow_count() == 8
        resend(e, flows[1:8])
        before = e.snapshot()
        assert send(e, flows[8])[0] == "tx"
        assert_globals(e.delta(before).glob, {"rx": 1, "tx": 1, "flow_miss": 1,
                                              "flow_evicted": 1})
        assert e.dp.flow_backend(flows[0].key()) is None
        assert all(e.dp.flow_backend(f.key()) is not None for f in flows[1:])
    finally:
        e.close()


def test_reused_5tuple_outside_its_own_slot_never_resurfaces(one_cpu):
    """A new connection reusing the 5-tuple of a remembered one whose entry sits outside
    its own slot: the SYN takes its free own slot at once (ft_store reads no other slot),
    the rest of the connection follows it, and when another flow later needs that own
    slot, the newer entry replaces the older copy, so the old connection's backend never
    comes back. Not an eviction: both copies were one flow's."""
    e = LbEnv(Limits(max_vips=8, max_backends=16, max_nexthops=16, flow_table_size=8))
    try:
        old = [be("10.19.0.1"), be("10.19.0.2")]
        s0 = spec(old)
        e.apply([s0])
        by_own: dict = {}
        for f in rand_flows(400, s0, 23):
            by_own.setdefault(e.dp.flows.probe(f.key())[0], []).append(f)
        g, f, h = next(v for v in by_own.values() if len(v) >= 3)[:3]
        own = e.dp.flows.probe(f.key())[0]

        def slots_of(flow):
            want = bytes(flow.key())
            return [i for i in range(8) if bytes(e.dp.flows.slot(i).key) == want]

        establish(e, s0, [g])
        placed = establish(e, s0, [f])[f]
        assert slots_of(g) == [own] and slots_of(f) != [own]  # g was used: it stayed
        e.dp.flows.delete(g.key())
        e.apply([spec([b if b.address != placed else be(str(placed), state="drain")
                       for b in old])])
        other = next(b.address for b in old if b.address != placed)
        r = e.run(syn(f))
        assert (r.verdict, outer_dst(r.data)) == ("tx", other)
        assert own in slots_of(f) and len(slots_of(f)) == 2  # the older copy is left
        assert send(e, f) == ("tx", other)

        before = e.snapshot()
        assert send(e, h)[0] == "tx"
        assert_globals(e.delta(before).glob, {"rx": 1, "tx": 1, "flow_miss": 1})
        assert len(slots_of(f)) == 1, "the older copy of f is still in the table"
        assert send(e, f) == ("tx", other)
        assert e.flow_count() == 2
    finally:
        e.close()
