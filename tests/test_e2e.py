"""End to end: the real daemon (`python -m lb.cli --config ...`) in labs this file builds
(lb/lab/topology.py), real clients in the client namespace, real backends (lb/lab/server.py)
answering straight to the client (DSR). The harness is in e2e_setup.py, the clients in
traffic.py.

Four setups, each a daemon of its own: the lab's "tx" variant (one interface, XDP_TX)
and its "redirect" variant (lb0 in, lb1 out, XDP_REDIRECT), each with IPIP and with GUE
encapsulation. Every scenario runs IPv4 and IPv6 at once: HTTP over TCP (VIP port 80),
a UDP echo (5353) and long-lived TCP line-echo connections (7000).

Every client request uses a source port of its own, never reused while the lab lives:
a new 5-tuple has no connection-table entry, so the Maglev ring alone decides where it
goes, and a failed request can be traced to the backend the ring gave it (read from the
pinned maps with the data path's hash).
"""

from __future__ import annotations

import collections
import copy
import signal
import time
from typing import Callable

import pytest

from lb.config import load_config
from lb.lab import netns, topology

import configtext
from e2e_setup import BASE_VIPS, FALL, INTERVAL, RISE, SETUPS, E2ELab, Setup, base_conf
from traffic import (DIST_BLOCK, DIST_N, KINDS, PORT_LO, WAIT, Capture, Load, LongConns,
                     burst, by_backend, failures)

SHARE_TOLERANCE = 0.10                  # relative: |observed / expected - 1|
RELOADS = 20


def report(line: str) -> None:
    """What a scenario measured (shown with pytest -s)."""
    print(line)


@pytest.fixture(scope="module")
def labs():
    made: dict[str, E2ELab] = {}

    def get(variant: str) -> E2ELab:
        if variant not in made:
            made[variant] = E2ELab(variant)
            made[variant].up()
        return made[variant]
    try:
        yield get
    finally:
        for lab in made.values():
            lab.down()


@pytest.fixture(scope="module", params=SETUPS, ids=[f"{v}-{e}" for v, e in SETUPS])
def setup(request, labs, tmp_path_factory):
    variant, encap = request.param
    s = Setup(labs(variant), encap, tmp_path_factory.mktemp(f"e2e-{variant}-{encap}"))
    try:
        ev = s.start()
        assert ev["egress"] == ("lb1" if variant == "redirect" else "lb0"), ev
        s.wait_all_active()
        yield s
    finally:
        s.stop()
# --- the tests ---------------------------------------------------------------------------

def test_lab_configs_match_labs():
    """config/lab.toml and config/lab-redirect.toml name the backends their lab builds."""
    for variant, path in topology.CONFIGS.items():
        cfg = load_config(path)
        lab = topology.Lab(variant=variant)
        want = {h.v4 for n, h in lab.hosts().items() if n in lab.backends} | \
               {h.v6 for n, h in lab.hosts().items() if n in lab.backends}
        got = {str(b.address) for v in cfg.vips for b in v.backends}
        assert got == want, (path, got ^ want)
        assert (cfg.lb.egress_interface == "lb1") == (variant == "redirect")
        assert cfg.lb.interface == "lb0"


