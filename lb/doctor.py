"""`xdplb doctor [--config PATH]`: this node against the known XDP traps, as a table of
check, ok/warn/fail and what to do. Run it where the daemon runs (its network namespace).
Exit 1 when a check fails (XDP would not work, or would work wrongly); warnings are
slower or riskier set-ups that still forward.

Each check is a function of a `Node` (what it reads of the kernel, so tests can point it
elsewhere) returning Findings; one that cannot read what it needs says so as a warning."""

from __future__ import annotations

import ctypes
import os
import re
import resource
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Optional

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.ethtool.ioctl import EthtoolError
from pyroute2.netlink.exceptions import NetlinkError

from . import preflight
from .config import Config
from .errors import XdplbError
from .lab.namespaces import entered, ipr_in, list_namespaces, ns_path
from .nexthop import Netlink, Resolver

OK, WARN, FAIL = "ok", "warn", "fail"
# drivers with native (driver-mode) XDP, as of Linux 6.x
NATIVE_XDP = {"veth", "virtio_net", "tun", "mlx5_core", "mlx4_en", "i40e", "ice", "ixgbe",
              "ixgbevf", "igb", "igc", "bnxt_en", "ena", "qede", "nfp", "sfc", "efx",
              "thunder-nicvf", "mvneta", "mvpp2", "stmmac", "gve", "hv_netvsc", "enetc",
              "dpaa2-eth", "lan966x-switch", "atlantic", "fec", "cpsw", "xsk", "netdevsim",
              "bond", "octeontx2-nicpf", "mana", "idpf", "r8169", "tsnep"}
ENCAP_OVERHEAD = {("ipip", 4): 20, ("ipip", 6): 40, ("gue", 4): 28, ("gue", 6): 48}
MEMLOCK_NEEDED = 64 << 20  # below kernel 5.11 BPF maps count against RLIMIT_MEMLOCK
TIME_ERROR = 5             # adjtimex(2): clock not synchronised


@dataclass
class Finding:
    check: str
    status: str  # ok | warn | fail
    detail: str  # what was found, and what to do about it


@dataclass
class Node:
    """What the checks read; the defaults are this machine, seen from this namespace."""

    cfg: Config
    jit_path: str = "/proc/sys/net/core/bpf_jit_enable"
    kernel: str = field(default_factory=lambda: os.uname().release)
    cpus: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    adjtimex: Callable[[], int] = field(default=lambda: _adjtimex())
    memlock: Callable[[], int] = field(
        default=lambda: resource.getrlimit(resource.RLIMIT_MEMLOCK)[0])

    def link(self, ifname: str, netns: Optional[str] = None):
        with IPRoute(**({"netns": netns} if netns else {})) as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            return ipr.get_links(idx[0])[0] if idx else None

    def ethtool(self, *args: str) -> Optional[str]:
        r = subprocess.run(["ethtool", *args], capture_output=True, text=True, timeout=10)
        return r.stdout if r.returncode == 0 else None

    def driver(self, ifname: str) -> Optional[str]:
        out = self.ethtool("-i", ifname) or ""
        m = re.search(r"^driver: (\S+)", out, re.M)
        return m.group(1) if m else None

    def offloads(self, ifname: str) -> dict[str, bool]:
        eth = Ethtool()
        try:
            return {name: f.enable for name, f in eth.get_features(ifname).features.items()}
        finally:
            eth.close()


def _adjtimex() -> int:
    buf = ctypes.create_string_buffer(512)  # struct timex, modes = 0: read only
    return ctypes.CDLL(None, use_errno=True).adjtimex(buf)


def _xdp_mode(link) -> Optional[str]:
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return None
    # pyroute2 names the XDP_ATTACHED_* values
    return {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload",
            "xdpmulti": "multi", 1: "native", 2: "generic", 3: "offload", 4: "multi"}.get(
        xdp.get_attr("IFLA_XDP_ATTACHED"))


def _kind(link) -> Optional[str]:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _tx_interface(cfg: Config) -> str:
    return cfg.lb.egress_interface or cfg.lb.interface


# --- checks ---------------------------------------------------------------------------
def check_xdp_mode(node: Node) -> list[Finding]:
    ifname = node.cfg.lb.interface
    link = node.link(ifname)
    if link is None:
        return [Finding("xdp mode", FAIL, f"interface {ifname} not found")]
    driver = node.driver(ifname) or _kind(link) or "unknown"
    mode = _xdp_mode(link)
    if mode == "generic":
        return [Finding("xdp mode", WARN, f"{ifname} ({driver}) runs XDP in generic mode: "
                        f"slow; use a driver with native XDP and xdp_mode = \"native\"")]
    if mode == "native" or driver in NATIVE_XDP:
        return [Finding("xdp mode", OK, f"{ifname}: driver {driver}, native XDP")]
    return [Finding("xdp mode", WARN, f"driver {driver} of {ifname} has no native XDP: "
                    f"xdplb would fall back to generic (slow); use a NIC whose driver has it")]


