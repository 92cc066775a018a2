"""Measuring in the packet lab: a Runner measures one program on l0 with one Traffic
pattern (warm-up, sizing the count from the measured rate, priming the flows), a Sample is
one measurement, summarize() turns rounds of samples and their floors into the figures
pktgen.json and iptables.json report; LbSetup is xdplb loaded for the lab.

Two clocks. offered / forwarded Mpps are over wall time (all threads together). Mpps per
core ("per_core_mpps", which ratios use) is over busy time: the kernel's own duration of
each BPF_PROG_TEST_RUN, which includes the softirq work the run triggers on its CPU (data
path, sink) and excludes the time the thread was preempted, so other work sharing the
machine moves wall-clock rates much more than per-core ones. Softirq work deferred to
ksoftirqd would escape busy time; its run time during each measurement is recorded
("ksoftirqd_s") to show it stays small.
"""

from __future__ import annotations

import ipaddress
import os
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from lb import layout
from lb.datapath import Datapath, EgressConfig, Limits
from lb.programmer import Programmer
from lb.specs import BackendSpec, VipSpec

from .pktlab import MAC, PktLab
from .traffic import VIP4, VIP6, VIP_PORT, Traffic

SOURCE4 = ipaddress.ip_address("10.31.0.1")
SOURCE6 = ipaddress.ip_address("fd31::1")
GUE_PORT = 6080

LB_KEYS = ("rx", "tx", "redirect", "pass", "drop", "flow_hit", "flow_miss", "flow_moved",
           "drop_no_backend", "drop_no_nexthop", "drop_too_big", "drop_adjust_fail",
           "flow_cache_hit", "flow_evicted", "flow_insert_raced")


@dataclass
class Sample:
    wall: float   # seconds, first generator start to last end
    busy: float   # CPU seconds of the generator threads' runs (see PktLab.generate)
    counts: dict

    @property
    def gen(self) -> int:
        return self.counts["gen"]

    @property
    def offered_mpps(self) -> float:
        return self.gen / self.wall / 1e6

    @property
    def forwarded_mpps(self) -> float:
        return self.counts["sink"] / self.wall / 1e6

    @property
    def per_core_mpps(self) -> float:
        """Frames forwarded per second of one core's busy time."""
        return self.counts["sink"] / self.busy / 1e6 if self.busy else 0.0

    @property
    def ns_per_pkt(self) -> float:
        """Core time per generated frame (generator + data path + sink)."""
        return self.busy * 1e9 / self.gen if self.gen else float("nan")


