"""`xdplb explain`: the backend a new flow gets, computed in Python with the data path's
hash and ring (bit for bit). With a running instance its live rings and states are used,
and an existing connection-table entry is reported; without one, rings are built from the
config (admin states from state_file, every backend assumed healthy)."""

from __future__ import annotations

import ipaddress

from . import policy
from .config import PROTO_NUMBERS
from .flowhash import flow_hash
from .layout import flow_key
from .specs import ring_for


def _find_vip(vips, proto: int, dst, dport: int):
    for port in (dport, 0):
        v = next((v for v in vips if v.address == dst and v.port == port and
                  v.proto == proto), None)
        if v is not None:
            return v
    return None


def _result(vip, backend, slot, m, h, src_only, existing=None) -> dict:
    return {"vip": vip.name, "backend": backend, "slot": slot, "ring_size": m,
            "hash": f"0x{h:08x}", "hash_fields": "src_ip" if src_only else "5tuple",
            "existing_flow_backend": existing}


def explain_running(d, proto_name: str, src: str, sport: int, dst: str, dport: int) -> dict:
    proto = PROTO_NUMBERS[proto_name]
    srca, dsta = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    vip = _find_vip(d.cfg.vips, proto, dsta, dport)
    if vip is None:
        raise KeyError(f"{dst}:{dport}/{proto_name} is not a VIP")
    ident = (vip.address, vip.port, proto)
    cur, ring = d.programmer.installed(ident), d.programmer.ring(ident)
    if cur is None or ring is None:
        raise KeyError(f"VIP {vip.name} has no ring installed")
    src_only = vip.hash == "src_ip"
    h = flow_hash(proto, srca, sport, dsta, dport, src_only)
    slot = h % len(ring)
    bid = ring[slot]
    by_id = {i: str(a) for a, i in cur.backends.items()}
    existing = d.dp.flow_backend(flow_key(proto, srca, sport, dsta, dport))
    return _result(vip, by_id.get(bid), slot, len(ring), h, src_only,
                   by_id.get(existing) if existing else None)


def explain_offline(cfg, admin_of, proto_name: str, src: str, sport: int, dst: str,
                    dport: int) -> dict:
    proto = PROTO_NUMBERS[proto_name]
    srca, dsta = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    vip = _find_vip(cfg.vips, proto, dsta, dport)
    if vip is None:
        raise KeyError(f"{dst}:{dport}/{proto_name} is not a VIP")
    specs = policy.vip_specs(cfg, admin_of, lambda v, b: True, lambda a: "").specs
    spec = next(s for s in specs
                if s.address == vip.address and s.port == vip.port and s.proto == proto)
    ids = {b.address: i + 1 for i, b in enumerate(spec.backends)}
    ring = ring_for(spec, ids)
    src_only = vip.hash == "src_ip"
    h = flow_hash(proto, srca, sport, dsta, dport, src_only)
    slot = h % len(ring)
    by_id = {i: str(a) for a, i in ids.items()}
    r = _result(vip, by_id.get(ring[slot]), slot, len(ring), h, src_only)
    r["note"] = "no running instance: computed from the config, every backend assumed healthy"
    return r
