"""Next hops over netlink (pyroute2): which MAC an encapsulated packet to a backend must
carry, and the egress interface's MAC, MTU and addresses. No shelling out to `ip`."""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import XdplbError
from .layout import IPAddress

# NUD states with a usable link-layer address
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    mac: bytes
    mtu: int
    v4: tuple[ipaddress.IPv4Address, ...]
    v6: tuple[ipaddress.IPv6Address, ...]


def _mac(s: str) -> bytes:
    return bytes(int(x, 16) for x in s.split(":"))


class Netlink:
    """One rtnetlink socket; use as a context manager."""

    def __init__(self) -> None:
        self.ipr = IPRoute()

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def link_names(self) -> list[str]:
        return sorted(l.get_attr("IFLA_IFNAME") for l in self.ipr.get_links())

    def interface(self, name: str) -> Interface:
        idx = self.ipr.link_lookup(ifname=name)
        if not idx:
            raise XdplbError(f"interface {name} not found (ip link shows: "
                             f"{', '.join(self.link_names())})")
        link = self.ipr.get_links(idx[0])[0]
        v4, v6 = [], []
        for a in self.ipr.get_addr(index=idx[0]):
            addr = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
            if addr.version == 4:
                v4.append(addr)
            elif not addr.is_link_local:
                v6.append(addr)
        mac = link.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"
        return Interface(name, idx[0], _mac(mac), link.get_attr("IFLA_MTU") or 1500,
                         tuple(v4), tuple(v6))

    def route_nexthop(self, dst: IPAddress, oif: int) -> tuple[IPAddress, int]:
        """(address whose MAC we need, interface) for packets to dst leaving by oif."""
        try:
            routes = self.ipr.route("get", dst=str(dst), oif=oif)
        except NetlinkError as e:
            raise XdplbError(f"no route to backend {dst} via ifindex {oif}: "
                             f"{errno.errorcode.get(e.code, e.code)}; add a route") from e
        r = routes[0]
        gw = r.get_attr("RTA_GATEWAY") or (r.get_attr("RTA_VIA") or {}).get("addr")
        return (ipaddress.ip_address(gw) if gw else dst), (r.get_attr("RTA_OIF") or oif)

    def neighbour_mac(self, addr: IPAddress, ifindex: int) -> Optional[bytes]:
        fam = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        for n in self.ipr.get_neighbours(family=fam, ifindex=ifindex, dst=str(addr)):
            lla = n.get_attr("NDA_LLADDR")
            if lla and n["state"] & NUD_USABLE:
                return _mac(lla)
        return None

    def provoke(self, addr: IPAddress) -> None:
        """Make the kernel resolve addr: a datagram to the discard port triggers ARP/ND."""
        fam = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.setblocking(False)
                s.sendto(b"", (str(addr), 9))
        except OSError:
            pass
