"""The XDP programs the lab puts on the receiving ends of its veths, all from
bpf/decap.bpf.c: `xdp_decap` on a backend's interface (strips xdplb's encapsulation), and
`xdp_pass` on a veth end that must accept XDP_TX/REDIRECT frames (a veth drops them
unless it runs an XDP program itself)."""

from __future__ import annotations

import socket

from ..native import Skeleton
from .netns import Netns


def load_decap(gue_port: int = 0) -> Skeleton:
    """The decap object, loaded; gue_port 0 leaves GUE alone (IPIP is still stripped)."""
    skel = Skeleton("decap")
    try:
        skel.rodata.gue_port = socket.htons(gue_port)
        skel.load()
    except BaseException:
        skel.close()
        raise
    return skel


def decap_stats(skel: Skeleton) -> tuple[int, int]:
    """(frames seen, frames stripped) by xdp_decap, summed over CPUs."""
    m = skel.map("decap_stats")
    seen, stripped = (sum(int.from_bytes(v, "little") for v in
                          m.lookup_percpu(idx.to_bytes(4, "little"))) for idx in (0, 1))
    return seen, stripped


def attach_decap(ns: Netns, ifname: str, gue_port: int) -> None:
    """xdp_decap on ns's ifname (the attachment keeps the program after we let go)."""
    with load_decap(gue_port) as skel:
        ns.xdp_attach(ifname, skel.prog_fd("xdp_decap"), "native")


def attach_pass(ns: Netns, ifname: str) -> None:
    """xdp_pass on ns's ifname, a veth end that receives XDP_TX/REDIRECT frames."""
    with load_decap() as skel:
        ns.xdp_attach(ifname, skel.prog_fd("xdp_pass"), "native")