def check_offloads(node: Node) -> list[Finding]:
    out = []
    for ifname in dict.fromkeys((node.cfg.lb.interface, _tx_interface(node.cfg))):
        try:
            feats = node.offloads(ifname)
        except Exception as e:  # noqa: BLE001 - an unreadable device is a finding
            out.append(Finding("lro/gro-hw", WARN, f"cannot read offloads of {ifname}: {e}"))
            continue
        on = [name for name in ("rx-lro", "rx-gro-hw") if feats.get(name)]
        out.append(Finding("lro/gro-hw", FAIL, f"{', '.join(on)} on {ifname}: native XDP "
                           f"refuses to attach or sees merged frames; ethtool -K {ifname} "
                           f"lro off rx-gro-hw off") if on else
                   Finding("lro/gro-hw", OK, f"{ifname}: LRO and hardware GRO off"))
    return out


def check_mtu(node: Node) -> list[Finding]:
    cfg = node.cfg
    rx, tx = node.link(cfg.lb.interface), node.link(_tx_interface(cfg))
    if rx is None or tx is None:
        return []
    families = {b.address.version for v in cfg.vips for b in v.backends} or {4}
    overhead = max(ENCAP_OVERHEAD[(cfg.lb.encap, f)] for f in families)
    rx_mtu, tx_mtu = rx.get_attr("IFLA_MTU"), tx.get_attr("IFLA_MTU")
    if tx_mtu >= rx_mtu + overhead:
        return [Finding("mtu", OK, f"{_tx_interface(cfg)} MTU {tx_mtu} carries {rx_mtu} + "
                        f"{overhead} bytes of {cfg.lb.encap}")]
    return [Finding("mtu", WARN, f"{cfg.lb.encap} adds {overhead} bytes: full-size packets "
                    f"from {cfg.lb.interface} (MTU {rx_mtu}) do not fit {_tx_interface(cfg)} "
                    f"(MTU {tx_mtu}) and are answered too-big; raise the MTU towards backends "
                    f"to {rx_mtu + overhead} or clamp clients' MSS")]


def _veth_peer(node: Node, ifname: str):
    """(netns name or None, peer link) of a veth, its peer looked up in this namespace
    or in the named one whose id the link carries; None if not a veth or not found."""
    link = node.link(ifname)
    if link is None or _kind(link) != "veth" or not link.get_attr("IFLA_LINK"):
        return None
    nsid = link.get_attr("IFLA_LINK_NETNSID")
    where: list[Optional[str]] = [None] if nsid is None else []
    if nsid is not None:
        with IPRoute() as ipr:
            for name in list_namespaces():
                fd = os.open(ns_path(name), os.O_RDONLY)
                try:
                    got = ipr.get_netnsid(fd=fd)
                finally:
                    os.close(fd)
                if got and got["nsid"] == nsid:
                    where.append(name)
                    break
    for ns in where:
        try:
            with ipr_in(ns) as ipr:
                links = ipr.get_links(link.get_attr("IFLA_LINK"))
        except (OSError, NetlinkError):  # the namespace or the peer went meanwhile
            continue
        if links:
            return ns, links[0]
    return None


def check_veth_peer(node: Node) -> list[Finding]:
    tx = _tx_interface(node.cfg)
    found = _veth_peer(node, tx)
    if found is None:
        link = node.link(tx)
        if link is not None and _kind(link) == "veth":
            return [Finding("veth peer xdp", WARN, f"the peer of veth {tx} is in no named "
                            f"namespace: make sure it has a native XDP program")]
        return [Finding("veth peer xdp", OK, f"{tx} is not a veth")]
    ns, peer = found
    where = f"{peer.get_attr('IFLA_IFNAME')}" + (f" (netns {ns})" if ns else "")
    if _xdp_mode(peer) not in ("native", "multi"):  # veth hands frames to a native one
        return [Finding("veth peer xdp", FAIL, f"frames sent out of {tx} by XDP_TX/REDIRECT "
                        f"are dropped: its peer {where} has no native XDP program; attach "
                        f"one (an XDP_PASS program will do)")]
    return [Finding("veth peer xdp", OK, f"peer {where} of {tx} has an XDP program")]


