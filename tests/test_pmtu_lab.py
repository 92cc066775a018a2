"""Path MTU discovery through xdplb, on the project's lab (namespaces, MTU 1500 on every
link, backends decapsulating with bpf/decap.bpf.c), for IPIP and GUE, IPv4 and IPv6:

* a 4,000-byte HTTP request and a 100 kB upload through a VIP complete: the client's
  full-size segments do not fit once encapsulated, xdplb answers them with ICMP
  "fragmentation needed" / "packet too big" from the VIP, the client's kernel lowers its
  path MTU to the VIP and sends smaller segments;
* an ICMP too-big quoting a VIP flow's reply (sent from the client's namespace, as a router
  on the way back would) reaches the backend that owns the flow, whose kernel then holds
  the lower MTU in its route cache toward the client; the other backends never see it.
"""

from __future__ import annotations

import re
import socket
import struct
import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6

from lb.config import load_config
from lb.lab import namespaces, netns, topology
from lb.lab.instance import Instance, RunFiles

VIPS = {4: topology.VIP4, 6: topology.VIP6}
OVERHEAD = {("ipip", 4): 20, ("ipip", 6): 40, ("gue", 4): 28, ("gue", 6): 48}
LINK_MTU = 1500
ROUTER_MTU = 1300  # what the forged too-big says (>= 1280: IPv6 takes it)
WAIT = 20.0


@pytest.fixture(scope="module")
def lab():
    lab = topology.Lab(prefix="xm-", variant="tx")
    lab.up()
    try:
        yield lab
    finally:
        lab.down()


def render(lab: topology.Lab, files: RunFiles, encap: str) -> str:
    lb = load_config(topology.CONFIGS["tx"]).lb
    out = [files.lb_table(lb.interface, encap=encap, gue_port=topology.GUE_PORT,
                          ring_size=65537, flow_table_size=65536),
           "[health]", 'type = "http"', 'path = "/healthz"', "interval = 0.25",
           "timeout = 0.2", "rise = 1", "fall = 3"]
    hosts = lab.hosts()
    for fam, vip in VIPS.items():
        for name, port, proto in ((f"web{fam}", topology.HTTP_PORT, "tcp"),
                                  (f"echo{fam}", topology.UDP_PORT, "udp")):
            out += ["", "[[vip]]", f'name = "{name}"', f'address = "{vip}"', f"port = {port}",
                    f'protocol = "{proto}"']
            if proto == "udp":
                out += ["[vip.health]", f"port = {topology.HTTP_PORT}"]
            for be in lab.backends:
                addr = hosts[be].v6 if fam == 6 else hosts[be].v4
                out += ["[[vip.backend]]", f'address = "{addr}"']
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module", params=["ipip", "gue"])
def daemon(lab, request, tmp_path_factory):
    encap = request.param
    files = RunFiles(f"pmtu-{encap}")
    files.clean()
    tmp = tmp_path_factory.mktemp(f"pmtu-{encap}")
    cfg = tmp / "lb.toml"
    cfg.write_text(render(lab, files, encap))
    d = Instance(lab.lb, str(cfg), str(tmp / "daemon.log"))
    try:
        d.wait("datapath_attached", timeout=WAIT)
        d.wait_control(WAIT)
        d.wait_until(lambda: all(b["healthy"] and b["state"] == "active"
                                 for v in d.stats()["vips"] for b in v["backends"]),
                     "every backend up", WAIT)
        yield encap, d
    finally:
        d.stop()
        files.clean()


def flush_route_cache(ns: str) -> None:
    n = netns.Netns(ns, create=False, owned=False)
    n.check_output(["ip", "-4", "route", "flush", "cache"])
    n.check_output(["ip", "-6", "route", "flush", "cache"])


def route_mtu(ns: str, dst: str):
    """The MTU the kernel of `ns` has cached toward dst (a PMTU exception), or None."""
    out = netns.Netns(ns, create=False, owned=False).check_output(["ip", "route", "get", dst])
    m = re.search(r"\bmtu (\d+)", out)
    return int(m.group(1)) if m else None


