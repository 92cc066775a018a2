"""Programmer: ring-size changes switch ring id and size in one VIP-entry update, ids are
released, adoption rebuilds the same state from the maps, egress settings go through
apply(), and the map writes follow the order in the module docstring."""

from __future__ import annotations

import ctypes
import ipaddress

import pytest

from lb import layout
from lb.datapath import Datapath, EgressConfig, Limits
from lb.programmer import Programmer
from lb.specs import BackendSpec, VipSpec, ring_for

A = ipaddress.ip_address
MAC = {"gw": bytes.fromhex("02000000aabb")}


def spec(m: int, n: int = 3) -> VipSpec:
    return VipSpec(A("192.0.2.10"), 80, 6, tuple(BackendSpec(A(f"10.1.0.{i}"), nexthop="gw")
                                                 for i in range(11, 11 + n)), ring_size=m)


@pytest.fixture
def dp():
    with Datapath(Limits(max_vips=8, max_backends=64, flow_table_size=256)) as d:
        d.set_config(EgressConfig(smac=bytes(6), source_v4=A("10.0.0.2"), mtu=1500))
        yield d


def meta(dp) -> layout.VipMeta:
    key = layout.vip_key(A("192.0.2.10"), 80, 6)
    return layout.VipMeta.unpack(dp.maps["vips"].lookup(key))


def backends(prog: Programmer, s: VipSpec) -> dict:
    return dict(prog.installed(s.ident).backends)


def test_ring_size_change_switches_id_and_size_together(dp):
    prog = Programmer(dp)
    prog.apply([spec(4099)], MAC)
    m1 = meta(dp)
    assert (m1.ring_size, m1.vip_id) == (4099, 1) and m1.ring_id
    assert dp.read_ring(m1.ring_id) == ring_for(spec(4099), backends(prog, spec(4099)))

    rep = prog.apply([spec(4111)], MAC)
    m2 = meta(dp)
    assert rep.rings_swapped == 1 and m2.ring_size == 4111 and m2.vip_id == m1.vip_id
    assert m2.ring_id != m1.ring_id
    assert dp.read_ring(m2.ring_id) == ring_for(spec(4111), backends(prog, spec(4111)))
    assert dp.maps["rings"].lookup(ctypes.c_uint32(m1.ring_id)) is None  # old slot released

    # same size, other backends: swapped in place, same slot
    rep = prog.apply([spec(4111, n=4)], MAC)
    assert rep.rings_swapped == 1 and meta(dp).ring_id == m2.ring_id


def test_adopt_rebuilds_state(dp):
    prog = Programmer(dp)
    prog.apply([spec(4099)], MAC)
    before = prog.installed(spec(4099).ident)
    again = Programmer(dp)
    assert again.adopt() == 1
    cur = again.installed(spec(4099).ident)
    assert (cur.vip_id, cur.ring_id, cur.ring_size, cur.backends) == (
        before.vip_id, before.ring_id, before.ring_size, before.backends)
    rep = again.apply([spec(4099)], MAC)
    assert rep.rings_swapped == 0 and rep.backends_added == 0


def test_a_new_next_hop_id_holds_no_mac_until_it_resolves(dp):
    """Next-hop ids no backend entry refers to are free again after adopt(), and may
    hold the MAC of a next hop an earlier instance dropped: a next hop unresolved at
    start taking one must not send packets to that host."""
    prog = Programmer(dp)
    old = VipSpec(A("192.0.2.10"), 80, 6, (BackendSpec(A("10.1.0.11"), nexthop="old"),),
                  ring_size=101)
    prog.apply([old], {"old": bytes.fromhex("02000000cccc")})
    prog.apply([spec(101)], MAC)  # "old" keeps its id and MAC, unreferenced
    again = Programmer(dp)
    again.adopt()
    again.apply([spec(101)], {})  # "gw" unresolved after the restart
    for bid in backends(again, spec(101)).values():
        assert dp.nexthop_mac(dp.backend(bid).nexthop_id) == bytes(6)
    again.apply([spec(101)], MAC)
    for bid in backends(again, spec(101)).values():
        assert dp.nexthop_mac(dp.backend(bid).nexthop_id) == MAC["gw"]


def recorder(dp, monkeypatch, names) -> list:
    """Datapath writes in the order they happen (and still done)."""
    calls = []
    for name in names:
        real = getattr(dp, name)

        def record(*a, real=real, name=name, **kw):
            calls.append(name)
            return real(*a, **kw)
        monkeypatch.setattr(dp, name, record)
    return calls


def test_egress_goes_through_apply(dp, monkeypatch):
    prog = Programmer(dp)
    calls = recorder(dp, monkeypatch, ("set_tx_port", "set_config", "install_rings"))
    eg = EgressConfig(smac=bytes(6), source_v4=A("10.0.0.2"), tx_mode=layout.TX_REDIRECT,
                      tx_port=1)
    prog.apply([spec(4099)], MAC, egress=eg)
    assert calls == ["set_tx_port", "set_config", "install_rings"]  # the port first
    port = dp.maps["tx_port"].lookup(ctypes.c_uint32(0))
    assert ctypes.c_uint32.from_buffer_copy(port[:4]).value == 1
    cfg = layout.LbConfig.unpack(dp.maps["config"].lookup(ctypes.c_uint32(0)))
    assert cfg.tx_mode == layout.TX_REDIRECT
    del calls[:]
    prog.apply([spec(4099)], MAC, egress=eg)
    prog.apply([spec(4099)], MAC)  # None: left as it is
    assert calls == []  # only when changed
    prog.apply([spec(4099)], MAC, egress=EgressConfig(source_v4=A("10.0.0.2")))
    assert calls == ["set_config"]
    with pytest.raises(ValueError, match="tx_port"):
        prog.apply([], MAC, egress=EgressConfig(tx_mode=layout.TX_REDIRECT))


