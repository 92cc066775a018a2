"""`xdplb doctor`: each check on a namespace lab, broken on purpose and then mended (what
the lab cannot break, the node's sysctl, clock or kernel, is pointed at a stand-in)."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys

import pytest

from lb import doctor, doctornode, hostchecks, linkchecks
from lb.config import load_config
from lb.lab import netns, topology
from lb.lab.decap import attach_pass, load_decap
from lb.lab.instance import RunFiles

import daemonctl

LAB = topology.Lab(prefix="xd-")
FILES = RunFiles("doctor")
NO_HEALTH = {"type": "none"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("doctor")
    FILES.clean()
    LAB.up()
    lbns = netns.Netns(LAB.lb, create=False, owned=False)
    try:
        yield tmp, lbns, netns.Netns(LAB.sw, create=False, owned=False)
    finally:
        LAB.down()
        FILES.clean()


def config(tmp, interface="lb0", backend="10.200.0.12", **settings):
    path = tmp / "lb.toml"
    text = daemonctl.lab_config(FILES, ("10.200.0.11", backend), NO_HEALTH, interface,
                                **settings)
    if "bpf_pin_path" in settings:  # lb_table adds its own pin path last: drop that one
        text = text.replace(f'bpf_pin_path = "{FILES.pin}"\n', "")
    path.write_text(text)
    return load_config(str(path))


def findings(ns, cfg, check, **node):
    """check's findings as {name: (status, detail)}, run inside ns."""
    got = ns.run(check, doctornode.Node(cfg, **node))
    return {f.check: (f.status, f.detail) for f in got}


def status(ns, cfg, check, name, **node):
    return findings(ns, cfg, check, **node)[name][0]


def test_xdp_mode(lab):
    tmp, lbns, swns = lab
    assert status(lbns, config(tmp), linkchecks.check_xdp_mode, "xdp mode") == "ok"
    # a bridge has no native XDP
    got = findings(swns, config(tmp, interface="br0"), linkchecks.check_xdp_mode)
    assert got["xdp mode"][0] == "warn" and "bridge" in got["xdp mode"][1]
    with load_decap() as skel:
        lbns.xdp_attach("lb0", skel.prog_fd("xdp_pass"), "generic")
    try:
        got = findings(lbns, config(tmp), linkchecks.check_xdp_mode)
        assert got["xdp mode"][0] == "warn" and "generic" in got["xdp mode"][1]
    finally:
        lbns.xdp_detach("lb0", "generic")


def test_offloads(lab):
    tmp, lbns, _ = lab
    assert status(lbns, config(tmp), linkchecks.check_offloads, "lro/gro-hw") == "ok"

    @dataclasses.dataclass
    class LroNode(doctornode.Node):  # veth cannot turn LRO on: a NIC that has it
        def offloads(self, ifname):
            return {**super().offloads(ifname), "rx-lro": True}
    got = lbns.run(linkchecks.check_offloads, LroNode(config(tmp)))
    assert got[0].status == "fail" and "ethtool -K lb0 lro off" in got[0].detail


def test_mtu_and_veth_peer(lab):
    tmp, lbns, swns = lab
    # one-armed: encapsulated full-size packets cannot leave by the same 1500 MTU
    got = findings(lbns, config(tmp), linkchecks.check_mtu)
    assert got["mtu"][0] == "warn" and "1520" in got["mtu"][1]
    netns.add_veth("dx0", lbns, "dx1", lbns, mtu=1540)
    try:
        cfg = config(tmp, egress_interface="dx0")
        assert status(lbns, cfg, linkchecks.check_mtu, "mtu") == "ok"
        # XDP_REDIRECT into dx0 is dropped while dx1 has no program
        got = findings(lbns, cfg, linkchecks.check_veth_peer)
        assert got["veth peer xdp"][0] == "fail" and "dx1" in got["veth peer xdp"][1]
        attach_pass(lbns, "dx1")
        assert status(lbns, cfg, linkchecks.check_veth_peer, "veth peer xdp") == "ok"
    finally:
        lbns.delete_link("dx0")
    # lb0's peer lives in the switch namespace and has xdp_pass (lab); take it away
    assert status(lbns, config(tmp), linkchecks.check_veth_peer, "veth peer xdp") == "ok"
    swns.xdp_detach("sw-lb0")
    try:
        got = findings(lbns, config(tmp), linkchecks.check_veth_peer)
        assert got["veth peer xdp"][0] == "fail" and "netns xd-sw" in got["veth peer xdp"][1]
    finally:
        attach_pass(swns, "sw-lb0")


def test_veth_tx_checksum(lab):
    tmp, lbns, swns = lab
    swns.set_tx_checksum("sw-lb0", True)
    got = findings(lbns, config(tmp), linkchecks.check_veth_checksum)
    assert got["veth tx checksum"][0] == "warn" and "sw-lb0 tx off" in got["veth tx checksum"][1]
    swns.set_tx_checksum("sw-lb0", False)
    assert status(lbns, config(tmp), linkchecks.check_veth_checksum, "veth tx checksum") == "ok"