def test_distribution(setup):
    """3,000 new connections (or datagrams) per VIP: each backend gets its weight's share
    within 10%, each exactly the backend the ring gives its 5-tuple; the encapsulation on
    the wire is the configured one, sent by XDP_TX or XDP_REDIRECT as configured."""
    s = setup
    s.baseline()
    lab = s.lab
    rings = {k: s.ring(v) for k, v in KINDS.items()}
    egress = "lb1" if lab.variant == "redirect" else "lb0"
    smac = netns.Netns(lab.lb, create=False, owned=False).mac(egress)
    caps = [Capture(lab.sw, f"sw-be{i}") for i in (1, 2, 3)]
    g0 = s.stats()["global"]
    recs = burst(lab, tuple(KINDS), DIST_N, PORT_LO + DIST_N * DIST_BLOCK[s.encap])
    g1 = s.stats()["global"]
    wire = collections.Counter()
    for c in caps:
        wire.update(c.collect())

    for kind, rs in recs.items():
        vip = s.conf["vips"][KINDS[kind]]
        assert not failures(rs), (kind, failures(rs)[:5])
        got = by_backend(rs)
        total_w = sum(w for w, _ in vip["backends"].values())
        shares = []
        for i, (w, _) in vip["backends"].items():
            name = lab.backends[i - 1]
            expected = DIST_N * w / total_w
            shares.append(f"{name[-3:]} w{w} {got[name]}/{expected:.0f}")
            assert abs(got[name] / expected - 1) <= SHARE_TOLERANCE, \
                (kind, name, got[name], expected, dict(got))
        predicted = [s.predict(rings[kind], kind, r.sport) for r in rs]
        wrong = [(r.sport, r.backend, p) for r, p in zip(rs, predicted) if r.backend != p]
        assert not wrong, (kind, len(wrong), wrong[:5])
        report(f"[{s.id}] distribution {kind:<5} {DIST_N} new, 0 failed: " + ", ".join(shares))

    want = {"ipip": {"ipip", "ip6ip6"}, "gue": {"gue4", "gue6"}}[s.encap]
    kinds_seen = {k for k, _ in wire}
    assert kinds_seen == want, wire
    assert {m for _, m in wire} == {smac}, (wire, smac)
    d = {k: g1[k] - g0[k] for k in ("tx", "redirect", "drop", "rx_packets")}
    if lab.variant == "redirect":
        assert d["tx"] == 0 and d["redirect"] >= 4 * DIST_N, d
    else:
        assert d["redirect"] == 0 and d["tx"] >= 4 * DIST_N, d
    assert d["drop"] == 0, (d, g1["drops"])
    report(f"[{s.id}] wire: {dict(collections.Counter(k for k, _ in wire.elements()))} "
           f"from {egress}; counters {d}")


def test_drain(setup):
    """A drained backend keeps its long-lived connections working and gets no new ones;
    activated again, it gets new ones."""
    s = setup
    s.baseline()
    lab = s.lab
    be1 = lab.backends[0]
    longs = LongConns(lab).open(4, need=be1, need_n=2).start()
    load = Load(lab).start()
    try:
        load.more(20)
        s.set_admin("drain", 1)
        st = s.states()
        assert all(st[(v, lab.addr(1, s.conf["vips"][v]["family"]))] == "drain"
                   for v in BASE_VIPS), st
        t = load.barrier()
        longs.barrier()
        load.more(150)
        t_end = longs.barrier()
        t_act = time.monotonic()
        s.set_admin("activate", 1)
        t_back = load.barrier()
        load.more(100)
    finally:
        recs = load.stop()
        conns = longs.stop()
    assert not failures(recs), failures(recs)[:5]
    during = [r for r in recs if t < r.t0 and r.t1 < t_act]
    assert len(during) >= 4 * 150
    assert by_backend(during)[be1] == 0, by_backend(during)
    assert not [c for c in conns if c.error], [(c.backend, c.error) for c in conns if c.error]
    on_be1 = [c for c in conns if c.backend == be1]
    assert len(on_be1) >= 4 and all(c.ok_after(t) >= 10 for c in on_be1), \
        [(c.sport, c.ok_after(t)) for c in on_be1]
    after = [r for r in recs if r.t0 > t_back]
    assert by_backend(after)[be1] > 0, by_backend(after)
    report(f"[{s.id}] drain: {len(recs)} requests, 0 failed; {len(during)} while be1 "
           f"drained, none to it; {len(on_be1)} long-lived connections on be1 kept "
           f"working ({min(c.ok_after(t) for c in on_be1)}+ echoes each while drained, "
           f"{t_end - t:.1f}s); be1 back: {by_backend(after)[be1]}/{len(after)} new")