def reshaped(s: VipSpec) -> tuple[VipSpec, VipSpec]:
    """s with one backend demoted, one released and one joining, the ring resized; and a
    second VIP."""
    b = s.backends
    changed = VipSpec(s.address, s.port, s.proto,
                      (b[0], BackendSpec(b[1].address, in_ring=False, keep_flows=False,
                                         nexthop="gw"),
                       BackendSpec(A("10.1.0.99"), nexthop="gw")), ring_size=4111)
    other = VipSpec(A("192.0.2.11"), 53, 17, (BackendSpec(A("10.1.0.50"), nexthop="gw"),),
                    ring_size=13)
    return changed, other


def test_writes_follow_the_documented_order(dp, monkeypatch):
    """Gains, rings, VIP entries, addresses, then demotions and releases."""
    prog = Programmer(dp)
    s = spec(4099, n=3)
    prog.apply([s], MAC)
    calls = recorder(dp, monkeypatch, ("set_nexthop", "set_backend", "install_rings",
                                       "set_vip", "delete_vip", "set_vip_addrs",
                                       "clear_backend", "remove_ring"))
    # one backend stops keeping flows (a demotion), one leaves (a release), one joins (a
    # gain); the ring changes size (a new slot, the old one released); a second VIP comes
    b = s.backends
    changed, other = reshaped(s)
    rep = prog.apply([changed, other], MAC)
    assert (rep.backends_added, rep.backends_removed, rep.rings_swapped) == (2, 1, 2)
    assert calls == ["set_backend", "set_backend",  # the joining backends
                     "install_rings",               # both rings in one batch
                     "set_vip", "set_vip",
                     "set_vip_addrs",
                     "set_backend",                 # b[1] loses FLOWS_STAY
                     "remove_ring",                 # the old 4099 slot
                     "clear_backend"]               # b[2] released
    assert not dp.backend(prog.installed(changed.ident).backends[b[1].address]).flags
    del calls[:]
    prog.apply([changed], MAC)
    assert calls == ["delete_vip", "set_vip_addrs", "remove_ring", "clear_backend"]


def maps_hold(dp, prog: Programmer, specs) -> None:
    """The maps hold exactly `specs`: VIP entries, rings, backend entries, VIP addresses."""
    entries = dict(dp.vip_entries())
    assert set(entries) == {s.ident for s in specs}
    bids = {}
    for s in specs:
        cur, e = prog.installed(s.ident), entries[s.ident]
        assert (e.vip_id, e.ring_id, e.ring_size) == (cur.vip_id, cur.ring_id, cur.ring_size)
        assert dp.read_ring(e.ring_id) == ring_for(s, cur.backends)
        for b in s.backends:
            bids[cur.backends[b.address]] = (b.address, e.vip_id, b.keep_flows)
    assert {bid: (b.addr, b.vip_id, b.keep_flows) for bid, b in dp.backend_entries()} == bids
    for s in specs:
        assert dp.maps["vip_addrs"].lookup(layout.addr_key(s.address)) is not None


FAILING = ("set_nexthop", "set_backend", "install_rings", "set_vip", "delete_vip",
           "set_vip_addrs", "remove_ring", "clear_backend")


@pytest.mark.parametrize("method", FAILING)
def test_apply_after_one_that_raised_repairs_the_maps(dp, monkeypatch, method):
    """A map write fails partway through an apply: the next apply (the health retry) writes
    what is missing, and no id is lost (40 rounds fit in 8 VIP and 64 backend ids)."""
    prog = Programmer(dp)
    s = spec(4099, n=3)
    changed, other = reshaped(s)
    real = getattr(dp, method)
    for _ in range(40):
        prog.apply([s, other], MAC)
        maps_hold(dp, prog, [s, other])
        fail = {"armed": True}

        def broken(*a, **kw):
            if fail.pop("armed", False):
                raise OSError(f"{method} failed")
            return real(*a, **kw)
        monkeypatch.setattr(dp, method, broken)
        macs = {"gw": bytes.fromhex("02000000aacc")}  # the next hop moved too
        try:
            prog.apply([changed], macs)
        except OSError:
            pass
        prog.apply([changed], macs)  # the retry
        maps_hold(dp, prog, [changed])
        nh = layout.Nexthop.unpack(dp.maps["nexthops"].lookup(ctypes.c_uint32(prog.nexthops["gw"])))
        assert bytes(nh.dmac) == macs["gw"]
        monkeypatch.setattr(dp, method, real)
        prog.apply([], MAC)
        maps_hold(dp, prog, [])
