"""The headline figures of the last runs, from the JSON files in the results directory
-> summary.json, summary.md (a Markdown fragment for the README), and a table printed.

summary.json carries, each with the raw numbers it is made of and its target:
  forward_ratio_hit     xdplb Mpps per core / floor Mpps per core, flow-table hit traffic
                        (pktgen.json, case hit)
  iptables_ratio_1000   xdplb pps / iptables DNAT pps at 1,000 services, new connections
                        (the traffic that walks iptables' chains); the ratio with
                        established flows beside it (iptables.json)
  vip_scaling_10000     xdplb cost per packet at 10,000 VIPs / at 1 VIP, 20,000 established
                        flows (flow-table hits) on both, two instances side by side,
                        measured like the per-packet cost (vipscale.json); the live-frames
                        figures of the iptables sweep beside it (iptables.json)
  maglev_max_mean_1000  Maglev max slots / mean slots, N=1,000, M=65,537 (maglev.json)
  new_flow_mpps         xdplb Mpps per core, live frames, every packet a new flow (a TCP
                        SYN inserted into a full connection table), with its loss
                        (pktgen.json, case syn)
  tcp_syn_ratio         a SYN inserting a new flow / the floor, BPF_PROG_TEST_RUN (cost.json)
  tcp_hit_ratio         a TCP flow-table hit / the floor, BPF_PROG_TEST_RUN (cost.json)
  quic_vs_udp_hit       cost of a QUIC short header routed by its connection ID / cost of
                        a UDP flow-table hit, per round of the same run (cost.json)
  fleet_resets          connections broken and requests failed across a fleet node's
                        death, rejoin, graceful and health-driven withdraw (fleet.json)
  fleet_convergence_s   seconds until the router drops a dead node (BFD; fleet.json)
  fleet_spread          new flows per fleet node, max / mean (fleet.json)
A figure whose input file is missing is null, with the file named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from . import publish, results_dir
from .cost import machine_info

TARGETS = {"forward_ratio_hit": (">=", 0.90), "iptables_ratio_1000": (">=", 5.0),
           "vip_scaling_10000": ("<=", 1.10), "maglev_max_mean_1000": ("<=", 1.01),
           "new_flow_mpps": (">=", 2.5), "tcp_syn_ratio": ("<=", 6.0),
           "tcp_hit_ratio": ("<=", 2.0),
           "quic_vs_udp_hit": ("<=", 1.10),
           "fleet_resets": ("<=", 0), "fleet_convergence_s": ("<=", 0.5),
           "fleet_spread": ("<=", 1.10)}
FLEET_COUNTS = ("resets_on_node_death", "failed_new_after_convergence", "rejoin_resets",
                "graceful_failed", "health_withdraw_resets")


def _load(d: Path, name: str) -> Optional[dict]:
    try:
        with open(d / name) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _meets(key: str, value) -> Optional[bool]:
    if value is None:
        return None
    op, t = TARGETS[key]
    return value >= t if op == ">=" else value <= t


def _entry(key: str, value, **raw) -> dict:
    op, t = TARGETS[key]
    return {"value": value, "target": f"{op} {t}", "meets_target": _meets(key, value), **raw}


def _point(sweep: dict, n: int) -> Optional[dict]:
    for p in sweep.get("points", []):
        if p["services"] == n:
            return p
    return None


def build(d: Path) -> tuple:
    pk, sw = _load(d, "pktgen.json"), _load(d, "iptables.json")
    vc = _load(d, "vipscale.json")
    mg, co, rl = _load(d, "maglev.json"), _load(d, "cost.json"), _load(d, "reload.json")
    out: dict = {"machine": (pk or sw or co or {}).get("machine") or machine_info()}

    hit = (pk or {}).get("cases", {}).get("hit")
    if hit:
        out["forward_ratio_hit"] = _entry(
            "forward_ratio_hit", hit["ratio"], xdplb_per_core_mpps=hit["per_core_mpps"],
            floor_per_core_mpps=hit["floor_per_core_mpps"], ratio_all=hit["ratio_all"],
            xdplb_ns_per_pkt=hit["ns_per_pkt"], floor_ns_per_pkt=hit["floor_ns_per_pkt"],
            ns_over_floor=hit["ns_over_floor"], loss=hit["loss"],
            note="one core runs generator + data path + sink in both (pktgen.json)")
    else:
        out["forward_ratio_hit"] = _entry("forward_ratio_hit", None, missing="pktgen.json")

    p1000 = _point(sw, 1000) if sw else None
    if p1000:
        n, e = p1000["new"], p1000["est"]
        out["iptables_ratio_1000"] = _entry(
            "iptables_ratio_1000", n["xdplb_over_iptables"],
            traffic="new connections (TCP SYN, one per packet)",
            xdplb_per_core_mpps=n["xdplb"]["per_core_mpps"],
            iptables_per_core_mpps=n["iptables"]["per_core_mpps"],
            floor_per_core_mpps=n["floor_per_core_mpps"],
            established_ratio=e["xdplb_over_iptables"],
            established_xdplb_per_core_mpps=e["xdplb"]["per_core_mpps"],
            established_iptables_per_core_mpps=e["iptables"]["per_core_mpps"],
            iptables=sw["iptables"], endpoints_per_service=p1000["endpoints_per_service"])
    else:
        out["iptables_ratio_1000"] = _entry("iptables_ratio_1000", None,
                                            missing="iptables.json (1,000 services)")

    vs = (sw or {}).get("vip_scaling")
    live = {}
    if vs and vs["est"]["services"] == [1, 10000]:
        est, new = vs["est"], vs["new"]
        live = dict(
            live_frames_ratio_over_floor=est["ratio_ns_over_floor"],
            live_frames_ns_over_floor=est["ns_over_floor"],
            live_frames_ratio_all=est.get("ratio_ns_over_floor_all"),
            live_frames_total_ns_ratio=est["ratio_ns_per_pkt"],
            live_frames_idle_vips_ratio=est.get("ratio_idle_vips"),
            live_frames_new_connections_ratio=new["ratio_ns_over_floor"],
            live_frames_method=vs.get("method"))
    if vc and vc["services"] == [1, 10000]:
        out["vip_scaling_10000"] = _entry(
            "vip_scaling_10000", vc["ratio"],
            traffic=f"{vc['flows']:,} established flows (flow-table hits), spread over the "
                    f"10,000 VIPs / all to the 1",
            ns_1=vc["ns"][0], ns_10000=vc["ns"][1], floor_ns=vc["floor_ns"],
            ratio_over_floor=vc["ratio_over_floor"], ratio_by_pair=vc["ratio_by_pair"],
            idle_vips_ratio=vc["idle_vips_ratio"], idle_vips_note=vc["idle_vips_note"],
            path_ok=vc["ok"], method="BPF_PROG_TEST_RUN, restore wrapper, median over pairs "
                                     "of fresh data paths (vipscale.json)",
            **live)
    elif live:
        out["vip_scaling_10000"] = _entry(
            "vip_scaling_10000", live["live_frames_ratio_over_floor"], **live)
    else:
        out["vip_scaling_10000"] = _entry("vip_scaling_10000", None,
                                          missing="iptables.json (1 and 10,000 services)")

    row = None
    for r in (mg or {}).get("rows", []):
        if r["n"] == 1000 and r["m"] == 65537:
            row = r
    if row:
        out["maglev_max_mean_1000"] = _entry(
            "maglev_max_mean_1000", row["max_over_mean"], n=1000, m=65537,
            max_slots=row["max_slots"], mean_slots=row["mean_slots"],
            min_over_mean=row["min_over_mean"], build_ms=row["build_ms"])
    else:
        out["maglev_max_mean_1000"] = _entry("maglev_max_mean_1000", None,
                                             missing="maglev.json (N=1000, M=65537)")
    syn = (pk or {}).get("cases", {}).get("syn")
    if syn:
        # 0% loss is part of the target: a rate with loss does not count
        out["new_flow_mpps"] = _entry(
            "new_flow_mpps", syn["per_core_mpps"] if not syn["loss"] else None,
            per_core_mpps=syn["per_core_mpps"], loss=syn["loss"],
            floor_per_core_mpps=syn["floor_per_core_mpps"], ratio=syn["ratio"],
            per_core_mpps_all=syn.get("per_core_mpps_all"),
            note="every packet a TCP SYN of a new flow, inserted into a full table")
    else:
        out["new_flow_mpps"] = _entry("new_flow_mpps", None, missing="pktgen.json (syn)")
    for key, case in (("tcp_syn_ratio", "tcp_syn"), ("tcp_hit_ratio", "tcp_hit")):
        c = (co or {}).get("cases", {}).get(case)
        if c:
            out[key] = _entry(key, c["ratio"], ns=c["ns"], floor_ns=co["floor_ns"],
                              ratio_all=c.get("ratio_all"), path_ok=c.get("ok"),
                              verdicts=c.get("verdicts"))
        else:
            out[key] = _entry(key, None, missing=f"cost.json ({case})")
    q = (co or {}).get("cases", {}).get("quic_short_cid", {})
    if q.get("vs"):
        out["quic_vs_udp_hit"] = _entry("quic_vs_udp_hit", q["vs"]["ratio"], quic_ns=q["ns"],
                                        udp_hit_ns=co["cases"]["udp_hit"]["ns"],
                                        path_ok=q["ok"])
    else:
        out["quic_vs_udp_hit"] = _entry("quic_vs_udp_hit", None,
                                        missing="cost.json (quic_short_cid, udp_hit)")
    fl = _load(d, "fleet.json")
    if fl:
        out["fleet_resets"] = _entry("fleet_resets", sum(fl[k] for k in FLEET_COUNTS),
                                     nodes=fl["nodes"], long_lived=fl["long_lived"],
                                     **{k: fl[k] for k in FLEET_COUNTS})
        out["fleet_convergence_s"] = _entry(
            "fleet_convergence_s", fl["convergence_s"],
            by_round=fl["detail"]["convergence_s_by_round"])
        out["fleet_spread"] = _entry("fleet_spread", fl["spread_max_over_mean"],
                                     flows_per_node=fl["detail"]["spread_flows_per_node"])
    else:
        for key in ("fleet_resets", "fleet_convergence_s", "fleet_spread"):
            out[key] = _entry(key, None, missing="fleet.json")
    out["sources"] = {"pktgen": pk is not None, "iptables": sw is not None,
                      "fleet": fl is not None,
                      "vipscale": vc is not None,
                      "maglev": mg is not None, "cost": co is not None,
                      "reload": rl is not None}
    if co:
        out["cost_test_run"] = {"floor_ns": co["floor_ns"],
                                **{k: {"ns": c["ns"], "ratio": c["ratio"]}
                                   for k, c in co["cases"].items()}}
    if rl:
        out["reload"] = {k: rl[k] for k in ("one_backend_ms", "full_load_s", "rss_mb")
                         if k in rl}
    out["memory"] = memory_budget(co, syn)
    return out, pk, sw


def memory_budget(co: Optional[dict], syn: Optional[dict]) -> Optional[dict]:
    """What one uncached read of a flow's slot costs on this machine, beside what the
    new-flow targets leave for all of a new flow's work: the figures that say whether
    those targets can be met here at all."""
    read = ((co or {}).get("primitives_ns") or {}).get("random_read_64mb")
    if not read or not co.get("floor_ns"):
        return None
    floor = co["floor_ns"]
    out = {"random_read_64mb_ns": read, "cost_floor_ns": floor,
           "random_read_in_floors": round(read / floor, 2),
           "tcp_syn_budget_ns": round((TARGETS["tcp_syn_ratio"][1] - 1) * floor, 1)}
    if syn and syn.get("floor_per_core_mpps"):
        out["new_flow_budget_ns"] = round(
            1e3 / TARGETS["new_flow_mpps"][1] - 1e3 / syn["floor_per_core_mpps"], 1)
    return out


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(s: dict, pk: Optional[dict], sw: Optional[dict]) -> str:
    m = s["machine"]
    lines = [f"Taken on: {m.get('cpu_model')} ({m.get('cores')} cores), kernel "
             f"{m.get('kernel')}, {m.get('date')}.", "",
             "| figure | value | target | raw |", "|---|---|---|---|"]
    f = s["forward_ratio_hit"]
    lines.append(f"| forward_ratio_hit (xdplb / floor, flow-table hits) | {_fmt(f['value'])} | "
                 f"{f['target']} | {_fmt(f.get('xdplb_per_core_mpps'))} vs "
                 f"{_fmt(f.get('floor_per_core_mpps'))} Mpps/core; +"
                 f"{_fmt(f.get('ns_over_floor'), '.0f')} ns/pkt |")
    f = s["iptables_ratio_1000"]
    lines.append(f"| iptables_ratio_1000 (xdplb / iptables DNAT, 1,000 services, new "
                 f"connections) | {_fmt(f['value'], '.1f')} | {f['target']} | "
                 f"{_fmt(f.get('xdplb_per_core_mpps'))} vs "
                 f"{_fmt(f.get('iptables_per_core_mpps'), '.3f')} Mpps/core; established "
                 f"flows: {_fmt(f.get('established_ratio'), '.1f')}x |")
    f = s["vip_scaling_10000"]
    lines.append(f"| vip_scaling_10000 (cost at 10,000 VIPs / 1 VIP, flow-table hits) | "
                 f"{_fmt(f['value'], '.3f')} | {f['target']} | "
                 f"pairs {f.get('ratio_by_pair')}; beyond the floor "
                 f"{_fmt(f.get('ratio_over_floor'), '.3f')}; 10,000 configured, traffic to 1: "
                 f"{_fmt(f.get('idle_vips_ratio'), '.3f')}; live frames: "
                 f"{_fmt(f.get('live_frames_ratio_over_floor'), '.3f')} beyond the floor, "
                 f"new connections {_fmt(f.get('live_frames_new_connections_ratio'), '.3f')} |")
    f = s["maglev_max_mean_1000"]
    lines.append(f"| maglev_max_mean_1000 (N=1,000, M=65,537) | {_fmt(f['value'], '.4f')} | "
                 f"{f['target']} | max {f.get('max_slots')} slots, mean "
                 f"{f.get('mean_slots')} |")
    f = s["new_flow_mpps"]
    loss = f.get("loss")
    lines.append(f"| new_flow_mpps (live frames, every packet a new flow, 0% loss) | "
                 f"{_fmt(f['value'])} | {f['target']} | "
                 f"{_fmt(f.get('per_core_mpps'))} Mpps/core, loss "
                 f"{'-' if loss is None else f'{loss * 100:.2f}%'}; floor "
                 f"{_fmt(f.get('floor_per_core_mpps'))} |")
    for key, what in (("tcp_syn_ratio", "a SYN inserting a new flow"),
                      ("tcp_hit_ratio", "a TCP flow-table hit")):
        f = s[key]
        lines.append(f"| {key} ({what} / floor, BPF_PROG_TEST_RUN) | {_fmt(f['value'])} | "
                     f"{f['target']} | {_fmt(f.get('ns'), '.0f')} vs "
                     f"{_fmt(f.get('floor_ns'), '.0f')} ns; rounds {f.get('ratio_all')} |")
    f = s["quic_vs_udp_hit"]
    lines.append(f"| quic_vs_udp_hit (QUIC short header routed by CID / UDP flow-table hit) | "
                 f"{_fmt(f['value'], '.3f')} | {f['target']} | {_fmt(f.get('quic_ns'), '.1f')} "
                 f"vs {_fmt(f.get('udp_hit_ns'), '.1f')} ns |")
    f = s["fleet_resets"]
    lines.append(f"| fleet_resets (3 nodes behind ECMP: node death, rejoin, withdraws) | "
                 f"{_fmt(f['value'], 'd')} | {f['target']} | "
                 + ", ".join(f"{k} {f.get(k)}" for k in FLEET_COUNTS) + " |")
    f = s["fleet_convergence_s"]
    lines.append(f"| fleet_convergence_s (a dead node dropped by the router, BFD) | "
                 f"{_fmt(f['value'], '.3f')} | {f['target']} | by round "
                 f"{f.get('by_round')} |")
    f = s["fleet_spread"]
    lines.append(f"| fleet_spread (new flows per node, max / mean) | {_fmt(f['value'], '.3f')}"
                 f" | {f['target']} | {f.get('flows_per_node')} |")
    mem = s.get("memory")
    if mem:
        lines += ["", "Memory on this machine (`cost.json` primitives): " + memory_line(mem)]
    if pk:
        lines += ["", "Packet rates (`pktgen.json`): Mpps per core; the core runs the "
                  "generator, the data path and the sink; floor = MAC-swap XDP_TX on the "
                  "same interface with the same traffic, measured in the same round.", "",
                  "| case | Mpps/core | floor | ratio | ns/pkt beyond floor | offered Mpps | "
                  "forwarded Mpps | loss |", "|---|---|---|---|---|---|---|---|"]
        for name, c in pk["cases"].items():
            extra = ""
            if c.get("ratio_to_stack") is not None:
                extra = (f" (kernel stack alone {c['stack_per_core_mpps']:.2f}, "
                         f"{c['ratio_to_stack']:.2f}x)")
            lines.append(f"| {name}: {c['desc']} | {c['per_core_mpps']:.2f}{extra} | "
                         f"{c['floor_per_core_mpps']:.2f} | {c['ratio']:.2f} | "
                         f"{c['ns_over_floor']:.0f} | {c['offered_mpps']:.2f} | "
                         f"{c['forwarded_mpps']:.2f} | {c['loss'] * 100:.2f}% |")
    if sw:
        lines += ["", f"Services sweep (`iptables.json`, {sw['iptables']}, "
                  f"{sw['params']['endpoints_per_service']} endpoints per service): Mpps per "
                  "core; ns = per packet beyond the floor of the same point.", "",
                  "| services | floor | xdplb new | ns | iptables new | ns | xdplb/iptables "
                  "| xdplb est | ns | iptables est | ns | xdplb/iptables |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in sw["points"]:
            n, e = p["new"], p["est"]
            lines.append(
                f"| {p['services']:,} | {e['floor_per_core_mpps']:.2f} | "
                f"{n['xdplb']['per_core_mpps']:.2f} | {n['xdplb']['ns_over_floor']:.0f} | "
                f"{n['iptables']['per_core_mpps']:.3f} | {n['iptables']['ns_over_floor']:.0f} | "
                f"{n['xdplb_over_iptables']:.1f} | {e['xdplb']['per_core_mpps']:.2f} | "
                f"{e['xdplb']['ns_over_floor']:.0f} | {e['iptables']['per_core_mpps']:.3f} | "
                f"{e['iptables']['ns_over_floor']:.0f} | {e['xdplb_over_iptables']:.1f} |")
    return "\n".join(lines) + "\n"


def memory_line(mem: dict) -> str:
    line = (f"a read of a random line of a 64 MB BPF array, waiting for the read before it, "
            f"costs {mem['random_read_64mb_ns']:.0f} ns, {mem['random_read_in_floors']:.1f}x "
            f"the cost floor of {mem['cost_floor_ns']:.0f} ns. The tcp_syn target leaves "
            f"{mem['tcp_syn_budget_ns']:.0f} ns beyond the floor for all of a SYN's work")
    if mem.get("new_flow_budget_ns") is not None:
        line += (f"; the new_flow_mpps target, {mem['new_flow_budget_ns']:.0f} ns per new flow "
                 f"beyond the live floor")
    return line + "."


def run_summary(out: Optional[str] = None, quiet: bool = False) -> dict:
    d = results_dir(out)
    s, pk, sw = build(d)
    publish(s, d, "summary")
    md = markdown(s, pk, sw)
    with open(d / "summary.md", "w") as f:
        f.write(md)
    if not quiet:
        print_summary(s, d)
    return s


def print_summary(s: dict, d: Path | str = "") -> None:
    m = s["machine"]
    print(f"summary ({m.get('cpu_model')}, {m.get('cores')} cores, kernel {m.get('kernel')})")
    print(f"{'figure':22} {'value':>8} {'target':>8}  {'':7} raw")
    rows = (("forward_ratio_hit", ".3f",
             lambda f: f"xdplb {_fmt(f.get('xdplb_per_core_mpps'))} vs floor "
                       f"{_fmt(f.get('floor_per_core_mpps'))} Mpps/core, +"
                       f"{_fmt(f.get('ns_over_floor'), '.0f')} ns/pkt"),
            ("iptables_ratio_1000", ".2f",
             lambda f: f"new conns: xdplb {_fmt(f.get('xdplb_per_core_mpps'))} vs iptables "
                       f"{_fmt(f.get('iptables_per_core_mpps'), '.3f')} Mpps/core; "
                       f"established: {_fmt(f.get('established_ratio'))}x"),
            ("vip_scaling_10000", ".3f",
             lambda f: f"hits, pairs {f.get('ratio_by_pair')}; traffic to 1 of 10,000: "
                       f"{_fmt(f.get('idle_vips_ratio'), '.3f')}; live frames "
                       f"{_fmt(f.get('live_frames_ratio_over_floor'), '.3f')}"),
            ("maglev_max_mean_1000", ".4f",
             lambda f: f"max {f.get('max_slots')} / mean {f.get('mean_slots')} slots"),
            ("quic_vs_udp_hit", ".3f",
             lambda f: f"{_fmt(f.get('quic_ns'), '.1f')} vs {_fmt(f.get('udp_hit_ns'), '.1f')} "
                       f"ns per packet"),
            ("fleet_resets", "d",
             lambda f: ", ".join(f"{k} {f.get(k)}" for k in FLEET_COUNTS)),
            ("fleet_convergence_s", ".3f", lambda f: f"by round {f.get('by_round')}"),
            ("fleet_spread", ".3f", lambda f: f"flows per node {f.get('flows_per_node')}"))
    for key, spec, raw in rows:
        f = s[key]
        mark = {True: "ok", False: "MISSED", None: "n/a"}[f["meets_target"]]
        print(f"{key:22} {_fmt(f['value'], spec):>8} {f['target']:>8}  {mark:7} "
              f"{raw(f) if f['value'] is not None else 'missing: ' + f.get('missing', '')}")
    if s.get("memory"):
        print("memory: " + memory_line(s["memory"]))
    if d:
        print(f"-> {Path(d) / 'summary.json'}, {Path(d) / 'summary.md'}")
