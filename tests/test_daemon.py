"""The real daemon in the lab: stats, explain, admin state, SIGHUP (good and broken),
SIGKILL and restart with adoption of pinned maps."""

from __future__ import annotations

import collections
import functools
import json
import os
import re
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb import flowtable, layout
from lb.config import LbSection
from lb.datapath import MAP_NAMES
from lb.lab import namespaces, netns, topology
from lb.lab.instance import Instance, RunFiles
from lb.native import Map

import daemonctl
import traffic

LAB = topology.Lab(prefix="xt-")
FILES = RunFiles("test")
PIN, STATE = FILES.pin, FILES.state


def _config(tmp_path, web_backends=("10.200.0.11", "10.200.0.12", "10.200.0.13"),
            extra="", name: str = "lb.toml") -> str:
    """The lab config for this test; write it under another `name` and os.replace() it
    over the running one, as an operator should (the daemon may read at any moment)."""
    text = open("config/lab.toml").read()
    text = text.replace('bpf_pin_path = "/sys/fs/bpf/xdplb-lab"', f'bpf_pin_path = "{PIN}"')
    text = text.replace('control_socket = "/run/xdplb/lab.sock"', f'control_socket = "{FILES.sock}"')
    text = text.replace('state_file = "/run/xdplb/lab-state.json"', f'state_file = "{STATE}"')
    text = text.replace('log_format = "console"',
                        'log_format = "json"\nmetrics_listen = "127.0.0.1:19733"')
    web = "".join(f'[[vip.backend]]\naddress = "{a}"\n' for a in web_backends)
    text = re.sub(r'(name = "web"\n.*?protocol = "tcp"\n)(\[\[vip.backend\]\]\naddress = "[^"]+"\n)+',
                  lambda m: m.group(1) + web, text, count=1, flags=re.S)
    path = tmp_path / name
    path.write_text(text + extra)
    return str(path)


SPAWNED: list[Instance] = []
cli, stats = daemonctl.cli, daemonctl.stats


def Daemon(config: str, log: str) -> Instance:
    d = Instance(LAB.lb, config, log)
    SPAWNED.append(d)
    return d


def states(doc: dict, vip: str) -> dict[str, str]:
    v = next(v for v in doc["vips"] if v["name"] == vip)
    return {b["address"]: b["state"] for b in v["backends"]}


