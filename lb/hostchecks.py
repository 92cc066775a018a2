"""`xdplb doctor`'s checks of the node beyond its interfaces: bpffs and the pin path, the
BPF JIT, capabilities, memlock, the clock, next hops and the [announce] routing table."""

from __future__ import annotations

import os
import re
import resource
import stat
import subprocess

from pyroute2 import IPRoute

from . import preflight
from .doctornode import FAIL, OK, WARN, Finding, Node, tx_interface
from .errors import XdplbError
from .nexthop import Netlink, Resolver

MEMLOCK_NEEDED = 64 << 20  # below kernel 5.11 BPF maps count against RLIMIT_MEMLOCK
TIME_ERROR = 5             # adjtimex(2): clock not synchronised


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
            tx = nl.interface(tx_interface(cfg))
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


class _Quiet:
    def __getattr__(self, level):
        return lambda *a, **kw: None
