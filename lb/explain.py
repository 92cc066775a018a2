"""`xdplb explain`: the backend a new flow gets, computed in Python with the data path's
hash and ring (bit for bit). With a running instance its live rings and states are used,
and an existing connection-table entry is reported; without one, rings are built from the
config (admin states from state_file, every backend assumed healthy).

With a QUIC connection ID (`--quic-cid HEX`, a short-header packet's destination ID) on a
QUIC VIP, the backend its server ID names is reported when the data path would route by it
(known server ID, backend active or draining), else why not and the ring's choice."""

from __future__ import annotations

import ipaddress

from . import policy
from .vipconfig import PROTO_NUMBERS
from .flowhash import flow_hash
from .layout import flow_key
from .specs import ring_for

UNROUTABLE_CONFIG = 7  # a connection ID's config id (top 3 bits) that routes nowhere


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


def parse_cid(text: str) -> bytes:
    """A connection ID given in hex (':' or '-' between bytes allowed); ValueError."""
    raw = text.replace(":", "").replace("-", "")
    try:
        cid = bytes.fromhex(raw)
    except ValueError:
        raise ValueError(f"--quic-cid {text!r}: not hex bytes (e.g. 2b0007a1b2c3d4e5)") from None
    if not 1 <= len(cid) <= 20:
        raise ValueError(f"--quic-cid: {len(cid)} bytes; a QUIC connection ID has 1..20")
    return cid


def _decode_cid(vip, cid: bytes) -> tuple[dict, int]:
    """The CID's fields in the VIP's layout, and its server ID (0: not routable)."""
    n = vip.quic_server_id_len
    info = {"cid": cid.hex(), "config_id": cid[0] >> 5, "routed_by_cid": False}
    if not vip.quic:
        info["reason"] = "not a quic VIP"
    elif cid[0] >> 5 == UNROUTABLE_CONFIG:
        info["reason"] = "config id 7: not routable"
    elif len(cid) < vip.quic_cid_len:
        info["reason"] = f"{len(cid)} bytes, shorter than quic_cid_len {vip.quic_cid_len}"
    else:
        info["server_id"] = int.from_bytes(cid[1:1 + n], "big")
        info["reason"] = f"no backend has server_id {info['server_id']}"
        return info, info["server_id"]
    return info, 0


def _by_cid(result: dict, info: dict, backend, usable: bool) -> dict:
    """`result` (the ring's answer) with the CID's verdict: its backend when usable."""
    if backend is not None and usable:
        info.update(routed_by_cid=True, reason=None)
        result = dict(result, backend=backend)
    elif backend is not None:
        info["reason"] = f"its backend {backend} is in maint or down"
    return dict(result, quic=info)


def explain_running(d, proto_name: str, src: str, sport: int, dst: str, dport: int,
                    quic_cid: str = "") -> dict:
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
    r = _result(vip, by_id.get(bid), slot, len(ring), h, src_only,
                by_id.get(existing) if existing else None)
    if not quic_cid:
        return r
    info, sid = _decode_cid(vip, parse_cid(quic_cid))
    target = next((t for q, t in d.programmer.quic.entries() if sid and
                   (q.address, q.port, q.server_id) == (vip.address, vip.port, sid)
                   and t.vip_id == cur.vip_id), None)
    addr = by_id.get(target.backend_id) if target else None
    return _by_cid(r, info, addr, addr is not None and
                   ipaddress.ip_address(addr) in cur.flows_stay)


def explain_offline(cfg, admin_of, proto_name: str, src: str, sport: int, dst: str,
                    dport: int, quic_cid: str = "") -> dict:
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
    if not quic_cid:
        return r
    info, sid = _decode_cid(vip, parse_cid(quic_cid))
    b = next((b for b in spec.backends if sid and b.server_id == sid), None)
    return _by_cid(r, info, str(b.address) if b else None, b is not None and b.keep_flows)
