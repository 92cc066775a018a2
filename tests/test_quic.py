"""QUIC VIPs in the data path (bpf/quic.h), through BPF_PROG_TEST_RUN on the real lb.bpf.o:
a short-header packet whose destination connection ID carries a known server ID (QUIC-LB
plaintext layout) goes to that backend whatever its 5-tuple, before the connection table;
long headers and IDs that name no usable backend are balanced as UDP flows. Counter
deltas prove the path each packet took."""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import os
import random

import pytest

from lb import layout
from lb.datapath import Limits
from lb.quicmaps import cid_hash, filter_index
from lb.specs import QuicSpec, VipSpec

from packets import (A, UDP_P, LbEnv, assert_globals, be, check_encap, outer_dst, parse_input,
                     pkt)
from test_generations import pin_dir  # noqa: F401 (a fixture)

PORT = 443
RING = 1009
CID_LEN = 8
GUE = dict(encap=layout.ENCAP_GUE, gue_port=6635)
C4, C6 = "198.51.100.7", "2001:db8:c::7"
# server IDs per server-ID length: the top byte used, so byte order matters
SIDS = {1: (0x07, 0xA5, 0xFF), 2: (0x0102, 0xBEEF, 0xFF01),
        3: (0x010203, 0xABCDEF, 0xFF0001), 4: (0xDEADBEEF, 0x01020304, 0xFFFFFFFE)}


def qvip(addr, backends, sid_len=2, cid_len=CID_LEN, port=PORT, quic=True):
    return VipSpec(A(addr), port, UDP_P, tuple(backends), ring_size=RING,
                   quic=QuicSpec(sid_len, cid_len) if quic else None)


def sbe(addr, sid, state="active"):
    return dataclasses.replace(be(addr, state=state), server_id=sid)


def family_vips(fam):
    out = {}
    for n, sids in SIDS.items():
        if fam == 4:
            addr, backs = f"192.0.2.{70 + n}", [f"10.2.{n}.{i + 1}" for i in range(3)]
        else:
            addr, backs = f"2001:db8::7{n}", [f"fd00:2::{n}:{i + 1}" for i in range(3)]
        out[n] = qvip(addr, [sbe(b, s) for b, s in zip(backs, sids)], sid_len=n,
                      cid_len=CID_LEN + n - 2)
    return out


Q4, Q6 = family_vips(4), family_vips(6)
QS = qvip("192.0.2.80", [sbe("10.2.9.1", 1), sbe("10.2.9.2", 2, "drain"),
                         sbe("10.2.9.3", 3, "maint"), sbe("10.2.9.4", 4, "down")])


def collider(vip: VipSpec) -> ipaddress.IPv4Address:
    """Another address whose QUIC filter index at the same port is the VIP's."""
    want = filter_index(vip.address, vip.port)
    for i in range(1, 1 << 22):
        c = ipaddress.IPv4Address(0x0A640000 + i)
        if filter_index(c, vip.port) == want:
            return c
    raise AssertionError("no filter collider")


PLAIN = VipSpec(collider(Q4[2]), PORT, UDP_P, (be("10.2.8.1"), be("10.2.8.2")),
                ring_size=RING)
SPECS = list(Q4.values()) + list(Q6.values()) + [QS, PLAIN]


@pytest.fixture(scope="module")
def env():
    e = LbEnv(Limits(max_vips=64, max_backends=1024, max_nexthops=256, flow_table_size=4096))
    try:
        e.apply(SPECS)
        yield e
    finally:
        e.close()


@pytest.fixture(autouse=True)
def fresh(env):
    env.apply(SPECS)
    env.configure()
    env.flush_flows()


def cid(sid: int, sid_len: int, cid_len: int, config: int = 1, nonce: int = 0x5A) -> bytes:
    """A connection ID in the plaintext layout: first octet (config id in its top bits),
    server ID big endian, nonce bytes."""
    return (bytes([config << 5 | 0x0B]) + sid.to_bytes(sid_len, "big")
            + bytes([nonce]) * (cid_len - 1 - sid_len))


def short(dcid: bytes, body: bytes = b"\x17" * 24) -> bytes:
    return bytes([0x41]) + dcid + body  # fixed bit, 1-byte packet number


def long_header(dcid: bytes) -> bytes:
    """An Initial: long header, version 1, DCID and SCID with their lengths."""
    return (bytes([0xC3]) + b"\x00\x00\x00\x01" + bytes([len(dcid)]) + dcid + b"\x08"
            + b"\x33" * 8 + b"\x00" * 24)


