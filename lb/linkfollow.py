"""Following the daemon's interfaces by netlink (RTM_NEWLINK/RTM_DELLINK on a socket the
event loop reads): an interface deleted and re-created under the same name gets the
program again (its new ifindex also changes the redirect port, the egress config and the
next hops), and MTU, MAC or address changes reach the egress config. One log line per
transition: interface_missing while it is gone, datapath_reattached or
interface_changed when it is back or different."""

from __future__ import annotations

import asyncio
import socket
from typing import Optional

from pyroute2.netlink.rtnl import (RTM_DELADDR, RTM_NEWADDR, RTMGRP_IPV4_IFADDR,
                                   RTMGRP_IPV6_IFADDR, RTMGRP_LINK)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from .attach import attach
from .egress import egress_config
from .errors import XdplbError
from .nexthop import Interface, Netlink

ADDR_EVENTS = (RTM_NEWADDR, RTM_DELADDR)


class LinkFollower:
    def __init__(self, daemon):
        self.d = daemon
        lb = daemon.cfg.lb
        self.names = {lb.interface, lb.egress_interface or lb.interface}
        self.sock: Optional[socket.socket] = None
        self.missing: set[str] = set()
        self._dirty = False
        self._task: Optional[asyncio.Task] = None
        self._marshal = MarshalRtnl()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self._task:
            self._task.cancel()

    def _readable(self) -> None:
        relevant = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:  # ENOBUFS: events were lost, look at the links anew
                relevant = True
                continue
            # address events carry no name: any may complete a re-created interface
            relevant |= any(m["header"]["type"] in ADDR_EVENTS or
                            m.get_attr("IFLA_IFNAME") in self.names
                            for m in self._marshal.parse(data))
        if relevant:
            self._dirty = True
            if self._task is None or self._task.done():
                self._task = self.loop.create_task(self._sync())

    async def _sync(self) -> None:
        while self._dirty:
            self._dirty = False
            try:
                links = await self.loop.run_in_executor(None, _lookup, self.names)
                await self._apply(links)
            except Exception as e:  # keep forwarding whatever happens here
                self.d.log.error("interface_follow_failed", error=str(e))

    async def _apply(self, links: dict[str, Optional[Interface]]) -> None:
        d, log = self.d, self.d.log
        lb = d.cfg.lb
        gone = {n for n, link in links.items() if link is None}
        for name in gone - self.missing:
            log.warning("interface_missing", interface=name,
                        action="forwarding stopped until an interface of that name is back")
        newly = gone - self.missing
        self.missing |= gone
        if gone:
            if newly and d.announcer:  # no forwarding here: no route attracting traffic
                d.interface_missing = True
                d.apply()
            return
        came_back, self.missing = self.missing, set()
        ingress = links[lb.interface]
        egress = links[lb.egress_interface] if lb.egress_interface else ingress
        reattach = came_back or ingress.index != d.attached[0]
        if not reattach and (ingress, egress) == (d.ingress, d.egress):
            return
        try:  # before attaching: a new interface may not have its addresses yet
            egress_cfg = egress_config(d.cfg, egress, ingress)
        except XdplbError as e:
            self.missing = came_back  # still not usable: the address events retry
            log.warning("interface_incomplete", interface=egress.name, error=str(e))
            return
        if reattach:
            mode = attach(ingress.index, ingress.name, d.dp.prog_fd, lb.xdp_mode, log)
            d.attached = (ingress.index, mode)
        d.ingress, d.egress, d.egress_cfg = ingress, egress, egress_cfg
        d.interface_missing = False  # the apply below announces again
        cfg = d.cfg
        addrs = {b.address for v in cfg.vips for b in v.backends}
        resolved = await self.loop.run_in_executor(None, d.resolver.resolve, addrs,
                                                   egress.index)
        d.apply(resolved if d.cfg is cfg else None)
        if reattach:
            log.info("datapath_reattached", interface=ingress.name, ifindex=ingress.index,
                     mode=d.attached[1], egress=egress.name)
        else:
            log.info("interface_changed", interface=egress.name, mtu=egress.mtu,
                     mac=egress.mac.hex(":"))


def _lookup(names) -> dict[str, Optional[Interface]]:
    with Netlink() as nl:
        out = {}
        for name in names:
            try:
                out[name] = nl.interface(name)
            except XdplbError:
                out[name] = None
        return out