def _http(vip: str, head_pad: int, body: bytes) -> bytes:
    """One HTTP request from here: headers padded by head_pad bytes, then body."""
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    head = (f"{'POST' if body else 'GET'} / HTTP/1.1\r\nHost: vip\r\n"
            f"X-Pad: {'p' * head_pad}\r\n"
            + (f"Content-Length: {len(body)}\r\n" if body else "") + "\r\n").encode()
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(15)
        s.connect((vip, topology.HTTP_PORT))
        s.sendall(head + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("fam", [4, 6])
def test_large_request_and_upload_through_the_vip(lab, daemon, fam):
    encap, d = daemon
    vip = VIPS[fam]
    # the backends' too: a lower MTU one of them still holds toward the client (from
    # test_too_big_reaches_the_flow_backend under the other encapsulation) lowers the MSS
    # it announces, and the client's segments then fit without any answer from us
    for ns in (lab.client, *lab.backends):
        flush_route_cache(ns)
    before = d.stats()["global"]["too_big_answered"]
    names = set(lab.backends)
    # a request of 4,000 bytes (headers), then an upload of 100 kB (body)
    resp = namespaces.run_in(lab.client, _http, vip, 4000 - 60, b"", timeout=60)
    assert resp.startswith(b"HTTP/1.1 200") and resp.split(b"\r\n\r\n", 1)[1].strip() in \
        {n.encode() for n in names}, resp[:200]
    body = bytes(range(256)) * 400  # 102,400 bytes
    resp = namespaces.run_in(lab.client, _http, vip, 10, body, timeout=60)
    name, length = resp.split(b"\r\n\r\n", 1)[1].split()
    assert name.decode() in names and int(length) == len(body), resp[:200]
    # the client learned the MTU that fits from our answers: they were sent, and a PMTU
    # exception still cached names that MTU (a full run once found the IPv6 one already
    # gone with both transfers done: its absence alone proves nothing)
    assert d.stats()["global"]["too_big_answered"] > before
    assert route_mtu(lab.client, vip) in (None, LINK_MTU - OVERHEAD[(encap, fam)])


def _udp_flow(vip: str) -> tuple[str, int]:
    """(backend name, client port) of one UDP echo exchange through the VIP."""
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 0))
        s.sendto(b"hello", (vip, topology.UDP_PORT))
        data, _ = s.recvfrom(2048)
        return data.split()[0].decode(), s.getsockname()[1]


def _send_too_big(vip: str, client: str, cport: int, mtu: int) -> None:
    """From here, an ICMP too-big to the VIP quoting its reply to client:cport, as a
    router between the backend and the client would send it."""
    if ":" in vip:
        quote = bytes(IPv6(src=vip, dst=client) / UDP(sport=topology.UDP_PORT, dport=cport) /
                      (b"x" * 1400))[:1232]
        msg = bytes(ICMPv6PacketTooBig(mtu=mtu))[:8]
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
            s.sendto(msg[:2] + b"\0\0" + msg[4:] + quote, (vip, 0))  # kernel sums it
    else:
        quote = bytes(IP(src=vip, dst=client, flags="DF") /
                      UDP(sport=topology.UDP_PORT, dport=cport) / (b"x" * 1400))[:548]
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
            s.sendto(bytes(ICMP(type=3, code=4, nexthopmtu=mtu) / quote), (vip, 0))


@pytest.mark.parametrize("fam", [4, 6])
def test_too_big_reaches_the_flow_backend(lab, daemon, fam):
    _, d = daemon
    vip = VIPS[fam]
    hosts = lab.hosts()
    client = hosts["client"].v6 if fam == 6 else hosts["client"].v4
    for be in lab.backends:
        flush_route_cache(be)
        assert route_mtu(be, client) is None
    owner, cport = namespaces.run_in(lab.client, _udp_flow, vip)
    before = d.stats()["global"]["icmp_forwarded"]
    namespaces.run_in(lab.client, _send_too_big, vip, client, cport, ROUTER_MTU)
    deadline = time.monotonic() + 5
    while route_mtu(owner, client) != ROUTER_MTU and time.monotonic() < deadline:
        time.sleep(0.05)
    assert route_mtu(owner, client) == ROUTER_MTU, f"{owner} did not learn the MTU"
    assert d.stats()["global"]["icmp_forwarded"] == before + 1
    for be in lab.backends:
        if be != owner:
            assert route_mtu(be, client) is None, f"{be} got another backend's ICMP"
