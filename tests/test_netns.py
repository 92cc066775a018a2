"""lb/lab/netns.py: namespaces, veths, addresses, routes, sysctls, offloads, XDP attachment
and running code inside a namespace, on real namespaces this test creates."""

from __future__ import annotations

import errno
import os
import socket
import subprocess

import pytest

from lb.lab import namespaces, netns
from lb.lab.decap import load_decap


@pytest.fixture
def pair():
    a = netns.Netns(namespaces.unique_name("xta"))
    b = netns.Netns(namespaces.unique_name("xtb"))
    try:
        yield a, b
    finally:
        a.remove()
        b.remove()


def test_create_remove_idempotent():
    name = namespaces.unique_name("xtc")
    try:
        assert namespaces.create(name) is True
        assert namespaces.create(name) is False
        assert namespaces.exists(name) and name in namespaces.list_namespaces()
        assert netns.Netns(name, create=False).links() == ["lo"]
    finally:
        assert namespaces.remove(name) is True
    assert namespaces.remove(name) is False
    assert not namespaces.exists(name) and not os.path.exists(namespaces.ns_path(name))


def test_context_manager_owned_and_not():
    with netns.Netns(namespaces.unique_name("xtd")) as ns:
        assert namespaces.exists(ns.name)
    assert not namespaces.exists(ns.name)
    keep = netns.Netns(namespaces.unique_name("xte"), owned=False)
    with keep:
        pass
    try:
        assert namespaces.exists(keep.name)
    finally:
        namespaces.remove(keep.name)


def test_veth_addresses_routes_and_traffic(pair):
    a, b = pair
    ia, ib = netns.add_veth("va", a, "vb", b, mac_a=b"\x02\0\0\0\0\x0a", mac_b="02:00:00:00:00:0b",
                        mtu=1400)
    assert ia == a.ifindex("va") and ib == b.ifindex("vb")
    assert a.mac("va") == b"\x02\0\0\0\0\x0a" and b.mac("vb") == b"\x02\0\0\0\0\x0b"
    with a.ipr() as ipr:
        assert ipr.get_links(ia)[0].get_attr("IFLA_MTU") == 1400
    a.set_link("va", mtu=1500, mac=b"\x02\0\0\0\0\x0c")
    assert a.mac("va") == b"\x02\0\0\0\0\x0c"
    a.add_address("va", "10.77.0.1/24")
    a.add_address("va", "10.77.0.1/24")  # again: not an error
    a.add_address("va", "fd77::1/64")
    b.add_address("vb", "10.77.0.2/24")
    b.add_address("vb", "fd77::2/64")
    a.add_address("lo", "10.78.0.1/32")
    a.add_address("lo", "fd78::1/128")
    b.add_route("10.78.0.0/24", via="10.77.0.1")
    b.add_route("default", via="fd77::1")
    b.add_neighbor("vb", "10.77.0.1", b"\x02\0\0\0\0\x0c")
    a.relaxed(["va"])
    for fam, dst in ((socket.AF_INET, "10.78.0.1"), (socket.AF_INET6, "fd78::1")):
        srv = a.socket(fam)
        srv.bind((dst, 9000))
        srv.settimeout(5)

        def send(fam=fam, dst=dst):
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.sendto(b"hello", (dst, 9000))
                return s.getsockname()[1]

        sport = b.run(send)
        data, frm = srv.recvfrom(100)
        srv.close()
        assert data == b"hello" and frm[1] == sport
        assert frm[0] == ("10.77.0.2" if fam == socket.AF_INET else "fd77::2")
    routes = b.check_output(["ip", "route"])
    assert "10.78.0.0/24 via 10.77.0.1" in routes
    assert "default via fd77::1" in b.check_output(["ip", "-6", "route"])
    assert "PERMANENT" in b.check_output(["ip", "neigh", "show", "10.77.0.1"])


def test_veth_to_callers_namespace(pair):
    a, _ = pair
    name = f"xtr{os.getpid() % 100000}"
    try:
        ia, ir = netns.add_veth("vx", a, name, None)
        assert os.path.exists(f"/sys/class/net/{name}")
        with open(f"/sys/class/net/{name}/ifindex") as f:
            assert int(f.read()) == ir
    finally:
        subprocess.run(["ip", "link", "del", name], stderr=subprocess.DEVNULL)


def test_bridge_and_master(pair):
    a, b = pair
    a.add_bridge("br0")
    netns.add_veth("p0", a, "q0", b)
    a.set_link("p0", master="br0", up=True)
    assert "master br0" in a.check_output(["ip", "link", "show", "p0"])


