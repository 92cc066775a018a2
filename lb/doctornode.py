"""What `xdplb doctor`'s checks read of a node (a `Node`, so tests can point it elsewhere),
what they return (a `Finding`), and the readings of a link that more than one check needs."""

from __future__ import annotations

import ctypes
import os
import re
import resource
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Optional

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool

from .config import Config

OK, WARN, FAIL = "ok", "warn", "fail"


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


def xdp_mode(link) -> Optional[str]:
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return None
    # pyroute2 names the XDP_ATTACHED_* values
    return {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload",
            "xdpmulti": "multi", 1: "native", 2: "generic", 3: "offload", 4: "multi"}.get(
        xdp.get_attr("IFLA_XDP_ATTACHED"))


def link_kind(link) -> Optional[str]:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def tx_interface(cfg: Config) -> str:
    return cfg.lb.egress_interface or cfg.lb.interface
