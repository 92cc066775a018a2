"""`xdplb doctor`'s checks of the interfaces xdplb attaches to and sends out of: XDP
mode, offloads, MTU, veth peers, RX queues and RSS."""

from __future__ import annotations

import os
from typing import Optional

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.ethtool.ioctl import EthtoolError
from pyroute2.netlink.exceptions import NetlinkError

from .doctornode import FAIL, OK, WARN, Finding, Node, link_kind, tx_interface, xdp_mode
from .lab.namespaces import entered, ipr_in, list_namespaces, ns_path

# drivers with native (driver-mode) XDP, as of Linux 6.x
NATIVE_XDP = {"veth", "virtio_net", "tun", "mlx5_core", "mlx4_en", "i40e", "ice", "ixgbe",
              "ixgbevf", "igb", "igc", "bnxt_en", "ena", "qede", "nfp", "sfc", "efx",
              "thunder-nicvf", "mvneta", "mvpp2", "stmmac", "gve", "hv_netvsc", "enetc",
              "dpaa2-eth", "lan966x-switch", "atlantic", "fec", "cpsw", "xsk", "netdevsim",
              "bond", "octeontx2-nicpf", "mana", "idpf", "r8169", "tsnep"}
ENCAP_OVERHEAD = {("ipip", 4): 20, ("ipip", 6): 40, ("gue", 4): 28, ("gue", 6): 48}


def check_xdp_mode(node: Node) -> list[Finding]:
    ifname = node.cfg.lb.interface
    link = node.link(ifname)
    if link is None:
        return [Finding("xdp mode", FAIL, f"interface {ifname} not found")]
    driver = node.driver(ifname) or link_kind(link) or "unknown"
    mode = xdp_mode(link)
    if mode == "generic":
        return [Finding("xdp mode", WARN, f"{ifname} ({driver}) runs XDP in generic mode: "
                        f"slow; use a driver with native XDP and xdp_mode = \"native\"")]
    if mode == "native" or driver in NATIVE_XDP:
        return [Finding("xdp mode", OK, f"{ifname}: driver {driver}, native XDP")]
    return [Finding("xdp mode", WARN, f"driver {driver} of {ifname} has no native XDP: "
                    f"xdplb would fall back to generic (slow); use a NIC whose driver has it")]


def check_offloads(node: Node) -> list[Finding]:
    out = []
    for ifname in dict.fromkeys((node.cfg.lb.interface, tx_interface(node.cfg))):
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
    rx, tx = node.link(cfg.lb.interface), node.link(tx_interface(cfg))
    if rx is None or tx is None:
        return []
    families = {b.address.version for v in cfg.vips for b in v.backends} or {4}
    overhead = max(ENCAP_OVERHEAD[(cfg.lb.encap, f)] for f in families)
    rx_mtu, tx_mtu = rx.get_attr("IFLA_MTU"), tx.get_attr("IFLA_MTU")
    if tx_mtu >= rx_mtu + overhead:
        return [Finding("mtu", OK, f"{tx_interface(cfg)} MTU {tx_mtu} carries {rx_mtu} + "
                        f"{overhead} bytes of {cfg.lb.encap}")]
    return [Finding("mtu", WARN, f"{cfg.lb.encap} adds {overhead} bytes: full-size packets "
                    f"from {cfg.lb.interface} (MTU {rx_mtu}) do not fit {tx_interface(cfg)} "
                    f"(MTU {tx_mtu}) and are answered too-big; raise the MTU towards backends "
                    f"to {rx_mtu + overhead} or clamp clients' MSS")]


def _veth_peer(node: Node, ifname: str):
    """(netns name or None, peer link) of a veth, its peer looked up in this namespace
    or in the named one whose id the link carries; None if not a veth or not found."""
    link = node.link(ifname)
    if link is None or link_kind(link) != "veth" or not link.get_attr("IFLA_LINK"):
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
    tx = tx_interface(node.cfg)
    found = _veth_peer(node, tx)
    if found is None:
        link = node.link(tx)
        if link is not None and link_kind(link) == "veth":
            return [Finding("veth peer xdp", WARN, f"the peer of veth {tx} is in no named "
                            f"namespace: make sure it has a native XDP program")]
        return [Finding("veth peer xdp", OK, f"{tx} is not a veth")]
    ns, peer = found
    where = f"{peer.get_attr('IFLA_IFNAME')}" + (f" (netns {ns})" if ns else "")
    if xdp_mode(peer) not in ("native", "multi"):  # veth hands frames to a native one
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