def udp(spec: VipSpec, payload: bytes, sport: int = 40000, src=None) -> bytes:
    v6 = spec.address.version == 6
    return pkt("udp", src or (C6 if v6 else C4), str(spec.address), sport, spec.port, payload)


def run(env, data):
    before = env.snapshot()
    r = env.run(data)
    return r, env.delta(before)


def backend_of(env, spec, out: bytes):
    dst = outer_dst(out)
    assert dst in {b.address for b in spec.backends}, f"{dst} is no backend of {spec.ident}"
    return dst


def ring_backend(env, data):
    return env.expect(parse_input(data)[0]).backend.address


@pytest.mark.parametrize("encap", ["ipip", "gue"])
@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("sid_len", [1, 2, 3, 4])
def test_short_header_goes_to_the_server_its_cid_names(env, sid_len, fam, encap):
    """Every server-ID length, both families, both encapsulations: each backend's ID
    routes to it, from a 5-tuple the ring would mostly send elsewhere; no table entry."""
    if encap == "gue":
        env.configure(**GUE)
    spec = (Q4 if fam == 4 else Q6)[sid_len]
    for b in spec.backends:
        dcid = cid(b.server_id, sid_len, spec.quic.cid_len)
        data = udp(spec, short(dcid))
        r, d = run(env, data)
        assert r.verdict == "tx"
        assert_globals(d.glob, {"rx": 1, "tx": 1, "quic_routed_by_cid": 1})
        h = cid_hash(dcid)  # the ID's, not the 5-tuple's: it stays when the client moves
        check_encap(r.data, data, backend_addr=b.address, nh_mac=env.macs[b.nexthop],
                    hash_=h, cfg=env.cfg, ip_id=d.outer_ip_id(h))
        assert d.backends == {env.bid_of(spec, b.address): (1, len(data))}
    assert env.flow_count() == 0, "a CID-routed packet must not make a table entry"


@pytest.mark.parametrize("fam", [4, 6])
def test_migrated_connection_beats_the_connection_table(env, fam):
    """A 5-tuple the table remembers for one backend (its handshake) carrying a short
    header whose CID names another: the CID wins; the same CID from 30 other source ports
    and addresses (migrations, NAT rebinding) reaches the same backend."""
    spec = (Q4 if fam == 4 else Q6)[2]
    hs = udp(spec, long_header(cid(0, 2, 8, nonce=1)), sport=41000)
    r, d = run(env, hs)
    assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_miss": 1})
    table_be = backend_of(env, spec, r.data)
    other = next(b for b in spec.backends if b.address != table_be)
    dcid = cid(other.server_id, 2, spec.quic.cid_len)
    r, d = run(env, udp(spec, short(dcid), sport=41000))
    assert_globals(d.glob, {"rx": 1, "tx": 1, "quic_routed_by_cid": 1})
    assert outer_dst(r.data) == other.address
    rnd = random.Random(fam)
    for i in range(30):
        src = (f"198.51.{rnd.randrange(256)}.{rnd.randrange(1, 255)}" if fam == 4
               else f"2001:db8:c::{rnd.randrange(1, 0xFFFF):x}")
        r, d = run(env, udp(spec, short(dcid), sport=20000 + i, src=src))
        assert r.verdict == "tx" and outer_dst(r.data) == other.address
        assert_globals(d.glob, {"rx": 1, "tx": 1, "quic_routed_by_cid": 1})
    r, d = run(env, hs)  # the handshake's own 5-tuple, long header: still the table's
    assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_hit": 1})
    assert outer_dst(r.data) == table_be


@pytest.mark.parametrize("fam", [4, 6])
def test_long_header_is_balanced_as_udp(env, fam):
    """An Initial whose DCID even carries a known server ID: ring, then table."""
    spec = (Q4 if fam == 4 else Q6)[2]
    data = udp(spec, long_header(cid(spec.backends[0].server_id, 2, 8)), sport=42000)
    r, d = run(env, data)
    assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_miss": 1})
    assert outer_dst(r.data) == ring_backend(env, data)
    r, d = run(env, data)
    assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_hit": 1})


