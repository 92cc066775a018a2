"""Packet-rate runs through xdplb on real interfaces: offered / forwarded Mpps, loss and
Mpps per core, each next to the floor measured in the same run; `python -m bench pktgen`
-> pktgen.json, pktgen.png.

Where things are: frames and traffic patterns in bench/frames.py and bench/traffic.py, the
namespaces, veths and live-frames generator in bench/pktlab.py, measuring and summaries in
bench/runner.py, the kernel's pktgen (edge nodes, UDP only) in bench/kernel_pktgen.py; this
module holds the xdplb cases and the entry point.

One core. The generator thread is pinned to one CPU, and the data path and the sink run
there too (bench/pktlab.py), so a run's Mpps is what one core does for generator + data
path + sink; the floor (bench_floor: MAC swap + XDP_TX, the cheapest forwarding program)
carries the same generator and sink, so "ratio" = case Mpps / floor Mpps, and
"ns_over_floor" = the data path's own extra cost per packet on that core. With threads=N,
N generator threads on N CPUs (veths with one queue per CPU). Clocks: bench/runner.py.

Proof of path: every measurement records the deltas of bench_stats (GEN, FLOOR_TX,
SINK_PKTS, SINK_BYTES) and of xdplb's global counters; "ok" says every packet xdplb
received took the path the case names (e.g. hit: rx == tx == flow_hit), "loss" compares
what the sink counted with what was generated (0 on every run here).
"""

from __future__ import annotations

import ipaddress
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from lb import layout
from lb.flowhash import prefilter_index

from . import publish, save_figure, subplots
from .cost import machine_info
from .kernel_pktgen import KernelPktgen, kernel_pktgen_cases
from .pktlab import OTHER_NET, PktLab
from .runner import LbSetup, Runner, check, lb_vips, pick_cpus, summarize
from .traffic import SRC6, VIP4, VIP6, Traffic


@dataclass
class Case:
    name: str
    traffic: Traffic
    desc: str
    encap: int = layout.ENCAP_IPIP
    tx_mode: int = layout.TX_XDP_TX
    baseline: str = "floor"   # floor | stack (non-VIP: also xdp_pass + the kernel stack)
    expect: tuple = ()        # counters that must all equal the first (xdplb's rx)
    zero: tuple = ()          # counters that must stay 0
    threads: int = 1


def non_vip(vips: Sequence) -> ipaddress.IPv4Address:
    """A destination in OTHER_NET whose prefilter bit no VIP has: xdplb's pass path."""
    taken = {prefilter_index(v) for v in vips}
    base = int(ipaddress.ip_address(OTHER_NET.split("/")[0]))
    for i in range(1, 4096):
        a = ipaddress.ip_address(base + i)
        if prefilter_index(a) not in taken:
            return a
    raise RuntimeError("no non-VIP address outside the prefilter")


def make_cases(size: int = 64, flows: int = 1024, threads: int = 1,
               all_cores: int = 0) -> list[Case]:
    hit = Traffic("hit", size=size, flows=flows)
    syn = Traffic("syn", size=size, flows=0)
    other = Traffic("nonvip", dst=non_vip([VIP4, VIP6]), size=size, flows=flows)
    v6 = Traffic("ipv6", dst=VIP6, src=SRC6, size=max(size, 80), flows=flows)
    fwd = ("rx", "tx")
    cases = [
        Case("hit", hit, f"TCP to a VIP, {flows} flows all in the flow table, IPIP, XDP_TX",
             expect=fwd + ("flow_hit",), zero=("flow_miss", "drop")),
        Case("syn", syn, "TCP SYN, every packet a new flow (flow-table miss + insert), "
             "IPIP, XDP_TX", expect=fwd + ("flow_miss",), zero=("flow_hit", "drop")),
        Case("nonvip", other, "not to a VIP: xdplb passes it, the LB's kernel stack "
             "forwards it to the sink (ratio against xdp_pass + the same stack)",
             baseline="stack", expect=("rx", "pass"), zero=("tx", "drop")),
        Case("ipv6", v6, f"IPv6 TCP to a VIP, {flows} flows in the table, IP6IP6, XDP_TX "
             f"({max(size, 80)}-byte frames)", expect=fwd + ("flow_hit",),
             zero=("flow_miss", "drop")),
        Case("gue", hit, "as hit, GUE encapsulation (UDP, checksum computed)",
             encap=layout.ENCAP_GUE, expect=fwd + ("flow_hit",), zero=("flow_miss", "drop")),
        Case("redirect", hit, "as hit, XDP_REDIRECT out of the second veth (devmap)",
             tx_mode=layout.TX_REDIRECT, expect=("rx", "redirect", "flow_hit"),
             zero=("tx", "flow_miss", "drop")),
    ]
    if all_cores > 1:
        cases.append(Case(f"hit_{all_cores}cores", hit, f"as hit, {all_cores} generator "
                          f"threads on {all_cores} CPUs (veths with a queue per CPU)",
                          expect=fwd + ("flow_hit",), zero=("flow_miss", "drop"),
                          threads=all_cores))
    if threads > 1:
        for c in cases:
            c.threads = max(c.threads, threads)
    return cases