def test_rx_queues(lab):
    tmp, lbns, _ = lab
    got = findings(lbns, config(tmp), linkchecks.check_rx_queues, cpus=4)  # lb0: one queue
    assert got["rx queues"][0] == "warn" and "combined 4" in got["rx queues"][1]
    assert got["rss l4 hash"][0] == "ok"  # veth: nothing to configure
    netns.add_veth("dq0", lbns, "dq1", lbns, queues=4)
    try:
        assert status(lbns, config(tmp, interface="dq0"), linkchecks.check_rx_queues,
                      "rx queues", cpus=4) == "ok"
    finally:
        lbns.delete_link("dq0")


def test_bpffs_and_pin_path(lab):
    tmp, lbns, _ = lab
    cfg = config(tmp)
    assert status(lbns, cfg, hostchecks.check_bpffs, "bpffs") == "ok"
    assert status(lbns, cfg, hostchecks.check_pin_path, "pin path") == "ok"
    got = findings(lbns, config(tmp, bpf_pin_path=str(tmp / "pins")), hostchecks.check_bpffs)
    assert got["bpffs"][0] == "fail" and "mount -t bpf" in got["bpffs"][1]
    os.mkdir(FILES.pin)
    try:
        os.chmod(FILES.pin, 0o777)
        got = findings(lbns, cfg, hostchecks.check_pin_path)
        assert got["pin path"][0] == "fail" and "chmod 0700" in got["pin path"][1]
        os.chmod(FILES.pin, 0o700)
        assert status(lbns, cfg, hostchecks.check_pin_path, "pin path") == "ok"
    finally:
        os.rmdir(FILES.pin)


def test_jit_clock_memlock(lab, tmp_path):
    tmp, lbns, _ = lab
    cfg = config(tmp)
    off = tmp_path / "jit"
    off.write_text("0\n")
    assert status(lbns, cfg, hostchecks.check_jit, "bpf jit", jit_path=str(off)) == "fail"
    # the sysctl exists in the initial network namespace only: read it from the test's
    assert hostchecks.check_jit(doctornode.Node(cfg))[0].status == "ok"
    assert status(lbns, cfg, hostchecks.check_clock, "clock", adjtimex=lambda: 5) == "warn"
    assert status(lbns, cfg, hostchecks.check_clock, "clock", adjtimex=lambda: 0) == "ok"
    old = dict(kernel="5.10.0", memlock=lambda: 64 << 10)
    assert status(lbns, cfg, hostchecks.check_memlock, "memlock", **old) == "fail"
    assert status(lbns, cfg, hostchecks.check_memlock, "memlock") == "ok"


def test_nexthops(lab):
    tmp, lbns, _ = lab
    assert status(lbns, config(tmp), hostchecks.check_nexthops, "next hops") == "ok"
    got = findings(lbns, config(tmp, backend="10.200.0.99"), hostchecks.check_nexthops)
    assert got["next hops"][0] == "fail" and "10.200.0.99" in got["next hops"][1]


def test_cli_table_and_exit(lab):
    tmp, lbns, _ = lab
    path = str(tmp / "cli.toml")
    cfg_text = daemonctl.lab_config(FILES, ("10.200.0.11", "10.200.0.99"), NO_HEALTH)
    open(path, "w").write(cfg_text)
    r = subprocess.run(["nsenter", f"--net=/run/netns/{LAB.lb}", "--", sys.executable, "-m",
                        "lb.cli", "doctor", "--config", path], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert any(line.startswith("next hops") and " fail " in line
               for line in r.stdout.splitlines()), r.stdout
    assert len(r.stdout.splitlines()) >= len(doctor.CHECKS)
    open(path, "w").write(cfg_text.replace("10.200.0.99", "10.200.0.12"))
    r = subprocess.run(["nsenter", f"--net=/run/netns/{LAB.lb}", "--", sys.executable, "-m",
                        "lb.cli", "doctor", "--config", path], capture_output=True, text=True,
                       timeout=60)
    assert " fail " not in r.stdout and r.returncode == 0, r.stdout


def test_announce_table(lab):
    tmp, lbns, _ = lab
    assert status(lbns, config(tmp), hostchecks.check_announce, "announce") == "ok"
    path = tmp / "lb.toml"
    path.write_text(path.read_text() + "\n[announce]\ntable = 200\n")
    cfg = load_config(str(path))
    assert status(lbns, cfg, hostchecks.check_announce, "announce") == "ok"
    with lbns.ipr() as ipr:
        ipr.rule("add", table=200, priority=1000, family=socket.AF_INET6)
        ipr.route("add", dst="10.200.1.10/32", table=200, proto=4, type="blackhole")
    try:
        got = [f for f in lbns.run(hostchecks.check_announce, doctornode.Node(cfg))]
        assert [f.status for f in got] == ["fail", "warn"], got
        assert "ip rule" in got[0].detail and "10.200.1.10" in got[1].detail
    finally:
        with lbns.ipr() as ipr:
            ipr.rule("del", table=200, priority=1000, family=socket.AF_INET6)
            ipr.route("del", dst="10.200.1.10/32", table=200, proto=4, type="blackhole")
    assert status(lbns, cfg, hostchecks.check_announce, "announce") == "ok"
