"""[announce] with the real daemon in the lab: the blackhole routes of protocol 252 in table
200 of the LB's namespace, by health (all backends down, min_backends, first verdicts),
by `xdplb announce withdraw|restore` (kept across a restart), on SIGTERM (withdrawn
before the program stops forwarding), adopted after SIGKILL; routes of other protocols
and tables are never touched. IPv4 and IPv6 VIPs."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from bench import frames
from lb.announce import RTPROT_XDPLB
from lb.daemon import NEXTHOP_REFRESH_S
from lb.lab import netns, topology
from lb.lab.instance import Instance, RunFiles
from lb.metrics import render
from lb.native import Map

import configtext
import daemonctl

LAB = topology.Lab(prefix="xa-")
FILES = RunFiles("announce")
TABLE = 200
VIPS = {topology.VIP4: ("web", "echo"), topology.VIP6: ("web6",)}
HEALTH = dict(daemonctl.FAST_HTTP_HEALTH, interval=0.25, timeout=0.2, fall=1)
SPAWNED: list[Instance] = []


def config(tmp, name="lb.toml", announce="", vip_extra="", delay=1.0) -> str:
    """web (tcp/80) and echo (udp/5353) on VIP4, web6 on VIP6, over the lab's three
    backends, with [announce] (table 200, withdraw_delay `delay`, more from `announce`)."""
    hosts = LAB.hosts()
    text = FILES.lb_table("lb0", ring_size=65537, flow_table_size=65536)
    text += configtext.section("health", **HEALTH)
    text += configtext.section("announce", table=TABLE, withdraw_delay=delay) + announce
    for vip, addr, port, proto, fam in (("web", topology.VIP4, 80, "tcp", 4),
                                        ("echo", topology.VIP4, 5353, "udp", 4),
                                        ("web6", topology.VIP6, 80, "tcp", 6)):
        text += configtext.vip(vip, addr, port, (), health={"port": 80} if port != 80 else None,
                               protocol=proto)
        if vip == "web":
            text += vip_extra
        text += "".join(configtext.backend(str(getattr(hosts[be], f"v{fam}")))
                        for be in LAB.backends)
    path = tmp / name
    path.write_text(text)
    return str(path)


def routes(table: int = TABLE, proto: int = RTPROT_XDPLB) -> list[str]:
    """The LB namespace's routes in `table` of protocol `proto`, as "addr/len" (sorted;
    a duplicate shows twice)."""
    out = []
    with netns.Netns(LAB.lb, create=False, owned=False).ipr() as ipr:
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.route("dump", family=fam, table=table):
                if r["proto"] == proto and r.get_attr("RTA_TABLE") == table:
                    out.append(f"{r.get_attr('RTA_DST')}/{r['dst_len']}")
    return sorted(out)


ANNOUNCED = sorted([f"{topology.VIP4}/32", f"{topology.VIP6}/128"])


def add_route(dst: str, table: int = TABLE, proto: int = RTPROT_XDPLB) -> None:
    with netns.Netns(LAB.lb, create=False, owned=False).ipr() as ipr:
        ipr.route("add", dst=dst, table=table, proto=proto, type="blackhole",
                  family=socket.AF_INET6 if ":" in dst else socket.AF_INET)


def del_routes(*dsts: str, table: int = TABLE, proto: int = 4) -> None:
    """Remove the test's routes (protocol `proto`: static unless told)."""
    with netns.Netns(LAB.lb, create=False, owned=False).ipr() as ipr:
        for dst in dsts:
            try:
                ipr.route("del", dst=dst, table=table, type="blackhole", proto=proto,
                          family=socket.AF_INET6 if ":" in dst else socket.AF_INET)
            except NetlinkError:
                pass


def start(cfg: str, log: str) -> Instance:
    d = Instance(LAB.lb, cfg, log)
    SPAWNED.append(d)
    d.wait("datapath_attached")
    d.wait_control()
    return d


