"""Driving a real xdplb daemon from tests: start it in a lab's LB namespace, read its JSON
log events, call the CLI, and read the rings it installed from the pinned maps."""

from __future__ import annotations

import ctypes
import ipaddress
import json
import signal
import subprocess
import sys
import time
from typing import Optional

from lb import layout
from lb.native import Map, lib


class Daemon:
    """`python -m lb.cli --config CONFIG` in `lab`'s LB namespace, logging JSON to `log`."""

    def __init__(self, lab, config: str, log: str):
        self.config, self.logpath = config, log
        self.proc = lab.spawn_lb([sys.executable, "-m", "lb.cli", "--config", config],
                                 stdout=open(log, "a"), stderr=subprocess.STDOUT)

    def events(self, name: Optional[str] = None, after: int = 0, **match) -> list[dict]:
        out = []
        with open(self.logpath) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({})
        return [e for e in out[after:] if (name is None or e.get("event") == name)
                and all(e.get(k) == v for k, v in match.items())]

    def mark(self) -> int:
        return len(self.events())

    def wait(self, name: str, after: int = 0, timeout: float = 20, **match) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.events(name, after, **match)
            if ev:
                return ev[0]
            assert self.proc.poll() is None, f"daemon exited: {self.tail()}"
            time.sleep(0.03)
        raise AssertionError(f"no {name} {match}; log: {self.tail()}")

    def tail(self) -> str:
        return open(self.logpath).read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


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
