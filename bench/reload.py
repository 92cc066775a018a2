"""Reload latency: the time to apply a changed state to the maps, in-process through the
same Programmer the daemon's SIGHUP path uses (config parse and next-hop resolution are
timed separately from a real config file):

(a) one backend added to a VIP with 100 backends (one ring rebuilt and swapped);
(b) a full load of 1,000 VIPs x 10 backends at M = 65537 from empty maps;
and the daemon-side memory (RSS growth of this process) for (b): map memory is the
kernel's and is reported apart from it.

Targets: (a) <= 50 ms, (b) <= 3 s, RSS <= 200 MB beyond the maps.
"""

from __future__ import annotations

import ipaddress
import json
import os
import resource
import statistics
import time

from lb.datapath import Datapath, EgressConfig, Limits
from lb.layout import ring_layout
from lb.programmer import Programmer
from lb.specs import BackendSpec, VipSpec

MAC = {"gw": bytes.fromhex("020000000002")}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _vip(i: int, n_backends: int, m: int) -> VipSpec:
    addr = ipaddress.ip_address(0x0A640000 + i)  # 10.100.x.y
    bes = tuple(BackendSpec(ipaddress.ip_address(0x0A800000 + i * 64 + j), nexthop="gw")
                for j in range(n_backends))
    return VipSpec(addr, 80, 6, bes, ring_size=m)


def one_backend(m: int = 65537, trials: int = 7) -> list[float]:
    out = []
    with Datapath(Limits(max_vips=16, max_backends=1024, flow_table_size=1024)) as dp:
        dp.set_config(EgressConfig(mtu=1500))
        prog = Programmer(dp, keep_rings=False)
        base = _vip(1, 100, m)
        prog.apply([base], MAC)
        for t in range(trials):
            extra = BackendSpec(ipaddress.ip_address(0x0A900000 + t), nexthop="gw")
            grown = VipSpec(base.address, 80, 6, base.backends + (extra,), ring_size=m)
            t0 = time.perf_counter()
            rep = prog.apply([grown], MAC)
            out.append((time.perf_counter() - t0) * 1e3)
            assert rep.rings_swapped == 1 and rep.backends_added == 1
            prog.apply([base], MAC)
    return out


def full_load(n_vips: int = 1000, n_backends: int = 10, m: int = 65537) -> tuple[float, float]:
    limits = Limits(max_vips=n_vips + 8, max_backends=n_vips * n_backends + 8,
                    flow_table_size=1024)
    with Datapath(limits) as dp:
        dp.set_config(EgressConfig(mtu=1500))
        prog = Programmer(dp, keep_rings=False)  # as the daemon
        specs = [_vip(i, n_backends, m) for i in range(1, n_vips + 1)]
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        rep = prog.apply(specs, MAC)
        took = time.perf_counter() - t0
        rss = _rss_mb() - rss0
        assert rep.vips_added == n_vips and rep.rings_swapped == n_vips
    return took, rss


def run_reload(out_dir: str | None = None, n_vips: int = 1000) -> dict:
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    ones = one_backend()
    full_s, rss = full_load(n_vips)
    doc = {"one_backend_ms": round(statistics.median(ones), 3),
           "one_backend_ms_all": [round(x, 3) for x in ones],
           "full_load_s": round(full_s, 3), "full_load_vips": n_vips,
           "backends_per_vip": 10, "ring_size": 65537, "rss_mb": round(rss, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "kernel_map_mb_rings": round(n_vips * ring_layout(n_vips * 10 + 8).ring_bytes(65537)
                                        / 2**20, 1),  # full_load's limits
           "targets": {"one_backend_ms": 50, "full_load_s": 3, "rss_mb": 200}}
    with open(os.path.join(out_dir, "reload.json"), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"reload: one backend added to a 100-backend VIP {doc['one_backend_ms']} ms "
          f"(target 50); {n_vips} VIPs x 10 backends at M=65537 {doc['full_load_s']} s "
          f"(target 3); daemon RSS +{doc['rss_mb']} MB (target 200)")
    return doc
