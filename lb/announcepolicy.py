"""Which VIP addresses this node announces ([announce]): pure, facts in, decisions out.
lb/announce.py carries the decisions out (routes, rings held back).

A VIP qualifies when at least `min_backends` of its backends take new flows (active,
healthy, weight > 0; `all_down = "spread"` does not count). A route is per address, and
several VIPs (ports, protocols) may share one: the address is announced while any of its
VIPs is. State table of one address (first matching row wins):

  node stopping (SIGTERM)                       -> withdrawn, reason "shutdown"
  the attached interface is gone (deleted)      -> withdrawn, reason "interface"
  node withdrawn (`xdplb announce withdraw`)    -> withdrawn, reason "admin"
  a VIP qualifies, every backend of every VIP
    at the address verdicted                    -> announced
  announced now, a VIP qualifies (some backend
    still awaits its first verdict)             -> stays announced
  otherwise                                      -> withdrawn, reason "health"

"Verdicted": the backend has had its first health result (health type none counts as
verdicted). So a node (re)announces only with a complete view: an address announced
before every backend is checked would take flows from other nodes onto a partial ring,
and reset them. An address already announced is not withdrawn for a backend that a
reload adds (or for the adopted view after a restart) while its VIP still qualifies:
every node is in the same position then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from .layout import IPAddress

SHUTDOWN, INTERFACE, ADMIN, HEALTH = "shutdown", "interface", "admin", "health"


@dataclass(frozen=True)
class VipFacts:
    """What the decision needs of one VIP."""

    name: str
    address: IPAddress
    usable: int      # backends taking new flows
    verdicted: bool  # every backend has had its first health verdict


@dataclass(frozen=True)
class Decision:
    announce: bool
    reason: str      # why not, when withdrawn (shutdown, admin, health); "" when announced


def vip_facts(cfg, states: Mapping[tuple[str, str], object],
              verdicted_of) -> list[VipFacts]:
    """VipFacts of cfg's VIPs. states: (VIP name, backend address) -> policy.Effective;
    verdicted_of(vip, backend): has the pair had its first health verdict."""
    out = []
    for v in cfg.vips:
        usable = sum(1 for b in v.backends
                     if b.weight > 0 and states[(v.name, str(b.address))].in_ring)
        verdicted = (v.health.type == "none" or
                     all(verdicted_of(v.name, str(b.address)) for b in v.backends))
        out.append(VipFacts(v.name, v.address, usable, verdicted))
    return out


def decide(vips: Iterable[VipFacts], min_backends: int, announced: set,
           withdrawn: bool = False, stopping: bool = False,
           interface_missing: bool = False) -> dict[IPAddress, Decision]:
    """Each VIP address's decision. announced: the addresses announced now."""
    by_addr: dict[IPAddress, list[VipFacts]] = {}
    for v in vips:
        by_addr.setdefault(v.address, []).append(v)
    out = {}
    for addr, group in by_addr.items():
        qualifying = [v for v in group if v.usable >= min_backends]
        if stopping:
            out[addr] = Decision(False, SHUTDOWN)
        elif interface_missing:
            out[addr] = Decision(False, INTERFACE)
        elif withdrawn:
            out[addr] = Decision(False, ADMIN)
        elif qualifying and (all(v.verdicted for v in group) or addr in announced):
            out[addr] = Decision(True, "")
        else:
            out[addr] = Decision(False, HEALTH)
    return out
