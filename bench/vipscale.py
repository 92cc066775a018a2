"""xdplb's per-packet cost against its number of VIPs, measured like bench/cost.py.

Two data paths are loaded side by side: one with 1 VIP, one with 10,000 (the same
services as the iptables sweep: 2 backends each, Maglev ring of 1009). Both get the same
number of established flows (20,000): spread over all VIPs on the big one, all to the one
VIP on the small one. Frames come from bench_restore with bench_gen_cfg set, so every run
is the next flow of the cycle (destination address and source port varied as the live
generator does); the first pass over the cycle inserts every flow, and the measured runs
are all flow-table hits (proved by the counters). The floor (bench_floor under the same
wrapper and the same varied frames) is measured in every round.

Why not the live-frames runs (bench/iptables.py measures those too): one round there
varies by up to 2x against the next on this shared machine, which cannot resolve a 10%
target; BPF_PROG_TEST_RUN on one pinned CPU varies by a few percent.

ratio = median hi ns / median lo ns (the whole per-packet cost, wrapper included, as in
cost.json); ratio_over_floor subtracts the floor from both.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
from typing import Optional

from lb import layout as L
from lb import native
from lb.datapath import Datapath, EgressConfig, Limits
from lb.programmer import Programmer

from . import results_dir
from .cost import NEXTHOP_MAC, SMAC, SRC_V4, SRC_V6, machine_info, pick_cpu
from .iptables import ENDPOINTS, EST_FLOWS, traffic, xdplb_services
from .pktgen import Traffic

TARGET = 1.10
MACS = (bytes.fromhex("020000000a01"), bytes.fromhex("020000000a02"))
COUNTERS = ("rx", "tx", "flow_hit", "flow_miss", "flow_cache_hit", "drop", "pass")


class Side:
    """One loaded data path with n services, and the bench programs around it."""

    def __init__(self, n: int, flow_table_size: int):
        self.n = n
        self.dp = Datapath(Limits(flow_table_size=flow_table_size, max_vips=n + 64,
                                  max_backends=n * ENDPOINTS + 64))
        self.bench = None
        try:
            self.dp.set_config(EgressConfig(smac=SMAC, source_v4=SRC_V4, source_v6=SRC_V6,
                                            mtu=1500))
            Programmer(self.dp).apply(xdplb_services(n, ENDPOINTS), macs={"nh": NEXTHOP_MAC})
            self.bench = native.Skeleton("bench")
            self.bench.load()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.bench is not None:
            self.bench.close()
            self.bench = None
        self.dp.close()

    def run(self, t: Traffic, repeat: int, floor: bool = False) -> tuple[float, dict]:
        frame = t.frame(*MACS)
        tmpl = L.BenchTemplate()
        tmpl.len = len(frame) // 8 * 8
        tmpl.data[:tmpl.len] = frame[:tmpl.len]
        self.bench.map("bench_template").update(ctypes.c_uint32(0), tmpl)
        self.bench.map("bench_gen_cfg").update(ctypes.c_uint32(0), t.gen_cfg())
        fd = self.bench.prog_fd("bench_floor") if floor else self.dp.prog_fd
        self.bench.map("bench_target").update_fd(ctypes.c_uint32(0), fd)
        g0 = self.dp.global_counters()
        r = native.test_run(self.bench.prog_fd("bench_restore"), frame, repeat=repeat)
        g1 = self.dp.global_counters()
        return float(r.duration_ns), {k: g1[k] - g0[k] for k in COUNTERS}


def run_vipscale(out: Optional[str] = None, n_lo: int = 1, n_hi: int = 10_000,
                 flows: int = EST_FLOWS, rounds: int = 15, repeat: int = 1_000_000,
                 cpu: Optional[int] = None, flow_table_size: int = 1 << 20,
                 quiet: bool = False) -> dict:
    cpu = pick_cpu(cpu)
    old_aff = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    lo = hi = None
    try:
        lo, hi = Side(n_lo, flow_table_size), Side(n_hi, flow_table_size)
        t_hi = traffic("est", n_hi, 64, flows)
        t_lo = Traffic(f"est{n_lo}", dst=t_hi.dst, size=64, flows=t_hi.flows, vips=n_lo)
        sides = {"lo": (lo, t_lo), "hi": (hi, t_hi)}
        for side, t in sides.values():  # first pass inserts every flow, second warms
            side.run(t, 2 * t.distinct_flows())
        ns: dict = {"floor": [], "lo": [], "hi": []}
        verdicts: dict = {"lo": {}, "hi": {}}
        for rnd in range(rounds):
            ns["floor"].append(hi.run(t_hi, repeat, floor=True)[0])
            for key in (("lo", "hi") if rnd % 2 == 0 else ("hi", "lo")):
                side, t = sides[key]
                x, d = side.run(t, repeat)
                ns[key].append(x)
                for k, v in d.items():
                    verdicts[key][k] = verdicts[key].get(k, 0) + v
    finally:
        for s in (lo, hi):
            if s is not None:
                s.close()
        os.sched_setaffinity(0, old_aff)

    med = {k: statistics.median(v) for k, v in ns.items()}
    runs = rounds * repeat
    ok = all(v["rx"] == v["tx"] == v["flow_hit"] == runs and v["flow_miss"] == 0
             for v in verdicts.values())
    over_lo, over_hi = med["lo"] - med["floor"], med["hi"] - med["floor"]
    doc = {"services": [n_lo, n_hi], "flows": t_hi.distinct_flows(),
           "endpoints_per_service": ENDPOINTS, "ring_size": xdplb_services(1)[0].ring_size,
           "ns": [round(med["lo"], 1), round(med["hi"], 1)],
           "floor_ns": round(med["floor"], 1),
           "ratio": round(med["hi"] / med["lo"], 3),
           "ratio_over_floor": round(over_hi / over_lo, 3) if over_lo > 0 else None,
           "ratio_all": [round(h / lw, 3) for h, lw in zip(ns["hi"], ns["lo"])],
           "ns_all": {k: [round(x, 1) for x in v] for k, v in ns.items()},
           "verdicts": verdicts, "ok": ok,
           "flow_cache_hit_share": round(verdicts["hi"]["flow_cache_hit"] / runs, 3),
           "target": TARGET,
           "params": {"rounds": rounds, "repeat": repeat,
                      "flow_table_size": flow_table_size},
           "machine": machine_info(cpu)}
    path = results_dir(out) / "vipscale.json"
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    if not quiet:
        print(f"VIP scaling (BPF_PROG_TEST_RUN, {doc['flows']:,} established flows, median "
              f"of {rounds} rounds): {n_hi:,} VIPs {doc['ns'][1]:.0f} ns vs {n_lo} VIP "
              f"{doc['ns'][0]:.0f} ns per packet -> {doc['ratio']:.3f} (target <= {TARGET}); "
              f"beyond the floor ({doc['floor_ns']:.0f} ns): {doc['ratio_over_floor']}; "
              f"path {'ok' if ok else 'CHECK FAILED'}")
        print(f"-> {path}")
    return doc