def wait_all_active(config: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            d = stats(config)
            if all(s == "active" for v in d["vips"] for s in states(d, v["name"]).values()):
                return
        except (AssertionError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError("backends never became active")


def http(n: int, host: str = topology.VIP4) -> tuple[collections.Counter, int]:
    return LAB.client_http(host, n)


udp_from_ports = functools.partial(traffic.udp_from_ports, LAB)


def expected_ring(addresses: list[str]) -> list[str]:
    return daemonctl.expected_ring(addresses, 65537)


def restore_config(tmp, cfg: str, d: Instance) -> None:
    """Back to the fixture's config, reloaded, every backend active."""
    os.replace(_config(tmp, name="next.toml"), cfg)
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    d.wait("config_reloaded", after=n)
    wait_all_active(cfg)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("daemon")
    FILES.clean()
    LAB.up()
    cfg = _config(tmp)
    d = Daemon(cfg, str(tmp / "daemon.log"))
    try:
        d.wait("datapath_attached")
        wait_all_active(cfg)
        yield tmp, cfg, d
    finally:
        for p in SPAWNED:
            p.stop()
        LAB.down()
        FILES.clean()  # a daemon killed with SIGKILL leaves the program's pins behind


def test_stats_shape_and_counts(env):
    tmp, cfg, d = env
    before = stats(cfg)
    got, failed = http(30)
    assert failed == 0 and sum(got.values()) == 30
    after = stats(cfg)
    assert set(after) == {"vips", "global"}
    g = after["global"]
    for k in ("rx_packets", "tx", "redirect", "pass", "drop", "flow_hits", "flow_misses"):
        assert isinstance(g[k], int)
    assert set(g["drops"]) >= {"no_backend", "malformed"}
    web = next(v for v in after["vips"] if v["name"] == "web")
    assert {"name", "address", "port", "protocol", "packets", "bytes", "backends"} <= set(web)
    for b in web["backends"]:
        assert {"address", "state", "healthy", "weight", "packets", "bytes"} <= set(b)
    web0 = next(v for v in before["vips"] if v["name"] == "web")
    # each connection: SYN, ACK, request, FIN/ACKs from the client side (>= 4 packets)
    assert web["packets"] - web0["packets"] >= 4 * 30
    assert sum(b["packets"] for b in web["backends"]) - sum(
        b["packets"] for b in web0["backends"]) == web["packets"] - web0["packets"]
    assert g["tx"] - before["global"]["tx"] >= 4 * 30


def test_without_announce_nothing_is_announced(env):
    """No [announce]: no "announced" in stats; `announce status` says so, withdraw and
    restore refuse with one line (exit 1) and write nothing."""
    tmp, cfg, d = env
    assert all("announced" not in v for v in stats(cfg)["vips"])
    r = cli("announce", "status", "--config", cfg)
    assert r.returncode == 0 and "not configured" in r.stdout, r.stderr
    for action in ("withdraw", "restore"):
        r = cli("announce", action, "--config", cfg)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "no [announce] in" in r.stderr
    if os.path.exists(STATE):
        assert "announce_withdrawn" not in open(STATE).read()


def test_explain_agrees_with_datapath(env):
    tmp, cfg, d = env
    ports = list(range(41000, 41060))
    seen = udp_from_ports(ports)
    names = LAB.name_of()
    for p in ports:
        r = cli("explain", "--config", cfg, "udp", "10.200.0.1", str(p), topology.VIP4,
                str(topology.UDP_PORT))
        assert r.returncode == 0, r.stderr
        backend = re.search(r"backend (\S+)", r.stdout).group(1)
        assert names[backend] == seen[p], (p, r.stdout)
    r = cli("explain", "--config", cfg, "udp", "10.200.0.1", "1", "10.200.9.9", "53")
    assert r.returncode == 1 and "not a VIP" in r.stderr


def test_admin_state_survives_reload(env):
    tmp, cfg, d = env
    r = cli("backend", "drain", "web", "10.200.0.11", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert states(stats(cfg), "web")["10.200.0.11"] == "drain"
    assert json.load(open(STATE))["backends"] == [
        {"vip": "web", "backend": "10.200.0.11", "state": "drain"}]
    got, _ = http(30)
    assert got.get("xt-be1", 0) == 0
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    d.wait("config_reloaded", after=n)
    assert states(stats(cfg), "web")["10.200.0.11"] == "drain"
    assert cli("backend", "drain", "web", "10.9.9.9", "--config", cfg).returncode == 1
    assert cli("backend", "activate", "web", "10.200.0.11", "--config", cfg).returncode == 0
    assert states(stats(cfg), "web")["10.200.0.11"] == "active"


def test_reload_changes_only_expected_slots(env):
    tmp, cfg, d = env
    all3 = ["10.200.0.11", "10.200.0.12", "10.200.0.13"]
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6) == expected_ring(all3)
    udp_before = daemonctl.pinned_ring(PIN, topology.VIP4, topology.UDP_PORT, 17)

    # remove one backend: the ring equals the reference for the two others, and only
    # slots of the removed backend (plus Maglev's small extra) moved
    os.replace(_config(tmp, web_backends=all3[:2], name="next.toml"), cfg)
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    ev = d.wait("config_reloaded", after=n)
    assert ev["backends_removed"] == 1 and ev["rings_swapped"] == 1
    after = daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6)
    assert after == expected_ring(all3[:2])
    # the other VIP is untouched
    assert daemonctl.pinned_ring(PIN, topology.VIP4, topology.UDP_PORT, 17) == udp_before

    # a broken config changes nothing
    good = open(cfg).read()
    open(cfg, "w").write(good + "\n[[vip]]\nname = 1\n")
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    ev = d.wait("config_rejected", after=n)
    assert "name" in ev["error"]
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6) == after
    got, failed = http(20)
    assert failed == 0 and got.get("xt-be3", 0) == 0

    # add it back
    os.replace(_config(tmp, name="next.toml"), cfg)
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    ev = d.wait("config_reloaded", after=n)
    assert ev["backends_added"] == 1
    # a backend new to the VIP starts down: no slots until it passes `rise` checks
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6) == expected_ring(all3[:2])
    wait_all_active(cfg)
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6) == expected_ring(all3)


