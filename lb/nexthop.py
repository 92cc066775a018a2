"""Next hops over netlink (pyroute2): which MAC an encapsulated packet to a backend must
carry, and the egress interface's MAC, MTU and addresses. No shelling out to `ip`.

`Resolver` maps backend addresses to next-hop keys and MACs for the daemon; it knows
addresses and an egress index, not the config."""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import XdplbError
from .layout import IPAddress, mac_bytes

# NUD states with a usable link-layer address
UNRESOLVED_GRACE_S = 1.0
SETTLE_TRIES, SETTLE_S = 10, 0.05  # Resolver.settled: up to half a second
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE NOARP PERMANENT


@dataclass(frozen=True)
class Interface:
    name: str
    index: int
    mac: bytes
    mtu: int
    v4: tuple[ipaddress.IPv4Address, ...]
    v6: tuple[ipaddress.IPv6Address, ...]


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
        try:
            mac = mac_bytes(link.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00")
        except ValueError:
            raise XdplbError(f"interface {name} has no Ethernet address: use an Ethernet "
                             f"interface") from None
        return Interface(name, idx[0], mac, link.get_attr("IFLA_MTU") or 1500,
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
                return mac_bytes(lla)
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


_VOLATILE_ROUTE_ATTRS = ("RTA_CACHEINFO", "RTA_EXPIRES")


def routing_digest(nl: Netlink, oif: int) -> Optional[bytes]:
    """A digest of every route (all tables, both families) and rule, without the
    counters that change by themselves; None when the dump fails (then nothing is
    cached). Link and address changes show here too (linkdown flags, connected and
    local routes)."""
    try:
        h = hashlib.blake2b(digest_size=16)
        h.update(str(oif).encode())
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in nl.ipr.route("dump", family=fam):
                h.update(repr((r["dst_len"], r["src_len"], r["tos"], r["table"], r["proto"],
                               r["scope"], r["type"], r["flags"],
                               [(k, v) for k, v in r["attrs"]
                                if k not in _VOLATILE_ROUTE_ATTRS])).encode())
            for r in nl.ipr.get_rules(family=fam):
                h.update(repr((r["dst_len"], r["src_len"], r["tos"], r["table"],
                               r["action"], r["flags"], r["attrs"])).encode())
        return h.digest()
    except Exception:  # no caching rather than a wrong cache
        return None


@dataclass(frozen=True)
class Nexthops:
    """Resolved next hops: key -> MAC, backend address (str) -> key."""

    macs: Mapping[str, bytes] = field(default_factory=dict)
    keys: Mapping[str, str] = field(default_factory=dict)

    def key_of(self, addr: IPAddress) -> str:
        return self.keys.get(str(addr), f"backend {addr}")

    def unresolved(self) -> int:
        return sum(1 for k in set(self.keys.values()) if k not in self.macs)

    def resolved(self, addr: IPAddress) -> bool:
        """A packet to addr can leave: its next hop has a MAC (else the data path drops
        it, counted as no_nexthop)."""
        key = self.keys.get(str(addr))
        return key is not None and key in self.macs


class Resolver:
    """Next hops of backends leaving by one interface, with a route cache.

    Routes are asked per backend only when the routing state changed since the last time
    (a digest of routes and rules); neighbours once per distinct next hop. With a
    thousand backends behind one gateway a refresh is a few netlink dumps, not two
    thousand requests (which took ~0.6 s of CPU every refresh)."""

    def __init__(self, log):
        self.log = log
        self._routes: dict = {}  # backend -> (next hop, oif), valid under _digest
        self._digest: Optional[bytes] = None
        self._unresolved_since: dict[str, float] = {}
        self._reported: set[str] = set()  # logged nexthop_unresolved, not yet resolved

    def resolve(self, addrs: Iterable[IPAddress], oif: int,
                nl: Optional[Netlink] = None) -> Nexthops:
        """Next hops of addrs leaving by ifindex oif; unresolved ones are provoked.
        Blocking netlink I/O: call it before the event loop runs, or in a worker thread
        without `nl` (then it opens its own socket: pyroute2 runs its own loop)."""
        own = nl is None
        nl = nl or Netlink()
        try:
            return self._resolve(nl, set(addrs), oif)
        finally:
            if own:
                nl.close()

    def settled(self, addrs: Iterable[IPAddress], oif: int,
                nl: Optional[Netlink] = None) -> Nexthops:
        """resolve(), asked again while the neighbours it provoked answer (ARP/ND usually
        within milliseconds; up to SETTLE_TRIES x SETTLE_S)."""
        addrs = set(addrs)
        hops = self.resolve(addrs, oif, nl)
        for _ in range(SETTLE_TRIES):
            if not hops.unresolved():
                break
            time.sleep(SETTLE_S)
            hops = self.resolve(addrs, oif, nl)
        return hops

    def _resolve(self, nl: Netlink, addrs: set, oif: int) -> Nexthops:
        macs, keys, why = {}, {}, {}
        digest = routing_digest(nl, oif)
        cache = self._routes if digest is not None and digest == self._digest else {}
        routes = {a: cache[a] for a in addrs if a in cache}
        seen: dict[str, Optional[bytes]] = {}
        for addr in addrs:
            found = routes.get(addr)
            if found is None:
                try:
                    found = routes[addr] = nl.route_nexthop(addr, oif)
                except XdplbError as e:
                    why[str(addr)] = str(e)
                    keys[str(addr)] = f"backend {addr}"
                    continue
            hop, hop_oif = found
            key = f"{hop}%{hop_oif}"
            keys[str(addr)] = key
            if key not in seen:
                seen[key] = mac = nl.neighbour_mac(hop, hop_oif)
                if mac is None:
                    nl.provoke(hop)
                else:
                    macs[key] = mac
        self._routes, self._digest = routes, digest
        found = Nexthops(macs, keys)
        self._report(found, why)
        return found

    def _report(self, found: Nexthops, why: dict[str, str]) -> None:
        """One log line per transition: nexthop_unresolved once a backend's next hop has
        stayed unresolved for UNRESOLVED_GRACE_S (ARP/ND at start takes milliseconds),
        nexthop_resolved when a reported one resolves."""
        now = time.monotonic()
        for addr in found.keys:
            if found.resolved(addr):
                self._unresolved_since.pop(addr, None)
                if addr in self._reported:
                    self._reported.discard(addr)
                    self.log.info("nexthop_resolved", backend=addr)
                continue
            since = self._unresolved_since.setdefault(addr, now)
            if addr not in self._reported and now - since >= UNRESOLVED_GRACE_S:
                self._reported.add(addr)
                self.log.warning("nexthop_unresolved", backend=addr,
                                 reason=why.get(addr, "no neighbour entry (ARP/ND gets "
                                                      "no answer)"))
        for addr in set(self._unresolved_since) - set(found.keys):  # left the config
            del self._unresolved_since[addr]
            self._reported.discard(addr)
