"""Programmer: ring-size changes switch ring id and size in one VIP-entry update, ids are
released, and adoption rebuilds the same state from the maps."""

from __future__ import annotations

import ctypes
import ipaddress

import pytest

from lb import layout as L
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


def meta(dp) -> L.VipMeta:
    return L.VipMeta.unpack(dp.maps["vips"].lookup(L.vip_key(A("192.0.2.10"), 80, 6)))


def test_ring_size_change_switches_id_and_size_together(dp):
    prog = Programmer(dp)
    prog.apply([spec(4099)], MAC)
    m1 = meta(dp)
    assert (m1.ring_size, m1.vip_id) == (4099, 1) and m1.ring_id
    assert dp.read_ring(m1.ring_id) == ring_for(spec(4099), prog.installed(spec(4099).ident).backends)

    rep = prog.apply([spec(4111)], MAC)
    m2 = meta(dp)
    assert rep.rings_swapped == 1 and m2.ring_size == 4111 and m2.vip_id == m1.vip_id
    assert m2.ring_id != m1.ring_id
    assert dp.read_ring(m2.ring_id) == ring_for(spec(4111), prog.installed(spec(4111).ident).backends)
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


def test_egress_goes_through_apply(dp, monkeypatch):
    prog = Programmer(dp)
    calls = []
    for name in ("set_tx_port", "set_config"):
        real = getattr(dp, name)
        monkeypatch.setattr(dp, name, lambda *a, real=real, name=name: (calls.append(name),
                                                                        real(*a)))
    eg = EgressConfig(smac=bytes(6), source_v4=A("10.0.0.2"), tx_mode=L.TX_REDIRECT, tx_port=1)
    prog.apply([spec(4099)], MAC, egress=eg)
    assert calls == ["set_tx_port", "set_config"]  # the port first
    port = dp.maps["tx_port"].lookup(ctypes.c_uint32(0))
    assert ctypes.c_uint32.from_buffer_copy(port[:4]).value == 1
    assert L.LbConfig.unpack(dp.maps["config"].lookup(ctypes.c_uint32(0))).tx_mode == \
        L.TX_REDIRECT
    prog.apply([spec(4099)], MAC, egress=eg)
    prog.apply([spec(4099)], MAC)  # None: left as it is
    assert calls == ["set_tx_port", "set_config"]  # only when changed
    prog.apply([spec(4099)], MAC, egress=EgressConfig(source_v4=A("10.0.0.2"), tx_port=None))
    assert calls[2:] == ["set_config"]
    with pytest.raises(ValueError, match="tx_port"):
        prog.apply([], MAC, egress=EgressConfig(tx_mode=L.TX_REDIRECT))