def test_sigkill_keeps_forwarding_and_restart_adopts(env):
    tmp, cfg, d = env
    http(10)
    with flowtable.pinned(f"{PIN}/flows") as flows:
        before = flows.keys()
    assert before
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    got, failed = http(20)  # no daemon: the attached program still forwards
    assert failed == 0 and sum(got.values()) == 20
    n = d.mark()
    d2 = Daemon(cfg, d.logpath)
    ev = d2.wait("datapath_attached", after=n)
    assert ev["adopted_maps"] == len(MAP_NAMES) and ev["adopted_vips"] == 4
    with flowtable.pinned(f"{PIN}/flows") as flows:
        assert before <= flows.keys()
    d.proc = d2.proc
    wait_all_active(cfg)
    got, failed = http(20)
    assert failed == 0


def test_prometheus_metrics(env):
    tmp, cfg, d = env
    http(5)

    def scrape():
        import urllib.request
        return urllib.request.urlopen("http://127.0.0.1:19733/metrics", timeout=5).read()
    text = namespaces.run_in(LAB.lb, scrape).decode()
    assert '# TYPE xdplb_packets_total counter' in text
    # label order is the exposition library's (sorted): compare parsed samples
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}

    def sample(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))))
    assert sample("xdplb_vip_packets_total", vip="web", address="10.200.1.10", port="80",
                  protocol="tcp") > 0
    assert sample("xdplb_backend_healthy", vip="web", backend="10.200.0.11") == 1
    assert sample("xdplb_drops_total", reason="no_backend") is not None


def test_nexthop_mac_change_is_followed(env):
    """A next hop's MAC changes (as when a gateway is replaced): within seconds the
    nexthops map carries the new one, and back again."""
    tmp, cfg, d = env
    lbns = netns.Netns(LAB.lb, create=False, owned=False)
    real = netns.Netns(LAB.backends[1], create=False, owned=False).mac("eth0")
    fake = bytes.fromhex("02aabbccddee")

    def macs() -> set[bytes]:
        with Map.from_pin(f"{PIN}/nexthops") as m:
            return {bytes(layout.Nexthop.unpack(v).dmac) for _, v in m.items()}

    def wait_for(mac: bytes) -> float:
        t0 = time.monotonic()
        while mac not in macs():
            assert time.monotonic() - t0 < 10, f"{mac.hex()} never reached the nexthops map"
            time.sleep(0.05)
        return time.monotonic() - t0

    assert real in macs()
    lbns.add_neighbor("lb0", "10.200.0.12", fake)
    try:
        assert wait_for(fake) < 10
    finally:
        lbns.add_neighbor("lb0", "10.200.0.12", real)
    wait_for(real)
    got, failed = http(20)
    assert failed == 0


def test_keep_datapath_on_exit(env):
    """keep_datapath_on_exit = true: SIGTERM leaves the program attached, forwarding and
    pinned; the next start adopts it."""
    tmp, cfg, d = env
    text = open(cfg).read().replace("[lb]\n", "[lb]\nkeep_datapath_on_exit = true\n", 1)
    open(cfg, "w").write(text)
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    d.wait("config_reloaded", after=n)
    n = d.mark()
    d.stop()
    assert d.events("stopped", after=n)[0]["datapath_kept"] is True
    lbns = netns.Netns(LAB.lb, create=False, owned=False)
    assert lbns.xdp_query("lb0")["prog_id"] != 0
    assert os.path.exists(f"{PIN}/prog") and os.path.exists(f"{PIN}/flows")
    got, failed = http(10)
    assert failed == 0 and sum(got.values()) == 10
    n = d.mark()
    d2 = Daemon(cfg, d.logpath)
    ev = d2.wait("datapath_attached", after=n)
    assert ev["adopted_maps"] == len(MAP_NAMES)
    d.proc = d2.proc
    wait_all_active(cfg)