def run_cases(lab: PktLab, lbs: LbSetup, cases: Sequence[Case], rounds: int = 3,
              duration: float = 0.5, batch: int = 64, rate: float = 0.0,
              quiet: bool = True, count: int = 0) -> dict:
    """Every case `rounds` times, each right after a floor measurement with the same
    traffic (and, for stack-baseline cases, a run of the reference program too)."""
    floor_fd, pass_fd = lab.prog("bench_floor"), lab.pass_fd
    runners: dict[int, Runner] = {}

    def runner(threads: int) -> Runner:
        if threads not in runners:
            runners[threads] = Runner(lab, lbs.dp, pick_cpus(threads), batch, rate,
                                      duration, count=count,
                                      min_count=min(20_000, count or 20_000),
                                      probe_count=min(20_000, count or 20_000))
        return runners[threads]

    fill = None
    if any(c.traffic.new_flows for c in cases):
        lbs.apply(lb_vips())
        fill = lbs.fill_flow_table(runner(1))
    samples: dict[str, list] = {c.name: [] for c in cases}
    floors: dict[str, list] = {c.name: [] for c in cases}
    refs: dict[str, list] = {c.name: [] for c in cases}
    for rnd in range(rounds):
        for c in cases:
            r = runner(c.threads)
            lbs.configure(c.encap, c.tx_mode)
            lbs.apply(lb_vips(), c.tx_mode)
            floors[c.name].append(r.measure("floor", floor_fd, c.traffic))
            if c.baseline == "stack":
                refs[c.name].append(r.measure("stack", pass_fd, c.traffic))
            samples[c.name].append(r.measure("xdplb", lbs.dp.prog_fd, c.traffic))
            if not quiet:
                s = samples[c.name][-1]
                print(f"  round {rnd + 1}/{rounds} {c.name:12} {s.per_core_mpps:6.2f} Mpps/core "
                      f"(floor {floors[c.name][-1].per_core_mpps:.2f})", flush=True)
    out: dict = {}
    for c in cases:
        e = summarize(samples[c.name], floors[c.name])
        e.update({"desc": c.desc, "threads": c.threads, "frame_bytes": c.traffic.size,
                  "flows": c.traffic.distinct_flows() or "new per packet",
                  "expect": list(c.expect), "ok": check(e, c.expect, c.zero),
                  "baseline": c.baseline})
        if c.baseline == "stack":
            ref = summarize(refs[c.name], floors[c.name])
            e["stack_per_core_mpps"] = ref["per_core_mpps"]
            ratios = [s.per_core_mpps / f.per_core_mpps if f.per_core_mpps else math.nan
                      for s, f in zip(samples[c.name], refs[c.name])]
            e["ratio_to_stack"] = round(statistics.median(ratios), 3)
            e["stack_counters"] = ref["counters"]
        fl = summarize(floors[c.name], [])
        e["floor_counters"] = fl["counters"]
        e["floor_ok"] = check(fl, ("floor_tx",), ())
        out[c.name] = e
    return {"cases": out, "flow_table_fill": fill}


def run_pktgen(out: Optional[str] = None, rounds: int = 3, duration: float = 0.5,
               size: int = 64, flows: int = 1024, threads: int = 1, rate: float = 0.0,
               batch: int = 64, cases: Optional[Sequence[str]] = None, count: int = 0,
               all_cores: bool = True, quiet: bool = False, generator: str = "auto",
               lab: Optional[PktLab] = None, plot: bool = True,
               flow_table_size: int = 1 << 20) -> dict:
    """Every case against the floor -> pktgen.json (+ pktgen.png).
    `generator`: auto | live | pktgen.
    The kernel's pktgen is used only when asked for (generator="pktgen") or, with
    "auto", when the kernel has it; it sends UDP only (see KernelPktgen), so on such
    machines the live-frames generator still runs the TCP cases."""
    ncpu = len(os.sched_getaffinity(0))
    todo = make_cases(size, flows, threads, ncpu if all_cores and threads == 1 else 0)
    if cases:
        unknown = set(cases) - {c.name for c in todo}
        if unknown:
            raise SystemExit(f"bench: unknown pktgen case(s) {sorted(unknown)}; known: "
                             f"{[c.name for c in todo]}")
        todo = [c for c in todo if c.name in cases]
    has_pktgen = KernelPktgen.available()
    if generator == "pktgen" and not has_pktgen:
        raise SystemExit("bench: this kernel has no pktgen (/proc/net/pktgen); "
                         "use --generator live")
    own_lab = lab is None
    lab = lab or PktLab()
    if own_lab:
        lab.up()
    try:
        lbs = LbSetup(lab, flow_table_size=flow_table_size)
        try:
            results = run_cases(lab, lbs, todo, rounds, duration, batch, rate, quiet, count)
            fill = results["flow_table_fill"]
            results = results["cases"]
            pg = None
            if has_pktgen and generator in ("auto", "pktgen"):
                pg = kernel_pktgen_cases(lab, lbs, size, flows, threads, rate, duration)
        finally:
            lbs.close()
    finally:
        if own_lab:
            lab.down()
    doc = {"generator": "live-frames (bench_gen, BPF_F_TEST_XDP_LIVE_FRAMES)",
           "kernel_pktgen": "available" if has_pktgen else "not in this kernel",
           "machine": machine_info(pick_cpus(1)[0]),
           "params": {"rounds": rounds, "duration_s": duration, "frame_bytes": size,
                      "flows": flows, "threads": threads, "rate_pps": rate or None,
                      "count": count or None,
                      "batch": batch, "backends_per_vip": 100, "ring_size": 65537,
                      "flow_table_size": flow_table_size, "flow_table_fill": fill},
           "method": "one CPU per generator thread runs generator + data path + sink; "
                     "per_core_mpps = frames sunk / busy seconds (kernel test-run "
                     "duration); ratio = case per-core Mpps / floor per-core Mpps "
                     "(bench_floor: MAC swap + XDP_TX on the same veth, same traffic, "
                     "measured right before the case in each round); medians over rounds",
           "cases": results}
    if pg is not None:
        doc["kernel_pktgen_cases"] = pg
    publish(doc, out, "pktgen", plot_pktgen if plot else None,
            None if quiet else print_pktgen)
    return doc


