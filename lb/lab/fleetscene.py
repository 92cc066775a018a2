"""The fleet scenes, shared by tests/test_fleet.py, the demo's fleet scene and
`python -m bench fleet`: bring the fleet up, spread new flows over its nodes, kill a node
as a machine dies while long-lived connections run, withdraw a node gracefully under
load, cut a node off its backends, bring a node back. Each returns what it measured;
the callers judge it.
"""

from __future__ import annotations

import collections
import time
from typing import Iterable

from ..control import NoInstance
from .fleet import FleetLab
from .fleetload import Held, Requests
from .instance import Instance
from .topology import VIP4, VIP6

WAIT = 30.0  # upper bound of every wait; never reached when well


def wait_hops(lab: FleetLab, nodes: Iterable[str], since: float) -> float:
    """Until the router's VIP routes (both families) go to exactly `nodes`: the seconds
    from `since` until the later of the two did."""
    nodes = tuple(nodes)
    return max(lab.wait_next_hops(vip, lab.node_addresses(nodes, fam), WAIT, since)
               for vip, fam in ((VIP4, 4), (VIP6, 6)))


def others(lab: FleetLab, node: str) -> list[str]:
    """The nodes running, but `node`."""
    return [n for n in lab.nodes if n != node and n in lab.instances]


def announced(d: Instance) -> bool:
    return all(v["announced"] for v in d.stats()["vips"])


def ready(lab: FleetLab, node: str) -> list[str]:
    """Wait until the node's xdplb has every backend active and announces every VIP,
    watching it every 10 ms: the VIPs seen announced while a backend of theirs was not
    yet active (flows the router moves to the node could then land on another backend)."""
    d, partial = lab.instances[node], set()

    def done() -> bool:
        vips = d.stats()["vips"]
        partial.update(v["name"] for v in vips if v["announced"] and
                       any(b["state"] != "active" for b in v["backends"]))
        return all(v["announced"] and all(b["state"] == "active" for b in v["backends"])
                   for v in vips)
    d.wait_until(done, f"{node} announcing", WAIT, ignore=(NoInstance, OSError, KeyError),
                 poll=0.01)
    return sorted(partial)


def announce(lab: FleetLab, node: str, action: str) -> dict:
    """`xdplb announce {withdraw,restore,status}` on the node's xdplb."""
    return lab.instances[node].request({"cmd": "announce", "action": action})["result"]


def start(lab: FleetLab) -> None:
    """The lab up, xdplb on every node, every node announced and in the router's routes."""
    lab.up()
    for node in lab.nodes:
        lab.start_node(node)
    for node in lab.nodes:
        ready(lab, node)
    wait_hops(lab, lab.nodes, time.monotonic())


def restore(lab: FleetLab) -> None:
    """Every node running and announced again (after a scene that took one out)."""
    for node in lab.nodes:
        if node not in lab.instances:
            lab.reboot_node(node)
            ready(lab, node)
        elif announce(lab, node, "status")["withdrawn"]:
            announce(lab, node, "restore")
            ready(lab, node)
    wait_hops(lab, lab.nodes, time.monotonic())


def packets_per_node(lab: FleetLab, vip: str) -> dict[str, int]:
    out = {}
    for node, d in lab.instances.items():
        v = next(v for v in d.stats()["vips"] if v["name"] == vip)
        out[node] = v["packets"]
    return out


def spread(lab: FleetLab, n: int) -> tuple[dict[str, int], int]:
    """n UDP echo requests to the IPv4 VIP, each from a source port of its own (one
    datagram, so one flow, each): (datagrams per node, requests unanswered)."""
    before = packets_per_node(lab, "echo")
    _, failed = lab.client_udp(VIP4, n)
    after = packets_per_node(lab, "echo")
    return {node: after[node] - before[node] for node in after}, failed


def node_death(lab: FleetLab, held: Held, victim: str) -> dict:
    """Kill `victim` while `held` runs. Measures: seconds until the router dropped it
    (both families), connections broken, connections it carried, new requests failed
    once the router had converged."""
    on_victim = sum(1 for n in lab.node_of(held.flows()) if n == victim)
    alive = others(lab, victim)
    t0 = lab.kill_node(victim)
    convergence = wait_hops(lab, alive, t0)
    progressed = held.wait_progress(t0 + convergence, WAIT)
    got, failed4 = lab.client_http(VIP4, 50)
    got6, failed6 = lab.client_http(VIP6, 50)
    return {"convergence_s": convergence, "on_victim": on_victim,
            "broken": [c.error for c in held.failed()], "progressed": progressed,
            "failed_new_after_convergence": failed4 + failed6,
            "new_backends": collections.Counter(got) + collections.Counter(got6)}


def graceful_withdraw(lab: FleetLab, held: Held, node: str, settle: float = 1.0) -> dict:
    """Withdraw `node`'s announcement while new requests run, keep the load `settle` s
    after the router dropped it. Measures: requests made and failed, connections broken,
    seconds until the router dropped it."""
    load = Requests(lab.client, threads=2).start()
    time.sleep(0.5)
    t0 = time.monotonic()
    announce(lab, node, "withdraw")
    took = wait_hops(lab, others(lab, node), t0)
    time.sleep(settle)
    done = load.stop()
    progressed = held.wait_progress(time.monotonic(), WAIT)
    return {"requests": len(done), "failed": [r.error for r in load.failed()],
            "withdrawn_after_s": took, "broken": [c.error for c in held.failed()],
            "progressed": progressed}


def health_withdraw(lab: FleetLab, held: Held, node: str) -> dict:
    """Cut `node` off its backends in the switch (its health checks fail, and so does what
    it forwards) until the router no longer uses it: the node withdraws by itself, the
    others stay. Measures: seconds until the router dropped it, connections broken."""
    t0 = time.monotonic()
    lab.cut_backends(node)
    try:
        took = wait_hops(lab, others(lab, node), t0)
        progressed = held.wait_progress(time.monotonic(), WAIT)
    finally:
        lab.cut_backends(node, cut=False)
    return {"withdrawn_after_s": took, "broken": [c.error for c in held.failed()],
            "progressed": progressed}


def rejoin(lab: FleetLab, held: Held, node: str) -> dict:
    """Bring a killed node back as a rebooted machine. Measures: seconds from its start
    until the router used it again, connections broken, connections it now carries."""
    t0 = time.monotonic()
    lab.reboot_node(node)
    partial = ready(lab, node)
    took = wait_hops(lab, lab.nodes, t0)
    progressed = held.wait_progress(time.monotonic(), WAIT)
    on_node = sum(1 for n in lab.node_of(held.flows()) if n == node)
    return {"rejoin_s": took, "broken": [c.error for c in held.failed()],
            "on_node": on_node, "progressed": progressed,
            "announced_partial": partial}


def up() -> int:
    """`xdplb lab up --variant fleet`."""
    lab = FleetLab()
    start(lab)
    h = lab.hosts()
    print(f"lab up (fleet): client {h['client'].v4}, router {h['router'].v4} (BIRD, ECMP "
          f"over {len(lab.nodes)} next hops), nodes {', '.join(h[n].v4 for n in lab.nodes)} "
          f"(xdplb + BIRD; configs and logs in {lab.piddir}), backends "
          f"{', '.join(h[b].v4 for b in lab.backends)}; VIPs {VIP4} and {VIP6}")
    return 0
