"""`make demo`: build the lab, run xdplb in it, send real traffic, show a drain and a
failover, tear down. Exits non-zero if a request failed that should not have."""

from __future__ import annotations

import collections
import os
import sys
import time

from ..control import NoInstance
from . import fleetscene
from . import topology as lab
from .fleet import FleetLab
from .fleetload import Held
from .instance import Instance, InstanceError, RunFiles

CONFIG = "config/lab.toml"


def _wait(daemon: Instance, pred, timeout: float, what: str) -> None:
    try:
        daemon.wait_until(pred, what, timeout, ignore=(NoInstance, OSError, KeyError),
                          poll=0.1)
    except InstanceError:
        raise SystemExit(f"demo: timed out waiting for {what}") from None


def _backend_states(doc: dict, vip: str) -> dict[str, str]:
    v = next(v for v in doc["vips"] if v["name"] == vip)
    return {b["address"]: b["state"] for b in v["backends"]}


def _table(doc: dict, answered: dict[str, collections.Counter]) -> str:
    name_of = lab.Lab().name_of()
    rows = [f"{'vip':<7} {'backend':<14} {'host':<7} {'answered':>8} {'packets':>8} "
            f"{'bytes':>8}  state"]
    for v in doc["vips"]:
        for b in v["backends"]:
            host = name_of.get(b["address"], "?")
            rows.append(f"{v['name']:<7} {b['address']:<14} {host:<7} "
                        f"{answered.get(v['name'], {}).get(host, 0):>8} {b['packets']:>8} "
                        f"{b['bytes']:>8}  {b['state']}")
    return "\n".join(rows)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (make demo)", file=sys.stderr)
        return 2
    bad = 0
    daemon = None
    demo_lab = lab.Lab().up()
    try:
        os.makedirs("/run/xdplb", exist_ok=True)
        RunFiles("lab").clean()  # config/lab.toml's pins, socket and state file
        os.makedirs(demo_lab.piddir, exist_ok=True)
        log = os.path.join(demo_lab.piddir, "xdplb.log")
        if os.path.exists(log):
            os.unlink(log)
        daemon = Instance(demo_lab.lb, CONFIG, log)
        _wait(daemon, lambda: all(s == "active" for v in ("web", "echo", "web6", "echo6")
                                  for s in _backend_states(daemon.stats(), v).values()), 20,
              "every backend to pass its health checks")
        print("xdplb is up; every backend passed its health checks\n")

        answered: dict[str, collections.Counter] = {}
        for vip, fn, host, n in (("web", demo_lab.client_http, lab.VIP4, 150),
                                 ("web6", demo_lab.client_http, lab.VIP6, 150),
                                 ("echo", demo_lab.client_udp, lab.VIP4, 150),
                                 ("echo6", demo_lab.client_udp, lab.VIP6, 150)):
            got, failed = fn(host, n)
            answered[vip] = got
            bad += failed
            print(f"{vip:<6} {n} requests to {host}: {sum(got.values())} answered, "
                  f"{failed} failed")
        print()
        print(_table(daemon.stats(), answered))

        # drain: be1 takes no new connections
        print("\n$ xdplb backend drain web 10.200.0.11")
        daemon.request({"cmd": "backend", "action": "drain", "vip": "web",
                        "backend": "10.200.0.11"})
        got, failed = demo_lab.client_http(lab.VIP4, 60)
        bad += failed + got.get("xl-be1", 0)
        print(f"drain: 60 new connections -> {dict(got)}; xl-be1 got "
              f"{got.get('xl-be1', 0)}, {failed} failed")
        daemon.request({"cmd": "backend", "action": "activate", "vip": "web",
                        "backend": "10.200.0.11"})

        # failover: be2's server dies; health checks take it out
        print("\n$ kill the server of xl-be2")
        t0 = time.monotonic()
        demo_lab.stop_server("xl-be2")
        _wait(daemon, lambda: _backend_states(daemon.stats(), "web")["10.200.0.12"] == "down",
              20, "xl-be2 to be marked down")
        took = time.monotonic() - t0
        got, failed = demo_lab.client_http(lab.VIP4, 60)
        bad += failed + got.get("xl-be2", 0)
        print(f"failover: xl-be2 down after {took:.1f}s (fall=2 checks every 0.5s); "
              f"60 new connections -> {dict(got)}, {failed} failed")
        demo_lab.start_server("xl-be2")
        _wait(daemon, lambda: _backend_states(daemon.stats(), "web")["10.200.0.12"] == "active",
              20,
              "xl-be2 to come back")
        print("xl-be2 restarted: back in service after rise=2 checks")
    finally:
        if daemon is not None:
            daemon.stop()
        demo_lab.down(quiet=False)
    bad += fleet_scene()
    print(f"\ndemo {'passed' if bad == 0 else 'FAILED'}: {bad} unexpected failures")
    return 0 if bad == 0 else 1


def fleet_scene() -> int:
    """Three xdplb nodes behind a BIRD router: a node dies under long-lived connections,
    another is withdrawn under load. Returns the count of unexpected failures."""
    print("\n--- fleet: 3 xdplb nodes behind a BIRD router (eBGP + BFD, ECMP) ---")
    fleet, bad = FleetLab(), 0
    try:
        fleetscene.start(fleet)
        hops = sorted(fleet.next_hops(lab.VIP4))
        print(f"router: {lab.VIP4} learned over BGP via {', '.join(hops)}")
        per_node, failed = fleetscene.spread(fleet, 300)
        bad += failed
        print(f"300 new flows -> {per_node}, {failed} failed")
        held = Held(fleet.client, 60).start()
        try:
            victim = fleet.nodes[0]
            print(f"\n$ kill {victim} as a machine dies (link down, BIRD and xdplb "
                  "SIGKILLed), 60 long-lived connections running")
            res = fleetscene.node_death(fleet, held, victim)
            broken = len(res["broken"]) + (not res["progressed"])
            bad += broken + res["failed_new_after_convergence"]
            print(f"router dropped {victim} after {res['convergence_s']:.2f}s; "
                  f"{res['on_victim']} connections went through it; connections reset: "
                  f"{broken}; 100 new requests after: {res['failed_new_after_convergence']} "
                  "failed")
            node = fleet.nodes[1]
            print(f"\n$ xdplb announce withdraw (on {node}), requests running")
            res = fleetscene.graceful_withdraw(fleet, held, node, settle=0.5)
            bad += len(res["failed"]) + len(res["broken"])
            print(f"router dropped {node} after {res['withdrawn_after_s']:.2f}s; "
                  f"{res['requests']} requests: {len(res['failed'])} failed; connections "
                  f"reset: {len(res['broken'])}")
        finally:
            held.stop()
    finally:
        fleet.down()
    return bad


if __name__ == "__main__":
    sys.exit(main())