def check_veth_checksum(node: Node) -> list[Finding]:
    rx = node.cfg.lb.interface
    found = _veth_peer(node, rx)
    if found is None:
        return [Finding("veth tx checksum", OK, f"{rx} is not a veth")]
    ns, peer = found
    name = peer.get_attr("IFLA_IFNAME")
    try:
        on = _peer_tx_csum(ns, name)
    except (OSError, EthtoolError) as e:
        return [Finding("veth tx checksum", WARN, f"cannot read offloads of {name}: {e}")]
    if on:
        return [Finding("veth tx checksum", WARN, f"{name}{f' (netns {ns})' if ns else ''}, "
                        f"the peer of {rx}, offloads TX checksums: frames it hands to XDP "
                        f"leave with partial checksums; ethtool -K {name} tx off")]
    return [Finding("veth tx checksum", OK, f"peer {name} of {rx} completes checksums")]


def _peer_tx_csum(ns: Optional[str], name: str) -> bool:
    with entered(ns):  # ethtool ioctls act in the namespace their socket was made in
        eth = Ethtool()
    try:
        return bool(eth.get_offload_flags(name)["tx-checksumming"])
    finally:
        eth.close()


def check_rx_queues(node: Node) -> list[Finding]:
    ifname = node.cfg.lb.interface
    link = node.link(ifname)
    if link is None:
        return []
    queues = link.get_attr("IFLA_NUM_RX_QUEUES") or 1
    out = [Finding("rx queues", OK, f"{ifname}: {queues} RX queues for {node.cpus} CPUs")
           if queues >= node.cpus else
           Finding("rx queues", WARN, f"{ifname} has {queues} RX queues for {node.cpus} CPUs: "
                   f"XDP runs on as many CPUs as queues; ethtool -L {ifname} combined "
                   f"{node.cpus}")]
    hashing = node.ethtool("-n", ifname, "rx-flow-hash", "tcp4")
    if hashing is None:
        out.append(Finding("rss l4 hash", OK, f"{ifname}: RSS hashing not configurable "
                           f"(driver has none)"))
    elif "L4 bytes" in hashing:
        out.append(Finding("rss l4 hash", OK, f"{ifname}: RSS hashes TCP ports"))
    else:
        out.append(Finding("rss l4 hash", WARN, f"{ifname}: RSS hashes addresses only: one "
                           f"client lands on one CPU; ethtool -N {ifname} rx-flow-hash tcp4 "
                           f"sdfn (and udp4, tcp6, udp6)"))
    return out


def check_bpffs(node: Node) -> list[Finding]:
    pin = node.cfg.lb.bpf_pin_path.rstrip("/")
    parent = os.path.dirname(pin) or "/"
    if preflight.fs_type(parent) != "bpf":
        return [Finding("bpffs", FAIL, f"{parent} is not a bpf filesystem: mount -t bpf bpf "
                        f"/sys/fs/bpf and keep bpf_pin_path under it")]
    mode = os.stat(parent).st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return [Finding("bpffs", WARN, f"{parent} is world-writable: anyone may plant pins; "
                        f"chmod 0755 {parent}")]
    return [Finding("bpffs", OK, f"{parent} is a bpffs, mode {stat.S_IMODE(mode):04o}")]


def check_pin_path(node: Node) -> list[Finding]:
    pin = node.cfg.lb.bpf_pin_path
    try:
        st = os.lstat(pin)
    except FileNotFoundError:
        return [Finding("pin path", OK, f"{pin} does not exist yet (made at start)")]
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return [Finding("pin path", FAIL, f"{pin} is not a directory (a symlink or file): "
                        f"remove it")]
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return [Finding("pin path", FAIL, f"{pin} is owned by uid {st.st_uid} with mode "
                        f"{stat.S_IMODE(st.st_mode):04o}: others could swap the maps; "
                        f"chown {os.geteuid()} {pin} && chmod 0700 {pin}")]
    return [Finding("pin path", OK, f"{pin}: ours, mode {stat.S_IMODE(st.st_mode):04o}")]