def announced(d: Instance) -> dict[str, bool]:
    return {v["name"]: v["announced"] for v in d.stats()["vips"]}


def wait_routes(d: Instance, want: list[str], what: str) -> None:
    d.wait_until(lambda: routes() == want, f"{what}: routes {want} (have {routes()})")


def servers(up: bool) -> None:
    for be in LAB.backends:
        (LAB.start_server if up else LAB.stop_server)(be)


def ring(addr: str = topology.VIP4) -> list:
    return daemonctl.pinned_ring(FILES.pin, addr, 80, socket.IPPROTO_TCP)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("announce")
    FILES.clean()
    LAB.up()
    try:
        cfg = config(tmp)
        d = start(cfg, str(tmp / "daemon.log"))
        wait_routes(d, ANNOUNCED, "first announcement")
        yield tmp, cfg, d
    finally:
        for p in SPAWNED:
            p.stop()
        LAB.down()
        FILES.clean()


def current(env) -> Instance:
    """The running daemon of the module (tests restart it); every server up, announced."""
    tmp, cfg, _ = env
    d = SPAWNED[-1]
    if d.proc.poll() is not None:
        d = start(cfg, str(tmp / "daemon.log"))
    for be in LAB.backends:
        if not os.path.exists(os.path.join(LAB.piddir, f"{be}.pid")):
            LAB.start_server(be)
    wait_routes(d, ANNOUNCED, "baseline")
    d.wait_until(lambda: all(b["state"] == "active" for v in d.stats()["vips"]
                             for b in v["backends"]), "every backend active")
    return d


def test_announced_once_every_backend_is_checked(env):
    d = current(env)
    assert routes() == ANNOUNCED           # one route per address, IPv4 /32 and IPv6 /128
    assert announced(d) == {"web": True, "echo": True, "web6": True}
    events = d.events("vip_announced")
    assert sorted(e["vip"] for e in events) == ["echo", "web", "web6"]
    assert {e["reason"] for e in events} == {"health"}
    exposition = render(d.stats()).decode()
    assert exposition.count("xdplb_vip_announced{") == 3
    assert (f'xdplb_vip_announced{{address="{topology.VIP6}",port="80",protocol="tcp",'
            f'vip="web6"}} 1.0') in exposition
    status = daemonctl.cli("announce", "status", "--config", env[1])
    assert status.returncode == 0, status.stderr
    assert "announce: active; routes in table 200" in status.stdout
    assert status.stdout.count(" announced\n") == 3


def test_all_backends_down_withdraws_after_holding_the_ring(env):
    # a hold long enough that a slow poll of the routes still finds the old ring
    with reloaded(env, delay=5.0) as d:
        n = d.mark()
        servers(False)
        # the ring the VIP had when it was withdrawn stays until withdraw_delay has
        # passed, so the withdrawal reaches the router before the ring changes
        d.wait_until(lambda: routes() == [], "the withdrawal")
        assert any(ring()), "the ring changed before the withdrawal had time to reach a router"

        def emptied() -> bool:
            # the ring is read before the routes: an empty one means the route was gone
            done = not any(ring())
            assert not done or routes() == [], "the ring changed while still announced"
            return done
        d.wait_until(emptied, "the ring emptied after the hold")
        withdrawn = d.events("vip_withdrawn", after=n)
        assert sorted(e["vip"] for e in withdrawn) == ["echo", "web", "web6"]
        assert {e["reason"] for e in withdrawn} == {"health"}
        assert announced(d) == {"web": False, "echo": False, "web6": False}
        out = daemonctl.cli("announce", "status", "--config", env[1]).stdout
        assert "withdrawn (health)" in out
        n = d.mark()
        servers(True)
        wait_routes(d, ANNOUNCED, "announced again")
        back = d.events("vip_announced", after=n)
        assert sorted(e["vip"] for e in back) == ["echo", "web", "web6"]
        assert {e["reason"] for e in back} == {"health"}
        assert len(d.events("vip_withdrawn", after=n)) == 0