def test_failover(setup):
    """Kill be2's server: after `fall` failed checks new connections avoid it; nothing
    that the ring gave another backend fails. Start it again: back after `rise` checks."""
    s = setup
    s.baseline()
    lab = s.lab
    be2 = lab.backends[1]
    rings = {k: s.ring(v) for k, v in KINDS.items()}
    longs = LongConns(lab).open(4, need=be2, need_n=1).start()
    load = Load(lab).start()
    be2_keys = [(v, lab.addr(2, s.conf["vips"][v]["family"])) for v in BASE_VIPS]
    try:
        load.more(20)
        t_kill, downs, seen_failing_active = watch_flip(
            s, be2_keys, "down", lambda: lab.stop_server(be2),
            lambda b: b["state"] == "active" and b["last_check_ok"] is False)
        t_down = load.barrier()
        longs.barrier()
        load.more(100)

        t_restart, ups, seen_ok_down = watch_flip(
            s, be2_keys, "active", lambda: lab.start_server(be2),
            lambda b: b["state"] == "down" and b["last_check_ok"] is True)
        t_up = load.barrier()
        load.more(100)
    finally:
        recs = load.stop()
        conns = longs.stop()
    # hysteresis: a failed check left it active (fall > 1), a good one left it down
    # (rise > 1); the events count the checks where the daemon reports them
    assert seen_failing_active, f"be2 went down at its first failed check (fall={FALL})"
    assert seen_ok_down, f"be2 came back at its first good check (rise={RISE})"
    for evs, n in ((downs, FALL), (ups, RISE)):
        assert all(e.get("consecutive", n) == n for e in evs), evs

    bad = [r for r in failures(recs) if s.predict(rings[r.kind], r.kind, r.sport) != be2]
    assert not bad, bad[:5]
    assert all(t_kill < r.t1 and r.t0 < t_down for r in failures(recs)), failures(recs)[:5]
    down = [r for r in recs if t_down < r.t0 and r.t1 < t_restart]
    assert by_backend(down)[be2] == 0 and len(down) >= 400, by_backend(down)
    back = [r for r in recs if r.t0 > t_up]
    assert not failures(back) and by_backend(back)[be2] > 0, by_backend(back)
    # long-lived: those on be2 ended with its server, the others never noticed
    assert all(c.error for c in conns if c.backend == be2) and \
        sum(c.backend == be2 for c in conns) >= 2
    assert not [c for c in conns if c.backend != be2 and c.error]
    report(f"[{s.id}] failover: {len(recs)} requests; be2 down {t_down - t_kill:.2f}s after "
           f"the kill (fall={FALL}, interval={INTERVAL}s); {len(failures(recs))} failed, "
           f"all ring-mapped to be2 before it went down; {len(down)} while down, none to "
           f"be2; back after rise={RISE}: {by_backend(back)[be2]}/{len(back)} to be2")


def watch_flip(s: Setup, keys, to: str, action: Callable[[], object],
               seen: Callable[[dict], bool]) -> tuple[float, list[dict], bool]:
    """Run `action`, then wait for the backend_state_changed events taking every
    VIP/backend pair in keys to `to` (logged once the maps have it); meanwhile poll the
    stats for a backend entry that satisfies `seen`. Returns (when the action started,
    those events, whether one was seen)."""
    after = s.mark()
    t_action = time.monotonic()
    action()
    was_seen = False
    deadline = time.monotonic() + WAIT
    while True:
        evs = [e for e in s.read_events()[after:] if e.get("event") ==
               "backend_state_changed" and e["to"] == to and (e["vip"], e["backend"]) in keys]
        if {(e["vip"], e["backend"]) for e in evs} == set(keys):
            return t_action, evs, was_seen
        doc = s.stats()
        was_seen = was_seen or any(seen(b) for v in doc["vips"] for b in v["backends"]
                                   if (v["name"], b["address"]) in keys)
        assert time.monotonic() < deadline, f"{keys} never {to}: {s.tail()}"
        time.sleep(0.01)