def _read_sysctl(path: str) -> str:
    try:
        return open(path).read().strip()
    except FileNotFoundError:
        if not path.startswith("/proc/sys/net/core/bpf_"):
            raise
    # bpf_jit_* exist in the initial network namespace only: read it from there
    r = subprocess.run(["nsenter", "--net=/proc/1/ns/net", "--", "cat", path],
                       capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise FileNotFoundError(2, "not visible from this network namespace", path)
    return r.stdout.strip()


def check_jit(node: Node) -> list[Finding]:
    try:
        value = _read_sysctl(node.jit_path)
    except OSError as e:
        return [Finding("bpf jit", WARN, f"cannot read {node.jit_path}: {e.strerror}")]
    if value == "0":
        return [Finding("bpf jit", FAIL, "the BPF JIT is off (programs are interpreted, "
                        "several times slower): sysctl -w net.core.bpf_jit_enable=1")]
    return [Finding("bpf jit", OK, f"net.core.bpf_jit_enable = {value}")]


def check_nexthops(node: Node) -> list[Finding]:
    cfg = node.cfg
    addrs = {b.address for v in cfg.vips for b in v.backends}
    with Netlink() as nl:
        try:
            tx = nl.interface(_tx_interface(cfg))
        except XdplbError as e:
            return [Finding("next hops", FAIL, str(e))]
        hops = Resolver(_Quiet()).settled(addrs, tx.index, nl)
    missing = sorted(str(a) for a in addrs if hops.key_of(a) not in hops.macs)
    if missing:
        return [Finding("next hops", FAIL, f"no neighbour entry for the next hop of "
                        f"{', '.join(missing)} on {tx.name}: check the backend or gateway is "
                        f"up and on that link (ip neigh show dev {tx.name})")]
    return [Finding("next hops", OK, f"{len(addrs)} backends' next hops resolved")]


def check_clock(node: Node) -> list[Finding]:
    if node.adjtimex() == TIME_ERROR:
        return [Finding("clock", WARN, "the system clock is not synchronised: log and "
                        "health-check times drift from other nodes'; run an NTP client")]
    return [Finding("clock", OK, "system clock synchronised")]


def check_memlock(node: Node) -> list[Finding]:
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", node.kernel).groups())
    if (major, minor) >= (5, 11):
        return [Finding("memlock", OK, f"kernel {major}.{minor} charges BPF maps to the "
                        f"cgroup, not RLIMIT_MEMLOCK")]
    limit = node.memlock()
    if limit != resource.RLIM_INFINITY and limit < MEMLOCK_NEEDED:
        return [Finding("memlock", FAIL, f"RLIMIT_MEMLOCK is {limit} bytes and kernel "
                        f"{major}.{minor} charges BPF maps to it: LimitMEMLOCK=infinity in "
                        f"the unit (ulimit -l unlimited)")]
    return [Finding("memlock", OK, "RLIMIT_MEMLOCK is large enough")]


def check_caps(node: Node) -> list[Finding]:
    missing = preflight.missing_caps(preflight.effective_caps())
    if missing:
        return [Finding("capabilities", FAIL, f"lacks {', '.join(missing)}: run as root or "
                        f"grant them")]
    return [Finding("capabilities", OK, ", ".join(preflight.REQUIRED_CAPS))]


def check_announce(node: Node) -> list[Finding]:
    """[announce]: no ip rule may look the table up (its blackhole routes would drop
    this node's own traffic to the VIPs), and no other protocol's route may hold a VIP
    address there (that address could not be announced)."""
    ann = node.cfg.announce
    if ann is None:
        return [Finding("announce", OK, "no [announce]: nothing announced")]
    from .announce import RTPROT_XDPLB
    vips = {str(v.address) for v in node.cfg.vips}
    with IPRoute() as ipr:
        rules = [r for fam in (2, 10) for r in ipr.get_rules(family=fam)
                 if (r.get_attr("FRA_TABLE") or r["table"]) == ann.table]
        foreign = sorted({r.get_attr("RTA_DST") for fam in (2, 10)
                          for r in ipr.route("dump", family=fam, table=ann.table)
                          if r.get_attr("RTA_TABLE") == ann.table
                          and r["proto"] != RTPROT_XDPLB} & vips)
    out = []
    if rules:
        out.append(Finding("announce", FAIL, f"{len(rules)} ip rule(s) look up table "
                           f"{ann.table}, where xdplb keeps blackhole routes for the VIPs: "
                           f"this node's own traffic to them would be dropped; set "
                           f"announce.table to a table no rule uses (ip rule show)"))
    if foreign:
        out.append(Finding("announce", WARN, f"table {ann.table} has routes of another "
                           f"protocol for {', '.join(foreign)}: xdplb cannot announce those "
                           f"addresses; remove them (ip route show table {ann.table})"))
    return out or [Finding("announce", OK, f"table {ann.table}: no ip rule uses it, no "
                           f"foreign route for a VIP")]


CHECKS = (check_caps, check_xdp_mode, check_offloads, check_mtu, check_veth_peer,
          check_veth_checksum, check_rx_queues, check_bpffs, check_pin_path, check_jit,
          check_nexthops, check_clock, check_memlock, check_announce)


class _Quiet:
    def __getattr__(self, level):
        return lambda *a, **kw: None


def run_checks(node: Node) -> list[Finding]:
    return [f for check in CHECKS for f in check(node)]


def render(findings: list[Finding]) -> str:
    width = max(len(f.check) for f in findings)
    return "\n".join(f"{f.check:<{width}}  {f.status:<4}  {f.detail}" for f in findings)


def main(cfg: Config) -> int:
    findings = run_checks(Node(cfg))
    print(render(findings))
    return 1 if any(f.status == FAIL for f in findings) else 0
