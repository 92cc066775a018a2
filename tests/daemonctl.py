"""A real xdplb daemon from the tests' side: the CLI, and the rings it installed read from
the pinned maps. (Starting, waiting for and stopping it: lb.lab.instance.)"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import subprocess
import sys
from typing import Optional

from lb import layout, maglev, rings
from lb.native import Map
from lb.specs import backend_key

import configtext


FAST_HTTP_HEALTH = {"type": "http", "path": "/healthz", "interval": 0.5, "timeout": 0.4,
                    "rise": 1, "fall": 2}


def lab_config(files, backends=("10.200.0.11", "10.200.0.12", "10.200.0.13"),
               health: Optional[dict] = None, interface: str = "lb0", **lb) -> str:
    """A config for the lab of lb.lab.topology (tx variant): `files`' [lb] table with `lb`
    settings, [health] (default FAST_HTTP_HEALTH: up after one check) and the VIP web
    (tcp/80) over `backends`."""
    health = FAST_HTTP_HEALTH if health is None else health
    return (files.lb_table(interface, **lb) + configtext.section("health", **health)
            + configtext.vip("web", "10.200.1.10", 80, backends, protocol="tcp"))


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
    ids = rings.pinned_ring(pin, ipaddress.ip_address(vip_addr), port, proto)
    if ids is None:
        return []
    names: dict[int, Optional[str]] = {}
    with Map.from_pin(f"{pin}/backends") as bes:
        for bid in set(ids):
            b = layout.Backend.unpack(bes.lookup(ctypes.c_uint32(bid))) if bid else None
            names[bid] = (str(layout.words_addr(b.addr, b.family))
                          if b is not None and b.family != layout.AF_NONE else None)
    return [names[bid] for bid in ids]


def expected_ring(addresses, m: int) -> list:
    """The Maglev ring of m slots (as backend addresses) that backends `addresses` get."""
    if not addresses:
        return [None] * m
    addrs = sorted((ipaddress.ip_address(a) for a in addresses), key=backend_key)
    table = maglev.build_reference([maglev.Slotholder(backend_key(a)) for a in addrs], m)
    return [str(addrs[i]) for i in table]
