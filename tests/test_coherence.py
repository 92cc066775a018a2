"""Connections never split across CPUs: the per-CPU flow cache against the connection
table, run through BPF_PROG_TEST_RUN pinned to CPUs (a test run executes on the CPU of
the calling thread).

Invariant: whatever CPU each packet of a connection arrives on, all its packets go to the
backend its SYN went to (or its first packet, for UDP and mid-stream pickups), except when
that backend is maint/down/removed. Each row establishes flows on one CPU, changes the
VIP, then sends every flow's packets on alternating CPUs; the counter deltas of every step
prove the path (a stale copy in the other CPU's cache would show as a cache hit there).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import pytest

from lb.datapath import Limits
from lb.programmer import VipSpec

from packets import (A, TCP_P, TCP_SYN, UDP_P, Flow, LbEnv, assert_globals, be, fast_frame,
                     outer_dst)
from test_flowtable import rand_flows

RING = 1009
N_FLOWS = 400
CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
C0, C1 = (CPUS[0], CPUS[1]) if len(CPUS) >= 2 else (0, 0)

B3 = ("10.30.0.1", "10.30.0.2", "10.30.0.3")
B3_6 = ("fd00:30::1", "fd00:30::2", "fd00:30::3")


@contextlib.contextmanager
def on_cpu(cpu: int):
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def vip(names, states=None, proto=TCP_P, v6=False, extra=()):
    states = states or {}
    backs = [be(n, state=states.get(n, "active")) for n in list(names) + list(extra)]
    addr = A("2001:db8:30::1") if v6 else A("192.0.2.130")
    return VipSpec(addr, 80, proto, tuple(backs), ring_size=RING)


@dataclass
class Row:
    id: str
    proto: int
    before: list            # (cpu, "syn" | "data") per flow, before the change
    change: str             # "add" | "drain" | "maint" | "none"; "evict+" first drops
                            # every table entry, as the LRU does (caches untouched)
    after: list             # (cpu, kind) per flow after the change
    counters: list          # expected global deltas of each `after` step, over all flows
    v6: bool = False
    first_decides: str = "ring"  # the first packet after the change goes to: "ring" (the
                                 # new ring's choice) or "moved" (old backend, or the ring's
                                 # choice for flows on the maint backend)
    extra: dict = field(default_factory=dict)


def n(**kw):
    return {k: (N_FLOWS if v is None else v) for k, v in kw.items()}


HIT = n(rx=None, tx=None, flow_hit=None)
# the first hit on the CPU that did not write the entry: with one table for all CPUs
# there is no private copy that could be stale (flow_cache_hit now counts hits found in
# their own slot of the bucket); what pins coherence is that no connection splits
HIT_UNCACHED = HIT
NEW = n(rx=None, tx=None, flow_miss=None)

ROWS = [
    # the reproduction: a ring change, then new connections reusing the tuples,
    # each SYN on one CPU and its ACK on the other (which cached the old entry)
    Row("tcp_syn_reuse_after_add", TCP_P, [(C1, "syn"), (C1, "data")], "add",
        [(C0, "syn"), (C1, "data"), (C0, "data"), (C1, "data")],
        [NEW, HIT_UNCACHED, HIT, HIT]),
    Row("tcp6_syn_reuse_after_add", TCP_P, [(C1, "syn"), (C1, "data")], "add",
        [(C0, "syn"), (C1, "data"), (C0, "data")], [NEW, HIT_UNCACHED, HIT], v6=True),
    # drain: established flows stay, a new connection reusing a tuple does not land there
    Row("tcp_syn_reuse_after_drain", TCP_P, [(C1, "syn"), (C1, "data")], "drain",
        [(C0, "syn"), (C1, "data"), (C0, "data")], [NEW, HIT_UNCACHED, HIT]),
    # UDP: the table entry was evicted (the other CPU still caches it); the first packet
    # after that, on CPU 0, decides, and CPU 1 follows
    Row("udp_first_packet_after_evict_and_add", UDP_P, [(C1, "data")], "evict+add",
        [(C0, "data"), (C1, "data"), (C0, "data")], [NEW, HIT_UNCACHED, HIT]),
    # a mid-stream pickup (first packet an ACK) likewise
    Row("tcp_pickup_after_evict_and_add", TCP_P, [(C1, "data")], "evict+add",
        [(C0, "data"), (C1, "data")], [NEW, HIT_UNCACHED]),
    # plain UDP: first packet on one CPU, the rest on the other
    Row("udp_first_packet_on_other_cpu", UDP_P, [], "none",
        [(C0, "data"), (C1, "data"), (C0, "data"), (C1, "data")],
        [NEW, HIT_UNCACHED, HIT, HIT]),
    # maint moves the maint backend's flows (CPU 0 first); CPU 1's copies of them are
    # not honoured, the others' stay on their backends
    Row("tcp_maint_moves_flows", TCP_P, [(C1, "syn"), (C1, "data")], "maint",
        [(C0, "data"), (C1, "data"), (C0, "data")], ["maint", HIT, HIT],
        first_decides="moved"),
]


def frame_of(f: Flow, kind: str) -> bytes:
    flags = TCP_SYN if kind == "syn" else 0x10
    return fast_frame(f.proto, f.src, f.sport, f.dst, f.dport, tcp_flags=flags)


def send_on(env: LbEnv, cpu: int, f: Flow, kind: str):
    with on_cpu(cpu):
        r = env.run(frame_of(f, kind))
    assert r.verdict == "tx", f"{f} {kind} on CPU {cpu}: {r.verdict}"
    return outer_dst(r.data)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_connection_never_splits_across_cpus(row: Row):
    names = B3_6 if row.v6 else B3
    env = LbEnv()
    try:
        s0 = vip(names, proto=row.proto, v6=row.v6)
        env.apply([s0])
        flows = rand_flows(N_FLOWS, s0, 30)
        placed = {}
        for f in flows:
            for cpu, kind in row.before:
                placed[f] = send_on(env, cpu, f, kind)

        victim = A(names[1])
        if row.change.startswith("evict+"):
            for f in flows:  # what LRU eviction does: the entry goes, caches stay
                env.dp.flows.delete(f.key())
        change = row.change.split("+")[-1]
        if change == "add":
            s1 = vip(names, proto=row.proto, v6=row.v6,
                     extra=["fd00:30::4" if row.v6 else "10.30.0.4"])
        elif change in ("drain", "maint"):
            s1 = vip(names, {str(victim): change}, proto=row.proto, v6=row.v6)
        else:
            s1 = s0
        env.apply([s1])
        ring1 = env.ring(s1)

        # where each flow must go from the first packet after the change on
        want = {}
        for f in flows:
            if row.first_decides == "ring" or placed[f] == victim:
                want[f] = env.expect(f, ring1).backend.address
            else:
                want[f] = placed[f]
        if change in ("add", "drain", "maint"):
            moved = sum(1 for f in flows if f in placed and want[f] != placed[f])
            assert moved > N_FLOWS // 8, f"the change should move many flows ({moved})"

        got = {f: [] for f in flows}
        deltas = [dict.fromkeys(env.dp.global_counters(), 0) for _ in row.after]
        for f in flows:
            for i, (cpu, kind) in enumerate(row.after):
                before = env.dp.global_counters()
                got[f].append(send_on(env, cpu, f, kind))
                now = env.dp.global_counters()
                for k in now:
                    deltas[i][k] += now[k] - before[k]
        split = [f for f in flows if set(got[f]) != {want[f]}]
        assert not split, (f"{len(split)} of {N_FLOWS} connections split, e.g. {split[0]}: "
                           f"{got[split[0]]} (want {want[split[0]]})")
        for i, exp in enumerate(row.counters):
            if exp == "maint":
                on_victim = sum(1 for f in flows if placed[f] == victim)
                exp = n(rx=None, tx=None, flow_hit=N_FLOWS - on_victim, flow_moved=on_victim)
            assert_globals(deltas[i], exp)
    finally:
        env.close()