@contextlib.contextmanager
def reloaded(env, **changes):
    """The running daemon reloaded (SIGHUP) into config(**changes), back afterwards."""
    tmp, cfg, _ = env
    d = current(env)

    def reload(path: str) -> None:
        os.replace(path, cfg)
        n = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        d.wait("config_reloaded", after=n)
    reload(config(tmp, "next.toml", **changes))
    try:
        yield d
    finally:
        reload(config(tmp, "next.toml"))


def test_min_backends(env):
    with reloaded(env, announce="min_backends = 3\n") as d:
        n = d.mark()
        assert routes() == ANNOUNCED
        LAB.stop_server(LAB.backends[0])
        d.wait_until(lambda: routes() == [], "withdrawn below min_backends")
        # two backends still take new flows: after the hold the ring has them
        d.wait_until(lambda: set(ring()) == {LAB.hosts()[b].v4 for b in LAB.backends[1:]},
                     "the ring without the stopped backend")
        assert routes() == []
        assert {e["reason"] for e in d.events("vip_withdrawn", after=n)} == {"health"}
        LAB.start_server(LAB.backends[0])
        wait_routes(d, ANNOUNCED, "three backends again")


def test_reload_cannot_change_the_table(env):
    tmp, cfg, _ = env
    d = current(env)
    os.replace(_with_table(config(tmp, "next.toml"), TABLE + 1), cfg)
    n = d.mark()
    try:
        d.proc.send_signal(signal.SIGHUP)
        ev = d.wait(("config_reloaded", "config_rejected"), after=n)
        assert ev["event"] == "config_rejected" and "restart" in ev["error"], ev
        assert routes() == ANNOUNCED and routes(table=TABLE + 1) == []
    finally:
        os.replace(config(tmp, "next.toml"), cfg)


def _with_table(path: str, table: int) -> str:
    text = open(path).read().replace(f"table = {TABLE}\n", f"table = {table}\n")
    open(path, "w").write(text)
    return path


