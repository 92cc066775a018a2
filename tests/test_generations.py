"""Backend generations across restarts: a flow-table entry made for one backend is never
honoured for another that reuses its id, also after the daemon restarted (a new data path
and programmer adopting the pinned maps, as lb/daemon.py does)."""

from __future__ import annotations

import os

import pytest

from lb.datapath import Datapath, Limits
from lb.programmer import VipSpec

from packets import A, TCP_P, LbEnv, assert_globals, be
from test_flowtable import establish, rand_flows, resend


def vip(names, states=None, extra=()):
    states = states or {}
    backs = [be(n, state=states.get(n, "active")) for n in list(names) + list(extra)]
    return VipSpec(A("192.0.2.131"), 80, TCP_P, tuple(backs), ring_size=1009)

GEN_PIN = "/sys/fs/bpf/xdplb-test-generations"


@pytest.fixture
def pin_dir():
    """GEN_PIN, empty (a run that died left only our own pins there), removed after."""
    def clean():
        if os.path.isdir(GEN_PIN) and not os.path.islink(GEN_PIN):
            for name in os.listdir(GEN_PIN):
                os.unlink(os.path.join(GEN_PIN, name))
            os.rmdir(GEN_PIN)
    clean()
    yield GEN_PIN
    clean()


@pytest.mark.parametrize("state", ["active", "drain"])
@pytest.mark.parametrize("order", ["remove_then_restart", "restart_then_remove"])
def test_reused_backend_id_never_takes_old_flows_across_a_restart(order, state, pin_dir):
    """Flows established to backend A; A is removed and the daemon restarts (in either
    order); backend B gets A's id. A's flow entries must not be honoured for B: they are
    moved (re-hashed), and a draining B gets none of them."""
    limits = Limits(max_vips=8, max_backends=4, max_nexthops=16, flow_table_size=4096)
    gone = A("10.31.0.1")
    keep = ["10.31.0.2", "10.31.0.3"]
    s0 = vip([str(gone)] + keep)
    s1 = vip(keep)
    s2 = vip(keep, {"10.31.0.9": state}, extra=["10.31.0.9"])
    env = LbEnv(limits, pin_dir=pin_dir)
    try:
        env.apply([s0])
        flows = rand_flows(300, s0, 31)
        placed = establish(env, s0, flows)
        on_gone = [f for f in flows if placed[f] == gone]
        assert len(on_gone) > 50
        gone_bid = env.bid_of(s0, gone)
        if order == "remove_then_restart":
            env.apply([s1])
            env.restart()
        else:
            env.restart()
            env.apply([s1])
        env.apply([s2])
        assert env.bid_of(s2, A("10.31.0.9")) == gone_bid, "B should reuse A's id"

        got, d = resend(env, flows)
        assert_globals(d.glob, {"rx": 300, "tx": 300, "flow_hit": 300 - len(on_gone),
                                "flow_moved": len(on_gone)})
        ring2 = env.ring(s2)
        for f in flows:
            want = env.expect(f, ring2).backend.address if f in on_gone else placed[f]
            assert got[f] == ("tx", want)
        if state == "drain":
            assert A("10.31.0.9") not in {a for _, a in got.values()}
    finally:
        env.close()


def test_flows_are_adopted_only_with_backends(pin_dir):
    """Flow entries name backend ids and generations that only the `backends` map holds:
    a restart that cannot adopt `backends` (another size) does not keep the flows."""
    small = Limits(max_vips=8, max_backends=4, max_nexthops=16, flow_table_size=4096)
    env = LbEnv(small, pin_dir=pin_dir)
    try:
        s0 = vip(["10.32.0.1", "10.32.0.2"])
        env.apply([s0])
        establish(env, s0, rand_flows(20, s0, 32))
        env.dp.close()
        env.dp = Datapath(Limits(max_vips=8, max_backends=8, max_nexthops=16,
                                 flow_table_size=4096), pin_dir=pin_dir)
        assert "backends" in env.dp.replaced and "flows" in env.dp.replaced
        assert env.flow_count() == 0
    finally:
        env.close()


def test_backends_of_a_vip_gone_before_their_release_start_a_new_generation(pin_dir):
    """An instance killed between deleting a VIP and releasing its backends leaves their
    entries behind; the next one releases them in a new generation, so the VIP's old flow
    entries are not honoured for the backends that get those ids next."""
    limits = Limits(max_vips=8, max_backends=4, max_nexthops=16, flow_table_size=4096)
    s0 = vip(["10.33.0.1", "10.33.0.2", "10.33.0.3"])
    s1 = vip(["10.33.0.7", "10.33.0.8", "10.33.0.9"])
    env = LbEnv(limits, pin_dir=pin_dir)
    try:
        env.apply([s0])
        flows = rand_flows(200, s0, 33)
        establish(env, s0, flows)
        env.dp.delete_vip(*s0.ident)  # the kill: VIP gone, backends not released
        env.restart()
        env.apply([s1])
        assert sorted(env.vip_state(s1).backends.values()) == [1, 2, 3]
        got, d = resend(env, flows)
        assert_globals(d.glob, {"rx": 200, "tx": 200, "flow_moved": 200})
        ring1 = env.ring(s1)
        assert all(got[f] == ("tx", env.expect(f, ring1).backend.address) for f in flows)
    finally:
        env.close()
