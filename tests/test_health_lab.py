"""Health checks and backend lifecycle in the real daemon, in a lab this file makes (xh-*):
every transition's log event, exactly when it happens in checks (counted by the
backend's own server), the rings after each transition, drain vs maint vs down on
existing flows, admin states across SIGHUP and restart, a backend never checked,
all_down drop vs spread. (Probes, verdicts and the scheduler alone: test_health.py.)

Times here are generous timeouts only; what is asserted is counts and contents.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import json
import signal
import time

import pytest

from lb import flowtable, layout
from lb.lab import topology
from lb.lab.instance import Instance, RunFiles
from lb.native import Map

import configtext
import daemonctl
import traffic
from healthserver import HealthServer

LAB = topology.Lab(prefix="xh-")
FILES = RunFiles("health")
PIN, STATE = FILES.pin, FILES.state
RING = 1009
HPORT = 8080            # health endpoint (HealthServer) on every backend
SLOW_PORT = 8081        # a health endpoint that never answers (one slow VIP)
B = {"xh-be1": "10.200.0.11", "xh-be2": "10.200.0.12", "xh-be3": "10.200.0.13"}
NAME = {a: n for n, a in B.items()}
V6 = ["fd00:200::11", "fd00:200::12", "fd00:200::13"]
RISE, FALL = 2, 3


def config_text(web_states: dict[str, str] | None = None) -> str:
    web_states = web_states or {}

    def backends(addrs, states=None):
        return [configtext.backend(a, **({"state": states[a]} if states and a in states
                                         else {})) for a in addrs]
    v4 = list(B.values())
    health = dict(type="http", port=HPORT, path="/healthz", interval=0.2, timeout=0.15,
                  rise=RISE, fall=FALL)
    return ("\n" + FILES.lb_table("lb0", encap="ipip", ring_size=RING, flow_table_size=65536)
            + configtext.section("health", **health)
            + configtext.vip("web", topology.VIP4, 80, backends(v4, web_states),
                             protocol="tcp")
            + configtext.vip("echo", topology.VIP4, topology.UDP_PORT, backends(v4),
                             protocol="udp")
            + configtext.vip("slow", topology.VIP4, 8443, backends(v4[2:]), protocol="tcp",
                             health={"port": SLOW_PORT, "interval": 60.0, "timeout": 50.0})
            + configtext.vip("open", topology.VIP4, 9000, backends(v4), protocol="udp",
                             health={"type": "none"})
            + configtext.vip("spread", topology.VIP6, topology.UDP_PORT, backends(V6),
                             protocol="udp", all_down="spread",
                             health={"type": "tcp", "port": 9})
            + configtext.vip("dropper", topology.VIP6, 80, backends(V6), protocol="tcp",
                             all_down="drop", health={"type": "tcp", "port": 9}))


def Daemon(config: str, log: str) -> Instance:
    return Instance(LAB.lb, config, log)


cli, stats = daemonctl.cli, daemonctl.stats


def backend_rows(doc: dict, vip: str) -> dict[str, dict]:
    v = next(v for v in doc["vips"] if v["name"] == vip)
    return {b["address"]: b for b in v["backends"]}


def expected_ring(addresses) -> list:
    return daemonctl.expected_ring(addresses, RING)


def assert_rings(in_ring, vips=(("web", 80, 6), ("echo", topology.UDP_PORT, 17))):
    want = expected_ring(in_ring)
    for name, port, proto in vips:
        assert daemonctl.pinned_ring(PIN, topology.VIP4, port, proto) == want, name


def flow_backend(sport: int) -> str | None:
    """The backend the pinned connection table holds for client:sport -> echo VIP."""
    key = layout.flow_key(17, ipaddress.ip_address(LAB.hosts()["client"].v4), sport,
                     ipaddress.ip_address(topology.VIP4), topology.UDP_PORT)
    with flowtable.pinned(f"{PIN}/flows") as flows:
        val = flows.lookup(key)
    if val is None:
        return None
    bid = val.backend_id
    with Map.from_pin(f"{PIN}/backends") as bes:
        b = layout.Backend.unpack(bes.lookup(ctypes.c_uint32(bid)))
    return str(layout.words_addr(b.addr, b.family))


# the client on one CPU: test_health.py's test_moved_flow_stays_moved_on_every_cpu says why
udp_from_ports = functools.partial(traffic.udp_from_ports, LAB, cpu=0)
tcp_connects = functools.partial(traffic.tcp_connects, LAB)


def wait_for(pred, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("health")
    FILES.clean()
    servers: dict[str, HealthServer] = {}
    state: dict = {}
    try:
        LAB.up()
        for name, addr in B.items():
            servers[name] = HealthServer(name, addr, HPORT, 200)
        servers["slow"] = HealthServer("xh-be3", B["xh-be3"], SLOW_PORT, "hang")
        cfg = tmp / "lb.toml"
        cfg.write_text(config_text())
        state.update(cfg=str(cfg), servers=servers, tmp=tmp, skew={},
                     d=Daemon(str(cfg), str(tmp / "daemon.log")))
        state["d"].wait("datapath_attached")
        yield state
    finally:
        if "d" in state:
            state["d"].stop()
        for s in servers.values():
            s.close()
        LAB.down()
        FILES.clean()


def wait_state(env, vip: str, addr: str, to: str, after: int, **match) -> dict:
    return env["d"].wait("backend_state_changed", after, vip=vip, backend=addr, to=to,
                         **match)


def test_never_checked_backend_gets_no_slot(env):
    """`slow`'s only backend has a check that is still running (its endpoint never
    answers, timeout 50 s): never checked, so no slot; the VIP drops and counts."""
    doc = stats(env["cfg"])
    row = backend_rows(doc, "slow")[B["xh-be3"]]
    assert row["last_check"] == "not checked" and row["checks"] == 0
    assert row["healthy"] is False and row["state"] == "down"
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 8443, 6) == [None] * RING
    before = doc["global"]["drops"]["no_backend"]
    assert tcp_connects(topology.VIP4, 8443, 3) == 0
    assert stats(env["cfg"])["global"]["drops"]["no_backend"] >= before + 3
    assert env["d"].events("backend_state_changed", vip="slow") == []


def test_health_type_none_serves_at_once(env):
    """With health checks off every backend takes traffic from the start, unchecked."""
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 9000, 17) == expected_ring(list(B.values()))
    for row in backend_rows(stats(env["cfg"]), "open").values():
        assert (row["state"], row["healthy"], row["last_check"], row["checks"]) == (
            "active", True, "health checks off", 0)
    assert env["d"].events("backend_state_changed", vip="open") == []


def test_startup_transitions_and_shared_probe(env):
    """Every backend starts down and goes up after exactly `rise` checks, one event each;
    web and echo use the same check, so each backend's server sees one request per check,
    not two."""
    d, servers = env["d"], env["servers"]
    for vip in ("web", "echo"):
        for addr in B.values():
            ev = wait_state(env, vip, addr, "active", 0)
            assert ev["from"] == "down" and ev["reason"] == "http status 200"
            assert ev["consecutive"] == RISE and ev["check_count"] == RISE
            assert len(d.events("backend_state_changed", vip=vip, backend=addr)) == 1
    assert_rings(list(B.values()))
    before = {name: s.count() for name, s in servers.items()}
    doc = stats(env["cfg"])
    for name, addr in B.items():
        web, echo = backend_rows(doc, "web")[addr], backend_rows(doc, "echo")[addr]
        assert web["checks"] == echo["checks"]  # one probe, two VIPs
        # one request per check (two VIPs probing apart would make it twice as many)
        assert before[name] - 1 <= web["checks"] <= servers[name].count()
        assert web["latency_ms"] is not None and web["last_check_ok"] is True
        assert web["admin_state"] == "active" and web["healthy"] is True
    got = udp_from_ports(range(41000, 41030))
    assert set(got.values()) == set(B)


def test_all_down_drop_and_spread(env):
    """Both v6 VIPs' checks are refused (nothing on port 9): `spread` still uses every
    backend, `dropper` has an empty ring and drops, counted."""
    doc = stats(env["cfg"])
    for vip in ("spread", "dropper"):
        rows = backend_rows(doc, vip)
        wait_for(lambda: all(r["last_check"] == "connection refused" for r in
                             backend_rows(stats(env["cfg"]), vip).values()), "checks")
        assert all(r["state"] == "down" and not r["healthy"] for r in rows.values())
    assert daemonctl.pinned_ring(PIN, topology.VIP6, topology.UDP_PORT, 17) == expected_ring(V6)
    assert daemonctl.pinned_ring(PIN, topology.VIP6, 80, 6) == [None] * RING
    got = udp_from_ports(range(41100, 41120), host=topology.VIP6)
    assert None not in got.values() and len(set(got.values())) == 3
    before = stats(env["cfg"])["global"]["drops"]["no_backend"]
    assert tcp_connects(topology.VIP6, 80, 3) == 0
    assert stats(env["cfg"])["global"]["drops"]["no_backend"] >= before + 3


@pytest.mark.parametrize("mode,reason", [
    (500, "http status 500"),
    ("refuse", "connection refused"),
    ("hang", "http response timeout after 0.15s"),
])
def test_failure_and_recovery_exact_checks(env, mode, reason):
    """be2's endpoint starts failing after check c: down at exactly check c + fall (for
    both VIPs that use it), ring without be2; back up after `rise` good checks."""
    d, srv, addr = env["d"], env["servers"]["xh-be2"], B["xh-be2"]
    skew = env["skew"].setdefault("xh-be2", 0)  # checks the server could not count
    n = d.mark()
    c = srv.set_mode(mode)
    for vip in ("web", "echo"):
        ev = wait_state(env, vip, addr, "down", n)
        assert (ev["from"], ev["reason"], ev["consecutive"]) == ("active", reason, FALL)
        assert ev["check_count"] == c + skew + FALL
        assert len(d.events("backend_state_changed", n, vip=vip, backend=addr)) == 1
    assert_rings([B["xh-be1"], B["xh-be3"]])
    row = backend_rows(stats(env["cfg"]), "web")[addr]
    assert (row["state"], row["healthy"], row["last_check"]) == ("down", False, reason)
    n = d.mark()
    c = srv.set_mode(200)
    for vip in ("web", "echo"):
        ev = wait_state(env, vip, addr, "active", n)
        assert (ev["from"], ev["reason"], ev["consecutive"]) == ("down", "http status 200",
                                                                 RISE)
    # up at the second request answered after the switch; refused connections never
    # reached the server, every other check did
    new_skew = ev["check_count"] - (c + RISE)
    assert new_skew > skew if mode == "refuse" else new_skew == skew
    env["skew"]["xh-be2"] = new_skew
    assert_rings(list(B.values()))
    # nothing else moved meanwhile
    others = [e for e in d.events("backend_state_changed", n) if e["backend"] != addr]
    assert others == []


def test_flapping_backend(env):
    """A backend flapping under its rise/fall counts produces exactly the transitions the
    counts say, at the checks they say."""
    d, srv, addr = env["d"], env["servers"]["xh-be3"], B["xh-be3"]
    # from up (fall 3, rise 2): 500s in runs of 1 and 2 change nothing; the third
    # consecutive one is check 8 (down); 200, 500, then two 200s: up at check 12
    script = [500, 200, 500, 500, 200, 500, 500, 500, 200, 500, 200, 200]
    n = d.mark()
    c = srv.set_mode(200, script)
    ev = wait_state(env, "web", addr, "active", n)
    evs = d.events("backend_state_changed", n, vip="web", backend=addr)
    assert [(e["to"], e["check_count"] - c, e["reason"]) for e in evs] == [
        ("down", 8, "http status 500"), ("active", 12, "http status 200")]
    assert ev["check_count"] == c + 12
    assert [(e["to"], e["check_count"] - c) for e in d.events(
        "backend_state_changed", n, vip="echo", backend=addr)] == [("down", 8), ("active", 12)]
    assert_rings(list(B.values()))


def wait_all_up(env) -> None:
    def up():
        doc = stats(env["cfg"])
        return all(r["state"] == "active" for vip in ("web", "echo")
                   for r in backend_rows(doc, vip).values())
    wait_for(up, "web and echo backends all active")


def test_drain_keeps_flows_maint_and_down_move_them(env):
    d, cfg, servers = env["d"], env["cfg"], env["servers"]
    wait_all_up(env)
    ports = list(range(42000, 42060))
    first = udp_from_ports(ports)
    assert None not in first.values() and set(first.values()) == set(B)
    on = {name: [p for p in ports if first[p] == name] for name in B}
    for p in ports:
        assert flow_backend(p) == B[first[p]]

    # drain be1 (echo only): out of echo's ring, its flows stay on it
    n = d.mark()
    assert cli("backend", "drain", "echo", B["xh-be1"], "--config", cfg).returncode == 0
    ev = wait_state(env, "echo", B["xh-be1"], "drain", n)
    assert ev["from"] == "active" and ev["reason"] == "admin drain"
    assert daemonctl.pinned_ring(PIN, topology.VIP4, topology.UDP_PORT, 17) == expected_ring(
        [B["xh-be2"], B["xh-be3"]])
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6) == expected_ring(list(B.values()))
    assert udp_from_ports(ports) == first
    for p in on["xh-be1"]:
        assert flow_backend(p) == B["xh-be1"]
    fresh = udp_from_ports(range(43000, 43040))
    assert "xh-be1" not in fresh.values() and None not in fresh.values()

    # maint be1: its flows move, the others stay where they are
    n = d.mark()
    assert cli("backend", "maint", "echo", B["xh-be1"], "--config", cfg).returncode == 0
    ev = wait_state(env, "echo", B["xh-be1"], "maint", n)
    assert ev["from"] == "drain" and ev["reason"] == "admin maint"
    again = udp_from_ports(ports)
    for p in ports:
        if first[p] == "xh-be1":
            assert again[p] in ("xh-be2", "xh-be3") and flow_backend(p) == B[again[p]]
        else:
            assert again[p] == first[p]
    n = d.mark()
    assert cli("backend", "activate", "echo", B["xh-be1"], "--config", cfg).returncode == 0
    ev = wait_state(env, "echo", B["xh-be1"], "active", n)
    assert ev["from"] == "maint" and ev["reason"] == "admin active"
    assert_rings(list(B.values()))

    # down (health): be2's flows move, the others stay (new flows for this part)
    ports = list(range(44000, 44060))
    current = udp_from_ports(ports)
    assert "xh-be2" in current.values() and None not in current.values()
    n = d.mark()
    servers["xh-be2"].set_mode(500)
    wait_state(env, "echo", B["xh-be2"], "down", n)
    moved = udp_from_ports(ports)
    for p in ports:
        if current[p] == "xh-be2":
            assert moved[p] != "xh-be2" and moved[p] is not None
            assert flow_backend(p) == B[moved[p]]
        else:
            assert moved[p] == current[p]
    n = d.mark()
    servers["xh-be2"].set_mode(200)
    wait_state(env, "echo", B["xh-be2"], "active", n)

    # drain and down: down wins, the drained backend's flows move too
    on3 = [p for p, b in udp_from_ports(ports).items() if b == "xh-be3"]
    assert on3
    n = d.mark()
    assert cli("backend", "drain", "echo", B["xh-be3"], "--config", cfg).returncode == 0
    wait_state(env, "echo", B["xh-be3"], "drain", n)
    n = d.mark()
    servers["xh-be3"].set_mode("refuse")
    ev = wait_state(env, "echo", B["xh-be3"], "down", n)
    assert ev["from"] == "drain"
    assert all(b not in ("xh-be3", None) for b in udp_from_ports(on3).values())
    n = d.mark()
    servers["xh-be3"].set_mode(200)
    wait_state(env, "echo", B["xh-be3"], "drain", n)  # healthy again, still drained
    assert cli("backend", "activate", "echo", B["xh-be3"], "--config", cfg).returncode == 0
    assert_rings(list(B.values()))


def test_admin_states_survive_sighup_and_restart(env):
    d, cfg = env["d"], env["cfg"]
    wait_all_up(env)
    # maint from the control socket, drain from the config
    n = d.mark()
    assert cli("backend", "maint", "web", B["xh-be3"], "--config", cfg).returncode == 0
    wait_state(env, "web", B["xh-be3"], "maint", n)
    saved = json.load(open(STATE))["backends"]
    assert {"vip": "web", "backend": B["xh-be3"], "state": "maint"} in saved
    open(cfg, "w").write(config_text({B["xh-be2"]: "drain"}))
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    d.wait("config_reloaded", n)
    ev = wait_state(env, "web", B["xh-be2"], "drain", n)
    assert ev["from"] == "active" and ev["reason"] == "config reload"
    web = backend_rows(stats(cfg), "web")
    assert web[B["xh-be3"]]["state"] == "maint" and web[B["xh-be2"]]["state"] == "drain"
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6) == expected_ring([B["xh-be1"]])
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)  # again, nothing changes
    d.wait("config_reloaded", n)
    assert d.events("backend_state_changed", n) == []
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6) == expected_ring([B["xh-be1"]])

    # restart: a new daemon reads the state file and the config
    d.stop()
    assert d.proc.returncode == 0
    n = d.mark()
    d2 = Daemon(cfg, d.logpath)
    env["d"] = d2
    d2.wait("datapath_attached", n)
    ev = wait_state(env, "web", B["xh-be2"], "drain", n)  # once healthy: drained, not active
    assert ev["from"] == "down"
    wait_state(env, "web", B["xh-be1"], "active", n)
    hidden = d2.wait("backend_health_changed", n, vip="web", backend=B["xh-be3"])
    assert hidden["from"] == hidden["to"] == "maint" and hidden["health"] == "up"
    assert d2.events("backend_state_changed", n, vip="web", backend=B["xh-be3"]) == []
    web = backend_rows(stats(cfg), "web")
    assert web[B["xh-be3"]]["state"] == "maint" and web[B["xh-be3"]]["admin_state"] == "maint"
    assert web[B["xh-be3"]]["healthy"] is True
    assert web[B["xh-be2"]]["state"] == "drain"
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6) == expected_ring([B["xh-be1"]])
    wait_for(lambda: daemonctl.pinned_ring(PIN, topology.VIP4, topology.UDP_PORT, 17)
             == expected_ring(list(B.values())), "echo ring with every backend")