def _reload_steps(s: Setup):
    """(what, new conf or 'broken', barrier first?, wait until every backend is active)"""
    cur = copy.deepcopy(s.conf)
    other = "gue" if s.encap == "ipip" else "ipip"
    steps = []

    def step(what, fn=None, broken=False, barrier=False, settle=False):
        nonlocal cur
        if fn:
            cur = copy.deepcopy(cur)
            fn(cur)
        steps.append((what, "broken" if broken else cur, barrier, settle))

    V = lambda c, n: c["vips"][n]["backends"]  # noqa: E731
    long_vips = ("long", "long6")

    def set_state(c, i, state, vips=tuple(BASE_VIPS)):
        for n in vips:
            V(c, n)[i][1] = state

    def remove(c, i, vips=tuple(BASE_VIPS)):
        for n in vips:
            del V(c, n)[i]

    def add(c, i, vips=tuple(BASE_VIPS)):
        for n in vips:
            V(c, n)[i] = [1, "active"]
    extra = configtext.vip("extra", "10.200.1.10", 8080, [str(s.lab.addr(i, 4)) for i in (1, 2)],
                           protocol="tcp", health={"port": 80})

    step("web weights 2/2/3", lambda c: V(c, "web")[1].__setitem__(0, 2))
    step("web6 weights 1/1/1", lambda c: [V(c, "web6")[i].__setitem__(0, 1) for i in (1, 2, 3)])
    step("broken config", broken=True)
    step("echo weights 3/1/1", lambda c: V(c, "echo")[1].__setitem__(0, 3))
    step("drain be3 (config)", lambda c: set_state(c, 3, "drain"))
    step("remove be3", lambda c: remove(c, 3), barrier=True)
    step("nothing changed")
    step("add VIP extra", lambda c: c.__setitem__("extra", extra))
    step(f"encap {other}", lambda c: c.__setitem__("encap", other))
    step("add be3 back", lambda c: add(c, 3), settle=True)
    step("health interval 0.2", lambda c: c.__setitem__("interval", 0.2))
    step("remove VIP extra", lambda c: c.__setitem__("extra", ""))
    step(f"encap {s.encap}", lambda c: c.__setitem__("encap", s.encap))
    step("long weights 1/3/1", lambda c: [V(c, n)[2].__setitem__(0, 3) for n in long_vips])
    step("drain be2 on web", lambda c: set_state(c, 2, "drain", ("web",)))
    step("remove be2 from web", lambda c: remove(c, 2, ("web",)), barrier=True)
    step("add be2 to web", lambda c: add(c, 2, ("web",)), settle=True)
    step("health interval back", lambda c: c.__setitem__("interval", INTERVAL))
    step("weights back", lambda c: c["vips"].update(copy.deepcopy(
        {n: v for n, v in base_conf(s.encap)["vips"].items() if n not in long_vips})))
    step("base config", lambda c: c.update(base_conf(s.encap)))
    assert len(steps) == RELOADS and cur == base_conf(s.encap)
    return steps