def plot_pktgen(doc: dict, path: Path) -> Path:
    """Per-core Mpps of every case next to its floor (and the kernel stack reference)."""
    names = list(doc["cases"])
    cs = [doc["cases"][n] for n in names]
    x = range(len(names))
    fig, ax = subplots(figsize=(11, 4.5))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [c["floor_per_core_mpps"] for c in cs], w, color="tab:gray",
           label="floor: MAC swap + XDP_TX (same traffic, same round)")
    bars = ax.bar([i + w / 2 for i in x], [c["per_core_mpps"] for c in cs], w,
                  color="tab:blue", label="xdplb")
    for b, c in zip(bars, cs):
        label = (f"{c['ratio_to_stack']:.2f}x stack" if c.get("ratio_to_stack") is not None
                 else f"{c['ratio']:.2f}x")
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center", va="bottom", fontsize=8)
    for i, c in enumerate(cs):
        if c.get("stack_per_core_mpps"):
            ax.plot([i + w / 2], [c["stack_per_core_mpps"]], "r_", markersize=22, mew=2,
                    label="kernel stack forwarding (xdp_pass), non-VIP")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names)
    ax.set_ylabel("Mpps per core")
    top = max(max(c["floor_per_core_mpps"], c["per_core_mpps"]) for c in cs)
    ax.set_ylim(0, top * 1.35)
    m = doc["machine"]
    ax.set_title(f"xdplb vs floor, one core runs generator + data path + sink "
                 f"({m['cpu_model']}, kernel {m['kernel']})", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncol=3)
    return save_figure(fig, path)


def print_pktgen(doc: dict, path: Path | str = "") -> None:
    m = doc["machine"]
    print(f"packet rate through veths ({doc['generator']}; {m['cpu_model']}, "
          f"{m['cores']} cores, kernel {m['kernel']})")
    print("offered/fwd: Mpps over wall time (all threads); /core: forwarded per second of "
          "one core's busy time,\nwhich runs generator + data path + sink; floor: "
          "bench_floor, same traffic, same round")
    print(f"{'case':12} {'offered':>8} {'fwd':>7} {'loss':>8} {'/core':>7} {'floor':>7} "
          f"{'ratio':>6} {'ns/pkt':>7} {'+floor':>7}  check")
    for name, c in doc["cases"].items():
        loss = f"{c['loss'] * 100:.3f}%" if c["loss"] is not None else "-"
        extra = ""
        if c.get("ratio_to_stack") is not None:
            extra = (f"  (kernel stack alone {c['stack_per_core_mpps']:.2f} Mpps/core, "
                     f"ratio {c['ratio_to_stack']:.2f})")
        print(f"{name:12} {c['offered_mpps']:8.2f} {c['forwarded_mpps']:7.2f} {loss:>8} "
              f"{c['per_core_mpps']:7.2f} {c['floor_per_core_mpps']:7.2f} {c['ratio']:6.2f} "
              f"{c['ns_per_pkt']:7.1f} {c['ns_over_floor']:7.1f}  "
              f"{'ok' if c['ok'] else 'PATH CHECK FAILED'}{extra}")
    busy = sum(c["busy_s"] for c in doc["cases"].values())
    wall = sum(c["wall_s"] * c["threads"] for c in doc["cases"].values())
    soft = sum(c["ksoftirqd_s"] for c in doc["cases"].values())
    if wall and busy and not doc["params"].get("rate_pps"):
        print(f"generator threads ran {100 * busy / wall:.0f}% of wall time (the rest: other "
              f"work on the CPU); softirq deferred to ksoftirqd: {100 * soft / busy:.1f}% "
              f"of busy time")
    if path:
        print(f"-> {path}" + (f", {doc['plot']}" if doc.get("plot") else ""))
