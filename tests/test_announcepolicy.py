"""lb/announcepolicy.py: the state table of an address's announcement, row by row."""

from __future__ import annotations

import ipaddress

from lb import policy
from lb.announcepolicy import Decision, VipFacts, decide, vip_facts
from lb.config import parse_config

import configtext

A = ipaddress.ip_address("192.0.2.10")
B = ipaddress.ip_address("2001:db8::10")
UP = Decision(True, "")


def facts(name="web", addr=A, usable=3, verdicted=True):
    return VipFacts(name, addr, usable, verdicted)


def test_stopping_interface_and_admin_win_over_health():
    assert decide([facts()], 1, {A}, withdrawn=True, stopping=True,
                  interface_missing=True) == {A: Decision(False, "shutdown")}
    assert decide([facts()], 1, {A}, withdrawn=True, interface_missing=True) == {
        A: Decision(False, "interface")}
    assert decide([facts()], 1, {A}, withdrawn=True) == {A: Decision(False, "admin")}


def test_announced_with_min_backends_usable():
    assert decide([facts(usable=2)], 2, set()) == {A: UP}
    assert decide([facts(usable=1)], 2, {A}) == {A: Decision(False, "health")}


def test_first_verdicts_gate_a_new_announcement_only():
    partial = [facts(verdicted=False)]
    assert decide(partial, 1, set()) == {A: Decision(False, "health")}
    assert decide(partial, 1, {A}) == {A: UP}            # adopted or a backend added
    assert decide([facts(verdicted=False, usable=0)], 1, {A}) == {
        A: Decision(False, "health")}


def test_an_address_is_announced_while_any_of_its_vips_qualifies():
    group = [facts("web", usable=3), facts("dns", usable=0)]
    assert decide(group, 1, set()) == {A: UP}
    # ... but a new announcement waits for every VIP of the address to be verdicted
    group = [facts("web", usable=3), facts("dns", usable=0, verdicted=False)]
    assert decide(group, 1, set()) == {A: Decision(False, "health")}
    assert decide(group + [facts("web6", B)], 1, set()) == {
        A: Decision(False, "health"), B: UP}


CONFIG = configtext.lb() + configtext.vip(
    "web", "192.0.2.10", all_down="spread",
    backends=["10.1.0.11", configtext.backend("10.1.0.12", weight=0), "10.1.0.13"]
) + configtext.vip("open", "192.0.2.11", health={"type": "none"})


def test_facts_count_backends_taking_new_flows():
    cfg = parse_config(CONFIG)
    up = {"10.1.0.11": True, "10.1.0.12": True, "10.1.0.13": False}
    states = policy.vip_specs(cfg, lambda v, b: "active", lambda v, b: up[b],
                              lambda a: "").states
    checked = {"10.1.0.11", "10.1.0.12"}
    got = vip_facts(cfg, states, lambda v, b: b in checked)
    # weight 0 takes no new flows; health none counts as verdicted
    assert got == [VipFacts("web", A, 1, False),
                   VipFacts("open", ipaddress.ip_address("192.0.2.11"), 1, True)]
    # all_down = "spread" puts down backends in the ring, but they do not qualify a VIP
    up["10.1.0.11"] = False
    states = policy.vip_specs(cfg, lambda v, b: "active", lambda v, b: up[b],
                              lambda a: "").states
    assert vip_facts(cfg, states, lambda v, b: True)[0].usable == 0
