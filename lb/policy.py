"""From config, admin states and health to what the data path gets (VipSpec list), and
the effective state of each VIP/backend pair, computed here once.

The spec's state table:
  active and healthy -> new flows by weight, existing flows stay
  drain              -> no new flows, existing flows stay (a drained backend that is down
                        loses its flows: down wins)
  maint / down       -> no new flows, existing flows moved
`all_down = "spread"`: when no backend is usable, every non-maint backend takes flows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from .layout import IPAddress
from .specs import BackendSpec, QuicSpec, VipSpec


@dataclass(frozen=True)
class Effective:
    state: str        # active | drain | maint | down
    in_ring: bool
    keep_flows: bool


def effective(admin: str, up: bool) -> Effective:
    if admin == "maint":
        return Effective("maint", False, False)
    if not up:
        return Effective("down", False, False)
    if admin == "drain":
        return Effective("drain", False, True)
    return Effective("active", True, True)


class Desired(NamedTuple):
    specs: list[VipSpec]
    states: dict[tuple[str, str], Effective]  # (VIP name, backend address) -> its state


def vip_specs(cfg, admin_of: Callable[[str, str], str], up_of: Callable[[str, str], bool],
              nexthop_of: Callable[[IPAddress], str]) -> Desired:
    """The specs for the data path, and each VIP/backend pair's effective state (before
    `spread`, which changes what a backend takes, not the state it is reported in)."""
    specs, states = [], {}
    for vip in cfg.vips:
        pairs = []
        for b in vip.backends:
            addr = str(b.address)
            e = states[(vip.name, addr)] = effective(admin_of(vip.name, addr),
                                                     up_of(vip.name, addr))
            pairs.append((b, e))
        spread = vip.all_down == "spread" and not any(e.in_ring and b.weight > 0
                                                      for b, e in pairs)
        backends = []
        for b, e in pairs:
            in_ring, keep = e.in_ring, e.keep_flows
            if spread and e.state != "maint":
                in_ring = keep = True
            backends.append(BackendSpec(b.address, b.weight, in_ring, keep,
                                        nexthop_of(b.address),
                                        (b.server_id or 0) if vip.quic else 0))
        quic = QuicSpec(vip.quic_server_id_len, vip.quic_cid_len) if vip.quic else None
        specs.append(VipSpec(vip.address, vip.port, vip.proto, tuple(backends),
                             vip.hash == "src_ip", cfg.lb.ring_size, quic))
    return Desired(specs, states)