def test_reload_under_load(setup):
    """20 SIGHUPs (weights, drains, backends and a VIP removed and added, encapsulation
    switched, one broken config) while clients keep opening connections and talking on
    long-lived ones: no request fails; no connection whose backend stayed is reset."""
    s = setup
    s.baseline()
    lab = s.lab
    be3 = lab.backends[2]
    rings0 = {v: s.ring(v) for v in BASE_VIPS}
    longs = LongConns(lab).open(6, need=be3, need_n=2).start()
    load = Load(lab).start()
    evs = []
    try:
        load.more(20)
        for what, conf, barrier, settle in _reload_steps(s):
            if barrier:  # the drain before has let every request in flight finish
                load.barrier()
            if conf == "broken":
                ev = s.hup(broken=True)
            else:
                ev = s.hup(conf)
            evs.append((what, ev))
            if settle:
                s.wait_all_active()
            load.more(5)
        load.barrier()
        longs.barrier()
    finally:
        recs = load.stop()
        conns = longs.stop()
    assert sum(ev["event"] == "config_reloaded" for _, ev in evs) == RELOADS - 1
    assert sum(ev["event"] == "config_rejected" for _, ev in evs) == 1
    counts = dict(evs)
    assert counts["remove be3"]["backends_removed"] == 6
    assert counts["add be3 back"]["backends_added"] == 6
    assert counts["add VIP extra"]["vips_added"] == 1
    assert counts["remove VIP extra"]["vips_removed"] == 1
    assert counts["nothing changed"]["rings_swapped"] == 0
    assert not failures(recs), (len(failures(recs)), failures(recs)[:5])
    stayed = [c for c in conns if c.backend != be3]  # be3 left every VIP once
    assert stayed and not [c for c in stayed if c.error], \
        [(c.backend, c.error) for c in stayed if c.error]
    assert all(len(c.oks) >= RELOADS for c in stayed)
    # back on the base config: every ring is what it was (Maglev is deterministic)
    for v in BASE_VIPS:
        assert s.ring(v) == rings0[v], v
    moved = [c for c in conns if c.backend == be3]
    assert len(moved) >= 4
    report(f"[{s.id}] reload: {RELOADS} SIGHUPs (1 rejected) during {len(recs)} requests "
           f"({dict(collections.Counter(r.kind for r in recs))}), 0 failed; "
           f"{len(stayed)} long-lived connections whose backend stayed: 0 reset, "
           f"{min(len(c.oks) for c in stayed)}+ echoes each; {len(moved)} on be3 "
           f"(removed once): {sum(bool(c.error) for c in moved)} reset; "
           f"reload ms: {[ev.get('duration_ms') for _, ev in evs if 'duration_ms' in ev]}")


def test_restart(setup):
    """SIGKILL the daemon under load: the attached program keeps forwarding, nothing
    fails; a new daemon adopts the pinned maps: connections keep their backends."""
    s = setup
    s.baseline()
    lab = s.lab
    rings0 = {v: s.ring(v) for v in BASE_VIPS}
    longs = LongConns(lab).open(6).start()
    load = Load(lab).start()
    try:
        load.more(20)
        old = s.proc
        old.send_signal(signal.SIGKILL)
        old.wait(10)
        t_dead = load.barrier()
        longs.barrier()
        load.more(100)  # no daemon at all
        ev = s.start(fresh=False)
        t_new = load.barrier()
        assert ev["adopted_vips"] == len(BASE_VIPS), ev
        s.wait_all_active()
        longs.barrier()
        load.more(100)
        t_end = longs.barrier()
    finally:
        recs = load.stop()
        conns = longs.stop()
    assert not failures(recs), failures(recs)[:5]
    assert not [c for c in conns if c.error], [(c.backend, c.error) for c in conns if c.error]
    assert all(c.ok_after(t_new) > 0 for c in conns)
    for v in BASE_VIPS:
        assert s.ring(v) == rings0[v], v
    dead = [r for r in recs if t_dead < r.t0 < t_new]
    assert len(dead) >= 400
    # a backend that a reload adds starts down, even one the killed instance had up:
    # it enters the ring only after `rise` checks
    conf = copy.deepcopy(s.conf)
    del conf["vips"]["echo"]["backends"][3]
    assert s.hup(conf)["rings_swapped"] == 1
    conf = copy.deepcopy(conf)
    conf["vips"]["echo"]["backends"][3] = [1, "active"]
    ev_add = s.hup(conf)
    assert ev_add["backends_added"] == 1 and ev_add["rings_swapped"] == 0, ev_add
    s.wait_all_active()
    assert s.conf == base_conf(s.encap) and s.ring("echo") == rings0["echo"]
    report(f"[{s.id}] restart: {len(recs)} requests, 0 failed ({len(dead)} with no daemon); "
           f"{len(conns)} long-lived connections kept their backends across SIGKILL and "
           f"restart ({min(c.ok_after(t_new) for c in conns)}+ echoes each after it, "
           f"{t_end - t_new:.1f}s); adopted {ev['adopted_maps']} maps, {ev['adopted_vips']} VIPs")
