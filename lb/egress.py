"""The egress settings the data path gets (`EgressConfig`) from the lb section and the
interface packets leave by."""

from __future__ import annotations

from .datapath import EgressConfig
from .errors import XdplbError
from .layout import ENCAP_GUE, ENCAP_IPIP, TX_REDIRECT, TX_XDP_TX
from .nexthop import Interface


def egress_config(cfg, eg: Interface, ingress: Interface) -> EgressConfig:
    """cfg: a Config; eg: the egress interface (the ingress one unless
    lb.egress_interface, which makes the data path redirect to it); ingress: the one the
    program is attached to (frames to another MAC than its own are not forwarded)."""
    src4 = cfg.lb.source_v4 or (eg.v4[0] if eg.v4 else None)
    src6 = cfg.lb.source_v6 or (eg.v6[0] if eg.v6 else None)
    fams = {b.address.version for v in cfg.vips for b in v.backends}
    if 4 in fams and src4 is None:
        raise XdplbError(f"IPv4 backends need an outer source: set lb.source_v4 or add an "
                         f"IPv4 address to {eg.name}")
    if 6 in fams and src6 is None:
        raise XdplbError(f"IPv6 backends need an outer source: set lb.source_v6 or add an "
                         f"IPv6 address to {eg.name}")
    redirect = bool(cfg.lb.egress_interface)
    return EgressConfig(
        smac=eg.mac, encap=ENCAP_GUE if cfg.lb.encap == "gue" else ENCAP_IPIP,
        tx_mode=TX_REDIRECT if redirect else TX_XDP_TX, tx_port=eg.index if redirect else None,
        source_v4=src4, source_v6=src6, gue_port=cfg.lb.gue_port, mtu=eg.mtu,
        flow_insert_limit=cfg.lb.flow_insert_limit, answer_ping=cfg.lb.answer_ping,
        too_big_per_sec=cfg.lb.too_big_per_sec, if_mac=ingress.mac)
