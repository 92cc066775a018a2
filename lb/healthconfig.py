"""[health] and [vip.health] of the configuration (part of lb/config.py's schema): the
keys, the defaults, and a VIP's check resolved over the [health] defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .tomltable import MISSING, Table
from .valuecheck import fmt

HEALTH_TYPES = ("tcp", "http", "none")


@dataclass(frozen=True)
class HealthSection:
    """[health] (defaults for every VIP) and, resolved, each VIP's health check.

    In [health], `port` may be None (= each VIP's port); in `Vip.health` it is always set
    (0 only for `type = "none"` on a VIP that listens on any port)."""

    type: str = "tcp"
    port: Optional[int] = None
    path: str = "/"
    expect_status: int = 200
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3


def _read_health(t: Table) -> dict[str, Any]:
    """The health keys present (and valid) in one table, checked one by one."""
    values = dict(
        type=t.choice("type", MISSING, HEALTH_TYPES),
        port=t.integer("port", MISSING, 1, 65535),
        path=t.url_path("path"),
        expect_status=t.integer("expect_status", MISSING, 100, 599),
        interval=t.positive("interval", MISSING),
        timeout=t.positive("timeout", MISSING),
        rise=t.integer("rise", MISSING, 1, 1000),
        fall=t.integer("fall", MISSING, 1, 1000),
    )
    t.finish()
    return {k: v for k, v in values.items() if v is not MISSING}


def _timing_problem(h: HealthSection) -> Optional[str]:
    if h.timeout > h.interval:
        return f"{fmt(h.timeout)} exceeds interval {fmt(h.interval)}"
    return None


def parse_health_defaults(t: Table) -> HealthSection:
    health = HealthSection(**_read_health(t))
    problem = _timing_problem(health)
    if problem:
        t.report("timeout", problem)
    return health


def resolve_health(t: Table, base: HealthSection, vip_port: Optional[int]) -> HealthSection:
    """A VIP's [vip.health] (table `t`, possibly empty) merged over [health]."""
    own = _read_health(t)
    health = dataclasses.replace(base, **own)
    problem = _timing_problem(health)
    if problem and ("interval" in own or "timeout" in own):  # else [health] reported it
        t.report("timeout", problem)
    if health.port is None:
        if vip_port == 0 and health.type != "none":
            t.report("port", f"required: the VIP takes any port (port = 0), so its "
                             f"{health.type} check needs an explicit port")
        health = dataclasses.replace(health, port=vip_port or 0)
    return health