def _fallbacks():
    s2, s4 = Q4[2], Q4[4]
    known = s2.backends[1].server_id
    return [  # (id, spec, payload, counted as quic_fallback)
        ("unknown-server-id", s2, short(cid(0x4242, 2, 8)), True),
        ("zero-cid", s2, short(bytes(8)), True),
        ("config-id-7", s2, short(cid(known, 2, 8, config=7)), True),
        ("truncated-cid", s2, short(cid(known, 2, 8)[:7], b""), True),
        ("truncated-server-id", s4, short(cid(s4.backends[0].server_id, 4, 10)[:3], b""),
         True),
        ("first-byte-only", s2, b"\x41", True),
        ("empty-payload", s2, b"", False),
        ("unknown-server-id-v6", Q6[3], short(cid(0x123456, 3, 9)), True),
        ("config-id-7-v6", Q6[1], short(cid(Q6[1].backends[0].server_id, 1, 7, config=7)),
         True),
        ("not-a-quic-vip", PLAIN, short(cid(known, 2, 8)), False),
    ]


@pytest.mark.parametrize("case", _fallbacks(), ids=lambda c: c[0])
def test_short_header_without_a_usable_cid_is_balanced_as_udp(env, case):
    _, spec, payload, counted = case
    data = udp(spec, payload, sport=43000)
    r, d = run(env, data)
    want = {"rx": 1, "tx": 1, "flow_miss": 1}
    if counted:
        want["quic_fallback"] = 1
    assert_globals(d.glob, want)
    assert outer_dst(r.data) == ring_backend(env, data)


def test_config_id_is_not_part_of_the_server_id(env):
    """Config ids 0..6 route alike (only 7 is not routable)."""
    spec = Q4[2]
    b = spec.backends[2]
    for config in range(7):
        r, d = run(env, udp(spec, short(cid(b.server_id, 2, 8, config=config))))
        assert_globals(d.glob, {"rx": 1, "tx": 1, "quic_routed_by_cid": 1})
        assert outer_dst(r.data) == b.address


def test_filter_collision_with_a_plain_udp_vip(env):
    """PLAIN shares Q4[2]'s filter entry: its packets pay the lookup and go their way."""
    assert filter_index(PLAIN.address, PORT) == filter_index(Q4[2].address, PORT)
    data = udp(PLAIN, short(cid(Q4[2].backends[0].server_id, 2, 8)))
    r, d = run(env, data)
    assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_miss": 1})
    assert outer_dst(r.data) in {b.address for b in PLAIN.backends}


@pytest.mark.parametrize("state,routed", [("active", True), ("drain", True),
                                          ("maint", False), ("down", False)])
def test_backend_states(env, state, routed):
    """A draining backend keeps its CID-routed packets; maint and down do not: balanced
    as UDP among the backends that take new flows (here only the active one)."""
    b = QS.backends[("active", "drain", "maint", "down").index(state)]
    r, d = run(env, udp(QS, short(cid(b.server_id, 2, 8)), sport=44000))
    if routed:
        assert_globals(d.glob, {"rx": 1, "tx": 1, "quic_routed_by_cid": 1})
        assert outer_dst(r.data) == b.address
    else:
        assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_miss": 1, "quic_fallback": 1})
        assert outer_dst(r.data) == A("10.2.9.1")


def test_removed_backend_falls_back_and_its_entry_goes(env):
    spec = Q4[2]
    gone = spec.backends[0]
    smaller = dataclasses.replace(spec, backends=spec.backends[1:])
    env.apply([smaller if s is spec else s for s in SPECS])
    routes = {r.server_id for r, _ in env.programmer.quic.entries()
              if r.address == spec.address}
    assert routes == {b.server_id for b in smaller.backends}
    r, d = run(env, udp(spec, short(cid(gone.server_id, 2, 8))))
    assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_miss": 1, "quic_fallback": 1})
    assert outer_dst(r.data) != gone.address


