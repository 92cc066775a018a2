"""The `xdplb stats --json` document (shape fixed by the spec; extra fields allowed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .health import ProbeResult


@dataclass(frozen=True)
class BackendView:
    """One VIP/backend pair as `stats` shows it."""

    admin: str     # admin state (runtime, else config)
    healthy: bool  # health now
    state: str     # effective state the maps hold (health flips reach them in batches)
    last: Optional[ProbeResult]  # last check, None before the first (or checks off)
    checks: int    # checks recorded


DROP_REASONS = ("no_backend", "malformed", "too_big", "fragment", "ip_options", "no_nexthop",
                "adjust_fail")


def global_section(c: dict[str, int]) -> dict:
    return {"rx_packets": c["rx"], "tx": c["tx"], "redirect": c["redirect"],
            "pass": c["pass"], "drop": c["drop"], "flow_hits": c["flow_hit"],
            "flow_misses": c["flow_miss"], "flow_moved": c["flow_moved"],
            "flow_cache_hits": c["flow_cache_hit"],
            "flow_insert_limited": c["flow_insert_limited"],
            "flow_evictions": c["flow_evicted"], "flow_insert_raced": c["flow_insert_raced"],
            "gue_zero_csum": c["gue_zero_csum"],
            "icmp_forwarded": c["icmp_forwarded"], "too_big_answered": c["too_big_answered"],
            "too_big_limited": c["too_big_limited"], "echo_answered": c["echo_answered"],
            "other_host_passed": c["other_host_passed"],
            "quic_routed_by_cid": c["quic_routed_by_cid"], "quic_fallback": c["quic_fallback"],
            "drops": {r: c[f"drop_{r}"] for r in DROP_REASONS}}


def stats_snapshot(d) -> dict:
    """d: a running Daemon (read through cfg, backend_view(), health, programmer, dp)."""
    dp, view = d.dp, d.backend_view()
    vips = []
    for v in d.cfg.vips:
        cur = d.programmer.installed(v.ident)
        (packets, nbytes), per_backend = (dp.vip_counters(cur.vip_id, cur.backends.values())
                                          if cur else ((0, 0), {}))
        backends = []
        for b in v.backends:
            addr = str(b.address)
            bid = cur.backends.get(b.address) if cur else None
            bp, bb = per_backend.get(bid, (0, 0))
            pair = view[(v.name, addr)]
            last = pair.last
            backends.append({
                # the state the data path applies (a health flip is in `healthy` at once
                # and in `state` once the maps have it, within HEALTH_BATCH_S)
                "address": addr,
                "state": pair.state,
                "healthy": pair.healthy,
                "weight": b.weight, "packets": bp, "bytes": bb, "admin_state": pair.admin,
                "last_check": last.reason if last else ("not checked" if v.health.type != "none"
                                                        else "health checks off"),
                "last_check_ok": last.ok if last else None,
                "latency_ms": round(last.latency_s * 1e3, 3) if last else None,
                "last_check_at": round(last.at, 3) if last else None,
                "checks": pair.checks,
                # without a next-hop MAC every packet to it is dropped (no_nexthop)
                "nexthop": "resolved" if d.nexthops.resolved(b.address) else "unresolved",
            })
        vip = {"name": v.name, "address": str(v.address), "port": v.port,
               "protocol": v.protocol, "packets": packets, "bytes": nbytes,
               "backends": backends}
        if d.announcer is not None:  # [announce]: its address's route is in place
            vip["announced"] = d.announcer.is_announced(v.address)
        vips.append(vip)
    doc = {"vips": vips, "global": global_section(dp.global_counters())}
    figures = d.health.figures()
    if figures is not None:
        # the health scheduler's own figures (extra keys: the spec's top level stays
        # vips/global)
        doc["global"]["health_checks"] = figures
    return doc


def render_table(doc: dict, rates: dict | None = None) -> str:
    """Human view of a stats document; rates: same shape of per-second packet rates."""
    lines = []
    g = doc["global"]
    lines.append(f"rx {g['rx_packets']}  tx {g['tx']}  redirect {g['redirect']}  "
                 f"pass {g['pass']}  drop {g['drop']}  flow hit/miss {g['flow_hits']}/"
                 f"{g['flow_misses']}  drops " +
                 " ".join(f"{k}={v}" for k, v in g["drops"].items() if v))
    for v in doc["vips"]:
        rate = f"  {rates[v['name']]:.0f} pps" if rates and v["name"] in rates else ""
        lines.append(f"{v['name']:<12} {v['address']}:{v['port']}/{v['protocol']}  "
                     f"packets {v['packets']}  bytes {v['bytes']}{rate}")
        for b in v["backends"]:
            lat = f"{b['latency_ms']:.1f} ms" if b.get("latency_ms") is not None else "-"
            health = "up" if b.get("healthy") else "down"
            admin = b.get("admin_state", "-")
            lines.append(f"  {b['address']:<24} {b['state']:<7} admin={admin:<6} "
                         f"health={health:<4} w={b['weight']:<3} "
                         f"packets {b['packets']:<10} bytes {b['bytes']:<12} "
                         f"check: {b.get('last_check', '-')} ({lat})")
    return "\n".join(lines)
