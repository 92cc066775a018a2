"""A fleet of three xdplb nodes behind a router running BIRD (eBGP + BFD, ECMP with an L4
hash), in the lab's fleet variant (xf-*, lb/lab/fleet.py): the VIP routes each node keeps
in table 200 reach the router as three next hops; new flows spread over the nodes; a node
that dies as a machine does, a node withdrawn gracefully and a node that comes back cost
no connection, IPv4 and IPv6 alike, because every node picks the same backend for a flow
without knowing it. The scenes are lb/lab/fleetscene.py's; times are not asserted.
"""

from __future__ import annotations

import collections

import pytest

from lb.config import load_config
from lb.lab import fleetscene
from lb.lab.fleet import CONFIG, FleetLab
from lb.lab.fleetload import Held
from lb.lab.topology import VIP4, VIP6

LONG_LIVED = 60  # half IPv4, half IPv6


@pytest.fixture(scope="module")
def lab():
    fleet = FleetLab(prefix="xf-")
    try:
        fleetscene.start(fleet)
        yield fleet
    finally:
        fleet.down()


@pytest.fixture
def fleet(lab):
    """The lab with every node running and announced."""
    fleetscene.restore(lab)
    return lab


@pytest.fixture
def held(fleet):
    conns = Held(fleet.client, LONG_LIVED).start()
    yield conns
    conns.stop()


def test_lab_config_matches_lab():
    """config/lab-fleet.toml names the fleet lab's backends; each node's copy its own files."""
    lab = FleetLab(prefix="xf-")
    hosts = lab.hosts()
    want = {a for b in lab.backends for a in (hosts[b].v4, hosts[b].v6)}
    cfg = load_config(CONFIG)
    assert {str(b.address) for v in cfg.vips for b in v.backends} == want
    assert cfg.lb.bpf_pin_path == lab.files(lab.nodes[0]).pin
    assert cfg.lb.interface == "eth0"


def test_vip_learned_with_a_next_hop_per_node(fleet):
    assert fleet.next_hops(VIP4) == fleet.node_addresses(family=4)
    assert fleet.next_hops(VIP6) == fleet.node_addresses(family=6)
    routes = fleet.bird(fleet.router).show("route")
    assert routes.count("[AS65010i]") == 6, routes  # 2 VIPs x 3 nodes, over BGP


def test_new_flows_spread_over_the_nodes(fleet):
    per_node, failed = fleetscene.spread(fleet, 600)
    assert failed == 0
    assert sum(per_node.values()) == 600
    assert min(per_node.values()) >= 120, per_node  # every node has its share (1/3 +- 13%)


def test_node_death_breaks_no_connection(fleet, held):
    victim = collections.Counter(fleet.node_of(held.flows())).most_common(1)[0][0]
    res = fleetscene.node_death(fleet, held, victim)
    assert res["on_victim"] > 0
    assert res["broken"] == []
    assert res["progressed"]
    assert res["failed_new_after_convergence"] == 0
    assert fleet.next_hops(VIP4) == fleet.node_addresses(
        [n for n in fleet.nodes if n != victim])
    assert {c.backend for c in held.conns} == set(fleet.backends)


def test_node_rejoin_breaks_no_connection(fleet):
    node = fleet.nodes[1]
    fleet.kill_node(node)
    fleetscene.wait_hops(fleet, [n for n in fleet.nodes if n != node], 0)
    held = Held(fleet.client, LONG_LIVED).start()
    try:
        res = fleetscene.rejoin(fleet, held, node)
    finally:
        held.stop()
    assert res["on_node"] > 0  # flows moved onto the node that came back
    assert res["announced_partial"] == []  # only with a complete ring
    assert res["broken"] == []
    assert res["progressed"]


def test_graceful_withdraw_under_load_fails_nothing(fleet, held):
    node = fleet.nodes[2]
    res = fleetscene.graceful_withdraw(fleet, held, node)
    assert res["requests"] > 20
    assert res["failed"] == []
    assert res["broken"] == []
    assert res["progressed"]
    assert fleet.next_hops(VIP6) == fleet.node_addresses(fleet.nodes[:2], family=6)


def test_node_cut_off_its_backends_withdraws_alone(fleet, held):
    node = fleet.nodes[0]
    marks = {n: d.mark() for n, d in fleet.instances.items()}
    res = fleetscene.health_withdraw(fleet, held, node)
    assert res["broken"] == []
    assert res["progressed"]
    withdrawn = fleet.instances[node].events("vip_withdrawn", after=marks[node])
    assert {e["reason"] for e in withdrawn} == {"health"}
    assert {e["vip"] for e in withdrawn} == {"web", "web6", "echo", "echo6", "long", "long6"}
    for other in fleetscene.others(fleet, node):  # the others never withdrew
        assert fleet.instances[other].events("vip_withdrawn", after=marks[other]) == []
        assert fleetscene.announced(fleet.instances[other])