def test_server_id_change_and_quic_off(env):
    """A new server ID replaces the old one; quic = false removes the VIP's entries, its
    filter bits and its flag: its short headers are plain UDP (not even a fallback)."""
    spec = Q4[2]
    b = spec.backends[0]
    renumbered = dataclasses.replace(spec, backends=(dataclasses.replace(b, server_id=0x0A0B),)
                                     + spec.backends[1:])
    env.apply([renumbered if s is spec else s for s in SPECS])
    r, d = run(env, udp(spec, short(cid(0x0A0B, 2, 8))))
    assert outer_dst(r.data) == b.address and d.glob["quic_routed_by_cid"] == 1
    r, d = run(env, udp(spec, short(cid(b.server_id, 2, 8))))
    assert d.glob["quic_fallback"] == 1
    env.flush_flows()

    off = dataclasses.replace(spec, quic=None)
    env.apply([off if s is spec else s for s in SPECS])
    assert not any(r.address == spec.address for r, _ in env.programmer.quic.entries())
    idx = filter_index(spec.address, PORT)
    word = env.dp.maps["quic_filter"].lookup(ctypes.c_uint32(idx >> 4))
    assert (int.from_bytes(word, "little") >> ((idx & 15) * 4)) & 0xF == 0
    meta = layout.VipMeta.unpack(env.dp.maps["vips"].lookup(layout.vip_key(spec.address,
                                                                          PORT, UDP_P)))
    assert not meta.flags & layout.VIP_F_QUIC
    r, d = run(env, udp(spec, short(cid(spec.backends[1].server_id, 2, 8))))
    assert_globals(d.glob, {"rx": 1, "tx": 1, "flow_miss": 1})


def test_server_ids_survive_a_restart(pin_dir):
    """A restarted daemon adopts quic_servers: CID routing never stops, the first apply
    writes nothing it already holds, and a server removed after the restart is deleted."""
    spec = Q4[3]
    e = LbEnv(Limits(max_vips=8, max_backends=64, max_nexthops=64, flow_table_size=1024),
              pin_dir=pin_dir)
    try:
        e.apply([spec])
        e.restart()
        assert {"quic_servers", "quic_filter", "quic_epoch"} <= set(e.dp.adopted)
        b = spec.backends[1]
        data = udp(spec, short(cid(b.server_id, 3, spec.quic.cid_len)))
        r, d = run(e, data)
        assert outer_dst(r.data) == b.address and d.glob["quic_routed_by_cid"] == 1
        writes = []
        qm = e.programmer.quic
        orig = qm.set_server
        qm.set_server = lambda *a: (writes.append(a), orig(*a))
        e.apply([spec])
        assert writes == [], "adopted entries were written again"
        e.apply([dataclasses.replace(spec, backends=spec.backends[:1] + spec.backends[2:])])
        assert {r.server_id for r, _ in qm.entries()} == {spec.backends[0].server_id,
                                                          spec.backends[2].server_id}
        r, d = run(e, data)
        assert d.glob["quic_fallback"] == 1
        e.dp.unpin_all()
    finally:
        e.close()


def cached_keys(env, cpu: int) -> set:
    """(address, server ID) of the quic_cache slots CPU `cpu` holds."""
    m = env.dp.skel.map("quic_cache")
    out = set()
    for i in range(cpu * layout.QUIC_CACHE_SLOTS, (cpu + 1) * layout.QUIC_CACHE_SLOTS):
        s = layout.QuicCacheSlot.unpack(m.lookup(ctypes.c_uint32(i)))
        if s.key.family:
            out.add((layout.words_addr(s.key.addr, s.key.family), s.key.server_id))
    return out


def test_cached_server_ids_never_outlive_a_change(env):
    """A server ID's entry is cached per CPU on first use; swapping two backends' server
    IDs, then removing one, is seen by the very next packet (user space bumps the cache
    epoch), not served from the stale copy."""
    cpu = min(os.sched_getaffinity(0))
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        spec = Q4[2]
        a, b = spec.backends[0], spec.backends[1]
        data = udp(spec, short(cid(a.server_id, 2, 8)))
        for _ in range(2):
            r, _d = run(env, data)
            assert outer_dst(r.data) == a.address
        assert (spec.address, a.server_id) in cached_keys(env, cpu)
        swapped = dataclasses.replace(spec, backends=(
            dataclasses.replace(a, server_id=b.server_id),
            dataclasses.replace(b, server_id=a.server_id)) + spec.backends[2:])
        env.apply([swapped if s is spec else s for s in SPECS])
        r, d = run(env, data)
        assert outer_dst(r.data) == b.address and d.glob["quic_routed_by_cid"] == 1
        without_b = dataclasses.replace(swapped, backends=swapped.backends[:1]
                                        + swapped.backends[2:])
        env.apply([without_b if s is spec else s for s in SPECS])
        r, d = run(env, data)
        assert d.glob["quic_fallback"] == 1 and outer_dst(r.data) != b.address
    finally:
        os.sched_setaffinity(0, old)