class Runner:
    """Measures a program on l0 with a traffic pattern, in a PktLab, with an optional
    xdplb Datapath whose counters go into the sample."""

    def __init__(self, lab: PktLab, dp: Optional[Datapath] = None, cpus: Sequence[int] = (),
                 batch: int = 64, rate: float = 0.0, duration: float = 0.5,
                 min_count: int = 20_000, max_count: int = 20_000_000,
                 probe_count: int = 20_000, count: int = 0):
        self.lab, self.dp = lab, dp
        self.cpus = list(cpus) or [sorted(os.sched_getaffinity(0))[-1]]
        self.batch, self.rate, self.duration = batch, rate, duration
        self.min_count, self.max_count = min_count, max_count
        self.probe_count = probe_count
        self.count = count  # fixed frames per measurement and thread (0: from duration)
        self._pps: dict[tuple, float] = {}

    def _ksoftirqd_ns(self) -> int:
        """Run time of the generator CPUs' ksoftirqd threads: softirq work deferred
        there happens outside the measured busy time (a diagnostic; ~1% here)."""
        if not hasattr(self, "_ksoft"):
            want = {f"ksoftirqd/{c}" for c in self.cpus}
            self._ksoft = []
            for p in os.listdir("/proc"):
                if p.isdigit():
                    try:
                        with open(f"/proc/{p}/comm") as f:
                            if f.read().strip() in want:
                                self._ksoft.append(int(p))
                    except OSError:
                        pass
        total = 0
        for pid in self._ksoft:
            try:
                with open(f"/proc/{pid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total

    def counters(self) -> dict:
        c = self.lab.bench_counts()
        c["ksoftirqd_ns"] = self._ksoftirqd_ns()
        if self.dp is not None:
            g = self.dp.global_counters()
            for k in LB_KEYS:
                c[k] = g[k]
        return c

    def once(self, prog: str, fd: int, traffic: Traffic, count: int) -> Sample:
        self.lab.set_l0(prog, fd)
        frame = self.lab.set_traffic(traffic)
        before = self.counters()
        wall, busy = self.lab.generate(frame, count, self.cpus, self.batch, self.rate)
        self.lab.settle()
        after = self.counters()
        return Sample(wall, busy, {k: after[k] - before[k] for k in after})

    def warm(self, prog: str, fd: int, traffic: Traffic) -> None:
        """Caches, JIT images, and (flows > 0) every flow once, so measured packets of a
        hit case are hits; also estimates the rate (per busy second of one core) to size
        the measured runs."""
        s = self.once(prog, fd, traffic, self.probe_count)
        self._pps[(prog, traffic)] = max(s.gen / max(s.busy, 1e-6) * len(self.cpus), 1.0)
        self.prime(prog, fd, traffic)

    def count_for(self, prog: str, traffic: Traffic) -> int:
        if self.count:
            return self.count
        if self.rate:
            pps = self.rate
        else:
            pps = self._pps.get((prog, traffic), 1e6)
        n = int(pps * self.duration / len(self.cpus))
        return max(self.min_count, min(self.max_count, n))

    def warmed(self, prog: str, traffic: Traffic) -> bool:
        return (prog, traffic) in self._pps

    def prime(self, prog: str, fd: int, traffic: Traffic) -> None:
        """Every flow of a bounded pattern once more (unmeasured): runs of new flows in
        between may have evicted them from the flow table / conntrack."""
        n = traffic.distinct_flows()
        if n:
            self.once(prog, fd, traffic, max(2 * n, 4096))

    def measure(self, prog: str, fd: int, traffic: Traffic) -> Sample:
        if (prog, traffic) not in self._pps:
            self.warm(prog, fd, traffic)
        elif prog != "floor":
            self.prime(prog, fd, traffic)
        return self.once(prog, fd, traffic, self.count_for(prog, traffic))


def summarize(samples: Sequence[Sample], floors: Sequence[Sample]) -> dict:
    """Medians over rounds; ratios per round against that round's floor, from per-core
    rates (busy time), so preemption by other work on the CPU does not enter them."""
    def med(xs):
        return round(statistics.median(xs), 3) if xs else None

    tot: dict = {}
    for s in samples:
        for k, v in s.counts.items():
            tot[k] = tot.get(k, 0) + v
    gen = tot.get("gen", 0)
    ns = [s.ns_per_pkt for s in samples]
    fns = [f.ns_per_pkt for f in floors]
    out = {"offered_mpps": med([s.offered_mpps for s in samples]),
           "forwarded_mpps": med([s.forwarded_mpps for s in samples]),
           "per_core_mpps": med([s.per_core_mpps for s in samples]),
           "loss": round(1 - tot.get("sink", 0) / gen, 6) if gen else None,
           "ns_per_pkt": round(statistics.median(ns), 1),
           "floor_per_core_mpps": med([f.per_core_mpps for f in floors]),
           "floor_ns_per_pkt": round(statistics.median(fns), 1) if floors else None,
           "per_core_mpps_all": [round(s.per_core_mpps, 3) for s in samples],
           "busy_s": round(sum(s.busy for s in samples), 4),
           "wall_s": round(sum(s.wall for s in samples), 4),
           "ksoftirqd_s": round(tot.get("ksoftirqd_ns", 0) / 1e9, 4),
           "forwarded_mpps_all": [round(s.forwarded_mpps, 3) for s in samples],
           "counters": tot}
    if floors:
        ratios = [s.per_core_mpps / f.per_core_mpps if f.per_core_mpps else float("nan")
                  for s, f in zip(samples, floors)]
        out["ratio"] = round(statistics.median(ratios), 3)
        out["ratio_all"] = [round(x, 3) for x in ratios]
        out["ns_over_floor"] = round(statistics.median([a - b for a, b in zip(ns, fns)]), 1)
    return out


def check(entry: dict, expect: Sequence[str], zero: Sequence[str]) -> bool:
    """The path check: every counter in `expect` equals the first one (what the program
    under test received, e.g. xdplb's rx), which is nonzero; those in `zero` stayed 0.
    Loss (generated vs received vs sunk) is reported apart, not judged here."""
    c = entry["counters"]
    ref = c.get(expect[0], 0) if expect else 0
    return ref > 0 and all(c.get(k) == ref for k in expect) and \
        all(c.get(k, 0) == 0 for k in zero)


def pick_cpus(threads: int) -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    if threads > len(allowed):
        raise SystemExit(f"bench: {threads} generator threads, {len(allowed)} CPUs allowed")
    return allowed[-threads:]


def v4_backend(i: int) -> ipaddress.IPv4Address:
    return ipaddress.ip_address(int(ipaddress.ip_address("10.244.0.0")) + 1 + i)


def v6_backend(i: int) -> ipaddress.IPv6Address:
    return ipaddress.ip_address(int(ipaddress.ip_address("fd44::")) + 1 + i)


def lb_vips(backends: int = 100, ring_size: int = 65537) -> list[VipSpec]:
    b4 = tuple(BackendSpec(v4_backend(i), nexthop="nh") for i in range(backends))
    b6 = tuple(BackendSpec(v6_backend(i), nexthop="nh") for i in range(backends))
    return [VipSpec(VIP4, VIP_PORT, 6, b4, ring_size=ring_size),
            VipSpec(VIP6, VIP_PORT, 6, b6, ring_size=ring_size)]


class LbSetup:
    """xdplb loaded for the lab: egress config and tx port set, VIPs programmed."""

    def __init__(self, lab: PktLab, flow_table_size: int = 1 << 20, max_vips: int = 16384,
                 max_backends: int = 65536):
        self.lab = lab
        self.dp = Datapath(Limits(max_vips=max_vips, max_backends=max_backends,
                                  max_nexthops=64, flow_table_size=flow_table_size))
        try:
            self.programmer = Programmer(self.dp)
            self.vips: list[VipSpec] = []
            self.macs: dict[str, bytes] = {}
            self.mode: tuple = ()
            self.configure(layout.ENCAP_IPIP, layout.TX_XDP_TX)
        except BaseException:
            self.dp.close()
            raise

    def configure(self, encap: int, tx_mode: int) -> None:
        if self.mode == (encap, tx_mode):
            return
        xdp_tx = tx_mode == layout.TX_XDP_TX
        egress = EgressConfig(smac=MAC["l0"] if xdp_tx else MAC["l1"], encap=encap,
                              tx_mode=tx_mode, source_v4=SOURCE4, source_v6=SOURCE6,
                              gue_port=GUE_PORT, mtu=1500, if_mac=MAC["l0"],
                              tx_port=None if xdp_tx else self.lab.l1_index)
        with self.lab.lb.entered():  # the devmap resolves the ifindex in the caller's netns
            self.programmer.apply(self.vips, self.macs, egress=egress)
        self.mode = (encap, tx_mode)

    def apply(self, vips: Sequence[VipSpec], tx_mode: int = layout.TX_XDP_TX):
        """Next hop MAC: the receiving end (g0 for XDP_TX, s0 for redirect)."""
        mac = MAC["g0"] if tx_mode == layout.TX_XDP_TX else MAC["s0"]
        self.vips, self.macs = list(vips), {"nh": mac}
        return self.programmer.apply(self.vips, self.macs)

    def fill_flow_table(self, runner: "Runner", dst=VIP4) -> dict:
        """New flows to dst:80 (a VIP) until the flow table is full, so every later
        new-flow run meets the steady state of a busy LB (each insert evicts) rather
        than an empty table. Returns what it did."""
        n = self.dp.limits.flow_table_size
        t = Traffic("fill", dst=dst, flows=0)
        s = runner.once("xdplb", self.dp.prog_fd, t, n)
        return {"flows_inserted": s.counts.get("flow_miss", 0), "table_size": n,
                "seconds": round(s.wall, 2)}

    def close(self) -> None:
        self.dp.close()
