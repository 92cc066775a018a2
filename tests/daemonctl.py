"""A real xdplb daemon from the tests' side: the CLI, and the rings it installed read from
the pinned maps. (Starting, waiting for and stopping it: lb.lab.instance.)"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import subprocess
import sys
from typing import Optional

from lb import layout
from lb.native import Map, lib


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lb.cli", *args], capture_output=True,
                          text=True, timeout=60)


def stats(config: str) -> dict:
    r = cli("stats", "--json", "--config", config)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def pinned_ring(pin: str, vip_addr: str, port: int, proto: int) -> list:
    """The ring the data path uses now for a VIP, as backend addresses (None: empty
    slot; [] when the VIP has no ring), read from the maps pinned under `pin`."""
    with Map.from_pin(f"{pin}/vips") as vips:
        raw = vips.lookup(layout.vip_key(ipaddress.ip_address(vip_addr), port, proto))
    assert raw is not None, "VIP not in the map"
    meta = layout.VipMeta.unpack(raw)
    with Map.from_pin(f"{pin}/rings") as rings:
        slot = rings.lookup(ctypes.c_uint32(meta.ring_id))
    if slot is None:
        return []
    inner_id = ctypes.c_uint32.from_buffer_copy(slot).value
    names: dict[int, Optional[str]] = {}
    out = []
    with Map.from_fd(lib.bpf_map_get_fd_by_id(inner_id)) as inner, \
            Map.from_pin(f"{pin}/backends") as bes:
        for i in range(inner.max_entries):
            bid = ctypes.c_uint32.from_buffer_copy(inner.lookup(ctypes.c_uint32(i))).value
            if bid not in names:
                b = layout.Backend.unpack(bes.lookup(ctypes.c_uint32(bid))) if bid else None
                names[bid] = (str(layout.words_addr(b.addr, b.family))
                              if b is not None and b.family != layout.AF_NONE else None)
            out.append(names[bid])
    return out