def test_admin_withdraw_persists_across_restart_and_restore(env):
    tmp, cfg, _ = env
    d = current(env)
    ring_before = ring()
    n = d.mark()
    r = daemonctl.cli("announce", "withdraw", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert "withdrawn (xdplb announce restore" in r.stdout
    assert routes() == []                       # withdrawn when the command returns
    assert ring() == ring_before                # forwarding goes on, ring untouched
    counts, failed = LAB.client_http(topology.VIP4, 10)
    assert failed == 0, counts
    assert {e["reason"] for e in d.events("vip_withdrawn", after=n)} == {"admin"}
    assert json.load(open(FILES.state))["announce_withdrawn"] is True
    assert announced(d) == {"web": False, "echo": False, "web6": False}

    d.stop()                                    # a restart keeps the node withdrawn
    d = start(cfg, str(tmp / "daemon.log"))
    d.wait_until(lambda: all(b["checks"] for v in d.stats()["vips"]
                             for b in v["backends"]), "every backend checked")
    time.sleep(0.5)                             # more verdicts: still nothing announced
    assert routes() == []
    n = d.mark()
    r = daemonctl.cli("announce", "restore", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert routes() == ANNOUNCED
    assert {e["reason"] for e in d.events("vip_announced", after=n)} == {"admin"}
    assert "announce_withdrawn" not in json.load(open(FILES.state))


def test_sigterm_withdraws_before_the_program_stops_forwarding(env):
    tmp, cfg, _ = env
    d = current(env)
    add_route("10.200.9.8/32", proto=4)         # a static route in our table
    try:
        n = d.mark()
        d.proc.send_signal(signal.SIGTERM)
        d.wait_until(lambda: routes() == [], "the withdrawal on SIGTERM")
        # withdrawn, and the program still attached and forwarding
        assert d.proc.poll() is None
        lb = netns.Netns(LAB.lb, create=False, owned=False)
        assert lb.xdp_query("lb0")["prog_id"]
        counts, failed = LAB.client_http(topology.VIP4, 10)
        assert failed == 0, counts
        assert d.proc.wait(10) == 0
        events = [e["event"] for e in d.events(after=n)]
        assert events.index("vip_withdrawn") < events.index("stopped")
        assert {e["reason"] for e in d.events("vip_withdrawn", after=n)} == {"shutdown"}
        assert not lb.xdp_query("lb0")["prog_id"]
        assert routes(proto=4) == ["10.200.9.8/32"]
    finally:
        del_routes("10.200.9.8/32")


def test_sigkill_leaves_routes_and_a_restart_adopts_only_its_own(env):
    tmp, cfg, _ = env
    d = current(env)
    d.kill()
    assert routes() == ANNOUNCED                # the program forwards: routes stay
    n = len(d.events())
    stale, foreign, elsewhere = "10.200.9.9/32", "10.200.9.7/32", "fd00:9::9/128"
    add_route(stale)                            # ours, for no VIP: goes
    add_route(foreign, proto=4)                 # another protocol's: stays
    add_route(elsewhere, table=TABLE + 1)       # ours, other table: stays
    try:
        d = start(cfg, str(tmp / "daemon.log"))
        ev = d.wait("routes_adopted", after=n)
        assert (ev["kept"], ev["removed"]) == (2, 1)
        time.sleep(0.5)                         # verdicts arrive: no second route
        assert routes() == ANNOUNCED
        assert routes(proto=4) == [foreign]
        assert routes(table=TABLE + 1) == [elsewhere]
        # adopted as they were: no transition, no event
        assert d.events(("vip_announced", "vip_withdrawn"), after=n) == []
        assert announced(d) == {"web": True, "echo": True, "web6": True}
    finally:
        del_routes(foreign)
        del_routes(elsewhere, table=TABLE + 1, proto=RTPROT_XDPLB)


def test_foreign_route_for_a_vip_address_blocks_only_that_address(env):
    tmp, cfg, _ = env
    d = current(env)
    d.stop()
    add_route(f"{topology.VIP6}/128", proto=4)
    try:
        n = len(d.events())
        d = start(cfg, str(tmp / "daemon.log"))
        ev = d.wait("announce_failed", after=n)
        assert "not xdplb's" in ev["error"]
        wait_routes(d, [f"{topology.VIP4}/32"], "the other address")
        assert routes(proto=4) == [f"{topology.VIP6}/128"]   # untouched
        assert announced(d)["web6"] is False
        del_routes(f"{topology.VIP6}/128")      # gone: the retry announces
        wait_routes(d, ANNOUNCED, "retried")
    finally:
        del_routes(f"{topology.VIP6}/128")


def test_first_verdicts_gate_the_announcement(env):
    """A backend whose first check takes long (no answer to ARP, the timeout runs)
    keeps the VIP unannounced, though its other backends are up."""
    tmp, cfg, _ = env
    d = current(env)
    d.stop()
    assert routes() == []
    slow = "[vip.health]\n" + configtext.keys(interval=2.0, timeout=1.5) + configtext.backend(
        "10.200.0.99")
    gated = config(tmp, "gated.toml", vip_extra=slow)
    d = start(gated, str(tmp / "gated.log"))
    seen_partial = False
    while True:
        doc = d.stats()
        web = next(v for v in doc["vips"] if v["name"] == "web")
        if any(b["checks"] == 0 for b in web["backends"]):
            seen_partial |= any(b["state"] == "active" for b in web["backends"])
            assert not web["announced"], "announced with a backend not yet checked"
            assert f"{topology.VIP4}/32" not in routes()
        elif web["announced"]:
            break
        assert d.proc.poll() is None
        time.sleep(0.02)
    assert seen_partial
    assert routes() == ANNOUNCED
    d.stop()


def replace_route(dst: str, proto: int) -> None:
    """`ip route replace` in our table: the route for dst becomes one of `proto`."""
    with netns.Netns(LAB.lb, create=False, owned=False).ipr() as ipr:
        ipr.route("replace", dst=dst, table=TABLE, proto=proto, type="blackhole",
                  family=socket.AF_INET6 if ":" in dst else socket.AF_INET)


def passes() -> None:
    """Long enough for the daemon's periodic pass (lb/daemon.py NEXTHOP_REFRESH_S) to
    run twice more."""
    time.sleep(2 * NEXTHOP_REFRESH_S + 0.5)


def test_a_route_removed_by_someone_else_is_put_back(env):
    """`ip route del` of one of our routes (an operator, another daemon): the periodic
    pass adds it again and logs it once; the VIPs were announced all along."""
    d = current(env)
    n = d.mark()
    del_routes(f"{topology.VIP4}/32", proto=RTPROT_XDPLB)
    wait_routes(d, ANNOUNCED, "the route put back")
    passes()                                    # later passes find it in place
    restored = d.events("announce_route_restored", after=n)
    assert [(e["address"], sorted(e["vips"])) for e in restored] == [
        (topology.VIP4, ["echo", "web"])]
    assert d.events(("vip_announced", "vip_withdrawn", "announce_failed"), after=n) == []
    assert routes() == ANNOUNCED
    assert announced(d) == {"web": True, "echo": True, "web6": True}


def test_a_route_replaced_by_another_protocol_is_not_announced_until_it_goes(env):
    """`ip route replace` turns our route into another protocol's: the address is no
    longer announced (the other route is never touched), announce_failed once; once
    the other route goes, ours is back, announce_route_restored once."""
    d = current(env)
    vip6 = f"{topology.VIP6}/128"
    n = d.mark()
    replace_route(vip6, proto=4)
    try:
        failed = d.wait("announce_failed", after=n)
        assert failed["address"] == topology.VIP6 and "not xdplb's" in failed["error"]
        d.wait_until(lambda: announced(d)["web6"] is False, "web6 not announced")
        status = daemonctl.cli("announce", "status", "--config", env[1]).stdout
        assert "withdrawn (table 200 already has a route" in status
        passes()                                # retried: the same problem, not logged
        assert len(d.events("announce_failed", after=n)) == 1
        assert routes(proto=4) == [vip6] and routes() == [f"{topology.VIP4}/32"]
        assert d.events("announce_route_restored", after=n) == []
    finally:
        del_routes(vip6)
    wait_routes(d, ANNOUNCED, "announced again once the other route went")
    passes()
    restored = d.events("announce_route_restored", after=n)
    assert [(e["address"], e["vips"]) for e in restored] == [(topology.VIP6, ["web6"])]
    assert len(d.events("announce_failed", after=n)) == 1
    assert d.events(("vip_announced", "vip_withdrawn"), after=n) == []
    assert announced(d) == {"web": True, "echo": True, "web6": True}


def test_withdraw_wait_returns_when_the_withdrawal_is_withdraw_delay_old(env):
    """`announce withdraw --wait` says what it waits for and returns once the routers
    have had withdraw_delay; then the daemon has nothing left to wait for either."""
    tmp, cfg, _ = env
    d = current(env)
    try:
        r = daemonctl.cli("announce", "withdraw", "--wait", "--config", cfg)
        assert r.returncode == 0, r.stderr
        assert "withdrawn (xdplb announce restore" in r.stdout
        waits = [line for line in r.stdout.splitlines() if line.startswith("waiting")]
        assert len(waits) == 1 and "(withdraw_delay 1 s)" in waits[0], r.stdout
        assert "the routers have had the time" in r.stdout.splitlines()[-1]
        assert routes() == []
        status = d.request({"cmd": "announce", "action": "status"})["result"]
        assert status["withdrawn"] and status["settles_in"] == 0
        assert status["withdraw_delay"] == 1.0
        # already withdrawn long enough: nothing to wait for
        r = daemonctl.cli("announce", "withdraw", "--wait", "--config", cfg)
        assert r.returncode == 0 and "waiting" not in r.stdout, r.stdout
    finally:
        r = daemonctl.cli("announce", "restore", "--config", cfg)
        assert r.returncode == 0, r.stderr
    wait_routes(d, ANNOUNCED, "restored")


def test_withdraw_wait_fails_when_restored_meanwhile(env):
    tmp, cfg, _ = env
    with reloaded(env, delay=30.0) as d:
        waiter = subprocess.Popen([sys.executable, "-m", "lb.cli", "announce", "withdraw",
                                   "--wait", "--config", cfg], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            while not (line := waiter.stdout.readline()).startswith("waiting"):
                assert line, waiter.stderr.read()
            assert "(withdraw_delay 30 s)" in line
            r = daemonctl.cli("announce", "restore", "--config", cfg)
            assert r.returncode == 0, r.stderr
            assert waiter.wait(10) == 1
            assert "announced again" in waiter.stderr.read()
        finally:
            waiter.kill()
            waiter.wait()
        wait_routes(d, ANNOUNCED, "restored")


def test_wait_goes_with_withdraw_only(env):
    r = daemonctl.cli("announce", "status", "--wait", "--config", env[1])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "--wait goes with withdraw" in r.stderr


def _pinned_if_mac() -> bytes:
    from lb import layout
    from lb.native import Map
    with Map.from_pin(f"{FILES.pin}/config") as m:
        return bytes(layout.LbConfig.unpack(m.lookup(ctypes.c_uint32(0))).if_mac)


def test_frames_for_another_host_are_passed_not_forwarded(env):
    """The daemon gives the data path lb0's MAC (and follows a change of it); a frame to
    the VIP that the bridge floods to lb0 for another MAC is counted and passed, and no
    backend gets it."""
    tmp, cfg, _ = env
    d = current(env)
    lb = netns.Netns(LAB.lb, create=False, owned=False)
    mac = lb.mac("lb0")
    assert _pinned_if_mac() == mac
    before = d.stats()
    web = lambda doc: next(v for v in doc["vips"] if v["name"] == "web")  # noqa: E731
    client = netns.Netns(LAB.client, create=False, owned=False)
    frame = frames.frame(6, "10.200.0.1", 40999, topology.VIP4, 80, 64,
                         smac=client.mac("c0"), dmac=bytes.fromhex("02000000aaaa"))
    with client.entered(), socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind(("c0", 0))
        for _ in range(3):
            s.send(frame)
    d.wait_until(lambda: d.stats()["global"]["other_host_passed"] -
                 before["global"]["other_host_passed"] >= 3, "the flooded frames counted")
    assert web(d.stats())["packets"] == web(before)["packets"]   # forwarded to none
    # the interface's MAC changes: the data path follows
    new = bytes.fromhex("02000000abcd")
    n = d.mark()
    try:
        lb.set_link("lb0", mac=new)
        d.wait("interface_changed", after=n)
        d.wait_until(lambda: _pinned_if_mac() == new, "the new MAC in the config map")
    finally:
        lb.set_link("lb0", mac=mac)
    d.wait_until(lambda: _pinned_if_mac() == mac, "the MAC back")


def test_interface_gone_withdraws_until_it_is_back(env):
    """Nothing forwards while the attached interface is gone: its routes go (reason
    interface) and come back once it is re-created and the program attached again.
    Last: lb0 is a new interface afterwards."""
    d = current(env)
    lb = netns.Netns(LAB.lb, create=False, owned=False)
    mac = lb.mac("lb0")
    n = d.mark()
    lb.delete_link("lb0")
    d.wait_until(lambda: routes() == [], "the withdrawal with lb0 gone")
    assert {e["reason"] for e in d.events("vip_withdrawn", after=n)} == {"interface"}
    assert announced(d) == {"web": False, "echo": False, "web6": False}
    LAB.plug_lb0()
    lb.set_link("lb0", mac=mac)  # the neighbours' caches stay right
    d.wait("datapath_reattached", after=n)
    d.wait_until(lambda: routes() == ANNOUNCED, "announced again", timeout=30)
    # the last thing that held it back: the interface, or the health checks that failed
    # meanwhile (no route to the backends without lb0)
    back = {e["reason"] for e in d.events("vip_announced", after=n)}
    assert back and back <= {"interface", "health"}, back


QUIC_PHANTOMS = 11  # a QUIC VIP's backends (health none: nothing answers there)


def _rollback_config(tmp, sids, with_web6: bool) -> str:
    """config() with max_backends 21 (room for its 20 pairs) and a QUIC VIP whose 11
    server IDs, changed all at once, need 22 quic_servers entries side by side."""
    text = open(config(tmp, "rollback-base.toml")).read()
    text = text.replace("[lb]\n", "[lb]\nmax_backends = 21\n", 1)
    if not with_web6:
        text = text[:text.index('\n[[vip]]\nname = "web6"')] + "\n"
    text += configtext.vip("h3", topology.VIP4, 443,
                           [configtext.backend(f"10.200.0.{201 + i}", server_id=sid)
                            for i, sid in zip(range(QUIC_PHANTOMS), sids)],
                           health={"type": "none"}, protocol="udp", quic=True)
    path = tmp / "rollback-next.toml"
    path.write_text(text)
    return str(path)


def _pinned_maps() -> dict:
    """The pinned maps a reload writes (rings by contents; counters, flows and the QUIC
    epoch left out: health checks' answers pass the program meanwhile)."""
    out = {}
    for name in ("vips", "vip_addrs", "prefilter", "backends", "nexthops", "config",
                 "quic_servers", "quic_filter"):
        with Map.from_pin(os.path.join(FILES.pin, name)) as m:
            out[name] = dict(m.items())
    for vip, port, proto in ((topology.VIP4, 80, socket.IPPROTO_TCP),
                             (topology.VIP4, 5353, socket.IPPROTO_UDP),
                             (topology.VIP6, 80, socket.IPPROTO_TCP),
                             (topology.VIP4, 443, socket.IPPROTO_UDP)):
        out[(vip, port)] = daemonctl.pinned_ring(FILES.pin, vip, port, proto)
    return out


def test_reload_failing_in_the_kernel_puts_routes_and_maps_back(env):
    """The new file drops web6 (VIP6's route is withdrawn before the maps change) and
    changes every server ID of a QUIC VIP: quic_servers fills up partway (E2BIG). The
    route comes back, the maps hold what they held, one config_rejected says why."""
    tmp, cfg, _ = env
    d = current(env)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(10) == 0
    path = _rollback_config(tmp, range(1, 1 + QUIC_PHANTOMS), with_web6=True)
    d = start(path, str(tmp / "rollback.log"))
    try:
        wait_routes(d, ANNOUNCED, "first announcement")
        d.wait_until(lambda: all(b["state"] == "active" for v in d.stats()["vips"]
                                 if v["name"] != "h3" for b in v["backends"]),
                     "every lab backend active")
        before = _pinned_maps()
        os.replace(_rollback_config(tmp, range(101, 101 + QUIC_PHANTOMS), with_web6=False),
                   path)
        n = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        ev = d.wait(("config_reloaded", "config_rejected"), after=n)
        assert ev["event"] == "config_rejected" and "quic_servers is full" in ev["error"], ev
        assert routes() == ANNOUNCED
        after = _pinned_maps()
        for name in before:
            assert after[name] == before[name], f"{name} differs after the rejected reload"
        moves = [(e["event"], e["vip"], e["reason"])
                 for e in d.events(("vip_withdrawn", "vip_announced"), after=n)]
        assert moves == [("vip_withdrawn", "web6", "config"),
                         ("vip_announced", "web6", "config")]
        assert len(d.events("config_rejected", after=n)) == 1
        assert {v["name"] for v in d.stats()["vips"]} == {"web", "echo", "web6", "h3"}
    finally:
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(10)
