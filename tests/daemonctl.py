"""A real xdplb daemon from the tests' side: the CLI, and the rings it installed read from
the pinned maps. (Starting, waiting for and stopping it: lb.lab.instance.)"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import subprocess
import sys
from typing import Optional

from lb import datapath, layout
from lb.native import Map


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lb.cli", *args], capture_output=True,
                          text=True, timeout=60)


def stats(config: str) -> dict:
    r = cli("stats", "--json", "--config", config)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def pinned_ring(pin: str, vip_addr: str, port: int, proto: int) -> list:
    """The ring the data path uses now for a VIP, as backend addresses (None: empty
    slot; [] when the VIP has no ring or it is being swapped), read from the maps pinned
    under `pin` (KeyError: no such VIP)."""
    ids = datapath.pinned_ring(pin, ipaddress.ip_address(vip_addr), port, proto)
    if ids is None:
        return []
    names: dict[int, Optional[str]] = {}
    with Map.from_pin(f"{pin}/backends") as bes:
        for bid in set(ids):
            b = layout.Backend.unpack(bes.lookup(ctypes.c_uint32(bid))) if bid else None
            names[bid] = (str(layout.words_addr(b.addr, b.family))
                          if b is not None and b.family != layout.AF_NONE else None)
    return [names[bid] for bid in ids]
