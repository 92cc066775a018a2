"""xdplb against iptables DNAT in the kube-proxy style, and xdplb's cost against its
number of VIPs: one sweep over 1, 10, 100, 1,000, 10,000 services.

iptables side (in the LB namespace of bench/pktlab.py, xdp_pass on l0 so frames
go up the kernel stack): the nat table as kube-proxy's iptables mode writes it, reduced to
what forwarded traffic to a ClusterIP meets: PREROUTING -> KUBE-SERVICES, one rule per
service (destination address + port) jumping to the service's chain KUBE-SVC-<hash>; that
chain picks an endpoint with `-m statistic --mode random --probability 1/(n-i)` rules, each
jumping to KUBE-SEP-<hash> (masquerade mark for hairpin traffic, then DNAT to the
endpoint); filter FORWARD -> KUBE-FORWARD (drop INVALID, accept marked, accept
RELATED/ESTABLISHED). Loaded with iptables-restore in one transaction. Endpoints are routed
to the sink's side and counted there.

Only a connection's first packet walks the nat chains (conntrack NATs the rest), so the
sweep runs two traffic patterns for both:
  new  every packet a new connection (TCP SYN): iptables walks KUBE-SERVICES linearly;
       the conntrack table is flushed before each such run;
  est  a fixed set of established flows (20,000, spread over the services): conntrack
       hits for iptables, flow-table hits for xdplb.
xdplb side: the same services as VIPs (same addresses, same endpoints as backends, Maglev
ring of 1009), XDP_TX; its flow table (1M entries) is filled with new flows first, so new
connections always evict, as on a busy balancer. Every sweep point measures the floor too
(bench_floor with the same traffic), and everything runs on one core (see
bench/pktgen.py).

VIP scaling (vip_scaling): the sweep's xdplb points move with the noise of the machine
more than with the VIP count, so the ratio at the largest count against the smallest is
measured apart, with two fresh xdplb instances side by side in the same rounds.

The conntrack checksum check is off in the LB namespace (as with a NIC's receive checksum
offload); the generated frames carry valid checksums anyway.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

from lb import layout
from lb.specs import BackendSpec, VipSpec

from . import log_x_axes, publish, save_figure, subplots
from .cost import machine_info
from .pktlab import PktLab
from .runner import LbSetup, Runner, pick_cpus, summarize, v4_backend
from .traffic import Traffic

SERVICES = (1, 10, 100, 1000, 10000)
ENDPOINTS = 2          # endpoints (backends) per service
EST_FLOWS = 20_000     # established flows, spread over the services
SVC_BASE = ipaddress.ip_address("10.96.0.10")
SVC_PORT = 80
EP_PORT = 8080
RING = 1009


def _chain_hash(prefix: str, text: str) -> str:
    """kube-proxy names chains PREFIX + 16 base32 characters of a SHA-256."""
    return prefix + base64.b32encode(hashlib.sha256(text.encode()).digest())[:16].decode()


def service_addr(i: int) -> ipaddress.IPv4Address:
    return ipaddress.ip_address(int(SVC_BASE) + i)


def endpoint_addr(i: int, j: int, endpoints: int = ENDPOINTS) -> ipaddress.IPv4Address:
    return v4_backend(i * endpoints + j)


def kube_proxy_rules(n: int, endpoints: int = ENDPOINTS) -> str:
    """iptables-restore input for n ClusterIP services (TCP port 80) with `endpoints`
    endpoints each, in kube-proxy's iptables-mode layout."""
    nat_chains = [":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
                  ":POSTROUTING ACCEPT [0:0]", ":KUBE-SERVICES - [0:0]",
                  ":KUBE-MARK-MASQ - [0:0]", ":KUBE-POSTROUTING - [0:0]"]
    nat_rules = ["-A PREROUTING -j KUBE-SERVICES",
                 "-A OUTPUT -j KUBE-SERVICES",
                 "-A POSTROUTING -j KUBE-POSTROUTING",
                 "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
                 "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
                 "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
                 "-A KUBE-POSTROUTING -j MASQUERADE --random-fully"]
    svc_rules, chain_rules = [], []
    for i in range(n):
        name = f"default/svc-{i}:http"
        svc = _chain_hash("KUBE-SVC-", name + "tcp")
        nat_chains.append(f":{svc} - [0:0]")
        svc_rules.append(f"-A KUBE-SERVICES -d {service_addr(i)}/32 -p tcp -m tcp "
                         f"--dport {SVC_PORT} -j {svc}")
        for j in range(endpoints):
            ep = endpoint_addr(i, j, endpoints)
            sep = _chain_hash("KUBE-SEP-", f"{name}tcp{ep}:{EP_PORT}")
            nat_chains.append(f":{sep} - [0:0]")
            left = endpoints - j
            if left > 1:
                chain_rules.append(f"-A {svc} -m statistic --mode random --probability "
                                   f"{1 / left:.11f} -j {sep}")
            else:
                chain_rules.append(f"-A {svc} -j {sep}")
            chain_rules.append(f"-A {sep} -s {ep}/32 -j KUBE-MARK-MASQ")
            chain_rules.append(f"-A {sep} -p tcp -m tcp -j DNAT --to-destination "
                               f"{ep}:{EP_PORT}")
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
             ":OUTPUT ACCEPT [0:0]", ":KUBE-FORWARD - [0:0]",
             "-A FORWARD -j KUBE-FORWARD",
             "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
             "-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT",
             "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
             "COMMIT", "*nat", *nat_chains, *nat_rules, *svc_rules, *chain_rules, "COMMIT"]
    return "\n".join(lines) + "\n"


