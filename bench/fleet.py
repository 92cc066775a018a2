"""A fleet of three xdplb nodes behind ECMP: what a node's death, rejoin, graceful withdraw
and health-driven withdraw cost, in the lab's fleet variant (lb/lab/fleet.py: a BIRD router
with eBGP + BFD to three nodes, each with xdplb and BIRD; namespaces xg-*, removed after).

Measured with lb/lab/fleetscene.py's scenes, 60 long-lived line-echo connections (IPv4
and IPv6) running through each:
  spread_max_over_mean         new flows (UDP, one datagram each, from distinct source
                               ports) per node, max / mean
  resets_on_node_death         connections broken (reset, stalled, answered by another
                               backend) when a node dies as a machine does, summed over
                               `rounds` deaths (a different node each time)
  convergence_s                seconds from the death until the router's routes (both
                               families) no longer use the node: the worst round (BFD)
  failed_new_after_convergence new requests failing once it had converged
  rejoin_resets                connections broken when the dead node comes back
  graceful_failed              new requests failing while a node is withdrawn under load
                               (plus connections broken then)
  health_withdraw_resets       connections broken when a node is cut off its backends
                               and withdraws by itself
Targets: every count 0, convergence <= 0.5 s, spread within 10% of even. Timings vary
with the machine's load; the counts do not.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional

from lb.lab import fleetscene
from lb.lab.fleet import FleetLab
from lb.lab.fleetload import Held

from . import publish, save_figure, subplots
from .cost import machine_info

LONG_LIVED = 60
SPREAD_FLOWS = 3000
TARGETS = {"convergence_s": 0.5, "spread_max_over_mean": 1.10}
COUNTS = ("resets_on_node_death", "failed_new_after_convergence", "rejoin_resets",
          "graceful_failed", "health_withdraw_resets")


def _held_scene(lab: FleetLab, scene, *args) -> dict:
    held = Held(lab.client, LONG_LIVED).start()
    try:
        return scene(lab, held, *args)
    finally:
        held.stop()


def measure(lab: FleetLab, rounds: int) -> dict:
    per_node, unanswered = fleetscene.spread(lab, SPREAD_FLOWS)
    counts = list(per_node.values())
    deaths, rejoins = [], []
    for i in range(rounds):
        victim = lab.nodes[i % len(lab.nodes)]
        held = Held(lab.client, LONG_LIVED).start()
        try:
            deaths.append(fleetscene.node_death(lab, held, victim))
            rejoins.append(fleetscene.rejoin(lab, held, victim))
        finally:
            held.stop()
    graceful = _held_scene(lab, fleetscene.graceful_withdraw, lab.nodes[1])
    fleetscene.restore(lab)
    health = _held_scene(lab, fleetscene.health_withdraw, lab.nodes[2])
    fleetscene.restore(lab)
    conv = [d["convergence_s"] for d in deaths]
    return {
        "nodes": len(lab.nodes), "long_lived": LONG_LIVED,
        "resets_on_node_death": sum(len(d["broken"]) + (not d["progressed"]) for d in deaths),
        "convergence_s": round(max(conv), 3),
        "failed_new_after_convergence": sum(d["failed_new_after_convergence"]
                                            for d in deaths),
        "graceful_failed": len(graceful["failed"]) + len(graceful["broken"]),
        "rejoin_resets": sum(len(r["broken"]) + (not r["progressed"]) for r in rejoins),
        "health_withdraw_resets": len(health["broken"]) + (not health["progressed"]),
        "spread_max_over_mean": round(max(counts) / statistics.mean(counts), 4),
        "detail": {
            "spread_flows_per_node": per_node, "spread_unanswered": unanswered,
            "convergence_s_by_round": [round(c, 3) for c in conv],
            "connections_on_dead_node": [d["on_victim"] for d in deaths],
            "rejoin_s": [round(r["rejoin_s"], 3) for r in rejoins],
            "connections_moved_back": [r["on_node"] for r in rejoins],
            "graceful_requests": graceful["requests"],
            "graceful_withdrawn_after_s": round(graceful["withdrawn_after_s"], 3),
            "health_withdrawn_after_s": round(health["withdrawn_after_s"], 3),
            "broken": [e for d in (*deaths, *rejoins, graceful, health)
                       for e in d["broken"]][:20],
        },
    }


def meets(doc: dict) -> dict[str, bool]:
    out = {k: doc[k] == 0 for k in COUNTS}
    out.update({k: doc[k] <= t for k, t in TARGETS.items()})
    return out


def _plot(doc: dict, path: Path) -> Path:
    fig, (left, right) = subplots(1, 2, figsize=(10, 3.8))
    per = doc["detail"]["spread_flows_per_node"]
    left.bar(list(per), list(per.values()), color="tab:blue")
    mean = statistics.mean(per.values())
    left.axhline(mean * TARGETS["spread_max_over_mean"], color="tab:red", ls="--",
                 label="mean + 10%")
    left.set_title(f"{sum(per.values())} new flows per node")
    left.legend(fontsize=8)
    conv = doc["detail"]["convergence_s_by_round"]
    right.bar([f"death {i + 1}" for i in range(len(conv))], conv, color="tab:orange")
    right.axhline(TARGETS["convergence_s"], color="tab:red", ls="--", label="target")
    right.set_ylabel("s until the router dropped the node")
    right.set_title(f"node death, {doc['long_lived']} long-lived connections: "
                    f"{doc['resets_on_node_death']} broken")
    right.legend(fontsize=8)
    return save_figure(fig, path)


def _show(doc: dict, path) -> None:
    ok = doc["meets_target"]
    print(f"fleet: {doc['nodes']} nodes behind a BIRD router (BFD), {doc['long_lived']} "
          f"long-lived connections per scene")
    for key in (*COUNTS, *TARGETS):
        target = f"<= {TARGETS[key]}" if key in TARGETS else "0"
        print(f"  {key:30} {doc[key]:>8} target {target:>7}  "
              f"{'ok' if ok[key] else 'MISSED'}")
    print(f"  convergence by round {doc['detail']['convergence_s_by_round']}, flows per "
          f"node {doc['detail']['spread_flows_per_node']}")
    print(f"-> {path}")


def run_fleet(out: Optional[str] = None, rounds: int = 3) -> dict:
    lab = FleetLab(prefix="xg-")
    t0 = time.monotonic()
    try:
        fleetscene.start(lab)
        doc = measure(lab, rounds)
    finally:
        lab.down()
    doc["meets_target"] = meets(doc)
    doc["targets"] = {**{k: "0" for k in COUNTS},
                      **{k: f"<= {t}" for k, t in TARGETS.items()}}
    doc["duration_s"] = round(time.monotonic() - t0, 1)
    doc["machine"] = machine_info()
    publish(doc, out, "fleet", plot=_plot, show=_show)
    return doc