def test_burst_of_sighups_ends_on_the_last_file(env):
    """Five SIGHUPs in a row, the file changing in between: reloads run in order and the
    rings end as the last file says. (Pending SIGHUPs coalesce, so there may be fewer
    than five reloads; whichever run last must have read the last file.)"""
    tmp, cfg, d = env
    all3 = ["10.200.0.11", "10.200.0.12", "10.200.0.13"]
    n = d.mark()
    for web in (all3[:2], all3[:1], all3[:2], all3[1:], all3[:2]):
        os.replace(_config(tmp, web_backends=web, name="next.toml"), cfg)
        d.proc.send_signal(signal.SIGHUP)
    deadline, seen, quiet_since = time.monotonic() + 30, -1, time.monotonic()
    while time.monotonic() - quiet_since < 1.0:  # until reloads stop for a second
        assert time.monotonic() < deadline, d.tail()
        now = len(d.events("config_reloaded", after=n))
        if now != seen:
            seen, quiet_since = now, time.monotonic()
        time.sleep(0.05)
    assert seen >= 1
    assert not d.events("config_rejected", after=n)
    wait_all_active(cfg)  # backends the burst re-added pass their checks first
    assert daemonctl.pinned_ring(PIN, topology.VIP4, 80, 6) == expected_ring(all3[:2])
    restore_config(tmp, cfg, d)


@pytest.mark.parametrize("key, limits", [("flow_insert_limit", (125000, 0)),
                                         ("too_big_per_sec", (0, 7, 1000))])
def test_per_cpu_limit_reaches_the_datapath_on_sighup(env, key, limits):
    """lb.flow_insert_limit and lb.too_big_per_sec are in the data path from the start
    and applied by SIGHUP (the per-CPU limits live in `config`)."""
    import ctypes

    tmp, cfg, d = env

    def pinned_limit() -> int:
        with Map.from_pin(os.path.join(PIN, "config")) as m:
            return getattr(layout.LbConfig.unpack(m.lookup(ctypes.c_uint32(0))), key)

    assert pinned_limit() == getattr(LbSection, key)  # the default
    for limit in limits:
        text = open(_config(tmp, name="next.toml")).read().replace(
            "[lb]\n", f"[lb]\n{key} = {limit}\n", 1)
        (tmp / "next.toml").write_text(text)
        os.replace(tmp / "next.toml", cfg)
        n = d.mark()
        d.proc.send_signal(signal.SIGHUP)
        d.wait("config_reloaded", after=n)
        assert pinned_limit() == limit
    got, failed = http(20)
    assert failed == 0


def test_unresolved_nexthop_is_shown_and_logged_once(env):
    """Backends whose next hop never resolves (no host answers ARP at .99, no route to the
    IPv6 one) show "nexthop": "unresolved" and xdplb_backend_nexthop_resolved 0, and each
    logs nexthop_unresolved once, not once per retry (issue 12, finding 10)."""
    tmp, cfg, d = env
    dead = ["10.200.0.99", "fd00:dead::1"]
    all3 = ["10.200.0.11", "10.200.0.12", "10.200.0.13"]
    n = d.mark()
    os.replace(_config(tmp, web_backends=all3 + dead, name="next.toml"), cfg)
    d.proc.send_signal(signal.SIGHUP)
    d.wait("config_reloaded", after=n)
    for addr in dead:
        d.wait("nexthop_unresolved", after=n, backend=addr, timeout=10)
    time.sleep(2.5)  # ~12 more retries at the 0.2 s retry interval
    web = next(v for v in stats(cfg)["vips"] if v["name"] == "web")
    hops = {b["address"]: b["nexthop"] for b in web["backends"]}
    assert hops == {**{a: "resolved" for a in all3}, **{a: "unresolved" for a in dead}}
    for addr in dead:
        assert len(d.events("nexthop_unresolved", after=n, backend=addr)) == 1
    assert not d.events(("nexthop_unroutable", "nexthop_refresh_failed"), after=n)
    import urllib.request
    text = namespaces.run_in(LAB.lb, lambda: urllib.request.urlopen(
        "http://127.0.0.1:19733/metrics", timeout=5).read()).decode()
    samples = {(s.labels["backend"]): s.value
               for f in text_string_to_metric_families(text) if f.name ==
               "xdplb_backend_nexthop_resolved" for s in f.samples
               if s.labels["vip"] == "web"}
    assert samples == {**{a: 1 for a in all3}, **{a: 0 for a in dead}}, samples
    restore_config(tmp, cfg, d)


