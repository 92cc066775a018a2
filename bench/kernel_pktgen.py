"""The kernel's packet generator (/proc/net/pktgen), on edge nodes whose kernel has it:
the command plan, the result parser, and the UDP hit case it runs against the floor. This
test machine has no pktgen (no loadable modules), so only the plan and the parser are
exercised here; the live-frames generator (bench/pktlab.py) runs everywhere.
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from typing import Optional, Sequence

from lb import layout
from lb.lab import netns
from lb.specs import VipSpec

from .pktlab import MAC, PktLab
from .runner import LbSetup, lb_vips, pick_cpus
from .traffic import SPORT_BASE, SPORT_SPAN, VIP4, VIP_PORT, Traffic

PKTGEN_DIR = "/proc/net/pktgen"


class KernelPktgen:
    """The kernel's packet generator, driven through /proc/net/pktgen of the generator's
    namespace: one pktgen thread (kpktgend_<cpu>) per CPU used, each with its own copy of
    the device (DEV@cpu). UDP only; flows = pktgen's "flows" with a range of source
    ports; rate in packets per second (ratep). Not available on this test machine (no
    pktgen in the kernel), so only the command plan is exercised here."""

    @staticmethod
    def available(ns: Optional[netns.Netns] = None) -> bool:
        if ns is None:
            return os.path.isdir(PKTGEN_DIR)
        with ns.entered():
            return os.path.isdir("/proc/thread-self/net/pktgen")

    @staticmethod
    def plan(dev: str, traffic: Traffic, count: int, cpus: Sequence[int],
             dst_mac: bytes, rate: float = 0.0, clone_skb: int = 0) -> list[tuple]:
        """(file, command) pairs, in order; files relative to /proc/net/pktgen."""
        if traffic.proto != 17:
            raise ValueError("kernel pktgen sends UDP only")
        cmds: list[tuple] = [("pgctrl", "reset")]
        per_rate = int(rate / len(cpus)) if rate else 0
        for cpu in cpus:
            th, d = f"kpktgend_{cpu}", f"{dev}@{cpu}"
            cmds += [(th, "rem_device_all"), (th, f"add_device {d}")]
            fam6 = traffic.family == 6
            cmds += [(d, f"count {count}"), (d, f"clone_skb {clone_skb}"),
                     (d, f"pkt_size {traffic.size}"),  # without the FCS, like ours
                     (d, "burst 32"), (d, f"dst_mac {dst_mac.hex(':')}"),
                     (d, f"queue_map_min {cpu}"), (d, f"queue_map_max {cpu}")]
            if fam6:
                cmds += [(d, "flag IPV6"), (d, f"dst6 {traffic.dst}"),
                         (d, f"src6 {traffic.src}")]
            else:
                last = ipaddress.ip_address(int(traffic.dst) + max(traffic.vips, 1) - 1)
                cmds += [(d, f"dst_min {traffic.dst}"), (d, f"dst_max {last}"),
                         (d, f"src_min {traffic.src}"), (d, f"src_max {traffic.src}")]
            flows = traffic.flows or 65535
            cmds += [(d, f"udp_dst_min {traffic.dport}"), (d, f"udp_dst_max {traffic.dport}"),
                     (d, f"udp_src_min {SPORT_BASE}"),
                     (d, f"udp_src_max {SPORT_BASE + min(flows, SPORT_SPAN) - 1}"),
                     (d, "flag UDPSRC_RND" if traffic.new_flows else "flag !UDPSRC_RND"),
                     (d, f"flows {flows}"), (d, "flowlen 1")]
            if per_rate:
                cmds.append((d, f"ratep {per_rate}"))
        cmds.append(("pgctrl", "start"))
        return cmds

    @staticmethod
    def parse_result(text: str) -> dict:
        """The "Result: OK: ..." block of a device file -> {'ok', 'usec', 'packets',
        'pps', 'errors'}."""
        out = {"ok": "Result: OK" in text}
        m = re.search(r"OK:\s*(\d+)\(c\d+\+d\d+\)\s*usec,\s*(\d+)\s*\(", text)
        if m:
            out["usec"], out["packets"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"(\d+)pps", text)
        if m:
            out["pps"] = int(m.group(1))
        m = re.search(r"errors:\s*(\d+)", text)
        if m:
            out["errors"] = int(m.group(1))
        return out

    def run(self, ns: netns.Netns, dev: str, traffic: Traffic, count: int, cpus: Sequence[int],
            dst_mac: bytes, rate: float = 0.0) -> tuple[float, list[dict]]:
        """Runs the plan inside `ns` (pgctrl "start" blocks until done); returns (wall
        seconds, one parsed result per device copy)."""
        plan = self.plan(dev, traffic, count, cpus, dst_mac, rate)
        with ns.entered():
            base = "/proc/thread-self/net/pktgen"
            t0 = time.perf_counter()
            for f, cmd in plan:
                with open(os.path.join(base, f), "w") as fh:
                    fh.write(cmd + "\n")
            wall = time.perf_counter() - t0
            res = []
            for cpu in cpus:
                with open(os.path.join(base, f"{dev}@{cpu}")) as fh:
                    res.append(self.parse_result(fh.read()))
        return wall, res


def kernel_pktgen_cases(lab: PktLab, lbs: LbSetup, size: int, flows: int, threads: int,
                  rate: float, duration: float) -> dict:
    """UDP hit traffic from the kernel's pktgen on g0, xdplb and floor on l0 (only where
    the kernel has pktgen)."""
    vip = VipSpec(VIP4, VIP_PORT, 17, lb_vips()[0].backends, ring_size=65537)
    lbs.configure(layout.ENCAP_IPIP, layout.TX_XDP_TX)
    lbs.apply([vip] + lb_vips())
    t = Traffic("udp", proto=17, size=size, flows=flows)
    pg = KernelPktgen()
    cpus = pick_cpus(threads)
    count = int((rate or 2e6) * duration / len(cpus))
    out = {}
    for name, fd in (("floor", lab.prog("bench_floor")), ("xdplb", lbs.dp.prog_fd)):
        lab.set_l0(name, fd)
        before = lab.bench_counts()
        wall, res = pg.run(lab.ns["g"], "g0", t, count, cpus, MAC["l0"], rate)
        after = lab.settle()
        sent = sum(r.get("packets", 0) for r in res)
        sink = after["sink"] - before["sink"]
        out[name] = {"offered_mpps": round(sent / wall / 1e6, 3),
                     "forwarded_mpps": round(sink / wall / 1e6, 3),
                     "loss": round(1 - sink / sent, 6) if sent else None, "results": res}
    if out["floor"]["forwarded_mpps"]:
        out["ratio"] = round(out["xdplb"]["forwarded_mpps"] / out["floor"]["forwarded_mpps"],
                             3)
    return out
