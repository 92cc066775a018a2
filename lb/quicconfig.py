"""The QUIC keys of a [[vip]] (`quic`, `quic_server_id_len`, `quic_cid_len`) and the
`server_id` of its backends, checked against each other (part of lb/config.py's schema).

QUIC-LB plaintext layout: a connection ID's byte 0 is its first octet (top 3 bits: config
id), bytes 1..quic_server_id_len the server ID (big endian), the rest the server's nonce.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .tomltable import Table

CID_LEN_MAX = 20  # RFC 9000: connection IDs are at most 20 bytes
SID_LEN_MAX = 4


def read_quic(t: Table, protocol: str, port: Optional[int]) -> dict:
    """The VIP's QUIC keys as Vip fields; problems reported on `t`."""
    quic = t.boolean("quic", False)
    sid_len = t.integer("quic_server_id_len", 2, 1, SID_LEN_MAX)
    cid_len = t.integer("quic_cid_len", 8, 1, CID_LEN_MAX)
    if cid_len < 1 + sid_len:
        t.report("quic_cid_len", f"{cid_len} cannot hold a {sid_len}-byte server ID after "
                                 f"the first octet (at least {1 + sid_len})")
    if quic and protocol != "udp":
        t.report("quic", f"only for UDP VIPs (this one is {protocol}): set protocol = "
                         f"\"udp\" or remove quic")
    elif quic and port == 0:
        t.report("quic", "needs the VIP's UDP port (e.g. 443), not port = 0 (any port)")
    return {"quic": quic, "quic_server_id_len": sid_len, "quic_cid_len": cid_len}


def check_server_ids(t: Table, quic: dict, backends: Sequence) -> None:
    """Each backend's server_id fits the VIP's server-ID length; on a QUIC VIP every
    backend has one and no two share one."""
    sid_len = quic["quic_server_id_len"]
    top = (1 << (8 * sid_len)) - 1
    seen: dict[int, str] = {}
    for b in backends:
        where = f"{t.where} backend {b.address}: server_id"
        if b.server_id is None:
            if quic["quic"]:
                t.problems.append(f"{where}: required on a quic VIP (1..{top}, unique "
                                  f"within the VIP)")
            continue
        if b.server_id > top:
            t.problems.append(f"{where}: {b.server_id} out of range 1..{top} "
                              f"(quic_server_id_len = {sid_len})")
        elif quic["quic"] and b.server_id in seen:
            t.problems.append(f"{where}: {b.server_id} is also backend "
                              f"{seen[b.server_id]}'s (unique within the VIP)")
        seen.setdefault(b.server_id, str(b.address))