def _pinned_config() -> layout.LbConfig:
    import ctypes
    with Map.from_pin(os.path.join(PIN, "config")) as m:
        return layout.LbConfig.unpack(m.lookup(ctypes.c_uint32(0)))


def test_interface_mtu_change_reaches_the_egress_config(env):
    """An MTU change of the interface is followed by netlink (issue 12, finding 8)."""
    tmp, cfg, d = env
    for mtu in (1400, 1500):
        n = d.mark()
        subprocess.run(["ip", "-n", LAB.lb, "link", "set", "lb0", "mtu", str(mtu)], check=True)
        d.wait("interface_changed", after=n, mtu=mtu)
        assert _pinned_config().mtu == mtu


def test_reload_rereads_state_file_and_names_keys_needing_restart(env):
    """SIGHUP reads state_file anew, and says which changed keys wait for a restart
    (metrics_listen, log_format) instead of ignoring them silently (issue 12, finding 8)."""
    tmp, cfg, d = env
    with open(STATE, "w") as f:  # an operator's edit, e.g. restored from a backup
        json.dump({"backends": [{"vip": "web", "backend": "10.200.0.12",
                                 "state": "maint"}]}, f)
    text = open(_config(tmp, name="next.toml")).read().replace(
        'metrics_listen = "127.0.0.1:19733"', 'metrics_listen = "127.0.0.1:19734"')
    (tmp / "next.toml").write_text(text)
    os.replace(tmp / "next.toml", cfg)
    n = d.mark()
    d.proc.send_signal(signal.SIGHUP)
    d.wait("config_reloaded", after=n)
    assert d.wait("config_needs_restart", after=n)["keys"] == ["lb.metrics_listen"]
    assert states(stats(cfg), "web")["10.200.0.12"] == "maint"
    assert cli("backend", "activate", "web", "10.200.0.12", "--config", cfg).returncode == 0
    restore_config(tmp, cfg, d)


def test_interface_deleted_and_recreated_gets_the_program_again(env):
    """Delete the LB's veth and create it again under the same name: one
    interface_missing while it is gone (no stream of warnings), then
    datapath_reattached, and VIP traffic works again (issue 12, finding 5). Last in this
    file: the lab's lb0 is a new interface afterwards."""
    tmp, cfg, d = env
    n = d.mark()
    subprocess.run(["ip", "-n", LAB.lb, "link", "del", "lb0"], check=True)
    d.wait("interface_missing", after=n, interface="lb0")
    time.sleep(2.0)  # ten retries of the next-hop refresh
    assert len(d.events("interface_missing", after=n)) == 1
    assert not d.events(("nexthop_refresh_failed", "nexthop_unroutable"), after=n)
    for e in d.events("nexthop_unresolved", after=n):  # at most once per backend
        assert len(d.events("nexthop_unresolved", after=n, backend=e["backend"])) == 1
    LAB.plug_lb0()
    d.wait("datapath_reattached", after=n, interface="lb0")
    deadline = time.monotonic() + 15
    while True:
        got, failed = http(20)
        if failed == 0:
            break
        assert time.monotonic() < deadline, (got, failed, d.tail())
        time.sleep(0.2)
    assert sum(got.values()) == 20
