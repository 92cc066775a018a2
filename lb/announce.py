"""The node's VIP announcements ([announce]): while a VIP address is announced, a blackhole
route for it (IPv4 /32, IPv6 /128) stays in kernel routing table `announce.table` of the
daemon's network namespace, with route protocol RTPROT_XDPLB (252). No ip rule uses the
table; the node's routing daemon exports its routes over BGP (BIRD 2: `protocol kernel {
kernel table 200; learn; ... }`; BIRD ignores routes of protocol kernel (2) or bird (12),
hence a number of our own).

The protocol number is what this module owns: at start it adopts exactly the routes of
protocol 252 in its table and removes those no VIP wants any more; it never adds over,
nor removes, a route of another protocol (a foreign route for a VIP address makes that
address fail to announce, logged once). A killed daemon leaves its routes (the program
keeps forwarding); SIGTERM withdraws them first (lb/daemon.py).

Decisions come from lb/announcepolicy.py. `Announcer.withdraw` runs before the maps are
written and `Announcer.announce` after, so a route never attracts traffic to a ring that
is not in place. An address withdrawn for health holds its VIPs' rings (the health view
they had, frozen) for `withdraw_delay`: the flows still arriving until the router has
the withdrawal go where every other node sends them, instead of being moved by a node
whose own view changed.

Netlink runs in one worker thread: pyroute2's synchronous API runs an event loop of its
own, which cannot run inside the daemon's."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import announcepolicy
from .announcepolicy import ADMIN, HEALTH, INTERFACE, Decision
from .errors import XdplbError
from .layout import IPAddress

RTPROT_XDPLB = 252
NETLINK_TIMEOUT_S = 5.0
CONFIG = "config"  # reason of a withdrawal: a reload removed the address's VIPs


def _route(addr: IPAddress, table: int) -> dict:
    return dict(dst=str(addr), dst_len=addr.max_prefixlen, table=table, proto=RTPROT_XDPLB,
                type="blackhole",
                family=socket.AF_INET6 if addr.version == 6 else socket.AF_INET)


def _owned(table: int) -> set[IPAddress]:
    out = set()
    with IPRoute() as ipr:
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.route("dump", family=fam, table=table, proto=RTPROT_XDPLB):
                dst = r.get_attr("RTA_DST")
                if (dst and r["proto"] == RTPROT_XDPLB and r.get_attr("RTA_TABLE") == table
                        and r["dst_len"] == (32 if fam == socket.AF_INET else 128)):
                    out.add(ipaddress.ip_address(dst))
    return out


def _add(addr: IPAddress, table: int) -> Optional[str]:
    try:
        with IPRoute() as ipr:
            ipr.route("add", **_route(addr, table))  # NLM_F_EXCL: never over another route
    except NetlinkError as e:
        if e.code == errno.EEXIST and addr in _owned(table):
            return None
        if e.code == errno.EEXIST:
            return (f"table {table} already has a route for {addr} that is not xdplb's "
                    f"(protocol {RTPROT_XDPLB}): remove it")
        return f"cannot add the route for {addr} to table {table}: {e}"
    except OSError as e:
        return f"cannot add the route for {addr} to table {table}: {e.strerror or e}"
    return None


def _remove(addr: IPAddress, table: int) -> Optional[str]:
    try:
        with IPRoute() as ipr:  # protocol and type in the request: only our route matches
            ipr.route("del", **_route(addr, table))
    except NetlinkError as e:
        if e.code not in (errno.ESRCH, errno.ENOENT):
            return f"cannot remove the route for {addr} from table {table}: {e}"
    except OSError as e:
        return f"cannot remove the route for {addr} from table {table}: {e.strerror or e}"
    return None


class RouteTable:
    """Our routes in one kernel table, by netlink in a worker thread."""

    def __init__(self, table: int):
        self.table = table
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="announce")

    def _run(self, fn, *args):
        return self._pool.submit(fn, *args).result(timeout=NETLINK_TIMEOUT_S)

    def owned(self) -> set[IPAddress]:
        """Addresses with a route of ours (protocol RTPROT_XDPLB) in the table;
        XdplbError when the table cannot be read."""
        try:
            return self._run(_owned, self.table)
        except (NetlinkError, OSError, TimeoutError) as e:
            raise XdplbError(f"cannot read routing table {self.table} for [announce]: "
                             f"{getattr(e, 'strerror', None) or e}") from None

    def add(self, addr: IPAddress) -> Optional[str]:
        """None when the route is in place (added, or already ours); else the problem."""
        return self._run(_add, addr, self.table)

    def remove(self, addr: IPAddress) -> Optional[str]:
        """None when no route of ours is left for addr; else the problem."""
        return self._run(_remove, addr, self.table)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Announcer:
    """What is announced, the holds on rings, and the log line of each transition.
    on_hold_end(): called (in the running loop) when a hold ends, to apply the rings."""

    def __init__(self, table: int, log, on_hold_end: Callable[[], None]):
        self.routes = RouteTable(table)
        self.log, self.on_hold_end = log, on_hold_end
        self.announced: set[IPAddress] = set()       # our routes in place
        self.reasons: dict[IPAddress, str] = {}      # why a withdrawn address is
        self.failing: dict[IPAddress, str] = {}      # route problems logged, retried
        self.lost: set[IPAddress] = set()  # announced, route taken by someone else's
        self._check_error: Optional[str] = None  # restore_routes could not read the table
        self.names: dict[IPAddress, tuple[str, ...]] = {}  # VIPs by address, last apply
        self._names: dict[IPAddress, tuple[str, ...]] = {}  # ... and in this one
        self.holds: dict[str, tuple[float, dict[str, bool]]] = {}  # VIP -> (until, up)
        self.stopping = False  # SIGTERM: everything withdrawn, reason shutdown
        self.live = False      # announcements wait until the program is attached
        self.last_withdrawal: Optional[float] = None  # monotonic time of the last one
        self._timer: Optional[asyncio.TimerHandle] = None

    # --- start ---------------------------------------------------------------------
    def adopt(self, cfg) -> tuple[int, int]:
        """Take over the routes of ours an earlier instance left: those of cfg's VIP
        addresses stay (and are decided on at the first apply), the rest go.
        Returns (adopted, removed)."""
        wanted = {v.address for v in cfg.vips}
        owned = self.routes.owned()
        removed = 0
        for addr in sorted(owned - wanted, key=str):
            problem = self.routes.remove(addr)
            if problem:
                self.log.error("announce_failed", address=str(addr), error=problem)
            else:
                removed += 1
                self.log.info("route_removed", address=str(addr), reason="no VIP has it")
        self.announced = owned & wanted
        return len(self.announced), removed

    # --- what the daemon asks ------------------------------------------------------
    def decide(self, cfg, states, verdicted_of, withdrawn: bool,
               interface_missing: bool = False) -> dict[IPAddress, Decision]:
        facts = announcepolicy.vip_facts(cfg, states, verdicted_of)
        decisions = announcepolicy.decide(facts, cfg.announce.min_backends, self.announced,
                                          withdrawn=withdrawn, stopping=self.stopping,
                                          interface_missing=interface_missing)
        names: dict[IPAddress, tuple[str, ...]] = {}
        for v in cfg.vips:
            names[v.address] = (*names.get(v.address, ()), v.name)
        self._names = names
        return decisions

    def withdraw(self, decisions: dict[IPAddress, Decision], applied: dict,
                 cfg) -> None:
        """Before the maps: remove the routes of addresses no longer announced (every
        route of an address no VIP has any more); an address withdrawn for health holds
        its VIPs' rings as `applied` ((vip, backend) -> state in the maps) has them."""
        now = time.monotonic()
        for addr, d in decisions.items():
            if d.announce:
                for name in self._names.get(addr, ()):
                    self.holds.pop(name, None)  # back: the rings follow health again
            else:
                self.reasons[addr] = d.reason
                self.lost.discard(addr)
        gone = {a for a in self.announced if a not in decisions}
        for addr in gone:
            self.reasons[addr] = CONFIG
        self.lost &= set(decisions)
        # a route no longer wanted is not retried (a removal that failed still is)
        self.failing = {a: p for a, p in self.failing.items() if a in self.announced or
                        (a in decisions and decisions[a].announce)}
        for addr in sorted({a for a in self.announced if a in gone or
                            not decisions[a].announce}, key=str):
            problem = self.routes.remove(addr)
            if problem:
                self._failed(addr, problem)
                continue
            self.failing.pop(addr, None)
            self.announced.discard(addr)
            self.last_withdrawal = now
            reason = self.reasons[addr]
            names = self.names.get(addr, ()) if addr in gone else self._names.get(addr, ())
            for name in names:
                self.log.info("vip_withdrawn", vip=name, address=str(addr), reason=reason)
            delay = cfg.announce.withdraw_delay
            if reason == HEALTH and delay > 0:
                for v in cfg.vips:
                    if v.address == addr:
                        up = {str(b.address): applied.get((v.name, str(b.address))) not in
                              (None, "down") for b in v.backends}
                        self.holds[v.name] = (now + delay, up)
                self._schedule()

    def announce(self, decisions: dict[IPAddress, Decision]) -> None:
        """After the maps: add the routes of addresses to announce."""
        if self.live and not self.stopping:
            for addr in sorted((a for a, d in decisions.items()
                                if d.announce and a not in self.announced), key=str):
                problem = self.routes.add(addr)
                if problem:
                    self._failed(addr, problem)
                    continue
                self.failing.pop(addr, None)
                self.announced.add(addr)
                if addr in self.lost:  # restore_routes logged no vip_withdrawn for it
                    self.lost.discard(addr)
                    self._restored(addr)
                    continue
                # back because the operator, the interface or a config (a reload, or
                # a rejected one rolled back) let it, else health
                before = self.reasons.pop(addr, None)
                reason = before if before in (ADMIN, INTERFACE, CONFIG) else HEALTH
                for name in self._names.get(addr, ()):
                    self.log.info("vip_announced", vip=name, address=str(addr),
                                  reason=reason)
        self.names = self._names

    def restore_routes(self) -> None:
        """Put back the routes of announced addresses that someone else removed (`ip
        route del`, another daemon replacing them): without its route the node attracts
        no traffic for that address while everything here says announced. One that a
        route of another protocol now blocks is no longer announced (announce_failed,
        retried with the other failures) until it can be added again."""
        if not self.announced or self.stopping:
            return
        try:
            present = self.routes.owned()
        except XdplbError as e:
            if self._check_error != str(e):
                self.log.warning("announce_check_failed", error=str(e))
            self._check_error = str(e)
            return
        if self._check_error is not None:
            self.log.info("announce_check_recovered")
            self._check_error = None
        for addr in sorted(self.announced - present, key=str):
            problem = self.routes.add(addr)
            if problem:
                self.announced.discard(addr)
                self.lost.add(addr)
                self._failed(addr, problem)
            else:
                self._restored(addr)

    def _restored(self, addr: IPAddress) -> None:
        self.log.warning("announce_route_restored", address=str(addr),
                         vips=list(self._names.get(addr, ())))

    def _failed(self, addr: IPAddress, problem: str) -> None:
        if self.failing.get(addr) != problem:
            self.log.error("announce_failed", address=str(addr), error=problem)
        self.failing[addr] = problem

    # --- holds ---------------------------------------------------------------------
    def up_view(self, up_of: Callable[[str, str], bool]) -> Optional[Callable]:
        """up_of with the health of held VIPs frozen; None when nothing is held."""
        now = time.monotonic()
        self.holds = {k: h for k, h in self.holds.items() if h[0] > now}
        if not self.holds:
            return None
        holds = self.holds

        def held_up(vip: str, backend: str) -> bool:
            hold = holds.get(vip)
            return hold[1].get(backend, False) if hold else up_of(vip, backend)
        return held_up

    def held(self) -> list[str]:
        return sorted(self.holds)

    def _schedule(self) -> None:
        """A timer for the hold that ends first."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # at start: the first apply after it sees the hold expired
            return
        if self._timer is not None:
            self._timer.cancel()
        first = min(h[0] for h in self.holds.values())
        self._timer = loop.call_later(max(0.0, first - time.monotonic()) + 0.01,
                                      self._hold_end)

    def _hold_end(self) -> None:
        self._timer = None
        if self.holds:
            self.on_hold_end()  # applies, which drops the holds that ended
        if self.holds:
            self._schedule()

    # --- views and shutdown --------------------------------------------------------
    def is_announced(self, addr: IPAddress) -> bool:
        return addr in self.announced

    def reason(self, addr: IPAddress) -> str:
        """Why addr is not announced ("" when it is)."""
        if addr in self.announced:
            return ""
        return self.failing.get(addr) or self.reasons.get(addr, HEALTH)

    def delay_left(self, delay: float) -> float:
        """Seconds until the last withdrawal has had `delay` to reach the router."""
        if self.last_withdrawal is None:
            return 0.0
        return max(0.0, self.last_withdrawal + delay - time.monotonic())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.routes.close()