def test_sysctl_is_per_namespace(pair):
    a, b = pair
    a.router()
    assert a.sysctl_get("net.ipv4.ip_forward") == "1"
    assert a.sysctl_get("net.ipv6.conf.all.forwarding") == "1"
    assert a.sysctl_get("net.ipv4.conf.all.rp_filter") == "0"
    assert b.sysctl_get("net.ipv4.ip_forward") == "0"
    netns.add_veth("s0", b, "s1", a)
    b.sysctl("net/ipv4/conf/s0/accept_local", 1)
    assert b.sysctl_get("net.ipv4.conf.s0.accept_local") == "1"


def test_tx_checksum_toggle(pair):
    a, b = pair
    netns.add_veth("t0", a, "t1", b)
    assert a.tx_checksum("t0") is True
    a.set_tx_checksum("t0", False)
    assert a.tx_checksum("t0") is False
    assert "tx-checksumming: off" in a.check_output(["ethtool", "-k", "t0"])
    assert b.tx_checksum("t1") is True


def test_run_returns_and_raises(pair):
    a, _ = pair
    here = os.readlink("/proc/self/ns/net")
    there = a.run(os.readlink, "/proc/self/ns/net")
    assert there != here and there == a.run(lambda: os.readlink("/proc/thread-self/ns/net"))
    assert os.readlink("/proc/thread-self/ns/net") == here  # we never moved
    with pytest.raises(ZeroDivisionError):
        a.run(lambda: 1 / 0)
    with pytest.raises(namespaces.NetnsError) as e:
        a.run(lambda: socket.socket())  # unpicklable result
    assert "netns" in str(e.value)
    with pytest.raises(namespaces.NetnsError) as e:
        a.run(lambda: __import__("time").sleep(10), timeout=0.3)
    assert e.value.errno == errno.ETIMEDOUT


def test_spawn_sees_bpffs(pair):
    a, _ = pair
    p = a.spawn(["sh", "-c", "readlink /proc/self/ns/net; mountpoint -q /sys/fs/bpf && echo bpf"],
                stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=10)
    assert out.split() == [a.run(os.readlink, "/proc/self/ns/net"), "bpf"]


def test_entered_restores_on_error(pair):
    a, _ = pair
    here = os.readlink("/proc/thread-self/ns/net")
    with pytest.raises(RuntimeError):
        with a.entered():
            assert os.readlink("/proc/thread-self/ns/net") != here
            raise RuntimeError("boom")
    assert os.readlink("/proc/thread-self/ns/net") == here


def test_errors_name_what_failed(pair):
    a, _ = pair
    with pytest.raises(namespaces.NetnsError) as e:
        a.ifindex("nope0")
    assert e.value.errno == errno.ENODEV and "nope0" in str(e.value) and a.name in str(e.value)
    with pytest.raises(namespaces.NetnsError) as e:
        a.add_route("10.1.0.0/16", via="10.99.99.99")  # gateway unreachable
    assert e.value.errno == errno.ENETUNREACH and "10.1.0.0/16" in str(e.value)
    with pytest.raises(namespaces.NetnsError) as e:
        netns.Netns(namespaces.unique_name("xtz"), create=False).links()
    assert e.value.errno == errno.ENOENT
    with pytest.raises(namespaces.NetnsError) as e:
        a.sysctl("net.ipv4.no_such_knob", 1)
    assert e.value.errno == errno.ENOENT


def test_xdp_attach_inside_namespace(pair):
    a, b = pair
    netns.add_veth("x0", a, "x1", b)
    with load_decap() as sk:
        fd = sk.prog_fd("xdp_pass")
        idx = a.xdp_attach("x0", fd, "native")
        assert idx == a.ifindex("x0")
        q = a.xdp_query("x0")
        assert q["drv"] and not q["skb"]
        a.xdp_detach("x0", "native")
        assert a.xdp_query("x0")["drv"] == 0
        b.xdp_attach("x1", fd, "generic")
        assert b.xdp_query("x1")["skb"]


def test_veth_queues(pair):
    """queues= gives both ends that many TX and RX queues (several CPUs sending at once)."""
    a, b = pair
    netns.add_veth("q0", a, "q1", b, queues=4, up=False)
    for ns, name in ((a, "q0"), (b, "q1")):
        out = ns.check_output(["ip", "-d", "link", "show", name])
        assert "numtxqueues 4 numrxqueues 4" in out and "state DOWN" in out