EMPTY_RULES = ("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
               "COMMIT\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n"
               ":OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n")


def iptables_variant(ns, prefer: str = "nft") -> str:
    """"nft" or "legacy": the first whose iptables-restore loads a DNAT + statistic rule
    in namespace `ns` (prefer first)."""
    order = [prefer] + [v for v in ("nft", "legacy") if v != prefer]
    errors = []
    for v in order:
        exe = f"iptables-{v}-restore"
        if not shutil.which(exe):
            errors.append(f"{exe}: not installed")
            continue
        try:
            restore(ns, kube_proxy_rules(1), v)
            restore(ns, EMPTY_RULES, v)
            return v
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError("no working iptables-restore: " + "; ".join(errors))


def restore(ns, text: str, variant: str) -> float:
    """iptables-restore (one transaction) inside ns; returns seconds taken."""
    t0 = time.perf_counter()
    p = ns.spawn([f"iptables-{variant}-restore"], stdin=subprocess.PIPE,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(text, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"iptables-{variant}-restore in {ns.name} exited {p.returncode}: "
                           f"{err.strip()[-300:]}")
    return time.perf_counter() - t0


def clear_rules(ns, variant: str) -> None:
    restore(ns, EMPTY_RULES, variant)
    if variant == "nft":  # drop the tables themselves: no hooks, no conntrack users left
        with ns.entered():
            subprocess.run(["nft", "flush", "ruleset"], capture_output=True)


def conntrack_flush(ns) -> None:
    from pyroute2 import NFCTSocket

    with ns.entered():  # pyroute2 binds the socket lazily: all of it inside
        s = NFCTSocket()
        try:
            s.flush()
        finally:
            s.close()


def conntrack_count(ns) -> int:
    return int(ns.sysctl_get("net.netfilter.nf_conntrack_count"))


def xdplb_services(n: int, endpoints: int = ENDPOINTS) -> list[VipSpec]:
    return [VipSpec(service_addr(i), SVC_PORT, 6,
                    tuple(BackendSpec(endpoint_addr(i, j, endpoints), nexthop="nh")
                          for j in range(endpoints)), ring_size=RING)
            for i in range(n)]


def traffic(kind: str, n: int, size: int = 64, est_flows: int = EST_FLOWS) -> Traffic:
    if kind == "new":
        return Traffic(f"new{n}", dst=SVC_BASE, size=size, flows=0, vips=n)
    return Traffic(f"est{n}", dst=SVC_BASE, size=size, flows=max(est_flows, n), vips=n)


def run_sweep(out: Optional[str] = None, services: Sequence[int] = SERVICES,
              rounds: int = 3, duration: float = 0.4, size: int = 64,
              endpoints: int = ENDPOINTS, variant: str = "nft", batch: int = 64,
              quiet: bool = False, lab: Optional[PktLab] = None, plot: bool = True,
              count: int = 0, flow_table_size: int = 1 << 20,
              est_flows: int = EST_FLOWS, scaling_rounds: int = 11) -> dict:
    """The sweep -> iptables.json (+ iptables.png). count: fixed frames per measurement
    (0: sized from `duration`)."""
    own_lab = lab is None
    lab = lab or PktLab(prefix="xi")
    if own_lab:
        lab.up()
    try:
        lbs = LbSetup(lab, flow_table_size=flow_table_size, max_vips=max(services) + 64,
                      max_backends=max(services) * endpoints + 64)
        try:
            doc = _sweep(lab, lbs, services, rounds, duration, size, endpoints, variant,
                         batch, quiet, count, est_flows)
            runner = Runner(lab, None, pick_cpus(1), batch=batch, duration=duration,
                            count=count, min_count=min(count or 20_000, 20_000),
                            probe_count=min(count or 20_000, 20_000))
        finally:
            lbs.close()
        if len(services) > 1:
            doc["vip_scaling"] = vip_scaling(lab, runner, services[0], services[-1],
                                             scaling_rounds, size, endpoints, est_flows,
                                             flow_table_size, quiet)
    finally:
        if own_lab:
            lab.down()
    publish(doc, out, "iptables", plot_sweep if plot else None,
            None if quiet else print_sweep)
    return doc


def _sweep(lab: PktLab, lbs: LbSetup, services, rounds, duration, size, endpoints,
           variant, batch, quiet, count, est_flows) -> dict:
    lb = lab.lb
    for k, v in (("net.netfilter.nf_conntrack_checksum", 0),
                 ("net.netfilter.nf_conntrack_tcp_loose", 1)):
        try:
            lb.sysctl(k, v)
        except OSError:
            pass
    variant = iptables_variant(lb, variant)
    cpu = pick_cpus(1)
    small = min(count or 20_000, 20_000)
    runner = Runner(lab, lbs.dp, cpu, batch=batch, duration=duration, count=count,
                    min_count=small, probe_count=small)
    # iptables runs are up to 100x slower: fewer frames, the same time
    ipt_runner = Runner(lab, None, cpu, batch=batch, duration=duration, count=count,
                        min_count=min(small, 4_000), probe_count=min(small, 4_000))
    floor_fd, pass_fd = lab.prog("bench_floor"), lab.pass_fd
    lbs.configure(layout.ENCAP_IPIP, layout.TX_XDP_TX)
    lbs.apply(xdplb_services(services[0], endpoints))
    fill = lbs.fill_flow_table(runner)
    points = []
    for n in services:
        t0 = time.perf_counter()
        rep = lbs.apply(xdplb_services(n, endpoints))
        apply_s = time.perf_counter() - t0
        rules = kube_proxy_rules(n, endpoints)
        restore_s = restore(lb, rules, variant)
        conntrack_flush(lb)
        res: dict = {k: [] for k in ("floor_new", "floor_est", "xdplb_new", "xdplb_est",
                                     "iptables_new", "iptables_est")}
        ct_max = 0
        for _ in range(rounds):
            for kind in ("est", "new"):
                t = traffic(kind, n, size, est_flows)
                res[f"floor_{kind}"].append(runner.measure("floor", floor_fd, t))
                res[f"xdplb_{kind}"].append(runner.measure("xdplb", lbs.dp.prog_fd, t))
                if kind == "new":
                    if not ipt_runner.warmed("stack", t):
                        ipt_runner.warm("stack", pass_fd, t)
                    conntrack_flush(lb)
                res[f"iptables_{kind}"].append(ipt_runner.measure("stack", pass_fd, t))
                if kind == "new":
                    ct_max = max(ct_max, conntrack_count(lb))
                    conntrack_flush(lb)
        pt = {"services": n, "endpoints_per_service": endpoints,
              "iptables_rules": rules.count("\n-A "), "iptables_restore_s": round(restore_s, 2),
              "xdplb_apply_s": round(apply_s, 2), "xdplb_vips_added": rep.vips_added,
              "conntrack_entries_max_new": ct_max}
        for kind in ("new", "est"):
            floors = res[f"floor_{kind}"]
            x = summarize(res[f"xdplb_{kind}"], floors)
            ipt = summarize(res[f"iptables_{kind}"], floors)
            pt[kind] = {"floor_per_core_mpps": x["floor_per_core_mpps"],
                        "floor_ns_per_pkt": x["floor_ns_per_pkt"],
                        "xdplb": _slim(x), "iptables": _slim(ipt),
                        "xdplb_over_iptables": round(statistics.median(
                            [a.per_core_mpps / b.per_core_mpps if b.per_core_mpps else 0
                             for a, b in zip(res[f"xdplb_{kind}"],
                                             res[f"iptables_{kind}"])]), 3)}
        points.append(pt)
        if not quiet:
            print(f"  {n:6} services: xdplb new {pt['new']['xdplb']['per_core_mpps']:.2f} / "
                  f"est {pt['est']['xdplb']['per_core_mpps']:.2f} Mpps; iptables new "
                  f"{pt['new']['iptables']['per_core_mpps']:.3f} / est "
                  f"{pt['est']['iptables']['per_core_mpps']:.3f} Mpps; floor "
                  f"{pt['est']['floor_per_core_mpps']:.2f} (restore {restore_s:.1f} s)",
                  flush=True)
    clear_rules(lb, variant)
    conntrack_flush(lb)
    doc = {"machine": machine_info(cpu[0]),
           "iptables": f"iptables-{variant}",
           "params": {"services": list(services), "endpoints_per_service": endpoints,
                      "rounds": rounds, "duration_s": duration, "frame_bytes": size,
                      "est_flows": est_flows, "ring_size": RING, "count": count or None,
                      "flow_table_size": lbs.dp.limits.flow_table_size},
           "method": "one core for generator + forwarding path + sink (see pktgen.json); "
                     f"new = every packet a new TCP connection, est = {est_flows:,} "
                     "established flows (at least one per service); medians over rounds; "
                     "ns_over_floor = ns per packet beyond the floor measured at the same "
                     "point",
           "points": points, "flow_table_fill": fill}
    return doc


def vip_scaling(lab: PktLab, like: Runner, n_lo: int, n_hi: int, rounds: int, size: int,
                endpoints: int, est_flows: int, flow_table_size: int,
                quiet: bool = True) -> dict:
    """xdplb's cost per packet with n_hi VIPs against n_lo VIPs, measured in the same
    rounds: two fresh xdplb instances loaded side by side with the same history (each
    programmed, then its flow table filled with new flows), attached to l0 in turn, each
    after a floor run (order alternating between rounds); the same number of flows for
    both. Ratio = median over rounds of (ns_hi - floor) / the same median for ns_lo
    (steadier than a median of per-round ratios when neighbours on the machine make single
    rounds noisy: memory-bound lookups feel them, the floor hardly). A third run per
    round sends
    the n_lo pattern (all flows to the first VIPs) to the n_hi instance: what VIPs that
    are configured but idle cost, apart from spreading traffic over them.

    (Fresh instances, not the sweep's: a flow table that has been through millions of
    inserts and evictions is slower to look up than a freshly filled one, which would
    show up as a VIP-count effect.)"""
    def runner(setup: LbSetup) -> Runner:
        return Runner(lab, setup.dp, like.cpus, batch=like.batch, duration=like.duration,
                      count=like.count, min_count=like.min_count,
                      probe_count=like.probe_count)

    lo = hi = None
    try:
        lo = LbSetup(lab, flow_table_size=flow_table_size, max_vips=n_lo + 64,
                     max_backends=n_lo * endpoints + 64)
        hi = LbSetup(lab, flow_table_size=flow_table_size, max_vips=n_hi + 64,
                     max_backends=n_hi * endpoints + 64)
        lo.apply(xdplb_services(n_lo, endpoints))
        hi.apply(xdplb_services(n_hi, endpoints))
        lo_runner, hi_runner = runner(lo), runner(hi)
        lo.fill_flow_table(lo_runner)
        hi.fill_flow_table(hi_runner)
        floor_fd = lab.prog("bench_floor")
        out: dict = {}
        for kind in ("est", "new"):
            t_lo = traffic(kind, n_lo, size, est_flows)
            t_hi = traffic(kind, n_hi, size, est_flows)
            if kind == "est":  # the same number of flows on both sides
                t_lo = Traffic(t_lo.name, dst=t_lo.dst, size=size, flows=t_hi.flows,
                               vips=n_lo)
            rows: dict = {"floor": [], "lo": [], "hi": [], "hi_idle": []}
            runs = {"lo": (lo_runner, lo.dp.prog_fd, t_lo),
                    "hi": (hi_runner, hi.dp.prog_fd, t_hi),
                    "hi_idle": (hi_runner, hi.dp.prog_fd, t_lo)}
            for rnd in range(rounds):
                rows["floor"].append(hi_runner.measure("floor", floor_fd, t_hi))
                order = ("lo", "hi", "hi_idle") if rnd % 2 == 0 else ("hi_idle", "hi", "lo")
                for key in order:  # alternating order: no side always runs first
                    r, fd, t = runs[key]
                    rows[key].append(r.measure("xdplb", fd, t))
            fl = [x.ns_per_pkt for x in rows["floor"]]
            ns_lo = [x.ns_per_pkt for x in rows["lo"]]
            ns_hi = [x.ns_per_pkt for x in rows["hi"]]
            over_lo = [a - b for a, b in zip(ns_lo, fl)]
            over_hi = [a - b for a, b in zip(ns_hi, fl)]
            over_idle = [x.ns_per_pkt - b for x, b in zip(rows["hi_idle"], fl)]
            ratios = [h / lw if lw > 0 else float("nan") for h, lw in zip(over_hi, over_lo)]
            idle = [h / lw if lw > 0 else float("nan") for h, lw in zip(over_idle, over_lo)]
            ok = all(x.counts.get("rx") == x.gen and
                     x.counts.get("flow_hit" if kind == "est" else "flow_miss") == x.gen
                     for x in rows["lo"] + rows["hi"] + rows["hi_idle"])
            out[kind] = {"services": [n_lo, n_hi], "flows": t_hi.distinct_flows() or "new",
                         "ns_over_floor": [round(statistics.median(over_lo), 1),
                                           round(statistics.median(over_hi), 1)],
                         "ns_per_pkt": [round(statistics.median(ns_lo), 1),
                                        round(statistics.median(ns_hi), 1)],
                         "floor_ns_per_pkt": round(statistics.median(fl), 1),
                         "ratio_ns_over_floor": _ratio(statistics.median(over_hi),
                                                       statistics.median(over_lo)),
                         "ratio_ns_over_floor_median_of_rounds":
                             round(statistics.median(ratios), 3),
                         "ratio_ns_over_floor_all": [round(r, 3) for r in ratios],
                         "ratio_ns_per_pkt": round(statistics.median(
                             [h / lw for h, lw in zip(ns_hi, ns_lo)]), 3),
                         "idle_vips_ns_over_floor": round(statistics.median(over_idle), 1),
                         "ratio_idle_vips": _ratio(statistics.median(over_idle),
                                                   statistics.median(over_lo)),
                         "ratio_idle_vips_all": [round(r, 3) for r in idle],
                         "path_ok": ok}
            if not quiet:
                v = out[kind]
                print(f"  VIP scaling, {kind}: {n_hi} VIPs {v['ns_over_floor'][1]:.0f} ns vs "
                      f"{n_lo} VIP {v['ns_over_floor'][0]:.0f} ns beyond the floor -> "
                      f"{v['ratio_ns_over_floor']:.3f} (traffic to {n_lo} of {n_hi}: "
                      f"{v['ratio_idle_vips']:.3f})", flush=True)
        out["method"] = ("two fresh xdplb instances with the same history side by side, "
                         "attached in turn after a floor run in every round (order "
                         "alternating); same flow count; ratio = median of the hi runs' ns "
                         "beyond the floor / median of the lo runs'; idle_vips: "
                         f"the {n_hi}-VIP instance with all traffic to its first {n_lo}")
        out["rounds"] = rounds
        return out
    finally:
        for setup in (lo, hi):
            if setup is not None:
                setup.close()


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def _slim(s: dict) -> dict:
    keep = ("per_core_mpps", "offered_mpps", "forwarded_mpps", "loss", "ns_per_pkt",
            "ns_over_floor", "ratio", "per_core_mpps_all", "counters")
    return {k: s[k] for k in keep if k in s}


def plot_sweep(doc: dict, path: Path) -> Path:
    pts = doc["points"]
    x = [p["services"] for p in pts]
    fig, ax = subplots(1, 2, figsize=(13, 4.5))
    for kind, style in (("new", "o-"), ("est", "s--")):
        label = "new connections" if kind == "new" else "established flows"
        ax[0].plot(x, [p[kind]["xdplb"]["per_core_mpps"] for p in pts], style,
                   color="tab:blue", label=f"xdplb, {label}")
        ax[0].plot(x, [p[kind]["iptables"]["per_core_mpps"] for p in pts], style,
                   color="tab:red", label=f"{doc['iptables']} DNAT, {label}")
        ax[0].plot(x, [p[kind]["floor_per_core_mpps"] for p in pts], style, color="tab:gray",
                   alpha=0.6, label=f"floor (MAC swap XDP_TX), {label}")
        ax[1].plot(x, [p[kind]["xdplb"]["ns_over_floor"] for p in pts], style,
                   color="tab:blue", label=f"xdplb, {label}")
        ax[1].plot(x, [p[kind]["iptables"]["ns_over_floor"] for p in pts], style,
                   color="tab:red", label=f"iptables, {label}")
    ax[0].set_title("Mpps per core (generator + path + sink on that core)")
    ax[0].set_ylabel("Mpps")
    ax[1].set_title("cost per packet beyond the floor (ns)")
    ax[1].set_ylabel("ns / packet")
    log_x_axes(ax, "services (VIPs)", 7, log_y=True)
    m = doc["machine"]
    fig.suptitle(f"xdplb vs kube-proxy-style iptables DNAT ({m['cpu_model']}, kernel "
                 f"{m['kernel']})")
    return save_figure(fig, path)


def print_sweep(doc: dict, path: Path | str = "") -> None:
    print(f"services sweep ({doc['iptables']}, {doc['params']['endpoints_per_service']} "
          f"endpoints each; Mpps on one core; ns = per packet beyond the floor)")
    print(f"{'services':>8} {'floor':>6} | {'xdplb new':>9} {'ns':>6} {'ipt new':>8} {'ns':>7} "
          f"{'x/ipt':>6} | {'xdplb est':>9} {'ns':>6} {'ipt est':>8} {'ns':>7} {'x/ipt':>6} "
          f"| {'restore s':>9}")
    for p in doc["points"]:
        n, e = p["new"], p["est"]
        print(f"{p['services']:8} {e['floor_per_core_mpps']:6.2f} | "
              f"{n['xdplb']['per_core_mpps']:9.2f} "
              f"{n['xdplb']['ns_over_floor']:6.0f} {n['iptables']['per_core_mpps']:8.3f} "
              f"{n['iptables']['ns_over_floor']:7.0f} {n['xdplb_over_iptables']:6.1f} | "
              f"{e['xdplb']['per_core_mpps']:9.2f} {e['xdplb']['ns_over_floor']:6.0f} "
              f"{e['iptables']['per_core_mpps']:8.3f} {e['iptables']['ns_over_floor']:7.0f} "
              f"{e['xdplb_over_iptables']:6.1f} | {p['iptables_restore_s']:9.1f}")
    for kind in ("est", "new"):
        v = doc.get("vip_scaling", {}).get(kind)
        if v:
            print(f"xdplb {kind}: cost beyond the floor at {v['services'][1]} VIPs / at "
                  f"{v['services'][0]}: {v['ratio_ns_over_floor']} ({v['ns_over_floor'][1]} / "
                  f"{v['ns_over_floor'][0]} ns, side by side, median of "
                  f"{doc['vip_scaling']['rounds']} rounds); total ns/pkt ratio "
                  f"{v['ratio_ns_per_pkt']}; traffic to {v['services'][0]} of "
                  f"{v['services'][1]} VIPs: {v['ratio_idle_vips']}")
    if path:
        print(f"-> {path}" + (f", {doc['plot']}" if doc.get("plot") else ""))
